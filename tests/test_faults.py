"""Full disks, wrong clocks, corrupt state: issue 11's faults, with the
real programs.

Full file systems are real: a small tmpfs mounted over the directory in
question (root only, as in CI), unmounted at cleanup.  A wrong clock is
Debian's ``faketime`` around one command.
"""

import json
import os
import shutil
import subprocess
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline
from tests.test_reliability import write_tree


def mount_tmpfs(testcase, path, size='2m', inodes=None):
    """A real, small file system at path (emptied first)."""
    support.require_root('mounting a tmpfs')
    os.makedirs(path, exist_ok=True)
    options = f'size={size}' + (f',nr_inodes={inodes}' if inodes else '')
    subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', path],
                   check=True)
    testcase.addCleanup(subprocess.run, ['umount', '-l', path])


def resize_tmpfs(path, size):
    subprocess.run(['mount', '-o', f'remount,size={size}', path], check=True)


def with_clock(pipeline, offset, script, *args, check=True):
    """Run one client.py/server.py command with its clock moved by offset
    ('+2h', '-1h', '+30d') by faketime."""
    support.require_tools('faketime')
    proc = subprocess.run(
        ['faketime', '-f', offset, *pipeline.commands[script], '--config',
         pipeline.config, *args], env=pipeline.env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        timeout=300)
    if check and proc.returncode != 0:
        pipeline.testcase.fail(f'faketime {offset} {script} {args}: '
                               f'{proc.returncode}\n{proc.stdout}{proc.stderr}')
    return proc


def subjects(pipeline):
    return [m['Subject'] for m in pipeline.mails()]


class ClientDiskTest(unittest.TestCase):
    """Item 1 and 15: the client's own side failing is a wait, never an
    attempt."""

    def setUp(self):
        self.p = Pipeline(self)
        self.export = os.path.join(self.p.client_dir, 'export')
        self.src = os.path.join(self.p.root, 'src')

    def attempts_dir(self):
        return os.path.join(self.p.client_dir, 'requests', 'n1', '.attempts')

    def test_full_export_dir_waits_then_sends_when_space_returns(self):
        mount_tmpfs(self, self.export, size='2m')
        write_tree(self.src, 3 << 20)          # random: does not compress
        self.p.client('commit', 'app', self.src)
        self.p.client('commit', 'dummy', self.src)
        for _ in range(7):                      # more than max_attempts
            self.p.client('send', '-q', check=False)
        # The big request waits, costs nothing, leaves nothing behind; the
        # one behind it went out.
        self.assertEqual(self.p.states(), {'C': 1, 'F': 1})
        self.assertEqual(os.listdir(self.export), [])
        self.assertEqual(os.listdir(self.attempts_dir())
                         if os.path.isdir(self.attempts_dir()) else [], [])
        self.assertEqual(self.p.mails(), [])
        self.assertIn('client disk full', self.p.client('status').stdout)
        # Past alert_after: one mail, not one per send.
        with_clock(self.p, '+2h', 'client.py', 'send', '-q', check=False)
        with_clock(self.p, '+3h', 'client.py', 'send', '-q', check=False)
        self.assertEqual(len(self.p.mails()), 1, subjects(self.p))
        self.assertIn('failing', self.p.mails()[0]['Subject'])
        # Space returns: the request goes out, one recovery mail.
        resize_tmpfs(self.export, '20m')
        self.p.client('send', '-q')
        self.assertEqual(self.p.states(), {'F': 2})
        # (spool files are named by time: the faked +2h mail sorts last)
        self.assertEqual(sorted(s.rsplit(' ', 1)[1] for s in
                                subjects(self.p)), ['failing', 'recovered'])
        self.p.server('run')
        self.assertEqual(len(self.p.stored('app')), 1)

    def test_unwritable_export_dir_is_a_configuration_wait(self):
        # export_dir replaced by a file: every export fails with ENOTDIR
        # (as root, who writes anywhere, this stands for "not writable").
        shutil.rmtree(self.export)
        with open(self.export, 'w') as f:
            f.write('not a directory\n')
        write_tree(self.src, 1 << 16)
        self.p.client('commit', 'app', self.src)
        for _ in range(7):
            self.p.client('send', '-q', check=False)
        self.assertEqual(self.p.states(), {'C': 1})
        self.assertFalse(os.path.isdir(self.attempts_dir())
                         and os.listdir(self.attempts_dir()))
        # Alerted at once, once.
        self.assertEqual(len(self.p.mails()), 1, subjects(self.p))
        self.assertIn('not writable', self.p.mails()[0]['Subject'])
        os.unlink(self.export)
        os.makedirs(self.export)
        self.p.client('send', '-q')
        self.assertEqual(self.p.states(), {'F': 1})
        self.assertEqual(len(self.p.mails()), 2, subjects(self.p))
        self.assertIn('recovered', self.p.mails()[-1]['Subject'])


