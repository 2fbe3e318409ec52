"""Tests of sendmail.py: spool files; delivery through a real MTA (a
private Postfix on 127.0.0.1, local delivery into an mbox file) over SMTP
and through its sendmail program; failures of the sendmail interface with
stand-in programs; the mail queue; and the command line called in-process
(and as a real process)."""

import contextlib
import email.parser
import email.policy
import fcntl
import io
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import sendmail  # noqa: E402
from tests import support  # noqa: E402

SENDER = 'backup@example.org'
SUBJECT = 'git gc: Prüfung 备份'
BODY = 'héllo wörld\n.\n.leading dot\n备份完成\n'
# ASCII goes out as 7bit text, so its '.' lines reach the MTA as they are.
DOTS_BODY = 'a log\n.\n..two dots\n.leading dot\nend of log\n'
NAME_RE = re.compile(r'\d{8}T\d{6}\.\d{6}Z-\d+-\d+\.eml\Z')


def parse(data):
    return email.parser.BytesParser(policy=email.policy.default).parsebytes(data)


def read_message(path):
    with open(path, 'rb') as f:
        return parse(f.read())


def message_files(directory):
    """Names of the files in directory, failing on left-over temp files."""
    if not os.path.isdir(directory):
        return []
    names = sorted(name for name in os.listdir(directory) if name != '.lock')
    leftovers = [name for name in names if name.startswith('.')]
    assert not leftovers, 'temporary files left behind: %s' % leftovers
    return names


_postfix = None
_module_cleanups = []   # run by tearDownModule, last first


def real_mta():
    """This module's private Postfix on 127.0.0.1 (local delivery into mbox
    files), started on first use and stopped when the module's tests end.
    Skips the test (fails it under CI=true) where Postfix is missing."""
    global _postfix
    if _postfix is None:
        workdir = tempfile.mkdtemp(prefix='gitbackup-postfix-')
        _module_cleanups.append(
            lambda: shutil.rmtree(workdir, ignore_errors=True))
        postfix = support.Postfix(os.path.join(workdir, 'postfix'))
        _module_cleanups.append(postfix.stop)
        postfix.start()
        _postfix = postfix
    return _postfix


def tearDownModule():
    # Not unittest.addModuleCleanup (3.8): this module also runs on
    # Python 3.6, sendmail.py's oldest (tests/test_compat.py).
    while _module_cleanups:
        _module_cleanups.pop()()


