"""Access control on the node: who may push to which <client>.git.

* ``server.py provision`` (the gitosis-admin post-update utility) reads
  gitosis.conf and creates/hardens every client repository it names;
* ``server.py gate`` (an ssh forced command) and ``server.py add-client``
  give a node without gitosis the same guarantee, tested through a private
  sshd;
* gitolite3, set up for a throw-away HOME, served through the private sshd:
  each client has RW (not RW+) on its own repository and a repo-specific
  post-update hook runs ingest.
"""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import unittest

from tests import support

SERVER = os.path.join(support.ROOT, 'server.py')
TS = '20260101T000000Z'


def write_node_config(root):
    """A node-only configuration below root; returns its path."""
    node = os.path.join(root, 'node')
    for d in ('TODO', 'data', 'log', 'repositories'):
        os.makedirs(os.path.join(node, d), exist_ok=True)
    path = os.path.join(root, 'backup.ini')
    with open(path, 'w') as f:
        f.write(textwrap.dedent(f'''\
            [server]
            name = n1
            todo_dir = {node}/TODO
            data_dir = {node}/data
            log_dir = {node}/log
            repositories = {node}/repositories
            admin = node-admin@example.invalid
            sftp_root = /nonexistent
            free_space_floor = 0

            [mail]
            method = spool
            spool_dir = {root}/mail
            '''))
    return path


def server(config, *args, env, check=True, cwd=None, extra_env=None):
    proc = subprocess.run([support.PYTHON, SERVER, '--config', config, *args],
                          env={**env, **(extra_env or {})}, cwd=cwd,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f'server.py {" ".join(args)}: exit '
                             f'{proc.returncode}\n{proc.stderr}')
    return proc


def git(git_dir, *args, env, input=None, check=True):
    proc = subprocess.run(['git', '--git-dir', git_dir, *args], input=input,
                          env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f'git {" ".join(args)}: {proc.stderr}')
    return proc


def git_config(repo, key):
    return subprocess.run(['git', '--git-dir', repo, 'config', key],
                          stdout=subprocess.PIPE, universal_newlines=True
                          ).stdout.strip()


class Scratch:
    """A scratch repository that builds request commits and pushes them
    over ssh with one key."""

    def __init__(self, root, env, ssh_command):
        self.git_dir = os.path.join(root, 'scratch-%d.git' % id(self))
        self.env = {**env, 'GIT_SSH_COMMAND': ssh_command}
        git(self.git_dir, 'init', '--quiet', '--bare', env=self.env)
        self.last = None

    def commit(self, files, parent='last'):
        entries = ''
        for name, content in files.items():
            blob = git(self.git_dir, 'hash-object', '-w', '--stdin',
                       input=content, env=self.env).stdout.strip()
            entries += f'100644 blob {blob}\t{name}\n'
        tree = git(self.git_dir, 'mktree', input=entries,
                   env=self.env).stdout.strip()
        parent = self.last if parent == 'last' else parent
        return git(self.git_dir, 'commit-tree', tree, '-m', 'requests',
                   *(['-p', parent] if parent else []),
                   env=self.env).stdout.strip()

    def push(self, url, commit, ref='refs/heads/master', force=False):
        spec = f'{"+" if force else ""}{commit}:{ref}' if commit else \
            f':{ref}'
        proc = git(self.git_dir, 'push', url, spec, env=self.env,
                   check=False)
        if proc.returncode == 0 and commit and ref == 'refs/heads/master':
            self.last = commit
        return proc


GITOSIS_CONF = '''\
[gitosis]
gitweb = no

[group gitosis-admin]
members = admin@workstation
writable = gitosis-admin

[group clients]
members = host-172.16.0.60 host-c2
writable = 172.16.0.60 c2.git

[group typo]
members = host-c3
writeable = c3

[group hostile]
members = host-evil
writable = ../evil sub/dir -dash testing .hidden gitolite-admin x..y

[group readers]
members = someone
readonly = readonly-repo
'''
PROVISIONED = ('172.16.0.60', 'c2', 'c3')
REFUSED = ('../evil', 'sub/dir', '-dash', 'testing', '.hidden',
           'gitolite-admin', 'x..y')


