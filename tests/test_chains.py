"""An increment is never built on sand, and a bad file does not cost the
backup: chains under wrong clocks (real faketime on the client), lost
links, prune killed at each removal (kill -9 at the named pause point),
prune beside a drill; files tar cannot read stored as warnings.  Real tar,
sshd, sftp and git on loopback."""

import base64
import json
import os
import shutil
import subprocess
import time
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline
from tests.test_faults import with_clock
from tests.test_incremental import (change_tree, files_of, make_tree,
                                    manifest, set_config, write)
from tests.test_pipeline import snapshot
from tests.test_reliability import Paused


class ChainCase(unittest.TestCase):
    """A pipeline with one directory source, app, backed up as a chain."""

    def setUp(self):
        self.p = Pipeline(self)
        self.src = os.path.join(self.p.root, 'src')
        make_tree(self.src)

    def backup(self, clock=None, check=True):
        """commit and send (on a clock moved by faketime when given), run,
        and send again (the client learns the result); the newest snapshot
        directory."""
        if clock:
            with_clock(self.p, clock, 'client.py', 'commit', 'app', self.src)
            with_clock(self.p, clock, 'client.py', 'send')
        else:
            self.p.client('commit', 'app', self.src)
            self.p.client('send')
        self.p.server('run', check=check)
        self.p.client('send')
        return (self.p.stored('app') or [None])[-1]

    def restored(self, stored):
        """The tree `server.py restore` gives back for one snapshot."""
        dest = os.path.join(self.p.root, 'restored-' + str(time.time()))
        self.p.server('restore', CLIENT, 'app', '--at',
                      os.path.basename(stored), '--to', dest)
        return snapshot(dest)


class LostFullTest(ChainCase):
    def refusals(self):
        return ''.join(open(os.path.join(self.p.node_dir, 'TODO', CLIENT,
                                         n)).read()
                       for n in self.p.pool('node') if n.endswith('.reason'))

    def test_a_lost_or_bad_link_makes_the_next_backup_a_full(self):
        full = self.backup()
        self.backup()
        change_tree(self.src)
        third = self.backup()
        self.assertEqual(manifest(third)['level'], 2)
        shutil.rmtree(full)                  # the node lost the chain's full
        write(os.path.join(self.src, 'after-loss.txt'), 'new\n')
        self.backup(check=False)             # a level 3 increment: refused
        self.assertEqual(self.p.states('node').get('X'), 1)
        self.assertIn('chain broken', self.refusals())
        # The client saw the refusal and asked again at once: no wait for
        # full_every, nor for the next scheduled backup.
        self.assertEqual(self.p.states().get('C'), 1, self.p.pool())
        self.p.client('send')
        self.p.server('run')
        self.p.client('send')
        again = self.p.stored('app')[-1]
        self.assertEqual(manifest(again)['level'], 0)
        self.assertEqual(self.restored(again), snapshot(self.src))
        # A link the last verify found bad counts as lost.
        [archive] = files_of(again)
        with open(os.path.join(again, archive), 'r+b') as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xff]))      # a bit flip on the disk
        self.assertEqual(self.p.server('verify', check=False).returncode, 2)
        self.backup(check=False)
        self.assertIn('failed the last verify', self.refusals())
        self.p.client('send')
        self.p.server('run')
        newest = self.p.stored('app')[-1]
        self.assertEqual(manifest(newest)['level'], 0)
        self.assertEqual(self.restored(newest), snapshot(self.src))


