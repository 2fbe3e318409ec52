"""gitbackup's shared core: the plumbing client.py and server.py both use.

Not a backup module: its name starts with an underscore, and module names
start with a letter, so ``[modules]`` can never load it.  Both scripts import
it as ``modules._core``; neither script imports the other.  It imports
sendmail.py (mail delivery), which imports nothing of ours, so there is no
circle.  Importing it does nothing but define names.  It runs on Python
3.6+ (client.py's minimum): see ``shell_line``.

What lives here, once:

* the configuration schema of every section, and ``Config``;
* the exceptions a user sees as one line (``GitBackupError`` and kin),
  including the node's request outcomes (refused, transient, waiting);
* ``run()``/``git()``: argument lists only; a failure quotes the command,
  cwd, exit status and stderr;
* atomic writes, fsync of directories, flock locks, logging, mail helpers
  and ``Health`` records (one mail when a peer fails, one when it recovers);
* ``Pool``: the only code that changes a request's state (rename(2) of its
  file, then fsync of the file and the directory), on both sides;
* ``Attempts``: one retry and give-up policy for both sides;
* ``Ledger``: a branch written with git plumbing and compare-and-swap (the
  client's request queue, the node's results), and "commits since marker";
* ``Journal``: append-only JSON-lines journals (results), torn lines skipped;
* module loading (Python or executable, for either side).
"""

import argparse
import base64
import configparser
import contextlib
import datetime
import errno
import fcntl
import hashlib
import importlib.util
import itertools
import json
import logging
import logging.handlers
import os
import pwd
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zlib

# The directory of client.py and server.py (this file is in its modules/).
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if HERE not in sys.path:     # sendmail.py lives there
    sys.path.insert(0, HERE)
# Mail to the admins.  sendmail.py imports nothing of gitbackup's: the
# import goes one way only.
import sendmail  # noqa: E402

VERSION = '0.1'
MIN_GIT = (2, 20)      # update-ref, for-each-ref as used here, -c flags

log = logging.getLogger('gitbackup')

# Names that end up in file names and repository names on both sides.
NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$')
MODULE_RE = re.compile(r'^[A-Za-z][A-Za-z0-9_-]{0,63}$')
REQUEST_ID = r'[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9]+-[0-9]+'
REQUEST_ID_RE = re.compile(f'^{REQUEST_ID}$')
TIMESTAMP_FORMAT = '%Y%m%dT%H%M%SZ'
CHUNK = 1 << 20

