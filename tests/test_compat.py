"""gitbackup on the oldest Pythons it supports: client.py, sendmail.py and
modules/ on 3.6 (the default python3 of RHEL 8 and SLES 15), server.py on
3.8 (Ubuntu 20.04's).

- every script and module compiles on 3.6 (server.py too, so that its
  version check can speak); client.py, sendmail.py and every module
  import on 3.6; client.py, sendmail.py and modules/_core.py use no
  standard-library name or keyword 3.6 lacks, server.py and the modules
  (whose node side runs on the node) none that 3.8 lacks
  (tests/stdlib_names.py);
- each script's start-up check names its minimum;
- sendmail.py's tests pass on 3.6;
- the imports go one way (modules/_core.py -> sendmail.py, which imports
  nothing of ours), and a missing sendmail.py is one clear line;
- one backup (a directory, a git repository through its hook, a
  PostgreSQL database), results and restore round trip with client.py on
  3.6 and server.py on 3.8.

Interpreters come from pyenv (support.require_python): without one a test
is skipped, or fails under CI=true, as for any missing tool.
"""

import ast
import glob
import os
import shutil
import subprocess
import sys
import unittest

from tests import support
from tests.modules_pipeline import ModulePipeline, PostgresMixin
from tests.pipeline import CLIENT, tree_commands
from tests.test_restore import tree_state

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)
import sendmail  # noqa: E402
from modules import _core as core  # noqa: E402

OLDEST_CLIENT = '3.6'    # client.py, sendmail.py, modules/
OLDEST_NODE = '3.8'      # server.py
MODULES = sorted(
    os.path.relpath(path, support.ROOT)
    for path in glob.glob(os.path.join(support.ROOT, 'modules', '*.py')))
# Run only on a client, or on both sides: 3.6 throughout.
CLIENT_SIDE = ['client.py', 'sendmail.py', 'modules/_core.py']
# A module's node side runs on the node's Python (its client side runs on
# 3.6 in the round trip below; the whole file must import on 3.6).
NODE_SIDE = ['server.py'] + MODULES
# Compiles in memory: no __pycache__ of another Python left in the tree.
COMPILE = ('import sys\n'
           'for path in sys.argv[1:]:\n'
           '    with open(path, encoding="utf-8") as f:\n'
           '        compile(f.read(), path, "exec")\n')


def run(argv, **kwargs):
    return subprocess.run(argv, cwd=support.ROOT, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300, **kwargs)


