#!/usr/bin/env python3
"""gitbackup node: take in backup requests, pull the data, keep it.

Each client pushes its backup requests to its own repository on the node
(``<client>.git``, guarded by gitosis, gitolite or ``server.py gate``).
That repository's ``post-update`` hook runs ``server.py ingest <client>``,
which turns every newly pushed commit into request files in the client's
pool.  Every five minutes cron runs ``server.py run``: each request is
validated and handled by a node module that *pulls* the data itself (sftp
download of a prepared file, git fetch of an exported repository), with the
node's own key, from the host and port the node's configuration names.

Guarantees:

* The node trusts nothing in a request.  From a request it takes only a path
  inside the client's ``sftp_root`` or a repository path under its git base,
  strictly validated; hosts, users and ports come from this file's
  configuration.  A refused request becomes ``X*`` with the reason beside
  it: evidence, never silently dropped.
* ``ingest`` reads only regular blobs named ``RQ*`` from the pushed trees
  (never a checkout), under the pool's lock, for the whole range of commits
  it has not seen; running it twice creates nothing twice.
* Request states are file-name prefixes changed by ``rename(2)``:
  ``RQ*`` new, ``P*`` being handled, ``F*`` done, ``X*`` refused or failed
  ``max_attempts`` times.  ``run`` handles ``P*`` left by a crash first.
* A backup counts as stored only when its directory, with a manifest of
  sha256 and size, has been renamed into place; partial downloads never do.
* A second concurrent ``run`` exits 0 at once (cron-safe).

Shares configuration, ``run()``, locks and logging with client.py, which
must be installed beside this script (with sendmail.py and modules/).
"""

import argparse
import base64
import configparser
import datetime
import html
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import client as gb  # noqa: E402  (shared plumbing, installed beside us)
from client import (  # noqa: E402
    ConfigError, GitBackupError, Lock, UsageError, atomic_write, clean_text,
    fsync_dir, git, log, read_json, write_json)

# Client names become repository and directory names.  gitosis-admin is the
# ACL repository itself and must never be treated as a client.
CLIENT_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$')
RESERVED_CLIENTS = {'gitosis-admin', 'gitolite-admin', 'testing'}
# Names of request files in pushed trees.  '.reason' is reserved for the
# notes beside refused requests.
RQ_NAME = r'RQ[A-Za-z0-9][A-Za-z0-9._-]{0,127}'
RQ_NAME_RE = re.compile(f'^{RQ_NAME}$')
RESULTS_REF = 'refs/heads/results'
# Commands the git account runs (hooks, forced command, key management):
# group-writable files and a log file of their own.
GIT_SIDE_COMMANDS = ('ingest', 'gate', 'provision', 'add-client')
# A client may only ever move master forward; results is written by the
# node alone (update-ref does not run hooks), so no push may touch it.
UPDATE_HOOK = """#!/bin/sh
# gitbackup: clients may push refs/heads/master only; the node writes
# refs/heads/results itself.  Deletes and rewinds are refused by
# receive.denyDeletes and receive.denyNonFastForwards.
case "$1" in
refs/heads/master) exit 0 ;;
*) echo "gitbackup: refusing to update $1: only refs/heads/master may be pushed" >&2
   exit 1 ;;
esac
"""

# What ssh, sftp and git say (LC_ALL=C) when the other side cannot be
# reached, or the connection drops: the client is down, not the request bad.
CONNECTION_LOST_RE = re.compile(
    r'unable to connect|Connection refused|Connection timed out|'
    r'Could not resolve host|No route to host|Network is unreachable|'
    r'Connection closed|Connection reset|Broken pipe|'
    r'connect to host|Connection to \S+ closed')

# Node pool states.
NEW, PROCESSING, FINISHED, FAILED = 'RQ', 'P', 'F', 'X'
NODE_STATES = (NEW, PROCESSING, FINISHED, FAILED)
KEY_RE = re.compile(f'^[0-9a-f]{{40}}-{RQ_NAME}$')


class RequestRefused(GitBackupError):
    """A request that fails validation: never retried, kept as X*."""


class TransientError(GitBackupError):
    """A request that failed for now (space, a bad transfer): retried later,
    X* after max_attempts."""


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


class NoSpace(Waiting):
    """The node's free-space floor or the client's quota stops a fetch."""
    health = 'space'
    what = 'storing backups of {client}'
    alert_after = None


class Misconfigured(Waiting):
    """The node's own configuration for this client is incomplete or
    wrong: fix backup.ini, the requests wait."""
    health = 'config'
    what = 'the node configuration for client {client}'
    alert_after = None


def check_client_name(name):
    if not CLIENT_RE.match(name or '') or name in RESERVED_CLIENTS or \
            name.endswith('.git') or '..' in name:
        raise UsageError(f'bad client name {clean_text(name)!r} (use '
                         '[A-Za-z0-9][A-Za-z0-9._-]*, no "..", no .git '
                         'suffix, not ' + ', '.join(sorted(RESERVED_CLIENTS))
                         + ')')
    return name


def split_key(filename):
    """'RQ<key>' / 'P<key>' ... -> (state, key), or (None, None).  The
    notes beside refused requests (X<key>.reason) are not requests: ingest
    never accepts a name ending in '.reason'."""
    if filename.endswith('.reason'):
        return None, None
    for state in NODE_STATES:
        if filename.startswith(state) and KEY_RE.match(filename[len(state):]):
            return state, filename[len(state):]
    return None, None


def list_pool(pool):
    states = {s: [] for s in NODE_STATES}
    try:
        names = os.listdir(pool)
    except FileNotFoundError:
        return states
    for name in names:
        state, key = split_key(name)
        if state:
            states[state].append(key)
    for keys in states.values():
        keys.sort()
    return states


class NodeContext:
    """What a node module sees while it handles one request."""

    RequestRefused = RequestRefused
    TransientError = TransientError
    Unreachable = Unreachable
    NoSpace = NoSpace
    Misconfigured = Misconfigured
    pause_point = staticmethod(gb.pause_point)
    fsync_dir = staticmethod(fsync_dir)
    atomic_write = staticmethod(atomic_write)

    @staticmethod
    def connection_lost(stderr):
        return bool(CONNECTION_LOST_RE.search(stderr or ''))

    def __init__(self, node, client, key, leftover):
        self.node = node
        self.config = node.config
        self.client = client
        self.key = key
        self.leftover = leftover
        self.settings = node.client_settings(client)
        self.client_dir = os.path.join(node.settings['data_dir'], client)
        self.log = log
        self.run = gb.run
        self.sha256_file = gb.sha256_file
        self.now = gb.isotime
        self.timeout = node.config.get_duration('server', 'command_timeout')

    def refuse(self, message):
        raise RequestRefused(message)

    # -- validation of untrusted fields -----------------------------------

    def check_timestamp(self, text):
        if not re.fullmatch(r'[0-9]{8}T[0-9]{6}Z', text):
            self.refuse(f'bad timestamp {clean_text(text)!r}')
        return text

    def parse_options(self, tokens):
        """key=value tokens: unknown keys ignored, malformed refused."""
        checks = {'sha256': r'[0-9a-f]{64}', 'size': r'[0-9]{1,15}',
                  'source': r'[A-Za-z0-9][A-Za-z0-9._-]{0,63}'}
        options = {}
        for token in tokens:
            key, eq, value = token.partition('=')
            if not eq or not re.fullmatch(r'[a-z][a-z0-9_]{0,31}', key):
                self.refuse(f'malformed option {clean_text(token)!r}')
            if key in checks:
                if not re.fullmatch(checks[key], value):
                    self.refuse(f'malformed {key}={clean_text(value)!r}')
                options[key] = value
        return options

    def check_remote_path(self, path, root):
        """An absolute path, plain characters, no '..', inside root (both
        compared normalised and ending in '/', as borg does)."""
        if not root:
            raise Misconfigured(f'no sftp_root configured for client '
                                f'{self.client} (set [server] sftp_root or '
                                f'[client {self.client}] sftp_root)')
        if not re.fullmatch(r'/[A-Za-z0-9._/+@=,-]{1,1000}', path) or \
                '/../' in path + '/' or '/./' in path + '/' or '//' in path:
            self.refuse(f'bad path {clean_text(path)!r}')
        root = os.path.normpath(root)
        norm = os.path.normpath(path)
        if not (norm + '/').startswith(root.rstrip('/') + '/') or norm == root:
            self.refuse(f'path {clean_text(path)!r} is outside sftp_root '
                        f'{root}')
        return norm

    # -- storage ------------------------------------------------------------

    def check_space(self, size):
        """Refuse (for now) a fetch that would break the quota or the floor.
        Returns how many bytes may still be fetched (the cap for a download
        whose size the request does not announce)."""
        floor = self.config.get_size('server', 'free_space_floor')
        data_dir = self.node.settings['data_dir']
        os.makedirs(data_dir, exist_ok=True)
        free = shutil.disk_usage(data_dir).free
        if free - size < floor:
            raise NoSpace(
                f'not fetching {gb.human_size(size)} for {self.client}: only '
                f'{gb.human_size(free)} free on {data_dir}, floor is '
                f'{gb.human_size(floor)} ([server] free_space_floor)')
        quota = self.settings['quota']
        if quota:
            used = gb.tree_size(self.client_dir)
            if used + size > quota:
                raise NoSpace(
                    f'not fetching {gb.human_size(size)} for {self.client}: '
                    f'quota {gb.human_size(quota)}, used {gb.human_size(used)}')
            return min(free - floor, quota - used)
        return free - floor

    def incoming_dir(self):
        """A fresh staging directory for this request's files."""
        path = os.path.join(self.client_dir, 'files', '.incoming', self.key)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def already_stored(self, source):
        """After a crash between storing and finishing a request, find what
        was stored, so nothing is stored twice."""
        base = os.path.join(self.client_dir, 'files', source)
        try:
            names = sorted(os.listdir(base), reverse=True)
        except FileNotFoundError:
            return None
        for name in names:
            manifest = read_json(os.path.join(base, name, 'manifest.json'))
            if manifest and manifest.get('request') == self.key:
                return os.path.join(base, name)
        return None

    def store(self, incoming, source, manifest):
        """Write the manifest and rename the staging directory into
        files/<source>/<node time>: the one step that makes it stored."""
        manifest = {'client': self.client, 'source': source,
                    'request': self.key, 'stored': gb.isotime(), **manifest}
        gb.write_json(os.path.join(incoming, 'manifest.json'), manifest)
        gb.pause_point('run:manifest')
        for name in os.listdir(incoming):
            with open(os.path.join(incoming, name), 'rb') as f:
                os.fsync(f.fileno())
        fsync_dir(incoming)
        base = os.path.join(self.client_dir, 'files', source)
        os.makedirs(base, exist_ok=True)
        stamp = gb.timestamp()
        final = os.path.join(base, stamp)
        n = 1
        while os.path.exists(final):
            n += 1
            final = os.path.join(base, f'{stamp}.{n}')
        os.rename(incoming, final)
        fsync_dir(base)
        gb.pause_point('run:stored')
        return final

    # -- transport ------------------------------------------------------------

    def ssh_args(self):
        """ssh_command split into what sftp accepts: -S program + options."""
        words = shlex.split(self.node.settings['ssh_command'])
        args = [] if words[0] == 'ssh' else ['-S', words[0]]
        return args + words[1:]

    def sftp_get(self, remote, local, max_size=None):
        """Download one file with sftp in batch mode into local.  Streams to
        disk; stops the transfer if the file grows beyond max_size."""
        target = self.settings['sftp']
        args = ['sftp', '-b', '-', *self.ssh_args(),
                '-o', f'Port={self.settings["sftp_port"]}',
                '-o', 'BatchMode=yes', '--', target]
        batch = 'get "%s" "%s"\n' % (remote, local.replace('\\', '\\\\')
                                     .replace('"', '\\"'))
        log.debug('running: %s <<< %s', shlex.join(args), batch.strip())
        # stderr goes to a file: a pipe nobody reads while we poll could
        # fill up and stall the transfer.
        with tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(args, stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=err,
                                        env={**os.environ, 'LC_ALL': 'C'})
            except FileNotFoundError:
                raise gb.ToolMissing('sftp: not installed or not in PATH') \
                    from None
            proc.stdin.write(batch.encode())
            proc.stdin.close()
            deadline = time.monotonic() + self.timeout
            stopped = None
            while proc.poll() is None:
                if max_size is not None and os.path.exists(local) and \
                        os.path.getsize(local) > max_size:
                    stopped = (f'{target}:{remote} is larger than the '
                               f'{max_size} bytes announced; stopped')
                elif time.monotonic() > deadline:
                    stopped = (f'sftp from {target} still running after '
                               f'{self.timeout} s ([server] command_timeout);'
                               ' stopped')
                if stopped:
                    proc.kill()
                    proc.wait()
                    break
                time.sleep(0.05)
            err.seek(0)
            stderr = err.read().decode('utf-8', 'replace')
        if stopped:
            raise TransientError(stopped)
        if proc.returncode != 0:
            # sftp exits 255 when ssh cannot connect or authenticate, and 1
            # with a message when the connection drops in the middle.
            error = Unreachable if proc.returncode == 255 or \
                self.connection_lost(stderr) else TransientError
            raise error(
                f'sftp from {target} port {self.settings["sftp_port"]} '
                f'failed (exit {proc.returncode}): '
                f'{clean_text(stderr.strip(), 1000)}')


