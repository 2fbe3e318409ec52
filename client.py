#!/usr/bin/env python3
"""gitbackup client: record backup requests, prepare the data, push requests.

A client host records *backup requests* (``commit <module> <path> [node]``)
in one request pool per backup node.  Every five minutes cron runs ``send``:
each pending request is handed to its backup module, which prepares data
(a tar archive or a database dump in ``export_dir``, nothing for a git
repository that git daemon already exports) and emits *server requests*.
Those are committed as ``RQ*`` files into a per-node git repository and
pushed to the client's own repository on the node.  The node then pulls the
data itself; it never trusts what a client sends.

Guarantees:

* A request file changes state only by ``rename(2)``: ``i*`` being written,
  ``C*`` complete, ``P*`` being processed, ``F*`` finished (pushed), ``X*``
  failed after ``max_attempts`` (kept, admins mailed).
* A request becomes ``F*`` only after the push that carries it succeeded.
  A failed push keeps every request; the next ``send`` pushes all local
  commits at once.  A crash between preparing and pushing is recovered from
  the queue repository's history, so nothing is sent twice or lost.
* Prepared data is streamed to disk and hashed in chunks: memory stays flat
  whatever the size of a backup.
* A second concurrent ``send`` exits 0 at once (cron-safe).

This file also holds the plumbing that server.py reuses (configuration,
``run()``, locks, logging, atomic writes, module loading): install both
scripts, ``sendmail.py`` and ``modules/`` together, as one directory.
"""

import argparse
import configparser
import datetime
import errno
import fcntl
import glob
import hashlib
import importlib.util
import itertools
import json
import logging
import logging.handlers
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import sendmail  # noqa: E402  (lives next to this script)

VERSION = '0.1'
MIN_PYTHON = (3, 9)
MIN_GIT = (2, 20)

log = logging.getLogger('gitbackup')

# Names that end up in file names and repository names on both sides.
NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$')
MODULE_RE = re.compile(r'^[A-Za-z][A-Za-z0-9_-]{0,63}$')
REQUEST_ID = r'[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9]+-[0-9]+'
REQUEST_ID_RE = re.compile(f'^{REQUEST_ID}$')
TIMESTAMP_FORMAT = '%Y%m%dT%H%M%SZ'
CHUNK = 1 << 20

# Client pool states (file name prefixes).
INCOMPLETE, COMPLETE, PROCESSING, FINISHED, FAILED = 'i', 'C', 'P', 'F', 'X'
CLIENT_STATES = (INCOMPLETE, COMPLETE, PROCESSING, FINISHED, FAILED)

REQUIRED = object()
ZERO_ID = '0' * 40

# tar's options and file suffix for each [client] compression.
COMPRESSION = {
    'gzip': (['--gzip'], '.tar.gz'),
    'xz': (['--xz'], '.tar.xz'),
    'zstd': (['--zstd'], '.tar.zst'),
    'bzip2': (['--bzip2'], '.tar.bz2'),
    'none': ([], '.tar'),
}

# The one configuration file, shared by client and node.  Keys not listed
# here are errors: a typo must never pass silently.  Sections whose keys are
# names (nodes, modules, sources) are free-form and validated by name.
SCHEMA = {
    'client': {
        'name': REQUIRED,
        'default_node': '',
        'request_dir': REQUIRED,
        'queue_dir': REQUIRED,
        'export_dir': REQUIRED,
        'sftp_export': '',
        'git_export': '',
        'git_base': '',
        'log_dir': REQUIRED,
        'admin': '',
        'ssh_command': 'ssh -o BatchMode=yes',
        'modules_dir': '',
        'compression': 'gzip',
        'tar_command': 'tar',
        'pg_dump': 'pg_dump',
        'pg_dumpall': 'pg_dumpall',
        'psql': 'psql',
        'pg_host': '',
        'pg_port': '',
        'pg_user': '',
        'export_keep': '7d',
        'keep_requests': '30d',
        'max_attempts': '5',
        'max_batch': '500',
        'alert_after': '1h',
        'confirm_after': '1d',
        'command_timeout': '6h',
    },
    'server': {
        'name': REQUIRED,
        'todo_dir': REQUIRED,
        'data_dir': REQUIRED,
        'log_dir': REQUIRED,
        'repositories': REQUIRED,
        'admin': '',
        'sftp_user': 'adminbackup',
        'sftp_root': '',
        'ssh_command': 'ssh -o BatchMode=yes',
        'modules_dir': '',
        'git_protocols': 'git ssh https',
        'max_attempts': '5',
        'alert_after': '1h',
        'stale_after': '2d',
        'keep_daily': '7',
        'keep_weekly': '4',
        'keep_monthly': '12',
        'keep_requests': '90d',
        'quota': '0',
        'free_space_floor': '1G',
        'max_request_size': '4096',
        'max_requests_per_push': '1000',
        'max_push_size': '64M',
        'command_timeout': '6h',
    },
    'client *': {
        'sftp': '',
        'sftp_port': '',
        'sftp_root': '',
        'git': '',
        'stale_after': '',
        'keep_daily': '',
        'keep_weekly': '',
        'keep_monthly': '',
        'quota': '',
        'expect': '',
        'admin': '',
    },
    'mail': {
        'method': 'sendmail',
        'sendmail': '/usr/sbin/sendmail',
        'smtp': 'localhost:25',
        'from': '',
        'spool_dir': '',
    },
}
FREE_SECTIONS = ('nodes', 'modules', 'sources')
# Typed keys, checked when the file is read (so a typo in a value is an
# error naming its line, like a typo in a key).
DURATION_KEYS = {'export_keep', 'alert_after', 'confirm_after',
                 'command_timeout', 'keep_requests', 'stale_after'}
SIZE_KEYS = {'quota', 'free_space_floor', 'max_push_size'}
INT_KEYS = {'max_attempts', 'max_batch', 'max_request_size',
            'max_requests_per_push', 'sftp_port', 'keep_daily',
            'keep_weekly', 'keep_monthly'}


# --------------------------------------------------------------------------
# Exceptions

class GitBackupError(Exception):
    """Base of all errors a user should see as one clear line."""
    exit_code = 1


class ConfigError(GitBackupError):
    """The configuration file is missing, unreadable or wrong."""
    exit_code = 2


class UsageError(GitBackupError):
    """The command line asks for something impossible."""
    exit_code = 2


class CommandFailed(GitBackupError):
    """An external program failed; the message quotes it and its stderr."""

    def __init__(self, args, returncode, stderr='', cwd=None):
        self.args_list = list(args)
        self.returncode = returncode
        self.stderr = stderr or ''
        where = f' (in {cwd})' if cwd else ''
        lines = [f'{shlex.join(self.args_list)}{where} exited with {returncode}']
        lines += ['    ' + line for line in self.stderr.strip().splitlines()[-20:]]
        super().__init__('\n'.join(lines))


class ToolMissing(GitBackupError):
    """A required external program is not installed."""


class ModuleError(GitBackupError):
    """A backup module failed for one request."""


class Problem(str):
    """One error of a run, as text.  ``mail=False`` for problems that a
    Health record already reports once (a peer that is down) or that are
    retried silently until they give up: the admins hear of those once,
    not every five minutes."""

    def __new__(cls, text, mail=True):
        self = super().__new__(cls, text)
        self.mail = mail
        return self


def problem(text, mail=True):
    """Log one problem of a run and return it.  A problem not worth a mail
    now (a Health record tells the admins once; a retry that may still
    succeed) is logged at info level: under cron with -q it prints nothing,
    so cron does not mail every five minutes either."""
    log.log(logging.ERROR if mail else logging.INFO, '%s', text)
    return Problem(text, mail)


def mail_summary(config, section, subject, problems):
    """Mail the problems worth a mail, if any."""
    worth = [p for p in problems if getattr(p, 'mail', True)]
    if worth:
        mail_admins(config, section, subject.format(n=len(worth)),
                    '\n\n'.join(worth) + '\n')


# --------------------------------------------------------------------------
# Helpers

