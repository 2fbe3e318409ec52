"""Installed exactly as documented, it works (issue 20): the shipped
systemd units, the README's accounts and permissions, its schedule.

- Mail from a job under a shipped unit: the unit's own settings
  (User=, NoNewPrivileges=yes) applied with setpriv to a throw-away
  account, the default [mail] settings, a real (private) Postfix: the
  message reaches the mailbox.
- The README's two node accounts (git runs ingest from the hook,
  adminbackup runs `run`) with the README's modes: the first push of a new
  client is ingested at once, and stored by the next run.
- `check` as root leaves no file behind that the right account cannot
  write, and says so; a wrong-user refusal names the right account.
- The documented schedule matches the defaults: daily backup-all, and
  `check` warns of a crontab line or timer that runs it less often.
- Polite on busy hosts: tar, zstd and sftp seen running idle, zstd on 4
  threads.
- The smaller traps: lines printed twice, tabs as '?', force-pushes only
  logged, `list` columns and stale VERIFY, a typo in the other side's
  section, the advice for a refused key, the example configuration.

Accounts are throw-away (useradd, removed at cleanup), so these tests run
as root (CI); elsewhere they are skipped, saying so.
"""

import configparser
import glob
import io
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import unittest

from tests import support

sys.path.insert(0, support.ROOT)
import sendmail  # noqa: E402
from modules import _schedule  # noqa: E402
from tests.test_hostile import set_config  # noqa: E402
from tests.modules_pipeline import ModulePipeline
from tests.pipeline import CLIENT, NODE, PRIORITY, Pipeline

UNITS = os.path.join(support.ROOT, 'packaging', 'systemd')
SYSTEM_PYTHON = '/usr/bin/python3'


def make_account(testcase, prefix, shell='/usr/sbin/nologin', home=None,
                 groups=()):
    """A throw-away account (root only, as in CI), removed at cleanup:
    its pwd entry.  Password '*', not locked: the test sshd runs without
    PAM and refuses locked accounts."""
    support.require_root('the test creates accounts')
    support.require_tools('useradd', 'userdel', 'setpriv')
    name = f'{prefix}{os.getpid() % 100000}'
    subprocess.run(['userdel', name], stderr=subprocess.DEVNULL)
    argv = ['useradd', '--system', '--user-group', '--shell', shell,
            '--password', '*', '--home-dir', home or '/', '--no-create-home']
    if groups:
        argv += ['--groups', ','.join(groups)]
    subprocess.run(argv + [name], check=True)
    entry = pwd.getpwnam(name)
    testcase.addCleanup(subprocess.run, ['groupdel', name],
                        stderr=subprocess.DEVNULL)
    testcase.addCleanup(subprocess.run, ['userdel', name],
                        stderr=subprocess.DEVNULL)
    # userdel refuses an account with processes (a mail helper left
    # retrying when a test fails): stop what the account still runs.
    testcase.addCleanup(kill_processes_of, entry.pw_uid)
    return entry


def kill_processes_of(uid):
    for pid in os.listdir('/proc'):
        try:
            if pid.isdigit() and os.stat(f'/proc/{pid}').st_uid == uid:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def read_unit(name):
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str
    parser.read(os.path.join(UNITS, name))
    return parser


def unit_argv(unit, user, config):
    """The unit's ExecStart as its settings run it, with setpriv: as
    `user` (for User=), with no_new_privs when NoNewPrivileges=yes, the
    tree's scripts for the packaged commands, GITBACKUP_CONFIG = config."""
    service = read_unit(unit)['Service']
    assert service['User'] == 'adminbackup', unit
    exec_start = service['ExecStart'].split()
    script = {'/usr/bin/gitbackup-server': 'server.py',
              '/usr/bin/gitbackup-client': 'client.py'}[exec_start[0]]
    argv = ['setpriv', '--reuid', str(user.pw_uid), '--regid',
            str(user.pw_gid), '--init-groups']
    if service.get('NoNewPrivileges') == 'yes':
        argv.append('--no-new-privs')
    env = support.isolated_env(os.path.join(os.path.dirname(config), 'home-unit'))
    env['GITBACKUP_CONFIG'] = config
    return argv + ['--', SYSTEM_PYTHON, os.path.join(support.ROOT, script),
                   *exec_start[1:]], env


