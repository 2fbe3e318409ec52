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

``send``, per node, in order (``NodeLink.send``)::

    claim      C* -> P*; P* left by a crash: committed already, or prepare
    prepare    each request's module writes its export, returns server
               requests; a failure costs an attempt (X* after max_attempts)
    commit     the server requests as RQ* files, batches of max_batch
    push       master to the node; a failure keeps everything for next run
    finish     P* -> F* (only after the push succeeded)
    confirm    fetch the node's results; remove exports it stored

Guarantees:

* A request file changes state only by ``rename(2)`` (``Pool.move`` in
  modules/_core.py): ``i*`` being written, ``C*`` complete, ``P*`` being
  processed, ``F*`` finished (pushed), ``X*`` failed after
  ``max_attempts`` (kept with ``X*.reason``, admins mailed).
* A request becomes ``F*`` only after the push that carries it succeeded.
  A failed push keeps every request; the next ``send`` pushes all local
  commits at once.  A crash between preparing and pushing is recovered from
  the queue repository's history, so nothing is sent twice or lost.
* Prepared data is streamed to disk and hashed in chunks: memory stays flat
  whatever the size of a backup.
* A second concurrent ``send`` exits 0 at once (cron-safe).

The plumbing shared with server.py lives in modules/_core.py: install both
scripts, ``sendmail.py`` and ``modules/`` together, as one directory.
"""

import argparse
import datetime
import errno
import fcntl
import functools
import glob
import hashlib
import json
import logging
import os
import re
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

# The oldest Python this script runs on (and is tested with): the default
# python3 of RHEL 8 and SLES 15.  server.py needs 3.8.
MIN_PYTHON = (3, 6)
if sys.version_info < MIN_PYTHON:
    sys.exit('client.py: Python %d.%d or later is required, this is %s'
             % (MIN_PYTHON + (sys.version.split()[0],)))
# What must be installed beside this script, as one directory.
BESIDE = ('sendmail.py', os.path.join('modules', '_core.py'))
HERE = os.path.dirname(os.path.abspath(__file__))
for _name in BESIDE:
    if not os.path.isfile(os.path.join(HERE, _name)):
        sys.exit('client.py: %s is missing in %s: install client.py, '
                 'sendmail.py and modules/ together' % (_name, HERE))

sys.path.insert(0, HERE)
from modules._core import (  # noqa: E402  (shared core, installed beside us)
    request_id_of, ACCESS_DENIED_HINT, ACCESS_DENIED_RE, CHUNK, NAME_RE,
    REQUEST_ID, REQUEST_ID_RE, VERSION, ZERO_ID, Attempts, CommandFailed,
    atomic_write, Config, ConfigError, GitBackupError, Health, Journal, Ledger,
    ModuleContext, ModuleError, Pool, ToolMissing, UsageError,
    check_git_version, check_run_user, git_init_sha1, clean_text,
    encode_warnings, warning_text,
    common_options, connection_line, directory_problems, ssh_problem,
    exclusive, find_config, flush_mail_queue, gc_repositories, git, guarded,
    isotime, kill_tree, load_module, log, log_file_problems, lower_priority,
    mail_admins, make_dirs, mail_summary, owner_of,
    new_request_id, older_than, pause_point, problem, read_json,
    ref_from_files, remove_listed,
    run, setup_logging, sha256_file, shell_line, ssh_timeout_options,
    timestamp, write_json, fsync_dir)
from modules import _schedule  # noqa: E402
from modules import fs as fs_module  # noqa: E402  (what archives carry)

# Client pool states (file name prefixes).
INCOMPLETE, COMPLETE, PROCESSING, FINISHED, FAILED = 'i', 'C', 'P', 'F', 'X'
CLIENT_STATES = (INCOMPLETE, COMPLETE, PROCESSING, FINISHED, FAILED)

# tar's options and file suffix for each [client] compression.  zstd runs
# with [client] compression_threads threads (-T; default 4, 0 = one per
# core) at its default level: gzip was 85% of a backup's time, and zstd
# passes already-compressed data through fast.  2 MiB jobs (-B2M) keep its
# memory near 24 MiB on 2 threads (67 MiB with its default job size) at
# the same speed and ratio; each thread adds about that much.  tar splits
# the program's words itself; no shell is involved.
ZSTD_PROGRAM = 'zstd -T{threads} -3 -B2M'
COMPRESSION = {
    'gzip': (['--gzip'], '.tar.gz'),
    'xz': (['--xz'], '.tar.xz'),
    'zstd': (['--use-compress-program=' + ZSTD_PROGRAM], '.tar.zst'),
    'bzip2': (['--bzip2'], '.tar.bz2'),
    'none': ([], '.tar'),
}
COMPRESSION_CHOICES = ('auto',) + tuple(COMPRESSION)
_tar_knows_zstd = {}


def tar_knows_zstd(tar_command):
    """Whether tar (as [client] tar_command runs it) reads .tar.zst by
    itself (GNU tar >= 1.31 lists --zstd in its help) and zstd is
    installed: then the node and a restore need nothing special."""
    if tar_command not in _tar_knows_zstd:
        found = False
        if shutil.which('zstd'):
            try:
                proc = subprocess.run(
                    shlex.split(tar_command) + ['--help'],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, timeout=30,
                    env={**os.environ, 'LC_ALL': 'C'})
                found = b'--zstd' in proc.stdout
            except (OSError, subprocess.TimeoutExpired):
                pass
        _tar_knows_zstd[tar_command] = found
    return _tar_knows_zstd[tar_command]


def effective_compression(settings):
    """The compression [client] compression means here: `auto` is
    multithreaded zstd when tar and zstd support it, else gzip."""
    name = settings['compression']
    if name == 'auto':
        return 'zstd' if tar_knows_zstd(settings['tar_command']) else 'gzip'
    return name


def compression_options(settings):
    """(tar options, file suffix) of the effective compression."""
    name = effective_compression(settings)
    if name not in COMPRESSION:
        raise ModuleError(f'[client] compression = {name}: use one of '
                          f'{", ".join(COMPRESSION_CHOICES)}')
    threads = settings['compression_threads']
    options, suffix = COMPRESSION[name]
    return [o.format(threads=threads) for o in options], suffix


def compression_text(settings):
    """One line for check and status: what archives are compressed with."""
    name = effective_compression(settings)
    how = name
    if name == 'zstd':
        how = 'zstd, multithreaded (%s)' % ZSTD_PROGRAM.format(
            threads=settings['compression_threads'])
    if settings['compression'] == 'auto':
        how += ' (auto' + ('' if name == 'zstd' else
                           ': tar or zstd lacks zstd support') + ')'
    return how

SERVER_REQUEST_RE = re.compile(r'^[a-z][a-z0-9_-]{0,31} [^\x00-\x1f\x7f]{1,3000}$')

# Warning lines of one request written to the log (all go to the node,
# bounded there).
WARNINGS_LOGGED = 50
# ... and shown per request by status.
WARNINGS_SHOWN = 5

# Kinds of ExportWait and how status names them.
EXPORT_WAITS = {'space': 'client disk full',
                'config': 'client directory missing or not writable'}

# What tar, pg_dump, git and Python say when the client's own disk is full:
# no fault of the request, so it waits for space instead of costing attempts
# (five failed sends would otherwise give up every request behind it).
NO_SPACE_RE = re.compile(r'No space left on device|Disk quota exceeded')
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A directory of the client's own that is missing or not writable is a
# configuration to fix once, not a reason to give requests up.
OWN_DIR_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR,
                  errno.EROFS)


# What a result from a node must look like to be read at all: results are
# data from another host (a compromised node forges them), never trusted.
RESULT_KEY_RE = re.compile(
    f'^[0-9a-f]{{40}}-RQ{REQUEST_ID}-[A-Za-z0-9._-]{{1,100}}$')
RESULT_OUTCOMES = ('stored', 'failed', 'empty')
# The refs of a queue repository send relies on: its ledger and the copies
# of the node's branches (a broken copy is simply fetched again).
QUEUE_REFS = ('refs/heads/master', 'refs/remotes/origin/master',
              'refs/remotes/origin/results')
HEAD_RE = re.compile(r'ref: refs/\S+|[0-9a-f]{40}')
RESULT_TIME_RE = re.compile(r'^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z$')


def result_problem(entry):
    """Why a result entry is malformed, or None when its fields have the
    types and shapes the client reads (a forged `"finished": 0` once made
    every later `status` die)."""
    if not isinstance(entry, dict):
        return 'not a JSON object'
    if not isinstance(entry.get('request'), str) or \
            not RESULT_KEY_RE.match(entry['request']):
        return 'bad request key'
    if entry.get('outcome') not in RESULT_OUTCOMES:
        return 'unknown outcome'
    if not isinstance(entry.get('finished'), str) or \
            not RESULT_TIME_RE.match(entry['finished']):
        return 'bad finished time'
    for field in ('stored', 'reason', 'started'):
        if not isinstance(entry.get(field), (str, type(None))):
            return f'bad {field}'
    warnings = entry.get('warnings', [])
    if not isinstance(warnings, list) or \
            not all(isinstance(w, str) for w in warnings) or \
            not isinstance(entry.get('warning_count', 0), int):
        return 'bad warnings'
    return None


def read_request(path):
    """(request module, path) of a client request file."""
    with open(path, encoding='utf-8', errors='surrogateescape') as f:
        first = f.readline().rstrip('\n')
    module, _, target = first.partition('\t')
    return module, target


def copy_hashing(proc, out, deadline):
    """Copy proc's stdout into out, hashing it: (sha256 hex, size).  Never
    blocks past deadline (then subprocess.TimeoutExpired)."""
    fd = proc.stdout.fileno()
    if hasattr(fcntl, 'F_SETPIPE_SZ'):
        try:    # bigger pipe, fewer wake-ups; Linux may refuse, that's fine
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, CHUNK)
        except OSError:
            pass
    digest, size = hashlib.sha256(), 0
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise subprocess.TimeoutExpired(proc.args, remaining)
            if not select.select([fd], [], [], min(remaining, 5))[0]:
                continue
            chunk = os.read(fd, CHUNK)
            if not chunk:
                return digest.hexdigest(), size
            out.write(chunk)
            digest.update(chunk)
            size += len(chunk)
    finally:
        proc.stdout.close()


# --------------------------------------------------------------------------
# What a module sees

class ExportWait(GitBackupError):
    """The client's own side stops a prepare: export_dir (or another disk it
    writes) is full (``kind`` 'space'), or one of its own directories is
    missing or not writable ('config').  The request waits as C* without
    costing an attempt; a Health record mails once (space: after
    alert_after; config: at once) and once on recovery."""

    def __init__(self, kind, text):
        super().__init__(text)
        self.kind = kind


def own_side_wait(error, own_dirs):
    """ExportWait if error is the client's own disk or directories, else
    None (the request's own fault: an attempt)."""
    if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS or \
            not isinstance(error, OSError) and NO_SPACE_RE.search(str(error)):
        return ExportWait('space', str(error))
    if isinstance(error, OSError) and error.errno in OWN_DIR_ERRNOS:
        where = os.path.abspath(str(error.filename or ''))
        for own in own_dirs:
            own = os.path.abspath(own)
            if where == own or where.startswith(own.rstrip('/') + '/'):
                return ExportWait('config', f'{error} (fix the directory: '
                                  'the requests wait meanwhile)')
    return None


class PrepareContext(ModuleContext):
    """What a client module's ``prepare`` sees for one request."""

    def __init__(self, link, request_id, module):
        super().__init__(link.client.config, 'client')
        self.link = link
        self.client = link.client
        self.node = link.node
        self.request_id = request_id
        self.problems = []
        # What the module could not back up though the rest is stored.
        self.warnings = []
        self.module = module
        self.timestamp = timestamp()
        # {published path: (sha256, size)} hashed while it was written.
        self.hashed = {}

    @property
    def export_root(self):
        return os.path.join(self.settings['export_dir'], self.request_id)

    def export_path(self, filename):
        """A path in this request's own directory of export_dir."""
        if not NAME_RE.match(filename):
            raise ModuleError(f'bad export file name {filename!r}')
        make_dirs(self.export_root, mode=0o750)
        return os.path.join(self.export_root, filename)

    def stream_command_to_file(self, args, path, env=None):
        """Run a command whose stdout is the backup into path.part, hashed
        on the way in 1 MiB chunks (memory stays flat, and sftp_request
        need not read the file again); publish() gives it its name only
        when complete.  A command still running after command_timeout is
        killed with everything it started.  Returns (exit status, stderr
        text)."""
        tmp = path + '.part'
        self.hashed.pop(path, None)
        with open(tmp, 'wb') as out, tempfile.TemporaryFile() as err:
            log.debug('running: %s > %s', shell_line(args), tmp)
            try:
                proc = subprocess.Popen(args, stdout=subprocess.PIPE,
                                        stderr=err, env=env,
                                        stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            except FileNotFoundError:
                raise ToolMissing(f'{args[0]}: not installed or not in PATH') \
                    from None
            deadline = time.monotonic() + self.timeout
            try:
                digest, size = copy_hashing(proc, out, deadline)
                status = proc.wait(
                    timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                kill_tree(proc)
                raise ModuleError(f'{shell_line(args)}: still running after '
                                  f'{self.timeout} s ([client] '
                                  'command_timeout); killed') from None
            except BaseException:
                kill_tree(proc)
                raise
            out.flush()
            os.fsync(out.fileno())
            err.seek(0)
            stderr = err.read().decode('utf-8', 'replace')
        self.hashed[path] = (digest, size)
        return status, stderr

    def warn(self, what, problems):
        """What a module could not back up while the rest of what is stored
        (a file tar could not read, a name too long, a file that vanished):
        named in the log now, and sent to the node with the request, which
        reports the request as stored with warnings.  Never silent."""
        if not problems:
            return
        self.warnings += problems
        log.warning('request %s: %s stored with %d warning(s):',
                    self.request_id, what, len(problems))
        for line in problems[:WARNINGS_LOGGED]:
            log.warning('  %s', warning_text(line, 1000))
        if len(problems) > WARNINGS_LOGGED:
            log.warning('  ... and %d more', len(problems) - WARNINGS_LOGGED)

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
        return compression_options(self.settings)

    def archive_chain(self, path):
        """The incremental state of one directory for this node, or None
        when [client] full_every = 0 (every archive full, no state)."""
        full_every = self.config.get_duration('client', 'full_every')
        return ArchiveChain(self, path, full_every) if full_every else None

    def publish(self, path):
        """Move a finished .part file into place (atomic rename)."""
        os.rename(path + '.part', path)
        fsync_dir(os.path.dirname(path))

    def sftp_request(self, path, source, companion=None, **options):
        """The server request that lets a node fetch one exported file,
        and with it a companion file in the same directory that describes
        it (an archive's listing, a dump's row statistics); options
        (level, base) are added as key=value."""
        sftp_export = self.settings.get('sftp_export')
        if not sftp_export:
            raise ModuleError('[client] sftp_export is not set: nodes cannot '
                              'fetch prepared files')
        digest, size = self.hashed.get(path, (None, -1))
        if size != os.path.getsize(path):
            digest, size = sha256_file(path)   # not written by us
        line = (f'sftp {self.timestamp} {sftp_export}:{path} sha256={digest} '
                f'size={size} source={source}')
        if companion:
            if os.path.dirname(companion) != os.path.dirname(path):
                raise ModuleError(f'{companion}: a companion file must be '
                                  f'beside {path}')
            c_digest, c_size = sha256_file(companion)
            line += (f' companion={os.path.basename(companion)} '
                     f'companion_sha256={c_digest} companion_size={c_size}')
        if self.warnings:
            options = dict(options, warnings=len(self.warnings),
                           warned=encode_warnings(self.warnings))
        return line + ''.join(f' {key}={value}'
                              for key, value in options.items())

    def executable_env(self):
        """The environment of an executable module (see docs/modules.md)."""
        return {**os.environ,
                'GITBACKUP_SIDE': 'client',
                'GITBACKUP_CLIENT': self.client.name,
                'GITBACKUP_NODE': self.node,
                'GITBACKUP_REQUEST_ID': self.request_id,
                'GITBACKUP_TIMESTAMP': self.timestamp,
                'GITBACKUP_EXPORT_DIR': self.export_root,
                'GITBACKUP_SFTP_EXPORT': self.settings.get('sftp_export', ''),
                'GITBACKUP_GIT_EXPORT': self.settings.get('git_export', ''),
                'GITBACKUP_GIT_BASE': self.settings.get('git_base', '')}


def snar_dump_time(path):
    """The dump time GNU tar wrote into a --listed-incremental snapshot
    file (seconds since the epoch), or None if it cannot be read.  Format
    1 and 2 files start with a 'GNU tar-<version>-<format>' line, then the
    seconds; format 0 files start with the seconds."""
    try:
        with open(path, 'rb') as f:
            head = f.read(256)
    except OSError:
        return None
    first, _, rest = head.partition(b'\n')
    m = re.match(b'[0-9]+', rest if first.startswith(b'GNU tar-') else head)
    return int(m.group(0)) if m else None


class ArchiveChain:
    """GNU tar's snapshot state (--listed-incremental) of one directory
    for one node, kept in state_dir/incremental/<node>/<module>-<hash>/ as
    <request id>.snar plus <request id>.json (level, base, when the chain's
    full was made, a sequence number, why a full was made).  The .json is
    written last: it is what makes an entry.

    An increment is built only on an entry whose archive the node reported
    stored (the results journal), so every link of a chain is on the node.
    tar updates a copy of the base's state; the copy becomes an entry only
    after the archive is published (``advance``).  A crash, a lost or an
    unconfirmed archive therefore means a full or an increment made again
    on the last confirmed base, never a hole.  A failed result for any
    entry newer than that base (the node refuses an increment whose chain
    it does not hold whole) starts a new chain with a full.

    Entries are ordered by a sequence this class keeps, never by their
    request ids (wall-clock time).  No increment is built across a clock
    step: a base whose tar dump time, making time or chain full lies in
    the future (the clock was ahead then, or went back since) would make
    files changed meanwhile look old to tar, and the increment would miss
    them; a full is made instead, with the reason logged and kept for
    ``status``."""

    def __init__(self, ctx, path, full_every):
        self.ctx = ctx
        self.path = path
        self.full_every = full_every
        digest = hashlib.sha256(path.encode('utf-8', 'surrogateescape')) \
            .hexdigest()[:16]
        self.directory = os.path.join(ctx.client.state_dir, 'incremental',
                                      ctx.node, '%s-%s' % (ctx.module, digest))
        self.own = os.path.join(self.directory, ctx.request_id)
        self.level, self.base, self.full_time = 0, None, time.time()
        self.why_full = ''

    def entries(self):
        """[(request id, entry)] oldest first, by the chain's sequence
        (entries older than sequences first, by request id)."""
        return read_chain_entries(self.directory)

    def choose_base(self):
        """(request id, entry) to build on, or None for a full (and why)."""
        results = self.ctx.link.results.read()
        entries = [(r, e) for r, e in self.entries()
                   if r != self.ctx.request_id]   # this request, prepared again
        now = time.time()
        step = clock_step(self.directory, entries, now)
        if step:
            return None, step
        for request_id, entry in reversed(entries):
            outcomes = {r.get('outcome')
                        for r in results.get(request_id, {}).values()}
            if 'failed' in outcomes:
                return None, 'the node refused or failed %s' % request_id
            if 'stored' in outcomes:
                # A negative age (a full stamped in the future) is a clock
                # step, caught above; never "fresh".
                if now - entry.get('full_time', 0) >= self.full_every:
                    return None, 'full_every has passed'
                return (request_id, entry), ''
        return None, 'no archive confirmed stored by the node'

    def start(self):
        """tar's options for this archive; its state goes to a copy."""
        make_dirs(self.directory, mode=0o750)
        part = self.own + '.snar.part'
        if os.path.exists(part):
            os.unlink(part)
        chosen, why = self.choose_base()
        if chosen:
            self.base, entry = chosen
            self.level = int(entry.get('level', 0)) + 1
            self.full_time = entry.get('full_time', 0)
            shutil.copyfile(os.path.join(self.directory, self.base + '.snar'),
                            part)
            log.info('request %s: increment level %d on %s',
                     self.ctx.request_id, self.level, self.base)
        else:
            self.why_full = why
            # A clock step or a refused chain is news to the admins; the
            # ordinary reasons are not.
            level = logging.INFO if why in ORDINARY_FULLS else logging.WARNING
            log.log(level, 'request %s: full archive of %s (%s)',
                    self.ctx.request_id, self.path, why)
        # Device numbers change across reboots on NFS and LVM: only the
        # inode and times tell that a file changed.
        return ['--listed-incremental=%s' % part, '--no-check-device']

    def advance(self):
        """The archive is published: its state becomes an entry; entries
        ordered before its base are no longer needed."""
        with open(self.own + '.snar.part', 'rb') as f:
            os.fsync(f.fileno())
        os.rename(self.own + '.snar.part', self.own + '.snar')
        entries = self.entries()
        seq = max([e.get('seq', 0) for _, e in entries
                   if isinstance(e.get('seq', 0), int)] or [0]) + 1
        write_json(self.own + '.json', {
            'level': self.level, 'base': self.base,
            'full_time': self.full_time, 'made': isotime(),
            'made_at': time.time(), 'seq': seq, 'module': self.ctx.module,
            'path': self.path, 'why_full': self.why_full})
        ids = [request_id for request_id, _ in entries]
        keep_from = ids.index(self.base) if self.base in ids else len(ids)
        for request_id in ids[:keep_from]:
            if request_id != self.ctx.request_id:
                for suffix in ('.json', '.snar'):
                    os.unlink(os.path.join(self.directory,
                                           request_id + suffix))

    def request_options(self):
        """level= and base= of the server request."""
        return {'level': self.level, **({'base': self.base}
                                         if self.base else {})}


# Why a full is made in the normal course of things (not worth a warning).
ORDINARY_FULLS = ('full_every has passed',
                  'no archive confirmed stored by the node')


def read_chain_entries(directory):
    """[(request id, entry)] of one ArchiveChain directory, in the order
    of the chain's own sequence."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        request_id = name[:-5]
        if name.endswith('.json') and REQUEST_ID_RE.match(request_id):
            entry = read_json(os.path.join(directory, name))
            if isinstance(entry, dict) and os.path.exists(
                    os.path.join(directory, request_id + '.snar')):
                found.append((request_id, entry))

    def order(item):
        seq = item[1].get('seq')
        return (seq if isinstance(seq, int) else 0, item[0])
    return sorted(found, key=order)


def clock_step(directory, entries, now):
    """Why no increment may be built on this chain because the clock
    stepped (a text), or '' when none did: an entry made later than now
    (the clock went back since), a chain full stamped in the future, or
    a base whose tar dump time lies in the future."""
    for request_id, entry in entries:
        full = entry.get('full_time')
        if isinstance(full, (int, float)) and full > now:
            return "the chain's full of %s is stamped in the future (%s)" % (
                request_id, isotime(utc_from_epoch(full)))
        dumped = snar_dump_time(os.path.join(directory, request_id + '.snar'))
        if dumped is not None and dumped > now:
            return 'the tar dump time of %s lies in the future (%s)' % (
                request_id, isotime(utc_from_epoch(dumped)))
        made = entry.get('made_at')
        if isinstance(made, (int, float)) and made > now:
            return 'the clock moved back since %s was made (%s)' % (
                request_id, entry.get('made'))
    return ''


def utc_from_epoch(seconds):
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)


def chain_status_lines(state_dir, node):
    """For `status`: each directory's chain on one node, its newest
    archive, and why its last full was made when that was news."""
    lines = []
    top = os.path.join(state_dir, 'incremental', node)
    try:
        chains = sorted(os.listdir(top))
    except FileNotFoundError:
        return lines
    for name in chains:
        entries = read_chain_entries(os.path.join(top, name))
        if not entries:
            continue
        request_id, newest = entries[-1]
        what = 'level %s on %s' % (newest.get('level'), newest.get('base')) \
            if newest.get('level') else 'full'
        lines.append('  chain %s %s: newest %s, %s' % (
            newest.get('module', name), newest.get('path', '?'), request_id,
            what))
        fulls = [(r, e) for r, e in entries if not e.get('level')]
        why = fulls[-1][1].get('why_full') if fulls else ''
        if why and why not in ORDINARY_FULLS:
            lines.append('    full %s made because %s' % (fulls[-1][0], why))
    return lines


# --------------------------------------------------------------------------
# The client

class Client:
    """The client as a whole: its configuration, modules and sources, and
    one NodeLink per node it sends to."""

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
        self.sends_path = os.path.join(self.state_dir, 'sends')
        # {repository: digest of its refs when its last request was made}
        self.git_refs_path = os.path.join(self.state_dir, 'git-refs.json')

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

    def link(self, node=None):
        return NodeLink(self, self.node_or_default(node))

    def links(self):
        return [NodeLink(self, node) for node in self.nodes]

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
        link = self.link(node)
        path = self.check_request(request_module, path)
        link.pool.create()
        request_id = new_request_id()
        incomplete = link.pool.file(INCOMPLETE, request_id)
        try:
            with open(incomplete, 'w', encoding='utf-8') as f:
                f.write(f'{request_module}\t{path}\n')
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            # A request that could not be written whole is no request: an
            # empty i* would be reported as torn by every later send.
            try:
                os.unlink(incomplete)
            except OSError:
                pass
            raise
        pause_point('commit:written')
        link.pool.move(request_id, INCOMPLETE, COMPLETE)
        log.debug('request %s: %s %s for %s', request_id, request_module,
                  path, link.node)
        if self.modules.get(request_module) == 'git':
            self.record_git_refs(path)
        return request_id

    def record_git_refs(self, repo, digest=None):
        """Remember the refs a git request was made for (catch_up_git).
        Never fails the request: without it, the next send asks again."""
        try:
            module = load_module(self.config.modules_dir('client'), 'git')
            digest = digest or module.python.refs_digest(
                ModuleContext(self.config, 'client'), repo)
            os.makedirs(self.state_dir, exist_ok=True)
            known = read_json(self.git_refs_path, {}) or {}
            known[repo] = digest
            write_json(self.git_refs_path, known)
        except (GitBackupError, OSError, AttributeError) as e:
            log.debug('%s: refs not recorded: %s', repo, e)

    def catch_up_git(self):
        """Repositories below git_base whose refs changed since their last
        request (a hook that failed or never ran, e.g. a typo in this
        file) get one now: a failing hook costs a delay, not a backup.
        One `git for-each-ref` per repository."""
        names = [m for m, name in sorted(self.modules.items())
                 if name == 'git']
        base = self.settings['git_base']
        if not names or not base or not os.path.isdir(base) or \
                not self.settings['default_node']:
            return []
        git_module = load_module(self.config.modules_dir('client'), 'git')
        ctx = ModuleContext(self.config, 'client')
        known = read_json(self.git_refs_path, {}) or {}
        problems = []
        for repo in git_module.python.repositories_below(base):
            try:
                digest = git_module.python.refs_digest(ctx, repo)
                if digest is None or known.get(repo) == digest:
                    continue
                request_id = self.commit(names[0], repo)
                log.info('%s: refs changed since its last request (did its '
                         'hook run?): requested as %s', repo, request_id)
            except GitBackupError as e:
                problems.append(problem(f'catching up {repo}: {e}',
                                        mail=False))
        return problems

    def check_request(self, request_module, path):
        """The path of a request as its module wants it, or UsageError."""
        module = self.backup_module(request_module)
        if any(not c.isprintable() for c in path) or not path:
            raise UsageError('the path must be printable text')
        if module.has('check_path'):
            try:
                return module.python.check_path(
                    ModuleContext(self.config, 'client'), request_module,
                    path)
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

    # -- send -------------------------------------------------------------

    def send(self, only_node=None):
        """Prepare and push the requests of every node (or one); return the
        list of problems (mailed when worth it)."""
        errors = []
        self.count_send()
        flush_mail_queue(self.config, 'client')
        errors += self.catch_up_git()
        links = [self.link(only_node)] if only_node else self.links()
        for link in links:
            try:
                errors += link.send()
            except GitBackupError as e:
                log.error('node %s: %s', link.node, e)
                errors.append(f'node {link.node}: {e}')
            finally:
                link.connection.close_ssh()
        try:
            self.expire_exports()
        except OSError as e:
            text = f'cleaning {self.settings["export_dir"]}: {e}'
            wait = own_side_wait(e, [self.settings['export_dir']])
            if wait:    # told once by its Health record, not every send
                self.export_health(wait.kind).failed(text, 0)
            errors.append(problem(text, mail=not wait))
        mail_summary(self.config, 'client',
                     f'gitbackup: send on {self.name}: {{n}} problem(s)',
                     errors)
        return errors

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
        for link in self.links():
            for state, ids in link.pool.list().items():
                for request_id in ids:
                    request_files[request_id] = (
                        state, link.pool.file(state, request_id))
        pushed_at = {}
        for link in self.links():
            pushed_at.update(read_json(link.pushed_path, {}) or {})
        candidates = {}
        for name in names:
            path = os.path.join(export_dir, name)
            if not REQUEST_ID_RE.match(name) or os.path.islink(path) or \
                    not os.path.isdir(path):
                continue
            state, request_file = request_files.get(name, (None, path))
            if state not in (INCOMPLETE, COMPLETE, PROCESSING) and \
                    self.old_by_sends(name, pushed_at):
                candidates[request_file] = path
        return [candidates[f] for f in older_than(list(candidates), keep)]

    def sends(self):
        """How many sends this client ran: a clock that cannot jump."""
        try:
            with open(self.sends_path) as f:
                return int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def count_send(self):
        make_dirs(self.state_dir)
        atomic_write(self.sends_path, f'{self.sends() + 1}\n')

    def old_by_sends(self, request_id, pushed_at):
        """An unconfirmed export expires by the clock only once enough sends
        ran since its push as well (export_keep at one send per 5 minutes):
        a clock that was slow at the push alone never removes it."""
        keep = self.config.get_duration('client', 'export_keep')
        if request_id not in pushed_at:
            return True     # pushed before send counts were kept
        return self.sends() - pushed_at[request_id] >= max(1, keep // 300)

    def expire_exports(self):
        for path in self.expired_exports():
            shutil.rmtree(path)
            log.info('removed expired export %s', path)

    # -- status and check -------------------------------------------------

    def status(self, out=sys.stdout):
        for kind in EXPORT_WAITS:
            health = read_json(self.export_health_path(kind), {}) or {}
            if health.get('first_failure'):
                out.write(f'requests waiting ({EXPORT_WAITS[kind]}) since '
                          f'{health["first_failure"]}: '
                          f'{health.get("last_error")}\n')
        if self.settings['compression'] in COMPRESSION_CHOICES:
            out.write(f'compression {compression_text(self.settings)}\n')
        for link in self.links():
            link.status(out)
        return 0

    def export_health_path(self, kind):
        return os.path.join(self.state_dir, f'export-{kind}.json')

    def export_health(self, kind):
        return Health(self.export_health_path(kind), self.config, 'client',
                      f'preparing backups on {self.name} '
                      f'({EXPORT_WAITS[kind]})')

    def export_recovered(self, waited):
        """A prepare succeeded: every kind of wait not seen in this run is
        over (one recovery mail if one was sent)."""
        for kind in EXPORT_WAITS:
            if kind not in waited and os.path.exists(
                    self.export_health_path(kind)):
                health = self.export_health(kind)
                if health.state.get('first_failure'):
                    health.ok()

    def check(self, out=sys.stdout, connect=False):
        """Print every problem found; return them."""
        out.write(f'{self.config.path}: client {self.name}\n')
        if self.settings['compression'] in COMPRESSION_CHOICES:
            out.write(f'compression: {compression_text(self.settings)}\n')
        out.write('archives keep: ' + fs_module.metadata_text(
            shlex.split(self.settings['tar_command'])) + '\n')
        problems = self.check_environment() + self.check_nodes() + \
            self.check_modules()
        for p in problems:
            out.write(f'problem: {p}\n')
        for warning in self.schedule_warnings():
            out.write(f'warning: {warning}\n')
        if connect:
            problems += self.check_connections(out)
        if not problems:
            out.write(f'looks ready ({len(self.nodes)} node(s), '
                      f'{len(self.modules)} module(s))\n')
        return problems

    def schedule_warnings(self):
        """The crontab lines and timers of backup-all this host shows that
        run it less often than nodes expect a backup: [server] stale_after
        of this file, else its default (a node-only file is elsewhere)."""
        if self.config.parser.has_section('server'):
            where = '[server] stale_after'
        else:
            where = 'the nodes\' default stale_after'
        try:
            stale = self.config.get_duration('server', 'stale_after')
        except ConfigError:
            return []      # the node's check says what is wrong there
        return _schedule.backup_all_warnings(stale, where)

    def check_environment(self):
        problems = []
        try:
            check_git_version()
        except GitBackupError as e:
            problems.append(str(e))
        for tool in ['ssh'] + shlex.split(self.settings['tar_command'])[:1]:
            if not shutil.which(tool):
                problems.append(f'{tool}: not installed or not in PATH')
        problems += directory_problems('client', self.settings, (
            'request_dir', 'queue_dir', 'export_dir', 'log_dir'))
        account = owner_of(self.settings['request_dir'])
        if account:
            problems += log_file_problems(self.settings['log_dir'],
                                          [('client.py.log', account)])
        git_base = self.settings['git_base']
        if git_base and not os.path.isdir(git_base):
            problems.append(f'[client] git_base = {git_base}: no such '
                            'directory')
        if self.settings['compression'] not in COMPRESSION_CHOICES:
            problems.append(f'[client] compression: one of '
                            f'{", ".join(COMPRESSION_CHOICES)}')
        elif self.settings['compression'] == 'zstd' and \
                not shutil.which('zstd'):
            problems.append('[client] compression = zstd: zstd: not '
                            'installed or not in PATH')
        if not self.settings.get('sftp_export'):
            problems.append('[client] sftp_export is not set: nodes cannot '
                            'fetch prepared files')
        return problems

    def check_nodes(self):
        problems = []
        if self.settings['default_node'] and \
                self.settings['default_node'] not in self.nodes:
            problems.append(f'[client] default_node = '
                            f'{self.settings["default_node"]} is not in [nodes]')
        for node in self.nodes:
            if not NAME_RE.match(node):
                problems.append(f'[nodes] {node}: not a valid node name')
            elif not NodeLink(self, node).ledger.has_queue():
                problems.append(f'node {node}: no queue repository yet (run: '
                                f'client.py init-node {node})')
            else:
                problems += [f'node {node}: {why} (run: client.py init-node '
                             f'{node} --repair)' for why in
                             NodeLink(self, node).ledger.queue_problems()]
        return problems

    def check_connections(self, out):
        """`check --connect`: push access to every node, as `send` pushes
        (its host key known, this client's key let in, the repository
        there), and what each configured module connects to (PostgreSQL
        and its sudo prefix).  One line each; returns the failures."""
        problems = []
        for link in self.links():
            problems += connection_line(
                out, f'node {link.node}: push to {link.url}',
                link.connection.push_problem())
        for request_module, name in sorted(self.modules.items()):
            try:
                module = load_module(self.config.modules_dir('client'), name)
            except ModuleError:
                continue    # check_modules said so
            if module.has('check_connection'):
                ctx = ModuleContext(self.config, 'client')
                for what, failure in module.python.check_connection(ctx):
                    problems += connection_line(
                        out, f'[modules] {request_module}: {what}', failure)
        return problems

    def check_modules(self):
        problems = []
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
        return problems


class NodeResults:
    """What one node reports back about the requests pushed to it: its
    results branch (fetched, each entry validated), the results journal
    kept here, requests not yet or too late confirmed, and the exports a
    confirmation lets go.  Owned by the NodeLink of that node."""

    def __init__(self, link):
        self.link = link
        self.node = link.node
        self.url = link.url
        self.repo = link.ledger.repo
        self.pool = link.pool
        self.config = link.config
        self.settings = link.settings
        self.timeout = link.timeout
        self.alert_after = link.alert_after
        state = link.client.state_dir
        self.health_path = os.path.join(state, f'results-{link.node}.json')
        self.marker_path = os.path.join(state, f'results-read-{link.node}')
        self.unconfirmed_path = os.path.join(state,
                                             f'unconfirmed-{link.node}.json')
        self.journal = Journal(os.path.join(state,
                                            f'results-{link.node}.jsonl'))

    def health(self):
        return Health(self.health_path, self.config, 'client',
                      f'fetching results from node {self.node}')

    def confirm_empty(self, batch):
        """A module that had nothing to send leaves the node nothing to
        confirm: record that here, or the request would look lost."""
        self.journal.append([
            {'request': f'{ZERO_ID}-RQ{request_id}-none', 'outcome': 'empty',
             'finished': isotime(), 'reason': 'the module sent nothing'}
            for request_id, server_requests in batch if not server_requests])

    def confirm(self, pushed, errors):
        """Fetch results while something awaits confirmation: an idle client
        does not call its nodes every five minutes."""
        if not (pushed or self.unconfirmed()):
            return
        health = self.health()
        try:
            self.fetch()
        except GitBackupError as e:
            health.failed(str(e), self.alert_after)
            errors.append(problem(f'fetching results from {self.node}: {e}',
                                  mail=False))
            return
        health.ok()

    def unconfirmed(self, results=None):
        """Pushed requests (F*) the node has not reported on yet."""
        finished = self.pool.list()[FINISHED]
        if not finished:
            return []
        results = self.read() if results is None else results
        return [i for i in finished if i not in results]

    def fetch(self):
        """Fetch the node's results branch and journal what is new; remove
        exports the node confirmed; report requests left unconfirmed."""
        proc = git(self.repo, 'fetch', '--quiet', '--no-tags', '--', self.url,
                   '+refs/heads/results:refs/remotes/origin/results',
                   env=self.link.connection.git_ssh_env(), check=False,
                   timeout=self.timeout)
        if proc.returncode != 0:
            if "couldn't find remote ref" in proc.stderr:
                return 0  # the node has not handled anything yet
            raise CommandFailed(['git', 'fetch', self.url],
                                proc.returncode, proc.stderr)
        results_ledger = Ledger(self.repo, 'refs/remotes/origin/results',
                                self.link.client.name)
        tip = results_ledger.tip()
        try:
            with open(self.marker_path) as f:
                last = f.read().strip()
        except FileNotFoundError:
            last = ''
        new, rejected = [], []
        if tip != last:
            for commit in results_ledger.since(last, tip):
                new += self.entries_of(commit, rejected)
            new = self.expected(self.not_known(new), rejected)
            self.journal.append(new)
            atomic_write(self.marker_path, tip + '\n')
            self.report_rejected(rejected)
        results = self.read()
        if new:
            log.info('node %s confirmed %d result(s)', self.node, len(new))
            self.remove_confirmed_exports(new, results)
            self.restart_refused_chains(new)
        self.check_unconfirmed(results)
        return len(new)

    def not_known(self, entries):
        """The entries not already in the journal: a node that publishes
        its results again (restored from an older copy) repeats them, for
        requests this client may have pruned long ago."""
        known = self.read()
        fresh = [e for e in entries if known.get(
            request_id_of(e['request']), {}).get(e['request']) != e]
        if len(fresh) < len(entries):
            log.info('node %s: %d result(s) already known', self.node,
                     len(entries) - len(fresh))
        return fresh

    def entries_of(self, commit, rejected):
        """The well-formed result entries of one commit of the results
        branch; what is malformed is logged and added to rejected."""
        entries = []
        for line in git(self.repo, 'ls-tree', commit).stdout.splitlines():
            meta, _, name = line.partition('\t')
            if not name.startswith('R') or meta.split()[1] != 'blob':
                continue
            try:
                entry = json.loads(git(self.repo, 'cat-file', 'blob',
                                       meta.split()[2]).stdout)
            except ValueError:
                entry = None
            why = 'not JSON' if entry is None else result_problem(entry)
            if why:
                rejected.append(f'{clean_text(name, 200)}: malformed ({why})')
                log.warning('node %s: skipped result %s', self.node,
                            rejected[-1])
            else:
                entries.append(entry)
        return entries

    def expected(self, entries, rejected):
        """The entries about requests this client pushed to this node: the
        request is F* in this node's pool, and its commit is in this
        queue's own history with the RQ file in its tree.  Anything else is
        a forgery (a node confirming another node's request, to make the
        client drop an export that node still has to fetch): rejected."""
        finished = set(self.pool.list()[FINISHED])
        ours = set(git(self.repo, 'rev-list', 'refs/heads/master',
                       check=False).stdout.split())
        candidates = [e['request'] for e in entries
                      if request_id_of(e['request']) in finished and
                      e['request'][:40] in ours]
        present = set()
        if candidates:
            out = git(self.repo, 'cat-file', '--batch-check', input=''.join(
                f'{key[:40]}:{key[41:]}\n' for key in candidates)).stdout
            for key, line in zip(candidates, out.splitlines()):
                if line.split(' ')[1:2] == ['blob']:  # not 'missing'
                    present.add(key)
        accepted = []
        for entry in entries:
            if entry['request'] in present:
                accepted.append(entry)
                continue
            rejected.append(f'{entry["request"]}: {entry["outcome"]}, but '
                            f'not a request this client pushed to '
                            f'{self.node}')
            log.warning('node %s: ignored result %s', self.node, rejected[-1])
        return accepted

    def report_rejected(self, rejected):
        """One mail per fetch that brought results the client did not
        expect (each results commit is read once)."""
        if not rejected:
            return
        mail_admins(self.config, 'client',
                    f'gitbackup: node {self.node} sent {len(rejected)} '
                    'unexpected or malformed result(s)',
                    f'The results branch of {self.node} holds results this '
                    f'client ignored (no export was removed for them):\n\n'
                    + '\n'.join(rejected[:100]) + '\n\nA node that '
                    'confirms requests it was never sent may be '
                    'compromised.\n')

    def read(self):
        """{request id: {server request key: result}} from the journal."""
        results = {}
        skipped = 0
        for entry in self.journal.read()[0]:
            # A journal written before results were validated may hold
            # anything a node sent.
            request_id = None if result_problem(entry) else \
                request_id_of(entry['request'])
            if request_id:
                results.setdefault(request_id, {})[entry['request']] = entry
            else:
                skipped += 1
        if skipped:
            log.warning('%s: skipped %d malformed result(s)',
                        self.journal.path, skipped)
        return results

    def remove_confirmed_exports(self, new, results):
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
            names = git(self.repo, 'ls-tree', '--name-only', commit,
                        check=False).stdout.split()
            wanted = {f'{commit}-{n}' for n in names
                      if n.startswith(f'RQ{request_id}-')}
            stored = {k for k, r in results.get(request_id, {}).items()
                      if r.get('outcome') == 'stored'}
            if wanted and wanted <= stored:
                shutil.rmtree(export, ignore_errors=True)
                log.info('removed %s: the node stored it', export)

    def restart_refused_chains(self, new):
        """An increment the node refused or gave up (its chain is not whole
        there) leaves that directory without a usable backup: request it
        again at once, and ArchiveChain, seeing the failure, makes a full,
        instead of waiting for the next scheduled backup."""
        failed = {request_id_of(e['request']) for e in new
                  if e.get('outcome') == 'failed'}
        if not failed:
            return
        pending = {read_request(self.pool.file(COMPLETE, i))
                   for i in self.pool.list()[COMPLETE]}
        top = os.path.join(self.link.client.state_dir, 'incremental',
                           self.node)
        for path in sorted(glob.glob(os.path.join(glob.escape(top), '*',
                                                  '*.json'))):
            entry = read_json(path)
            if os.path.basename(path)[:-5] not in failed or \
                    not isinstance(entry, dict) or not entry.get('level') or \
                    (entry.get('module'), entry.get('path')) in pending:
                continue
            try:
                request_id = self.link.client.commit(
                    entry['module'], entry['path'], self.node)
            except (GitBackupError, ValueError, TypeError) as e:
                log.warning('node %s refused an increment of %s; '
                            'requesting it again failed: %s', self.node,
                            entry.get('path'), e)
                continue
            pending.add((entry['module'], entry['path']))
            log.warning('node %s refused increment %s of %s: requested '
                        'again as %s, a full archive', self.node,
                        os.path.basename(path)[:-5], entry['path'],
                        request_id)

    def check_unconfirmed(self, results):
        """Mail once about pushed requests the node has not confirmed within
        confirm_after."""
        limit = self.config.get_duration('client', 'confirm_after')
        now = time.time()
        late = []
        for request_id in self.unconfirmed(results):
            try:
                age = now - os.lstat(self.pool.file(FINISHED, request_id)) \
                    .st_mtime
            except FileNotFoundError:
                continue
            if age > limit:
                late.append(request_id)
        told = set(read_json(self.unconfirmed_path, []) or [])
        fresh = [r for r in late if r not in told]
        if fresh:
            mail_admins(self.config, 'client',
                        f'gitbackup: {len(fresh)} request(s) not confirmed '
                        f'by {self.node}',
                        f'These requests were pushed to {self.node} but the '
                        f'node has not reported them stored or failed within '
                        f'{self.settings["confirm_after"]}:\n\n' +
                        '\n'.join(fresh) + '\n\nCheck `server.py run` and '
                        '`server.py report` on the node.\n')
        if set(late) != told:
            write_json(self.unconfirmed_path, sorted(late))
        return late

    def status(self, out):
        """Counts per request, not per node-side part: one `postgresdb
        all` is one request the node stores as several parts (each
        database, the globals) in one snapshot.  A request counts as
        failed when any part failed."""
        results = self.read()
        outcome = {request_id: 'failed' if any(
            r.get('outcome') == 'failed' for r in parts.values())
            else 'stored' for request_id, parts in results.items()}
        unconfirmed = self.unconfirmed(results)
        out.write(f'  node stored {list(outcome.values()).count("stored")}, '
                  f'node failed {list(outcome.values()).count("failed")}, '
                  f'not yet confirmed {len(unconfirmed)}\n')
        late = read_json(self.unconfirmed_path, [])
        if late:
            out.write(f'  unconfirmed after {self.settings["confirm_after"]}: '
                      f'{" ".join(late[:10])}\n')
        newest = sorted(results.items(), key=lambda item: max(
            r['finished'] for r in item[1].values()))[-5:]
        for request_id, parts in newest:
            last = max(parts.values(), key=lambda r: r['finished'])
            # What a node wrote never reaches the terminal raw.
            detail = clean_text(last.get('stored') or last.get('reason') or '')
            count = f' ({len(parts)} parts)' if len(parts) > 1 else ''
            warned = [w for r in parts.values()
                      for w in r.get('warnings') or []]
            total = sum(r.get('warning_count') or len(r.get('warnings') or [])
                        for r in parts.values())
            with_warnings = f' with {total} warning(s)' if total else ''
            out.write(f'  {clean_text(last["finished"], 40)} '
                      f'{clean_text(request_id, 80)} '
                      f'{outcome[request_id]}{with_warnings}{count} '
                      f'{detail}\n')
            for line in warned[:WARNINGS_SHOWN]:
                out.write(f'    warning: {clean_text(line)}\n')


class QueueLedger:
    """This client's queue repository for one node: a Ledger whose master
    is pushed to the node.  Creating it (init-node), continuing the node's
    history when it is made anew, finding and repairing a broken one, and
    committing server requests to it."""

    def __init__(self, link):
        self.link = link
        self.node = link.node
        self.url = link.url
        self.settings = link.settings
        self.config = link.config
        self.timeout = link.timeout
        self.repo = os.path.join(link.settings['queue_dir'],
                                 link.node + '.git')
        self.queue = Ledger(self.repo, 'refs/heads/master', link.client.name)
        # Why the node's ledger could not be fetched (adopt_node_history).
        self.ledger_unknown = None

    def has_queue(self):
        return os.path.isdir(os.path.join(self.repo, 'objects'))

    def init(self, repair=False):
        """Create (or repair) the queue repository and the pool."""
        problems = self.queue_problems()
        if problems and not repair:
            raise GitBackupError('; '.join(problems) + ': repair it with '
                                 f'client.py init-node {self.node} --repair')
        if problems or (repair and os.path.exists(
                self.set_aside_path('refs/heads/master'))):
            self.repair()       # (again, after an interrupted repair)
        if not self.has_queue():
            make_dirs(os.path.dirname(self.repo))
            git(self.repo, *git_init_sha1(), '--quiet', '--bare')
            fsync_dir(os.path.dirname(self.repo))
            log.info('created queue repository %s', self.repo)
        remotes = git(self.repo, 'remote').stdout.split()
        git(self.repo, 'remote', 'set-url' if 'origin' in remotes else 'add',
            'origin', self.url)
        git(self.repo, 'config', 'user.name',
            f'gitbackup {self.link.client.name}')
        git(self.repo, 'config', 'user.email',
            f'gitbackup@{self.link.client.name}')
        self.link.pool.create()
        self.adopt_node_history()
        return self.repo

    def adopt_node_history(self):
        """A queue repository made anew (the old one lost) must continue the
        node's ledger, which refuses anything but fast-forwards: start from
        the node's master, or a new ledger when the node has none.  Returns
        why the node could not be asked ('' otherwise): then `send` commits
        nothing until it can (a ledger started blind would fork the
        node's, and every later push would be refused)."""
        # The branch file, read without starting git, tells on every send
        # but the first ones; git is asked only when it does not.
        if ref_from_files(self.repo, 'refs/heads/master') or \
                self.queue.tip():
            return ''
        if self.ledger_unknown is not None:
            return self.ledger_unknown      # asked once per command
        tip, why = self.fetch_node_master()
        self.ledger_unknown = why
        if not tip:
            log.info('node %s: no history fetched (%s)%s', self.node,
                     why or 'the node has none',
                     '' if why else '; starting a new ledger')
            return why
        git(self.repo, 'update-ref', 'refs/heads/master', tip, ZERO_ID)
        log.info('node %s: continuing its ledger at %s', self.node, tip[:12])
        return ''

    def fetch_node_master(self):
        """(the node's master, '') fetched into origin/master; ('', '')
        when the node has none yet; (None, why) when it cannot be asked."""
        proc = git(self.repo, 'fetch', '--quiet', '--no-tags', '--', self.url,
                   '+refs/heads/master:refs/remotes/origin/master',
                   env=self.link.connection.git_ssh_env(), check=False,
                   timeout=self.timeout)
        if proc.returncode != 0:
            if "couldn't find remote ref" in proc.stderr:
                return '', ''
            return None, clean_text(proc.stderr.strip(), 2000)
        return git(self.repo, 'rev-parse', 'refs/remotes/origin/master') \
            .stdout.strip(), ''

    def broken_ref(self, ref):
        """Why a ref's file names no commit (garbage, a file truncated by
        a power loss, an object lost), or '' when it is sound or absent."""
        path = os.path.join(self.repo, *ref.split('/'))
        if not os.path.isfile(path) or git(
                self.repo, 'rev-parse', '--verify', '--quiet',
                ref + '^{commit}', check=False).stdout.strip():
            return ''
        with open(path, 'rb') as f:
            text = f.read(80).decode('utf-8', 'replace').strip()
        return f'{path}: {ref} names no commit ({clean_text(text, 60)!r})'

    def broken_head(self):
        head = os.path.join(self.repo, 'HEAD')
        try:
            with open(head, 'rb') as f:
                text = f.read(200).decode('utf-8', 'replace').strip()
        except OSError as e:
            return f'{head}: {e}'
        if HEAD_RE.fullmatch(text):
            return ''
        return f'{head}: not a git HEAD ({clean_text(text, 60)!r})'

    def queue_problems(self):
        """What keeps git from using the queue repository; [] when it is
        sound (or not there yet)."""
        if not self.has_queue():
            return []
        head = self.broken_head()
        if head:
            return [head]       # git refuses the whole repository
        return [why for why in map(self.broken_ref, QUEUE_REFS) if why]

    def repair(self):
        """Make a broken queue repository usable from the node's ledger:
        HEAD rewritten, broken copies of the node's branches dropped (the
        next fetch brings them back), a broken master set to the node's.
        The node must be reachable for a broken master: nothing else can
        tell where its ledger is."""
        head = self.broken_head()
        if head:
            atomic_write(os.path.join(self.repo, 'HEAD'),
                         'ref: refs/heads/master\n')
            log.warning('repaired %s', head)
        for ref in QUEUE_REFS:
            why = self.broken_ref(ref)
            if why:
                log.warning('repairing %s', why)
                self.set_aside(ref)
        if os.path.exists(self.set_aside_path('refs/heads/master')):
            self.master_from_node()

    def master_from_node(self):
        """master := the node's master (a broken one was set aside; put
        back if the node cannot be asked, so nothing is decided blind)."""
        ref = 'refs/heads/master'
        tip, why = self.fetch_node_master()
        aside = self.set_aside_path(ref)
        if tip is None:
            os.rename(aside, os.path.join(self.repo, *ref.split('/')))
            raise GitBackupError(f'cannot fetch the ledger of node '
                                 f'{self.node} to repair {ref}: {why}')
        if tip:
            git(self.repo, 'update-ref', ref, tip, ZERO_ID)
        os.unlink(aside)
        log.warning('node %s: the queue ledger continues at the node\'s '
                    'master %s', self.node, tip[:12] or '(none yet)')

    def set_aside_path(self, ref):
        return os.path.join(self.repo, 'broken-' + ref.replace('/', '-'))

    def set_aside(self, ref):
        """Move a broken ref's file out of refs/ (git can neither use nor
        delete it, and it spoils fetches)."""
        path = os.path.join(self.repo, *ref.split('/'))
        os.rename(path, self.set_aside_path(ref))
        fsync_dir(os.path.dirname(path))

    def queue_health(self):
        return Health(os.path.join(self.link.client.state_dir,
                                   f'queue-{self.node}.json'),
                      self.config, 'client',
                      f'queue repository of node {self.node}')

    def check_queue(self):
        """A problem (mailed once, through the Health record) when the
        queue repository is broken, else None.  Checked before any
        request is prepared: a broken queue could not take them."""
        problems = self.queue_problems()
        health = self.queue_health()
        if not problems:
            if health.state.get('first_failure'):
                health.ok()
            return None
        text = ('; '.join(problems) + '. Requests wait, nothing is lost; '
                f'repair: client.py init-node {self.node} --repair')
        health.failed(text, 0)
        return problem(f'node {self.node}: {text}', mail=False)

    def committed_requests(self):
        """Ids of requests already committed to the queue repository."""
        if not self.queue.tip():
            return set()
        out = git(self.repo, 'log', '--format=%B', 'refs/heads/master').stdout
        return set(re.findall(r'^Request: (\S+)$', out, re.M))

    def commit_batches(self, batch):
        """Commit the server requests: commits of at most max_batch
        requests each, all pushed at once (a node takes at most
        max_requests_per_push per push; its later runs take the rest)."""
        size = self.link.config.get_int('client', 'max_batch')
        for start in range(0, len(batch), size):
            self.commit_batch(batch[start:start + size])
        if batch:
            pause_point('send:committed')
        return {request_id for request_id, _ in batch}

    def commit_batch(self, batch):
        """One commit holding only the new RQ files (plus a timestamp file,
        as the seed does)."""
        files, names = [], set()
        for request_id, server_requests in batch:
            for ident, content in server_requests:
                name = f'RQ{request_id}-{ident}'
                n = 1
                while name in names:
                    n += 1
                    name = f'RQ{request_id}-{ident}.{n}'
                names.add(name)
                files.append((name, content + '\n'))
        now = isotime()
        files.append(('timestamp', now + '\n'))
        message = [f'{self.link.client.name} {now}: {len(names)} server '
                   'request(s)', '']
        message += [f'Request: {request_id}' for request_id, _ in batch]
        commit = self.queue.append(files, '\n'.join(message) + '\n')
        log.info('committed %d server request(s) of %d request(s) as %s',
                 len(names), len(batch), commit[:12])
        return commit


class NodeConnection:
    """How this client reaches one node: git's ssh command sharing one
    connection per send (and closing it), whether the node lets this
    client push (check --connect), the push of the queue's master, and its
    Health record (one mail when pushes fail for alert_after, at once when
    ssh refuses the login)."""

    def __init__(self, link):
        self.link = link
        self.node = link.node
        self.url = link.url
        self.settings = link.settings
        self.config = link.config
        self.timeout = link.timeout
        self.alert_after = link.alert_after
        self.health_path = os.path.join(link.client.state_dir,
                                        f'node-{link.node}.json')

    def control_path(self):
        """The private socket of this node's shared ssh connection, or
        None when its path is too long for a Unix socket."""
        path = os.path.join(self.link.client.state_dir, f'ssh-{self.node}')
        # sun_path holds 108 bytes; ssh binds a name 17 bytes longer first.
        return path if len(path.encode()) < 88 else None

    def git_ssh_env(self):
        # LC_ALL=C: NodeResults.fetch reads git's English error messages.
        # Bounded connect and keepalives: a node that accepts and never
        # answers costs connect_timeout, not command_timeout.
        ssh = ' '.join([self.settings['ssh_command'],
                        *ssh_timeout_options(self.config, 'client')])
        control = self.control_path()
        if control:
            make_dirs(self.link.client.state_dir)
            # One ssh connection (one handshake) for the push and the
            # results fetch of a send; closed at its end (close_ssh).
            # GIT_SSH_COMMAND goes through sh, hence the quoting.
            ssh += ' ' + shell_line([
                '-o', 'ControlMaster=auto', '-o', f'ControlPath={control}',
                '-o', 'ControlPersist=60'])
        return {**os.environ, 'GIT_SSH_COMMAND': ssh,
                'GIT_TERMINAL_PROMPT': '0', 'LC_ALL': 'C'}

    def close_ssh(self):
        """End the shared connection, if one was opened (ssh -O exit)."""
        control = self.control_path()
        if not control or not os.path.exists(control):
            return
        try:
            subprocess.run(shlex.split(self.settings['ssh_command']) + [
                '-o', f'ControlPath={control}', '-O', 'exit', self.node],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning('node %s: closing the ssh connection: %s',
                        self.node, e)

    def push_problem(self):
        """'' when this client may push to the node, else what fails and
        the fix.  git-receive-pack is what a push runs on the node (what
        gitolite, gitosis and `gate` check), so its ref listing proves the
        push access without pushing anything."""
        try:
            proc = run(['git', 'ls-remote', '--upload-pack=git-receive-pack',
                        '--', self.url], env=self.git_ssh_env(), check=False,
                       timeout=min(self.timeout, 120))
        except GitBackupError as e:
            return clean_text(str(e))
        finally:
            self.close_ssh()
        if proc.returncode == 0:
            return ''
        m = re.match(r'(?:ssh://)?([^/:]+)(?::([0-9]+))?', self.url)
        target, port = (m.group(1), m.group(2) or 22) if m else \
            (self.url, 22)
        return ssh_problem(
            proc.stderr, target, port, 'add this client\'s public key on the '
            'node (gitolite keydir, gitosis.conf or `server.py add-client`, '
            'README "Install a client")') or (
            f'{clean_text(proc.stderr.strip(), 300)}: no repository for '
            f'this client at {self.url}: create it on the node (gitolite/'
            'gitosis config, or `server.py add-client`), or fix [nodes] '
            f'{self.node}')

    def health(self):
        return Health(self.health_path, self.config, 'client',
                      f'pushing to node {self.node}')

    def push(self, errors):
        """Push master if the node lacks commits.  Returns whether it
        pushed, or None when the push failed (git's exit status tells:
        unlike the seed's days, a failed push is an error, never
        silence)."""
        local = self.link.ledger.queue.tip()
        remote = git(self.link.ledger.repo, 'rev-parse', '--verify', '--quiet',
                     'refs/remotes/origin/master', check=False).stdout.strip()
        if not local or local == remote:
            return False
        health = self.health()
        try:
            git(self.link.ledger.repo, 'push', '--quiet', '--', self.url,
                'refs/heads/master:refs/heads/master',
                env=self.git_ssh_env(), timeout=self.timeout)
        except GitBackupError as e:
            errors.append(self.failed(f'push to {self.node} failed',
                                           str(e), health))
            return None
        git(self.link.ledger.repo, 'update-ref',
            'refs/remotes/origin/master', local)
        log.info('pushed %s to %s', local[:12], self.node)
        pause_point('send:pushed')
        health.ok()
        return True

    def failed(self, what, error, health=None):
        """Record a failed connection to the node in its push Health
        record; returns the run's problem.  ssh refusing the login (key,
        host key) waits for a human: the admins hear at once, not after
        alert_after as for an outage."""
        denied = ACCESS_DENIED_RE.search(error)
        text = f'{error} ({ACCESS_DENIED_HINT})' if denied else error
        (health or self.health()).failed(
            text, 0 if denied else self.alert_after)
        return problem(f'{what} (requests kept for the next run): {text}',
                       mail=False)


class NodeLink:
    """One node as this client sees it, and `send` to it: the node's
    request pool here (claim, prepare through the modules, finish), with
    what it owns apart: the queue repository (self.ledger, QueueLedger),
    the connection and push (self.connection, NodeConnection) and the
    node's results (self.results, NodeResults)."""

    def __init__(self, client, node):
        self.client = client
        self.config = client.config
        self.settings = client.settings
        self.node = node
        self.url = client.nodes[node]
        self.pool = Pool(os.path.join(self.settings['request_dir'], node),
                         CLIENT_STATES, REQUEST_ID_RE)
        self.attempts = Attempts(self.pool,
                                 self.config.get_int('client', 'max_attempts'))
        self.pushed_path = os.path.join(client.state_dir,
                                        f'pushed-{node}.json')
        self.timeout = self.config.get_duration('client', 'command_timeout')
        self.alert_after = self.config.get_duration('client', 'alert_after')
        self.ledger = QueueLedger(self)
        self.connection = NodeConnection(self)
        self.results = NodeResults(self)

    # -- send: the pipeline -------------------------------------------------

    def send(self):
        """claim -> prepare -> commit -> push -> finish -> confirm."""
        if not self.ledger.has_queue():
            self.ledger.init()
        broken = self.ledger.check_queue()
        if broken:
            return [broken]
        unknown = self.ledger.adopt_node_history()
        if unknown:
            return [self.connection.failed(
                f'node {self.node}: its ledger could not be fetched, '
                'nothing sent', unknown)]
        self.promote_orphans()
        errors = []
        to_prepare, committed = self.claim()
        batch = self.prepare_all(to_prepare, errors)
        committed |= self.ledger.commit_batches(batch)
        pushed = self.connection.push(errors)
        if pushed is None:
            return errors           # kept for the next run
        self.finish(committed)
        self.results.confirm_empty(batch)
        self.results.confirm(pushed, errors)
        return errors

    def claim(self):
        """(requests to prepare, requests already committed).  P* left
        over: already committed (then only the push is missing) or claimed
        by a run that died before committing (prepared again)."""
        states = self.pool.list()
        leftover = states[PROCESSING]
        committed = set()
        if leftover:
            in_history = self.ledger.committed_requests()
            committed = {i for i in leftover if i in in_history}
            for request_id in leftover:
                if request_id not in committed:
                    log.info('request %s: resuming after an interrupted '
                             'send', request_id)
        to_prepare = [i for i in leftover if i not in committed]
        to_prepare += [i for i in states[COMPLETE]
                       if self.pool.move(i, COMPLETE, PROCESSING)]
        return to_prepare, committed

    def prepare_all(self, request_ids, errors):
        """[(request id, server requests)] of those prepared; a failure
        costs an attempt."""
        batch, waited = [], set()
        for request_id in request_ids:
            try:
                server_requests = self.prepare(request_id, errors)
            except (GitBackupError, OSError) as e:
                # Half an archive must not keep the disk full for the rest.
                shutil.rmtree(os.path.join(self.settings['export_dir'],
                                           request_id), ignore_errors=True)
                wait = own_side_wait(e, self.own_dirs())
                if wait:
                    waited.add(wait.kind)
                    errors.append(self.prepare_waits(request_id, wait))
                else:
                    errors.append(self.prepare_failed(request_id, e))
                continue
            batch.append((request_id, server_requests))
        if batch:
            self.client.export_recovered(waited)
            pause_point('send:prepared')
        return batch

    def own_dirs(self):
        return [self.settings[key] for key in
                ('export_dir', 'request_dir', 'queue_dir', 'log_dir')]

    def prepare_waits(self, request_id, wait):
        """The client's own side failed: put the request back (C*), count
        no attempt, and let the Health record decide about mail."""
        self.pool.move(request_id, PROCESSING, COMPLETE)
        alert_after = self.alert_after if wait.kind == 'space' else 0
        self.client.export_health(wait.kind).failed(str(wait), alert_after)
        return problem(f'request {request_id} for {self.node} waits '
                       f'({EXPORT_WAITS[wait.kind]}, no attempt counted): '
                       f'{wait}', mail=False)

    def prepare(self, request_id, problems):
        """Run the module of one request; return its server requests.  What
        the module reports as partial failures is added to problems."""
        request_module, target = read_request(
            self.pool.file(PROCESSING, request_id))
        module = self.client.backup_module(request_module)
        ctx = PrepareContext(self, request_id, request_module)
        # A previous attempt may have left half an export behind.
        shutil.rmtree(ctx.export_root, ignore_errors=True)
        log.info('request %s: %s %s', request_id, request_module, target)
        if module.has('prepare'):
            try:
                produced = list(module.python.prepare(ctx, request_module,
                                                      target))
            except (GitBackupError, OSError):
                raise           # OSError: sorted by own_side_wait()
            except Exception as e:
                raise ModuleError(f'module {module.name} failed: '
                                  f'{type(e).__name__}: {e}') from None
        elif module.python is None:
            make_dirs(ctx.export_root)
            produced = module.run_executable(
                [request_module, target], ctx.executable_env(), ctx.timeout)
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

    def prepare_failed(self, request_id, error):
        """Record a failed attempt; after max_attempts the request is X."""
        attempts, give_up = self.attempts.failed(request_id, error)
        limit = self.attempts.limit
        if give_up:
            self.attempts.give_up(request_id, PROCESSING,
                                  f'failed {attempts} times, last: {error}')
            text = (f'request {request_id} for {self.node} failed {attempts} '
                    f'times and is given up (kept as {self.pool.path}/'
                    f'{FAILED}{request_id}): {error}')
        else:
            self.pool.move(request_id, PROCESSING, COMPLETE)
            text = (f'request {request_id} for {self.node} failed (attempt '
                    f'{attempts} of {limit}, retried next run): {error}')
        return problem(text, mail=give_up)

    def finish(self, committed):
        """P* -> F* for every pushed request; F*'s time is the push (see
        export_keep)."""
        for request_id in sorted(committed):
            if self.pool.move(request_id, PROCESSING, FINISHED):
                # The process's clock (not the kernel's "now"): the same
                # clock every age on this client is measured with.
                now = time.time()
                os.utime(self.pool.file(FINISHED, request_id), (now, now))
                self.attempts.clear(request_id)
        self.record_pushed(committed)
        if committed:
            log.info('node %s: %d request(s) sent', self.node, len(committed))

    def record_pushed(self, committed):
        """{request id: send count at its push} for the requests whose F*
        or export is still here (see Client.old_by_sends)."""
        before = read_json(self.pushed_path, {}) or {}
        export_dir = self.settings['export_dir']
        pushed = {i: n for i, n in before.items()
                  if os.path.isdir(os.path.join(export_dir, i)) or
                  os.path.exists(self.pool.file(FINISHED, i))}
        pushed.update({i: self.client.sends() for i in committed})
        if pushed != before:
            write_json(self.pushed_path, pushed)

    def promote_orphans(self):
        """An i* file left by a commit that was killed after writing it
        completely (and fsyncing) is a good request: make it C*.  A torn one
        is kept for a human and logged."""
        for request_id in self.pool.list()[INCOMPLETE]:
            path = self.pool.file(INCOMPLETE, request_id)
            try:
                if time.time() - os.lstat(path).st_mtime < 60:
                    continue  # a commit may still be writing it
                with open(path, encoding='utf-8',
                          errors='surrogateescape') as f:
                    text = f.read()
            except FileNotFoundError:
                continue
            module, tab, target = text.rstrip('\n').partition('\t')
            if text.endswith('\n') and tab and module in self.client.modules \
                    and target:
                self.pool.move(request_id, INCOMPLETE, COMPLETE)
                log.warning('request %s: recovered from an interrupted '
                            'commit', request_id)
            else:
                log.warning('%s: torn request left by an interrupted commit; '
                            'kept, not sent', path)

    # -- status -----------------------------------------------------------

    def status(self, out):
        states = self.pool.list()
        out.write(f'node {self.node} ({self.url})\n')
        out.write(f'  pending     {len(states[COMPLETE])}\n')
        out.write(f'  processing  {len(states[PROCESSING])}\n')
        out.write(f'  finished    {len(states[FINISHED])}\n')
        out.write(f'  failed      {len(states[FAILED])}\n')
        for label, failing, path in (
                ('last push   ', '', self.connection.health_path),
                ('last results ', 'results ', self.results.health_path)):
            health = read_json(path, {}) or {}
            out.write(f'  {label}{health.get("last_success") or "never"}\n')
            if health.get('last_error'):
                out.write(f'  {failing}failing since '
                          f'{health.get("first_failure")}: '
                          f'{clean_text(health["last_error"], 1000)}\n')
        queue = self.ledger.queue_health().state
        if queue.get('first_failure'):
            out.write(f'  queue repository broken since '
                      f'{queue["first_failure"]}: '
                      f'{clean_text(queue["last_error"], 1000)}\n')
        for request_id in states[FAILED][-5:]:
            module, target = read_request(self.pool.file(FAILED, request_id))
            out.write(f'  failed request {request_id}: {module} '
                      f'{clean_text(target)} -- '
                      f'{clean_text(self.attempts.reason(request_id), 1000)}\n')
        if states[FAILED]:
            out.write('  put failed requests back: client.py retry '
                      '<request id>|--all-failed\n')
        for line in chain_status_lines(self.client.state_dir, self.node):
            out.write(line + '\n')
        self.results.status(out)

# --------------------------------------------------------------------------
# Client operations: gc and prune

def client_gc(client, aggressive=False):
    """git gc of every queue repository (queue_dir/*.git)."""
    repos = [link.ledger.repo for link in client.links()
             if link.ledger.has_queue()]
    return gc_repositories(client.config, 'client', repos, aggressive,
                           f'client {client.name}')


def client_prune(client, dry_run=False, out=sys.stdout):
    """Remove expired exports (see Client.expired_exports) and F* requests
    older than keep_requests.  C*, P* and X* are never touched.  Returns
    the list of errors."""
    finished = []
    for link in client.links():
        # An F* the node has not confirmed is what makes send fetch its
        # results: like its export, the clock alone never removes it.
        unconfirmed = set(link.results.unconfirmed())
        pushed_at = read_json(link.pushed_path, {}) or {}
        finished += [link.pool.file(FINISHED, request_id)
                     for request_id in link.pool.list()[FINISHED]
                     if request_id not in unconfirmed or
                     client.old_by_sends(request_id, pushed_at)]
    return remove_listed(
        client.expired_exports() + older_than(
            finished, client.config.get_duration('client', 'keep_requests')),
        dry_run, out)


def client_retry(client, request_id=None, all_failed=False, out=sys.stdout):
    """Put given-up requests (X*) back as C* with a fresh attempt count
    (docs/operations.md, "Given-up requests"); the next send prepares
    them.  Returns how many."""
    if bool(request_id) == bool(all_failed):
        raise UsageError('give a request id or --all-failed')
    count = 0
    for link in client.links():
        failed = link.pool.list()[FAILED]
        for key in failed if all_failed else \
                [k for k in failed if k == request_id]:
            if link.attempts.retry(key, COMPLETE):
                out.write(f'{link.node}: request {key} put back\n')
                log.info('request %s for %s: put back by retry', key,
                         link.node)
                count += 1
    if request_id and not count:
        raise UsageError(f'no given-up request {request_id!r} (see '
                         'client.py status)')
    return count


# --------------------------------------------------------------------------
# Command line

def build_parser():
    parser = argparse.ArgumentParser(
        prog='client.py', formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split('\n\n')[0] + '\n\n' + '''\
Typical crontab of the backup user:
  */5 * * * *  client.py send -q
  0 23 * * *   client.py backup-all -q
  50 23 11 * * client.py gc -q
  0 2 * * *    client.py prune -q
and in the post-update hook of every git repository to back up:
  client.py commit git "$PWD"

Exit status: 0 success, 1 failure, 2 bad usage or configuration.
Run every command as the owner of request_dir, queue_dir, export_dir and
log_dir: the commands that write refuse any other user (root too), exit 2.

Python 3.6 or later (RHEL 8, SLES 15); server.py needs 3.8.  `make test`
runs this client on 3.6 with a node on 3.8.''')
    common_options(parser, suppress=False)
    parser.add_argument('--version', action='version', version=VERSION)
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    add_request_commands(sub)
    add_operation_commands(sub)
    return parser


def add_command(sub, name, help, description=''):
    """One subcommand; its description is its help unless given."""
    p = sub.add_parser(name, help=help, description=description or help,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    common_options(p, suppress=True)
    return p


def add_request_commands(sub):
    """The commands that record, send and inspect backup requests."""
    command = functools.partial(add_command, sub)
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
    p = command('init-node', 'create the queue repository for a node',
                'Create the queue repository for a node (queue_dir/<node>.git)'
                ', or complete one;\na new one continues the node\'s ledger.'
                '  --repair mends a broken one (a\ngarbage HEAD or ref, as '
                '`check` reports): its master is set to the node\'s\n(the '
                'node must be reachable); requests not yet on the node are '
                'sent again.')
    p.add_argument('node', help='a node named in [nodes]')
    p.add_argument('--repair', action='store_true',
                   help="repair a broken queue repository from the node's "
                   'ledger')
    command('status', 'show requests and push health per node')
    p = command('check', 'test the configuration and environment')
    p.add_argument('--connect', action='store_true',
                   help='also make every connection `send` makes: push '
                   'access to each node\n(its host key known, this '
                   "client's key let in), and each module's own\n"
                   '(postgresdb: PostgreSQL through the configured psql, '
                   'pg_dump and\npg_dumpall, sudo prefixes included); one '
                   'line each, OK or FAILED\nwith the fix')


def add_operation_commands(sub):
    """The maintenance commands of the client (cron): gc, prune, retry."""
    command = functools.partial(add_command, sub)
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
    p = command('retry', 'put given-up (X*) requests back',
                'Put a request that was given up after max_attempts (X*, see '
                '`status`) back as C*\nwith a fresh attempt count; the next '
                '`send` prepares it again.  Its old reason\nis kept in '
                'request_dir/<node>/.attempts/<id>.history.')
    p.add_argument('request_id', nargs='?', help='the id `status` shows')
    p.add_argument('--all-failed', action='store_true',
                   help='every given-up request of every node')


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



def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    quiet = args.quiet or args.command == 'commit'
    setup_logging(None, 'client.py', args.verbose, quiet)
    return guarded(lambda: run_command(args, quiet))


def send_command(client, node):
    # Exports may hold private data (dumps with password hashes): only the
    # backup account and its group may read them.
    os.umask(0o027)
    return exclusive(client.settings['log_dir'], 'send',
                     lambda: 1 if client.send(node) else 0,
                     2 * client.config.get_duration('client',
                                                    'command_timeout'))


def init_node_command(client, node, repair=False):
    print(client.link(node).ledger.init(repair))
    return 0


COMMANDS = {
    'commit': lambda c, a: c.commit(a.module, a.path, a.node) and 0,
    'send': lambda c, a: send_command(c, a.node),
    'backup-all': lambda c, a: backup_all(c, a.node) and 0,
    'init-node': lambda c, a: init_node_command(c, a.node, a.repair),
    'status': lambda c, a: c.status(),
    'check': lambda c, a: 1 if c.check(connect=a.connect) else 0,
    'gc': lambda c, a: 1 if client_gc(c, a.aggressive) else 0,
    'prune': lambda c, a: 1 if client_prune(c, a.dry_run) else 0,
    'retry': lambda c, a: client_retry(c, a.request_id, a.all_failed) and 0,
}


# Commands that write into the client's directories: refused to any user
# but their owner (check_run_user).
WRITING_COMMANDS = ('commit', 'send', 'backup-all', 'init-node', 'gc',
                    'prune', 'retry')
# The cron jobs: at [client] priority (idle), with all they start.
BACKGROUND_COMMANDS = ('send', 'backup-all', 'gc', 'prune')


def run_command(args, quiet):
    config = Config(find_config(args.config, __file__), side='client')
    client = Client(config)
    if args.command in WRITING_COMMANDS:
        check_run_user('client.py', args.command, 'client', client.settings,
                       ('request_dir', 'queue_dir', 'export_dir', 'log_dir'),
                       'request_dir')
    setup_logging(client.settings['log_dir'], 'client.py', args.verbose,
                  quiet, create=args.command != 'check')
    if args.command in BACKGROUND_COMMANDS:
        lower_priority('client', client.settings)
    if args.command not in ('commit', 'check'):
        check_git_version()   # check reports it as a problem of its own
    return COMMANDS[args.command](client, args)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