def run(args, *, cwd=None, env=None, input=None, check=True, timeout=None,
        stdout=subprocess.PIPE, text=True):
    """Run a program (argument list, never a shell) and return the result.

    On failure raise CommandFailed quoting the command, cwd, exit status and
    stderr; a program that is not installed raises ToolMissing.
    """
    log.debug('running: %s', shlex.join(args))
    kwargs = {'encoding': 'utf-8', 'errors': 'surrogateescape'} if text else {}
    try:
        proc = subprocess.run(args, cwd=cwd, env=env, input=input,
                              stdout=stdout, stderr=subprocess.PIPE,
                              timeout=timeout, **kwargs)
    except FileNotFoundError:
        raise ToolMissing(f'{args[0]}: not installed or not in PATH') from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(args, 'timeout', f'no result after {timeout} s',
                            cwd) from None
    if check and proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode('utf-8', 'replace')
        raise CommandFailed(args, proc.returncode, err, cwd)
    return proc


def git(git_dir, *args, **kwargs):
    """Run git on one repository (argument list, git's own environment)."""
    return run(['git', f'--git-dir={git_dir}', *args], **kwargs)


def git_identity_env(name, email):
    """The environment for a commit made by gitbackup itself."""
    return {**os.environ, 'GIT_AUTHOR_NAME': name, 'GIT_AUTHOR_EMAIL': email,
            'GIT_COMMITTER_NAME': name, 'GIT_COMMITTER_EMAIL': email}


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc)


def timestamp(when=None):
    """UTC time as YYYYmmddTHHMMSSZ: sortable, safe in file names."""
    return (when or utcnow()).strftime(TIMESTAMP_FORMAT)


def isotime(when=None):
    return (when or utcnow()).strftime('%Y-%m-%dT%H:%M:%SZ')


_id_counter = itertools.count(1)


def new_request_id():
    """A unique, sortable id: UTC time with microseconds, pid, counter."""
    now = utcnow()
    return '%s.%06dZ-%d-%04d' % (now.strftime('%Y%m%dT%H%M%S'),
                                 now.microsecond, os.getpid(),
                                 next(_id_counter))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path, data, mode=0o644):
    """Write a file under a temporary name, fsync it, rename it in place."""
    directory = os.path.dirname(os.path.abspath(path))
    if isinstance(data, str):
        data = data.encode('utf-8')
    fd, tmp = tempfile.mkstemp(prefix='.tmp-', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def read_json(path, default=None):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except ValueError as e:
        log.warning('%s: unreadable state file, ignoring it: %s', path, e)
        return default


def write_json(path, value):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True) + '\n')


def sha256_file(path):
    """(sha256 hex, size) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, 'rb') as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def tree_size(path):
    """Bytes in the files below path (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def parse_duration(text):
    """'90', '30m', '12h', '7d', '2w' -> seconds."""
    m = re.fullmatch(r'\s*(\d+)\s*([smhdw]?)\s*', text or '')
    if not m:
        raise ValueError(f'not a duration: {text!r} (use e.g. 30m, 12h, 7d)')
    unit = {'': 1, 's': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 604800}
    return int(m.group(1)) * unit[m.group(2)]


def parse_size(text):
    """'0', '512M', '10G', '1T' -> bytes."""
    m = re.fullmatch(r'\s*(\d+)\s*([KMGT]?)B?\s*', text or '', re.I)
    if not m:
        raise ValueError(f'not a size: {text!r} (use e.g. 500M, 10G)')
    return int(m.group(1)) * 1024 ** ' KMGT'.index(m.group(2).upper() or ' ')


def human_size(n):
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
        if n < 1024 or unit == 'TiB':
            return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
        n /= 1024


def clean_text(text, limit=300):
    """Make untrusted text safe for one log line: no control characters."""
    text = ''.join(c if c.isprintable() else '?' for c in str(text))
    return text if len(text) <= limit else text[:limit] + '...'


def pause_point(name):
    """Fault-injection hook for the crash tests: when $GITBACKUP_PAUSE_AT
    names this point (comma-separated list), stop here until killed, or
    for $GITBACKUP_PAUSE_SECONDS and then go on."""
    if name in os.environ.get('GITBACKUP_PAUSE_AT', '').split(','):
        log.warning('pausing at %s (GITBACKUP_PAUSE_AT)', name)
        seconds = float(os.environ.get('GITBACKUP_PAUSE_SECONDS') or 'inf')
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


class Lock:
    """An flock(2) lock file.  The kernel drops it when its holder dies, so a
    lock can never go stale; the file holds the pid for the humans."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self, wait=0.0):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f'{os.getpid()}\n'.encode())
        self.fd = fd
        return True

    def holder(self):
        try:
            with open(self.path) as f:
                return f.read().strip() or '?'
        except OSError:
            return '?'

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# --------------------------------------------------------------------------
# Configuration

def find_config(path=None, script=__file__):
    """--config PATH, else $GITBACKUP_CONFIG, else backup.ini by the script."""
    if path:
        return path
    if os.environ.get('GITBACKUP_CONFIG'):
        return os.environ['GITBACKUP_CONFIG']
    return os.path.join(os.path.dirname(os.path.abspath(script)), 'backup.ini')


def _line_numbers(path):
    """{(section, key): line} so errors can name the line."""
    where, section = {}, None
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            stripped = line.strip()
            if stripped.startswith('[') and ']' in stripped:
                section = stripped[1:stripped.index(']')].strip()
                where.setdefault((section, None), number)
            elif section and stripped and stripped[0] not in '#;' \
                    and not line[0].isspace() and ('=' in line or ':' in line):
                key = re.split(r'[=:]', stripped, 1)[0].strip()
                where.setdefault((section, key), number)
    return where


class Config:
    """The parsed and validated INI file.  ``section(name)`` returns a dict of
    strings with the schema's defaults filled in."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        parser = configparser.ConfigParser(
            interpolation=None, inline_comment_prefixes=(';',),
            comment_prefixes=('#', ';'), empty_lines_in_values=False,
            default_section='\x00none')
        parser.optionxform = str
        try:
            with open(path, encoding='utf-8') as f:
                parser.read_file(f)
        except FileNotFoundError:
            raise ConfigError(f'{path}: configuration file not found (use '
                              '--config PATH or $GITBACKUP_CONFIG; see '
                              'conf.example.ini)') from None
        except (OSError, UnicodeError) as e:
            raise ConfigError(f'{path}: cannot read: {e}') from None
        except configparser.Error as e:
            raise ConfigError(f'{path}: {clean_text(e)}') from None
        self.parser = parser
        lines = _line_numbers(path)
        for section in parser.sections():
            schema = self._schema_of(section)
            if schema is None and section not in FREE_SECTIONS:
                raise ConfigError(
                    f'{path}:{lines.get((section, None), "?")}: unknown '
                    f'section [{section}]')
            for key in parser[section]:
                at = f'{path}:{lines.get((section, key), "?")}'
                if schema is not None and key not in schema:
                    raise ConfigError(
                        f'{at}: unknown key {key!r} in [{section}] (known: '
                        f'{", ".join(sorted(schema))})')
                if schema is None and not NAME_RE.match(key):
                    raise ConfigError(f'{at}: bad name {key!r} in [{section}]')
            for key, value in parser[section].items():
                if schema is None or not value:
                    continue
                try:
                    if key in DURATION_KEYS:
                        parse_duration(value)
                    elif key in SIZE_KEYS:
                        parse_size(value)
                    elif key in INT_KEYS and not re.fullmatch(r'\d+', value):
                        raise ValueError(f'not a whole number: {value!r}')
                except ValueError as e:
                    raise ConfigError(f'{path}:{lines.get((section, key), "?")}'
                                      f': [{section}] {key}: {e}') from None
            if schema is not None:
                missing = [k for k, v in schema.items()
                           if v is REQUIRED and not parser[section].get(k)]
                if missing:
                    raise ConfigError(
                        f'{path}:{lines.get((section, None), "?")}: '
                        f'[{section}] lacks {", ".join(missing)}')
            admins = parser[section].get('admin', '').split() \
                if schema is not None and 'admin' in schema else []
            try:
                if admins:
                    sendmail.check_receivers(admins)
            except sendmail.MailError as e:
                # A bad address would silently swallow every alert.
                raise ConfigError(f'{path}:{lines.get((section, "admin"), "?")}'
                                  f': [{section}] admin: {e}') from None
        if parser.has_section('mail'):
            problems = sendmail.mail_config_problems(dict(parser['mail']))
            if problems:
                raise ConfigError(f'{path}: {problems[0]}')

    @staticmethod
    def _schema_of(section):
        if section in SCHEMA:
            return SCHEMA[section]
        if section.startswith('client '):
            return SCHEMA['client *']
        return None

    def has(self, section):
        return self.parser.has_section(section)

    def section(self, name):
        schema = self._schema_of(name) or {}
        values = {k: v for k, v in schema.items() if v is not REQUIRED}
        if self.parser.has_section(name):
            values.update(self.parser[name])
        return values

    def names(self, section):
        """The keys of a free-form section, in file order."""
        if not self.parser.has_section(section):
            return {}
        return dict(self.parser[section])

    def client_sections(self):
        return [s[len('client '):].strip() for s in self.parser.sections()
                if s.startswith('client ')]

    def require(self, section):
        if not self.has(section):
            raise ConfigError(f'{self.path}: no [{section}] section')
        return self.section(section)

    def get_duration(self, section, key, default=None):
        value = self.section(section).get(key) or default
        try:
            return parse_duration(value)
        except ValueError as e:
            raise ConfigError(f'{self.path}: [{section}] {key}: {e}') from None

    def get_size(self, section, key, default=None):
        value = self.section(section).get(key) or default
        try:
            return parse_size(value)
        except ValueError as e:
            raise ConfigError(f'{self.path}: [{section}] {key}: {e}') from None

    def get_int(self, section, key, default=None):
        value = self.section(section).get(key) or default
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f'{self.path}: [{section}] {key}: not a '
                              f'number: {value!r}') from None

    def admins(self, section):
        return self.section(section).get('admin', '').split()

    def modules_dir(self, section):
        return self.section(section).get('modules_dir') or \
            os.path.join(HERE, 'modules')