class ProvisionTest(unittest.TestCase):
    def setUp(self):
        support.require_tools('git')
        self.root = support.temp_dir(self)
        self.env = support.isolated_env(os.path.join(self.root, 'home'))
        self.config = write_node_config(self.root)
        self.repos = os.path.join(self.root, 'node', 'repositories')

    def assert_provisioned(self, names):
        for name in names:
            repo = os.path.join(self.repos, name + '.git')
            hook = os.path.join(repo, 'hooks', 'post-update')
            self.assertTrue(os.path.isfile(os.path.join(repo, 'HEAD')), name)
            self.assertEqual(stat.S_IMODE(os.stat(hook).st_mode) & 0o755,
                             0o755)
            with open(hook) as f:
                text = f.read()
            self.assertIn(f'ingest {name}', text)
            self.assertIn(self.config, text)
            for key in ('receive.denyDeletes', 'receive.denyNonFastForwards',
                        'receive.fsckObjects'):
                self.assertEqual(git_config(repo, key), 'true', key)
            self.assertTrue(os.path.isdir(
                os.path.join(self.root, 'node', 'TODO', name)))

    def test_provision_from_file_is_strict_and_idempotent(self):
        conf = os.path.join(self.root, 'gitosis.conf')
        with open(conf, 'w') as f:
            f.write(GITOSIS_CONF)
        # gitosis may already have created a repository on first push,
        # without our hook and settings: provision repairs it.
        git(os.path.join(self.repos, 'c2.git'), 'init', '--quiet', '--bare',
            env=self.env)
        proc = server(self.config, 'provision', conf, env=self.env,
                      check=False)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assert_provisioned(PROVISIONED)
        self.assertEqual(sorted(os.listdir(self.repos)),
                         sorted(n + '.git' for n in PROVISIONED))
        self.assertEqual(sorted(os.listdir(os.path.join(
            self.root, 'node', 'TODO'))), sorted(PROVISIONED))
        for name in REFUSED:
            self.assertIn(f'not provisioning {name!r}', proc.stderr)
        self.assertNotIn("provisioning 'gitosis-admin'", proc.stderr)
        self.assertNotIn('readonly-repo', proc.stderr)
        self.assertIn('[group clients] lets 2 keys write 172.16.0.60 c2',
                      proc.stderr)
        hooks = {n: os.stat(os.path.join(self.repos, n + '.git', 'hooks',
                                         'post-update')).st_mtime_ns
                 for n in PROVISIONED}
        again = server(self.config, 'provision', conf, env=self.env,
                       check=False)
        self.assertEqual(again.returncode, 1)
        self.assertEqual(hooks, {n: os.stat(os.path.join(
            self.repos, n + '.git', 'hooks', 'post-update')).st_mtime_ns
            for n in PROVISIONED})
        self.assertFalse(os.path.exists(os.path.join(self.root, 'evil.git')))

    def test_gitosis_admin_hook_line(self):
        """The documented line in gitosis-admin.git/hooks/post-update
        provisions on every push of gitosis.conf; gitosis-admin itself is
        never touched."""
        admin = os.path.join(self.repos, 'gitosis-admin.git')
        git(admin, 'init', '--quiet', '--bare', env=self.env)
        hook = os.path.join(admin, 'hooks', 'post-update')
        with open(hook, 'w') as f:
            f.write('#!/bin/sh\nset -e\n# (gitosis-run-hook post-update '
                    'comes first in a real install)\n'
                    f'{sys.executable} {SERVER} --config {self.config} -q '
                    'provision\n')
        os.chmod(hook, 0o755)
        before = {name: open(os.path.join(admin, name), 'rb').read()
                  for name in ('config', 'HEAD')}
        work = os.path.join(self.root, 'work')
        subprocess.run(['git', 'init', '--quiet', work], check=True,
                       env=self.env)
        with open(os.path.join(work, 'gitosis.conf'), 'w') as f:
            f.write(GITOSIS_CONF.replace(' c2.git', ''))
        for args in (['add', 'gitosis.conf'], ['commit', '-q', '-m', 'acl'],
                     ['push', '-q', admin, 'HEAD:refs/heads/master']):
            subprocess.run(['git', '-C', work, *args], check=True,
                           env=self.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        self.assert_provisioned(['172.16.0.60', 'c3'])
        self.assertFalse(os.path.exists(os.path.join(self.repos, 'c2.git')))
        # A second push adds c2; the first ones stay as they are.
        with open(os.path.join(work, 'gitosis.conf'), 'w') as f:
            f.write(GITOSIS_CONF)
        for args in (['commit', '-q', '-a', '-m', 'c2'],
                     ['push', '-q', admin, 'HEAD:refs/heads/master']):
            subprocess.run(['git', '-C', work, *args], check=True,
                           env=self.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        self.assert_provisioned(PROVISIONED)
        self.assertEqual(before, {name: open(os.path.join(admin, name),
                                             'rb').read()
                                  for name in ('config', 'HEAD')})
        with open(hook) as f:
            self.assertNotIn('ingest', f.read())
        self.assertFalse(os.path.isdir(os.path.join(
            self.root, 'node', 'TODO', 'gitosis-admin')))
        # Without a file argument, outside a hook, it reads the same HEAD.
        server(self.config, 'provision', env=self.env, check=False)
        self.assert_provisioned(PROVISIONED)


class GateCommandTest(unittest.TestCase):
    """gate_command() alone: side-effect free, strict."""

    def setUp(self):
        self.root = support.temp_dir(self)
        self.config = write_node_config(self.root)
        sys.path.insert(0, support.ROOT)
        self.addCleanup(sys.path.remove, support.ROOT)
        import server
        from modules._core import Config
        self.server = server
        self.node = server.Node(Config(self.config))
        self.repo = os.path.join(self.root, 'node', 'repositories', 'c1.git')

    def test_allowed(self):
        for command, verb in (
                ("git-receive-pack 'c1.git'", 'receive-pack'),
                ("git-receive-pack '/c1.git'", 'receive-pack'),
                ("git-upload-pack '//c1.git'", 'upload-pack'),
                ("git receive-pack 'c1.git'", 'receive-pack'),
                ("git upload-pack 'c1'", 'upload-pack'),
                ('git-receive-pack c1.git', 'receive-pack'),
                ('git-upload-pack /c1.git', 'upload-pack')):
            self.assertEqual(self.server.gate_command(self.node, 'c1',
                                                      command),
                             ['git', verb, self.repo], command)
        self.assertEqual(os.listdir(os.path.dirname(self.repo)), [])

    def test_refused(self):
        for command in (
                None, '', 'sh', 'bash -i', 'scp -t c1.git',
                "git-receive-pack 'c2.git'",
                "git-receive-pack '../c1.git'",
                "git-receive-pack 'x/../c1.git'",
                "git-receive-pack '%s'" % self.repo,
                "git-upload-archive 'c1.git'",
                "git-receive-pack 'c1.git'; touch /tmp/x",
                "git-receive-pack 'c1.git' 'c2.git'",
                "git-receive-pack 'c1.git\n'",
                "git-receive-pack 'c1.git",
                'git-receive-pack "c1.git"',
                "git-receive-pack '-c1.git'",
                "git-receive-pack '--help'",
                "git --exec-path=/tmp receive-pack 'c1.git'",
                "git-receive-pack 'C1.git'",
                "git-receive-pack 'c1.git.git'"):
            with self.assertRaises(self.server.GateRefused,
                                   msg=repr(command)) as caught:
                self.server.gate_command(self.node, 'c1', command)
            message = str(caught.exception)
            self.assertNotIn('\n', message)
            self.assertTrue(message.isprintable(), message)
        with self.assertRaises(self.server.UsageError):
            self.server.gate_command(self.node, 'gitosis-admin',
                                     "git-receive-pack 'gitosis-admin.git'")
        self.assertEqual(os.listdir(os.path.dirname(self.repo)), [])


class GateSshTest(unittest.TestCase):
    """gate and add-client for real: sshd with forced commands."""

    def setUp(self):
        support.require_tools('git', 'ssh', 'sshd', 'ssh-keygen')
        self.root = support.temp_dir(self)
        self.env = support.isolated_env(os.path.join(self.root, 'home'))
        self.config = write_node_config(self.root)
        self.sshd = support.SSHD(os.path.join(self.root, 'sshd'))
        keys = os.path.join(self.root, 'keys')
        self.keys = {}
        for name in ('c1', 'c2', 'other'):
            self.keys[name] = support.make_identity(keys, name)
        # A line that is not ours, which add-client must keep.
        self.sshd.add_key(self.keys['other'][1], 'restrict')
        with open(self.sshd.authorized_keys) as f:
            self.foreign = f.read()
        for name in ('c1', 'c2'):
            server(self.config, 'add-client', name, self.keys[name][0] +
                   '.pub', '--authorized-keys', self.sshd.authorized_keys,
                   env=self.env)
        self.sshd.start()
        self.addCleanup(self.sshd.stop)
        self.repos = os.path.join(self.root, 'node', 'repositories')
        self.canary = os.path.join(self.root, 'pwned')

    def url(self, name):
        return 'ssh://%s@%s:%d/%s' % (self.sshd.user, support.HOST,
                                      self.sshd.port, name)

    def ssh(self, key, *command):
        return subprocess.run(
            ['ssh', '-F', self.sshd.ssh_config, '-i', self.keys[key][0],
             '-p', str(self.sshd.port), '%s@%s' % (self.sshd.user,
                                                   support.HOST), *command],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)

    def test_authorized_keys_lines(self):
        with open(self.sshd.authorized_keys) as f:
            text = f.read()
        self.assertTrue(text.startswith(self.foreign))
        lines = text[len(self.foreign):].splitlines()
        self.assertEqual(len(lines), 2)
        for name, line in zip(('c1', 'c2'), lines):
            self.assertTrue(line.startswith(
                f'command="{sys.executable} {SERVER} --config {self.config} '
                f'gate {name}",restrict ssh-ed25519 '), line)
            self.assertIn(self.keys[name][1].split()[1], line)
        self.assertEqual(stat.S_IMODE(os.stat(
            self.sshd.authorized_keys).st_mode), 0o600)
        # The same key again, or anything that is not one public key line:
        # refused, file unchanged.
        bad = os.path.join(self.root, 'bad.pub')
        cases = [self.keys['c1'][0] + '.pub', self.keys['c1'][0], bad, bad,
                 bad, bad]
        contents = [None, None, 'ssh-ed25519 AAAA not-base64!\n',
                    self.keys['c2'][1] + '\n' + self.keys['other'][1] + '\n',
                    'command="sh" ' + self.keys['other'][1] + '\n',
                    'ssh-rsa ' + self.keys['other'][1].split()[1] + '\n']
        for path, content in zip(cases, contents):
            if content is not None:
                with open(path, 'w') as f:
                    f.write(content)
            proc = server(self.config, 'add-client', 'c9', path,
                          '--authorized-keys', self.sshd.authorized_keys,
                          env=self.env, check=False)
            self.assertEqual(proc.returncode, 2, (content, proc.stderr))
            self.assertEqual(len(proc.stderr.strip().splitlines()), 1,
                             proc.stderr)
            with open(self.sshd.authorized_keys) as f:
                self.assertEqual(f.read(), text)
        proc = server(self.config, 'add-client', 'gitosis-admin',
                      self.keys['other'][0] + '.pub', '--authorized-keys',
                      self.sshd.authorized_keys, env=self.env, check=False)
        self.assertEqual(proc.returncode, 2)

    def test_push_fetch_and_refusals(self):
        c1 = Scratch(self.root, self.env, self.sshd.ssh_command(
            self.keys['c1'][0]))
        first = c1.commit({'RQa': f'dummy {TS} a\n'})
        proc = c1.push(self.url('c1.git'), first)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        # Created on first use, with its hook, which ingested the request.
        repo = os.path.join(self.repos, 'c1.git')
        self.assertEqual(git_config(repo, 'receive.denyNonFastForwards'),
                         'true')
        self.assertEqual(os.listdir(os.path.join(self.root, 'node', 'TODO',
                                                 'c1')).count(
            f'RQ{first}-RQa'), 1)
        # Fetching its own repository works (scp-like path too).
        proc = git(c1.git_dir, 'ls-remote', self.url('c1'), env=c1.env)
        self.assertIn(first, proc.stdout)
        # Another client's repository: refused, nothing created.
        proc = c1.push(self.url('c2.git'), first)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn('may only use c1.git', proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.repos, 'c2.git')))
        # c2's key cannot push into c1.git either.
        c2 = Scratch(self.root, self.env, self.sshd.ssh_command(
            self.keys['c2'][0]))
        evil = c2.commit({'RQb': f'dummy {TS} b\n'}, parent=None)
        proc = c2.push(self.url('c1.git'), evil)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn('may only use c2.git', proc.stderr)
        # A force push and a branch delete on its own ledger.
        rewrite = c1.commit({'RQc': f'dummy {TS} c\n'}, parent=None)
        proc = c1.push(self.url('c1.git'), rewrite, force=True)
        self.assertNotEqual(proc.returncode, 0)
        proc = c1.push(self.url('c1.git'), None)
        self.assertNotEqual(proc.returncode, 0)
        self.assertEqual(git(repo, 'rev-parse', 'master',
                             env=self.env).stdout.strip(), first)
        # Shell commands, no command at all: one line on stderr, exit 1.
        for command in (['touch', self.canary], []):
            proc = self.ssh('c1', *command)
            self.assertEqual(proc.returncode, 1, command)
            lines = proc.stderr.strip().splitlines()
            self.assertEqual(len(lines), 1, (command, proc.stderr))
            self.assertIn('server.py:', lines[0])
        self.assertFalse(os.path.exists(self.canary))
        log_text = ''
        for name in ('server.py.log', 'server-git.log'):
            path = os.path.join(self.root, 'node', 'log', name)
            if os.path.exists(path):
                with open(path) as f:
                    log_text += f.read()
        self.assertIn("refused command 'touch", log_text)