REQUIRED = object()
ZERO_ID = '0' * 40

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
        'compression': 'auto',
        'full_every': '7d',
        'tar_command': 'tar',
        'pg_dump': 'pg_dump',
        'pg_dumpall': 'pg_dumpall',
        'psql': 'psql',
        'pg_host': '',
        'pg_port': '',
        'pg_user': '',
        # Row counts beside each dump, for the node's drill: exact (count(*)
        # in the dump's own snapshot: a second scan of every table) or
        # estimate (the statistics collector's: free, but no proof).
        'pg_row_counts': 'exact',
        'export_keep': '7d',
        'keep_requests': '30d',
        'max_attempts': '5',
        'max_batch': '500',
        'alert_after': '1h',
        'confirm_after': '1d',
        'command_timeout': '6h',
        # ssh to the nodes (git push, results fetch): connect and silence
        # bounds, as the node's.
        'connect_timeout': '30s',
        'stall_timeout': '10m',
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
        # PostgreSQL server programs (initdb, pg_ctl, postgres) with which
        # `drill` restores dumps into a scratch cluster; empty: it only
        # reads them back with pg_restore --list.
        'drill_postgres': '',
        'keep_requests': '90d',
        # How long prune waits for a drill, verify, restore or offsite
        # reading a client's snapshots before it skips that client.
        'prune_wait': '1m',
        'quota': '0',
        'bwlimit': '0',
        'free_space_floor': '1G',
        'max_request_size': '4096',
        'max_requests_per_push': '1000',
        'max_push_size': '64M',
        'command_timeout': '6h',
        # A hostile or hung client costs its own worker, never the others'.
        'jobs': '4',
        'connect_timeout': '30s',
        'stall_timeout': '10m',
        'max_commits_per_push': '10000',
        # Refs (branches, tags, notes) one mirrored git repository may have.
        'max_refs': '10000',
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
        'bwlimit': '',
        'max_refs': '',
        'expect': '',
        'admin': '',
    },
    # server.py offsite: a second copy on an rclone remote (docs/operations.md)
    'offsite': {
        'remote': REQUIRED,
        'rclone_config': REQUIRED,
        'rclone': 'rclone',
        'transfers': '4',
        'bwlimit': '',
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


def _typed(duration=(), size=(), number=()):
    types = dict.fromkeys(duration, 'duration')
    types.update(dict.fromkeys(size, 'size'))
    types.update(dict.fromkeys(number, 'number'))
    return types


# The type of each typed key, per section: a key's type is what its own
# section means by it, never decided by its name across sections ([server]
# bwlimit is sftp's Kbit/s, [offsite] bwlimit rclone's rate such as 10M).
# Checked when the file is read, so a typo in a value is an error naming
# its line, like a typo in a key; keys not listed are text.
TYPES = {
    'client': _typed(
        duration=('export_keep', 'alert_after', 'confirm_after',
                  'full_every', 'command_timeout', 'keep_requests',
                  'connect_timeout', 'stall_timeout'),
        number=('max_attempts', 'max_batch')),
    'server': _typed(
        duration=('alert_after', 'stale_after', 'keep_requests',
                  'command_timeout', 'connect_timeout', 'stall_timeout',
                  'prune_wait'),
        size=('quota', 'free_space_floor', 'max_push_size'),
        number=('max_attempts', 'keep_daily', 'keep_weekly', 'keep_monthly',
                'bwlimit', 'max_request_size', 'max_requests_per_push',
                'jobs', 'max_commits_per_push', 'max_refs')),
    'client *': _typed(
        duration=('stale_after',), size=('quota',),
        number=('sftp_port', 'keep_daily', 'keep_weekly', 'keep_monthly',
                'bwlimit', 'max_refs')),
    # bwlimit: passed to rclone --bwlimit as written (10M, a timetable).
    'offsite': _typed(number=('transfers',)),
    'mail': {},
}
# Keys with a fixed set of values.
CHOICE_KEYS = {'pg_row_counts': ('exact', 'estimate')}


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
        lines = [f'{shell_line(self.args_list)}{where} exited with '
                 f'{returncode}']
        lines += ['    ' + clean_text(line, 1000)
                  for line in self.stderr.strip().splitlines()[-20:]]
        super().__init__('\n'.join(lines))


class ToolMissing(GitBackupError):
    """A required external program is not installed."""


class ModuleError(GitBackupError):
    """A backup module failed for one request."""


class RequestRefused(GitBackupError):
    """A node request that fails validation: never retried, kept as X*."""


class TransientError(GitBackupError):
    """A node request that failed for now (space, a bad transfer): retried
    later, X* after max_attempts."""


class Waiting(TransientError):
    """Not the request's fault: the request is put back without costing an
    attempt, and the admins get one mail after ``alert_after`` (``None``:
    at once) through a Health record, and one on recovery."""
    health = 'client'
    what = 'fetching from client {client}'
    alert_after = 'alert_after'
    stops_pool = False      # the client's other requests wait too


class Unreachable(Waiting):
    """The client's sftp or git export cannot be reached."""
    stops_pool = True


class TimedOut(TransientError):
    """A transfer that made no progress for stall_timeout or outlived
    command_timeout.  It costs an attempt (a client that stalls every
    transfer ends as X*, it does not wait forever), and the client counts
    as unreachable for the rest of the run: one stall per run, not one per
    request."""
    stops_pool = True


class NoSpace(Waiting):
    """The node's free-space floor or the client's quota stops a fetch."""
    health = 'space'
    what = 'storing backups of {client}'
    alert_after = None


class Misconfigured(Waiting):
    """The node's own configuration for this client is incomplete or
    wrong, or ssh refuses the login: fix it, the requests wait."""
    health = 'config'
    what = 'the node configuration for client {client}'
    alert_after = None


class AccessDenied(Misconfigured):
    """ssh reached the client but may not log in, or does not trust its
    host key: a human must act, so the admins hear at once (not after
    alert_after, as for an outage), and the client's other requests wait
    too, since they would all be refused the same way."""
    stops_pool = True


# What ssh, sftp and git say (LC_ALL=C) when the other side cannot be
# reached, or the connection drops: the peer is down, not the request bad.
CONNECTION_LOST_RE = re.compile(
    r'unable to connect|Connection refused|Connection timed out|'
    r'Could not resolve host|No route to host|Network is unreachable|'
    r'Connection closed|Connection reset|Broken pipe|'
    r'connect to host|Connection to \S+ closed|Timeout, server')

# What ssh says (LC_ALL=C) when it reached the peer but may not log in, or
# does not trust it: a configuration a human must fix, never an outage.
# Checked before CONNECTION_LOST_RE ("Connection closed" follows these).
ACCESS_DENIED_RE = re.compile(
    r'Permission denied \(|Host key verification failed|'
    r'REMOTE HOST IDENTIFICATION HAS CHANGED|'
    r'Too many authentication failures|No \S+ host key is known|'
    r'Identity file \S+ not accessible|no such identity')
ACCESS_DENIED_HINT = (
    'ssh refused the login: authorize the key in the peer\'s '
    'authorized_keys, check the identity file (-i of ssh_command), or add '
    'the peer\'s host key to known_hosts (a changed host key: make sure '
    'why, then ssh-keygen -R HOST); the requests wait meanwhile')


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


def mail_summary(config, section, subject, problems, admins=None):
    """Mail the problems worth a mail, if any."""
    worth = [p for p in problems if getattr(p, 'mail', True)]
    if worth:
        mail_admins(config, section, subject.format(n=len(worth)),
                    '\n\n'.join(worth) + '\n', admins)


# --------------------------------------------------------------------------
# Helpers

def shell_line(words):
    """Words as one shell command line, each quoted as needed: for logs,
    messages and the few commands a shell or git reads as a line.  (What
    shlex.join does from Python 3.8; the client runs on 3.6.)"""
    return ' '.join(shlex.quote(word) for word in words)


def run(args, *, cwd=None, env=None, input=None, check=True, timeout=None,
        stdout=subprocess.PIPE, text=True, stdin=None):
    """Run a program (argument list, never a shell) and return the result.

    On failure raise CommandFailed quoting the command, cwd, exit status and
    stderr; a program that is not installed raises ToolMissing.  The
    program runs in a session of its own, so a timeout kills it and
    everything it started (ssh under git or sftp), never leaving a
    connection behind.  stdin: an open file to read instead of input (so
    that a program run as another account reads just that file).
    """
    log.debug('running: %s', shell_line(args))
    kwargs = {'encoding': 'utf-8', 'errors': 'surrogateescape'} if text else {}
    try:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=stdout,
                                stderr=subprocess.PIPE,
                                stdin=stdin if stdin is not None else
                                subprocess.PIPE if input is not None
                                else subprocess.DEVNULL,
                                start_new_session=True, **kwargs)
    except FileNotFoundError:
        raise ToolMissing(f'{args[0]}: not installed or not in PATH') from None
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise CommandFailed(args, 'timeout', f'no result after {timeout} s',
                            cwd) from None
    except BaseException:
        kill_tree(proc)
        raise
    result = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        err = err if text else err.decode('utf-8', 'replace')
        raise CommandFailed(args, proc.returncode, err, cwd)
    return result