class MailUnderUnitTest(unittest.TestCase):
    """Item 1: NoNewPrivileges=yes disarms Postfix's setgid postdrop (and
    Exim's setuid sendmail); the default transport, SMTP to the local MTA,
    needs no privilege."""

    def test_report_mail_under_the_report_unit_reaches_the_mailbox(self):
        self.assertEqual(read_unit('gitbackup-server-report.service')
                         ['Service']['NoNewPrivileges'], 'yes')
        root = support.temp_dir(self)
        support._grant_traversal(root)
        postfix = support.Postfix(os.path.join(root, 'postfix'))
        postfix.start()
        self.addCleanup(postfix.stop)
        user = make_account(self, 'gbmail')
        node = os.path.join(root, 'node')
        for d in ('TODO/c1', 'data', 'log', 'repositories'):
            os.makedirs(os.path.join(node, d))
        # The documented [mail] section with only the port changed: the
        # private Postfix listens on its own loopback port.
        config = os.path.join(root, 'backup.ini')
        with open(config, 'w') as f:
            f.write(textwrap.dedent(f'''\
                [server]
                name = n1
                todo_dir = {node}/TODO
                data_dir = {node}/data
                log_dir = {node}/log
                repositories = {node}/repositories
                admin = {user.pw_name}@localhost

                [client c1]
                expect = app

                [mail]
                smtp = {postfix.address}
                from = backup@[127.0.0.1]
                '''))
        os.chmod(config, 0o644)
        subprocess.run(['chown', '-R', f'{user.pw_uid}:{user.pw_gid}',
                        node], check=True)
        argv, env = unit_argv('gitbackup-server-report.service', user,
                              config)
        proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertIn('CRITICAL', proc.stdout)
        [message] = postfix.wait_for_mail(user.pw_name, 1)
        self.assertEqual(message['Subject'],
                         'gitbackup: report of n1: CRITICAL')
        self.assertEqual(message['From'], 'backup@[127.0.0.1]')
        self.assertIn('expected source has no backup', message.get_content())
        self.assertEqual(os.listdir(os.path.join(node, 'log', 'mail-queue'))
                         if os.path.isdir(os.path.join(node, 'log',
                                                       'mail-queue')) else [],
                         [])

    def test_check_warns_of_sendmail_under_the_node_timers(self):
        support.require_tools('sendmail')
        import server
        from modules import _core
        tmp = support.temp_dir(self)
        wants = os.path.join(tmp, 'wants')
        os.makedirs(wants)
        self.addCleanup(setattr, _schedule, 'WANTS_DIR', _schedule.WANTS_DIR)
        _schedule.WANTS_DIR = wants
        for d in ('TODO', 'data', 'log', 'repositories'):
            os.makedirs(os.path.join(tmp, d))
        config = os.path.join(tmp, 'backup.ini')

        def warnings(method):
            with open(config, 'w') as f:
                f.write(textwrap.dedent(f"""\
                    [server]
                    name = n1
                    todo_dir = {tmp}/TODO
                    data_dir = {tmp}/data
                    log_dir = {tmp}/log
                    repositories = {tmp}/repositories

                    [mail]
                    method = {method}
                    """))
            out = io.StringIO()
            server.check_node(server.Node(_core.Config(config)), out)
            return [line for line in out.getvalue().splitlines()
                    if line.startswith('warning:')]
        self.assertEqual(warnings('sendmail'), [])     # no timer enabled
        os.symlink(os.path.join(UNITS, 'gitbackup-server-run.timer'),
                   os.path.join(wants, 'gitbackup-server-run.timer'))
        [warning] = warnings('sendmail')
        self.assertIn('gitbackup-server-run.timer run with NoNewPrivileges'
                      '=yes', warning)
        self.assertIn('use method = smtp', warning)
        self.assertEqual(warnings('smtp'), [])

    def test_sendmail_under_no_new_privs_fails_at_once_and_queues(self):
        """method = sendmail under a unit: a clear refusal that names the
        fix, not a 60 s hang with postdrop left retrying."""
        support.require_tools('sendmail', 'setpriv')
        root = support.temp_dir(self)
        support._grant_traversal(root)
        user = make_account(self, 'gbsm')
        log_dir = os.path.join(root, 'log')
        os.makedirs(log_dir)
        os.chown(log_dir, user.pw_uid, user.pw_gid)
        config = os.path.join(root, 'backup.ini')
        with open(config, 'w') as f:
            f.write(f'[server]\nlog_dir = {log_dir}\n\n[mail]\n'
                    'method = sendmail\n')
        os.chmod(config, 0o644)
        proc = subprocess.run(
            ['setpriv', '--reuid', str(user.pw_uid), '--regid',
             str(user.pw_gid), '--init-groups', '--no-new-privs', '--',
             SYSTEM_PYTHON, os.path.join(support.ROOT, 'sendmail.py'),
             '--config', config, 'subject', '-', 'root@localhost'],
            input='body\n', capture_output=True, text=True, timeout=30)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn('no_new_privs', proc.stderr)
        self.assertIn('method = smtp', proc.stderr)
        [queued] = os.listdir(os.path.join(log_dir, 'mail-queue'))
        self.assertTrue(queued.endswith('.eml'), queued)