# --------------------------------------------------------------------------
# Logging and mail

def setup_logging(log_dir, program, verbose=0, quiet=False, create=True,
                  log_name=None):
    """Log to stderr (for humans and cron) and to log_dir/<log_name>
    (default <program>.log)."""
    log.handlers[:] = []
    log.setLevel(logging.DEBUG)
    log.propagate = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING if quiet else
                     logging.DEBUG if verbose else logging.INFO)
    handler.setFormatter(logging.Formatter(f'{program}: %(message)s'))
    log.addHandler(handler)
    if log_dir and (create or os.path.isdir(log_dir)):
        try:
            os.makedirs(log_dir, exist_ok=True)
            handler = logging.FileHandler(
                os.path.join(log_dir, log_name or f'{program}.log'),
                encoding='utf-8')
        except OSError as e:
            log.warning('cannot write the log file in %s: %s', log_dir, e)
        else:
            handler.setLevel(logging.DEBUG if verbose else logging.INFO)
            handler.setFormatter(logging.Formatter(
                '%(asctime)s [%(process)d] %(levelname)s %(message)s'))
            log.addHandler(handler)


def mail_admins(config, section, subject, body):
    """Mail the admins of a section; a failed delivery is queued by
    sendmail.py and logged, never raised: mail must not stop a backup."""
    admins = config.admins(section)
    if not admins:
        log.info('no admin configured in [%s]; not mailing: %s', section,
                 subject)
        return False
    try:
        how = sendmail.send(subject, body, admins, config.section('mail'),
                            config.section(section)['log_dir'])
        log.info('mailed %s: %s (%s)', ' '.join(admins), subject, how)
        return True
    except sendmail.MailError as e:
        log.error('mail to admins failed: %s', e)
        # A queued message counts as told: every run retries the queue.
        return bool(getattr(e, 'queued_as', None))


def flush_mail_queue(config, section):
    try:
        sent, left = sendmail.flush_queue(config.section('mail'),
                                          config.section(section)['log_dir'])
    except Exception as e:  # a broken queue must not stop backups
        log.error('retrying queued mail failed: %s', e)
        return
    if sent or left:
        log.info('queued mail: %d sent, %d still queued', sent, left)


class Health:
    """Up/down state of one peer, with one mail when it has been failing
    longer than alert_after and one when it recovers (no mail storms)."""

    def __init__(self, path, config, section, what):
        self.path, self.config, self.section, self.what = \
            path, config, section, what
        self.state = read_json(path, {}) or {}

    def ok(self, detail=''):
        now = isotime()
        alerted = self.state.get('alerted')
        self.state.update(last_success=now, first_failure=None,
                          last_error=None, alerted=False, failures=0)
        if detail:
            self.state['last_detail'] = detail
        write_json(self.path, self.state)
        if alerted:
            mail_admins(self.config, self.section,
                        f'gitbackup: {self.what} recovered',
                        f'{self.what} works again at {now}.\n')

    def failed(self, error, alert_after):
        now = utcnow()
        first = self.state.get('first_failure') or isotime(now)
        self.state.update(first_failure=first,
                          last_error=clean_text(
                              str(error).replace('\n', ' | '), 2000),
                          last_failure=isotime(now),
                          failures=self.state.get('failures', 0) + 1)
        since = datetime.datetime.strptime(first, '%Y-%m-%dT%H:%M:%SZ') \
            .replace(tzinfo=datetime.timezone.utc)
        if not self.state.get('alerted') and \
                (now - since).total_seconds() >= alert_after:
            sent = mail_admins(
                self.config, self.section, f'gitbackup: {self.what} failing',
                f'{self.what} has been failing since {first}.\n\n'
                f'Last error:\n{error}\n\nNothing is lost: the work is '
                'retried on every run, and you get one mail when it '
                'recovers.\n')
            self.state['alerted'] = sent or self.state.get('alerted', False)
        write_json(self.path, self.state)


# --------------------------------------------------------------------------
# Backup modules

class BackupModule:
    """A module file in modules/: a Python file (functions ``prepare`` for
    the client, ``handle`` for the node, optional ``check_path``) or an
    executable (any language: ``$1`` module, ``$2`` path, server requests
    as ``ID CONTENT`` lines on stdout)."""

    def __init__(self, name, path, python=None):
        self.name, self.path, self.python = name, path, python

    def has(self, function):
        return self.python is not None and hasattr(self.python, function)


def load_module(modules_dir, name):
    if not MODULE_RE.match(name or ''):
        raise ModuleError(f'bad module name {clean_text(name)!r}')
    py = os.path.join(modules_dir, name + '.py')
    if os.path.isfile(py):
        spec = importlib.util.spec_from_file_location(
            f'gitbackup_modules.{name}', py)
        code = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(code)
        except Exception as e:
            raise ModuleError(f'module {name} ({py}) does not load: {e}') \
                from None
        return BackupModule(name, py, code)
    exe = os.path.join(modules_dir, name)
    if os.path.isfile(exe) and os.access(exe, os.X_OK):
        return BackupModule(name, exe)
    raise ModuleError(f'no backup module {name!r} in {modules_dir}')


# --------------------------------------------------------------------------
# The client

SERVER_REQUEST_RE = re.compile(r'^[a-z][a-z0-9_-]{0,31} [^\x00-\x1f\x7f]{1,3000}$')


def request_id_of(key):
    """'<commit>-RQ<request id>-<ident>' -> request id, or None."""
    m = re.match(f'^[0-9a-f]{{40}}-RQ({REQUEST_ID})-', key)
    return m.group(1) if m else None