class Node:
    def __init__(self, config):
        self.config = config
        self.settings = config.require('server')
        self.name = self.settings['name']
        self.state_dir = os.path.join(self.settings['log_dir'], 'state')

    def pool(self, client):
        return os.path.join(self.settings['todo_dir'], client)

    def repository(self, client):
        return os.path.join(self.settings['repositories'], client + '.git')

    def client_settings(self, client):
        """Where this node fetches a client's data: the node's own
        configuration, never anything a request says."""
        section = self.config.section(f'client {client}')
        server = self.settings
        sftp = section.get('sftp') or f'{server["sftp_user"]}@{client}'
        if '@' not in sftp:
            sftp = f'{server["sftp_user"]}@{sftp}'
        try:
            quota = gb.parse_size(section.get('quota') or server['quota'])
            port = int(section.get('sftp_port') or 22)
        except ValueError as e:
            raise ConfigError(f'[client {client}]: {e}') from None
        return {'sftp': sftp, 'sftp_port': port,
                'sftp_root': section.get('sftp_root') or server['sftp_root'],
                'git': (section.get('git') or f'git://{client}').rstrip('/'),
                'quota': quota}

    def clients(self):
        """Clients with a pool or a repository on this node."""
        names = set()
        for directory, suffix in ((self.settings['todo_dir'], ''),
                                  (self.settings['repositories'], '.git')):
            try:
                entries = os.listdir(directory)
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.endswith(suffix) and not entry.startswith('.'):
                    name = entry[:len(entry) - len(suffix)]
                    try:
                        names.add(check_client_name(name))
                    except UsageError:
                        log.debug('ignoring %s in %s', entry, directory)
        return sorted(names)

    # -- client repositories ------------------------------------------------

    def hook_text(self, client):
        """The post-update hook of <client>.git: absolute interpreter, script
        and configuration, since hooks run with a minimal environment."""
        return ('#!/bin/sh\n'
                '# gitbackup: take in the pushed backup requests '
                '(server.py ingest).\n'
                f'exec {shlex.quote(sys.executable)} '
                f'{shlex.quote(os.path.abspath(__file__))} '
                f'--config {shlex.quote(self.config.path)} -q '
                f'ingest {shlex.quote(client)} "$@"\n')

    def ensure_repository(self, client, repo=None):
        """Create or repair <client>.git: bare, the ingest hook, and settings
        that make the request history an append-only ledger.  Idempotent."""
        check_client_name(client)
        repo = repo or self.repository(client)
        if not os.path.isdir(os.path.join(repo, 'objects')):
            os.makedirs(repo, exist_ok=True)
            git(repo, 'init', '--quiet', '--bare', '--shared=group')
            log.info('created repository %s', repo)
        max_push = self.config.get_size('server', 'max_push_size')
        for key, value in (('receive.denyDeletes', 'true'),
                           ('receive.denyNonFastForwards', 'true'),
                           ('receive.fsckObjects', 'true'),
                           ('receive.maxInputSize', str(max_push)),
                           ('core.sharedRepository', 'group')):
            git(repo, 'config', key, value)
        self.install_hook(repo, 'post-update', self.hook_text(client))
        self.install_hook(repo, 'update', UPDATE_HOOK, foreign_ok=True)
        os.makedirs(self.pool(client), mode=0o2775, exist_ok=True)
        return repo

    @staticmethod
    def install_hook(repo, name, text, foreign_ok=False):
        """Write a hook atomically unless it is already right.  With
        foreign_ok, a hook we did not write (gitolite's update hook) is
        left alone."""
        hook = os.path.join(repo, 'hooks', name)
        os.makedirs(os.path.dirname(hook), exist_ok=True)
        try:
            with open(hook) as f:
                current = f.read()
        except (FileNotFoundError, UnicodeDecodeError):
            current = None
        if current == text:
            return
        if foreign_ok and current is not None and 'gitbackup' not in current:
            log.info('%s: keeping the existing %s hook', repo, name)
            return
        atomic_write(hook, text, mode=0o755)
        log.info('installed the %s hook of %s', name, repo)

    # -- ingest -----------------------------------------------------------

    def ingest(self, client, repo=None):
        """Turn new pushed commits into RQ files; return how many."""
        check_client_name(client)
        repo = os.path.abspath(repo or os.environ.get('GIT_DIR') or '.')
        pool = self.pool(client)
        os.makedirs(pool, mode=0o2775, exist_ok=True)
        lock = Lock(os.path.join(pool, '.lock'))
        if not lock.acquire(wait=5):
            raise GitBackupError(f'pool {pool} is locked by pid '
                                 f'{lock.holder()}; the next push or run '
                                 'ingests these requests')
        with lock:
            return self._ingest_locked(client, repo, pool)

    def _ingest_locked(self, client, repo, pool):
        tip = git(repo, 'rev-parse', '--verify', '--quiet',
                  'refs/heads/master^{commit}', check=False).stdout.strip()
        marker = os.path.join(pool, '.ingested')
        last = ''
        if os.path.exists(marker):
            with open(marker) as f:
                last = f.read().strip()
        if not tip or tip == last:
            return 0
        revs = [tip]
        if re.fullmatch(r'[0-9a-f]{40}', last) and git(
                repo, 'cat-file', '-e', last + '^{commit}',
                check=False).returncode == 0:
            revs.append('^' + last)
        commits = git(repo, 'rev-list', '--reverse', *revs).stdout.split()
        incomplete = os.path.join(pool, '.incomplete')
        shutil.rmtree(incomplete, ignore_errors=True)
        existing = {key for keys in list_pool(pool).values() for key in keys}
        limit = self.config.get_int('server', 'max_requests_per_push')
        max_size = self.config.get_int('server', 'max_request_size')
        wanted, done = [], []
        for commit in commits:
            # max_requests_per_push caps a whole push, not each commit: the
            # commits beyond it wait for the next ingest (run catches up).
            found = self.request_blobs(client, repo, commit, existing, limit)
            if wanted and len(wanted) + len(found) > limit:
                log.warning('%s: %d commit(s) left for the next run '
                            '(max_requests_per_push %d reached)', client,
                            len(commits) - len(done), limit)
                break
            wanted += found
            done.append(commit)
        sizes = self.blob_sizes(repo, [blob for _, blob in wanted])
        accepted = []
        for key, blob in wanted:
            if sizes.get(blob, max_size + 1) > max_size:
                log.warning('%s: ignored %s: %s bytes, more than '
                            'max_request_size %d', client, key,
                            sizes.get(blob, '?'), max_size)
                note_ignored(pool, f'{client}: ignored {key}: '
                             f'{sizes.get(blob, "?")} bytes, more than '
                             f'max_request_size {max_size}')
            else:
                accepted.append((key, blob))
        if accepted:
            os.mkdir(incomplete)
            contents = self.blob_contents(repo, [b for _, b in accepted])
            for key, blob in accepted:
                with open(os.path.join(incomplete, NEW + key), 'wb') as f:
                    f.write(contents[blob])
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(incomplete)
            gb.pause_point('ingest:written')
            for key, _ in accepted:
                os.rename(os.path.join(incomplete, NEW + key),
                          os.path.join(pool, NEW + key))
            fsync_dir(pool)
            os.rmdir(incomplete)
        atomic_write(marker, (done[-1] if done else tip) + '\n', mode=0o664)
        log.info('ingested %d request(s) of %d commit(s) from %s',
                 len(accepted), len(done), client)
        return len(accepted)

    def request_blobs(self, client, repo, commit, existing, limit):
        """[(key, blob)] of the RQ files in one commit's root tree."""
        out = git(repo, 'ls-tree', '-z', commit, text=False).stdout
        found, ignored = [], []
        for entry in out.split(b'\0'):
            if not entry:
                continue
            meta, _, raw_name = entry.partition(b'\t')
            mode, kind, blob = meta.decode().split()
            name = raw_name.decode('utf-8', 'replace')
            if name == 'timestamp' and kind == 'blob':
                continue
            if kind != 'blob' or mode not in ('100644', '100755') or \
                    not RQ_NAME_RE.match(name) or name.endswith('.reason'):
                ignored.append(f'{name} ({kind} {mode})')
                continue
            if len(found) >= limit:
                ignored.append(f'{name} (over max_requests_per_push)')
                continue
            key = f'{commit}-{name}'
            if key not in existing:
                found.append((key, blob))
        if ignored:
            log.warning('%s: commit %s: ignored %d entr%s: %s', client,
                        commit[:12], len(ignored),
                        'y' if len(ignored) == 1 else 'ies',
                        clean_text(', '.join(ignored[:5])))
            note_ignored(self.pool(client), '%s: commit %s: ignored %d '
                         'entr%s: %s' % (client, commit[:12], len(ignored),
                                         'y' if len(ignored) == 1 else 'ies',
                                         clean_text(', '.join(ignored[:5]))))
        return found

    @staticmethod
    def blob_sizes(repo, blobs):
        if not blobs:
            return {}
        out = git(repo, 'cat-file', '--batch-check',
                  input='\n'.join(blobs) + '\n').stdout
        sizes = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] == 'blob':
                sizes[parts[0]] = int(parts[2])
        return sizes

    @staticmethod
    def blob_contents(repo, blobs):
        out = git(repo, 'cat-file', '--batch', text=False,
                  input=('\n'.join(blobs) + '\n').encode()).stdout
        contents, pos = {}, 0
        while pos < len(out):
            header_end = out.index(b'\n', pos)
            sha, _, size = out[pos:header_end].decode().split()
            start = header_end + 1
            contents[sha] = out[start:start + int(size)]
            pos = start + int(size) + 1
        return contents

    # -- run ----------------------------------------------------------------

    def run(self):
        """Handle every client's pool; return the list of errors."""
        errors = []
        gb.flush_mail_queue(self.config, 'server')
        for client in self.clients():
            repo = self.repository(client)
            if os.path.isdir(repo):
                # A hook that did not run (or ran into a lock) is caught up.
                try:
                    self.ingest(client, repo)
                except GitBackupError as e:
                    errors.append(f'{client}: ingest: {e}')
                    log.error('%s', errors[-1])
            errors += take_ignored_notes(self, client)
            errors += self.process_pool(client)
            try:
                self.publish_results(client)
            except (GitBackupError, OSError) as e:
                errors.append(f'{client}: publishing results: {e}')
                log.error('%s', errors[-1])
        gb.mail_summary(self.config, 'server',
                        f'gitbackup: run on {self.name}: {{n}} problem(s)',
                        errors)
        return errors

    def process_pool(self, client):
        pool = self.pool(client)
        states = list_pool(pool)
        errors = []
        self.unreachable = False
        for key in states[PROCESSING]:
            log.info('%s: resuming %s after an interrupted run', client, key)
            errors += self.handle(client, key, leftover=True)
        for key in states[NEW]:
            if self.unreachable:
                break  # the rest waits for the next run
            try:
                os.rename(os.path.join(pool, NEW + key),
                          os.path.join(pool, PROCESSING + key))
            except FileNotFoundError:
                continue
            errors += self.handle(client, key, leftover=False)
        return errors

    def read_request(self, client, key):
        path = os.path.join(self.pool(client), PROCESSING + key)
        limit = self.config.get_int('server', 'max_request_size')
        with open(path, 'rb') as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise RequestRefused(f'request larger than {limit} bytes')
        try:
            text = data.decode('utf-8')
        except UnicodeDecodeError:
            raise RequestRefused('request is not UTF-8') from None
        line = text[:-1] if text.endswith('\n') else text
        if not line or any(not c.isprintable() for c in line):
            raise RequestRefused('request is not one printable line: '
                                 f'{clean_text(line)!r}')
        module, _, rest = line.partition(' ')
        if not gb.MODULE_RE.match(module):
            raise RequestRefused(f'bad module name {clean_text(module)!r}')
        return line, module, rest

    def handle(self, client, key, leftover):
        """Handle one P* request; return a list with the error, if any."""
        pool = self.pool(client)
        start = gb.isotime()
        try:
            line, module_name, rest = self.read_request(client, key)
            try:
                module = gb.load_module(self.config.modules_dir('server'),
                                        module_name)
            except gb.ModuleError:
                module = None
            if module is None or not module.has('handle'):
                raise RequestRefused(f'unknown server module '
                                     f'{clean_text(module_name)!r}')
            try:
                ctx = NodeContext(self, client, key, leftover)
            except ConfigError as e:
                raise Misconfigured(str(e)) from None
            result = module.python.handle(ctx, rest) or {}
        except RequestRefused as e:
            return [self.give_up(client, key, f'refused: {e}')]
        except Waiting as e:
            return [self.wait(client, key, e)]
        except (GitBackupError, OSError) as e:
            return [self.failed(client, key, e)]
        try:
            # The outcome is journaled before the request is finished: a
            # crash in between re-handles it (modules find what they
            # stored) and journals it again, which readers deduplicate.
            self.record_result(client, key, 'stored', start, result)
            os.rename(os.path.join(pool, PROCESSING + key),
                      os.path.join(pool, FINISHED + key))
            fsync_dir(pool)
            try:
                os.unlink(os.path.join(pool, '.attempts', key))
            except FileNotFoundError:
                pass
            log.info('%s: %s done (%s) %s', client, key, module_name,
                     result.get('stored') or '')
            # Only a request that fetched something proves the client
            # reachable, the space sufficient and the configuration right.
            for kind in ((Unreachable, NoSpace, Misconfigured)
                         if result.get('fetched', True) else ()):
                health = self.health(client, kind)
                if kind is Unreachable or health.state.get('first_failure'):
                    health.ok()
        except OSError as e:
            return [gb.problem(f'{client}: {key}: stored, but recording it '
                               f'failed: {e}')]
        return []

    def health(self, client, kind):
        """The Health record of one kind of Waiting for one client."""
        return gb.Health(
            os.path.join(self.state_dir, f'{kind.health}-{client}.json'),
            self.config, 'server', kind.what.format(client=client))

    def requeue(self, client, key):
        pool = self.pool(client)
        os.rename(os.path.join(pool, PROCESSING + key),
                  os.path.join(pool, NEW + key))

    def wait(self, client, key, error):
        """Put the request back untouched: it costs no attempt; the admins
        hear of it once, through the Health record of its kind."""
        self.requeue(client, key)
        if error.stops_pool:
            self.unreachable = True
        alert_after = self.config.get_duration('server', error.alert_after) \
            if error.alert_after else 0
        self.health(client, type(error)).failed(str(error), alert_after)
        return gb.problem(f'{client}: {key}: waits for the next run: {error}',
                          mail=False)

    def failed(self, client, key, error):
        """A transient failure: retried by later runs, X* after
        max_attempts."""
        pool = self.pool(client)
        attempts_dir = os.path.join(pool, '.attempts')
        os.makedirs(attempts_dir, exist_ok=True)
        path = os.path.join(attempts_dir, key)
        state = read_json(path, {}) or {}
        state['attempts'] = state.get('attempts', 0) + 1
        state.setdefault('first', gb.isotime())
        state['last'] = gb.isotime()
        state['error'] = clean_text(error, 2000)
        limit = self.config.get_int('server', 'max_attempts')
        if state['attempts'] >= limit:
            return self.give_up(client, key, f'failed {state["attempts"]} '
                                f'times, last: {error}')
        write_json(path, state)
        self.requeue(client, key)
        return gb.problem(f'{client}: {key}: attempt {state["attempts"]} of '
                          f'{limit} failed (retried next run): '
                          f'{clean_text(error, 2000)}', mail=False)

    def give_up(self, client, key, reason):
        """X*: kept with the reason beside it, admins told in the run's
        summary mail."""
        pool = self.pool(client)
        reason = clean_text(str(reason).replace('\n', ' | '), 2000)
        atomic_write(os.path.join(pool, f'{FAILED}{key}.reason'),
                     f'{gb.isotime()} {reason}\n', mode=0o664)
        self.record_result(client, key, 'failed', gb.isotime(),
                           {'reason': reason})
        os.rename(os.path.join(pool, PROCESSING + key),
                  os.path.join(pool, FAILED + key))
        fsync_dir(pool)
        return gb.problem(f'{client}: {key}: given up, kept as {FAILED}{key}: '
                          f'{reason}')

    def publish_results(self, client):
        """Send new outcomes back to the client: one commit on the results
        branch of its own repository, holding only the new R<key> files
        (the mirror image of the request commits)."""
        repo = self.repository(client)
        journal = os.path.join(self.settings['data_dir'], client,
                               'results.jsonl')
        if not os.path.isdir(repo) or not os.path.exists(journal):
            return 0
        state_path = os.path.join(self.settings['data_dir'], client,
                                  '.results-published.json')
        offset = (read_json(state_path, {}) or {}).get('offset', 0)
        with open(journal, 'rb') as f:
            f.seek(offset)
            data = f.read()
        data = data[:data.rfind(b'\n') + 1]  # complete lines only
        if not data:
            return 0
        latest = {}  # a request journaled twice (after a crash): last wins
        for line in data.decode('utf-8', 'replace').splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and \
                    KEY_RE.match(str(entry.get('request', ''))):
                latest[entry['request']] = entry
        entries = []
        for key, entry in sorted(latest.items()):
            blob = git(repo, 'hash-object', '-w', '--stdin',
                       input=json.dumps(entry, sort_keys=True) + '\n') \
                .stdout.strip()
            entries.append(f'100644 blob {blob}\tR{key}')
        if entries:
            tree = git(repo, 'mktree', input='\n'.join(entries) + '\n') \
                .stdout.strip()
            parent = git(repo, 'rev-parse', '--verify', '--quiet',
                         RESULTS_REF, check=False).stdout.strip()
            commit = git(repo, 'commit-tree', tree,
                         *(['-p', parent] if parent else []),
                         env=gb.git_identity_env(f'gitbackup {self.name}',
                                                 f'gitbackup@{self.name}'),
                         input=f'{self.name} {gb.isotime()}: {len(entries)} '
                         'result(s)\n').stdout.strip()
            # Compare-and-swap; only the node writes this ref (the update
            # hook and gitolite's rules keep clients off it).
            git(repo, 'update-ref', RESULTS_REF, commit,
                parent or gb.ZERO_ID)
        write_json(state_path, {'offset': offset + len(data)})
        log.info('%s: published %d result(s)', client, len(entries))
        return len(entries)

    def record_result(self, client, key, outcome, start, result):
        """Append the outcome to the client's result journal (read by
        ``report`` and sent back to the client)."""
        journal = os.path.join(self.settings['data_dir'], client,
                               'results.jsonl')
        os.makedirs(os.path.dirname(journal), exist_ok=True)
        entry = {'request': key, 'outcome': outcome, 'started': start,
                 'finished': gb.isotime(), **result}
        with open(journal, 'a', encoding='utf-8') as f:
            f.write(json.dumps(entry, sort_keys=True) + '\n')
            f.flush()
            os.fsync(f.fileno())

    # -- check ----------------------------------------------------------------

    def check(self, out=sys.stdout):
        out.write(f'{self.config.path}: node {self.name}\n')
        problems = []
        for tool in ('git', 'sftp', 'ssh'):
            if not shutil.which(tool):
                problems.append(f'{tool}: not installed or not in PATH')
        for key in ('todo_dir', 'data_dir', 'log_dir', 'repositories'):
            path = self.settings[key]
            if not os.path.isdir(path):
                problems.append(f'[server] {key} = {path}: no such directory')
            elif not os.access(path, os.W_OK | os.X_OK):
                problems.append(f'[server] {key} = {path}: not writable')
        for key in ('alert_after', 'stale_after', 'command_timeout',
                    'keep_requests'):
            self.config.get_duration('server', key)
        for key in ('quota', 'free_space_floor'):
            self.config.get_size('server', key)
        for key in ('max_attempts', 'max_request_size',
                    'max_requests_per_push', 'keep_daily', 'keep_weekly',
                    'keep_monthly'):
            self.config.get_int('server', key)
        for client in self.config.client_sections():
            try:
                check_client_name(client)
                settings = self.client_settings(client)
            except GitBackupError as e:
                problems.append(f'[client {client}]: {e}')
                continue
            if not settings['sftp_root']:
                problems.append(f'[client {client}]: no sftp_root (here or '
                                'in [server]): sftp requests would fail')
            scheme = settings['git'].split('://', 1)[0]
            allowed = self.settings['git_protocols'].split()
            if '://' not in settings['git'] or scheme not in allowed or \
                    scheme in ('file', 'ext'):
                problems.append(f'[client {client}] git = {settings["git"]}: '
                                f'want a URL whose scheme is one of '
                                f'[server] git_protocols ({", ".join(allowed)})')
        for name in ('sftp', 'git'):
            try:
                gb.load_module(self.config.modules_dir('server'), name)
            except gb.ModuleError as e:
                problems.append(str(e))
        for p in problems:
            out.write(f'problem: {p}\n')
        if not problems:
            out.write(f'looks ready ({len(self.clients())} client(s))\n')
        return problems