class ClientClockTest(ChainCase):
    def setUp(self):
        super().setUp()
        support.require_tools('faketime')

    def test_a_clock_a_day_fast_once_loses_no_change(self):
        self.backup()
        write(os.path.join(self.src, 'while-fast.txt'), 'one\n')
        ahead = self.backup(clock='+1d')     # an increment dumped tomorrow
        self.assertEqual(manifest(ahead)['level'], 1)
        # Back on time: these changes are older than tomorrow's dump time.
        change_tree(self.src)
        write(os.path.join(self.src, 'while-fast.txt'), 'two, longer\n')
        after = self.backup()
        self.assertEqual(manifest(after)['level'], 0)
        self.assertEqual(self.restored(after), snapshot(self.src))
        status = self.p.client('status').stdout
        self.assertIn('made because the tar dump time of', status)
        self.assertIn('lies in the future', status)
        # The chain goes on from there, every change captured (the new
        # entries are not dropped for sorting before tomorrow's).
        for n in range(1, 3):
            write(os.path.join(self.src, f'later-{n}.txt'), f'{n}\n')
            stored = self.backup()
            self.assertEqual(manifest(stored)['level'], n)
            self.assertEqual(manifest(stored)['base'],
                             manifest(after if n == 1 else previous)
                             ['request_id'])
            self.assertEqual(self.restored(stored), snapshot(self.src))
            previous = stored

    def test_a_full_stamped_in_the_future_does_not_stretch_full_every(self):
        set_config(self.p, 'client', 'full_every = 2d\n')
        future = self.backup(clock='+8d')
        self.assertEqual(manifest(future)['level'], 0)
        write(os.path.join(self.src, 'today.txt'), 'today\n')
        # Real time: the full is "-8 days old", which is no fresh full.
        now = self.backup()
        self.assertEqual(manifest(now)['level'], 0)
        self.assertEqual(self.restored(now), snapshot(self.src))
        self.assertIn('stamped in the future',
                      self.p.client('status').stdout)
        write(os.path.join(self.src, 'tomorrow.txt'), 'tomorrow\n')
        self.assertEqual(manifest(self.backup())['level'], 1)


class PruneTest(ChainCase):
    def two_chains(self):
        """An old chain of three links, then a newer one of two; retention
        that keeps only the newer one."""
        old = [self.backup(), self.backup()]
        change_tree(self.src)
        old.append(self.backup())
        self.assertEqual(manifest(old[-1])['level'], 2)
        set_config(self.p, 'client', 'full_every = 1\n')
        time.sleep(1.1)
        new = [self.backup()]
        with open(self.p.config) as f:
            config = f.read()
        with open(self.p.config, 'w') as f:
            f.write(config.replace('full_every = 1\n', ''))
        write(os.path.join(self.src, 'newest.txt'), 'newest\n')
        new.append(self.backup())
        self.assertEqual([manifest(d)['level'] for d in new], [0, 1])
        set_config(self.p, f'client {CLIENT}', 'keep_daily = 1\n'
                   'keep_weekly = 0\nkeep_monthly = 0\n')
        return old, new

    def assert_chains_whole(self):
        verify = self.p.server('verify', check=False)
        self.assertNotIn('missing link', verify.stdout)
        self.assertEqual(verify.returncode, 0, verify.stdout)

    def test_prune_killed_at_each_removal_leaves_chains_whole(self):
        old, new = self.two_chains()
        kills = 0
        while set(self.p.stored('app')) != set(new):
            before = set(self.p.stored('app'))
            Paused(self.p, 'server.py', 'prune:removed', 'prune').kill()
            kills += 1
            gone = before - set(self.p.stored('app'))
            self.assertEqual(len(gone), 1)
            # Newest link first: what is left of the old chain is its
            # bottom, every link with its base.
            self.assertEqual(sorted(set(old) & set(self.p.stored('app'))),
                             old[:len(old) - kills])
            self.assert_chains_whole()
        self.assertEqual(kills, 3)
        self.assertNotIn('removed', self.p.server('prune').stdout)
        self.assertEqual(self.restored(new[-1]), snapshot(self.src))

    def test_prune_beside_a_drill_never_fails_the_drill(self):
        read = [self.backup(), self.backup()]
        set_config(self.p, 'server', 'prune_wait = 1\n')
        set_config(self.p, f'client {CLIENT}', 'keep_daily = 1\n'
                   'keep_weekly = 0\nkeep_monthly = 0\n')
        go_on = os.path.join(self.p.root, 'drill-goes-on')
        drill = PausedFor(self.p, {'GITBACKUP_PAUSE_UNTIL': go_on},
                          'drill:reading', 'drill', CLIENT)
        # While the drill reads that chain, a new full arrives: prune
        # would remove the chain the drill is reading.
        set_config(self.p, 'client', 'full_every = 1\n')
        time.sleep(1.1)
        self.assertEqual(manifest(self.backup())['level'], 0)
        prune = self.p.server('prune')
        self.assertIn(f'skipped {CLIENT}: its snapshots are being read',
                      prune.stdout)
        self.assertTrue(all(os.path.isdir(d) for d in read))
        with open(go_on, 'w'):
            pass
        out, err = drill.proc.communicate(timeout=300)
        self.assertEqual(drill.proc.returncode, 0, out + err)
        self.assertIn(f'ok: {CLIENT} app {os.path.basename(read[-1])}', out)
        self.assertNotIn('FAILED', out)
        # Once the drill is done, prune goes on.
        prune = self.p.server('prune')
        self.assertEqual(prune.stdout.count('removed'), 2, prune.stdout)
        self.assert_chains_whole()