class PrepareContext:
    """What a backup module sees while it prepares one request."""

    def __init__(self, client, node, request_id, module):
        self.client = client
        self.node = node
        self.config = client.config
        self.settings = client.settings
        self.request_id = request_id
        self.problems = []
        self.module = module
        self.timestamp = timestamp()
        self.log = log
        self.run = run
        self.ModuleError = ModuleError
        self.timeout = client.config.get_duration('client', 'command_timeout')

    @property
    def export_root(self):
        return os.path.join(self.settings['export_dir'], self.request_id)

    def export_path(self, filename):
        """A path in this request's own directory of export_dir."""
        if not NAME_RE.match(filename):
            raise ModuleError(f'bad export file name {filename!r}')
        os.makedirs(self.export_root, mode=0o750, exist_ok=True)
        return os.path.join(self.export_root, filename)

    def stream_command_to_file(self, args, path, env=None):
        """Run a command whose stdout is the backup straight into path.part
        (never through Python's memory); publish() gives it its name only
        when complete.  A command still running after command_timeout is
        killed.  Returns (exit status, stderr text)."""
        tmp = path + '.part'
        with open(tmp, 'wb') as out, tempfile.TemporaryFile() as err:
            log.debug('running: %s > %s', shlex.join(args), tmp)
            try:
                proc = subprocess.Popen(args, stdout=out, stderr=err, env=env,
                                        stdin=subprocess.DEVNULL)
            except FileNotFoundError:
                raise ToolMissing(f'{args[0]}: not installed or not in PATH') \
                    from None
            try:
                status = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise ModuleError(f'{shlex.join(args)}: still running after '
                                  f'{self.timeout} s ([client] '
                                  'command_timeout); killed') from None
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            os.fsync(out.fileno())
            err.seek(0)
            stderr = err.read().decode('utf-8', 'replace')
        return status, stderr

    def request_separately(self, module, path, error):
        """One part of this request failed (one database of `all`): record
        that part as a request of its own, so it is retried, counted and
        given up on by itself while the rest of this request goes on."""
        request_id = self.client.commit(module, path, self.node)
        self.problems.append(f'request {self.request_id}: {module} {path} '
                             f'failed and was requested again on its own as '
                             f'{request_id}: {error}')

    @property
    def compression(self):
        """(tar options, file suffix) for [client] compression."""
        name = self.settings['compression']
        if name not in COMPRESSION:
            raise ModuleError(f'[client] compression = {name}: use one of '
                              f'{", ".join(COMPRESSION)}')
        return COMPRESSION[name]

    def publish(self, path):
        """Move a finished .part file into place (atomic rename)."""
        os.rename(path + '.part', path)
        fsync_dir(os.path.dirname(path))

    def sftp_request(self, path, source):
        """The server request that lets a node fetch one exported file."""
        sftp_export = self.settings.get('sftp_export')
        if not sftp_export:
            raise ModuleError('[client] sftp_export is not set: nodes cannot '
                              'fetch prepared files')
        digest, size = sha256_file(path)
        return (f'sftp {self.timestamp} {sftp_export}:{path} sha256={digest} '
                f'size={size} source={source}')