def set_option(pipeline, section, line):
    """Add 'key = value' at the top of [section] of the pipeline's config."""
    with open(pipeline.config) as f:
        text = f.read()
    with open(pipeline.config, 'w') as f:
        f.write(text.replace(f'[{section}]\n', f'[{section}]\n{line}\n', 1))


class RetryTest(unittest.TestCase):
    """Item 15: `retry` on both sides puts X* back."""

    def test_client_retry_puts_a_given_up_request_back(self):
        p = Pipeline(self)
        modules = os.path.join(p.root, 'modules')
        shutil.copytree(os.path.join(support.ROOT, 'modules'), modules)
        with open(os.path.join(modules, 'flaky'), 'w') as f:
            f.write('#!/bin/sh\nif [ -e "$2.broken" ]; then\n'
                    '  echo "cannot read $2" >&2; exit 1\nfi\n')
        os.chmod(os.path.join(modules, 'flaky'), 0o755)
        set_option(p, 'client', f'max_attempts = 1\nmodules_dir = {modules}')
        with open(p.config) as f:
            text = f.read()
        with open(p.config, 'w') as f:
            f.write(text.replace('[modules]\n', '[modules]\nflaky = flaky\n'))
        thing = os.path.join(p.root, 'thing')
        open(thing, 'w').close()
        open(thing + '.broken', 'w').close()
        p.client('commit', 'flaky', thing)
        p.client('send', check=False)
        self.assertEqual(p.states(), {'X': 1, 'reason': 1})
        status = p.client('status').stdout
        self.assertIn('client.py retry', status)
        [key] = [n[1:] for n in p.pool() if not n.endswith('.reason')]
        self.assertEqual(p.client('retry', 'nosuchid', check=False)
                         .returncode, 2)
        os.unlink(thing + '.broken')
        self.assertIn(key, p.client('retry', key).stdout)
        self.assertEqual(p.states(), {'C': 1})
        history = os.path.join(p.client_dir, 'requests', 'n1', '.attempts',
                               key + '.history')
        with open(history) as f:
            self.assertIn('cannot read', f.read())
        p.client('send')
        self.assertEqual(p.states(), {'F': 1})
        self.assertIn('retry', p.client('--help').stdout)

    def test_server_retry_puts_a_given_up_request_back(self):
        p = Pipeline(self)
        set_option(p, 'server', 'max_attempts = 1')
        src = os.path.join(p.root, 'src')
        write_tree(src, 1 << 16)
        p.client('commit', 'app', src)
        p.client('send')
        export = os.path.join(p.client_dir, 'export')
        [archive] = [os.path.join(d, f) for d, _, fs in os.walk(export)
                     for f in fs if not f.endswith('.listing')]
        with open(archive, 'rb') as f:
            good = f.read()
        with open(archive, 'r+b') as f:     # same size, other bytes
            f.seek(100)
            f.write(b'\0' * 16)
        p.server('run', check=False)
        self.assertEqual(p.states('node'), {'X': 1, 'reason': 1})
        self.assertIn('server.py retry', p.server('report', check=False)
                      .stdout)
        with open(archive, 'wb') as f:
            f.write(good)
        out = p.server('retry', CLIENT, '--all-failed').stdout
        self.assertIn('put back', out)
        self.assertEqual(p.states('node'), {'RQ': 1})
        p.server('run')
        self.assertEqual(p.states('node'), {'F': 1})
        self.assertEqual(len(p.stored('app')), 1)
        # The client hears the new outcome: stored, its export removed.
        p.client('send')
        self.assertIn('node stored 1', p.client('status').stdout)
        self.assertIn('retry', p.server('--help').stdout)


def fill_inodes(directory):
    """Create empty files until the file system has no inode left; return
    them."""
    os.makedirs(directory, exist_ok=True)
    made = []
    while True:
        path = os.path.join(directory, f'f{len(made)}')
        try:
            open(path, 'w').close()
        except OSError:
            return made
        made.append(path)


