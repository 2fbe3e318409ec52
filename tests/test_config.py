"""Configuration and command line: what a sysadmin gets wrong first.

Typos in backup.ini are errors naming the file and line (exit 2); the
config is found by --config, $GITBACKUP_CONFIG or backup.ini next to the
script; options work before or after the command; `commit` refuses what it
cannot back up and writes nothing; a stale lock never blocks cron.
"""

import json
import os
import shutil
import subprocess
import textwrap
import unittest

from tests import support

MINIMAL = textwrap.dedent('''\
    [client]
    name = c1
    default_node = n1
    request_dir = {root}/requests
    queue_dir = {root}/queues
    export_dir = {root}/export
    log_dir = {root}/log

    [nodes]
    n1 = {root}/node.git

    [modules]
    app = fs
    dummy = dummy
    ''')


class ConfigTest(unittest.TestCase):
    def setUp(self):
        self.root = support.temp_dir(self)
        self.env = support.isolated_env(os.path.join(self.root, 'home'))
        self.config = os.path.join(self.root, 'backup.ini')
        self.write(MINIMAL.format(root=self.root))

    def write(self, text):
        with open(self.config, 'w') as f:
            f.write(text)

    def run_script(self, *args, script='client.py', env=None, where=None):
        return subprocess.run(
            [support.PYTHON, os.path.join(where or support.ROOT, script),
             *args], env=env or self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            timeout=60)

    def pool(self):
        try:
            return os.listdir(os.path.join(self.root, 'requests', 'n1'))
        except FileNotFoundError:
            return []

    def test_unknown_key_names_file_and_line(self):
        self.write(MINIMAL.format(root=self.root).replace(
            'log_dir', 'exprot_keep = 7d\nlog_dir'))
        proc = self.run_script('--config', self.config, 'status')
        self.assertEqual(proc.returncode, 2)
        self.assertIn(f"{self.config}:7: unknown key 'exprot_keep' in "
                      "[client]", proc.stderr)

    def test_unknown_section_and_missing_key(self):
        self.write(MINIMAL.format(root=self.root) + '\n[sever]\nname = x\n')
        proc = self.run_script('--config', self.config, 'check')
        self.assertEqual(proc.returncode, 2)
        self.assertIn('unknown section [sever]', proc.stderr)
        self.write(MINIMAL.format(root=self.root).replace(
            'queue_dir', '#queue_dir'))
        proc = self.run_script('--config', self.config, 'status')
        self.assertEqual(proc.returncode, 2)
        self.assertIn('[client] lacks queue_dir', proc.stderr)
        self.write(MINIMAL.format(root=self.root))
        proc = self.run_script('--config', self.config, 'run',
                               script='server.py')
        self.assertEqual(proc.returncode, 2)
        self.assertIn('no [server] section', proc.stderr)

    def test_bad_values(self):
        for old, new, message in (
                ('dummy = dummy', 'dummy = dummy\n[mail]\nmethod = fax',
                 "[mail] method must be one of"),
                ('log_dir', 'admin = root,\nlog_dir', 'bad receiver'),
                ('log_dir', 'alert_after = soon\nlog_dir', 'not a duration'),
                ('log_dir', 'pg_row_counts = some\nlog_dir',
                 "[client] pg_row_counts: 'some': want one of exact, "
                 'estimate')):
            self.write(MINIMAL.format(root=self.root).replace(old, new))
            proc = self.run_script('--config', self.config, 'send')
            self.assertEqual(proc.returncode, 2, (new, proc.stderr))
            self.assertIn(message, proc.stderr)

    def node_config(self, extra=''):
        """conf.example.ini's [offsite] block as shipped, uncommented,
        beside a minimal [server]."""
        with open(os.path.join(support.ROOT, 'conf.example.ini')) as f:
            example = f.read()
        offsite = example[example.index(';[offsite]'):]
        offsite = offsite[:offsite.index('\n\n')].replace('\n;', '\n')[1:]
        for d in ('todo', 'data', 'log', 'repositories'):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        self.write(f'[server]\nname = n1\ntodo_dir = {self.root}/todo\n'
                   f'data_dir = {self.root}/data\nlog_dir = {self.root}/log\n'
                   f'repositories = {self.root}/repositories\n{extra}\n'
                   + offsite + '\n')

    def test_offsite_bwlimit_of_the_example_is_rclones_rate(self):
        """[offsite] bwlimit = 10M (rclone's rate) is fine where [server]
        bwlimit, sftp's Kbit/s, must be a number: a key's type is its
        section's."""
        self.node_config()
        with open(self.config) as f:
            self.assertIn('bwlimit       = 10M', f.read())
        proc = self.run_script('--config', self.config, 'report',
                               script='server.py')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.node_config('bwlimit = 10M\n')
        proc = self.run_script('--config', self.config, 'report',
                               script='server.py')
        self.assertEqual(proc.returncode, 2)
        self.assertIn('[server] bwlimit: not a whole number', proc.stderr)

    def test_a_mistake_in_one_client_section_is_that_clients_problem(self):
        """A typo in one [client NAME] of a shared file: the node goes on
        for the others, and report and check name that client's mistake."""
        self.node_config('\n[client good]\nsftp_root = /srv\n\n'
                         '[client typo]\nsftp_prot = 2222\n')
        proc = self.run_script('--config', self.config, 'report',
                               '--format', 'json', script='server.py')
        self.assertEqual(proc.returncode, 2, proc.stderr)
        report = {c['client']: c for c in json.loads(proc.stdout)['clients']}
        self.assertTrue(report['typo']['misconfigured'])
        self.assertIn("unknown key 'sftp_prot' in [client typo]",
                      report['typo']['problems'][0])
        self.assertFalse(report['good']['misconfigured'])
        proc = self.run_script('--config', self.config, 'check',
                               script='server.py')
        self.assertIn("[client typo]: ", proc.stdout)
        self.assertIn("unknown key 'sftp_prot'", proc.stdout)
        self.assertNotIn('[client good]', proc.stdout)
        proc = self.run_script('--config', self.config, 'run',
                               script='server.py')
        self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_config_lookup_order(self):
        # --config wins over $GITBACKUP_CONFIG, which wins over backup.ini
        # next to the script.
        copy = os.path.join(self.root, 'installed')
        os.makedirs(copy)
        for name in ('client.py', 'server.py', 'sendmail.py'):
            shutil.copy(os.path.join(support.ROOT, name), copy)
        shutil.copytree(os.path.join(support.ROOT, 'modules'),
                        os.path.join(copy, 'modules'))
        beside = os.path.join(copy, 'backup.ini')
        with open(beside, 'w') as f:
            f.write(MINIMAL.format(root=self.root).replace('name = c1',
                                                           'name = beside'))
        env_config = os.path.join(self.root, 'env.ini')
        with open(env_config, 'w') as f:
            f.write(MINIMAL.format(root=self.root).replace('name = c1',
                                                           'name = fromenv'))

        def name_used(*args, env):
            proc = self.run_script(*args, 'check', env=env, where=copy)
            return proc.stdout

        self.assertIn('client beside', name_used(env=self.env))
        env = {**self.env, 'GITBACKUP_CONFIG': env_config}
        self.assertIn('client fromenv', name_used(env=env))
        self.assertIn('client c1', name_used('--config', self.config,
                                             env=env))

    def test_options_before_or_after_the_command(self):
        for args in (['--config', self.config, '-q', 'status'],
                     ['status', '--config', self.config, '-q'],
                     ['-v', 'status', '--config', self.config]):
            proc = self.run_script(*args)
            self.assertEqual(proc.returncode, 0, (args, proc.stderr))
            self.assertIn('node n1', proc.stdout)
        proc = self.run_script('send', '--help')
        self.assertEqual(proc.returncode, 0)
        self.assertIn('A second concurrent send exits 0', proc.stdout)
        proc = self.run_script('frobnicate')
        self.assertEqual(proc.returncode, 2)

    def test_commit_refuses_and_writes_nothing(self):
        src = os.path.join(self.root, 'src')
        os.makedirs(src)
        for args, message in (
                (['nosuchmodule', src], "unknown module 'nosuchmodule'"),
                (['app', src, 'nosuchnode'], "unknown node 'nosuchnode'"),
                (['app', os.path.join(self.root, 'missing')],
                 'not a directory'),
                (['app'], 'required')):
            proc = self.run_script('--config', self.config, 'commit', *args)
            self.assertEqual(proc.returncode, 2, (args, proc.stderr))
            self.assertIn(message, proc.stderr)
            self.assertEqual(self.pool(), [])
        proc = self.run_script('--config', self.config, 'commit', 'app', src)
        self.assertEqual((proc.returncode, proc.stdout, proc.stderr),
                         (0, '', ''))  # fast and quiet: hooks call it
        [name] = self.pool()
        self.assertTrue(name.startswith('C'))
        with open(os.path.join(self.root, 'requests', 'n1', name)) as f:
            self.assertEqual(f.read(), f'app\t{src}\n')

    def test_stale_lock_of_a_dead_process_does_not_block(self):
        """Locks are flock(2)s: a lock file left by a killed send (its pid
        still inside) blocks nothing."""
        os.makedirs(os.path.join(self.root, 'log'))
        with open(os.path.join(self.root, 'log', 'send.lock'), 'w') as f:
            f.write('999999\n')
        subprocess.run(['git', 'init', '--quiet', '--bare',
                        os.path.join(self.root, 'node.git')], check=True)
        self.run_script('--config', self.config, 'commit', 'dummy', 'x')
        proc = self.run_script('--config', self.config, 'send')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn('another send', proc.stderr)
        self.assertEqual([n[0] for n in self.pool()], ['F'])


if __name__ == '__main__':
    unittest.main()