class PausedFor(Paused):
    """Paused, with more environment (GITBACKUP_PAUSE_UNTIL: go on once
    that file exists); stdout kept for the caller."""

    def __init__(self, pipeline, env, point, *args):
        self.proc = subprocess.Popen(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', pipeline.config, *args],
            env={**pipeline.env, 'GITBACKUP_PAUSE_AT': point, **env},
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        self.seen = []
        for line in self.proc.stderr:
            self.seen.append(line)
            if f'pausing at {point}' in line:
                return
        raise AssertionError(f'never reached {point}:\n' + ''.join(self.seen))


def make_too_long_path(top):
    """A file whose path below top is longer than PATH_MAX (4096): made
    with directory file descriptors, as no path can name it."""
    os.makedirs(top)
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(22):
            os.mkdir('d' * 200, dir_fd=fd)
            deeper = os.open('d' * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = deeper
        os.close(os.open('deepest.txt', os.O_CREAT | os.O_WRONLY, 0o644,
                         dir_fd=fd))
    finally:
        os.close(fd)


class StoredWithWarningsTest(unittest.TestCase):
    """Issue 22 item 2: an unreadable file and a path too long cost only
    themselves; the request is stored with warnings, named everywhere."""

    def setUp(self):
        support.require_tools('setpriv')
        self.p = Pipeline(self)
        self.src = os.path.join(self.p.root, 'src')
        make_tree(self.src)
        # Root reads any file; this tar runs as root without the
        # capabilities that let it (DAC override), as a tar run by an
        # unprivileged account would, writing its files as root.
        write(os.path.join(self.src, 'secret.txt'), 'no\n', 0o000)
        make_too_long_path(os.path.join(self.src, 'deep'))
        set_config(self.p, 'client', 'tar_command = setpriv --bounding-set='
                   '-dac_override,-dac_read_search tar\n')

    def comparable(self, root):
        """snapshot() of a tree but for the unreadable file and the
        too deep directory (no path names what lies at its bottom)."""
        moved = os.path.join(self.p.root, 'set-aside')
        os.makedirs(moved)
        for name in ('secret.txt', 'deep'):
            if os.path.lexists(os.path.join(root, name)):
                os.rename(os.path.join(root, name),
                          os.path.join(moved, name))
        try:
            return snapshot(root)
        finally:
            for name in os.listdir(moved):
                os.rename(os.path.join(moved, name), os.path.join(root, name))
            os.rmdir(moved)

    def test_the_rest_is_stored_and_the_problem_paths_are_named(self):
        self.p.client('commit', 'app', self.src)
        send = self.p.client('send')
        self.assertRegex(send.stderr, r'stored with [0-9]+ warning\(s\)')
        self.assertIn('secret.txt: Warning: Cannot open: Permission denied',
                      send.stderr)
        self.assertIn('File name too long', send.stderr)
        self.p.server('run')
        self.p.client('send')
        self.assertEqual(self.p.states(), {'F': 1})
        self.assertEqual(self.p.states('node'), {'F': 1})
        [stored] = self.p.stored('app')
        warned = manifest(stored)['warning_count']
        self.assertGreaterEqual(warned, 2)
        # The rest of the tree restores.
        dest = os.path.join(self.p.root, 'restored')
        self.p.server('restore', CLIENT, 'app', '--to', dest)
        self.assertEqual(self.comparable(dest), self.comparable(self.src))
        self.assertFalse(os.path.lexists(os.path.join(dest, 'secret.txt')))
        self.assertTrue(os.path.isdir(os.path.join(dest, 'deep', 'd' * 200)))
        # The drill proves what was stored: it is a good backup.
        drill = self.p.server('drill', CLIENT, check=False)
        self.assertEqual(drill.returncode, 0, drill.stdout + drill.stderr)
        # Named in the client's status, the node's report in every format.
        status = self.p.client('status').stdout
        self.assertIn(f'stored with {warned} warning(s)', status)
        self.assertIn('warning: ./secret.txt', status)
        report = self.p.server('report', check=False)
        self.assertEqual(report.returncode, 1, report.stdout)
        self.assertIn(f'stored with {warned} warning(s)', report.stdout)
        self.assertIn('secret.txt', report.stdout)
        rows = json.loads(self.p.server('report', '--format', 'json',
                                        check=False).stdout)
        [row] = [r for c in rows['clients'] for r in c['sources']
                 if r['source'] == 'app']
        self.assertEqual(row['status'], 'warning')
        self.assertIn('secret.txt', ' '.join(row['problems']))
        nagios = self.p.server('report', '--format', 'nagios', check=False)
        self.assertTrue(nagios.stdout.startswith('GITBACKUP WARNING'),
                        nagios.stdout)
        self.assertIn('secret.txt', nagios.stdout)
        prom = self.p.server('report', '--format', 'prometheus',
                             check=False).stdout
        self.assertIn(f'gitbackup_newest_backup_warnings{{client="{CLIENT}",'
                      'source="app"} 1', prom)
        html = self.p.server('report', '--format', 'html',
                             check=False).stdout
        self.assertIn('secret.txt', html)
        # Mailed once, by the run that stored it.
        self.p.server('run')
        mails = [m for m in self.p.mails()
                 if 'stored with warnings' in m['Subject']]
        self.assertEqual(len(mails), 1, [m['Subject'] for m in mails])
        self.assertIn('secret.txt', mails[0].get_content())
        # A backup without the bad files is ok again.
        os.unlink(os.path.join(self.src, 'secret.txt'))
        shutil.rmtree(os.path.join(self.src, 'deep'))
        self.p.client('commit', 'app', self.src)
        self.p.client('send')
        self.p.server('run')
        self.assertEqual(self.p.server('report').returncode, 0)


class WarnedTextTest(unittest.TestCase):
    def test_warned_from_a_client_is_bounded_and_cleaned(self):
        from modules import _core
        hostile = '\n'.join(f'\x1b]0;owned\x07line {n} ' + 'x' * 10000
                             for n in range(1000))
        value = base64.urlsafe_b64encode(hostile.encode()).decode()
        lines = _core.decode_warnings(value)
        self.assertEqual(len(lines), _core.WARNINGS_SENT)
        for line in lines:
            self.assertLessEqual(len(line), _core.WARNING_CHARS)
            self.assertTrue(line.isprintable(), line)
        self.assertEqual(_core.decode_warnings('!!not base64'),
                         ['(unreadable warned= value)'])


if __name__ == '__main__':
    unittest.main()