def as_account(user, argv, env, **kwargs):
    """argv run as user (its groups too), as cron or a unit would."""
    return subprocess.run(
        ['setpriv', '--reuid', str(user.pw_uid), '--regid', str(user.pw_gid),
         '--init-groups', '--', *argv], env=env, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=300, **kwargs)


def tree(top):
    """Every path below top with its owner and mode."""
    found = []
    for parent, dirs, files in os.walk(top):
        for name in dirs + files:
            st = os.lstat(os.path.join(parent, name))
            found.append((os.path.join(parent, name), st.st_uid, st.st_mode))
    return sorted(found)


def chown(user, *paths, mode=None):
    for path in paths:
        subprocess.run(['chown', '-R', f'{user.pw_uid}:{user.pw_gid}', path],
                       check=True)
        if mode is not None:
            os.chmod(path, mode)


class NodeAccounts:
    """The README's node: `git` (owns the client repositories, runs ingest
    from their hook; its shell lets the client's key in through sshd) and
    `adminbackup` (in git's group; runs `run`, owns the data), with the
    README's modes: TODO and log 2775 git:git, data 0750 adminbackup."""

    def __init__(self, testcase, pipeline):
        p = self.p = pipeline
        self.testcase = testcase
        support._grant_traversal(p.root)
        home = os.path.join(p.root, 'git-home')
        os.makedirs(home)
        self.git = make_account(testcase, 'gbgit', shell='/bin/sh', home=home)
        self.admin = make_account(testcase, 'gbadm',
                                  groups=[self.git.pw_name])
        chown(self.git, home)
        n = p.node_dir
        shutil.rmtree(p.repo)
        # A fresh install: nothing made by root (the pipeline's own check).
        for made in glob.glob(os.path.join(n, 'log', '*')) + \
                glob.glob(os.path.join(n, 'TODO', '*')):
            shutil.rmtree(made) if os.path.isdir(made) else os.unlink(made)
        # sshd reads it as the account logging in.
        os.chmod(p.sshd.authorized_keys, 0o644)
        chown(self.git, os.path.join(n, 'TODO'), os.path.join(n, 'log'),
              mode=0o2775)
        chown(self.git, os.path.join(n, 'repositories'))
        chown(self.admin, os.path.join(n, 'data'), mode=0o750)
        # The node's key, the adminbackup account's own.
        keys = os.path.join(p.root, 'admin-keys')
        os.makedirs(keys)
        shutil.copy(p.node_key, keys)
        chown(self.admin, keys)
        os.chmod(p.config, 0o644)
        os.makedirs(os.path.join(p.root, 'mail'), exist_ok=True)
        chown(self.admin, os.path.join(p.root, 'mail'))   # method = spool
        set_config(p, 'server', 'ssh_command', p.sshd.ssh_command(
            os.path.join(keys, os.path.basename(p.node_key))))
        set_config(p, 'nodes', NODE, p.sshd.url(p.repo).replace(
            f'//{p.sshd.user}@', f'//{self.git.pw_name}@'))
        p.sshd.add_config('', users=[self.git.pw_name])
        # provision, as the gitosis-admin hook runs it: as git.
        conf = os.path.join(p.root, 'gitosis.conf')
        with open(conf, 'w') as f:
            f.write(f'[group c]\nwritable = {CLIENT}\nmembers = h\n')
        self.server(self.git, 'provision', conf)
        p.sshd.start()
        testcase.addCleanup(p.sshd.stop)

    def server(self, user, *args, check=True):
        p = self.p
        proc = as_account(user, [SYSTEM_PYTHON, os.path.join(
            support.ROOT, 'server.py'), '--config', p.config, *args], p.env)
        if check and proc.returncode:
            self.testcase.fail(f'server.py {" ".join(args)} as '
                               f'{user.pw_name}: exit {proc.returncode}\n'
                               f'{proc.stdout}{proc.stderr}')
        return proc


