#!/usr/bin/env python3
"""sendmail.py -- mail to the admins of a gitbackup client or node.

    sendmail.py [--config PATH] [-v | -q] SUBJECT FILE RECEIVER...
    sendmail.py [--config PATH] [-v | -q] --flush

The shared core (modules/_core.py) imports it and calls send() for
client.py and server.py; cron jobs (the monthly `git gc`, as the seed's
git_gc.sh did) run it to mail a log file.  It imports nothing of
gitbackup's own (the import goes one way only), so it can mail on a host
where the rest of the installation is broken, and it runs on Python 3.6+.

The [mail] section of the configuration chooses how mail leaves the host:

    sendmail  pipe the message into the local MTA's sendmail program
    smtp      plain SMTP to host:port (no TLS, no authentication)
    spool     write the message as an RFC 822 file into a directory, for
              hosts without an MTA (something else picks the files up)

Guarantees:
- A message is never silently lost. When sendmail or smtp delivery fails,
  the message is written into <log_dir>/mail-queue/ and the caller gets a
  MailError saying where it went. flush_queue() (`--flush`) re-delivers the
  queue later, oldest first, and deletes a file only after its delivery
  succeeded.
- Every file is written atomically (temporary name in the same directory,
  fsync, rename), so nobody ever reads half a message.
- The message is 7-bit clean (non-ASCII text is MIME-encoded) and carries
  From, To, Subject, Date, Message-ID and Auto-Submitted headers.
- Receivers are checked before anything is run, so a receiver can never be
  taken for a sendmail option; programs get argument lists, never a shell.
- Importing this module does nothing.
"""

import argparse
import configparser
import contextlib
import datetime
import email.message
import email.parser
import email.policy
import email.utils
import fcntl
import functools
import itertools
import os
import re
import smtplib
import socket
import subprocess
import sys
import tempfile

if sys.version_info < (3, 6):
    sys.exit('sendmail.py: Python 3.6 or later is required, this is %s'
             % sys.version.split()[0])

PROG = 'sendmail.py'
CONFIG_ENV = 'GITBACKUP_CONFIG'

METHODS = ('sendmail', 'smtp', 'spool')
MAIL_KEYS = ('method', 'sendmail', 'smtp', 'from', 'spool_dir')
DEFAULT_METHOD = 'sendmail'
DEFAULT_SENDMAIL = '/usr/sbin/sendmail'
DEFAULT_SMTP = 'localhost:25'
SMTP_PORT = 25
SMTP_TIMEOUT = 30          # seconds; cron must not hang on a dead relay
SENDMAIL_TIMEOUT = 60      # seconds; a local MTA that takes longer is stuck

QUEUE_SUBDIR = 'mail-queue'   # under log_dir: messages waiting for a retry
SPOOL_SUBDIR = 'mail'         # under log_dir: default for method = spool
MESSAGE_SUFFIX = '.eml'
FILE_MODE = 0o640          # mails carry logs: not for every local user

# Build messages 7-bit clean: a relay without 8BITMIME must not mangle them.
MESSAGE_POLICY = email.policy.default.clone(cte_type='7bit')

# A receiver is an ASCII addr-spec or a local user name: no white space,
# commas, quotes or angle brackets, and (checked separately) no leading '-'.
RECEIVER_RE = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(@[A-Za-z0-9.-]+|@\[[0-9A-Fa-f:.]+\])?")
SMTP_ADDRESS_RE = re.compile(
    r'(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9._-]+))'
    r'(?::(?P<port>[0-9]{1,5}))?')


class MailError(Exception):
    """Mail was not delivered; the message says what happened and where the
    mail went instead."""


class MailConfigError(MailError):
    """Bad usage, configuration or receivers (exit status 2)."""


# -- helpers ---------------------------------------------------------------

_file_counter = itertools.count()