def closed_port(testcase):
    """'127.0.0.1:port' where a bound, non-listening socket refuses
    connections (and keeps the port from being reused meanwhile)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    testcase.addCleanup(sock.close)
    sock.bind(('127.0.0.1', 0))
    return '127.0.0.1:%d' % sock.getsockname()[1]


def write_script(path, text):
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, stat.S_IRWXU)
    return path


class MailTestCase(unittest.TestCase):

    def setUp(self):
        self.tmp = support.temp_dir(self)
        self.log_dir = os.path.join(self.tmp, 'log')
        self.queue = os.path.join(self.log_dir, 'mail-queue')

    def fake_sendmail(self, status=0):
        """A stand-in sendmail that saves argv and stdin, then exits."""
        return write_script(os.path.join(self.tmp, 'sendmail-%d' % status), (
            '#!/bin/sh\n'
            'printf "%%s\\n" "$@" > "%(tmp)s/argv"\n'
            'cat > "%(tmp)s/stdin"\n'
            'echo called >> "%(tmp)s/calls"\n'
            '[ %(status)d -eq 0 ] || echo "sendmail: local MTA is down" >&2\n'
            'exit %(status)d\n') % {'tmp': self.tmp, 'status': status})

    def real_mta(self):
        """The private Postfix, with an empty mailbox for self.user (the
        account the tests run as) and self.address, a local address of it."""
        postfix = real_mta()
        self.user = support.current_user()
        self.address = '%s@localhost' % self.user
        try:
            os.unlink(postfix.mailbox(self.user))
        except FileNotFoundError:
            pass
        return postfix

    def assert_message(self, message, receivers, body=BODY):
        self.assertEqual(message['Subject'], SUBJECT)
        self.assertEqual(message['From'], SENDER)
        self.assertEqual([a.addr_spec for a in message['To'].addresses],
                         receivers)
        self.assertTrue(message['Date'])
        self.assertTrue(message['Message-ID'].endswith('@example.org>'))
        self.assertEqual(message['Auto-Submitted'], 'auto-generated')
        self.assertEqual(message.get_content(), body)


class SpoolTest(MailTestCase):

    def test_spool_writes_a_parseable_message(self):
        receivers = ['root', 'admin@example.org']
        done = sendmail.send(SUBJECT, BODY, receivers,
                             {'method': 'spool', 'from': SENDER}, self.log_dir)
        spool = os.path.join(self.log_dir, 'mail')
        names = message_files(spool)
        self.assertEqual(len(names), 1)
        self.assertRegex(names[0], NAME_RE)
        path = os.path.join(spool, names[0])
        self.assertEqual(done, 'spooled to %s' % path)
        with open(path, 'rb') as f:
            data = f.read()
        data.decode('ascii')   # 7-bit clean: non-ASCII is MIME-encoded
        self.assert_message(parse(data), receivers)
        self.assertFalse(os.path.exists(self.queue))

    def test_spool_dir_and_unique_names(self):
        spool = os.path.join(self.tmp, 'elsewhere')
        mail = {'method': 'spool', 'spool_dir': spool, 'from': SENDER}
        for _ in range(3):
            sendmail.send(SUBJECT, BODY, ['root'], mail, self.log_dir)
        self.assertEqual(len(message_files(spool)), 3)

    def test_unwritable_spool_is_an_error(self):
        blocker = os.path.join(self.tmp, 'file')
        open(blocker, 'w').close()
        mail = {'method': 'spool', 'spool_dir': blocker, 'from': SENDER}
        with self.assertRaisesRegex(sendmail.MailError, 'cannot spool'):
            sendmail.send(SUBJECT, BODY, ['root'], mail, self.log_dir)


class SMTPTest(MailTestCase):

    def test_smtp_delivers_into_a_local_mailbox(self):
        postfix = self.real_mta()
        receivers = [self.address]
        mail = {'method': 'smtp', 'smtp': postfix.address, 'from': SENDER}
        for body in (BODY, DOTS_BODY):
            done = sendmail.send(SUBJECT, body, receivers, mail, self.log_dir)
            self.assertEqual(done, 'sent via smtp %s' % postfix.address)
        # Headers and bodies as built (the '.' lines survived SMTP's
        # dot-stuffing), the envelope sender is `from`.
        messages = postfix.wait_for_mail(self.user, 2)
        for message, body in zip(messages, (BODY, DOTS_BODY)):
            self.assert_message(message, receivers, body)
            self.assertEqual(message['Return-Path'], '<%s>' % SENDER)
            self.assertIn('with ESMTP', message['Received'])
        self.assertEqual(messages[1]['Content-Transfer-Encoding'], '7bit')
        self.assertFalse(os.path.exists(self.queue))

    def test_smtp_partly_refused_is_sent_not_queued(self):
        # Retrying would duplicate the mail for those who got it.
        postfix = self.real_mta()
        mail = {'method': 'smtp', 'smtp': postfix.address, 'from': SENDER}
        done = sendmail.send(SUBJECT, BODY, [self.address,
                                             'no-such-user@localhost'],
                             mail, self.log_dir)
        self.assertEqual(done, 'sent via smtp %s (refused: '
                         'no-such-user@localhost)' % postfix.address)
        [message] = postfix.wait_for_mail(self.user, 1)
        self.assertEqual(message['Subject'], SUBJECT)
        self.assertFalse(os.path.exists(self.queue))

    def test_failure_queues_and_flush_delivers_oldest_first(self):
        postfix = self.real_mta()
        down = {'method': 'smtp', 'smtp': closed_port(self), 'from': SENDER}
        for subject in ('first', 'second'):
            with self.assertRaises(sendmail.MailError) as caught:
                sendmail.send(subject, BODY, [self.address], down,
                              self.log_dir)
            self.assertIn('message queued as %s/' % self.queue,
                          str(caught.exception))
        names = message_files(self.queue)
        self.assertEqual(len(names), 2)
        self.assertTrue(all(NAME_RE.match(name) for name in names))

        # Still down: nothing lost, nothing raised.
        self.assertEqual(sendmail.flush_queue(down, self.log_dir), (0, 2))
        self.assertEqual(message_files(self.queue), names)

        up = dict(down, smtp=postfix.address)
        self.assertEqual(sendmail.flush_queue(up, self.log_dir), (2, 0))
        self.assertEqual(message_files(self.queue), [])
        messages = postfix.wait_for_mail(self.user, 2)
        self.assertEqual([m['Subject'] for m in messages],
                         ['first', 'second'])
        for message in messages:
            self.assertEqual(message['Return-Path'], '<%s>' % SENDER)
            self.assertEqual(message['To'], self.address)
            self.assertEqual(message.get_content(), BODY)
        self.assertEqual(sendmail.flush_queue(up, self.log_dir), (0, 0))

    def test_flush_into_spool(self):
        down = {'method': 'smtp', 'smtp': closed_port(self), 'from': SENDER}
        with self.assertRaises(sendmail.MailError):
            sendmail.send(SUBJECT, BODY, ['root'], down, self.log_dir)
        queued = message_files(self.queue)
        spool = os.path.join(self.tmp, 'spool')
        mail = {'method': 'spool', 'spool_dir': spool}
        self.assertEqual(sendmail.flush_queue(mail, self.log_dir), (1, 0))
        self.assertEqual(message_files(spool), queued)
        self.assertEqual(message_files(self.queue), [])
        self.assert_message(read_message(os.path.join(spool, queued[0])),
                            ['root'])


class SendmailProgramTest(MailTestCase):

    def test_sendmail_program_delivers_into_a_local_mailbox(self):
        # The real /usr/sbin/sendmail of Postfix, run by the command line
        # as cron runs it; MAIL_CONFIG points it at the private instance.
        postfix = self.real_mta()
        config = os.path.join(self.tmp, 'backup.ini')
        with open(config, 'w') as f:
            f.write('[server]\nlog_dir = %s\n\n[mail]\nmethod = sendmail\n'
                    'sendmail = %s\nfrom = %s\n'
                    % (self.log_dir, postfix.SENDMAIL, SENDER))
        env = support.isolated_env(os.path.join(self.tmp, 'home'))
        env.update(postfix.env())
        for body in (BODY, DOTS_BODY):
            result = subprocess.run(
                [sys.executable, os.path.join(ROOT, 'sendmail.py'), '-v',
                 '--config', config, SUBJECT, '-', self.address],
                input=body.encode('utf-8'), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=env, cwd=self.tmp, timeout=60)
            self.assertEqual(
                (result.returncode, result.stdout, result.stderr),
                (0, b'sent via sendmail %s\n' % postfix.SENDMAIL.encode(),
                 b''))
        messages = postfix.wait_for_mail(self.user, 2)
        # -i: the line with a single '.' did not end the message early.
        for message, body in zip(messages, (BODY, DOTS_BODY)):
            self.assert_message(message, [self.address], body)
            self.assertIn('Postfix, from userid %d' % os.getuid(),
                          message['Received'])
        self.assertFalse(os.path.exists(self.queue))

    def test_failing_sendmail_queues_then_flush(self):
        mail = {'method': 'sendmail', 'sendmail': self.fake_sendmail(1),
                'from': SENDER}
        with self.assertRaisesRegex(
                sendmail.MailError,
                r'exited with status 1: sendmail: local MTA is down; '
                r'message queued as '):
            sendmail.send(SUBJECT, BODY, ['root'], mail, self.log_dir)
        self.assertEqual(len(message_files(self.queue)), 1)

        mail['sendmail'] = self.fake_sendmail(0)
        self.assertEqual(sendmail.flush_queue(mail, self.log_dir), (1, 0))
        with open(os.path.join(self.tmp, 'argv')) as f:
            self.assertEqual(f.read().splitlines(), ['-i', '--', 'root'])
        self.assert_message(read_message(os.path.join(self.tmp, 'stdin')),
                            ['root'])

    def test_flush_stops_at_the_first_failure(self):
        mail = {'sendmail': self.fake_sendmail(1)}
        for _ in range(3):
            with self.assertRaises(sendmail.MailError):
                sendmail.send(SUBJECT, BODY, ['root'], mail, self.log_dir)
        os.unlink(os.path.join(self.tmp, 'calls'))
        self.assertEqual(sendmail.flush_queue(mail, self.log_dir), (0, 3))
        with open(os.path.join(self.tmp, 'calls')) as f:
            self.assertEqual(f.read(), 'called\n')
        self.assertEqual(len(message_files(self.queue)), 3)

    def test_concurrent_flush_leaves_the_queue_alone(self):
        with self.assertRaises(sendmail.MailError):
            sendmail.send(SUBJECT, BODY, ['root'],
                          {'sendmail': self.fake_sendmail(1)}, self.log_dir)
        mail = {'sendmail': self.fake_sendmail(0)}
        with open(os.path.join(self.queue, '.lock'), 'a') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.assertEqual(sendmail.flush_queue(mail, self.log_dir), (0, 1))
        self.assertEqual(sendmail.flush_queue(mail, self.log_dir), (1, 0))

    def test_missing_sendmail_queues(self):
        mail = {'sendmail': os.path.join(self.tmp, 'no-such-sendmail')}
        with self.assertRaisesRegex(sendmail.MailError,
                                    'cannot run .*; message queued as '):
            sendmail.send(SUBJECT, BODY, ['root'], mail, self.log_dir)
        self.assertEqual(len(message_files(self.queue)), 1)

    def test_queue_unwritable_says_so(self):
        log_dir = os.path.join(self.tmp, 'a-file')
        open(log_dir, 'w').close()
        mail = {'sendmail': self.fake_sendmail(1)}
        with self.assertRaisesRegex(sendmail.MailError,
                                    'could not queue the message either'):
            sendmail.send(SUBJECT, BODY, ['root'], mail, log_dir)


class RefusalTest(MailTestCase):

    def test_no_receivers(self):
        with self.assertRaisesRegex(sendmail.MailError, r'\Ano receivers\Z'):
            sendmail.send(SUBJECT, BODY, [], {'method': 'spool'},
                          self.log_dir)
        self.assertFalse(os.path.exists(self.log_dir))

    def test_receiver_cannot_be_an_option(self):
        mail = {'sendmail': self.fake_sendmail()}
        for bad in ('-oQ/tmp', 'a b@example.org', 'x@y\nBcc: z@w', ''):
            with self.assertRaises(sendmail.MailConfigError):
                sendmail.send(SUBJECT, BODY, [bad], mail, self.log_dir)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'argv')))
        self.assertFalse(os.path.exists(self.log_dir))

    def test_subject_cannot_inject_headers(self):
        sendmail.send('a\nBcc: evil@example.org', BODY, ['root'],
                      {'method': 'spool'}, self.log_dir)
        spool = os.path.join(self.log_dir, 'mail')
        message = read_message(os.path.join(spool, message_files(spool)[0]))
        self.assertEqual(message['Subject'], 'a Bcc: evil@example.org')
        self.assertIsNone(message['Bcc'])

    def test_bad_method_is_a_config_error_and_queued(self):
        with self.assertRaisesRegex(sendmail.MailConfigError,
                                    'method .*queued as'):
            sendmail.send(SUBJECT, BODY, ['root'], {'method': 'pigeon'},
                          self.log_dir)
        self.assertEqual(len(message_files(self.queue)), 1)

    def test_config_problems(self):
        self.assertEqual(sendmail.mail_config_problems({}), [])
        self.assertEqual(sendmail.mail_config_problems(
            {'method': 'smtp', 'smtp': '[::1]:2525', 'from': SENDER}), [])
        problems = sendmail.mail_config_problems(
            {'methd': 'smtp', 'smtp': 'host:99999', 'method': 'x'})
        self.assertEqual(len(problems), 3, problems)


class CommandLineTest(MailTestCase):

    def write_config(self, mail, log_section='client'):
        path = os.path.join(self.tmp, 'backup.ini')
        lines = ['[%s]' % log_section,
                 'log_dir = %s   ; comment' % self.log_dir, '', '[mail]']
        lines += ['%s = %s' % item for item in mail.items()]
        with open(path, 'w') as f:
            f.write('\n'.join(lines) + '\n')
        return path

    def write_body(self):
        path = os.path.join(self.tmp, 'body.txt')
        with open(path, 'w', encoding='utf-8') as f:
            f.write(BODY)
        return path

    def main(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = sendmail.main(list(argv))
        return status, out.getvalue(), err.getvalue()

    def assert_error(self, result, status, pattern):
        self.assertEqual(result[0], status, result)
        self.assertEqual(result[1], '')
        self.assertRegex(result[2], r'\Asendmail\.py: error: [^\n]*%s[^\n]*\n\Z'
                         % pattern)

    def test_spool_quietly(self):
        config = self.write_config({'method': 'spool', 'from': SENDER})
        # The seed passes all receivers as one argument.
        result = self.main('--config', config, SUBJECT, self.write_body(),
                           'root admin@example.org', 'b@example.org')
        self.assertEqual(result, (0, '', ''))
        spool = os.path.join(self.log_dir, 'mail')
        self.assert_message(
            read_message(os.path.join(spool, message_files(spool)[0])),
            ['root', 'admin@example.org', 'b@example.org'])

    def test_verbose_says_what_was_done(self):
        config = self.write_config({'method': 'spool'}, log_section='server')
        status, out, err = self.main('-v', '--config', config, 'subject',
                                     self.write_body(), 'root')
        self.assertEqual((status, err), (0, ''))
        self.assertRegex(out, r'\Aspooled to %s/mail/[^/]+\.eml\n\Z'
                         % re.escape(self.log_dir))

    def test_log_dir_defaults_to_the_config_directory(self):
        path = os.path.join(self.tmp, 'other.ini')
        with open(path, 'w') as f:
            f.write('[mail]\nmethod = spool\n')
        result = self.main('--config', path, 's', self.write_body(), 'root')
        self.assertEqual(result, (0, '', ''))
        self.assertEqual(len(message_files(os.path.join(self.tmp, 'mail'))), 1)

    def test_bad_usage_and_config(self):
        config = self.write_config({'method': 'spool'})
        body = self.write_body()
        self.assert_error(self.main('--config', config, 's',
                                    os.path.join(self.tmp, 'missing'), 'root'),
                          2, 'cannot read .*missing')
        self.assert_error(self.main('--config', config, 's', body), 2,
                          'no receivers')
        self.assert_error(self.main('--config', config), 2, 'SUBJECT FILE')
        self.assert_error(self.main('--config', config, '--flush', 's'), 2,
                          '--flush takes no other arguments')
        self.assert_error(self.main('--bogus'), 2, 'unrecognized')
        self.assert_error(self.main('--config', os.path.join(self.tmp, 'no.ini'),
                                    's', body, 'root'), 2, 'no.ini')
        for mail, pattern in (({'method': 'pigeon'}, 'method'),
                              ({'metod': 'spool'}, "unknown key 'metod'")):
            self.assert_error(self.main('--config', self.write_config(mail),
                                        's', body, 'root'), 2, pattern)
        self.assertFalse(os.path.exists(self.log_dir))

    def test_failure_then_flush(self):
        postfix = self.real_mta()
        down = self.write_config({'method': 'smtp', 'from': SENDER,
                                  'smtp': closed_port(self)})
        self.assert_error(self.main('--config', down, SUBJECT,
                                    self.write_body(), self.address),
                          1, 'queued as %s/' % re.escape(self.queue))
        status, out, err = self.main('--config', down, '--flush')
        self.assertEqual((status, out, err),
                         (1, '0 sent, 1 still queued in %s\n' % self.queue, ''))

        up = self.write_config({'method': 'smtp', 'smtp': postfix.address,
                                'from': SENDER})
        status, out, err = self.main('--config', up, '--flush')
        self.assertEqual((status, out, err),
                         (0, '1 sent, 0 still queued in %s\n' % self.queue, ''))
        [message] = postfix.wait_for_mail(self.user, 1)
        self.assertEqual(message['Subject'], SUBJECT)
        self.assertEqual(self.main('--config', up, '--flush'), (0, '', ''))

    def test_help(self):
        status, out, err = self.main('--help')
        self.assertEqual((status, err), (0, ''))
        for word in ('--flush', 'GITBACKUP_CONFIG', 'mail-queue', 'spool',
                     'exit status'):
            self.assertIn(word, out)

    def test_script_reads_stdin_and_config_from_environment(self):
        config = self.write_config({'method': 'spool', 'from': SENDER})
        env = support.isolated_env(os.path.join(self.tmp, 'home'))
        env['GITBACKUP_CONFIG'] = config
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, 'sendmail.py'), SUBJECT, '-',
             'root'], input=BODY.encode('utf-8'), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=env, cwd=self.tmp, timeout=30)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, b'', b''))
        spool = os.path.join(self.log_dir, 'mail')
        self.assert_message(
            read_message(os.path.join(spool, message_files(spool)[0])),
            ['root'])

    def test_import_does_nothing(self):
        env = support.isolated_env(os.path.join(self.tmp, 'home'))
        env['PYTHONPATH'] = ROOT
        result = subprocess.run(
            [sys.executable, '-B', '-c', 'import sendmail'], cwd=self.tmp,
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            timeout=30)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, b'', b''))
        self.assertEqual(os.listdir(self.tmp), ['home'])


if __name__ == '__main__':
    unittest.main()