class IngestAccountsTest(unittest.TestCase):
    """Item 3: with the README's accounts and modes, the first push of a
    new client is ingested by its hook (as git, which may not read
    data_dir), and the run (as adminbackup) stores it."""

    def test_first_push_is_ingested_and_stored(self):
        p = Pipeline(self, start=False)
        accounts = NodeAccounts(self, p)
        src = os.path.join(p.root, 'src')
        os.makedirs(src)
        with open(os.path.join(src, 'a.txt'), 'w') as f:
            f.write('first\n')
        p.client('commit', 'app', src)
        push = p.client('send', '-v')
        self.assertEqual(p.states(), {'F': 1})
        # Ingested by the hook, at once, without an error.
        self.assertEqual(p.states('node'), {'RQ': 1}, push.stderr)
        with open(os.path.join(p.node_dir, 'log', 'server-git.log')) as f:
            git_log = f.read()
        self.assertNotIn('ERROR', git_log)
        self.assertIn('ingested 1 request(s)', git_log)
        accounts.server(accounts.admin, 'run')
        self.assertEqual(p.states('node'), {'F': 1})
        [stored] = p.stored('app')
        self.assertEqual(os.stat(stored).st_uid, accounts.admin.pw_uid)
        p.client('send')
        self.assertIn('node stored 1, node failed 0',
                      p.client('status').stdout)