class Client:
    def __init__(self, config):
        self.config = config
        self.settings = config.require('client')
        self.name = self.settings['name']
        if not NAME_RE.match(self.name):
            raise ConfigError(f'[client] name {self.name!r} is not a valid '
                              'name ([A-Za-z0-9][A-Za-z0-9._-]*)')
        self.nodes = config.names('nodes')
        self.modules = config.names('modules')
        self.state_dir = os.path.join(self.settings['log_dir'], 'state')

    # -- pools ------------------------------------------------------------

    def node_or_default(self, node):
        node = node or self.settings.get('default_node')
        if not node:
            raise UsageError('no node given and [client] default_node is '
                             'not set')
        if node not in self.nodes:
            raise UsageError(f'unknown node {node!r} (known: '
                             f'{", ".join(self.nodes) or "none"}; add it to '
                             '[nodes])')
        return node

    def pool(self, node):
        return os.path.join(self.settings['request_dir'], node)

    def queue_repo(self, node):
        return os.path.join(self.settings['queue_dir'], node + '.git')

    @staticmethod
    def list_pool(pool):
        """{state: [ids sorted]} of a pool directory."""
        states = {s: [] for s in CLIENT_STATES}
        try:
            names = os.listdir(pool)
        except FileNotFoundError:
            return states
        for name in names:
            if name[:1] in states and REQUEST_ID_RE.match(name[1:]):
                states[name[:1]].append(name[1:])
        for ids in states.values():
            ids.sort()
        return states

    def backup_module(self, request_module):
        name = self.modules.get(request_module)
        if name is None:
            raise UsageError(f'unknown module {request_module!r} (known: '
                             f'{", ".join(self.modules) or "none"}; see '
                             '[modules])')
        return load_module(self.config.modules_dir('client'), name)

    # -- commit -----------------------------------------------------------

    def commit(self, request_module, path, node=None):
        """Record one backup request; return its id."""
        node = self.node_or_default(node)
        path = self.check_request(request_module, path)
        pool = self.pool(node)
        os.makedirs(pool, exist_ok=True)
        request_id = new_request_id()
        incomplete = os.path.join(pool, INCOMPLETE + request_id)
        with open(incomplete, 'w', encoding='utf-8') as f:
            f.write(f'{request_module}\t{path}\n')
            f.flush()
            os.fsync(f.fileno())
        pause_point('commit:written')
        os.rename(incomplete, os.path.join(pool, COMPLETE + request_id))
        fsync_dir(pool)
        log.debug('request %s: %s %s for %s', request_id, request_module,
                  path, node)
        return request_id

    def check_request(self, request_module, path):
        """The path of a request as its module wants it, or UsageError."""
        module = self.backup_module(request_module)
        if any(not c.isprintable() for c in path) or not path:
            raise UsageError('the path must be printable text')
        if module.has('check_path'):
            try:
                return module.python.check_path(self, request_module, path)
            except (ValueError, ModuleError) as e:
                raise UsageError(str(e)) from None
        if not os.path.exists(path):
            raise UsageError(f'{path}: no such file or directory')
        return os.path.abspath(path)

    def source_targets(self):
        """[(request module, path)] of [sources]: globs expand, each match
        one request; a glob that matches nothing is only a warning."""
        targets = []
        for source, value in self.config.names('sources').items():
            for item in shlex.split(value):
                if any(c in item for c in '*?['):
                    matches = sorted(glob.glob(item))
                    if not matches:
                        log.warning('[sources] %s: %s matches nothing',
                                    source, item)
                    targets += [(source, match) for match in matches]
                else:
                    targets.append((source, item))
        return targets

    # -- init-node --------------------------------------------------------

    def init_node(self, node):
        """Create (or repair) the queue repository and pool of a node."""
        node = self.node_or_default(node)
        repo = self.queue_repo(node)
        if not os.path.isdir(os.path.join(repo, 'objects')):
            os.makedirs(os.path.dirname(repo), exist_ok=True)
            git(repo, 'init', '--quiet', '--bare')
            log.info('created queue repository %s', repo)
        url = self.nodes[node]
        remotes = git(repo, 'remote').stdout.split()
        if 'origin' in remotes:
            git(repo, 'remote', 'set-url', 'origin', url)
        else:
            git(repo, 'remote', 'add', 'origin', url)
        git(repo, 'config', 'user.name', f'gitbackup {self.name}')
        git(repo, 'config', 'user.email', f'gitbackup@{self.name}')
        os.makedirs(self.pool(node), exist_ok=True)
        self.adopt_node_history(repo, node)
        return repo

    def adopt_node_history(self, repo, node):
        """A queue repository made anew (the old one lost) must continue the
        node's ledger, which refuses anything but fast-forwards: start from
        the node's master.  Without the node (offline, or no history yet)
        this is left to a later init-node."""
        if git(repo, 'rev-parse', '--verify', '--quiet', 'refs/heads/master',
               check=False).returncode == 0:
            return
        proc = git(repo, 'fetch', '--quiet', '--no-tags', '--', self.nodes[node],
                   '+refs/heads/master:refs/remotes/origin/master',
                   env=self.git_ssh_env(), check=False,
                   timeout=self.config.get_duration('client', 'command_timeout'))
        if proc.returncode != 0:
            log.info('node %s: no history fetched (%s); starting a new '
                     'ledger', node, clean_text(proc.stderr.strip(), 200))
            return
        tip = git(repo, 'rev-parse', 'refs/remotes/origin/master').stdout \
            .strip()
        git(repo, 'update-ref', 'refs/heads/master', tip, ZERO_ID)
        log.info('node %s: continuing its ledger at %s', node, tip[:12])

    # -- send -------------------------------------------------------------

    def send(self, only_node=None):
        """Prepare and push the requests of every node; return #errors."""
        errors = []
        flush_mail_queue(self.config, 'client')
        nodes = [self.node_or_default(only_node)] if only_node else \
            list(self.nodes)
        for node in nodes:
            try:
                errors += self.send_node(node)
            except GitBackupError as e:
                log.error('node %s: %s', node, e)
                errors.append(f'node {node}: {e}')
        try:
            self.expire_exports()
        except OSError as e:
            errors.append(f'cleaning {self.settings["export_dir"]}: {e}')
            log.error('%s', errors[-1])
        mail_summary(self.config, 'client',
                     f'gitbackup: send on {self.name}: {{n}} problem(s)',
                     errors)
        return errors

    def committed_requests(self, repo):
        """Ids of requests already committed to the queue repository."""
        if git(repo, 'rev-parse', '--verify', '--quiet', 'refs/heads/master',
               check=False).returncode != 0:
            return set()
        out = git(repo, 'log', '--format=%B', 'refs/heads/master').stdout
        return set(re.findall(r'^Request: (\S+)$', out, re.M))

    def send_node(self, node):
        pool = self.pool(node)
        repo = self.queue_repo(node)
        if not os.path.isdir(os.path.join(repo, 'objects')):
            self.init_node(node)
        self.promote_orphans(pool)
        states = self.list_pool(pool)
        errors = []
        committed = set()
        # P* left over: already committed (then only the push is missing)
        # or claimed by a run that died before committing (prepare again).
        leftover = states[PROCESSING]
        if leftover:
            in_history = self.committed_requests(repo)
            committed = {i for i in leftover if i in in_history}
            for request_id in leftover:
                if request_id not in committed:
                    log.info('request %s: resuming after an interrupted '
                             'send', request_id)
        to_prepare = [i for i in leftover if i not in committed]
        for request_id in states[COMPLETE]:
            try:
                os.rename(os.path.join(pool, COMPLETE + request_id),
                          os.path.join(pool, PROCESSING + request_id))
            except FileNotFoundError:
                continue  # another process took it
            to_prepare.append(request_id)
        batch = []
        for request_id in to_prepare:
            try:
                server_requests = self.prepare(node, request_id, errors)
            except GitBackupError as e:
                errors.append(self.prepare_failed(node, request_id, e))
                continue
            batch.append((request_id, server_requests))
        if batch:
            pause_point('send:prepared')
            # A node takes at most max_requests_per_push requests per push
            # (its default 1000): commits of at most max_batch each, all
            # pushed at once, are taken by its later runs if need be.
            size = self.config.get_int('client', 'max_batch')
            for start in range(0, len(batch), size):
                self.commit_batch(repo, batch[start:start + size])
            pause_point('send:committed')
            committed |= {request_id for request_id, _ in batch}
        health = Health(os.path.join(self.state_dir, f'node-{node}.json'),
                        self.config, 'client', f'pushing to node {node}')
        alert_after = self.config.get_duration('client', 'alert_after')
        pushed = self.needs_push(repo)
        if pushed:
            try:
                self.push(repo, node)
                pause_point('send:pushed')
            except GitBackupError as e:
                health.failed(str(e), alert_after)
                errors.append(problem(f'push to {node} failed (requests kept '
                                      f'for the next run): {e}', mail=False))
                return errors
            health.ok()
        for request_id in sorted(committed):
            finished = os.path.join(pool, FINISHED + request_id)
            try:
                os.rename(os.path.join(pool, PROCESSING + request_id),
                          finished)
                os.utime(finished)  # F*'s time is the push: see export_keep
            except FileNotFoundError:
                pass
        if committed:
            fsync_dir(pool)
            log.info('node %s: %d request(s) sent', node, len(committed))
        # A module that had nothing to send leaves the node nothing to
        # confirm: record that here, or the request would look lost.
        self.journal_results(node, [
            {'request': f'{ZERO_ID}-RQ{request_id}-none', 'outcome': 'empty',
             'finished': isotime(), 'reason': 'the module sent nothing'}
            for request_id, server_requests in batch if not server_requests])
        # Results are fetched only while something awaits confirmation: an
        # idle client does not call its nodes every five minutes.
        if pushed or self.unconfirmed(node):
            results = Health(os.path.join(self.state_dir,
                                          f'results-{node}.json'),
                             self.config, 'client',
                             f'fetching results from node {node}')
            try:
                self.fetch_results(node, repo)
            except GitBackupError as e:
                results.failed(str(e), alert_after)
                errors.append(problem(f'fetching results from {node}: {e}',
                                      mail=False))
                return errors
            results.ok()
        return errors

    def unconfirmed(self, node, results=None):
        """Pushed requests (F*) the node has not reported on yet."""
        finished = self.list_pool(self.pool(node))[FINISHED]
        if not finished:
            return []
        results = self.read_results(node) if results is None else results
        return [i for i in finished if i not in results]

    def promote_orphans(self, pool):
        """An i* file left by a commit that was killed after writing it
        completely (and fsyncing) is a good request: make it C*.  A torn one
        is kept for a human and logged."""
        for request_id in self.list_pool(pool)[INCOMPLETE]:
            path = os.path.join(pool, INCOMPLETE + request_id)
            try:
                if time.time() - os.lstat(path).st_mtime < 60:
                    continue  # a commit may still be writing it
                with open(path, encoding='utf-8',
                          errors='surrogateescape') as f:
                    text = f.read()
            except FileNotFoundError:
                continue
            module, tab, target = text.rstrip('\n').partition('\t')
            if text.endswith('\n') and tab and module in self.modules \
                    and target:
                os.rename(path, os.path.join(pool, COMPLETE + request_id))
                log.warning('request %s: recovered from an interrupted '
                            'commit', request_id)
            else:
                log.warning('%s: torn request left by an interrupted commit; '
                            'kept, not sent', path)

    def read_request(self, path):
        with open(path, encoding='utf-8', errors='surrogateescape') as f:
            lines = f.read().splitlines()
        module, _, target = (lines[0] if lines else '').partition('\t')
        attempts = sum(1 for line in lines[1:] if line.startswith('# attempt'))
        return module, target, attempts, lines

    def prepare(self, node, request_id, problems):
        """Run the module of one request; return its server requests.  What
        the module reports as partial failures is added to problems."""
        path = os.path.join(self.pool(node), PROCESSING + request_id)
        request_module, target, _, _ = self.read_request(path)
        module = self.backup_module(request_module)
        ctx = PrepareContext(self, node, request_id, request_module)
        # A previous attempt may have left half an export behind.
        shutil.rmtree(ctx.export_root, ignore_errors=True)
        log.info('request %s: %s %s', request_id, request_module, target)
        if module.has('prepare'):
            try:
                produced = list(module.python.prepare(ctx, request_module,
                                                      target))
            except GitBackupError:
                raise
            except Exception as e:
                raise ModuleError(f'module {module.name} failed: '
                                  f'{type(e).__name__}: {e}') from None
        elif module.python is None:
            produced = self.run_executable_module(module, ctx, target)
        else:
            raise ModuleError(f'module {module.name} has no prepare()')
        problems += [problem(text) for text in ctx.problems]
        result = []
        for ident, content in produced:
            if not SERVER_REQUEST_RE.match(content):
                raise ModuleError(f'module {module.name} produced a bad '
                                  f'server request: {clean_text(content)!r}')
            ident = re.sub(r'[^A-Za-z0-9._-]', '_', str(ident))[:40] or 'rq'
            result.append((ident, content))
        return result

    def run_executable_module(self, module, ctx, target):
        env = {**os.environ,
               'GITBACKUP_CLIENT': self.name,
               'GITBACKUP_REQUEST_ID': ctx.request_id,
               'GITBACKUP_TIMESTAMP': ctx.timestamp,
               'GITBACKUP_EXPORT_DIR': ctx.export_root,
               'GITBACKUP_SFTP_EXPORT': self.settings.get('sftp_export', ''),
               'GITBACKUP_GIT_EXPORT': self.settings.get('git_export', ''),
               'GITBACKUP_GIT_BASE': self.settings.get('git_base', '')}
        os.makedirs(ctx.export_root, exist_ok=True)
        try:
            out = run([module.path, ctx.module, target], env=env,
                      timeout=ctx.timeout).stdout
        except CommandFailed as e:
            raise ModuleError(f'module {module.name}: {e}') from None
        produced = []
        for line in out.splitlines():
            if line.strip():
                ident, _, content = line.strip().partition(' ')
                produced.append((ident, content))
        return produced

    def prepare_failed(self, node, request_id, error):
        """Record a failed attempt; after max_attempts the request is X."""
        pool = self.pool(node)
        path = os.path.join(pool, PROCESSING + request_id)
        _, _, attempts, lines = self.read_request(path)
        attempts += 1
        message = clean_text(str(error).replace('\n', ' | '), 1000)
        lines.append(f'# attempt {attempts} {isotime()}: {message}')
        atomic_write(path, '\n'.join(lines) + '\n')
        limit = self.config.get_int('client', 'max_attempts')
        state = FAILED if attempts >= limit else COMPLETE
        os.rename(path, os.path.join(pool, state + request_id))
        fsync_dir(pool)
        if state == FAILED:
            text = (f'request {request_id} for {node} failed {attempts} '
                    f'times and is given up (kept as {pool}/X{request_id}): '
                    f'{error}')
        else:
            text = (f'request {request_id} for {node} failed (attempt '
                    f'{attempts} of {limit}, retried next run): {error}')
        return problem(text, mail=state == FAILED)

    def commit_batch(self, repo, batch):
        """One commit holding only the new RQ files (plus a timestamp file,
        as the seed does), built with plumbing: no work tree, no index."""
        entries = []
        names = set()
        for request_id, server_requests in batch:
            for ident, content in server_requests:
                name = f'RQ{request_id}-{ident}'
                n = 1
                while name in names:
                    n += 1
                    name = f'RQ{request_id}-{ident}.{n}'
                names.add(name)
                blob = git(repo, 'hash-object', '-w', '--stdin',
                           input=content + '\n').stdout.strip()
                entries.append(f'100644 blob {blob}\t{name}')
        now = isotime()
        blob = git(repo, 'hash-object', '-w', '--stdin',
                   input=now + '\n').stdout.strip()
        entries.append(f'100644 blob {blob}\ttimestamp')
        tree = git(repo, 'mktree', input='\n'.join(entries) + '\n') \
            .stdout.strip()
        parent = git(repo, 'rev-parse', '--verify', '--quiet',
                     'refs/heads/master', check=False).stdout.strip()
        message = [f'{self.name} {now}: {len(names)} server request(s)', '']
        message += [f'Request: {request_id}' for request_id, _ in batch]
        env = git_identity_env(f'gitbackup {self.name}',
                               f'gitbackup@{self.name}')
        commit = git(repo, 'commit-tree', tree,
                     *(['-p', parent] if parent else []),
                     input='\n'.join(message) + '\n', env=env).stdout.strip()
        # Compare-and-swap: a concurrent writer would make this fail loudly.
        git(repo, 'update-ref', 'refs/heads/master', commit,
            parent or ZERO_ID)
        log.info('committed %d server request(s) of %d request(s) as %s',
                 len(names), len(batch), commit[:12])
        return commit

    def needs_push(self, repo):
        local = git(repo, 'rev-parse', '--verify', '--quiet',
                    'refs/heads/master', check=False).stdout.strip()
        remote = git(repo, 'rev-parse', '--verify', '--quiet',
                     'refs/remotes/origin/master', check=False).stdout.strip()
        return bool(local) and local != remote

    def git_ssh_env(self):
        # LC_ALL=C: fetch_results reads git's English error messages.
        return {**os.environ, 'GIT_SSH_COMMAND': self.settings['ssh_command'],
                'GIT_TERMINAL_PROMPT': '0', 'LC_ALL': 'C'}

    def push(self, repo, node):
        """Push master; git's exit status tells success (unlike the seed's
        days, a failed push is an error here, never silence)."""
        url = self.nodes[node]
        git(repo, 'push', '--quiet', '--', url,
            'refs/heads/master:refs/heads/master', env=self.git_ssh_env(),
            timeout=self.config.get_duration('client', 'command_timeout'))
        local = git(repo, 'rev-parse', 'refs/heads/master').stdout.strip()
        git(repo, 'update-ref', 'refs/remotes/origin/master', local)
        log.info('pushed %s to %s', local[:12], node)

    def expired_exports(self):
        """Export directories past export_keep whose request is no longer
        waiting to be pushed.  Age counts from the push (the F* file), so a
        node that was offline for weeks still finds its files; the node's key
        is read-only, so the client cleans up after it."""
        export_dir = self.settings['export_dir']
        keep = self.config.get_duration('client', 'export_keep')
        try:
            names = sorted(os.listdir(export_dir))
        except FileNotFoundError:
            return []
        request_files = {}
        for node in self.nodes:
            pool = self.pool(node)
            for state, ids in self.list_pool(pool).items():
                for request_id in ids:
                    request_files[request_id] = (state, os.path.join(
                        pool, state + request_id))
        now = time.time()
        expired = []
        for name in names:
            path = os.path.join(export_dir, name)
            if not REQUEST_ID_RE.match(name) or os.path.islink(path) or \
                    not os.path.isdir(path):
                continue
            state, request_file = request_files.get(name, (None, path))
            if state in (INCOMPLETE, COMPLETE, PROCESSING):
                continue
            try:
                if now - os.lstat(request_file).st_mtime > keep:
                    expired.append(path)
            except FileNotFoundError:
                continue
        return expired

    def expire_exports(self):
        for path in self.expired_exports():
            shutil.rmtree(path)
            log.info('removed expired export %s', path)

    # -- results from the node ------------------------------------------------

    def results_journal(self, node):
        return os.path.join(self.state_dir, f'results-{node}.jsonl')

    def fetch_results(self, node, repo):
        """Fetch the node's results branch and journal what is new; remove
        exports the node confirmed; report requests left unconfirmed."""
        proc = git(repo, 'fetch', '--quiet', '--no-tags', '--', self.nodes[node],
                   '+refs/heads/results:refs/remotes/origin/results',
                   env=self.git_ssh_env(), check=False,
                   timeout=self.config.get_duration('client', 'command_timeout'))
        if proc.returncode != 0:
            if "couldn't find remote ref" in proc.stderr:
                return 0  # the node has not handled anything yet
            raise CommandFailed(['git', 'fetch', self.nodes[node]],
                                proc.returncode, proc.stderr)
        tip = git(repo, 'rev-parse', 'refs/remotes/origin/results').stdout \
            .strip()
        marker = os.path.join(self.state_dir, f'results-read-{node}')
        try:
            with open(marker) as f:
                last = f.read().strip()
        except FileNotFoundError:
            last = ''
        new = []
        if tip != last:
            revs = [tip] + (['^' + last] if last and git(
                repo, 'cat-file', '-e', last + '^{commit}',
                check=False).returncode == 0 else [])
            for commit in git(repo, 'rev-list', '--reverse', *revs) \
                    .stdout.split():
                for line in git(repo, 'ls-tree', commit).stdout.splitlines():
                    meta, _, name = line.partition('\t')
                    if name.startswith('R') and meta.split()[1] == 'blob':
                        try:
                            entry = json.loads(git(
                                repo, 'cat-file', 'blob',
                                meta.split()[2]).stdout)
                        except ValueError:
                            entry = None
                        if isinstance(entry, dict) and \
                                isinstance(entry.get('request'), str):
                            new.append(entry)
                        else:
                            log.warning('%s: unreadable result %s', node,
                                        clean_text(name))
            self.journal_results(node, new)
            atomic_write(marker, tip + '\n')
        results = self.read_results(node)
        if new:
            log.info('node %s confirmed %d result(s)', node, len(new))
            self.remove_confirmed_exports(repo, new, results)
        self.check_unconfirmed(node, results)
        return len(new)

    def journal_results(self, node, entries):
        if not entries:
            return
        os.makedirs(self.state_dir, exist_ok=True)
        with open(self.results_journal(node), 'a', encoding='utf-8') as f:
            for entry in entries:
                f.write(json.dumps(entry, sort_keys=True) + '\n')
            f.flush()
            os.fsync(f.fileno())

    def read_results(self, node):
        """{request id: {server request key: result}} from the journal."""
        results = {}
        try:
            with open(self.results_journal(node), encoding='utf-8') as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue
                    if not isinstance(entry, dict):
                        continue
                    request_id = request_id_of(str(entry.get('request', '')))
                    if request_id:
                        results.setdefault(request_id, {})[
                            entry['request']] = entry
        except FileNotFoundError:
            pass
        return results

    def remove_confirmed_exports(self, repo, new, results):
        """An export is removed once every server request of its request
        was stored by the node (the node's key stays read-only)."""
        for entry in new:
            request_id = request_id_of(entry.get('request', ''))
            if entry.get('outcome') != 'stored' or not request_id:
                continue
            export = os.path.join(self.settings['export_dir'], request_id)
            if not os.path.isdir(export):
                continue
            commit = entry['request'].split('-', 1)[0]
            names = git(repo, 'ls-tree', '--name-only', commit,
                        check=False).stdout.split()
            wanted = {f'{commit}-{n}' for n in names
                      if n.startswith(f'RQ{request_id}-')}
            stored = {k for k, r in results.get(request_id, {}).items()
                      if r.get('outcome') == 'stored'}
            if wanted and wanted <= stored:
                shutil.rmtree(export, ignore_errors=True)
                log.info('removed %s: the node stored it', export)

    def check_unconfirmed(self, node, results):
        """Mail once about pushed requests the node has not confirmed within
        confirm_after."""
        limit = self.config.get_duration('client', 'confirm_after')
        pool = self.pool(node)
        now = time.time()
        late = []
        for request_id in self.unconfirmed(node, results):
            try:
                age = now - os.lstat(os.path.join(
                    pool, FINISHED + request_id)).st_mtime
            except FileNotFoundError:
                continue
            if age > limit:
                late.append(request_id)
        path = os.path.join(self.state_dir, f'unconfirmed-{node}.json')
        told = set(read_json(path, []) or [])
        fresh = [r for r in late if r not in told]
        if fresh:
            mail_admins(self.config, 'client',
                        f'gitbackup: {len(fresh)} request(s) not confirmed '
                        f'by {node}',
                        f'These requests were pushed to {node} but the node '
                        f'has not reported them stored or failed within '
                        f'{self.settings["confirm_after"]}:\n\n' +
                        '\n'.join(fresh) + '\n\nCheck `server.py run` and '
                        '`server.py report` on the node.\n')
        if set(late) != told:
            write_json(path, sorted(late))
        return late

    # -- status -----------------------------------------------------------

    def status(self, out=sys.stdout):
        for node in self.nodes:
            states = self.list_pool(self.pool(node))
            health = read_json(os.path.join(self.state_dir,
                                            f'node-{node}.json'), {}) or {}
            out.write(f'node {node} ({self.nodes[node]})\n')
            out.write(f'  pending     {len(states[COMPLETE])}\n')
            out.write(f'  processing  {len(states[PROCESSING])}\n')
            out.write(f'  finished    {len(states[FINISHED])}\n')
            out.write(f'  failed      {len(states[FAILED])}\n')
            out.write(f'  last push   {health.get("last_success") or "never"}\n')
            if health.get('last_error'):
                out.write(f'  failing since {health.get("first_failure")}: '
                          f'{health["last_error"]}\n')
            fetch = read_json(os.path.join(self.state_dir,
                                           f'results-{node}.json'), {}) or {}
            out.write(f'  last results {fetch.get("last_success") or "never"}\n')
            if fetch.get('last_error'):
                out.write(f'  results failing since '
                          f'{fetch.get("first_failure")}: '
                          f'{fetch["last_error"]}\n')
            for request_id in states[FAILED][-5:]:
                _, _, _, lines = self.read_request(
                    os.path.join(self.pool(node), FAILED + request_id))
                out.write(f'  failed request {request_id}: '
                          f'{lines[0] if lines else ""} -- '
                          f'{lines[-1] if len(lines) > 1 else ""}\n')
            results = self.read_results(node)
            outcomes = [r for parts in results.values()
                        for r in parts.values()]
            stored = [r for r in outcomes if r.get('outcome') == 'stored']
            failed = [r for r in outcomes if r.get('outcome') == 'failed']
            unconfirmed = self.unconfirmed(node, results)
            out.write(f'  node stored {len(stored)}, node failed '
                      f'{len(failed)}, not yet confirmed {len(unconfirmed)}\n')
            late = read_json(os.path.join(self.state_dir,
                                          f'unconfirmed-{node}.json'), [])
            if late:
                out.write(f'  unconfirmed after '
                          f'{self.settings["confirm_after"]}: '
                          f'{" ".join(late[:10])}\n')
            for r in sorted(outcomes, key=lambda r: r.get('finished', ''))[-5:]:
                out.write(f'  {r.get("finished", "?")} '
                          f'{request_id_of(r["request"])} {r.get("outcome")} '
                          f'{r.get("stored") or r.get("reason") or ""}\n')
        return 0

    # -- check ------------------------------------------------------------

    def check(self, out=sys.stdout):
        """Print every problem found; return how many."""
        out.write(f'{self.config.path}: client {self.name}\n')
        problems = []
        for tool in ['git', 'ssh'] + shlex.split(self.settings['tar_command'])[:1]:
            if not shutil.which(tool):
                problems.append(f'{tool}: not installed or not in PATH')
        for key in ('request_dir', 'queue_dir', 'export_dir', 'log_dir'):
            path = self.settings[key]
            if not os.path.isdir(path):
                problems.append(f'[client] {key} = {path}: no such directory')
            elif not os.access(path, os.W_OK | os.X_OK):
                problems.append(f'[client] {key} = {path}: not writable')
        if self.settings['default_node'] and \
                self.settings['default_node'] not in self.nodes:
            problems.append(f'[client] default_node = '
                            f'{self.settings["default_node"]} is not in [nodes]')
        for node in self.nodes:
            if not NAME_RE.match(node):
                problems.append(f'[nodes] {node}: not a valid node name')
            elif not os.path.isdir(os.path.join(self.queue_repo(node),
                                                'objects')):
                problems.append(f'node {node}: no queue repository yet (run: '
                                f'client.py init-node {node})')
        for request_module, name in self.modules.items():
            try:
                load_module(self.config.modules_dir('client'), name)
            except ModuleError as e:
                problems.append(f'[modules] {request_module}: {e}')
        for source in self.config.names('sources'):
            if source not in self.modules:
                problems.append(f'[sources] {source}: not a module in '
                                '[modules]')
        for source, target in self.source_targets():
            if source in self.modules:
                try:
                    self.check_request(source, target)
                except GitBackupError as e:
                    problems.append(f'[sources] {source}: {e}')
        git_base = self.settings['git_base']
        if git_base and not os.path.isdir(git_base):
            problems.append(f'[client] git_base = {git_base}: no such '
                            'directory')
        for key in ('export_keep', 'alert_after', 'confirm_after',
                    'command_timeout', 'keep_requests'):
            self.config.get_duration('client', key)
        if self.settings['compression'] not in COMPRESSION:
            problems.append(f'[client] compression: one of '
                            f'{", ".join(COMPRESSION)}')
        if not self.settings.get('sftp_export'):
            problems.append('[client] sftp_export is not set: nodes cannot '
                            'fetch prepared files')
        for p in problems:
            out.write(f'problem: {p}\n')
        if not problems:
            out.write(f'looks ready ({len(self.nodes)} node(s), '
                      f'{len(self.modules)} module(s))\n')
        return problems


