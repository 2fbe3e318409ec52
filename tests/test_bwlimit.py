"""bwlimit caps the node's git fetches too (issue 13, item 4): ssh and git
have no rate option, so the fetch runs its transport through
modules/_throttle.py, over git:// (git's proxy command) and over ssh
(GIT_SSH_COMMAND).  sftp's own cap is tested in test_incremental."""

import os
import time
import unittest

from modules import _core as core
from tests import support
from tests.modules_pipeline import ModulePipeline
from tests.pipeline import CLIENT
from tests.test_compromised import processes_with

PROJECT = 'big.git'
SIZE = 4 << 20          # incompressible: git cannot shrink random bytes


class GitBandwidthTest(unittest.TestCase):
    def setUp(self):
        self.p = ModulePipeline(self)
        self.p.edit_config(f'[client {CLIENT}]\n',
                           f'[client {CLIENT}]\nbwlimit = 8000\n')

    def backup_big_repository(self):
        """4 MiB of random bytes in one commit, backed up by send and run
        at 8000 Kbit/s (1 MB/s): about 4 s; the run's seconds."""
        p = self.p
        bare = p.client_repository(PROJECT, hook=False)
        work = p.work_clone(bare)
        with open(os.path.join(work, 'random.bin'), 'wb') as f:
            f.write(os.urandom(SIZE))
        p.git('add', 'random.bin', cwd=work)
        p.git('commit', '--quiet', '-m', 'random', cwd=work)
        p.git('push', '--quiet', 'origin', 'master', cwd=work)
        head = p.git('--git-dir', bare, 'rev-parse', 'master').stdout.strip()
        p.client('commit', 'git', bare)
        p.client('send')
        start = time.monotonic()
        p.server('run')
        seconds = time.monotonic() - start
        self.assertEqual(p.states('node'), {'F': 1})
        self.assertEqual(p.git('--git-dir', p.mirror(PROJECT), 'rev-parse',
                               'refs/heads/master').stdout.strip(), head)
        self.assertEqual(self.throttles(), [])
        return seconds

    def throttles(self):
        """This test's throttle processes (other modules running at the
        same time have their own): those naming its sshd's or git
        daemon's port, or its directory."""
        p = self.p
        marks = (p.root, f':{p.sshd.port}', f' {p.sshd.port}',
                 f'{p.daemon.port}')
        return [(pid, argv) for pid, argv in processes_with('_throttle.py')
                if any(m in ' '.join(argv) for m in marks)]

    def test_git_daemon_fetch_is_capped(self):
        self.p.start_daemon()
        seconds = self.backup_big_repository()
        self.assertGreater(seconds, 3.0)
        self.assertLess(seconds, 30)

    def test_ssh_fetch_is_capped(self):
        p = self.p
        # No git daemon runs: the node can only fetch over ssh.
        url = p.sshd.url(p.git_base)
        p.edit_config(f'git_export = {p.git_url}\n', f'git_export = {url}\n')
        p.edit_config(f'git = {p.git_url}\n', f'git = {url}\n')
        seconds = self.backup_big_repository()
        self.assertGreater(seconds, 3.0)
        self.assertLess(seconds, 30)

    def test_throttle_is_no_module(self):
        # Plumbing beside the modules: a name starting with '_' is never
        # loaded as a backup module.
        with self.assertRaisesRegex(core.ModuleError, 'bad module name'):
            core.load_module(os.path.join(support.ROOT, 'modules'),
                             '_throttle')


if __name__ == '__main__':
    unittest.main()