# --------------------------------------------------------------------------
# -- access control
#
# Who may push to which <client>.git.  Three ways, one guarantee (a client's
# key may only push to, and fetch from, its own repository):
#
# * gitosis: its gitosis.conf names the repositories; ``provision`` (run by
#   the gitosis-admin post-update hook) gives each one the ingest hook and
#   the ledger settings.
# * gitolite3: ``RW`` (never ``RW+``) per client; a repo-specific
#   post-update hook runs ``ingest "$GL_REPO"`` (see docs/access-readme.md).
# * neither: ``gate <client>`` is the ssh forced command of the client's
#   key (``add-client`` writes that authorized_keys line).  Its structure
#   follows gitosis' serve.py: a side-effect-free gate_command() that checks
#   SSH_ORIGINAL_COMMAND against an allowlist and a strict pattern and
#   returns what to exec; main() creates the repository and execs.

IGNORED_NOTES = '.ignored'


def note_ignored(pool, text):
    """Remember what ingest ignored in a pushed tree (symlinks, bad names,
    oversized or surplus request files), so that the next run's summary
    mail tells the admins once per push instead of once per entry."""
    with open(os.path.join(pool, IGNORED_NOTES), 'a', encoding='utf-8') as f:
        f.write(clean_text(text, 1000) + '\n')