# --------------------------------------------------------------------------
# -- client operations: gc and prune (gc_repositories serves server.py too)

def gc_repositories(config, section, repos, aggressive=False, where=''):
    """`git gc` of each repository, as the seed's git_gc.sh: the collected
    log goes to <log_dir>/git-gc-<time>.log and to the admins.  One failure
    does not stop the others.  Returns the repositories whose gc failed."""
    timeout = config.get_duration(section, 'command_timeout')
    lines, failed = [], []
    for repo in repos:
        before = tree_size(repo)
        started = time.monotonic()
        args = ['git', f'--git-dir={repo}', 'gc']
        if aggressive:
            args.append('--aggressive')
        lines.append(f'git-dir="{repo}"')
        try:
            proc = run(args, check=False, timeout=timeout)
            output = (proc.stdout + proc.stderr).strip()
            status = proc.returncode
        except CommandFailed as e:   # timeout
            output, status = str(e), 'timeout'
        if output:
            lines.append(output)
        after = tree_size(repo)
        lines.append(f'exit {status}, {human_size(before)} -> '
                     f'{human_size(after)}, '
                     f'{time.monotonic() - started:.1f} s')
        lines.append('')
        if status != 0:
            failed.append(repo)
            log.error('git gc of %s failed (exit %s): %s', repo, status,
                      clean_text(output, 500))
        else:
            log.info('git gc of %s: %s -> %s', repo, human_size(before),
                     human_size(after))
    summary = (f'git gc on {where}: {len(repos)} repositories, '
               f'{len(failed)} failed')
    lines.append(summary)
    text = '\n'.join(lines) + '\n'
    log_dir = config.section(section)['log_dir']
    try:
        os.makedirs(log_dir, exist_ok=True)
        atomic_write(os.path.join(log_dir, f'git-gc-{timestamp()}.log'), text)
    except OSError as e:
        log.error('cannot write the gc log in %s: %s', log_dir, e)
    mail_admins(config, section, f'gitbackup: {summary}'
                + (' (FAILED)' if failed else ''), text)
    log.info('%s', summary)
    return failed


