"""State that must survive what happens to disks and machines: a lost
ingest marker, a power loss (git's fsync), a corrupt client queue, a node
restored from an older copy (issue 11, items 7, 9, 11 and the results
offset), with the real programs."""

import json
import os
import re
import shutil
import subprocess
import time
import unittest

from modules import _core as core
from tests import support
from tests.pipeline import CLIENT, Pipeline
from tests.test_reliability import write_tree


def journal_lines(pipeline):
    path = os.path.join(pipeline.node_dir, 'data', CLIENT, 'results.jsonl')
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def age_node_pool(pipeline, days):
    pool = os.path.join(pipeline.node_dir, 'TODO', CLIENT)
    then = time.time() - days * 86400
    for name in os.listdir(pool):
        if name[0] in 'FX':
            os.utime(os.path.join(pool, name), (then, then))


class LostIngestMarkerTest(unittest.TestCase):
    """Item 9: ingest's "already seen" survives prune and a lost marker."""

    def test_lost_marker_after_prune_ingests_nothing_again(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        write_tree(src, 1 << 16)
        p.client('commit', 'app', src)
        p.client('commit', 'dummy', src)
        p.client('send')
        p.server('run')
        p.client('send')                # the results: exports removed
        self.assertEqual(os.listdir(os.path.join(p.client_dir, 'export')),
                         [])
        self.assertEqual(p.states('node'), {'F': 2})
        age_node_pool(p, 100)           # older than keep_requests (90d)
        p.server('prune')
        self.assertEqual(p.states('node'), {})
        marker = os.path.join(p.node_dir, 'TODO', CLIENT, '.ingested')
        os.unlink(marker)
        before = journal_lines(p)
        p.server('run')
        # Nothing ran again: no new outcome, one stored backup, no mail
        # about a backup that was stored.
        self.assertEqual(p.states('node'), {})
        self.assertEqual(journal_lines(p), before, p.node_log())
        self.assertEqual(len(p.stored('app')), 1)
        self.assertEqual(p.mails(), [])
        # The push hook's ingest without a marker: only the new request.
        os.unlink(marker)
        p.client('commit', 'dummy', src)
        p.client('send')
        self.assertEqual(p.states('node'), {'RQ': 1}, p.node_log())
        p.server('run')
        self.assertEqual(len(journal_lines(p)), len(before) + 1)
        self.assertEqual(p.mails(), [])


def fsynced_paths(pipeline, script, *args):
    """Run one client.py/server.py command under strace; the paths of
    every file and directory it (or a program it started) fsynced."""
    trace = os.path.join(pipeline.root, 'strace.out')
    proc = subprocess.run(
        ['strace', '-f', '-y', '-qq', '-e', 'trace=fsync,fdatasync', '-o',
         trace, *pipeline.commands[script], '--config', pipeline.config,
         *args], env=pipeline.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        timeout=300)
    pipeline.testcase.assertEqual(proc.returncode, 0, proc.stderr)
    with open(trace) as f:
        return re.findall(r'fd?a?t?a?sync\(\d+<([^>]*)>\) = 0', f.read())


class GitFsyncTest(unittest.TestCase):
    """Item 11: what git writes for the project survives a power loss."""

    def test_queue_commit_and_published_results_are_fsynced(self):
        support.require_tools('strace')
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        write_tree(src, 1 << 10)
        p.client('commit', 'app', src)
        refs = core.git_version()[0] >= (2, 36)
        queue = os.path.join(p.client_dir, 'queues', 'n1.git')
        synced = fsynced_paths(p, 'client.py', 'send')
        # The request's new export directory has its entry on disk.
        self.assertIn(os.path.join(p.client_dir, 'export'), synced)
        # The request commit, before its P->F rename: objects and ref.
        self.assertTrue([s for s in synced if s.startswith(
            queue + '/objects/')], synced)
        if refs:
            self.assertIn(queue + '/refs/heads/master.lock', synced)
        self.assertEqual(p.states('node'), {'RQ': 1})
        # The node's results commit, before the published offset.
        synced = fsynced_paths(p, 'server.py', 'run')
        self.assertTrue([s for s in synced if s.startswith(
            p.repo + '/objects/')], synced)
        if refs:
            self.assertIn(p.repo + '/refs/heads/results.lock', synced)
        # A first-time files/<source> directory, too.
        self.assertIn(os.path.join(p.node_dir, 'data', CLIENT, 'files'),
                      synced)
        self.assertEqual(len(p.stored('app')), 1)
        # receive-pack (run by sshd for the client's push) reads the
        # node repository's own configuration.
        for key, value in core.git_fsync_settings():
            got = subprocess.run(['git', f'--git-dir={p.repo}', 'config',
                                  '--get', key], stdout=subprocess.PIPE,
                                 text=True).stdout.strip()
            self.assertEqual(got, value)
        # And the result reached the client.
        p.client('send')
        self.assertIn('node stored 1', p.client('status').stdout)


class BrokenQueueTest(unittest.TestCase):
    """Item 7: a garbage HEAD or master in the client's queue repository
    is found by check, mailed once, repaired by init-node --repair, and
    the waiting request then reaches the node once."""

    def break_and_repair(self, name):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        write_tree(src, 1 << 10)
        p.client('commit', 'dummy', src)
        p.client('send')                # the node has a ledger now
        p.server('run')
        request_id = p.client('commit', 'app', src) and \
            [n[1:] for n in p.pool() if n.startswith('C')][0]
        queue = os.path.join(p.client_dir, 'queues', 'n1.git')
        with open(os.path.join(queue, name), 'w') as f:
            f.write('garbage\n')
        check = p.client('check', check=False)
        self.assertNotEqual(check.returncode, 0)
        self.assertIn(os.path.join(queue, name), check.stdout)
        self.assertNotIn('looks ready', check.stdout)
        for _ in range(3):
            self.assertEqual(p.client('send', '-q', check=False).returncode,
                             1)
        # One mail naming the repair; the request waits, never prepared.
        self.assertEqual(len(p.mails()), 1, [m['Subject'] for m in
                                             p.mails()])
        self.assertIn('init-node n1 --repair',
                      p.mails()[0].get_content())
        self.assertEqual(p.states(), {'F': 1, 'C': 1})
        self.assertFalse(os.path.exists(os.path.join(
            p.client_dir, 'export', request_id)))
        self.assertIn('queue repository broken', p.client('status').stdout)
        self.assertNotEqual(p.client('init-node', 'n1', check=False)
                            .returncode, 0)
        p.client('init-node', 'n1', '--repair')
        self.assertIn('looks ready', p.client('check').stdout)
        p.client('send')
        self.assertEqual(p.states('node'), {'F': 1, 'RQ': 1})
        p.server('run')
        p.client('send')
        self.assertEqual(len(p.stored('app')), 1)
        stored = [e for e in journal_lines(p) if request_id in e['request']]
        self.assertEqual(len(stored), 1, journal_lines(p))
        self.assertIn('recovered', p.mails()[-1]['Subject'])
        self.assertEqual(len(p.mails()), 2)

    def test_garbage_master(self):
        self.break_and_repair('refs/heads/master')

    def test_garbage_head(self):
        self.break_and_repair('HEAD')


class LostQueueWhileNodeDownTest(unittest.TestCase):
    """The client's queue repository is lost (a reinstalled client) while
    the node is down: send must not start a new ledger blind (it would
    fork the node's, and the node refuses every later push); it waits, and
    continues the node's ledger once the node answers."""

    def test_new_queue_waits_for_the_nodes_ledger(self):
        p = Pipeline(self)
        p.client('commit', 'dummy', 'r1')
        p.client('send')
        p.server('run')
        shutil.rmtree(os.path.join(p.client_dir, 'queues', 'n1.git'))
        p.sshd.stop()
        p.client('commit', 'dummy', 'r2')
        proc = p.client('send', check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('its ledger could not be fetched', proc.stderr)
        self.assertEqual(p.client('send', check=False).returncode, 1)
        p.sshd.start()
        p.client('send')
        p.server('run')
        self.assertEqual(p.states('node'), {'F': 2})
        self.assertEqual([m['Subject'] for m in p.mails()], [])


class RestoredResultsTest(unittest.TestCase):
    """A node restored from an older copy: results.jsonl no longer holds
    what was published up to the recorded offset.  Publishing starts over;
    the client takes the new results and skips those it has, silently."""

    def client_results(self, p):
        path = os.path.join(p.client_dir, 'log', 'state', 'results-n1.jsonl')
        with open(path) as f:
            return [json.loads(line)['request'] for line in f if line.strip()]

    def backup(self, p, src):
        p.client('commit', 'dummy', src)
        p.client('send')
        p.server('run')
        p.client('send')

    def test_older_results_journal_is_published_again(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        write_tree(src, 1 << 10)
        journal = os.path.join(p.node_dir, 'data', CLIENT, 'results.jsonl')
        self.backup(p, src)
        with open(journal) as f:
            older = f.read()
        self.backup(p, src)
        # Restored: one result, then a new one after it -- as long as
        # before, other bytes.
        with open(journal, 'w') as f:
            f.write(older)
        self.backup(p, src)
        got = self.client_results(p)
        self.assertEqual(len(got), 3, got)
        self.assertEqual(len(set(got)), 3, got)
        self.assertEqual(p.mails(), [])
        self.assertIn('node stored 3', p.client('status').stdout)
        # Shorter than the offset; said once, not every run.
        with open(journal, 'w') as f:
            f.write(older)
        p.server('run')
        p.server('run')
        self.assertEqual(p.node_log(10 ** 6).count(
            'publishing every result again'), 2, p.node_log())
        p.client('send')
        self.assertEqual(sorted(self.client_results(p)), sorted(got))
        self.assertEqual(p.mails(), [])


if __name__ == '__main__':
    unittest.main()