class NodeDiskTest(unittest.TestCase):
    """Items 2 and 3: the node's data_dir out of inodes or bytes."""

    def setUp(self):
        self.p = Pipeline(self)
        self.data = os.path.join(self.p.node_dir, 'data')
        self.src = os.path.join(self.p.root, 'src')

    def test_out_of_inodes_waits_and_never_aborts_the_run(self):
        p = self.p
        modules = os.path.join(p.root, 'modules')
        shutil.copytree(os.path.join(support.ROOT, 'modules'), modules)
        with open(os.path.join(modules, 'bogus'), 'w') as f:
            f.write('#!/bin/sh\necho "rq bogus $2"\n')   # node refuses it
        os.chmod(os.path.join(modules, 'bogus'), 0o755)
        set_option(p, 'client', f'modules_dir = {modules}')
        with open(p.config) as f:
            text = f.read()
        with open(p.config, 'w') as f:
            f.write(text.replace('[modules]\n', '[modules]\nbogus = bogus\n'))
        mount_tmpfs(self, self.data, size='20m', inodes=64)
        filler = fill_inodes(os.path.join(self.data, '.filler'))
        write_tree(self.src, 1 << 16)
        p.client('commit', 'bogus', self.src)
        p.client('commit', 'app', self.src)
        p.client('send')
        # Recording the refusal hits ENOSPC (no results.jsonl yet): that
        # request stays P*, and the run still handles the other one.
        proc = p.server('run', check=False)
        self.assertIn('could not record its outcome', proc.stderr)
        self.assertIn('inodes free', proc.stderr)
        self.assertEqual(p.states('node'), {'P': 1, 'RQ': 1})
        self.assertFalse(os.listdir(os.path.join(
            p.node_dir, 'TODO', CLIENT, '.attempts'))
            if os.path.isdir(os.path.join(p.node_dir, 'TODO', CLIENT,
                                          '.attempts')) else False)
        p.server('run', check=False)            # still full: no new mail
        self.assertEqual(len(p.mails()), 1, subjects(p))
        self.assertIn('failing', p.mails()[0]['Subject'])
        for path in filler:
            os.unlink(path)
        p.server('run', check=False)            # the refusal is a problem
        self.assertEqual(p.states('node'), {'F': 1, 'X': 1, 'reason': 1})
        self.assertEqual(len(p.stored('app')), 1)
        self.assertTrue(any('recovered' in s for s in subjects(p)))

    def test_disk_filling_while_storing_cleans_staging_and_waits(self):
        p = self.p
        mount_tmpfs(self, self.data, size='4m')
        write_tree(self.src, 1 << 20)
        p.client('commit', 'app', self.src)
        p.client('send')
        [archive] = [os.path.join(d, f) for d, _, fs in
                     os.walk(os.path.join(p.client_dir, 'export'))
                     for f in fs if not f.endswith('.listing')]
        # Room for exactly the download (whole pages): the manifest fails.
        pages = -(-os.path.getsize(archive) // 4096)
        st = os.statvfs(self.data)
        filler = os.path.join(self.data, 'filler')
        with open(filler, 'wb') as f:
            f.write(b'\0' * (st.f_bavail * st.f_frsize - pages * 4096))
        proc = p.server('run', check=False)
        self.assertIn('disk full while storing', proc.stderr)
        for _ in range(6):                      # more than max_attempts
            p.server('run', check=False)
        self.assertEqual(p.states('node'), {'RQ': 1})
        incoming = os.path.join(self.data, CLIENT, 'files', '.incoming')
        self.assertEqual(os.listdir(incoming) if os.path.isdir(incoming)
                         else [], [])
        self.assertEqual(len(p.mails()), 1, subjects(p))
        os.unlink(filler)
        p.server('run')
        self.assertEqual(p.states('node'), {'F': 1})
        self.assertEqual(len(p.stored('app')), 1)
        self.assertTrue(any('recovered' in s for s in subjects(p)))


class NodeClockTest(unittest.TestCase):
    """Items 4 and 5: snapshots ordered by arrival, whatever the clock."""

    def setUp(self):
        self.p = Pipeline(self)
        self.src = os.path.join(self.p.root, 'src')

    def backup(self, clock=None):
        write_tree(self.src, 1 << 12)            # new content each time
        self.p.client('commit', 'app', self.src)
        self.p.client('send')
        if clock:
            with_clock(self.p, clock, 'server.py', 'run')
        else:
            self.p.server('run')

    def manifest(self, path):
        with open(os.path.join(path, 'manifest.json')) as f:
            return json.load(f)

    def test_clock_going_back_never_prunes_the_newest_arrival(self):
        self.backup()
        self.backup(clock='-1h')                 # stamped before the first
        stored = self.p.stored('app')
        newest = max(stored, key=lambda d: self.manifest(d)['seq'])
        self.assertEqual(self.manifest(newest)['seq'], 2)
        report = self.p.server('report', check=False).stdout
        self.assertIn('out of arrival order', report)
        self.p.server('prune')
        self.assertIn(newest, self.p.stored('app'))

    def test_clock_jumping_forward_is_flagged_and_staleness_caught(self):
        self.backup()
        self.backup(clock='+30d')                # stamped a month ahead
        # Five days later, nothing since: stale, and a clock problem.
        proc = with_clock(self.p, '+5d', 'server.py', 'report', check=False)
        self.assertEqual(proc.returncode, 2, proc.stdout)
        self.assertIn('clock problem', proc.stdout)
        self.assertIn('ago (stale_after', proc.stdout)
        check = self.p.server('check', check=False)
        self.assertEqual(check.returncode, 1)
        self.assertIn('stamped in the future', check.stdout)
        # The sequence survives the loss of its file.
        os.unlink(os.path.join(self.p.node_dir, 'data', CLIENT, '.sequence'))
        self.backup()
        self.assertEqual(sorted(self.manifest(d)['seq']
                                for d in self.p.stored('app')), [1, 2, 3])


class ClientClockTest(unittest.TestCase):
    """Item 6: a client clock slow at the push never expires an export
    the node has not fetched."""

    def test_slow_clock_at_send_does_not_expire_the_export(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        write_tree(src, 1 << 16)
        p.client('commit', 'app', src)
        with_clock(p, '-40d', 'client.py', 'send')
        export = os.path.join(p.client_dir, 'export')
        self.assertEqual(len(os.listdir(export)), 1)
        for _ in range(3):          # clock corrected; the node is late
            p.client('send')
            p.client('prune')
        self.assertEqual(len(os.listdir(export)), 1)
        self.assertEqual(p.mails(), [])
        p.server('run')
        self.assertEqual(len(p.stored('app')), 1)
        p.client('send')            # confirmed: now it goes
        self.assertEqual(os.listdir(export), [])


class DoneByTheCoreTest(unittest.TestCase):
    """Items 8 and 10, fixed by the shared core: proven here."""

    def test_torn_journal_lines_lose_no_result(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        for n in range(2):
            write_tree(src, 1 << 12)
            p.client('commit', 'app', src)
            p.client('send')
            p.server('run')
            p.client('send')
            # A crash (or full disk) in the middle of an append left half
            # a line at the end of both journals.
            for path in (os.path.join(p.node_dir, 'data', CLIENT,
                                      'results.jsonl'),
                         os.path.join(p.client_dir, 'log', 'state',
                                      'results-n1.jsonl')):
                with open(path, 'ab') as f:
                    f.write(b'{"request": "torn-by-a-cra')
        write_tree(src, 1 << 12)
        p.client('commit', 'app', src)
        p.client('send')
        p.server('run')
        p.client('send')
        status = p.client('status').stdout
        # The torn lines are skipped; the results after them arrive.
        self.assertIn('not yet confirmed 0', status)
        self.assertEqual(p.mails(), [])
        self.assertIn('"outcome": "stored"', open(os.path.join(
            p.node_dir, 'data', CLIENT, 'results.jsonl')).read()
            .splitlines()[-1])

    def test_failed_commit_leaves_no_empty_request(self):
        p = Pipeline(self)
        pool = os.path.join(p.client_dir, 'requests', 'n1')
        mount_tmpfs(self, pool, size='64k')
        with open(os.path.join(pool, 'filler'), 'wb') as f:
            try:
                f.write(b'\0' * (1 << 20))
                f.flush()
            except OSError:
                pass
        proc = p.client('commit', 'dummy', p.root, check=False)
        self.assertNotEqual(proc.returncode, 0)
        self.assertEqual([n for n in os.listdir(pool)
                          if n[0] in 'iC'], [])


class OperatorDocsTest(unittest.TestCase):
    """Item 19: one client prune time in README, docs, --help and the
    systemd timer."""

    def test_client_prune_time_agrees_everywhere(self):
        import re
        times = set()
        for name in ('README.md', 'docs/operations.md'):
            with open(os.path.join(support.ROOT, name)) as f:
                for line in f:
                    if re.search(r'client\.py (-q )?prune( -q)?$',
                                 line.strip()):
                        times.add(tuple(line.split()[:2]))
        help_text = subprocess.run(
            [support.PYTHON, os.path.join(support.ROOT, 'client.py'),
             '--help'], stdout=subprocess.PIPE, text=True).stdout
        times |= {tuple(line.split()[:2]) for line in help_text.splitlines()
                  if line.strip().endswith('client.py prune -q')}
        with open(os.path.join(support.ROOT, 'packaging', 'systemd',
                               'gitbackup-client-prune.timer')) as f:
            hour, minute = re.search(r'OnCalendar=\S+ (\d+):(\d+)',
                                     f.read()).groups()
        times.add((str(int(minute)), str(int(hour))))
        self.assertEqual(times, {('0', '2')})


if __name__ == '__main__':
    unittest.main()