def client_gc(client, aggressive=False):
    """git gc of every queue repository (queue_dir/*.git)."""
    queue_dir = client.settings['queue_dir']
    try:
        names = sorted(os.listdir(queue_dir))
    except FileNotFoundError:
        names = []
    repos = [os.path.join(queue_dir, name) for name in names
             if name.endswith('.git') and
             os.path.isdir(os.path.join(queue_dir, name, 'objects'))]
    return gc_repositories(client.config, 'client', repos, aggressive,
                           f'client {client.name}')


def older_than(paths, seconds):
    """The paths last changed more than seconds ago (vanished ones left
    out)."""
    now = time.time()
    old = []
    for path in paths:
        try:
            if now - os.lstat(path).st_mtime > seconds:
                old.append(path)
        except FileNotFoundError:
            pass
    return old


def remove_listed(paths, dry_run, out):
    """Remove files and whole directories (with dry_run, remove nothing),
    printing each; return the errors as text."""
    verb = 'would remove' if dry_run else 'removed'
    errors = []
    for path in paths:
        try:
            if dry_run:
                pass
            elif os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            errors.append(f'{path}: {e}')
            log.error('cannot remove %s: %s', path, e)
            continue
        out.write(f'{verb} {path}\n')
    return errors


def client_prune(client, dry_run=False, out=sys.stdout):
    """Remove expired exports (see Client.expired_exports) and F* requests
    older than keep_requests.  C*, P* and X* are never touched.  Returns
    the list of errors."""
    finished = [os.path.join(client.pool(node), FINISHED + request_id)
                for node in client.nodes
                for request_id in client.list_pool(client.pool(node))[FINISHED]]
    return remove_listed(
        client.expired_exports() + older_than(
            finished, client.config.get_duration('client', 'keep_requests')),
        dry_run, out)


