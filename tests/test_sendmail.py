"""Tests of sendmail.py: spool files, SMTP against a small real server on
127.0.0.1, the sendmail interface with stand-in programs, the mail queue,
and the command line called in-process (and once as a real process)."""

import contextlib
import email.parser
import email.policy
import fcntl
import io
import os
import re
import socket
import socketserver
import stat
import subprocess
import sys
import threading
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import sendmail  # noqa: E402
from tests import support  # noqa: E402

SENDER = 'backup@example.org'
SUBJECT = 'git gc: Prüfung 备份'
BODY = 'héllo wörld\n.\n.leading dot\n备份完成\n'
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


class SMTPHandler(socketserver.StreamRequestHandler):
    """Just enough SMTP: EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    def reply(self, line):
        self.wfile.write(line.encode('ascii') + b'\r\n')

    def handle(self):
        self.reply('220 127.0.0.1 test ESMTP')
        sender, receivers = None, []
        while True:
            line = self.rfile.readline()
            if not line:
                return
            command = line.decode('ascii', 'replace').strip()
            verb, argument = command[:4].upper(), command[5:]
            if verb in ('EHLO', 'HELO', 'RSET'):
                sender, receivers = None, []
                self.reply('250 OK')
            elif verb == 'MAIL':
                sender = re.search(r'<(.*?)>', argument).group(1)
                self.reply('250 OK')
            elif verb == 'RCPT':
                receivers.append(re.search(r'<(.*?)>', argument).group(1))
                self.reply('250 OK')
            elif verb == 'DATA':
                if sender is None or not receivers:
                    self.reply('503 need MAIL and RCPT first')
                    continue
                self.reply('354 end with <CRLF>.<CRLF>')
                lines = []
                while True:
                    line = self.rfile.readline()
                    if not line:
                        return
                    if line == b'.\r\n':
                        break
                    lines.append(line[1:] if line.startswith(b'.') else line)
                self.server.messages.append((sender, receivers, lines))
                sender, receivers = None, []
                self.reply('250 OK queued')
            elif verb == 'NOOP':
                self.reply('250 OK')
            elif verb == 'QUIT':
                self.reply('221 bye')
                return
            else:
                self.reply('502 not implemented')


class SMTPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(('127.0.0.1', 0), SMTPHandler)
        self.messages = []   # (envelope sender, receivers, DATA lines)
        self.address = '127.0.0.1:%d' % self.server_address[1]


def start_smtp_server(testcase):
    server = SMTPServer()
    thread = threading.Thread(target=server.serve_forever,
                              kwargs={'poll_interval': 0.05}, daemon=True)
    thread.start()
    testcase.addCleanup(server.server_close)
    testcase.addCleanup(server.shutdown)
    return server


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

    def assert_message(self, message, receivers):
        self.assertEqual(message['Subject'], SUBJECT)
        self.assertEqual(message['From'], SENDER)
        self.assertEqual([a.addr_spec for a in message['To'].addresses],
                         receivers)
        self.assertTrue(message['Date'])
        self.assertTrue(message['Message-ID'].endswith('@example.org>'))
        self.assertEqual(message['Auto-Submitted'], 'auto-generated')
        self.assertEqual(message.get_content(), BODY)


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

    def test_smtp_delivers(self):
        server = start_smtp_server(self)
        receivers = ['a@example.org', 'b@example.org']
        mail = {'method': 'smtp', 'smtp': server.address, 'from': SENDER}
        done = sendmail.send(SUBJECT, BODY, receivers, mail, self.log_dir)
        self.assertEqual(done, 'sent via smtp %s' % server.address)
        (sender, got_receivers, lines), = server.messages
        self.assertEqual(sender, SENDER)
        self.assertEqual(got_receivers, receivers)
        self.assertTrue(all(line.endswith(b'\r\n') for line in lines))
        self.assert_message(parse(b''.join(lines)), receivers)
        self.assertFalse(os.path.exists(self.queue))

    def test_failure_queues_and_flush_delivers_oldest_first(self):
        down = {'method': 'smtp', 'smtp': closed_port(self), 'from': SENDER}
        for subject in ('first', 'second'):
            with self.assertRaises(sendmail.MailError) as caught:
                sendmail.send(subject, BODY, ['a@example.org'], down,
                              self.log_dir)
            self.assertIn('message queued as %s/' % self.queue,
                          str(caught.exception))
        names = message_files(self.queue)
        self.assertEqual(len(names), 2)
        self.assertTrue(all(NAME_RE.match(name) for name in names))

        # Still down: nothing lost, nothing raised.
        self.assertEqual(sendmail.flush_queue(down, self.log_dir), (0, 2))
        self.assertEqual(message_files(self.queue), names)

        server = start_smtp_server(self)
        up = dict(down, smtp=server.address)
        self.assertEqual(sendmail.flush_queue(up, self.log_dir), (2, 0))
        self.assertEqual(message_files(self.queue), [])
        self.assertEqual([parse(b''.join(lines))['Subject']
                          for _, _, lines in server.messages],
                         ['first', 'second'])
        self.assertEqual(server.messages[0][:2], (SENDER, ['a@example.org']))
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

    def test_sendmail_gets_receivers_and_message(self):
        mail = {'sendmail': self.fake_sendmail(), 'from': SENDER}
        receivers = ['root', 'admin@example.org']
        done = sendmail.send(SUBJECT, BODY, receivers, mail, self.log_dir)
        self.assertEqual(done, 'sent via sendmail %s' % mail['sendmail'])
        with open(os.path.join(self.tmp, 'argv')) as f:
            self.assertEqual(f.read().splitlines(), ['-i', '--'] + receivers)
        self.assert_message(read_message(os.path.join(self.tmp, 'stdin')),
                            receivers)
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
        down = self.write_config({'method': 'smtp', 'from': SENDER,
                                  'smtp': closed_port(self)})
        self.assert_error(self.main('--config', down, SUBJECT,
                                    self.write_body(), 'root'),
                          1, 'queued as %s/' % re.escape(self.queue))
        status, out, err = self.main('--config', down, '--flush')
        self.assertEqual((status, out, err),
                         (1, '0 sent, 1 still queued in %s\n' % self.queue, ''))

        server = start_smtp_server(self)
        up = self.write_config({'method': 'smtp', 'smtp': server.address,
                                'from': SENDER})
        status, out, err = self.main('--config', up, '--flush')
        self.assertEqual((status, out, err),
                         (0, '1 sent, 0 still queued in %s\n' % self.queue, ''))
        self.assertEqual(len(server.messages), 1)
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