class WrongUserTest(unittest.TestCase):
    """Item 4: `check` as root (as the package section once said) makes
    no file the right account cannot write, and a file left by an older
    version is named with its fix; a refused `run` names adminbackup, the
    account that owns the data, not git."""

    def test_check_as_root_writes_nothing_and_names_a_foreign_log(self):
        p = Pipeline(self, start=False)
        accounts = NodeAccounts(self, p)
        log_dir = os.path.join(p.node_dir, 'log')
        before = tree(p.node_dir)
        for args in (('check',), ('check', '--connect'), ('report',),
                     ('list',)):
            proc = p.server(*args, check=False)
            self.assertEqual(tree(p.node_dir), before, args)
        self.assertIn('looks ready', p.server('check').stdout)
        # The client's reading commands as root, its directories
        # adminbackup's: nothing made either.
        for d in ('requests', 'queues', 'export', 'log'):
            chown(accounts.admin, os.path.join(p.client_dir, d))
        before = tree(p.client_dir)
        for args in (('check',), ('status',)):
            p.client(*args, check=False)
            self.assertEqual(tree(p.client_dir), before, args)
        # As an older version did: root's log file.
        log_file = os.path.join(log_dir, 'server.py.log')
        with open(log_file, 'w'):
            pass
        proc = accounts.server(accounts.admin, 'check', check=False)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertIn(f'problem: log file {log_file} belongs to root, '
                      f'{accounts.admin.pw_name} cannot write it', proc.stdout)
        self.assertIn(f'chown {accounts.admin.pw_name} {log_file}',
                      proc.stdout)
        os.chown(log_file, accounts.admin.pw_uid, accounts.admin.pw_gid)
        proc = accounts.server(accounts.admin, 'check')
        self.assertIn('looks ready', proc.stdout)

    def test_refused_run_names_the_data_owner(self):
        p = Pipeline(self, start=False)
        accounts = NodeAccounts(self, p)
        admin = accounts.admin.pw_name
        for user in ('root', accounts.git.pw_name):
            proc = p.server('run', check=False) if user == 'root' else \
                accounts.server(accounts.git, 'run', check=False)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn(f'run it as {admin} (sudo -u {admin} server.py '
                          'run', proc.stderr)
        # And the account named is let in.
        accounts.server(accounts.admin, 'run')
        # The right account, to a shared directory that is not shared: the
        # fix, not "run it as git".
        todo = os.path.join(p.node_dir, 'TODO')
        os.chmod(todo, 0o755)
        proc = accounts.server(accounts.admin, 'run', check=False)
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertIn(f'{todo} belongs to {accounts.git.pw_name} and is not '
                      f'shared with {admin} through its group', proc.stderr)
        self.assertIn(f'chmod 2775 {todo}', proc.stderr)
        self.assertNotIn('run it as', proc.stderr)


class ScheduleTest(unittest.TestCase):
    """Item 2: the documented schedule runs backup-all daily, as
    stale_after (2d) and full_every (7d) expect; `check` warns about a
    schedule it can see that runs it less often."""

    def test_documented_backup_all_is_daily(self):
        timer = read_unit('gitbackup-client-backup-all.timer')
        self.assertEqual(_schedule.calendar_interval(
            timer['Timer']['OnCalendar']), _schedule.DAY)
        lines = []
        for doc in ('README.md', 'docs/modules.md', 'docs/operations.md'):
            with open(os.path.join(support.ROOT, doc)) as f:
                lines += [line for line in f.read().splitlines()
                          if re.match(r'\s*([0-9*/,-]+\s+){5}', line) and
                          'backup-all' in line]
        self.assertGreaterEqual(len(lines), 3)
        for line in lines:
            fields = line.split()
            self.assertEqual(_schedule.cron_interval(*fields[:5]),
                             _schedule.DAY, line)

    def test_check_warns_of_a_monthly_backup_all(self):
        tmp = support.temp_dir(self)
        crontab = os.path.join(tmp, 'crontab')
        with open(crontab, 'w') as f:
            f.write('SHELL=/bin/sh\n# m h dom mon dow user command\n'
                    '0 23 11 * *  adminbackup  /usr/bin/gitbackup-client '
                    '-q backup-all\n')
        units, wants = os.path.join(tmp, 'units'), os.path.join(tmp, 'wants')
        os.makedirs(units)
        os.makedirs(wants)
        for name, value in (('CRON_FILES', (crontab,)),
                            ('SYSTEMD_UNIT_DIRS', (units,)),
                            ('WANTS_DIR', wants)):
            self.addCleanup(setattr, _schedule, name,
                            getattr(_schedule, name))
            setattr(_schedule, name, value)
        self.assertEqual(self.check_warnings(tmp), [
            f'warning: backup-all runs every 31d ({crontab}: 0 23 11 * *  '
            'adminbackup  /usr/bin/gitbackup-client -q backup-all), but the '
            "nodes' default stale_after = 2d calls a source stale sooner: "
            'run backup-all daily (e.g. 0 23 * * *)'])
        # The shipped timer, enabled: daily, no warning; as it was (the
        # 11th of each month): a warning.
        os.unlink(crontab)
        timer = 'gitbackup-client-backup-all.timer'
        shutil.copy(os.path.join(UNITS, timer), units)
        os.symlink(os.path.join(units, timer), os.path.join(wants, timer))
        self.assertEqual(self.check_warnings(tmp), [])
        with open(os.path.join(units, timer), 'a') as f:
            f.write('\n[Timer]\nOnCalendar=\nOnCalendar=*-*-11 23:00:00\n')
        [warning] = self.check_warnings(tmp)
        self.assertIn(f'every 31d ({timer}: OnCalendar=*-*-11 23:00:00)',
                      warning)

    def check_warnings(self, tmp):
        import client
        from modules import _core
        config = os.path.join(tmp, 'backup.ini')
        with open(config, 'w') as f:
            f.write(textwrap.dedent(f"""\
                [client]
                name = c1
                request_dir = {tmp}/requests
                queue_dir = {tmp}/queues
                export_dir = {tmp}/export
                log_dir = {tmp}/log
                """))
        out = io.StringIO()
        client.Client(_core.Config(config)).check(out)
        return [line for line in out.getvalue().splitlines()
                if line.startswith('warning:')]


