"""Smoke tests of tests/support.py against the real programs."""

import os
import subprocess
import unittest
from unittest import mock

from tests import support


def run(argv, env, cwd=None, check=True):
    result = subprocess.run(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, env=env, cwd=cwd,
                            timeout=60)
    if check and result.returncode != 0:
        raise AssertionError('%s exited %d\nstdout: %s\nstderr: %s' % (
            argv, result.returncode, result.stdout, result.stderr))
    return result


class RequireToolsTest(unittest.TestCase):

    def test_present_tools_pass(self):
        # Neither a skip nor an error, under CI or not.
        for ci in ('true', ''):
            with mock.patch.dict(os.environ, {'CI': ci}):
                self.assertIsNone(support.require_tools('git'))

    def test_missing_tool_skips_without_ci(self):
        with mock.patch.dict(os.environ):
            os.environ.pop('CI', None)
            with self.assertRaises(unittest.SkipTest) as caught:
                support.require_tools('git', 'no-such-tool')
        self.assertIn('no-such-tool', str(caught.exception))

    def test_missing_tool_fails_under_ci(self):
        with mock.patch.dict(os.environ, {'CI': 'true'}):
            with self.assertRaises(RuntimeError) as caught:
                support.require_tools('no-such-tool')
        self.assertNotIsInstance(caught.exception, unittest.SkipTest)
        self.assertIn('no-such-tool', str(caught.exception))
        self.assertIn('Debian package', str(caught.exception))

    def test_pg_bindir_has_initdb(self):
        support.require_tools('initdb')
        self.assertTrue(os.access(
            os.path.join(support.pg_bindir(), 'initdb'), os.X_OK))


class EnvironmentTest(unittest.TestCase):

    def test_isolated_env(self):
        home = os.path.join(support.temp_dir(self), 'home')
        leaky = {'GITBACKUP_CONFIG': '/x', 'SSH_AUTH_SOCK': '/y',
                 'GIT_DIR': '/z', 'GIT_WORK_TREE': '/w'}
        with mock.patch.dict(os.environ, leaky):
            env = support.isolated_env(home)
            self.assertEqual(os.environ['GIT_DIR'], '/z')   # not mutated
        self.assertTrue(os.path.isdir(home))
        self.assertEqual(env['HOME'], home)
        self.assertEqual(env['GIT_CONFIG_NOSYSTEM'], '1')
        self.assertEqual(env['TZ'], 'UTC')
        for name in leaky:
            self.assertNotIn(name, env)

    def test_free_port_and_wait_for_port(self):
        port = support.free_port()
        with self.assertRaises(RuntimeError) as caught:
            support.wait_for_port(port, timeout=0.2)
        self.assertIn(str(port), str(caught.exception))


class SSHDTest(unittest.TestCase):

    def setUp(self):
        self.tmp = support.temp_dir(self)
        self.sshd = support.SSHD(os.path.join(self.tmp, 'sshd'))
        self.key, pubkey = support.make_identity(
            os.path.join(self.tmp, 'keys'), 'client')
        self.sshd.add_key(pubkey)
        self.env = support.isolated_env(os.path.join(self.tmp, 'home'))
        self.sshd.start()
        self.addCleanup(self.sshd.stop)

    def ssh(self, *command, check=True):
        return run(['ssh', '-F', self.sshd.ssh_config, '-i', self.key,
                    '-p', str(self.sshd.port),
                    '%s@%s' % (self.sshd.user, self.sshd.host)] +
                   list(command), self.env, check=check)

    def test_ssh_stop_restart(self):
        self.assertEqual(self.ssh('echo', 'ok').stdout, 'ok\n')
        self.sshd.stop()
        self.sshd.stop()    # safe twice
        failed = self.ssh('echo', 'ok', check=False)
        self.assertEqual(failed.returncode, 255, failed.stderr)
        self.sshd.restart()
        self.assertEqual(self.ssh('echo', 'ok').stdout, 'ok\n')

    def test_sftp_get(self):
        remote = os.path.join(self.tmp, 'export', 'data.bin')
        os.makedirs(os.path.dirname(remote))
        payload = os.urandom(100000)
        with open(remote, 'wb') as handle:
            handle.write(payload)
        local = os.path.join(self.tmp, 'downloaded.bin')
        batch = os.path.join(self.tmp, 'batch')
        with open(batch, 'w') as handle:
            handle.write('get "%s" "%s"\n' % (remote, local))
        run(['sftp', '-F', self.sshd.ssh_config, '-i', self.key,
             '-P', str(self.sshd.port), '-b', batch,
             '%s@%s' % (self.sshd.user, self.sshd.host)], self.env)
        with open(local, 'rb') as handle:
            self.assertEqual(handle.read(), payload)

    def test_git_over_ssh_command(self):
        support.require_tools('git')
        bare = os.path.join(self.tmp, 'repo.git')
        run(['git', 'init', '-q', '--bare', bare], self.env)
        env = dict(self.env, GIT_SSH_COMMAND=self.sshd.ssh_command(self.key))
        result = run(['git', 'ls-remote', self.sshd.url(bare)], env)
        self.assertEqual(result.stdout, '')