# --------------------------------------------------------------------------
# gitolite3

GITOLITE_HOOK = 'gitbackup-ingest'


class GitoliteTest(unittest.TestCase):
    """A node whose client repositories gitolite3 guards."""

    def setUp(self):
        support.require_tools('git', 'ssh', 'sshd', 'ssh-keygen', 'gitolite')
        self.root = support.temp_dir(self)
        self.env = support.isolated_env(os.path.join(self.root, 'home'))
        # gitolite runs as the current user with its own HOME.
        self.gl_home = os.path.join(self.root, 'gitolite')
        self.gl_env = {**support.isolated_env(self.gl_home),
                       'USER': support.current_user()}
        self.config = write_node_config(self.root)
        # The node's repositories are gitolite's.
        with open(self.config) as f:
            text = f.read()
        with open(self.config, 'w') as f:
            f.write(text.replace(
                os.path.join(self.root, 'node', 'repositories'),
                os.path.join(self.gl_home, 'repositories')))
        keys = os.path.join(self.root, 'keys')
        self.keys = {name: support.make_identity(keys, name)
                     for name in ('admin', 'c1', 'c2')}
        self.gitolite('setup', '-pk', self.keys['admin'][0] + '.pub')
        self.configure_gitolite()
        self.sshd = support.SSHD(os.path.join(self.root, 'sshd'))
        shell = shutil.which('gitolite-shell') or \
            '/usr/share/gitolite3/gitolite-shell'
        for name in ('c1', 'c2'):
            # What gitolite's ssh-authkeys writes, plus HOME: the test's
            # sshd lets in the current user, whose real HOME is not
            # gitolite's.
            self.sshd.add_key(self.keys[name][1],
                              f'command="HOME={self.gl_home} {shell} '
                              f'{name}",restrict')
        self.sshd.start()
        self.addCleanup(self.sshd.stop)

    def gitolite(self, *args):
        proc = subprocess.run(['gitolite', *args], env=self.gl_env,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)
        if proc.returncode != 0:
            raise AssertionError(f'gitolite {" ".join(args)}: '
                                 f'{proc.stdout}{proc.stderr}')
        return proc

    def configure_gitolite(self):
        """What docs/access-control.md tells the admin to do."""
        rc = os.path.join(self.gl_home, '.gitolite.rc')
        with open(rc) as f:
            text = f.read()
        for old, new in (
                ('# LOCAL_CODE                =>  "$ENV{HOME}/local",',
                 'LOCAL_CODE                =>  "$ENV{HOME}/local",'),
                ("# 'repo-specific-hooks',", "'repo-specific-hooks',"),
                ("GIT_CONFIG_KEYS                 =>  '',",
                 "GIT_CONFIG_KEYS                 =>  "
                 "'receive\\..*|core\\.sharedRepository',"),
                ('UMASK                           =>  0077,',
                 'UMASK                           =>  0007,')):
            self.assertIn(old, text)
            text = text.replace(old, new)
        with open(rc, 'w') as f:
            f.write(text)
        hooks = os.path.join(self.gl_home, 'local', 'hooks', 'repo-specific')
        os.makedirs(hooks)
        hook = os.path.join(hooks, GITOLITE_HOOK)
        with open(hook, 'w') as f:
            f.write('#!/bin/sh\n# gitbackup: take in the pushed requests '
                    '(gitolite sets GL_REPO).\n'
                    f'exec {sys.executable} {SERVER} --config {self.config} '
                    '-q ingest "$GL_REPO"\n')
        os.chmod(hook, 0o755)
        conf = os.path.join(self.gl_home, '.gitolite', 'conf',
                            'gitolite.conf')
        with open(conf, 'a') as f:
            f.write(textwrap.dedent(f'''
                repo c1 c2
                    config receive.fsckObjects = true
                    config receive.maxInputSize = 64m
                    config core.sharedRepository = group
                    option hook.post-update = {GITOLITE_HOOK}
                repo c1
                    RW  master$ = c1
                    R           = c1
                repo c2
                    RW  master$ = c2
                    R           = c2
                '''))
        for pub in ('c1', 'c2'):
            shutil.copy(self.keys[pub][0] + '.pub', os.path.join(
                self.gl_home, '.gitolite', 'keydir', pub + '.pub'))
        # New repositories inherit the git account's group (setgid).
        repositories = os.path.join(self.gl_home, 'repositories')
        os.chmod(repositories, os.stat(repositories).st_mode | 0o2000)
        # Server-side equivalent of pushing gitolite-admin.
        self.gitolite('setup')

    def url(self, name):
        return 'ssh://%s@%s:%d/%s' % (self.sshd.user, support.HOST,
                                      self.sshd.port, name)

    def test_push_ingest_and_refusals(self):
        repo = os.path.join(self.gl_home, 'repositories', 'c1.git')
        self.assertEqual(git_config(repo, 'receive.fsckObjects'), 'true')
        # As [server] max_push_size: a push cannot fill the node's disk.
        self.assertEqual(git_config(repo, 'receive.maxInputSize'), '64m')
        # Shared with the git account's group, where `run` (adminbackup)
        # writes the results: group-writable, setgid, and kept so by git.
        self.assertEqual(git_config(repo, 'core.sharedRepository'), 'group')
        for where in (repo, os.path.join(repo, 'objects'),
                      os.path.join(repo, 'refs', 'heads')):
            self.assertEqual(os.stat(where).st_mode & 0o2070, 0o2070, where)
        c1 = Scratch(self.root, self.env, self.sshd.ssh_command(
            self.keys['c1'][0]))
        first = c1.commit({'RQa': f'dummy {TS} a\n'})
        proc = c1.push(self.url('c1'), first)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        pool = os.path.join(self.root, 'node', 'TODO', 'c1')
        self.assertEqual(os.listdir(pool).count(f'RQ{first}-RQa'), 1)
        second = c1.commit({'RQb': f'dummy {TS} b\n'})
        self.assertEqual(c1.push(self.url('c1.git'), second).returncode, 0)
        self.assertIn(f'RQ{second}-RQb', os.listdir(pool))
        server(self.config, 'run', env=self.env)
        self.assertEqual(sorted(n[0] for n in os.listdir(pool)
                                if n.startswith(('F', 'RQ', 'X'))),
                         ['F', 'F'])
        # RW, not RW+: no rewind, no delete, no other branch.
        rewrite = c1.commit({'RQc': f'dummy {TS} c\n'}, parent=None)
        proc = c1.push(self.url('c1'), rewrite, force=True)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn('DENIED', proc.stderr)
        proc = c1.push(self.url('c1'), None)
        self.assertNotEqual(proc.returncode, 0)
        proc = c1.push(self.url('c1'), second, ref='refs/heads/results')
        self.assertNotEqual(proc.returncode, 0)
        # Another client's key cannot write (nor read) c1.
        c2 = Scratch(self.root, self.env, self.sshd.ssh_command(
            self.keys['c2'][0]))
        evil = c2.commit({'RQe': f'dummy {TS} evil\n'}, parent=None)
        proc = c2.push(self.url('c1'), evil)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn('DENIED', proc.stderr)
        proc = git(c2.git_dir, 'ls-remote', self.url('c1'), env=c2.env,
                   check=False)
        self.assertNotEqual(proc.returncode, 0)
        self.assertEqual(git(repo, 'rev-parse', 'master',
                             env=self.env).stdout.strip(), second)
        self.assertEqual([n for n in os.listdir(os.path.join(
            self.root, 'node', 'TODO', 'c2')) if not n.startswith('.')], [])