RECORDER = """#!/bin/sh
# Records what runs: name, niceness, I/O class, arguments; then runs it.
printf '%s|%s|%s|%s\\n' {name} "$(cut -d' ' -f19 /proc/$$/stat)" \\
    "$(ionice -p $$)" "$*" >> {log}
exec {program} "$@"
"""


class PoliteTest(unittest.TestCase):
    """Item 8: the client's tar and zstd and the node's sftp run at idle
    CPU and I/O priority with zstd capped at 4 threads, by default; both
    are configurable.  Seen from the real processes (a recorder in PATH
    that reads their /proc entry and ionice, then execs the program)."""

    def setUp(self):
        support.require_tools('zstd', 'ionice')
        self.p = p = Pipeline(self)
        with open(p.config) as f:       # the defaults, not the suite's
            text = f.read()
        with open(p.config, 'w') as f:
            f.write(text.replace(PRIORITY + '\n', ''))
        wrappers = os.path.join(p.root, 'wrappers')
        os.makedirs(wrappers)
        self.log = os.path.join(p.root, 'children.log')
        for name in ('tar', 'zstd', 'sftp'):
            path = os.path.join(wrappers, name)
            with open(path, 'w') as f:
                f.write(RECORDER.format(name=name, log=self.log,
                                        program=shutil.which(name)))
            os.chmod(path, 0o755)
        p.env['PATH'] = wrappers + os.pathsep + p.env['PATH']
        self.src = os.path.join(p.root, 'src')
        os.makedirs(self.src)
        with open(os.path.join(self.src, 'a.txt'), 'w') as f:
            f.write('polite\n' * 1000)

    def children(self):
        """{name: [(niceness, I/O class, arguments)]} recorded so far."""
        found = {}
        with open(self.log) as f:
            for line in f:
                name, nice, io, args = line.rstrip('\n').split('|', 3)
                found.setdefault(name, []).append((int(nice), io, args))
        os.unlink(self.log)
        return found

    def backup(self):
        self.p.client('commit', 'app', self.src)
        self.p.client('send')
        self.p.server('run')
        return self.children()

    def test_children_run_idle_and_zstd_on_four_threads(self):
        found = self.backup()
        self.assertEqual(set(found), {'tar', 'zstd', 'sftp'})
        for name, runs in found.items():
            for nice, io, args in runs:
                self.assertEqual((nice, io), (19, 'idle'), (name, args))
        [compress] = [args for _, _, args in found['zstd']
                      if '-d' not in args.split()]
        self.assertEqual(compress.split()[:3], ['-T4', '-3', '-B2M'])
        # Configurable: normal priority, two threads.
        set_config(self.p, 'client', 'priority', 'normal')
        set_config(self.p, 'client', 'compression_threads', '2')
        set_config(self.p, 'server', 'priority', 'low')
        found = self.backup()
        own = os.nice(0)
        for nice, io, args in found['tar'] + found['zstd']:
            self.assertEqual(nice, own, args)
            self.assertNotEqual(io, 'idle', args)
        self.assertEqual({(nice, io) for nice, io, _ in found['sftp']},
                         {(max(10, own), 'best-effort: prio 7')})
        self.assertIn('-T2', [args.split()[0] for _, _, args in found['zstd']])


