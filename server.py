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
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
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
RQ_NAME_RE = re.compile(r'^RQ[A-Za-z0-9][A-Za-z0-9._-]{0,127}$')
ZERO = '0' * 40

# Node pool states.
NEW, PROCESSING, FINISHED, FAILED = 'RQ', 'P', 'F', 'X'
NODE_STATES = (NEW, PROCESSING, FINISHED, FAILED)
KEY_RE = re.compile(r'^[0-9a-f]{40}-RQ[A-Za-z0-9][A-Za-z0-9._-]{0,127}$')


class RequestRefused(GitBackupError):
    """A request that fails validation: never retried, kept as X*."""


class TransientError(GitBackupError):
    """A request that failed for now (network, space): retried later."""


def check_client_name(name):
    if not CLIENT_RE.match(name or '') or name in RESERVED_CLIENTS or \
            name.endswith('.git') or '..' in name:
        raise UsageError(f'bad client name {clean_text(name)!r} (use '
                         '[A-Za-z0-9][A-Za-z0-9._-]*, not gitosis-admin)')
    return name


def split_key(filename):
    """'RQ<key>' / 'P<key>' ... -> (state, key), or (None, None)."""
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


def dir_size(path):
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


class NodeContext:
    """What a node module sees while it handles one request."""

    RequestRefused = RequestRefused
    TransientError = TransientError

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
            raise TransientError(f'no sftp_root configured for client '
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
        """Refuse (for now) a fetch that would break the quota or the floor."""
        floor = self.config.get_size('server', 'free_space_floor')
        data_dir = self.node.settings['data_dir']
        os.makedirs(data_dir, exist_ok=True)
        free = shutil.disk_usage(data_dir).free
        if free - size < floor:
            raise TransientError(
                f'not fetching {gb.human_size(size)} for {self.client}: only '
                f'{gb.human_size(free)} free on {data_dir}, floor is '
                f'{gb.human_size(floor)} ([server] free_space_floor)')
        quota = self.settings['quota']
        if quota:
            used = dir_size(self.client_dir)
            if used + size > quota:
                raise TransientError(
                    f'not fetching {gb.human_size(size)} for {self.client}: '
                    f'quota {gb.human_size(quota)}, used {gb.human_size(used)}')

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
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise gb.ToolMissing('sftp: not installed or not in PATH') from None
        proc.stdin.write(batch.encode())
        proc.stdin.close()
        deadline = time.monotonic() + self.timeout
        too_big = False
        while proc.poll() is None:
            if max_size is not None and os.path.exists(local) and \
                    os.path.getsize(local) > max_size:
                too_big = True
                proc.kill()
            elif time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
        stderr = proc.stderr.read().decode('utf-8', 'replace')
        proc.stderr.close()
        if too_big:
            raise TransientError(f'{target}:{remote} is larger than the '
                                 f'{max_size} bytes announced; stopped')
        if proc.returncode != 0:
            raise TransientError(
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
        for key, value in (('receive.denyDeletes', 'true'),
                           ('receive.denyNonFastForwards', 'true'),
                           ('receive.fsckObjects', 'true'),
                           ('core.sharedRepository', 'group')):
            git(repo, 'config', key, value)
        hook = os.path.join(repo, 'hooks', 'post-update')
        os.makedirs(os.path.dirname(hook), exist_ok=True)
        text = self.hook_text(client)
        try:
            with open(hook) as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != text:
            atomic_write(hook, text, mode=0o755)
            log.info('installed the ingest hook of %s', repo)
        os.makedirs(self.pool(client), mode=0o2775, exist_ok=True)
        return repo

    # -- ingest -----------------------------------------------------------

    def ingest(self, client, repo=None):
        """Turn new pushed commits into RQ files; return how many."""
        check_client_name(client)
        repo = os.path.abspath(repo or os.environ.get('GIT_DIR') or '.')
        pool = self.pool(client)
        os.makedirs(pool, mode=0o2775, exist_ok=True)
        lock = Lock(os.path.join(pool, '.lock'))
        if not lock.acquire(wait=20):
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
        wanted = []
        for commit in commits:
            wanted += self.request_blobs(client, repo, commit, existing, limit)
        sizes = self.blob_sizes(repo, [blob for _, blob in wanted])
        accepted = []
        for key, blob in wanted:
            if sizes.get(blob, max_size + 1) > max_size:
                log.warning('%s: ignored %s: %s bytes, more than '
                            'max_request_size %d', client, key,
                            sizes.get(blob, '?'), max_size)
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
            for key, _ in accepted:
                os.rename(os.path.join(incomplete, NEW + key),
                          os.path.join(pool, NEW + key))
            fsync_dir(pool)
            os.rmdir(incomplete)
        atomic_write(marker, tip + '\n', mode=0o664)
        log.info('ingested %d request(s) of %d commit(s) from %s',
                 len(accepted), len(commits), client)
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
            errors += self.process_pool(client)
        if errors:
            gb.mail_admins(self.config, 'server',
                           f'gitbackup: run on {self.name} had '
                           f'{len(errors)} error(s)',
                           '\n\n'.join(errors) + '\n')
        return errors

    def process_pool(self, client):
        pool = self.pool(client)
        states = list_pool(pool)
        errors = []
        for key in states[PROCESSING]:
            log.info('%s: resuming %s after an interrupted run', client, key)
            errors += self.handle(client, key, leftover=True)
        for key in states[NEW]:
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
            ctx = NodeContext(self, client, key, leftover)
            result = module.python.handle(ctx, rest) or {}
        except RequestRefused as e:
            return [self.give_up(client, key, f'refused: {e}')]
        except (GitBackupError, OSError) as e:
            return [self.failed(client, key, e)]
        os.rename(os.path.join(pool, PROCESSING + key),
                  os.path.join(pool, FINISHED + key))
        fsync_dir(pool)
        try:
            os.unlink(os.path.join(pool, '.attempts', key))
        except FileNotFoundError:
            pass
        log.info('%s: %s done (%s) %s', client, key, module_name,
                 result.get('stored') or '')
        self.record_result(client, key, 'stored', start, result)
        return []

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
        os.rename(os.path.join(pool, PROCESSING + key),
                  os.path.join(pool, NEW + key))
        text = (f'{client}: {key}: attempt {state["attempts"]} of {limit} '
                f'failed (retried next run): {clean_text(error, 2000)}')
        log.error('%s', text)
        return text

    def give_up(self, client, key, reason):
        """X*: kept with the reason beside it, admins told in the run's
        summary mail."""
        pool = self.pool(client)
        reason = clean_text(str(reason).replace('\n', ' | '), 2000)
        atomic_write(os.path.join(pool, f'{FAILED}{key}.reason'),
                     f'{gb.isotime()} {reason}\n', mode=0o664)
        os.rename(os.path.join(pool, PROCESSING + key),
                  os.path.join(pool, FAILED + key))
        fsync_dir(pool)
        text = f'{client}: {key}: given up, kept as {FAILED}{key}: {reason}'
        log.error('%s', text)
        self.record_result(client, key, 'failed', gb.isotime(),
                           {'reason': reason})
        return text

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
        for key in ('alert_after', 'stale_after', 'command_timeout'):
            self.config.get_duration('server', key)
        for key in ('quota', 'free_space_floor'):
            self.config.get_size('server', key)
        for key in ('max_attempts', 'max_request_size',
                    'max_requests_per_push'):
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
        for name in ('sftp', 'git'):
            try:
                gb.load_module(self.config.modules_dir('server'), name)
            except gb.ModuleError as e:
                problems.append(str(e))
        for p in problems:
            out.write(f'problem: {p}\n')
        if not problems:
            out.write(f'{self.config.path}: node {self.name} looks ready '
                      f'({len(self.clients())} client(s))\n')
        return problems


# --------------------------------------------------------------------------
# Command line

def build_parser():
    parser = argparse.ArgumentParser(
        prog='server.py', formatter_class=gb.HelpFormatter,
        description=__doc__.split('\n\n')[0] + '\n\n' + '''\
Typical crontab of the backup user on the node:
  */5 * * * *  server.py run -q
and the post-update hook of every client repository <client>.git:
  exec python3 /path/to/server.py --config /path/backup.ini ingest <client>

Exit status: 0 success, 1 failure, 2 bad usage or configuration.''')
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
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    # ingest runs as the git user from a hook: files it creates must stay
    # readable and renamable by the backup user's group.
    if args.command == 'ingest':
        os.umask(0o002)
    gb.setup_logging(None, 'server.py', args.verbose, args.quiet)
    try:
        config = gb.Config(gb.find_config(args.config, __file__))
        node = Node(config)
        gb.setup_logging(node.settings['log_dir'], 'server.py',
                         args.verbose, args.quiet,
                         create=args.command != 'check')
        if args.command == 'ingest':
            node.ingest(args.client, args.repository)
            return 0
        if args.command == 'check':
            return 1 if node.check() else 0
        if args.command == 'run':
            lock = Lock(os.path.join(node.settings['log_dir'], 'run.lock'))
            if not lock.acquire():
                log.info('another run (pid %s) holds %s; exiting',
                         lock.holder(), lock.path)
                return 0
            with lock:
                return 1 if node.run() else 0
    except GitBackupError as e:
        log.error('%s', e)
        return e.exit_code
    except OSError as e:
        log.error('%s', e)
        return 1
    except KeyboardInterrupt:
        log.error('interrupted')
        return 1
    return 2


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