if __name__ == '__main__':
    unittest.main()


# --------------------------------------------------------------------------
# The node's key on a client (SECURITY.md)

class NodeKeyRestrictionTest(unittest.TestCase):
    """The recommended authorized_keys line for the node's key on a client:
    read-only sftp, nothing else.  The node still fetches; it cannot run a
    command, open a shell, or change anything."""

    OPTIONS = 'restrict,command="internal-sftp -R"'

    def test_read_only_sftp_key(self):
        from tests.pipeline import Pipeline
        p = Pipeline(self)
        with open(p.sshd.authorized_keys) as f:
            lines = f.read().splitlines()
        with open(p.node_key + '.pub') as f:
            node_blob = f.read().split()[1]
        lines = [f'{self.OPTIONS} {line}' if node_blob in line else line
                 for line in lines]
        with open(p.sshd.authorized_keys, 'w') as f:
            f.write('\n'.join(lines) + '\n')
        src = os.path.join(p.root, 'src')
        os.makedirs(src)
        with open(os.path.join(src, 'f'), 'w') as f:
            f.write('data\n')
        p.client('commit', 'app', src)
        p.client('send')
        p.server('run')
        self.assertEqual(p.states('node'), {'F': 1})
        self.assertEqual(len(p.stored('app')), 1)
        exported = [os.path.join(d, n) for d, _, names in
                    os.walk(os.path.join(p.client_dir, 'export'))
                    for n in names]
        self.assertTrue(exported)
        canary = os.path.join(p.root, 'pwned')
        ssh = ['ssh', '-F', p.sshd.ssh_config, '-i', p.node_key, '-p',
               str(p.sshd.port), f'{p.sshd.user}@{support.HOST}']
        for command in (['touch', canary], []):
            proc = subprocess.run(ssh + command, env=p.env,
                                  stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=60)
            self.assertNotEqual(proc.returncode, 0, command)
        self.assertFalse(os.path.exists(canary))
        victim = exported[0]
        batch = (f'-put {p.config} {os.path.dirname(victim)}/new\n'
                 f'-rm {victim}\n-mkdir {p.root}/newdir\n'
                 f'-rename {victim} {victim}.x\n-chmod 777 {victim}\n'
                 f'get {victim} {p.root}/fetched\n')
        proc = subprocess.run(
            ['sftp', '-b', '-', '-F', p.sshd.ssh_config, '-i', p.node_key,
             '-P', str(p.sshd.port), f'{p.sshd.user}@{support.HOST}'],
            input=batch, env=p.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        # Five writes, five refusals (we run as root here: only -R stops
        # them, not file permissions).
        self.assertEqual(proc.stderr.count('Permission denied'), 5,
                         proc.stderr)
        self.assertTrue(os.path.exists(victim))
        self.assertFalse(os.path.exists(os.path.join(
            os.path.dirname(victim), 'new')))
        self.assertFalse(os.path.exists(os.path.join(p.root, 'newdir')))
        self.assertTrue(os.path.exists(os.path.join(p.root, 'fetched')))
