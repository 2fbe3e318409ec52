"""Nightly backups that cost what changed (issue 13): zstd by default,
incremental directory archives (GNU tar --listed-incremental) kept and
pruned as whole chains, the archive hashed while written, bandwidth caps.
Real tar, sshd, sftp and git on loopback."""

import glob
import json
import os
import shutil
import subprocess
import time
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline
from tests.test_pipeline import snapshot


def set_config(p, section, text):
    """Add lines at the top of a section of the pipeline's configuration."""
    with open(p.config) as f:
        config = f.read()
    with open(p.config, 'w') as f:
        f.write(config.replace(f'[{section}]\n', f'[{section}]\n{text}', 1))


def write(path, text, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    if mode is not None:
        os.chmod(path, mode)


def files_of(stored):
    """The archive file of one stored snapshot directory (not its manifest
    nor the listing the client sent with it)."""
    return [n for n in os.listdir(stored)
            if n != 'manifest.json' and not n.endswith('.listing')]


class CompressionTest(unittest.TestCase):
    def setUp(self):
        self.p = Pipeline(self)

    def test_auto_is_multithreaded_zstd_and_check_and_status_say_so(self):
        support.require_tools('zstd')
        check = self.p.client('check', check=False).stdout
        self.assertIn('compression: zstd, multithreaded (zstd -T0 -3 -B2M) '
                      '(auto)', check)
        src = os.path.join(self.p.root, 'src')
        write(os.path.join(src, 'a.txt'), 'hello\n' * 1000)
        self.p.client('commit', 'app', src)
        self.p.client('send')
        self.p.server('run')
        stored = self.p.stored('app')
        self.assertEqual(len(stored), 1)
        [name] = files_of(stored[0])
        self.assertTrue(name.endswith('.tar.zst'), name)
        out = subprocess.run(['tar', '--list', '--file',
                              os.path.join(stored[0], name)],
                             stdout=subprocess.PIPE, text=True, check=True)
        self.assertIn('./a.txt', out.stdout)
        self.assertIn('compression zstd', self.p.client('status').stdout)

    def test_auto_falls_back_to_gzip_without_zstd(self):
        # A tar_command whose tar knows no --zstd: a wrapper that hides it.
        wrapper = os.path.join(self.p.root, 'oldtar')
        write(wrapper, '#!/bin/sh\nif [ "$1" = --help ]; then echo '
              '"  -z, --gzip"; exit 0; fi\nexec tar "$@"\n', 0o755)
        set_config(self.p, 'client', f'tar_command = {wrapper}\n')
        check = self.p.client('check', check=False).stdout
        self.assertIn('compression: gzip (auto: tar or zstd lacks zstd '
                      'support)', check)
        src = os.path.join(self.p.root, 'src')
        write(os.path.join(src, 'a.txt'), 'hello\n')
        self.p.client('commit', 'app', src)
        self.p.client('send')
        self.p.server('run')
        [name] = files_of(self.p.stored('app')[0])
        self.assertTrue(name.endswith('.tar.gz'), name)


class HashWhileWritingTest(unittest.TestCase):
    def setUp(self):
        self.p = Pipeline(self)

    def test_stalled_tar_is_killed_with_its_children_after_the_timeout(self):
        """The archive goes through a pipe to be hashed: command_timeout
        and the process-group kill still hold."""
        pidfile = os.path.join(self.p.root, 'child.pid')
        wrapper = os.path.join(self.p.root, 'stuck-tar')
        write(wrapper, '#!/bin/sh\nif [ "$1" = --help ]; then exec tar '
              f'--help; fi\nprintf partial\nsleep 600 &\necho $! > {pidfile}'
              '\nwait\n', 0o755)
        set_config(self.p, 'client', f'tar_command = {wrapper}\n'
                   'command_timeout = 2\n')
        src = os.path.join(self.p.root, 'src')
        write(os.path.join(src, 'a.txt'), 'a\n')
        self.p.client('commit', 'app', src)
        start = time.monotonic()
        send = self.p.client('send', check=False)
        self.assertLess(time.monotonic() - start, 30)
        self.assertEqual(send.returncode, 1)
        self.assertIn('still running after 2 s', send.stderr)
        with open(pidfile) as f:
            pid = int(f.read())
        time.sleep(0.2)
        try:    # gone, or a zombie waiting for init to reap it
            with open(f'/proc/{pid}/stat') as f:
                self.assertEqual(f.read().rsplit(')', 1)[1].split()[0], 'Z')
        except FileNotFoundError:
            pass
        self.assertEqual(self.p.states().get('C'), 1)   # retried next run


class BandwidthTest(unittest.TestCase):
    def test_bwlimit_caps_what_the_node_pulls(self):
        """4 MiB at [client c1] bwlimit = 8000 Kbit/s (1 MB/s) takes about
        4 s; uncapped on loopback it takes a fraction of that."""
        p = Pipeline(self)
        set_config(p, 'client', 'compression = none\nfull_every = 0\n')
        set_config(p, f'client {CLIENT}', 'bwlimit = 8000\n')
        src = os.path.join(p.root, 'src')
        os.makedirs(src)
        with open(os.path.join(src, 'random.bin'), 'wb') as f:
            f.write(os.urandom(4 << 20))
        p.client('commit', 'app', src)
        p.client('send')
        start = time.monotonic()
        p.server('run')
        seconds = time.monotonic() - start
        self.assertEqual(len(p.stored('app')), 1)
        self.assertGreater(seconds, 3.0)
        self.assertLess(seconds, 30)


class SharedConnectionTest(unittest.TestCase):
    def test_push_and_results_fetch_share_one_ssh_connection(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        write(os.path.join(src, 'a.txt'), 'a\n')

        def logins():
            with open(p.sshd.log, errors='replace') as f:
                return f.read().count('Accepted publickey')

        p.client('commit', 'app', src)
        p.client('send')
        p.server('run')
        p.client('send')            # fetches the result only
        p.client('commit', 'app', src)
        before = logins()
        p.client('send')            # push, then fetch results
        self.assertEqual(logins() - before, 1)
        sockets = glob.glob(os.path.join(p.client_dir, 'log', 'state',
                                         'ssh-*'))
        self.assertEqual(sockets, [])   # closed at the end of send


def manifest(stored):
    with open(os.path.join(stored, 'manifest.json')) as f:
        return json.load(f)


def make_tree(root):
    """Files, modes, a symlink, an empty directory, nesting."""
    write(os.path.join(root, 'keep.txt'), 'kept\n' * 100)
    write(os.path.join(root, 'change.txt'), 'before\n')
    write(os.path.join(root, 'delete.txt'), 'deleted later\n')
    write(os.path.join(root, 'old name.txt'), 'renamed later\n')
    write(os.path.join(root, 'run.sh'), '#!/bin/sh\necho hi\n', 0o755)
    write(os.path.join(root, 'sub', 'deep', 'x.txt'), 'deep\n')
    write(os.path.join(root, 'olddir', 'y.txt'), 'dir renamed later\n')
    os.makedirs(os.path.join(root, 'empty'))
    os.symlink('sub/deep/x.txt', os.path.join(root, 'link'))


def change_tree(root):
    """Changed, deleted, added and renamed files; a renamed directory, a
    retargeted symlink, a changed mode."""
    write(os.path.join(root, 'change.txt'), 'after, and longer\n')
    os.unlink(os.path.join(root, 'delete.txt'))
    write(os.path.join(root, 'sub', 'added.txt'), 'new\n')
    os.rename(os.path.join(root, 'old name.txt'),
              os.path.join(root, 'new name.txt'))
    os.rename(os.path.join(root, 'olddir'), os.path.join(root, 'newdir'))
    os.unlink(os.path.join(root, 'link'))
    os.symlink('keep.txt', os.path.join(root, 'link'))
    os.chmod(os.path.join(root, 'run.sh'), 0o700)


class IncrementalTest(unittest.TestCase):
    def setUp(self):
        self.p = Pipeline(self)
        self.src = os.path.join(self.p.root, 'src')

    def backup(self, check=True):
        """commit, send, run, and send again (the client learns the
        result); returns the newest snapshot directory."""
        self.p.client('commit', 'app', self.src)
        self.p.client('send')
        self.p.server('run', check=check)
        self.p.client('send')
        return (self.p.stored('app') or [None])[-1]

    def chain(self, stored):
        """Snapshot directories from the full to stored, in order."""
        by_id = {manifest(d)['request_id']: d for d in self.p.stored('app')}
        chain = [stored]
        while manifest(chain[0]).get('level'):
            chain.insert(0, by_id[manifest(chain[0])['base']])
        return chain

    def restore(self, stored):
        """Extract the chain by hand, as `restore` does; the tree."""
        dest = tempfile_dir(self.p.root)
        for d in self.chain(stored):
            [name] = files_of(d)
            subprocess.run(['tar', '--listed-incremental=/dev/null',
                            '--extract', '--file', os.path.join(d, name),
                            '--directory', dest], check=True)
        return snapshot(dest)

    def test_full_then_increments_restore_each_point(self):
        make_tree(self.src)
        points = [(self.backup(), snapshot(self.src))]
        first = manifest(points[0][0])
        self.assertEqual(first['level'], 0)
        self.assertNotIn('base', first)
        points.append((self.backup(), snapshot(self.src)))   # unchanged
        second = manifest(points[1][0])
        self.assertEqual((second['level'], second['base']),
                         (1, first['request_id']))
        self.assertLess(second['files'][0]['size'], 2048)
        change_tree(self.src)
        points.append((self.backup(), snapshot(self.src)))
        third = manifest(points[2][0])
        self.assertEqual((third['level'], third['base']),
                         (2, second['request_id']))
        self.assertNotEqual(points[2][1], points[0][1])
        for stored, tree in points:
            self.assertEqual(self.restore(stored), tree)
        self.assertIn('0 problem(s)', self.p.server('verify').stdout)

    def test_lost_base_forces_a_full(self):
        make_tree(self.src)
        full = self.backup()
        shutil.rmtree(full)          # the node lost it
        self.backup(check=False)     # an increment on it: refused
        self.assertEqual(self.p.states('node').get('X'), 1)
        self.assertIn('not stored on this node', ''.join(
            open(f).read() for f in glob.glob(os.path.join(
                self.p.node_dir, 'TODO', CLIENT, 'X*.reason'))))
        again = self.backup()
        self.assertEqual(manifest(again)['level'], 0)
        self.assertEqual(self.restore(again), snapshot(self.src))

    def test_broken_chain_is_critical_in_verify_and_report(self):
        # One chain model: list, verify, report and restore agree that every
        # increment above a lost full is unrestorable, not only the one
        # whose direct base is gone.
        make_tree(self.src)
        full = self.backup()
        lost = manifest(full)['request_id']
        change_tree(self.src)
        increments = [self.backup(), self.backup()]
        shutil.rmtree(full)
        verify = self.p.server('verify', check=False)
        self.assertEqual(verify.returncode, 2, verify.stdout)
        self.assertIn('missing link', verify.stdout)
        for stored in increments:
            self.assertIn(f'{stored}: incremental chain broken: missing '
                          f'link', verify.stdout)
        report = self.p.server('report', check=False).stdout
        self.assertIn('missing link', report)
        self.assertIn(lost, report)
        listed = json.loads(self.p.server('list', CLIENT, 'app', '--format',
                                          'json').stdout)
        self.assertEqual([e['chain_broken'] for e in listed], [True, True])
        proc = self.p.server('restore', CLIENT, 'app', '--to',
                             os.path.join(self.p.root, 'out'), check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(lost, proc.stderr)

    def test_prune_keeps_the_newest_chain_whole(self):
        make_tree(self.src)
        old_chain = [self.backup(), self.backup()]
        set_config(self.p, 'client', 'full_every = 1\n')
        time.sleep(1.1)
        newest = [self.backup()]
        self.assertEqual(manifest(newest[0])['level'], 0)
        with open(self.p.config) as f:
            config = f.read()
        with open(self.p.config, 'w') as f:
            f.write(config.replace('full_every = 1\n', ''))
        change_tree(self.src)
        newest += [self.backup(), self.backup()]
        self.assertEqual(manifest(newest[-1])['level'], 2)
        set_config(self.p, f'client {CLIENT}', 'keep_daily = 1\n'
                   'keep_weekly = 0\nkeep_monthly = 0\n')
        out = self.p.server('prune').stdout
        for d in old_chain:
            self.assertIn(d, out)
        self.assertEqual(self.p.stored('app'), newest)
        self.assertEqual(self.restore(newest[-1]), snapshot(self.src))


def tempfile_dir(root):
    import tempfile
    return tempfile.mkdtemp(dir=root, prefix='restore-')


if __name__ == '__main__':
    unittest.main()