def message_file_name():
    """A unique name that sorts by creation time (UTC, pid, counter)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return '%s-%d-%06d%s' % (now.strftime('%Y%m%dT%H%M%S.%fZ'), os.getpid(),
                             next(_file_counter), MESSAGE_SUFFIX)


def write_atomically(directory, name, data):
    """Write data to directory/name atomically: a temporary name starting
    with '.', which the queue readers skip; fsync; rename; fsync of the
    directory.  (modules/_core.py's atomic_write does the same for the
    scripts; this file imports nothing of theirs.)"""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def one_line(text):
    return ' '.join(str(text).split())


@functools.lru_cache(maxsize=None)
def local_fqdn():
    # getfqdn() may wait for DNS; ask once per process.
    return socket.getfqdn()


def sender_address(mail):
    return mail.get('from') or 'gitbackup@' + local_fqdn()


def queue_dir(log_dir):
    return os.path.join(log_dir, QUEUE_SUBDIR)


def spool_dir(mail, log_dir):
    return mail.get('spool_dir') or os.path.join(log_dir, SPOOL_SUBDIR)


def parse_smtp_address(value):
    """'host', 'host:port' or '[ipv6]:port' -> (host, port)."""
    match = SMTP_ADDRESS_RE.fullmatch(value.strip())
    port = int(match.group('port') or SMTP_PORT) if match else 0
    if not match or not 0 < port < 65536:
        raise MailConfigError('[mail] smtp must be host:port, not %r' % value)
    return match.group('ipv6') or match.group('host'), port


def mail_config_problems(mail):
    """What is wrong with a [mail] section, as a list of one-line messages
    (empty when it is fine). For `check` commands and the CLI."""
    problems = ['[mail] unknown key %r (known: %s)' % (key, ', '.join(MAIL_KEYS))
                for key in sorted(mail) if key not in MAIL_KEYS]
    method = mail.get('method') or DEFAULT_METHOD
    if method not in METHODS:
        problems.append('[mail] method must be one of %s, not %r'
                        % (', '.join(METHODS), method))
    try:
        parse_smtp_address(mail.get('smtp') or DEFAULT_SMTP)
    except MailConfigError as e:
        problems.append(str(e))
    return problems


def check_receivers(receivers):
    """Return the receivers as a list; refuse none or malformed ones."""
    receivers = list(receivers)
    if not receivers:
        raise MailConfigError('no receivers')
    for receiver in receivers:
        if receiver.startswith('-') or not RECEIVER_RE.fullmatch(receiver):
            raise MailConfigError('bad receiver address %r' % receiver)
    return receivers


def build_message(subject, body, receivers, sender):
    """The message as bytes with '\\n' line ends, ready for sendmail or a
    spool file."""
    message = email.message.EmailMessage(policy=MESSAGE_POLICY)
    message['From'] = sender
    message['To'] = ', '.join(receivers)
    message['Subject'] = one_line(subject)   # no header injection
    message['Date'] = email.utils.formatdate(localtime=True)
    domain = email.utils.parseaddr(sender)[1].rpartition('@')[2]
    message['Message-ID'] = email.utils.make_msgid(
        'gitbackup', domain=domain or local_fqdn())
    message['Auto-Submitted'] = 'auto-generated'   # RFC 3834: no autoreplies
    message.set_content(body)
    return message.as_bytes()


def envelope_of(data):
    """(sender, receivers) from the From and To headers of a stored message:
    the To header is the receiver list send() was given."""
    headers = email.parser.BytesParser().parsebytes(data, headersonly=True)
    sender = email.utils.parseaddr(headers.get('From', ''))[1]
    receivers = [address for _, address
                 in email.utils.getaddresses(headers.get_all('To', []))
                 if address]
    return sender, receivers


# -- delivery --------------------------------------------------------------

def deliver_by_sendmail(data, receivers, mail):
    program = mail.get('sendmail') or DEFAULT_SENDMAIL
    # -i: a line with a single '.' does not end the message.
    argv = [program, '-i', '--'] + receivers
    try:
        result = subprocess.run(argv, input=data, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE,
                                timeout=SENDMAIL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise MailError('%s did not finish within %d s'
                        % (program, SENDMAIL_TIMEOUT)) from None
    except OSError as e:
        raise MailError('cannot run %s: %s'
                        % (program, e.strerror or e)) from None
    if result.returncode != 0:
        output = (result.stderr or result.stdout).decode('utf-8', 'replace')
        lines = output.strip().splitlines()
        raise MailError('%s exited with status %d%s'
                        % (program, result.returncode,
                           ': ' + one_line(lines[-1]) if lines else ''))
    return 'sent via sendmail %s' % program


def deliver_by_smtp(data, sender, receivers, mail):
    address = mail.get('smtp') or DEFAULT_SMTP
    host, port = parse_smtp_address(address)
    # SMTP wants CRLF; smtplib does not convert bytes.
    data = data.replace(b'\r\n', b'\n').replace(b'\n', b'\r\n')
    try:
        with smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT,
                          local_hostname=local_fqdn()) as smtp:
            refused = smtp.sendmail(sender, receivers, data)
    except (smtplib.SMTPException, OSError) as e:
        raise MailError('smtp %s: %s' % (address, one_line(e) or
                                         type(e).__name__)) from None
    done = 'sent via smtp %s' % address
    if refused:   # some receivers got it: retrying would duplicate it
        done += ' (refused: %s)' % ', '.join(sorted(refused))
    return done


def deliver(data, sender, receivers, mail):
    """Hand a message to the MTA; raise MailError if it was not taken."""
    method = mail.get('method') or DEFAULT_METHOD
    if method == 'sendmail':
        return deliver_by_sendmail(data, receivers, mail)
    if method == 'smtp':
        return deliver_by_smtp(data, sender, receivers, mail)
    raise MailConfigError('[mail] method must be sendmail or smtp here, '
                          'not %r' % method)


# -- core ------------------------------------------------------------------

def send(subject, body, receivers, mail, log_dir):
    """Mail body to receivers; return what was done, in a few words.

    mail is the [mail] section as a dict. With method = spool the message
    is written into spool_dir. If sendmail or smtp fails, the message is
    queued under <log_dir>/mail-queue/ and MailError says where.
    """
    receivers = check_receivers(receivers)
    sender = sender_address(mail)
    data = build_message(subject, body, receivers, sender)
    if (mail.get('method') or DEFAULT_METHOD) == 'spool':
        directory = spool_dir(mail, log_dir)
        try:
            return 'spooled to %s' % write_atomically(
                directory, message_file_name(), data)
        except OSError as e:
            raise MailError('cannot spool mail into %s: %s'
                            % (directory, e)) from None
    try:
        return deliver(data, email.utils.parseaddr(sender)[1], receivers, mail)
    except MailError as e:
        # Keep the subclass: a config error stays a config error.
        try:
            path = write_atomically(queue_dir(log_dir), message_file_name(),
                                    data)
        except OSError as queue_error:
            raise type(e)('%s; could not queue the message either: %s'
                          % (e, queue_error)) from None
        queued = type(e)('%s; message queued as %s' % (e, path))
        queued.queued_as = path  # delivered later by flush_queue()
        raise queued from None


def queued_messages(directory):
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(name for name in names
                  if name.endswith(MESSAGE_SUFFIX) and not name.startswith('.'))


def flush_queue(mail, log_dir):
    """Re-deliver <log_dir>/mail-queue/, oldest first; return
    (sent, still_queued).

    Each file is deleted only after its delivery succeeded. The first failed
    delivery ends the flush (the MTA is probably down). A file without
    receivers stays where it is. With method = spool the files move into
    spool_dir. A concurrent flush returns (0, n) at once rather than send
    the same messages twice. Never raises for a delivery failure.
    """
    directory = queue_dir(log_dir)
    names = queued_messages(directory)
    if not names:
        return 0, 0
    spooling = (mail.get('method') or DEFAULT_METHOD) == 'spool'
    sent = 0
    with open(os.path.join(directory, '.lock'), 'a') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0, len(names)
        for name in queued_messages(directory):
            path = os.path.join(directory, name)
            try:
                with open(path, 'rb') as f:
                    data = f.read()
                if spooling:
                    write_atomically(spool_dir(mail, log_dir), name, data)
                else:
                    sender, receivers = envelope_of(data)
                    if not receivers:
                        continue
                    deliver(data, sender, receivers, mail)
                os.unlink(path)
            except FileNotFoundError:
                continue
            except (MailError, OSError):
                break
            sent += 1
    return sent, len(queued_messages(directory))


# -- command line ----------------------------------------------------------

HELP_EPILOG = """\
FILE is the path of the message body; '-' reads it from stdin. Each
RECEIVER may hold several addresses separated by spaces or commas (the
seed's git_gc.sh passes them as one argument).

configuration: --config PATH, else $GITBACKUP_CONFIG, else backup.ini next
to this script (defaults if that does not exist). Only [mail] and log_dir
(from [client], else [server]; default: the config file's directory) are
read:
  [mail]
  method    = sendmail      ; sendmail | smtp | spool
  sendmail  = /usr/sbin/sendmail
  smtp      = localhost:25  ; plain SMTP, no TLS or auth, 30 s timeout
  from      = backup@host   ; default gitbackup@<fqdn>
  spool_dir = DIR           ; method = spool; default <log_dir>/mail

If sendmail or smtp fails, the message is kept in <log_dir>/mail-queue/;
`sendmail.py --flush` (e.g. from cron) re-delivers it, oldest first.

Quiet on success (cron-safe); errors are one line on stderr.  Python 3.6
or later; needs nothing else of gitbackup (modules/ imports it, not the
other way round).
exit status: 0 delivered (or spooled), 1 delivery failed (message queued;
with --flush: messages still queued), 2 bad usage or configuration.
"""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise MailConfigError(message)


def build_parser():
    parser = ArgumentParser(
        prog=PROG, epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Mail a file to the gitbackup admins, or re-deliver '
                    'the queue of mails that could not be sent.')
    parser.add_argument('--config', metavar='PATH',
                        help='configuration file (see below)')
    parser.add_argument('--flush', action='store_true',
                        help='re-deliver <log_dir>/mail-queue/ and print '
                             'how many were sent and are still queued; '
                             'no other arguments')
    parser.add_argument('-v', '--verbose', action='store_true',
                        help='say on stdout what was done')
    parser.add_argument('-q', '--quiet', action='store_true',
                        help='print nothing but errors')
    parser.add_argument('subject', nargs='?', metavar='SUBJECT')
    parser.add_argument('file', nargs='?', metavar='FILE')
    parser.add_argument('receivers', nargs='*', metavar='RECEIVER')
    return parser


def find_config(path, environ):
    """(path, must_exist): the lookup order of every gitbackup command
    (modules/_core.py's find_config): --config PATH, else
    $GITBACKUP_CONFIG, else backup.ini beside this script; only a file
    named by --config or $GITBACKUP_CONFIG must exist."""
    named = path or environ.get(CONFIG_ENV)
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          'backup.ini')
    return named or beside, bool(named)


def load_config(path, must_exist):
    """(mail section as a dict, log_dir)."""
    if not must_exist and not os.path.exists(path):
        return {}, os.getcwd()
    parser = configparser.ConfigParser(interpolation=None,
                                       inline_comment_prefixes=(';',))
    parser.optionxform = str
    try:
        with open(path, encoding='utf-8') as f:
            parser.read_file(f)
    except OSError as e:
        raise MailConfigError('cannot read config %s: %s'
                              % (path, e.strerror or e)) from None
    except (configparser.Error, UnicodeDecodeError) as e:
        raise MailConfigError('bad config %s: %s'
                              % (path, one_line(e))) from None
    mail = dict(parser['mail']) if parser.has_section('mail') else {}
    for section in ('client', 'server'):
        if parser.has_option(section, 'log_dir'):
            return mail, parser.get(section, 'log_dir')
    return mail, os.path.dirname(os.path.abspath(path))


def read_body(path):
    try:
        if path == '-':
            data = sys.stdin.buffer.read()
        else:
            with open(path, 'rb') as f:
                data = f.read()
    except OSError as e:
        raise MailConfigError('cannot read %s: %s'
                              % (path, e.strerror or e)) from None
    # A log may hold any bytes; a mail about it must still go out.
    return data.decode('utf-8', 'replace')


def main(argv):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:   # --help
        return e.code if isinstance(e.code, int) else 0
    except MailConfigError as e:
        print('%s: error: %s' % (PROG, one_line(e)), file=sys.stderr)
        return 2
    try:
        mail, log_dir = load_config(*find_config(args.config, os.environ))
        problems = mail_config_problems(mail)
        if problems:
            raise MailConfigError('; '.join(problems))
        if args.flush:
            if args.subject is not None:
                raise MailConfigError('--flush takes no other arguments')
            sent, still_queued = flush_queue(mail, log_dir)
            if args.verbose or ((sent or still_queued) and not args.quiet):
                print('%d sent, %d still queued in %s'
                      % (sent, still_queued, queue_dir(log_dir)))
            return 1 if still_queued else 0
        if args.file is None:
            raise MailConfigError('need SUBJECT FILE RECEIVER... '
                                  '(or --flush)')
        receivers = [receiver for argument in args.receivers
                     for receiver in re.split(r'[\s,]+', argument) if receiver]
        body = read_body(args.file)
        done = send(args.subject, body, receivers, mail, log_dir)
        if args.verbose:
            print(done)
        return 0
    except MailConfigError as e:
        print('%s: error: %s' % (PROG, one_line(e)), file=sys.stderr)
        return 2
    except MailError as e:
        print('%s: error: %s' % (PROG, one_line(e)), file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