class SourceTest(unittest.TestCase):
    """What the source asks of the Python running it."""

    def test_every_script_and_module_compiles_on_the_oldest(self):
        python = support.require_python(OLDEST_CLIENT)
        proc = run([python, '-c', COMPILE, 'client.py', 'sendmail.py']
                   + NODE_SIDE)
        self.assertEqual((proc.returncode, proc.stderr), (0, ''))

    def test_every_module_imports_on_the_oldest(self):
        """Importing runs a module's top level (decorators, annotations,
        constants): client.py, sendmail.py and every file in modules/."""
        python = support.require_python(OLDEST_CLIENT)
        names = ['client', 'sendmail'] + [
            'modules.' + os.path.basename(path)[:-3]
            for path in MODULES]
        proc = run([python, '-B', '-c', 'import importlib, sys\n'
                    'for name in sys.argv[1:]: importlib.import_module(name)',
                    *names])
        self.assertEqual((proc.returncode, proc.stdout + proc.stderr),
                         (0, ''))

    def test_client_side_uses_only_what_its_oldest_has(self):
        python = support.require_python(OLDEST_CLIENT)
        proc = run([python, 'tests/stdlib_names.py'] + CLIENT_SIDE)
        self.assertEqual((proc.returncode, proc.stdout + proc.stderr),
                         (0, ''))

    def test_node_uses_only_what_its_oldest_has(self):
        python = support.require_python(OLDEST_NODE)
        proc = run([python, 'tests/stdlib_names.py'] + NODE_SIDE)
        self.assertEqual((proc.returncode, proc.stdout + proc.stderr),
                         (0, ''))

    def test_the_checker_finds_what_is_missing(self):
        """The names check is no rubber stamp: on 3.6 it names a 3.8
        function, a 3.7 keyword and a 3.9 method."""
        python = support.require_python(OLDEST_CLIENT)
        sample = os.path.join(support.temp_dir(self), 'new.py')
        with open(sample, 'w') as f:
            f.write('import shlex, subprocess\n'
                    'shlex.join(["a"])\n'
                    'subprocess.run(["true"], capture_output=True)\n'
                    '"ab".removeprefix("a")\n')
        proc = run([python, 'tests/stdlib_names.py', sample])
        self.assertEqual(proc.returncode, 1)
        for expected in ('new.py:2: shlex.join', 'capture_output=',
                         'new.py:4: .removeprefix() is Python 3.9+'):
            self.assertIn(expected, proc.stdout)

    def test_start_up_checks_name_the_minimum(self):
        python = support.require_python(OLDEST_CLIENT)
        proc = run([python, 'server.py', '--version'])
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(proc.stderr, (
            'server.py: Python 3.8 or later is required, this is %s '
            '(client.py runs on 3.6 or later)\n' % self.version(python)))
        for script in ('client.py', 'sendmail.py'):
            proc = run([python, script, '--help'])
            self.assertEqual((proc.returncode, proc.stderr), (0, ''))
        self.assertIn('Python 3.6 or later', run(
            [python, 'client.py', '--help']).stdout)
        self.assertIn('Python 3.8 or later', run(
            [support.require_python(OLDEST_NODE), 'server.py', '--help'])
            .stdout)

    @staticmethod
    def version(python):
        return run([python, '-c', 'import platform; '
                    'print(platform.python_version())']).stdout.strip()

    def test_sendmail_tests_pass_on_the_oldest(self):
        python = support.require_python(OLDEST_CLIENT)
        proc = run([python, '-m', 'unittest', 'tests.test_sendmail'])
        self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
        self.assertRegex(proc.stderr, r'\nOK\b')


def imported_modules(path):
    with open(os.path.join(support.ROOT, path), encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split('.')[0])
    return names