# --------------------------------------------------------------------------
# Command line

def common_options(parser, suppress):
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument('--config', metavar='PATH', default=default,
                        help='configuration file (default: $GITBACKUP_CONFIG, '
                             'else backup.ini next to this script)')
    parser.add_argument('-v', '--verbose', action='count',
                        default=argparse.SUPPRESS if suppress else 0,
                        help='log more (also the commands run)')
    parser.add_argument('-q', '--quiet', action='store_true',
                        default=argparse.SUPPRESS if suppress else False,
                        help='log only warnings and errors on stderr')


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser():
    parser = argparse.ArgumentParser(
        prog='client.py', formatter_class=HelpFormatter,
        description=__doc__.split('\n\n')[0] + '\n\n' + '''\
Typical crontab of the backup user:
  */5 * * * *  client.py send -q
  0 23 11 * *  client.py backup-all -q
  50 23 11 * * client.py gc -q
  30 3 * * *   client.py prune -q
and in the post-update hook of every git repository to back up:
  client.py commit git "$PWD"

Exit status: 0 success, 1 failure, 2 bad usage or configuration.''')
    common_options(parser, suppress=False)
    parser.add_argument('--version', action='version', version=VERSION)
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True

    def command(name, help, description=''):
        p = sub.add_parser(name, help=help, description=description or help,
                           formatter_class=HelpFormatter)
        common_options(p, suppress=True)
        return p

    p = command('commit', 'record a backup request',
                'Record a backup request in the pool of a node.  Fast and '
                'quiet: git hooks call it.\nUnknown module, unknown node or '
                'missing path: exit 2, nothing written.')
    p.add_argument('module', help='a request module named in [modules]')
    p.add_argument('path', help='what to back up (directory, repository, '
                   'database name or "all", as the module expects)')
    p.add_argument('node', nargs='?', help='backup node (default: '
                   '[client] default_node)')
    p = command('send', 'prepare pending requests and push them (cron, '
                'every 5 minutes)',
                'Prepare every pending request and push it to its node.  A '
                'failed push keeps the requests\nfor the next run.  A second '
                'concurrent send exits 0 at once.')
    p.add_argument('--node', help='only this node')
    p = command('backup-all', 'request every [sources] entry (cron, monthly)')
    p.add_argument('--node', help='node to send to (default: default_node)')
    p = command('init-node', 'create the queue repository for a node')
    p.add_argument('node', help='a node named in [nodes]')
    command('status', 'show requests and push health per node')
    command('check', 'test the configuration and environment')
    # -- client operations
    p = command('gc', 'git gc of the queue repositories; the log is mailed '
                '(cron, monthly)',
                'Run `git gc` on every queue repository (queue_dir/*.git).  '
                'The collected log is\nwritten to log_dir/git-gc-<time>.log '
                'and mailed to the admins.  Exit 1 if any\ngc failed.')
    p.add_argument('--aggressive', action='store_true',
                   help='git gc --aggressive (slow; as the seed did)')
    p = command('prune', 'remove old exported files and finished requests '
                '(cron, daily)',
                'Remove exported request directories (export_dir/<id>/) '
                'pushed more than\nexport_keep ago (those of requests not yet '
                'pushed are kept), and finished (F*)\nrequests older than '
                'keep_requests.  C*, P* and X* requests are never removed.\n'
                'Every removal is printed.')
    p.add_argument('--dry-run', action='store_true',
                   help='print what would be removed; remove nothing')
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


def backup_all(client, node=None):
    """Request every [sources] entry; globs expand, each match one request.
    A bad entry (missing directory, not a repository) does not stop the
    others: the errors are collected, mailed and raised at the end."""
    node = client.node_or_default(node)
    count = 0
    errors = []
    for source, target in client.source_targets():
        try:
            client.commit(source, target, node)
        except GitBackupError as e:
            errors.append(f'[sources] {source}: {e}')
            log.error('%s', errors[-1])
            continue
        count += 1
    log.info('backup-all: %d request(s) recorded', count)
    if errors:
        mail_admins(client.config, 'client',
                    f'gitbackup: backup-all on {client.name} skipped '
                    f'{len(errors)} source(s)', '\n'.join(errors) + '\n')
        raise GitBackupError(f'backup-all: {len(errors)} source(s) not '
                             f'requested, {count} request(s) recorded')
    return count


def exclusive(log_dir, name, function, stuck_after=None):
    """Run function() unless another process holds log_dir/<name>.lock: a
    second cron job exits 0 at once with one log line -- a warning (seen
    under -q, so cron mails it) once the holder has run longer than
    stuck_after seconds, since then it is probably hung."""
    lock = Lock(os.path.join(log_dir, f'{name}.lock'))
    if not lock.acquire():
        try:
            held = time.time() - os.stat(lock.path).st_mtime
        except OSError:
            held = 0
        level = logging.WARNING if stuck_after and held > stuck_after \
            else logging.INFO
        log.log(level, 'another %s (pid %s) has held %s for %d s; exiting',
                name, lock.holder(), lock.path, held)
        return 0
    with lock:
        return function()


def guarded(command):
    """Run a command; turn the errors a user should see into one log line
    and an exit status (1 failure, 2 bad usage or configuration)."""
    try:
        return command()
    except GitBackupError as e:
        log.error('%s', e)
        return e.exit_code
    except BrokenPipeError:
        # `client.py status | head`: the reader left; not an error of ours.
        sys.stderr.close()
        return 0
    except OSError as e:
        log.error('%s', e)
        return 1
    except KeyboardInterrupt:
        log.error('interrupted')
        return 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    quiet = args.quiet or args.command == 'commit'
    setup_logging(None, 'client.py', args.verbose, quiet)
    return guarded(lambda: run_command(args, quiet))


def run_command(args, quiet):
    config = Config(find_config(args.config))
    client = Client(config)
    setup_logging(client.settings['log_dir'], 'client.py', args.verbose,
                  quiet, create=args.command != 'check')
    if args.command == 'commit':
        client.commit(args.module, args.path, args.node)
        return 0
    if args.command == 'init-node':
        print(client.init_node(args.node))
        return 0
    if args.command == 'status':
        return client.status()
    if args.command == 'check':
        return 1 if client.check() else 0
    if args.command == 'backup-all':
        backup_all(client, args.node)
        return 0
    # -- client operations
    if args.command == 'gc':
        return 1 if client_gc(client, args.aggressive) else 0
    if args.command == 'prune':
        return 1 if client_prune(client, args.dry_run) else 0
    if args.command == 'send':
        # Exports may hold private data (dumps with password hashes): only
        # the backup account and its group may read them.
        os.umask(0o027)
        return exclusive(client.settings['log_dir'], 'send',
                         lambda: 1 if client.send(args.node) else 0,
                         2 * config.get_duration('client', 'command_timeout'))
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