def ssh_timeout_options(config, side):
    """ssh options that bound the connect (TCP and handshake) and detect
    a peer that stops answering (keepalives), from [side] connect_timeout
    and stall_timeout; appended after ssh_command's own words, so an
    admin's explicit -o still wins (ssh keeps an option's first value)."""
    connect = config.get_duration(side, 'connect_timeout', '30s')
    stall = config.get_duration(side, 'stall_timeout', '10m')
    interval = max(1, min(15, stall // 4))
    return ['-o', f'ConnectTimeout={max(1, connect)}',
            '-o', f'ServerAliveInterval={interval}',
            '-o', f'ServerAliveCountMax={max(1, stall // interval)}']


def kill_tree(proc):
    """Kill a program started with start_new_session=True and everything
    in its process group, then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def directory_problems(section, settings, keys):
    """What `check` says of the directories a command writes: missing, or
    not writable by the user running it."""
    problems = []
    for key in keys:
        path = settings[key]
        if not os.path.isdir(path):
            problems.append(f'[{section}] {key} = {path}: no such directory')
        elif not os.access(path, os.W_OK | os.X_OK):
            problems.append(f'[{section}] {key} = {path}: not writable')
    return problems


HOST_KEY_RE = re.compile(r'Host key verification failed|No \S+ host key is '
                         r'known|REMOTE HOST IDENTIFICATION HAS CHANGED')


def ssh_problem(stderr, target, port, authorize):
    """What a failed ssh/sftp/git-over-ssh connection from this account to
    target (user@host) says, with the fix, for `check --connect`; None when
    ssh itself worked (the failure is the command's).  `authorize` says
    whose key to add where."""
    host = target.rpartition('@')[2]
    lines = (stderr or '').strip().splitlines()

    def said(pattern):
        """The first line of stderr that matches, as ssh wrote it."""
        return next((clean_text(line, 300) for line in lines
                     if pattern.search(line)), '')
    if said(HOST_KEY_RE):
        return (f'{said(HOST_KEY_RE)}: the host key of {host} is unknown '
                f'here or changed; as this account run once `ssh -p {port} '
                f'{target} true` and check the fingerprint (a changed key: '
                f"find out why, then ssh-keygen -R '[{host}]:{port}')")
    if said(ACCESS_DENIED_RE):
        return f'{said(ACCESS_DENIED_RE)}: login refused; {authorize}'
    if said(CONNECTION_LOST_RE):
        return (f'{said(CONNECTION_LOST_RE)}: cannot connect; is sshd '
                f'running on {host} and port {port} open to this host?')
    return None


def connection_line(out, what, problem):
    """One line of `check --connect`: OK, or FAILED with what to fix.
    Returns the problem text ([] when it worked), to be collected."""
    if problem:
        out.write(f'FAILED  {what}: {problem}\n')
        return [f'{what}: {problem}']
    out.write(f'OK      {what}\n')
    return []


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f'uid {uid}'


def ours(st):
    """Whether the running user may write what st describes without
    leaving files its owner cannot change: the owner, or a member of its
    group when it is shared through the group (setgid and group-writable,
    as git's core.sharedRepository=group makes a repository).  Root only
    when it is the owner: it can write anything, which is the trap."""
    euid = os.geteuid()
    if st.st_uid == euid:
        return True
    groups = set(os.getgroups()) | {os.getegid()}
    return bool(euid != 0 and st.st_mode & stat.S_ISGID and
                st.st_mode & stat.S_IWGRP and st.st_gid in groups)


def check_run_user(program, command, section, settings, keys):
    """Refuse, before anything is written, a command run by a user who
    does not own the directories it writes: one run as root leaves files
    that every later run as the right user cannot change.  A directory
    shared through its group (setgid and group-writable, as the node's
    todo_dir and log_dir between the git account and adminbackup) lets
    its group's members in, root excepted.  Missing directories are left
    to the command (it creates them as the user running it)."""
    euid = os.geteuid()
    for key in keys:
        try:
            st = os.stat(settings[key])
        except (FileNotFoundError, NotADirectoryError):
            continue
        if ours(st):
            continue
        owner = user_name(st.st_uid)
        raise ConfigError(
            f'{program} {command}: refusing to run as {user_name(euid)}: '
            f'[{section}] {key} = {settings[key]} belongs to {owner}, and '
            f'files written as {user_name(euid)} would break later runs as '
            f'{owner}; run it as {owner} (sudo -u {owner} {program} '
            f'{command} ...)')
_git_version = []


def git_version():
    """(major, minor) of the installed git, and `git --version`'s text;
    asked once per process."""
    if not _git_version:
        out = run(['git', '--version']).stdout
        m = re.search(r'(\d+)\.(\d+)', out)
        _git_version.append((tuple(map(int, m.groups())) if m else (0, 0),
                             out.strip()))
    return _git_version[0]


def check_git_version():
    """Refuse to run with a git older than MIN_GIT (a clear message, not a
    strange plumbing error later)."""
    version, text = git_version()
    if version < MIN_GIT:
        raise ToolMissing(f'git {".".join(map(str, MIN_GIT))} or later is '
                          f'required; found {clean_text(text)}')


def git_fsync_settings():
    """[(key, value)] that make git fsync what it writes, so a commit or
    ref the project wrote (then acted on: a P->F rename, a published
    offset) survives a power loss.  By default git fsyncs packs only:
    not the loose objects of a small commit or push, nor refs.  git 2.36
    added core.fsync; older git has core.fsyncObjectFiles (objects only;
    2.36 and later warn that it is deprecated)."""
    if git_version()[0] >= (2, 36):
        return [('core.fsync', 'committed,derived-metadata'),
                ('core.fsyncMethod', 'fsync')]
    return [('core.fsyncObjectFiles', 'true')]


def git_program():
    """git as every git command of the project runs: with fsync on."""
    return ['git', *[arg for key, value in git_fsync_settings()
                     for arg in ('-c', f'{key}={value}')]]


def git(git_dir, *args, **kwargs):
    """Run git on one repository (argument list, git's own environment)."""
    return run([*git_program(), f'--git-dir={git_dir}', *args], **kwargs)


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


def request_id_of(key):
    """The client's request id in a node request key
    '<commit>-RQ<request id>-<ident>', or None."""
    m = re.match(f'^[0-9a-f]{{40}}-RQ({REQUEST_ID})-', key or '')
    return m.group(1) if m else None


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path, mode=0o777):
    """os.makedirs(path, exist_ok=True) whose new directories survive a
    power loss: each one it creates is fsynced into its parent (files
    fsynced in a directory whose own entry was lost are lost with it).
    Returns whether path was created."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return False
    parent = os.path.dirname(path)
    if not os.path.exists(parent):   # a file there: mkdir says ENOTDIR
        make_dirs(parent)
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return False
    fsync_dir(parent)
    return True


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
    make_dirs(os.path.dirname(os.path.abspath(path)))
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


def clean_text(text, limit=300, lines=False):
    """The one cleaner of text from another host (stderr of git, ssh and
    sftp, results, listings, dump names) before it reaches a terminal, a
    log or a mail: a tab becomes a space, every other control character
    (escape sequences included) '?'.  Line breaks become ' | ' (one log
    line), or with lines=True stay (a block, each line cleaned).  Cut at
    limit characters (None: whole)."""
    text = str(text).replace('\t', ' ')
    if lines:
        text = '\n'.join(''.join(c if c.isprintable() else '?' for c in line)
                         for line in text.split('\n'))
    else:
        text = ' | '.join(line for line in text.splitlines() if line)
        text = ''.join(c if c.isprintable() else '?' for c in text)
    return text if limit is None or len(text) <= limit \
        else text[:limit] + '...'


class CleanFormatter(logging.Formatter):
    """Every log line, on the terminal and in the file, passes clean_text:
    a message that quotes another host's text cannot carry an escape
    sequence, whichever path it took."""

    def format(self, record):
        return clean_text(super().format(record), None, lines=True)


# A request stored with warnings (what a module could not back up, the
# rest being stored) carries them to the node as warned=<base64url of the
# lines>: at most this many lines of this many characters, so that the
# request stays far below max_request_size.
WARNINGS_SENT, WARNING_CHARS = 10, 300
WARNED_RE = r'[A-Za-z0-9_-]{1,2200}={0,2}'


def warning_text(line, limit=WARNING_CHARS):
    """One warning line cleaned, and cut in the middle when too long: a
    path too long keeps its start and what tar said of it."""
    line = clean_text(line, len(line))
    if len(line) <= limit:
        return line
    half = (limit - 5) // 2
    return line[:half] + ' ... ' + line[-half:]


def encode_warnings(lines):
    """The warned= value of a request for these warning lines."""
    text = '\n'.join(warning_text(line) for line in lines[:WARNINGS_SENT])
    return base64.urlsafe_b64encode(
        text.encode('utf-8', 'replace')).decode('ascii')


def decode_warnings(value):
    """The warning lines of a request's warned= (text from another host:
    bounded and cleaned of control characters)."""
    try:
        raw = base64.urlsafe_b64decode(value.encode('ascii'))
    except (ValueError, UnicodeError):
        return ['(unreadable warned= value)']
    lines = raw.decode('utf-8', 'replace').split('\n')[:WARNINGS_SENT]
    return [warning_text(line) for line in lines if line]


def pause_point(name):
    """Fault-injection hook for the crash tests: when $GITBACKUP_PAUSE_AT
    names this point (comma-separated list), stop here until killed, or
    for $GITBACKUP_PAUSE_SECONDS, or until the file $GITBACKUP_PAUSE_UNTIL
    exists, and then go on."""
    if name in os.environ.get('GITBACKUP_PAUSE_AT', '').split(','):
        log.warning('pausing at %s (GITBACKUP_PAUSE_AT)', name)
        seconds = float(os.environ.get('GITBACKUP_PAUSE_SECONDS') or 'inf')
        until = os.environ.get('GITBACKUP_PAUSE_UNTIL')
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and \
                not (until and os.path.exists(until)):
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


class Lock:
    """An flock(2) lock file.  The kernel drops it when its holder dies, so a
    lock can never go stale; the file holds the pid for the humans.
    ``acquire(shared=True)`` takes it shared: any number of readers at
    once, none while an exclusive holder has it (and the pid in the file
    stays the last exclusive holder's)."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def acquire(self, wait=0.0, shared=False):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o664)
        deadline = time.monotonic() + wait
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        if not shared:
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
# Request pools: the one place a request changes state

class Pool:
    """A request pool: a directory with one file per request, its state the
    prefix of the file name (client ``i C P F X``, node ``RQ P F X``).

    ``move`` is the only way a request changes state, on both sides: one
    rename(2), then fsync of the directory, so a state once reached
    survives a power loss (every request file is fsynced when written,
    before it enters the pool; a rename changes only the directory).  A request another process moved first
    is reported (``False``), never an error: cron jobs and hooks race.
    """

    def __init__(self, path, states, key_re, ignore_suffix='.reason'):
        self.path = path
        # Longest prefix first: 'RQ' must not be read as state 'R'.
        self.states = tuple(sorted(states, key=len, reverse=True))
        self.order = tuple(states)
        self.key_re = key_re
        self.ignore_suffix = ignore_suffix

    def file(self, state, key):
        return os.path.join(self.path, state + key)

    def split(self, filename):
        """'<state><key>' -> (state, key), or (None, None) for anything
        else (notes beside requests, lock and marker files)."""
        if self.ignore_suffix and filename.endswith(self.ignore_suffix):
            return None, None
        for state in self.states:
            if filename.startswith(state) and \
                    self.key_re.match(filename[len(state):]):
                return state, filename[len(state):]
        return None, None

    def list(self):
        """{state: [keys, sorted]}."""
        found = {state: [] for state in self.order}
        try:
            names = os.listdir(self.path)
        except FileNotFoundError:
            return found
        for name in names:
            state, key = self.split(name)
            if state:
                found[state].append(key)
        for keys in found.values():
            keys.sort()
        return found

    def keys(self):
        return {key for keys in self.list().values() for key in keys}

    def create(self, mode=0o775):
        """Make the pool directory, durably (its entry in the parent)."""
        make_dirs(self.path, mode=mode)

    def move(self, key, src, dst):
        """Rename <src><key> to <dst><key>; False if it was not there."""
        return self.move_all([key], src, dst) == 1

    def move_all(self, keys, src, dst):
        """move() of several requests, with one directory fsync for all;
        returns how many were moved."""
        moved = 0
        for key in keys:
            target = self.file(dst, key)
            try:
                os.rename(self.file(src, key), target)
            except FileNotFoundError:
                continue
            moved += 1
        if moved:
            fsync_dir(self.path)
        return moved

    def adopt(self, files, state):
        """Rename complete, fsynced files (another directory of the same
        file system: ingest's .incomplete/) into the pool as <state><key>.
        ``files`` is [(path, key)]."""
        for path, key in files:
            os.rename(path, self.file(state, key))
        if files:
            fsync_dir(self.path)

    def lock(self):
        return Lock(os.path.join(self.path, '.lock'))


class Attempts:
    """One retry policy for both sides: a request that fails for a reason
    that may pass is retried by later runs; after max_attempts failures it
    is given up (X*, kept with ``X<key>.reason`` beside it, admins told).
    The count lives in ``<pool>/.attempts/<key>``, never in the request
    file: a request stays what its author wrote."""

    def __init__(self, pool, limit):
        self.pool, self.limit = pool, limit
        self.dir = os.path.join(pool.path, '.attempts')

    def path(self, key):
        return os.path.join(self.dir, key)

    def count(self, key):
        return (read_json(self.path(key), {}) or {}).get('attempts', 0)

    def failed(self, key, error):
        """Record one failure; return (attempts so far, given up?)."""
        state = read_json(self.path(key), {}) or {}
        state['attempts'] = state.get('attempts', 0) + 1
        state.setdefault('first', isotime())
        state['last'] = isotime()
        state['error'] = clean_text(error, 2000)
        make_dirs(self.dir)
        write_json(self.path(key), state)
        return state['attempts'], state['attempts'] >= self.limit

    def give_up(self, key, src, reason, failed_state='X'):
        """Move <src><key> to X<key> with the reason beside it."""
        reason = clean_text(reason, 2000)
        atomic_write(self.pool.file(failed_state, key) + '.reason',
                     f'{isotime()} {reason}\n', mode=0o664)
        self.pool.move(key, src, failed_state)
        return reason

    def reason(self, key, failed_state='X'):
        try:
            with open(self.pool.file(failed_state, key) + '.reason',
                      encoding='utf-8', errors='replace') as f:
                return f.read().strip()
        except FileNotFoundError:
            return ''

    def clear(self, key):
        try:
            os.unlink(self.path(key))
        except FileNotFoundError:
            pass

    def retry(self, key, dst, failed_state='X'):
        """Put a given-up request back (X -> dst, e.g. C or RQ) with a
        fresh count; its reason is appended to ``.attempts/<key>.history``
        so why it once failed stays on record.  False if it was not X.
        Order: count and reason first, the move last, so a crash leaves an
        X* that a second retry takes."""
        if not os.path.exists(self.pool.file(failed_state, key)):
            return False
        self.clear(key)
        reason_path = self.pool.file(failed_state, key) + '.reason'
        reason = self.reason(key, failed_state)
        if reason:
            make_dirs(self.dir)
            with open(self.path(key) + '.history', 'a',
                      encoding='utf-8') as f:
                f.write(f'{reason}\n{isotime()} put back by retry\n')
                f.flush()
                os.fsync(f.fileno())
            os.unlink(reason_path)
        return self.pool.move(key, failed_state, dst)


# --------------------------------------------------------------------------
# Ledgers and journals

def sha1_repository(repo):
    """Whether a repository's objects are SHA-1 (the ledgers write their
    objects themselves, as SHA-1), from its config file, without starting
    git: a host whose init.defaultObjectFormat is sha256 makes SHA-256
    repositories unless told otherwise (we tell: git_init_sha1)."""
    try:
        with open(os.path.join(repo, 'config')) as f:
            text = f.read()
    except OSError:
        return True
    m = re.search(r'^\s*objectformat\s*=\s*(\w+)', text, re.M | re.I)
    return not m or m.group(1).lower() == 'sha1'


def git_init_sha1():
    """`git init` for a ledger's repository: SHA-1 whatever the host's
    default (GIT_DEFAULT_HASH, init.defaultObjectFormat); git before 2.29
    knows only SHA-1 and not the option."""
    return ['init', '--object-format=sha1'] if git_version()[0] >= (2, 29) \
        else ['init']


def write_git_object(repo, kind, body):
    """Store one loose object in a (SHA-1) repository as git does: zlib of
    '<kind> <size>\\0<body>' in objects/xx/<rest>, written under a temporary
    name and renamed, read-only, its directory as shared as objects/.
    The file is fsynced before the rename, as git does with core.fsync
    (what every git command of ours runs with): the ref that will point to
    it must never survive a power loss that the object did not.  Returns
    the object id."""
    data = f'{kind} {len(body)}\0'.encode() + body
    oid = hashlib.sha1(data).hexdigest()
    objects = os.path.join(repo, 'objects')
    directory = os.path.join(objects, oid[:2])
    path = os.path.join(directory, oid[2:])
    if os.path.exists(path):
        return oid
    if not os.path.isdir(directory):
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, os.stat(objects).st_mode & 0o7777)
    fd, tmp = tempfile.mkstemp(prefix='tmp_obj_', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(zlib.compress(data))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return oid


def ref_from_files(repo, ref):
    """The commit a branch points to, read from the repository's files
    without starting git ('' when it does not exist), or None when the
    files do not tell (another ref storage, a symbolic ref).  Only for
    checks that git confirms: a re-read under a lock, a compare-and-swap
    update-ref (one git process less per client and run on a node)."""
    if os.path.exists(os.path.join(repo, 'reftable')):
        return None
    try:
        with open(os.path.join(repo, ref)) as f:
            value = f.read().strip()
        return value if re.fullmatch(r'[0-9a-f]{40}', value) else None
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        with open(os.path.join(repo, 'packed-refs')) as f:
            for line in f:
                sha, _, name = line.rstrip('\n').partition(' ')
                if name == ref and re.fullmatch(r'[0-9a-f]{40}', sha):
                    return sha
    except FileNotFoundError:
        pass
    return ''


class Ledger:
    """One branch of a bare repository used as an append-only ledger: each
    commit holds only its new files (as the seed's request commits do),
    built with plumbing (no work tree, no index) and published by
    compare-and-swap, so a concurrent writer fails loudly instead of
    losing a commit."""

    def __init__(self, repo, ref, author):
        self.repo, self.ref, self.author = repo, ref, author

    def tip(self):
        return git(self.repo, 'rev-parse', '--verify', '--quiet',
                   self.ref + '^{commit}', check=False).stdout.strip()

    def append(self, files, message, parent=None):
        """Commit [(name, text)] on the branch; return the commit.  parent:
        the branch's tip when the caller has just read it ('' for none),
        else it is read here.

        The blobs, the tree and the commit are written here as loose
        objects, exactly as git writes them (fsynced, as git does with our
        core.fsync); one `git update-ref` then moves the branch by
        compare-and-swap, checking that the new tip is a commit.  The
        plumbing per object (hash-object per file, mktree, commit-tree)
        was 4 + files processes: most of a node run's cost per client."""
        if not sha1_repository(self.repo):
            raise GitBackupError(
                f'{self.repo}: a SHA-256 repository; gitbackup needs SHA-1 '
                'here: move it aside and create it again (client: '
                'init-node; node: provision or add-client)')
        if parent is None:
            parent = self.tip()
        entries = []
        for name, content in sorted(files, key=lambda f: f[0].encode()):
            if not name or '/' in name or '\0' in name:
                raise ValueError(f'ledger file name {name!r}')
            blob = write_git_object(self.repo, 'blob', content.encode(
                'utf-8', 'surrogateescape'))
            entries.append(name.encode() + b'\0' + bytes.fromhex(blob))
        tree = write_git_object(self.repo, 'tree', b''.join(
            b'100644 ' + e for e in entries))
        who = (f'gitbackup {self.author} <gitbackup@{self.author}> '
               f'{int(time.time())} +0000')
        commit = write_git_object(self.repo, 'commit', (
            f'tree {tree}\n' + (f'parent {parent}\n' if parent else '') +
            f'author {who}\ncommitter {who}\n\n{message}').encode())
        git(self.repo, 'update-ref', self.ref, commit, parent or ZERO_ID)
        return commit

    def knows(self, marker):
        """Whether marker names a commit of this repository."""
        return bool(re.fullmatch(r'[0-9a-f]{40}', marker or '')) and git(
            self.repo, 'cat-file', '-e', marker + '^{commit}',
            check=False).returncode == 0

    def since(self, marker, tip=None):
        """The commits after marker up to tip (default: the branch),
        oldest first; all of them when marker is not a known commit."""
        tip = tip or self.tip()
        if not tip:
            return []
        revs = [tip]
        if self.knows(marker):
            revs.append('^' + marker)
        return git(self.repo, 'rev-list', '--reverse', *revs).stdout.split()


class Journal:
    """An append-only file of JSON lines (the results of requests).

    Appends start on a fresh line, so a line torn by a crash or a full
    disk never swallows the next entry; readers skip torn and malformed
    lines (logged once per reader)."""

    def __init__(self, path):
        self.path = path

    def append(self, entries):
        if not entries:
            return
        make_dirs(os.path.dirname(os.path.abspath(self.path)))
        with open(self.path, 'ab') as f:
            data = ''.join(json.dumps(e, sort_keys=True) + '\n'
                           for e in entries).encode('utf-8')
            if f.tell() > 0:
                with open(self.path, 'rb') as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b'\n':
                        data = b'\n' + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def read(self, offset=0):
        """(entries that are JSON objects, offset after the last complete
        line) from offset on."""
        try:
            with open(self.path, 'rb') as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return [], offset
        data = data[:data.rfind(b'\n') + 1]  # a line being written waits
        entries, skipped = [], 0
        for line in data.decode('utf-8', 'replace').splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if isinstance(entry, dict):
                entries.append(entry)
            elif line.strip():
                skipped += 1
        if skipped:
            log.warning('%s: skipped %d torn or malformed line(s)',
                        self.path, skipped)
        return entries, offset + len(data)


# --------------------------------------------------------------------------
# Configuration

def find_config(path, script, environ=None):
    """--config PATH, else $GITBACKUP_CONFIG, else backup.ini by the script."""
    environ = os.environ if environ is None else environ
    if path:
        return path
    if environ.get('GITBACKUP_CONFIG'):
        return environ['GITBACKUP_CONFIG']
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
        self.parser = parser = self._read(path)
        lines = _line_numbers(path)
        # A mistake in one [client NAME] (a shared file with many) is that
        # client's problem, not the node's: its requests wait as
        # misconfigured, `report` and `check` name it, the others go on.
        self.client_problems = {}
        for section in parser.sections():
            try:
                self._check_section(path, lines, section)
            except ConfigError as e:
                if not section.startswith('client ') or \
                        self._schema_of(section) is None:
                    raise
                self.client_problems[section[len('client '):].strip()] = \
                    str(e)
        if parser.has_section('mail'):
            problems = sendmail.mail_config_problems(dict(parser['mail']))
            if problems:
                raise ConfigError(f'{path}: {problems[0]}')

    @staticmethod
    def _read(path):
        """The INI file parsed as written (no interpolation, keys keep
        their case); ConfigError if it is missing, unreadable or
        malformed."""
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
        return parser

    def _check_section(self, path, lines, section):
        """ConfigError, naming the line, for the first problem of a
        section: unknown section, unknown or badly named key, bad value,
        missing required key, bad admin address."""
        schema = self._schema_of(section)
        if schema is None and section not in FREE_SECTIONS:
            raise ConfigError(
                f'{path}:{lines.get((section, None), "?")}: unknown '
                f'section [{section}]')
        self._check_keys(path, lines, section, schema)
        if schema is None:
            return  # a free-form section: any value, nothing required
        self._check_values(path, lines, section, self._types_of(section))
        missing = [k for k, v in schema.items()
                   if v is REQUIRED and not self.parser[section].get(k)]
        if missing:
            raise ConfigError(
                f'{path}:{lines.get((section, None), "?")}: '
                f'[{section}] lacks {", ".join(missing)}')
        if 'admin' in schema:
            self._check_admins(path, lines, section)

    def _check_keys(self, path, lines, section, schema):
        """Keys of a section with a schema must be in it; keys of a
        free-form section must be valid names."""
        for key in self.parser[section]:
            at = f'{path}:{lines.get((section, key), "?")}'
            if schema is not None and key not in schema:
                raise ConfigError(
                    f'{at}: unknown key {key!r} in [{section}] (known: '
                    f'{", ".join(sorted(schema))})')
            if schema is None and not NAME_RE.match(key):
                raise ConfigError(f'{at}: bad name {key!r} in [{section}]')

    def _check_values(self, path, lines, section, types):
        """Durations, sizes and whole numbers, as the section's types say,
        must parse (empty values mean the default)."""
        for key, value in self.parser[section].items():
            if not value:
                continue
            try:
                if types.get(key) == 'duration':
                    parse_duration(value)
                elif types.get(key) == 'size':
                    parse_size(value)
                elif types.get(key) == 'number' and \
                        not re.fullmatch(r'\d+', value):
                    raise ValueError(f'not a whole number: {value!r}')
                elif key in CHOICE_KEYS and value not in CHOICE_KEYS[key]:
                    raise ValueError(f'{value!r}: want one of '
                                     + ', '.join(CHOICE_KEYS[key]))
            except ValueError as e:
                raise ConfigError(f'{path}:{lines.get((section, key), "?")}'
                                  f': [{section}] {key}: {e}') from None

    def _check_admins(self, path, lines, section):
        """The admin addresses must be ones sendmail accepts."""
        admins = self.parser[section].get('admin', '').split()
        try:
            if admins:
                sendmail.check_receivers(admins)
        except sendmail.MailError as e:
            # A bad address would silently swallow every alert.
            raise ConfigError(f'{path}:{lines.get((section, "admin"), "?")}'
                              f': [{section}] admin: {e}') from None

    @staticmethod
    def _schema_of(section):
        if section in SCHEMA:
            return SCHEMA[section]
        if section.startswith('client '):
            return SCHEMA['client *']
        return None

    @staticmethod
    def _types_of(section):
        if section in TYPES:
            return TYPES[section]
        return TYPES['client *'] if section.startswith('client ') else {}

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
    handler.setFormatter(CleanFormatter(f'{program}: %(message)s'))
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
            handler.setFormatter(CleanFormatter(
                '%(asctime)s [%(process)d] %(levelname)s %(message)s'))
            log.addHandler(handler)


def mail_admins(config, section, subject, body, admins=None):
    """Mail the admins of a section (or the given ones; the section still
    names the log_dir whose queue keeps undelivered mail).  A failed
    delivery is queued by sendmail.py and logged, never raised: mail must
    not stop a backup."""
    admins = config.admins(section) if admins is None else admins
    if not admins:
        log.info('no admin configured in [%s]; not mailing: %s', section,
                 subject)
        return False
    # Mail bodies quote other hosts' text (stderr, results): cleaned here,
    # once for every mail.
    subject, body = clean_text(subject, 300), clean_text(body, None, True)
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
                          last_error=clean_text(error, 2000),
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

class ModuleContext:
    """What every module hook sees as its first argument: the
    configuration, its side's settings ([client] or [server]), the log and
    the helpers.  ``check_path`` gets this; ``prepare`` (client) and
    ``handle`` (node) get a subclass with the request's details."""

    ModuleError = ModuleError
    ToolMissing = ToolMissing
    RequestRefused = RequestRefused
    TransientError = TransientError
    Unreachable = Unreachable
    TimedOut = TimedOut
    CommandFailed = CommandFailed
    NoSpace = NoSpace
    Misconfigured = Misconfigured
    AccessDenied = AccessDenied
    ACCESS_DENIED_HINT = ACCESS_DENIED_HINT

    def __init__(self, config, side):
        self.config = config
        self.side = side
        self.settings = config.section(side)
        self.log = log
        self.run = run
        self.timeout = config.get_duration(side, 'command_timeout')

    # helpers modules use, as functions of the context
    pause_point = staticmethod(lambda name: pause_point(name))
    fsync_dir = staticmethod(lambda path: fsync_dir(path))
    atomic_write = staticmethod(lambda *a, **k: atomic_write(*a, **k))
    sha256_file = staticmethod(lambda path: sha256_file(path))
    now = staticmethod(lambda: isotime())
    kill_tree = staticmethod(lambda proc: kill_tree(proc))
    clean_text = staticmethod(lambda *a: clean_text(*a))
    ssh_problem = staticmethod(lambda *a: ssh_problem(*a))
    make_dirs = staticmethod(lambda *a: make_dirs(*a))
    git_program = staticmethod(lambda: git_program())
    shell_line = staticmethod(lambda words: shell_line(words))

    def ssh_timeout_options(self):
        return ssh_timeout_options(self.config, self.side)

    @staticmethod
    def connection_lost(stderr):
        return bool(CONNECTION_LOST_RE.search(stderr or ''))

    @staticmethod
    def access_denied(stderr):
        return bool(ACCESS_DENIED_RE.search(stderr or ''))


class SharedSSH:
    """One ssh connection (one handshake) shared by the ssh and sftp
    commands of one client's turn, through a private socket (OpenSSH
    connection sharing).  Opened by the first command that asks, closed
    with the turn.  The master is our own child in a process group of its
    own, not a ControlPersist daemon: close() ends it and kills what is
    left, so a killed or stalled transfer never leaves a connection
    behind; a command killed by watch() takes only its own channel."""

    def __init__(self, ssh_words, target, registry=None):
        self.ssh_words = list(ssh_words)   # the ssh program and options
        self.target = target
        # A directory where each live master leaves <pid> (its socket's
        # path inside): a run killed with SIGKILL cannot close its master,
        # so the next turn for the client reaps it (reap_shared_ssh).
        self.registry = registry
        self.proc = self.directory = self.path = self.proc_status = None
        self.failed = False

    def options(self, timeout):
        """ssh options that make a command use the shared connection,
        opening it first if needed.  Raises AccessDenied when ssh refused
        the login or the host key, Unreachable when it could not connect
        (what sftp's own ssh would have found, in as long); [] when the master could not be used otherwise: the
        command then connects by itself."""
        if self.proc is None and not self.failed:
            error = self.start(timeout)
            if error is not None and ACCESS_DENIED_RE.search(error):
                # A refused login waits for a human: alerted at once.
                raise AccessDenied(f'ssh to {self.target} failed: {error} '
                                   f'({ACCESS_DENIED_HINT})')
            if error is not None:
                raise Unreachable(f'ssh to {self.target} failed: {error}')
        if self.proc is None or self.proc.poll() is not None:
            return []
        return ['-o', 'ControlMaster=no', '-o', f'ControlPath={self.path}']

    def start(self, timeout):
        # A private 0700 directory, short enough for a socket's path.
        self.directory = tempfile.mkdtemp(prefix='gitbackup-ssh-')
        self.path = os.path.join(self.directory, 'master')
        args = [*self.ssh_words, '-M', '-N', '-o', 'ControlPersist=no',
                '-o', f'ControlPath={self.path}', '--', self.target]
        log.debug('running: %s', shell_line(args))
        # stderr to a file: nobody reads a pipe while the master runs.
        with tempfile.TemporaryFile(dir=self.directory) as err:
            try:
                self.proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=err, start_new_session=True)
            except FileNotFoundError:
                self.close()
                return None
            self.register()
            # The socket appears once the master has authenticated.
            deadline = time.monotonic() + timeout
            while not os.path.exists(self.path):
                exited = self.proc.poll() is not None
                if exited or time.monotonic() > deadline:
                    err.seek(0)
                    text = err.read().decode('utf-8', 'replace').strip()
                    self.close()
                    return clean_text(f'exit {self.proc_status}: {text}',
                                      1000) if exited else None
                time.sleep(0.01)
        return None

    def close(self):
        """End the master (SIGTERM: ssh closes the connection cleanly),
        then kill its process group whatever it did; remove the socket's
        directory.  Idempotent."""
        self.failed = True      # never reopened within this turn
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            kill_tree(self.proc)
            self.proc_status = self.proc.returncode
            if self.registry:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.registry, str(self.proc.pid)))
            self.proc = None
        if self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def register(self):
        if self.registry:
            make_dirs(self.registry)
            atomic_write(os.path.join(self.registry, str(self.proc.pid)),
                         self.path + '\n')


def reap_shared_ssh(registry):
    """End the shared-ssh masters a killed run left behind (see
    SharedSSH.registry).  Call it holding the lock of the registry's owner
    (the client's run lock), so no live run's master is among them.  A pid
    counts only while its command line still names the recorded socket: a
    pid the kernel reused is left alone."""
    try:
        names = os.listdir(registry)
    except FileNotFoundError:
        return
    for name in filter(str.isdigit, names):
        entry = os.path.join(registry, name)
        try:
            with open(entry) as f:
                path = f.read().strip()
            with open(f'/proc/{name}/cmdline', 'rb') as f:
                alive = f'ControlPath={path}'.encode() in f.read()
        except OSError:
            alive = False
        if alive and path:
            log.info('ending the ssh connection %s left by a killed run '
                     '(pid %s)', path, name)
            with contextlib.suppress(OSError):
                os.killpg(int(name), signal.SIGKILL)
        if os.path.basename(os.path.dirname(path)).startswith(
                'gitbackup-ssh-'):
            shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry)