class OnceTest(unittest.TestCase):
    """Item 7: verify and drill print each line once (stdout: the result;
    the log file keeps it), a damaged file's too; tabs in a message are
    spaces, not '?'."""

    def test_verify_and_drill_print_each_line_once(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        os.makedirs(src)
        with open(os.path.join(src, 'a.txt'), 'w') as f:
            f.write('once\n')
        for _ in range(2):
            p.client('commit', 'app', src)
            p.client('send')
            p.server('run')
        first = p.stored('app')[0]
        [archive] = [n for n in os.listdir(first) if '.tar' in n and
                     not n.endswith('.listing')]
        with open(os.path.join(first, archive), 'ab') as f:
            f.write(b'damage')
        for command in ('verify', 'drill'):
            proc = p.server(command, check=False)
            lines = proc.stdout.splitlines()
            self.assertTrue(lines, command)
            for line in lines:
                self.assertNotIn(line, proc.stderr, command)
            with open(os.path.join(p.node_dir, 'log', 'server.py.log')) as f:
                self.assertIn(lines[-1], f.read())

    def test_tabs_are_spaces(self):
        from modules import _core
        self.assertEqual(_core.clean_text('error:\tbad\x1b'), 'error: bad?')


class GitNewsTest(unittest.TestCase):
    """Item 7: a client's rewritten history (a force-push) and refs the
    mirror does not keep (refs/pull/*) are mailed, not only logged; the
    backup itself is stored."""

    def test_force_push_and_skipped_refs_are_mailed(self):
        p = ModulePipeline(self)
        p.start_daemon()
        bare = p.client_repository('a.git', hook=False)
        work = p.work_clone(bare)
        first = p.commit_file(work, 'f', '1\n')
        p.commit_file(work, 'f', '2\n')
        p.git('push', '--quiet', 'origin', 'master', cwd=work)
        p.git('push', '--quiet', 'origin', f'{first}:refs/pull/1/head',
              cwd=work)
        p.client('commit', 'git', bare)
        p.client('send')
        p.server('run')   # exit 0: news, not a failure
        [mail] = [m for m in p.mails() if 'run on' in m['Subject']]
        self.assertIn('1 ref(s) outside branches, tags and notes are not '
                      'backed up, e.g. refs/pull/1/head', mail.get_content())
        p.git('push', '--quiet', '--force', 'origin', f'{first}:master',
              cwd=work)
        p.client('commit', 'git', bare)
        p.client('send')
        p.server('run')   # exit 0: news, not a failure
        mails = [m for m in p.mails() if 'run on' in m['Subject']]
        self.assertEqual(len(mails), 2)
        self.assertRegex(mails[-1].get_content(),
                         r'1 ref\(s\) rewritten or deleted by the client '
                         r'\(a force-push\?\); the old tips are kept as '
                         r'refs/preserved/\S+/refs/heads/master')
        self.assertEqual(p.refs(p.mirror('a.git'), 'refs/heads/'),
                         {'refs/heads/master': first})


class ListTest(unittest.TestCase):
    """Item 7: `list` columns stay in line whatever the kind or snapshot
    name; VERIFY is '-' for what came after the last verify."""

    def test_columns_and_verify_after_the_last_verify(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        os.makedirs(src)
        with open(os.path.join(src, 'a.txt'), 'w') as f:
            f.write('listed\n')
        p.client('commit', 'app', src)
        p.client('send')
        p.server('run')
        p.server('verify')
        p.client('send')     # the node's confirmation: the next is an increment
        # The next increment lands in the same second: its name gets .2
        # (made here by renaming, as the node does within one second).
        with open(os.path.join(src, 'b.txt'), 'w') as f:
            f.write('later\n')
        p.client('commit', 'app', src)
        p.client('send')
        p.server('run')
        [first, second] = p.stored('app')
        renamed = first + '.2'
        os.rename(second, renamed)
        entries = json.loads(p.server('list', '--format', 'json').stdout)
        self.assertEqual([(e['snapshot'], (e['verify'] or {}).get('outcome'))
                          for e in entries],
                         [(os.path.basename(first), 'ok'),
                          (os.path.basename(renamed), None)])
        lines = p.server('list').stdout.splitlines()
        self.assertEqual(len(lines), 3)
        header = lines[0]
        for word in ('KIND', 'VERIFY', 'DRILL', 'FILES'):
            column = header.index(word)
            for line in lines[1:]:     # left-aligned: starts there
                self.assertEqual(line[column - 1], ' ', (word, line))
                self.assertNotEqual(line[column], ' ', (word, line))
        end = header.index('SIZE') + len('SIZE')
        for line in lines[1:]:         # right-aligned: ends there
            self.assertEqual(line[end - 1:end + 1], 'B ', line)
        self.assertIn(' -  ', lines[2])
        self.assertIn('incremental <', lines[2])


class SharedFileTest(unittest.TestCase):
    """Item 7: in a file both sides read, a typo in the client's sections
    stops the client (exit 2, the line named), not the node; and the other
    way round."""

    def test_each_side_checks_its_own_sections(self):
        p = Pipeline(self, start=False)
        with open(p.config) as f:
            text = f.read()
        for section, typo, broken, fine in (
                ('client', 'nmae = c1', 'client.py', 'server.py'),
                ('server', 'stale_aftr = 2d', 'server.py', 'client.py')):
            with open(p.config, 'w') as f:
                f.write(text.replace(f'[{section}]\n',
                                     f'[{section}]\n{typo}\n', 1))
            proc = p._run(broken, ['check'], check=False)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn(f"unknown key '{typo.split()[0]}' in [{section}]",
                          proc.stderr)
            proc = p._run(fine, ['check'], check=False)
            self.assertNotIn('unknown key', proc.stderr)
            self.assertIn('looks ready' if fine == 'server.py' else
                          'client c1', proc.stdout)
        # An unknown section is an error for both.
        with open(p.config, 'w') as f:
            f.write(text + '\n[clinet]\nname = c1\n')
        for script in ('client.py', 'server.py'):
            proc = p._run(script, ['check'], check=False)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn('unknown section [clinet]', proc.stderr)


class ConnectAdviceTest(unittest.TestCase):
    """Item 7: when sshd refuses the node's key, `check --connect` names
    where the key goes for the README's chrooted account too (its Match
    block's AuthorizedKeysFile), not only ~user/.ssh/authorized_keys."""

    def test_refused_node_key_names_both_places(self):
        from tests.test_operators import remove_key
        p = Pipeline(self)
        remove_key(p.sshd, p.node_key)
        proc = p.server('check', '--connect', check=False)
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertRegex(proc.stdout, r'FAILED .*login refused; add the '
                         r"node's public key .* the AuthorizedKeysFile of its "
                         r"Match block .*/etc/ssh/gbnode/authorized_keys\), "
                         r'else ~\S+/\.ssh/authorized_keys')


class ExampleConfigurationTest(unittest.TestCase):
    """Item 1 and 7: the example's [mail] works as written, its admin is
    a local address, not a real-looking outside one."""

    def test_example_mail_section_is_valid(self):
        parser = configparser.ConfigParser(interpolation=None,
                                           inline_comment_prefixes=(';',))
        parser.read(os.path.join(support.ROOT, 'conf.example.ini'))
        mail = dict(parser['mail'])
        self.assertEqual(sendmail.mail_config_problems(mail), [])
        self.assertEqual(mail.get('method', sendmail.DEFAULT_METHOD), 'smtp')
        for section in ('client', 'server'):
            self.assertEqual(parser[section]['admin'], 'root@localhost')
        self.assertIn('brackets', sendmail.mail_config_problems(
            {'from': 'backup@172.16.2.57'})[0])


if __name__ == '__main__':
    unittest.main()