class ImportDirectionTest(unittest.TestCase):
    """modules/_core.py imports sendmail.py; sendmail.py imports nothing of
    ours, so it works alone and a missing one is named at start-up."""

    def test_imports_go_one_way(self):
        self.assertFalse(imported_modules('sendmail.py') &
                         {'modules', 'client', 'server'})
        self.assertIn('sendmail', imported_modules('modules/_core.py'))
        self.assertFalse(imported_modules('modules/_core.py') &
                         {'client', 'server'})

    def test_sendmail_finds_the_config_as_the_scripts_do(self):
        """sendmail.py keeps its own copy of the lookup order (it imports
        nothing of ours): it must stay the core's."""
        for path, environ in ((None, {}), ('/a.ini', {}),
                              (None, {'GITBACKUP_CONFIG': '/b.ini'}),
                              ('/a.ini', {'GITBACKUP_CONFIG': '/b.ini'})):
            self.assertEqual(
                sendmail.find_config(path, environ),
                (core.find_config(path, sendmail.__file__, environ),
                 bool(path or environ)))

    def test_a_missing_sendmail_is_one_clear_line(self):
        install = support.temp_dir(self)
        for script in ('client.py', 'server.py'):
            shutil.copy(os.path.join(support.ROOT, script), install)
        shutil.copytree(os.path.join(support.ROOT, 'modules'),
                        os.path.join(install, 'modules'))
        for script in ('client.py', 'server.py'):
            proc = run([sys.executable, os.path.join(install, script),
                        'status'])
            self.assertEqual(proc.returncode, 1)
            self.assertEqual(proc.stderr, (
                f'{script}: sendmail.py is missing in {install}: install '
                f'{script}, sendmail.py and modules/ together\n'))
            self.assertEqual(proc.stdout, '')

    def test_sendmail_mails_alone_on_the_oldest(self):
        """sendmail.py copied alone (no modules/) spools a message and
        flushes its queue under Python 3.6."""
        python = support.require_python(OLDEST_CLIENT)
        install = support.temp_dir(self)
        shutil.copy(os.path.join(support.ROOT, 'sendmail.py'), install)
        spool = os.path.join(install, 'spool')
        with open(os.path.join(install, 'backup.ini'), 'w') as f:
            f.write(f'[mail]\nmethod = spool\nspool_dir = {spool}\n')
        proc = subprocess.run(
            [python, os.path.join(install, 'sendmail.py'), '-v', 'hello',
             '-', 'root'], input='a body\n', cwd=install,
            env=support.isolated_env(os.path.join(install, 'home')),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        [message] = os.listdir(spool)
        with open(os.path.join(spool, message)) as f:
            self.assertIn('Subject: hello', f.read())
        self.assertEqual(sorted(os.listdir(install)),
                         ['backup.ini', 'home', 'sendmail.py', 'spool'])


class OldestRoundTripTest(PostgresMixin, unittest.TestCase):
    """client.py on 3.6 backs up (a directory, a database, a repository
    through its hook and one whose hook never ran), server.py on 3.8
    stores and restores, the client hears the results."""

    @classmethod
    def create_data(cls, cluster):
        cluster.psql('CREATE DATABASE shop')
        cluster.psql("CREATE TABLE items (id int, name text); INSERT INTO "
                     "items VALUES (1, 'apple'), (2, 'pear')", db='shop')

    def setUp(self):
        support.require_tools('pg_dump', 'pg_dumpall', 'psql', 'pg_restore',
                              'git-daemon')
        self.commands = tree_commands(
            client_python=support.require_python(OLDEST_CLIENT),
            server_python=support.require_python(OLDEST_NODE))
        self.p = ModulePipeline(self, commands=self.commands)
        self.p.use_postgres(self.cluster, 'config')
        self.p.start_daemon()

    def test_client_on_3_6_and_node_on_3_8(self):
        p = self.p
        src = os.path.join(p.root, 'src')
        os.makedirs(os.path.join(src, 'sub dir'))
        with open(os.path.join(src, 'sub dir', 'ünï.txt'), 'w') as f:
            f.write('non-ASCII name\n')
        os.symlink('sub dir/ünï.txt', os.path.join(src, 'link'))
        os.chmod(os.path.join(src, 'sub dir'), 0o750)
        p.client('commit', 'app', src)
        p.client('commit', 'postgresdb', 'shop')
        # The repository's hook is client.py on 3.6 too (commit git).
        bare = p.client_repository('proj.git')
        work = p.work_clone(bare)
        head = p.commit_file(work, 'README', 'hello\n')
        p.git('push', '--quiet', 'origin', 'master', cwd=work)
        # A repository whose hook never ran: send catches it up.
        unhooked = p.client_repository('unhooked.git', hook=False)
        other_work = p.work_clone(unhooked, 'other')
        other = p.commit_file(other_work, 'x', 'y\n')
        p.git('push', '--quiet', 'origin', 'master', cwd=other_work)
        self.assertEqual(p.states(), {'C': 3})
        p.client('send')
        self.assertEqual(p.states(), {'F': 4})
        self.assertIn('looks ready', p.client('check', '--connect').stdout)
        p.server('run')
        self.assertEqual(p.states('node'), {'F': 4})
        p.client('send')                                # hears the results
        self.assertIn('node stored 4, node failed 0, not yet confirmed 0',
                      p.client('status').stdout)
        # Back from the node: the tree, the mirror, the dump's rows.
        restored = os.path.join(p.root, 'restored')
        p.server('restore', CLIENT, 'app', '--to', restored)
        self.assertEqual(tree_state(restored), tree_state(src))
        self.assertEqual(p.refs(p.mirror('proj.git'))['refs/heads/master'],
                         head)
        self.assertEqual(
            p.refs(p.mirror('unhooked.git'))['refs/heads/master'], other)
        dump = p.stored_files('postgresdb')['shop.dump']
        self.cluster.psql('CREATE DATABASE shop_restored')
        self.pg('pg_restore', '--exit-on-error', '--dbname', 'shop_restored',
                dump)
        self.assertEqual(self.cluster.psql(
            'SELECT name FROM items ORDER BY id', db='shop_restored'),
            'apple\npear')
        self.assertIn('OK', p.server('report').stdout)
        # Mail from the client on 3.6 (core -> sendmail.py): gc's log.
        p.client('gc')
        self.assertIn('git gc on', p.mails()[-1]['Subject'])
        self.assertEqual(p.mails()[-1]['To'], 'client-admin@example.invalid')


if __name__ == '__main__':
    unittest.main()