def take_ignored_notes(node, client):
    """The ingest notes of a client's pool since the last run (removed)."""
    pool = node.pool(client)
    path = os.path.join(pool, IGNORED_NOTES)
    if not os.path.exists(path):
        return []
    lock = Lock(os.path.join(pool, '.lock'))
    if not lock.acquire(wait=20):
        return []
    with lock:
        with open(path, encoding='utf-8', errors='replace') as f:
            notes = [line.rstrip('\n') for line in f if line.strip()]
        os.unlink(path)
    return [f'{note} (a client pushed what it should not; nothing of it '
            'was taken in)' for note in notes[:50]] + (
        [f'{client}: ... and {len(notes) - 50} more ignore notes in the log']
        if len(notes) > 50 else [])


class AccessDenied(GitBackupError):
    """An ssh command the gate does not allow (told to the client on
    stderr, logged, exit 1)."""


# Verbs as git's ssh transport sends them (old and new spelling), as in
# gitosis' COMMANDS_READONLY / COMMANDS_WRITE.
GATE_VERBS = {'git-upload-pack': 'upload-pack',
              'git upload-pack': 'upload-pack',
              'git-receive-pack': 'receive-pack',
              'git receive-pack': 'receive-pack'}
# The argument: gitosis' ALLOW_RE ("'/*path'"), one path component only,
# quotes optional (the command is exec'd, never given to a shell).
GATE_PATH_RE = re.compile(
    r"^(?P<q>'?)/*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,131})(?P=q)$")
# gitosis.conf: sections "[group NAME]"; repositories under these keys.
GITOSIS_WRITE_KEYS = ('writable', 'writeable')
GITOSIS_ADMIN_REPO = 'gitosis-admin'
# What add-client accepts as a public key (type, base64 blob, comment).
PUBLIC_KEY_RE = re.compile(
    r'^(?P<type>ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(?:256|384|521)|'
    r'sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com)'
    r' +(?P<blob>[A-Za-z0-9+/]{16,16384}={0,2})(?: +(?P<comment>.*))?$')


def gate_command(node, client, original_command):
    """Check an ssh command of <client>'s key; return the argv to exec.

    Allowed: git-upload-pack / git-receive-pack (or ``git upload-pack``
    ...) of ``'<client>.git'`` (leading slashes and the ``.git`` suffix
    optional, as gitosis allows).  Anything else raises AccessDenied.
    Creates nothing: main() does that.
    """
    check_client_name(client)
    if original_command is None:
        raise AccessDenied(f'no command: the key of {client} may only push '
                           f'to or fetch from {client}.git (no shell)')
    shown = clean_text(original_command, 200)
    if '\n' in original_command or '\r' in original_command or \
            '\0' in original_command:
        raise AccessDenied(f'refused command {shown!r}: contains a newline')
    words = original_command.split(None, 1)
    if words and words[0] == 'git':
        rest = original_command.split(None, 2)
        if len(rest) == 3:
            words = [f'{rest[0]} {rest[1]}', rest[2]]
    if len(words) != 2 or words[0] not in GATE_VERBS:
        raise AccessDenied(f'refused command {shown!r}: the key of {client} '
                           f'may only run git-upload-pack or '
                           f'git-receive-pack of {client}.git')
    match = GATE_PATH_RE.match(words[1].strip())
    if not match:
        raise AccessDenied(f'refused command {shown!r}: unsafe repository '
                           'argument')
    name = match.group('name')
    if name.endswith('.git'):
        name = name[:-len('.git')]
    if name != client:
        raise AccessDenied(f'refused command {shown!r}: the key of {client} '
                           f'may only use {client}.git')
    return ['git', GATE_VERBS[words[0]], node.repository(client)]


def gate_needs_repository(node, client):
    """True when <client>.git is missing or lacks its ingest hook (then
    the gate creates or repairs it before git runs)."""
    repo = node.repository(client)
    try:
        with open(os.path.join(repo, 'hooks', 'post-update')) as f:
            hook = f.read()
    except OSError:
        return True
    return not os.path.isdir(os.path.join(repo, 'objects')) or \
        hook != node.hook_text(client)


def read_gitosis_conf(text, source='gitosis.conf'):
    """The repository names gitosis.conf gives write access to, in file
    order, each once (a trailing .git is dropped, as gitosis does)."""
    parser = configparser.RawConfigParser(strict=False,
                                          inline_comment_prefixes=None)
    parser.optionxform = str
    try:
        parser.read_string(text, source)
    except configparser.Error as e:
        raise ConfigError(f'{source}: {clean_text(e)}') from None
    names = []
    for section in parser.sections():
        if not section.startswith('group '):
            continue
        group = []
        for key in GITOSIS_WRITE_KEYS:
            for name in (parser[section].get(key) or '').split():
                if name.endswith('.git'):
                    name = name[:-len('.git')]
                group.append(name)
                if name not in names:
                    names.append(name)
        members = (parser[section].get('members') or '').split()
        clients = [n for n in group if n != GITOSIS_ADMIN_REPO]
        if len(members) > 1 and clients:
            log.warning('%s: [%s] lets %d keys write %s: every member may '
                        'push to each of these; give every client a group '
                        'of its own', source, clean_text(section),
                        len(members), clean_text(' '.join(clients)))
    return names


def gitosis_conf_text(node, path=None):
    """gitosis.conf from a file, else HEAD of repositories/gitosis-admin.git
    (which is what its post-update hook has just received)."""
    if path:
        try:
            with open(path, encoding='utf-8') as f:
                return f.read(), path
        except (OSError, UnicodeError) as e:
            raise UsageError(f'cannot read {path}: {e}') from None
    admin = os.path.join(node.settings['repositories'],
                         GITOSIS_ADMIN_REPO + '.git')
    proc = git(admin, 'show', 'HEAD:gitosis.conf', check=False)
    if proc.returncode != 0:
        raise ConfigError(f'cannot read HEAD:gitosis.conf of {admin} (give '
                          'the path of gitosis.conf instead): '
                          f'{clean_text(proc.stderr.strip())}')
    return proc.stdout, f'{admin}:HEAD:gitosis.conf'


def provision(node, path=None):
    """Ensure every client repository gitosis.conf names exists with its
    hook, ledger settings and pool.  Returns the list of problems."""
    text, source = gitosis_conf_text(node, path)
    problems, done = [], 0
    for name in read_gitosis_conf(text, source):
        if name == GITOSIS_ADMIN_REPO:
            continue
        try:
            check_client_name(name)
            node.ensure_repository(name)
            done += 1
        except GitBackupError as e:
            problems.append(f'{source}: not provisioning {clean_text(name)!r}:'
                            f' {e}')
            log.error('%s', problems[-1])
    log.info('provisioned %d client repositor%s from %s', done,
             'y' if done == 1 else 'ies', source)
    return problems


def read_public_key(path):
    """(type, blob, comment) of the one public key in a file."""
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read(65536)
    except (OSError, UnicodeError) as e:
        raise UsageError(f'cannot read public key {path}: {e}') from None
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith('#')]
    if len(lines) != 1:
        raise UsageError(f'{path}: want exactly one public key line, found '
                         f'{len(lines)}')
    match = PUBLIC_KEY_RE.match(lines[0])
    if not match:
        raise UsageError(f'{path}: not a public key line (no options '
                         'allowed): ' + clean_text(lines[0], 80))
    try:
        blob = base64.b64decode(match.group('blob'), validate=True)
    except ValueError:
        raise UsageError(f'{path}: the key is not valid base64') from None
    kind = match.group('type').encode()
    if blob[:4] != len(kind).to_bytes(4, 'big') or \
            blob[4:4 + len(kind)] != kind:
        raise UsageError(f'{path}: the key data does not match its type '
                         f'{match.group("type")}')
    comment = re.sub(r'[^A-Za-z0-9@._+:=-]', '_', match.group('comment') or '')
    return match.group('type'), match.group('blob'), comment


def authorized_keys_line(node, client, key):
    kind, blob, comment = key
    words = [sys.executable, os.path.abspath(__file__), '--config',
             node.config.path, 'gate', client]
    if any('"' in w or '\\' in w or not w.isprintable() for w in words):
        raise UsageError('a path in the forced command contains a quote, '
                         'backslash or control character: ' +
                         clean_text(' '.join(words)))
    command = ' '.join(shlex.quote(w) for w in words)
    return f'command="{command}",restrict {kind} {blob} {comment}'.rstrip()


