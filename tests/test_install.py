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
- The documented schedule matches the defaults: daily backup-all.
"""

import configparser
import email.policy
import glob
import mailbox
import os
import pwd
import re
import shutil
import subprocess
import sys
import textwrap
import unittest

from tests import support

sys.path.insert(0, support.ROOT)
import sendmail  # noqa: E402
from tests.pipeline import CLIENT, NODE, Pipeline

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
    testcase.addCleanup(subprocess.run, ['groupdel', name],
                        stderr=subprocess.DEVNULL)
    testcase.addCleanup(subprocess.run, ['userdel', name],
                        stderr=subprocess.DEVNULL)
    return pwd.getpwnam(name)


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