class GitDaemonTest(unittest.TestCase):

    def test_clone_over_git_protocol(self):
        tmp = support.temp_dir(self)
        env = support.isolated_env(os.path.join(tmp, 'home'))
        base = os.path.join(tmp, 'base')
        work = os.path.join(tmp, 'work')
        run(['git', 'init', '-q', work], env)
        with open(os.path.join(work, 'file.txt'), 'w') as handle:
            handle.write('hello\n')
        run(['git', 'add', 'file.txt'], env, cwd=work)
        run(['git', 'commit', '-q', '-m', 'first'], env, cwd=work)
        head = run(['git', 'rev-parse', 'HEAD'], env, cwd=work).stdout.strip()
        run(['git', 'clone', '-q', '--bare', work,
             os.path.join(base, 'sub', 'project.git')], env)

        with support.GitDaemon(base, os.path.join(tmp, 'daemon')) as daemon:
            clone = os.path.join(tmp, 'clone')
            run(['git', 'clone', '-q', daemon.url('sub/project.git'), clone],
                env)
        cloned = run(['git', 'rev-parse', 'HEAD'], env, cwd=clone).stdout
        self.assertEqual(cloned.strip(), head)
        daemon.stop()   # safe twice
        result = run(['git', 'ls-remote', daemon.url('sub/project.git')], env,
                     check=False)
        self.assertNotEqual(result.returncode, 0)


class PostgresClusterTest(unittest.TestCase):

    def test_table_roundtrip(self):
        tmp = support.temp_dir(self)
        cluster = support.PostgresCluster(os.path.join(tmp, 'pg'))
        self.addCleanup(cluster.stop)
        cluster.start()
        cluster.psql('CREATE DATABASE shop')
        cluster.psql('CREATE TABLE item (id int PRIMARY KEY, name text)',
                     db='shop')
        cluster.psql("INSERT INTO item VALUES (1, 'a'), (2, 'b'), (3, 'ü')",
                     db='shop')
        self.assertEqual(cluster.psql('SELECT count(*) FROM item', db='shop'),
                         '3')
        with self.assertRaises(RuntimeError):
            cluster.psql('SELECT * FROM no_such_table', db='shop')
        # Clients reach it through env() alone.
        env = dict(support.isolated_env(os.path.join(tmp, 'home')),
                   **cluster.env())
        result = run([support.pg_tool('psql'), '-X', '-A', '-t', '-d', 'shop',
                      '-c', 'SELECT name FROM item WHERE id = 3'], env)
        self.assertEqual(result.stdout.strip(), 'ü')
        cluster.stop()
        cluster.stop()  # safe twice
        self.assertIsNone(cluster._postmaster_pid())


if __name__ == '__main__':
    unittest.main()