class BackupModule:
    """A module file in modules/: a Python file (``prepare`` for the
    client, ``handle`` for the node, optional ``check_path``) or an
    executable in any language (docs/modules.md, "Writing a module")."""

    def __init__(self, name, path, python=None):
        self.name, self.path, self.python = name, path, python

    def has(self, function):
        return self.python is not None and hasattr(self.python, function)

    def run_executable(self, args, env, timeout):
        """Run an executable module; return the (ident, content) pairs of
        the ``ID CONTENT`` lines it prints (the seed's add_queue)."""
        try:
            out = run([self.path, *args], env=env, timeout=timeout).stdout
        except CommandFailed as e:
            raise ModuleError(f'module {self.name}: {e}') from None
        produced = []
        for line in out.splitlines():
            if line.strip():
                ident, _, content = line.strip().partition(' ')
                produced.append((ident, content))
        return produced


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
# Operations and command lines both scripts share

def gc_repositories(config, section, repos, aggressive=False, where=''):
    """`git gc` of each repository, as the seed's git_gc.sh: the collected
    log goes to <log_dir>/git-gc-<time>.log and to the admins.  One failure
    does not stop the others.  Returns the repositories whose gc failed."""
    timeout = config.get_duration(section, 'command_timeout')
    lines, failed = [], []
    # Another account's repository beside ours (gitosis-admin.git, the
    # git account's own): not ours to gc, and trying fails every month.
    skipped = [r for r in repos if not ours(os.stat(r))]
    if skipped:
        lines += [f'skipped {len(skipped)} repositories this user does not '
                  f'own: {" ".join(skipped)}', '']
        log.info('gc: skipped %d repositories %s does not own: %s',
                 len(skipped), user_name(os.geteuid()), ' '.join(skipped))
    repos = [r for r in repos if r not in skipped]
    for repo in repos:
        before = tree_size(repo)
        started = time.monotonic()
        args = [*git_program(), f'--git-dir={repo}', 'gc']
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