def add_client(node, client, key_file, authorized_keys=None):
    """Append the gate line of <client>'s key to authorized_keys (temp name,
    fsync, rename; other lines kept).  Returns the path written."""
    check_client_name(client)
    key = read_public_key(key_file)
    path = os.path.realpath(authorized_keys or
                            os.path.expanduser('~/.ssh/authorized_keys'))
    try:
        with open(path, encoding='utf-8', errors='surrogateescape') as f:
            current = f.read()
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        current, mode = '', 0o600
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    for number, line in enumerate(current.splitlines(), 1):
        if key[1] in line.split():
            raise UsageError(f'{path}:{number}: this key is already there; '
                             'a key may serve one client only (edit the '
                             'file by hand to change it)')
    if current and not current.endswith('\n'):
        current += '\n'
    atomic_write(path, (current + authorized_keys_line(node, client, key) +
                        '\n').encode('utf-8', 'surrogateescape'), mode=mode)
    log.info('%s: added the key of %s (gate %s)', path, client, client)
    return path


# --------------------------------------------------------------------------
# -- operations: gc, report, prune, verify
#
# What an admin runs from cron for years: `gc` keeps repositories small,
# `report` tells when backups silently stopped (Nagios exit codes,
# Prometheus textfile, a static HTML page), `prune` keeps disks from
# filling, `verify` proves that what is stored is still intact and
# restorable.  Every age here is measured on the node's own clock (the
# manifest's `stored` time, the directory name, the result journal), never
# on a timestamp a client supplied.

OK, WARNING, CRITICAL = 0, 1, 2
STATUS_NAMES = ('ok', 'warning', 'critical')
UTC = datetime.timezone.utc
# Directory names of stored backups: node time, '.n' when two landed in
# the same second.
STORED_NAME_RE = re.compile(r'^([0-9]{8}T[0-9]{6}Z)(?:\.([0-9]+))?$')
SOURCE_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._/+-]{0,200}$')
URL_PATH_RE = re.compile(r'^[a-z][a-z0-9+.-]{0,15}://[^/\s]*(/\S*)?$')
# What the sample restore check can read, by file name ending.
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz', '.tar.xz', '.txz', '.tar.zst',
                '.tar.bz2', '.tbz2')
DUMP_SUFFIXES = ('.dump',)
TAR_TOOLS = ((('.tar.gz', '.tgz'), 'gzip'), (('.tar.xz', '.txz'), 'xz'),
             (('.tar.zst',), 'zstd'), (('.tar.bz2', '.tbz2'), 'bzip2'))
# A Prometheus sample line (text exposition format 0.0.4).
PROM_HELP = {
    'gitbackup_last_success_timestamp_seconds':
        'Node time (Unix seconds) of the newest good backup of a source.',
    'gitbackup_last_success_age_seconds':
        'Seconds since the newest good backup of a source.',
    'gitbackup_backup_size_bytes':
        'Size of the newest good backup of a source.',
    'gitbackup_stored_bytes':
        'Bytes kept for a source (all its stored backups).',
    'gitbackup_backups':
        'Stored backups of a source (git mirrors: successful fetches).',
    'gitbackup_failed_requests':
        'Failed requests of a source kept as X* in the pool.',
    'gitbackup_pending_requests':
        'Requests of a source waiting in the pool (RQ* and P*).',
    'gitbackup_status':
        'Status of a source: 0 ok, 1 warning, 2 critical.',
    'gitbackup_client_status':
        'Worst status of a client: 0 ok, 1 warning, 2 critical.',
    'gitbackup_stale_after_seconds':
        'Age at which a source of the client becomes a warning.',
    'gitbackup_report_timestamp_seconds':
        'When this report was made (node time).',
}


