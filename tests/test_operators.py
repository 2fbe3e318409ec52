"""Issue 11's operator traps, with the real programs: ssh refusing a login,
`check --connect`, a command run as the wrong user, gc next to gitosis,
unwritable client repositories, and a client git hook that never ran.
"""

import json
import os
import pwd
import re
import subprocess
import unittest

from tests import support
from tests.modules_pipeline import ModulePipeline
from tests.pipeline import CLIENT, NODE, Pipeline
from tests.test_reliability import write_tree


def subjects(pipeline):
    return [m['Subject'] for m in pipeline.mails()]


def remove_key(sshd, key_path):
    """Take one key out of the test sshd's authorized_keys; returns a
    function that puts it back."""
    with open(key_path + '.pub') as f:
        blob = f.read().split()[1]
    with open(sshd.authorized_keys) as f:
        lines = f.readlines()
    with open(sshd.authorized_keys, 'w') as f:
        f.writelines(line for line in lines if blob not in line)

    def restore():
        with open(sshd.authorized_keys, 'w') as f:
            f.writelines(lines)
    return restore


class AccessDeniedTest(unittest.TestCase):
    """Item 16: ssh refusing the node's login is a misconfiguration:
    alerted at once, the request waits without costing an attempt, and
    every report format shows it."""

    def test_node_key_not_authorized_alerts_at_once_and_shows_in_report(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        write_tree(src, 1 << 14)
        p.client('commit', 'app', src)
        p.client('send', '-q')
        restore = remove_key(p.sshd, p.node_key)
        p.server('run', '-q', check=False)
        p.server('run', '-q', check=False)
        # One mail at once (not after alert_after), not one per run.
        self.assertEqual(len(p.mails()), 1, subjects(p))
        mail = p.mails()[0]
        self.assertIn('failing', mail['Subject'])
        self.assertIn('Permission denied', mail.get_content())
        self.assertIn('authorized_keys', mail.get_content())
        self.assertEqual(p.states('node'), {'RQ': 1})
        attempts = os.path.join(p.node_dir, 'TODO', CLIENT, '.attempts')
        self.assertEqual(os.listdir(attempts) if os.path.isdir(attempts)
                         else [], [])
        text = p.server('report', check=False)
        self.assertEqual(text.returncode, 2, text.stdout)
        self.assertRegex(text.stdout, r'c1: critical: misconfigured.*'
                         r'Permission denied')
        report = json.loads(p.server('report', '--format', 'json',
                                     check=False).stdout)
        [client] = report['clients']
        self.assertTrue(client['misconfigured'])
        self.assertEqual(client['status'], 'critical')
        prom = p.server('report', '--format', 'prometheus',
                        check=False).stdout
        self.assertIn('gitbackup_client_misconfigured{client="c1"} 1', prom)
        self.assertIn('gitbackup_client_status{client="c1"} 2', prom)
        nagios = p.server('report', '--format', 'nagios', check=False)
        self.assertTrue(nagios.stdout.startswith('GITBACKUP CRITICAL'),
                        nagios.stdout)
        html = p.server('report', '--format', 'html', check=False).stdout
        self.assertIn('Permission denied', html)
        self.assertIn('class="banner critical"', html)
        # The key back: stored, one recovery mail, the report clean.
        restore()
        p.server('run', '-q')
        self.assertEqual(len(p.stored('app')), 1, p.node_log())
        self.assertEqual(len(p.mails()), 2, subjects(p))
        self.assertIn('recovered', p.mails()[-1]['Subject'])
        self.assertIn('gitbackup_client_misconfigured{client="c1"} 0',
                      p.server('report', '--format', 'prometheus').stdout)

    def test_client_push_refused_alerts_at_once(self):
        p = Pipeline(self)
        p.client('commit', 'dummy', p.root)
        restore = remove_key(p.sshd, p.client_key)
        p.client('send', '-q', check=False)
        p.client('send', '-q', check=False)
        self.assertEqual(len(p.mails()), 1, subjects(p))
        self.assertIn('pushing to node n1 failing', p.mails()[0]['Subject'])
        self.assertIn('authorized_keys', p.mails()[0].get_content())
        restore()
        p.client('send', '-q')
        self.assertEqual(p.states(), {'F': 1})
        self.assertIn('recovered', p.mails()[-1]['Subject'])


class ConnectTest(unittest.TestCase):
    """Item 17: `check --connect` makes every real connection and names the
    one that fails, with the fix."""

    def setUp(self):
        self.p = Pipeline(self)
        self.daemon = support.GitDaemon(os.path.join(self.p.client_dir, 'git'),
                                        os.path.join(self.p.root, 'daemon'))
        self.daemon.start()
        self.addCleanup(self.daemon.stop)
        with open(self.p.config) as f:
            text = f.read()
        with open(self.p.config, 'w') as f:
            f.write(text.replace(
                f'[client {CLIENT}]\n', f'[client {CLIENT}]\ngit = '
                f'git://127.0.0.1:{self.daemon.port}\n', 1)
                + '\n[client other]\nsftp = nobody@127.0.0.1\n'
                f'sftp_port = {self.p.sshd.port}\n')

    def failed_lines(self, proc):
        return [line for line in proc.stdout.splitlines()
                if line.startswith('FAILED')]

    def test_working_connections_are_all_ok(self):
        self.p.client('init-node', 'n1')
        client = self.p.client('check', '--connect')
        self.assertRegex(client.stdout, r'(?m)^OK +node n1: push to ssh://')
        server = self.p.server('check', '--connect', check=False)
        lines = server.stdout.splitlines()
        self.assertIn(f'OK      {CLIENT}: sftp', '\n'.join(lines))
        self.assertIn(f'OK      {CLIENT}: git server at git://', server.stdout)
        # A configured client without a repository is counted and checked:
        # its account does not exist on the client (AllowUsers refuses it).
        [failed] = self.failed_lines(server)
        self.assertIn('other: sftp nobody@127.0.0.1', failed)
        self.assertIn('authorized_keys', failed)
        self.assertEqual(server.returncode, 1)

    def test_node_key_not_authorized_is_named_with_the_fix(self):
        remove_key(self.p.sshd, self.p.node_key)
        server = self.p.server('check', '--connect', check=False)
        self.assertEqual(server.returncode, 1, server.stdout)
        failed = self.failed_lines(server)
        self.assertTrue(any(line.startswith(f'FAILED  {CLIENT}: sftp')
                            and 'Permission denied' in line and
                            "add the node's public key" in line
                            for line in failed), server.stdout)
        self.assertIn(f'OK      {CLIENT}: git server', server.stdout)

    def test_git_daemon_down_is_named(self):
        self.daemon.stop()
        server = self.p.server('check', '--connect', check=False)
        self.assertEqual(server.returncode, 1)
        self.assertTrue(any(line.startswith(f'FAILED  {CLIENT}: git server')
                            and 'start the git server' in line
                            for line in self.failed_lines(server)),
                        server.stdout)
        self.assertIn(f'OK      {CLIENT}: sftp', server.stdout)

    def test_client_key_refused_and_unknown_host_key_are_named(self):
        restore = remove_key(self.p.sshd, self.p.client_key)
        client = self.p.client('check', '--connect', check=False)
        self.assertEqual(client.returncode, 1)
        self.assertRegex(client.stdout, r'FAILED  node n1: .*Permission '
                         r"denied.*add this client's public key")
        restore()
        os.unlink(self.p.sshd.known_hosts)
        client = self.p.client('check', '--connect', check=False)
        self.assertEqual(client.returncode, 1)
        self.assertRegex(client.stdout, r'FAILED  node n1: .*host key of '
                         r'127.0.0.1 is unknown')

    def test_postgres_sudo_prefix_that_fails_is_named(self):
        support.require_tools('sudo', 'psql')
        with open(self.p.config) as f:
            text = f.read()
        with open(self.p.config, 'w') as f:
            f.write(text.replace('[client]\n', '[client]\npg_dump = sudo -n '
                                 '-u gitbackup-no-such-user pg_dump\n', 1)
                    .replace('[modules]\n', '[modules]\ndb = postgresdb\n'))
        client = self.p.client('check', '--connect', check=False)
        self.assertEqual(client.returncode, 1)
        self.assertRegex(client.stdout, r'FAILED  \[modules\] db: \[client\] '
                         r'pg_dump = sudo .*add the sudoers line')
        self.assertRegex(client.stdout, r'OK +\[modules\] db: \[client\] '
                         r'pg_dumpall')


def make_user(testcase):
    """A throw-away system account (root only, as in CI), removed at
    cleanup: the name of it."""
    if os.geteuid() != 0:
        testcase.skipTest('creating an account needs root')
    support.require_tools('runuser')
    name = f'gbtest{os.getpid() % 100000}'
    subprocess.run(['useradd', '--system', '--no-create-home', '--shell',
                    '/usr/sbin/nologin', name], check=True)
    testcase.addCleanup(subprocess.run, ['userdel', name], check=False)
    return name


def chown_tree(paths, user):
    entry = pwd.getpwnam(user)
    for top in paths:
        for parent, dirs, files in os.walk(top):
            for name in [parent] + [os.path.join(parent, n)
                                    for n in dirs + files]:
                os.lchown(name, entry.pw_uid, entry.pw_gid)


def listing(top):
    """Every path under top with its owner: what a refused command must
    leave as it was."""
    found = []
    for parent, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(parent, name)
            found.append((path, os.lstat(path).st_uid))
    return sorted(found)


def run_as(pipeline, user, script, *args):
    """client.py/server.py of the pipeline run as another account."""
    # The test's own python may live in root's home: Debian's instead.
    command = ['/usr/bin/python3' if word == support.PYTHON else word
               for word in pipeline.commands[script]]
    return subprocess.run(
        ['runuser', '-u', user, '--', *command, '--config', pipeline.config,
         *args], env=pipeline.env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=120)


class WrongUserTest(unittest.TestCase):
    """Item 14: a command run by a user who does not own the directories
    it writes (root, typically) is refused at start, naming the owner, and
    writes nothing; the owner runs it fine."""

    def setUp(self):
        self.p = Pipeline(self)
        self.user = make_user(self)
        support._grant_traversal(self.p.root)
        os.chmod(self.p.config, 0o644)

    def as_user(self, script, *args):
        return run_as(self.p, self.user, script, *args)

    def test_client_refuses_root_when_its_directories_are_another_users(self):
        c = self.p.client_dir
        chown_tree([os.path.join(c, d) for d in
                    ('requests', 'queues', 'export', 'log')], self.user)
        before = listing(c)
        for args in (('commit', 'dummy', 'x'), ('send',), ('prune',)):
            proc = self.p.client(*args, check=False)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn(f'belongs to {self.user}', proc.stderr)
            self.assertIn(f'run it as {self.user}', proc.stderr)
        self.assertEqual(listing(c), before)
        # Reading commands still work for anyone.
        self.assertEqual(self.p.client('status', check=False).returncode, 0)
        proc = self.as_user('client.py', 'commit', 'dummy', 'x')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(self.p.states(), {'C': 1})
        [request] = self.p.pool()
        self.assertEqual(os.stat(os.path.join(c, 'requests', 'n1', request))
                         .st_uid, pwd.getpwnam(self.user).pw_uid)

    def test_node_refuses_root_when_its_directories_are_another_users(self):
        n = self.p.node_dir
        chown_tree([os.path.join(n, d) for d in ('TODO', 'data', 'log')],
                   self.user)
        # A directory shared through its group (setgid, group-writable) does
        # not let root in either.
        os.chmod(os.path.join(n, 'log'), 0o2775)
        before = listing(n)
        for command in ('run', 'prune', 'gc', 'verify'):
            proc = self.p.server(command, check=False)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn(f'belongs to {self.user}', proc.stderr)
        self.assertEqual(listing(n), before)
        proc = self.as_user('server.py', 'run')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        log = os.path.join(n, 'log', 'server.py.log')
        self.assertEqual(os.stat(log).st_uid, pwd.getpwnam(self.user).pw_uid)


class GcTest(unittest.TestCase):
    """Item 18: `server.py gc` beside gitosis skips the repositories that
    are not its user's (gitosis-admin.git) with one info line, and gcs
    the others."""

    def test_gc_skips_another_accounts_repository(self):
        p = Pipeline(self)
        user = make_user(self)
        p.client('commit', 'dummy', 'x')
        p.client('send')
        admin = os.path.join(p.node_dir, 'repositories', 'gitosis-admin.git')
        subprocess.run(['git', 'init', '--quiet', '--bare', admin],
                       check=True)
        chown_tree([admin], user)
        before = listing(admin)
        proc = p.server('gc', '-v')
        self.assertEqual(listing(admin), before)
        self.assertEqual(len(re.findall('skipped 1 repositories',
                                        proc.stderr)), 1, proc.stderr)
        self.assertIn('gitosis-admin.git', proc.stderr)
        [mail] = p.mails()
        self.assertNotIn('FAILED', mail['Subject'])
        self.assertIn('1 repositories, 0 failed', mail['Subject'])
        # The client's own repository was gc'd: its objects are packed.
        packs = os.listdir(os.path.join(p.repo, 'objects', 'pack'))
        self.assertTrue(any(n.endswith('.pack') for n in packs), packs)


class UnwritableRepositoryTest(unittest.TestCase):
    """Item 13: `server.py check` names a client repository the run user
    cannot write (where `run` records the client's results)."""

    def test_check_names_an_unwritable_client_repository(self):
        p = Pipeline(self)
        user = make_user(self)
        support._grant_traversal(p.root)
        os.chmod(p.config, 0o644)
        chown_tree([p.node_dir], user)
        proc = run_as(p, user, 'server.py', 'check')
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertIn('looks ready', proc.stdout)
        # What gitolite with UMASK 0027 made: the git account's, group
        # read-only.
        heads = os.path.join(p.repo, 'refs', 'heads')
        os.chown(heads, 0, 0)
        os.chmod(heads, 0o750)
        proc = run_as(p, user, 'server.py', 'check')
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn(f'problem: {p.repo}: {heads} is not writable by '
                      f'{user}', proc.stdout)
        self.assertIn('client c1', proc.stdout)


class HookCatchUpTest(unittest.TestCase):
    """Item 12: a client git hook that failed (a typo) costs a delay, not
    a backup: `send` requests every repository below git_base whose refs
    changed since its last request, and no other."""

    def requested(self, p):
        """{repository: number of requests} in the client's pool."""
        counts = {}
        pool = os.path.join(p.client_dir, 'requests', NODE)
        for name in p.pool():
            with open(os.path.join(pool, name)) as f:
                module, _, path = f.read().strip().partition('\t')
            if module == 'git':
                counts[os.path.basename(path)] = \
                    counts.get(os.path.basename(path), 0) + 1
        return counts

    def test_send_requests_repositories_whose_hook_did_not_run(self):
        p = ModulePipeline(self)
        p.start_daemon()
        broken = p.client_repository('broken.git', hook=False)
        hook = os.path.join(broken, 'hooks', 'post-update')
        with open(hook, 'w') as f:      # the typo: an unknown module
            f.write(f'#!/bin/sh\nexec {support.PYTHON} '
                    f'{os.path.join(support.ROOT, "client.py")} --config '
                    f'{p.config} commit gti "$PWD"\n')
        os.chmod(hook, 0o755)
        p.client_repository('fine.git')
        p.client_repository('empty.git')
        heads = {}
        for name in ('broken', 'fine'):
            work = p.work_clone(os.path.join(p.git_base, name + '.git'),
                                name)
            heads[name] = p.commit_file(work, 'a', name)
            push = p.git('push', '--quiet', 'origin', 'HEAD:master',
                         cwd=work)
            if name == 'broken':
                self.assertIn('unknown module', push.stderr)
        self.assertEqual(self.requested(p), {'fine.git': 1})
        p.client('send')
        # The broken hook's push is caught up; fine.git's hook recorded its
        # request already; empty.git has nothing to back up.
        self.assertEqual(self.requested(p), {'fine.git': 1, 'broken.git': 1})
        p.client('send')
        self.assertEqual(self.requested(p), {'fine.git': 1, 'broken.git': 1})
        heads['broken'] = p.commit_file(os.path.join(p.root, 'broken'), 'b',
                                        'again')
        p.git('push', '--quiet', 'origin', 'HEAD:master',
              cwd=os.path.join(p.root, 'broken'))
        p.client('send')
        self.assertEqual(self.requested(p), {'fine.git': 1, 'broken.git': 2})
        p.server('run')
        self.assertEqual(p.refs(p.mirror('broken.git'), 'refs/heads/'),
                         {'refs/heads/master': heads['broken']},
                         p.node_log())


if __name__ == '__main__':
    unittest.main()