def parse_node_time(text):
    """'2026-11-26T03:57:50Z' (manifest, journal) or '20261126T035750Z[.n]'
    (directory name) -> aware datetime; None when it is neither."""
    if not isinstance(text, str):
        return None
    m = STORED_NAME_RE.match(text)
    try:
        if m:
            return datetime.datetime.strptime(
                m.group(1), gb.TIMESTAMP_FORMAT).replace(tzinfo=UTC)
        return datetime.datetime.strptime(
            text, '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=UTC)
    except ValueError:
        return None


def human_age(seconds):
    if seconds is None:
        return '-'
    seconds = int(max(seconds, 0))
    for unit, size in (('d', 86400), ('h', 3600), ('m', 60)):
        if seconds >= size:
            major, rest = divmod(seconds, size)
            minor = {'d': ('h', 3600), 'h': ('m', 60), 'm': ('s', 1)}[unit]
            extra = rest // minor[1]
            return f'{major}{unit}{extra}{minor[0]}' if extra else \
                f'{major}{unit}'
    return f'{seconds}s'


class StoredBackup:
    """One directory files/<source>/<node time>/ and its manifest."""

    def __init__(self, source, path, manifest):
        self.source = source
        self.path = path
        self.name = os.path.basename(path)
        self.manifest = manifest if isinstance(manifest, dict) else None
        self.time = parse_node_time((self.manifest or {}).get('stored')) \
            or parse_node_time(self.name)

    @property
    def good(self):
        """A manifest listing files: what `store()` writes last."""
        return self.manifest is not None and \
            isinstance(self.manifest.get('files'), list)

    @property
    def size(self):
        return sum(int(f.get('size') or 0) for f in
                   (self.manifest or {}).get('files') or []
                   if isinstance(f, dict))

    @property
    def series(self):
        """The file names it holds: backups of one source with the same
        names (one database's dump, one directory's archive) form a series;
        retention and the restore check work per series."""
        return tuple(sorted(str(f.get('name')) for f in
                            (self.manifest or {}).get('files') or []
                            if isinstance(f, dict)))

    def sort_key(self):
        return (self.time or datetime.datetime.min.replace(tzinfo=UTC),
                self.name)


def stored_backups(node, client):
    """{source: [StoredBackup, ...] oldest first} of one client.  Hidden
    entries (.incoming, .trash-* of an interrupted prune) are skipped."""
    base = os.path.join(node.settings['data_dir'], client, 'files')
    result = {}
    try:
        sources = sorted(os.listdir(base))
    except FileNotFoundError:
        return result
    for source in sources:
        directory = os.path.join(base, source)
        if source.startswith('.') or not os.path.isdir(directory):
            continue
        backups = []
        for name in os.listdir(directory):
            path = os.path.join(directory, name)
            if name.startswith('.') or not os.path.isdir(path) or \
                    os.path.islink(path):
                continue
            manifest = read_json(os.path.join(path, 'manifest.json'))
            backups.append(StoredBackup(source, path, manifest))
        backups.sort(key=StoredBackup.sort_key)
        result[source] = backups
    return result


def find_repositories(top):
    """Bare repositories (objects/ and HEAD) at any depth below top."""
    found = []
    for root, dirs, files in os.walk(top):
        # Hidden: a mirror being created (.<name>.git.incoming) and the like.
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        if 'objects' in dirs and 'HEAD' in files and 'refs' in dirs:
            found.append(root)
            dirs[:] = []
    return found


def client_mirrors(node, client):
    """{source name 'git/<path>': mirror path} of one client."""
    top = os.path.join(node.settings['data_dir'], client, 'git')
    mirrors = {}
    for repo in find_repositories(top):
        rel = os.path.relpath(repo, top)
        if rel.endswith('.git'):
            rel = rel[:-4]
        mirrors['git/' + rel] = repo
    return mirrors


def known_clients(node):
    """Clients with a pool, a repository, stored data or a [client NAME]."""
    names = set(node.clients())
    try:
        entries = os.listdir(node.settings['data_dir'])
    except FileNotFoundError:
        entries = []
    for name in entries + node.config.client_sections():
        if os.path.isdir(os.path.join(node.settings['data_dir'], name)) or \
                name in node.config.client_sections():
            try:
                names.add(check_client_name(name))
            except UsageError:
                log.debug('ignoring %s (not a client name)', name)
    return sorted(names)


def read_results(node, client):
    """The entries of data_dir/<client>/results.jsonl (bad lines skipped)."""
    path = os.path.join(node.settings['data_dir'], client, 'results.jsonl')
    entries = []
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    entries.append(entry)
    except FileNotFoundError:
        pass
    return entries


def read_request_line(path):
    try:
        with open(path, 'rb') as f:
            data = f.read(4096)
    except OSError:
        return ''
    return data.decode('utf-8', 'replace').split('\n', 1)[0]


def request_source(node, client, line):
    """The source a request line belongs to: sftp -> its source= (default
    'files'), git -> 'git/<path>' of the mirror it feeds, others -> the
    module name.  None if the line says nothing usable."""
    module, _, rest = line.partition(' ')
    words = rest.split()
    if module == 'sftp':
        for word in words[2:]:
            if word.startswith('source='):
                source = word[len('source='):]
                return source if SOURCE_RE.match(source) and \
                    '..' not in source else None
        return 'files'
    if module == 'git' and words:
        # As modules/git.py does: only the URL's path counts, below the
        # path of the node's own base URL for the client.
        try:
            base = node.client_settings(client)['git']
        except GitBackupError:
            base = ''
        base_path = (URL_PATH_RE.match(base) or [None, ''])[1] or ''
        url_path = (URL_PATH_RE.match(words[0]) or [None, ''])[1] or ''
        prefix = base_path.rstrip('/') + '/'
        if url_path.startswith(prefix):
            rel = url_path[len(prefix):].strip('/')
            rel = rel[:-4] if rel.endswith('.git') else rel
            if SOURCE_RE.match(rel) and '..' not in rel.split('/'):
                return 'git/' + rel
        return 'git'
    return module if gb.MODULE_RE.match(module) else None


def stored_source(node, client, stored):
    """The source of a journal entry's 'stored' path, or None."""
    if not isinstance(stored, str) or not stored:
        return None
    client_dir = os.path.join(node.settings['data_dir'], client)
    rel = os.path.relpath(os.path.join(client_dir, stored), client_dir)
    parts = rel.split(os.sep)
    if parts[0] == 'files' and len(parts) >= 3:
        return parts[1]
    if parts[0] == 'git' and len(parts) >= 2:
        rel = '/'.join(parts[1:])
        return 'git/' + (rel[:-4] if rel.endswith('.git') else rel)
    return None


def pool_requests(node, client):
    """{'pending': {source: n}, 'failed': {source: n}, totals} of a pool."""
    pool = node.pool(client)
    counts = {'pending': {}, 'failed': {}, 'pending_total': 0,
              'failed_total': 0, 'failed_keys': {}}
    for state, keys in list_pool(pool).items():
        kind = 'failed' if state == FAILED else \
            'pending' if state in (NEW, PROCESSING) else None
        if kind is None:
            continue
        for key in keys:
            source = request_source(node, client, read_request_line(
                os.path.join(pool, state + key))) or '?'
            counts[kind][source] = counts[kind].get(source, 0) + 1
            counts[kind + '_total'] += 1
            if kind == 'failed':
                counts['failed_keys'][key] = source
    return counts


def client_limits(node, client):
    """stale_after (seconds) and expected sources of a client."""
    section = node.config.section(f'client {client}')
    value = section.get('stale_after') or node.settings['stale_after']
    try:
        stale = gb.parse_duration(value)
    except ValueError as e:
        raise ConfigError(f'[client {client}] stale_after: {e}') from None
    return stale, section.get('expect', '').split()


def source_report(node, client, now):
    """The report rows of one client: a dict per source, plus the client's
    own problems and status."""
    stale, expected = client_limits(node, client)
    rows = {}

    def row(source):
        return rows.setdefault(source, {
            'client': client, 'source': source, 'kind': 'files',
            'last_success': None, 'age_seconds': None, 'size_bytes': 0,
            'stored_bytes': 0, 'count': 0, 'failed': 0, 'pending': 0,
            'last_failure': None, 'last_failure_reason': None,
            'expected': False, 'status': 'ok', 'problems': []})

    for source, backups in stored_backups(node, client).items():
        good = [b for b in backups if b.good and b.time]
        if not good:
            continue
        r = row(source)
        r['count'] = len(good)
        r['stored_bytes'] = sum(b.size for b in good)
        r['size_bytes'] = sum(b.size for b in newest_of_series(good))
        r['last_success'] = good[-1].time
    journal = read_results(node, client)
    fetched = {}
    for entry in journal:
        if entry.get('outcome') != 'stored':
            continue
        source = stored_source(node, client, entry.get('stored'))
        when = parse_node_time(entry.get('finished'))
        if source and source.startswith('git/') and when:
            fetched.setdefault(source, []).append(when)
    for source, repo in client_mirrors(node, client).items():
        r = row(source)
        r['kind'] = 'git'
        times = fetched.get(source, [])
        if not times:
            # Before the first journal entry (or a mirror made by hand):
            # the mirror's own last change, on the node's clock.
            stamps = [os.stat(os.path.join(repo, name)).st_mtime
                      for name in ('FETCH_HEAD', 'packed-refs', 'refs')
                      if os.path.exists(os.path.join(repo, name))]
            if stamps:
                times = [datetime.datetime.fromtimestamp(max(stamps), UTC)]
        r['count'] = len(fetched.get(source, [])) or (1 if times else 0)
        r['last_success'] = max(times) if times else None
        r['size_bytes'] = r['stored_bytes'] = gb.tree_size(repo)
    pool = pool_requests(node, client)
    for source, n in pool['pending'].items():
        if source != '?':
            row(source)['pending'] = n
    for source, n in pool['failed'].items():
        if source != '?':
            row(source)['failed'] = n
    for entry in journal:
        if entry.get('outcome') != 'failed':
            continue
        source = pool['failed_keys'].get(entry.get('request'))
        when = parse_node_time(entry.get('finished'))
        if source and source != '?' and when:
            r = row(source)
            if not r['last_failure'] or when > r['last_failure']:
                r['last_failure'] = when
                r['last_failure_reason'] = clean_text(
                    entry.get('reason') or '', 300)
    client_problems = []
    client_status = OK
    for token in expected:
        matches = [s for s in rows if s == token or
                   (token == 'git' and s.startswith('git/'))]
        for s in matches or [token]:
            row(s)['expected'] = True
    for r in rows.values():
        level = OK
        if r['expected'] and not r['last_success']:
            level = CRITICAL
            r['problems'].append('expected source has no backup on this '
                                 'node')
        elif r['last_success']:
            age = (now - r['last_success']).total_seconds()
            r['age_seconds'] = int(max(age, 0))
            if age > stale:
                level = CRITICAL if r['expected'] or age > 2 * stale \
                    else WARNING
                r['problems'].append(
                    f'last good backup {human_age(age)} ago (stale_after '
                    f'{human_age(stale)})')
        else:
            level = CRITICAL if r['expected'] else WARNING
            r['problems'].append('no good backup stored yet')
        if r['last_failure'] and (not r['last_success'] or
                                  r['last_failure'] > r['last_success']):
            level = max(level, WARNING)
            r['problems'].append(f'latest request failed: '
                                 f'{r["last_failure_reason"]}')
        r['status'] = STATUS_NAMES[level]
        client_status = max(client_status, level)
    if not rows and not expected:
        client_problems.append('nothing stored for this client yet')
        client_status = max(client_status, WARNING)
    return {'client': client, 'status': STATUS_NAMES[client_status],
            'stale_after_seconds': stale, 'expect': expected,
            'pending': pool['pending_total'], 'failed': pool['failed_total'],
            'problems': client_problems,
            'sources': [rows[s] for s in sorted(rows)]}


def newest_of_series(backups):
    """The newest good backup of each series (see StoredBackup.series)."""
    newest = {}
    for backup in sorted(backups, key=StoredBackup.sort_key):
        newest[backup.series] = backup
    return list(newest.values())


def build_report(node, now=None):
    now = now or gb.utcnow()
    clients = [source_report(node, client, now)
               for client in known_clients(node)]
    worst = max([STATUS_NAMES.index(c['status']) for c in clients] or [OK])
    return {'node': node.name, 'generated': gb.isotime(now),
            'status': STATUS_NAMES[worst], 'clients': clients}


def report_json(report):
    def plain(value):
        if isinstance(value, datetime.datetime):
            return gb.isotime(value)
        raise TypeError(type(value).__name__)
    return json.dumps(report, default=plain, indent=1, sort_keys=True) + '\n'


def report_text(report):
    head = ('CLIENT', 'SOURCE', 'STATUS', 'LAST GOOD (node time)', 'AGE',
            'SIZE', 'COUNT', 'FAILED', 'PENDING')
    rows = []
    problems = []
    for c in report['clients']:
        for r in c['sources']:
            rows.append((c['client'], r['source'], r['status'],
                         gb.isotime(r['last_success']) if r['last_success']
                         else 'never', human_age(r['age_seconds']),
                         gb.human_size(r['size_bytes']), str(r['count']),
                         str(r['failed']), str(r['pending'])))
            problems += [f'{c["client"]}/{r["source"]}: {r["status"]}: {p}'
                         for p in r['problems']]
        if not c['sources']:
            rows.append((c['client'], '-', c['status'], 'never', '-', '-',
                         '0', str(c['failed']), str(c['pending'])))
        problems += [f'{c["client"]}: {c["status"]}: {p}'
                     for p in c['problems']]
    widths = [max(len(line[i]) for line in [head] + rows)
              for i in range(len(head))]
    lines = [f'gitbackup report of node {report["node"]} at '
             f'{report["generated"]}: {report["status"].upper()}', '']
    for line in [head] + rows:
        lines.append('  '.join(cell.ljust(w) for cell, w in
                               zip(line, widths)).rstrip())
    if problems:
        lines += ['', 'Problems:'] + ['  ' + clean_text(p, 1000)
                                      for p in problems]
    return '\n'.join(lines) + '\n'


def prometheus_label(value):
    return str(value).replace('\\', '\\\\').replace('"', '\\"') \
        .replace('\n', '\\n')


def report_prometheus(report):
    """node_exporter textfile collector format (write it to a *.prom file
    with --output: the file is replaced atomically)."""
    samples = {name: [] for name in PROM_HELP}
    for c in report['clients']:
        client = prometheus_label(c['client'])
        samples['gitbackup_client_status'].append(
            (f'{{client="{client}"}}', STATUS_NAMES.index(c['status'])))
        samples['gitbackup_stale_after_seconds'].append(
            (f'{{client="{client}"}}', c['stale_after_seconds']))
        for r in c['sources']:
            labels = (f'{{client="{client}",source="'
                      f'{prometheus_label(r["source"])}"}}')
            if r['last_success']:
                samples['gitbackup_last_success_timestamp_seconds'].append(
                    (labels, int(r['last_success'].timestamp())))
                samples['gitbackup_last_success_age_seconds'].append(
                    (labels, r['age_seconds']))
            samples['gitbackup_backup_size_bytes'].append(
                (labels, r['size_bytes']))
            samples['gitbackup_stored_bytes'].append(
                (labels, r['stored_bytes']))
            samples['gitbackup_backups'].append((labels, r['count']))
            samples['gitbackup_failed_requests'].append((labels, r['failed']))
            samples['gitbackup_pending_requests'].append(
                (labels, r['pending']))
            samples['gitbackup_status'].append(
                (labels, STATUS_NAMES.index(r['status'])))
    generated = parse_node_time(report['generated'])
    samples['gitbackup_report_timestamp_seconds'].append(
        (f'{{node="{prometheus_label(report["node"])}"}}',
         int(generated.timestamp())))
    lines = []
    for name, values in samples.items():
        if not values:
            continue
        lines.append(f'# HELP {name} {PROM_HELP[name]}')
        lines.append(f'# TYPE {name} gauge')
        lines += [f'{name}{labels} {value}' for labels, value in values]
    return '\n'.join(lines) + '\n'


def report_html(report):
    """A static, self-contained page (no scripts, no external files)."""
    e = html.escape
    rows = []
    for c in report['clients']:
        sources = c['sources'] or [None]
        for r in sources:
            status = r['status'] if r else c['status']
            problems = (r['problems'] if r else []) + c['problems']
            cells = [c['client'], r['source'] if r else '-', status.upper(),
                     gb.isotime(r['last_success'])
                     if r and r['last_success'] else 'never',
                     human_age(r['age_seconds']) if r else '-',
                     gb.human_size(r['size_bytes']) if r else '-',
                     str(r['count']) if r else '0',
                     str(r['failed'] if r else c['failed']),
                     str(r['pending'] if r else c['pending']),
                     '; '.join(problems)]
            rows.append(f'<tr class="{e(status)}" data-client="'
                        f'{e(c["client"])}">' +
                        ''.join(f'<td>{e(cell)}</td>' for cell in cells) +
                        '</tr>')
    head = ''.join(f'<th>{e(h)}</th>' for h in (
        'Client', 'Source', 'Status', 'Last good (node time)', 'Age', 'Size',
        'Backups', 'Failed', 'Pending', 'Problems'))
    title = f'gitbackup: node {report["node"]}'
    return f'''<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="300">
<title>{e(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #999; padding: 0.25em 0.6em; text-align: left; }}
th {{ background: #eee; }}
td {{ white-space: nowrap; }}
td:last-child {{ white-space: normal; }}
tr.ok td {{ background: #dfd; }}
tr.warning td {{ background: #ffd; }}
tr.critical td {{ background: #fdd; }}
</style>
</head>
<body>
<h1>{e(title)}</h1>
<p>Generated {e(report["generated"])} (node time).
Overall status: <strong class="{e(report["status"])}">{e(
        report["status"].upper())}</strong>.</p>
<table id="clients">
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody>
</table>
</body>
</html>
'''


REPORT_FORMATS = {'text': report_text, 'json': report_json,
                  'prometheus': report_prometheus, 'html': report_html}


def report_command(node, fmt='text', mail=False, output=None,
                   out=sys.stdout):
    """Print (or write atomically to output) the report; return the
    Nagios exit status: 0 ok, 1 warning, 2 critical."""
    report = build_report(node)
    text = REPORT_FORMATS[fmt](report)
    if output:
        atomic_write(output, text, mode=0o644)
    else:
        out.write(text)
    status = STATUS_NAMES.index(report['status'])
    if mail and status != OK:
        gb.mail_admins(node.config, 'server',
                       f'gitbackup: report of {node.name}: '
                       f'{report["status"].upper()}', report_text(report))
        for c in report['clients']:
            if c['status'] != 'ok':
                mail_client_admins(
                    node, c['client'], f'gitbackup: report of {node.name} '
                    f'for {c["client"]}: {c["status"].upper()}',
                    report_text(dict(report, clients=[c],
                                     status=c['status'])))
    return status


def mail_client_admins(node, client, subject, body):
    """Mail [client NAME] admin, the extra admins of one client's
    problems (the [server] admins are mailed separately)."""
    admins = node.config.admins(f'client {client}')
    if not admins:
        return False
    try:
        how = gb.sendmail.send(subject, body, admins,
                               node.config.section('mail'),
                               node.settings['log_dir'])
    except gb.sendmail.MailError as e:
        log.error('mail to %s failed: %s', ' '.join(admins), e)
        return False
    log.info('mailed %s: %s (%s)', ' '.join(admins), subject, how)
    return True


# -- gc ---------------------------------------------------------------------

def gc_command(node, aggressive=False):
    """git gc of every mirror and client repository; log mailed.  Returns
    the repositories whose gc failed."""
    repos = []
    data_dir = node.settings['data_dir']
    for client in known_clients(node):
        repos += find_repositories(os.path.join(data_dir, client, 'git'))
    repos += find_repositories(node.settings['repositories'])
    return gb.gc_repositories(node.config, 'server', repos, aggressive,
                              f'node {node.name}')


# -- prune ------------------------------------------------------------------

def retention(node, client):
    """(keep_daily, keep_weekly, keep_monthly) for a client."""
    section = node.config.section(f'client {client}')
    values = []
    for key in ('keep_daily', 'keep_weekly', 'keep_monthly'):
        value = section.get(key) or node.settings[key]
        try:
            values.append(int(value))
        except ValueError:
            raise ConfigError(f'[client {client}] {key}: not a number: '
                              f'{value!r}') from None
        if values[-1] < 0:
            raise ConfigError(f'{key} must not be negative')
    return tuple(values)


def backups_to_keep(backups, daily, weekly, monthly):
    """{path: reason} of the good backups to keep (given oldest first):
    the newest always; then the newest backup of each of the last `daily`
    days that have one, of the last `weekly` ISO weeks, of the last
    `monthly` months -- as borg and restic count."""
    newest_first = sorted(backups, key=StoredBackup.sort_key, reverse=True)
    keep = {}
    if newest_first:
        keep[newest_first[0].path] = 'newest'
    for count, fmt, what in ((daily, '%Y-%m-%d', 'daily'),
                             (weekly, '%G-W%V', 'weekly'),
                             (monthly, '%Y-%m', 'monthly')):
        seen = set()
        for backup in newest_first:
            if len(seen) >= count:
                break
            bucket = backup.time.strftime(fmt)
            if bucket not in seen:
                seen.add(bucket)
                keep.setdefault(backup.path, f'{what} {bucket}')
    return keep


def remove_tree(path):
    """Hide a directory by renaming it (atomic), then delete it."""
    parent, name = os.path.split(path)
    trash = os.path.join(parent, f'.trash-{name}')
    os.rename(path, trash)
    fsync_dir(parent)
    shutil.rmtree(trash)


def prune_command(node, dry_run=False, out=sys.stdout):
    """Apply retention to stored backups and remove old F*/X* request
    files; return the list of errors."""
    errors = []
    verb = 'would remove' if dry_run else 'removed'
    now = time.time()
    keep_requests = node.config.get_duration('server', 'keep_requests')
    removed = kept = 0
    for client in known_clients(node):
        daily, weekly, monthly = retention(node, client)
        for source, backups in stored_backups(node, client).items():
            directory = os.path.join(node.settings['data_dir'], client,
                                     'files', source)
            if not dry_run:
                for name in os.listdir(directory):
                    if name.startswith('.trash-'):   # an interrupted prune
                        shutil.rmtree(os.path.join(directory, name),
                                      ignore_errors=True)
            good = [b for b in backups if b.good and b.time]
            keep = {}
            for series in {b.series for b in good}:
                keep.update(backups_to_keep(
                    [b for b in good if b.series == series], daily, weekly,
                    monthly))
            for backup in good:
                if backup.path in keep:
                    kept += 1
                    log.debug('keeping %s (%s)', backup.path,
                              keep[backup.path])
                    continue
                try:
                    if not dry_run:
                        remove_tree(backup.path)
                except OSError as e:
                    errors.append(f'{backup.path}: {e}')
                    log.error('cannot remove %s: %s', backup.path, e)
                    continue
                removed += 1
                out.write(f'{verb} {backup.path}\n')
            for backup in backups:
                if not backup.good or not backup.time:
                    log.warning('%s: no readable manifest; not pruned (see '
                                '`server.py verify`)', backup.path)
        pool = node.pool(client)
        states = list_pool(pool)
        errors += prune_incoming(node, client, states, dry_run, out)
        for state in (FINISHED, FAILED):
            for key in states[state]:
                path = os.path.join(pool, state + key)
                extras = [p for p in (path + '.reason',
                                      os.path.join(pool, '.attempts', key))
                          if os.path.exists(p)]
                try:
                    mtime = max(os.lstat(p).st_mtime
                                for p in [path] + extras)
                except OSError:
                    continue
                if now - mtime <= keep_requests:
                    continue
                for p in [path] + extras:
                    try:
                        if not dry_run:
                            os.unlink(p)
                    except FileNotFoundError:
                        pass
                    except OSError as e:
                        errors.append(f'{p}: {e}')
                        continue
                    out.write(f'{verb} {p}\n')
        if not dry_run and os.path.isdir(pool):
            fsync_dir(pool)
    log.info('prune%s: %d backup(s) %s, %d kept', ' --dry-run' if dry_run
             else '', removed, verb, kept)
    return errors


def prune_incoming(node, client, states, dry_run, out):
    """Staging directories files/.incoming/<key> whose request is neither
    pending nor being handled, and older than command_timeout (no download
    runs longer), are what a crash left behind: remove them."""
    incoming = os.path.join(node.settings['data_dir'], client, 'files',
                            '.incoming')
    live = set(states[NEW]) | set(states[PROCESSING])
    limit = node.config.get_duration('server', 'command_timeout')
    try:
        paths = [os.path.join(incoming, name)
                 for name in sorted(os.listdir(incoming)) if name not in live]
    except FileNotFoundError:
        paths = []
    # The git module's first backup stages in .<name>.git.incoming beside
    # the mirror; one is left when that request was given up.
    git_root = os.path.join(node.settings['data_dir'], client, 'git')
    for root, dirs, _ in os.walk(git_root):
        paths += [os.path.join(root, d) for d in sorted(dirs)
                  if d.startswith('.') and d.endswith('.git.incoming')]
        dirs[:] = [d for d in dirs if not d.endswith(('.git', '.incoming'))]
    return gb.remove_listed(gb.older_than(paths, limit), dry_run, out)


# -- verify -----------------------------------------------------------------

def restore_check(path, timeout):
    """Read a stored file the way a restore would (tar lists the archive,
    pg_restore lists the dump).  None when fine or not checkable, else
    (level, message)."""
    name = os.path.basename(path)
    if name.endswith(TAR_SUFFIXES):
        args = ['tar', '--list', '--file', path]
        # tar runs the decompressor: missing, it is a check that could not
        # run, not a corrupt archive.
        for suffixes, tool in TAR_TOOLS:
            if name.endswith(suffixes) and not shutil.which(tool):
                return WARNING, (f'{path}: cannot check: {tool}: not '
                                 'installed or not in PATH')
    elif name.endswith(DUMP_SUFFIXES):
        args = ['pg_restore', '--list', '--', path]
    else:
        return None
    try:
        gb.run(args, stdout=subprocess.DEVNULL, timeout=timeout)
    except gb.ToolMissing as e:
        return WARNING, f'{path}: cannot check: {e}'
    except gb.CommandFailed as e:
        return CRITICAL, f'{path}: restore check failed: {e}'
    log.debug('restore check of %s passed', path)
    return None


def verify_backup(backup):
    """Re-hash the files of one stored backup; [(level, message)]."""
    if not backup.good:
        return [(CRITICAL, f'{backup.path}: manifest.json missing or '
                 'unreadable')]
    problems = []
    for entry in backup.manifest['files']:
        name = entry.get('name') if isinstance(entry, dict) else None
        if not isinstance(name, str) or '/' in name or name in ('', '.',
                                                                '..'):
            problems.append((CRITICAL, f'{backup.path}: bad file entry '
                             f'{clean_text(entry)!r} in manifest.json'))
            continue
        path = os.path.join(backup.path, name)
        try:
            digest, size = gb.sha256_file(path)
        except FileNotFoundError:
            problems.append((CRITICAL, f'{path}: missing'))
            continue
        except OSError as e:
            problems.append((CRITICAL, f'{path}: unreadable: {e}'))
            continue
        if size != entry.get('size'):
            problems.append((CRITICAL, f'{path}: size {size}, manifest says '
                             f'{entry.get("size")}'))
        if digest != entry.get('sha256'):
            problems.append((CRITICAL, f'{path}: sha256 {digest} does not '
                             f'match the manifest\'s {entry.get("sha256")}'))
    return problems


def verify_command(node, only_client=None, restore=True, out=sys.stdout):
    """Re-hash every stored file, git fsck every mirror and client
    repository, and check that the newest backup of each source can be
    read back.  Mails problems; returns 0 ok, 1 warning, 2 critical."""
    timeout = node.config.get_duration('server', 'command_timeout')
    problems = []
    files = repos = 0
    clients = [check_client_name(only_client)] if only_client else \
        known_clients(node)
    for client in clients:
        for source, backups in stored_backups(node, client).items():
            for backup in backups:
                found = verify_backup(backup)
                if found and not os.path.isdir(backup.path):
                    continue  # pruned meanwhile
                problems += found
                files += len((backup.manifest or {}).get('files') or [])
            good = [b for b in backups if b.good]
            for backup in newest_of_series(good) if restore else []:
                for entry in backup.manifest['files']:
                    if isinstance(entry, dict) and \
                            isinstance(entry.get('name'), str) and \
                            '/' not in entry['name']:
                        found = restore_check(os.path.join(
                            backup.path, entry['name']), timeout)
                        if found:
                            problems.append(found)
        targets = list(client_mirrors(node, client).values())
        repository = node.repository(client)
        if os.path.isdir(os.path.join(repository, 'objects')):
            targets.append(repository)
        for repo in targets:
            repos += 1
            proc = git(repo, 'fsck', '--no-progress', '--no-dangling',
                       check=False, timeout=timeout)
            if proc.returncode != 0:
                detail = '\n'.join('    ' + line for line in
                                   (proc.stderr + proc.stdout).strip()
                                   .splitlines()[-20:])
                problems.append((CRITICAL, f'{repo}: git fsck failed (exit '
                                 f'{proc.returncode}):\n{detail}'))
    status = max([level for level, _ in problems] or [OK])
    for level, message in problems:
        out.write(f'{STATUS_NAMES[level]}: {message}\n')
    summary = (f'verify on {node.name}: {files} file(s) re-hashed, {repos} '
               f'repositories checked, {len(problems)} problem(s): '
               f'{STATUS_NAMES[status].upper()}')
    out.write(summary + '\n')
    log.info('%s', summary)
    write_json(os.path.join(node.state_dir, 'verify.json'),
               {'finished': gb.isotime(), 'status': STATUS_NAMES[status],
                'problems': [m for _, m in problems][:100]})
    if problems:
        gb.mail_admins(node.config, 'server',
                       f'gitbackup: verify on {node.name}: '
                       f'{STATUS_NAMES[status].upper()}',
                       '\n'.join(f'{STATUS_NAMES[level]}: {message}'
                                 for level, message in problems) +
                       '\n\n' + summary + '\n')
    return status


# --------------------------------------------------------------------------
# Command line

def build_parser():
    parser = argparse.ArgumentParser(
        prog='server.py', formatter_class=gb.HelpFormatter,
        description=__doc__.split('\n\n')[0] + '\n\n' + '''\
Typical crontab of the backup user on the node:
  */5 * * * *  server.py run -q
  0 0 8 * *    server.py gc -q
  30 3 * * *   server.py prune -q
  0 4 * * 0    server.py verify -q >/dev/null
  0 7 * * *    server.py report -q --mail >/dev/null
and the post-update hook of every client repository <client>.git:
  exec python3 /path/to/server.py --config /path/backup.ini ingest <client>

Exit status: 0 success, 1 failure, 2 bad usage or configuration;
report and verify: 0 ok, 1 warning, 2 critical (Nagios).''')
    gb.common_options(parser, suppress=False)
    parser.add_argument('--version', action='version', version=gb.VERSION)
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True

    def command(name, help, description=''):
        p = sub.add_parser(name, help=help, description=description or help,
                           formatter_class=gb.HelpFormatter)
        gb.common_options(p, suppress=True)
        return p

    p = command('ingest', 'post-update hook: take in pushed requests',
                'Run as the post-update hook of <client>.git (cwd or $GIT_DIR '
                'is the repository).\nEvery pushed commit not yet ingested '
                'becomes RQ files in todo_dir/<client>/.\nSafe to run twice.')
    p.add_argument('client', help='the client, i.e. the repository name '
                   'without .git')
    p.add_argument('refnames', nargs='*', help='as git passes them (unused: '
                   'the whole unseen range is taken)')
    p.add_argument('--repository', help='the repository (default: $GIT_DIR, '
                   'else the current directory)')
    command('run', 'handle pending requests (cron, every 5 minutes)',
            'Handle every pending request of every client: pull the data with '
            'sftp or git.\nFailures are retried on later runs; after '
            'max_attempts a request becomes X*.\nA second concurrent run '
            'exits 0 at once.')
    command('check', 'test the configuration and environment')
    # -- access control
    p = command('provision', 'gitosis-admin post-update hook: create and '
                'harden the client repositories gitosis.conf names',
                'For every repository gitosis.conf gives write access to '
                '(except gitosis-admin):\ncreate <repositories>/<client>.git '
                'if missing, install its ingest hook,\nset '
                'receive.denyDeletes, receive.denyNonFastForwards, '
                'receive.fsckObjects,\nand create its pool.  Invalid client '
                'names are refused and logged.  Idempotent.\nDefault: '
                'gitosis.conf at HEAD of <repositories>/gitosis-admin.git.\n'
                'Hook line (append to gitosis-admin.git/hooks/post-update):\n'
                '  python3 /path/server.py --config /path/backup.ini -q '
                'provision')
    p.add_argument('gitosis_conf', nargs='?', help='a gitosis.conf file '
                   '(default: HEAD:gitosis.conf of gitosis-admin.git)')
    p = command('gate', 'ssh forced command: the key may only push to or '
                'fetch from <client>.git',
                'Run by sshd for a client\'s key (authorized_keys: '
                'command="... gate <client>",restrict).\nAllows only '
                'git-receive-pack / git-upload-pack of \'<client>.git\' '
                '(from $SSH_ORIGINAL_COMMAND),\ncreates the repository with '
                'its hook on first use; anything else: exit 1.')
    p.add_argument('client', help='the client this key belongs to')
    p = command('add-client', 'append a client key with the gate forced '
                'command to authorized_keys',
                'Appends command="<python> server.py --config <ini> gate '
                '<name>",restrict <key>\nto authorized_keys (temp file, '
                'fsync, rename; other lines kept).\nRefuses a key that is '
                'already there or a file that is not one public key.')
    p.add_argument('client', help='the client name (its repository name)')
    p.add_argument('public_key', help='file with the client\'s public key')
    p.add_argument('--authorized-keys', metavar='PATH',
                   help='default: ~/.ssh/authorized_keys of this user')
    # -- operations
    p = command('gc', 'git gc of every mirror and client repository; the '
                'log is mailed (cron, monthly)',
                'Run `git gc` on every stored mirror (data_dir/<client>/git/'
                '**.git) and every client\nrepository (repositories/*.git).  '
                'The collected log is written to\nlog_dir/git-gc-<time>.log '
                'and mailed to the admins.  Exit 1 if any gc failed.')
    p.add_argument('--aggressive', action='store_true',
                   help='git gc --aggressive (slow; as the seed did)')
    p = command('report', 'status per client and source; exit 0/1/2 like a '
                'Nagios check',
                'Per client and source: newest good backup (node time), its '
                'age and size, the number\nof stored backups, failed (X*) and '
                'pending (RQ*, P*) requests.\n\n'
                'Status of a source, on the node\'s clock only:\n'
                '  ok        newest good backup younger than stale_after\n'
                '  warning   older than stale_after, or its latest request '
                'failed, or nothing\n            stored yet\n'
                '  critical  older than twice stale_after\n'
                'A source named in [client NAME] expect (e.g. "expect = trac '
                'postgresdb"; "git"\nmatches every mirror) is critical as '
                'soon as it is stale or has never arrived.\nstale_after: '
                '[client NAME] stale_after, else [server] stale_after.\n\n'
                'Exit status (Nagios plugin convention): 0 ok, 1 warning, 2 '
                'critical.  Note that 2\nalso means bad usage or '
                'configuration, as for every other command: a broken\n'
                'configuration shows as critical.\n\n'
                'Formats: text (a table), json, prometheus (node_exporter '
                'textfile collector;\nuse --output /var/lib/prometheus/'
                'node-exporter/gitbackup.prom), html (a static\n'
                'self-contained page for any web server).')
    p.add_argument('--format', choices=sorted(REPORT_FORMATS),
                   default='text', help='output format (default: text)')
    p.add_argument('--mail', action='store_true',
                   help='mail the text report to the admins when not ok')
    p.add_argument('--output', metavar='PATH',
                   help='write to PATH (replaced atomically) instead of '
                   'stdout')
    p = command('prune', 'apply retention to stored backups and old '
                'request files (cron, daily)',
                'Per source, on node time: keep the newest backup of each of '
                'the last keep_daily\ndays, keep_weekly ISO weeks and '
                'keep_monthly months ([client NAME], else\n[server]); never '
                'the newest good backup; remove the rest.  Git mirrors are\n'
                'never pruned; directories without a readable manifest are '
                'left for verify.\nF* and X* request files (with .reason and '
                'attempts) older than keep_requests\nare removed, and '
                'staging directories a crash left behind (files/.incoming/,\n'
                'git/**/.<name>.git.incoming).  Every removal is printed.')
    p.add_argument('--dry-run', action='store_true',
                   help='print what would be removed; remove nothing')
    p = command('verify', 're-hash stored files, git fsck, sample restore '
                'check (cron, weekly)',
                'Re-hash every stored file against its manifest (sha256 and '
                'size); git fsck every\nmirror and client repository; read '
                'the newest backup of each source back\n(tar --list of '
                'archives, pg_restore --list of .dump files).  Problems are\n'
                'printed and mailed.  Exit status like report: 0 ok, 1 '
                'warning (a check could\nnot run), 2 critical (corruption).')
    p.add_argument('--client', help='only this client')
    p.add_argument('--no-restore-check', dest='restore',
                   action='store_false',
                   help='skip the tar/pg_restore read-back')
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    # ingest runs as the git user from a hook: files it creates must stay
    # readable and renamable by the backup user's group.
    if args.command in GIT_SIDE_COMMANDS:
        os.umask(0o002)
    gb.setup_logging(None, 'server.py', args.verbose, args.quiet)
    return gb.guarded(lambda: run_command(args))


def run_command(args):
    config = gb.Config(gb.find_config(args.config, __file__))
    node = Node(config)
    # The git account runs ingest/gate/provision: its own log file, so
    # that neither account needs to write the other's.
    git_side = args.command in GIT_SIDE_COMMANDS
    gb.setup_logging(node.settings['log_dir'], 'server.py',
                     args.verbose, args.quiet,
                     create=args.command != 'check',
                     log_name='server-git.log' if git_side else None)
    if args.command == 'ingest':
        node.ingest(args.client, args.repository)
        return 0
    if args.command == 'check':
        return 1 if node.check() else 0
    # -- access control
    if args.command == 'provision':
        return 1 if provision(node, args.gitosis_conf) else 0
    if args.command == 'add-client':
        add_client(node, args.client, args.public_key,
                   args.authorized_keys)
        return 0
    if args.command == 'gate':
        argv = gate_command(node, args.client,
                            os.environ.get('SSH_ORIGINAL_COMMAND'))
        if gate_needs_repository(node, args.client):
            node.ensure_repository(args.client)
        log.debug('gate %s: exec %s', args.client, shlex.join(argv))
        os.execvp(argv[0], argv)
    # -- operations
    if args.command == 'gc':
        return 1 if gc_command(node, args.aggressive) else 0
    if args.command == 'report':
        return report_command(node, args.format, args.mail, args.output)
    if args.command == 'prune':
        return gb.exclusive(
            node.settings['log_dir'], 'prune',
            lambda: 1 if prune_command(node, args.dry_run) else 0)
    if args.command == 'verify':
        return verify_command(node, args.client, args.restore)
    if args.command == 'run':
        return gb.exclusive(
            node.settings['log_dir'], 'run', lambda: 1 if node.run() else 0,
            2 * config.get_duration('server', 'command_timeout'))
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
