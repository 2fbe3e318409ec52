#!/usr/bin/env python3
"""gitbackup node: take in backup requests, pull the data, keep it, give it back.

The life of a request, as this file tells it (each step is a chapter
below, in this order; search for its banner, e.g. "# 3. Run"):

 0. Names, states and the node's clock -- what every chapter speaks of.
 1. Ingest   A client pushes commits to its own ``<client>.git`` (guarded
             by gitosis, gitolite or ``server.py gate``).  The repository's
             ``post-update`` hook runs ``ingest <client>``: every commit not
             seen yet becomes ``RQ*`` request files in the client's pool.
 2. Store    What the node holds: how a pulled file becomes a snapshot
             directory with its manifest, the read model (snapshots, their
             chains, mirrors, the node's clients) and every journal reader.
 3. Run      Every five minutes cron runs ``run``: each request is validated
             and handled by a node module that *pulls* the data itself
             (sftp download of a prepared file, git fetch of an exported
             repository), with the node's own key, from the host and port
             this node's configuration names.  Results go back to the
             client on its ``results`` branch.
 4. Keep     ``retry``, ``gc``, ``prune`` (retention per series) and
             ``verify`` (re-hash and read back what is stored).
 5. Copy away  ``offsite``: snapshots and mirrors copied to an rclone remote.
 6. Give back  ``list``, ``restore`` and ``drill`` (restore into scratch and
             prove it against what the client recorded).
 7. Tell     ``report``: one report, rendered as text, JSON, Nagios,
             Prometheus or an HTML page.
 8. Access   ``gate``, ``provision``, ``add-client``: who may push where.
 9. Check    ``check [--connect]``: configuration and every connection.
10. Command line: the parser in the same order, ``main()``.

The store comes before the run that fills it, and the offsite copy before
the chapters that restore from it and report on it, so that no chapter uses
a name defined in a later one; only the command line calls into all.

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
* What a client made stays hostile data when it comes back: restore, drill,
  verify, report and offsite read archives, listings, statistics and dumps
  as carefully as ingest reads a push (see SECURITY.md).
* A second concurrent ``run`` exits 0 at once (cron-safe).

Needs, beside this script: modules/ (the shared core and the node modules)
and sendmail.py (mail to the admins).  client.py is never imported: the two
scripts share only modules/_core.py.
"""

import argparse
import base64
import collections
import concurrent.futures
import configparser
import contextlib
import datetime
import fnmatch
import hashlib
import html
import json
import os
import random
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time

# The oldest Python this script runs on (and is tested with): Ubuntu
# 20.04's.  client.py runs on 3.6, for the older hosts it backs up.
MIN_PYTHON = (3, 8)
if sys.version_info < MIN_PYTHON:
    sys.exit('server.py: Python %d.%d or later is required, this is %s '
             '(client.py runs on 3.6 or later)'
             % (MIN_PYTHON + (sys.version.split()[0],)))
# What must be installed beside this script, as one directory.
BESIDE = ('sendmail.py', os.path.join('modules', '_core.py'))
HERE = os.path.dirname(os.path.abspath(__file__))
for _name in BESIDE:
    if not os.path.isfile(os.path.join(HERE, _name)):
        sys.exit('server.py: %s is missing in %s: install server.py, '
                 'sendmail.py and modules/ together' % (_name, HERE))

sys.path.insert(0, HERE)
from modules import _core as core  # noqa: E402  (shared core, beside us)
from modules import _schedule  # noqa: E402
from modules import fs as fs_archive  # noqa: E402  (tar chains: restore)
from modules import _tarlisting as tarlisting  # noqa: E402
from modules import postgresdb  # noqa: E402  (the dumps' own knowledge)
from modules._core import (  # noqa: E402
    Attempts, ConfigError, GitBackupError, Journal, Ledger,
    Misconfigured, ModuleContext, NoSpace, Pool, RequestRefused,
    TransientError, Unreachable, UsageError, Waiting, atomic_write,
    clean_text, fsync_dir, git, log, read_json, write_json)


# ==========================================================================
# 0. Names, states and the node's clock
#
# What every chapter below speaks of: client and request names (strict,
# because they become paths), the request states of a pool, the report's
# three levels, and how the node reads its own times.

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
# Node pool states.
NEW, PROCESSING, FINISHED, FAILED = 'RQ', 'P', 'F', 'X'
NODE_STATES = (NEW, PROCESSING, FINISHED, FAILED)
KEY_RE = re.compile(f'^[0-9a-f]{{40}}-{RQ_NAME}$')
SOURCE_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$')
# Inodes a stored request needs at most (staging dir, files, manifest,
# journal, state): below this many free, a fetch waits as for bytes, or the
# request would only cost attempts until given up.
MIN_FREE_INODES = 32
# What Python (strerror), git, sftp and tar say when the node's disk is full.
NO_SPACE_RE = re.compile(r'No space left on device|Disk quota exceeded')


def check_client_name(name):
    if not CLIENT_RE.match(name or '') or name in RESERVED_CLIENTS or \
            name.endswith('.git') or '..' in name:
        raise UsageError(f'bad client name {clean_text(name)!r} (use '
                         '[A-Za-z0-9][A-Za-z0-9._-]*, no "..", no .git '
                         'suffix, not ' + ', '.join(sorted(RESERVED_CLIENTS))
                         + ')')
    return name


class RestoreError(GitBackupError):
    """A restore (or drill) that cannot be done as asked."""
    exit_code = 1


OK, WARNING, CRITICAL = 0, 1, 2
STATUS_NAMES = ('ok', 'warning', 'critical')
UTC = datetime.timezone.utc
# Directory names of stored backups: node time, '.n' when two landed in
# the same second.
STORED_NAME_RE = re.compile(r'^([0-9]{8}T[0-9]{6}Z)(?:\.([0-9]+))?$')
CLOCK_SLACK = 300   # seconds a stored time may be ahead before it is news


def parse_node_time(text):
    """'2026-11-26T03:57:50Z' (manifest, journal) or '20261126T035750Z[.n]'
    (directory name) -> aware datetime; None when it is neither."""
    if not isinstance(text, str):
        return None
    m = STORED_NAME_RE.match(text)
    try:
        if m:
            return datetime.datetime.strptime(
                m.group(1), core.TIMESTAMP_FORMAT).replace(tzinfo=UTC)
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


# ==========================================================================
# 1. Ingest: a push becomes request files
#
# A client pushes commits to <client>.git; that repository's post-update
# hook runs `ingest`, which reads only regular blobs named RQ* from every
# commit it has not seen (never a checkout) and writes them, under the
# pool's lock, as RQ<commit>-<name> into the client's pool.  Anything else
# in a pushed tree is ignored and noted, never trusted.

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


class ClientRepositories:
    """The bare <client>.git repositories that clients push their requests
    to: created, repaired and hooked by the node."""

    def __init__(self, node):
        self.node = node
        self.config = node.config

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
        repo = repo or self.node.repository(client)
        if not os.path.isdir(os.path.join(repo, 'objects')):
            core.make_dirs(repo)
            git(repo, *core.git_init_sha1(), '--quiet', '--bare',
                '--shared=group')
            fsync_dir(repo)
            log.info('created repository %s', repo)
        max_push = self.config.get_size('server', 'max_push_size')
        for key, value in (('receive.denyDeletes', 'true'),
                           ('receive.denyNonFastForwards', 'true'),
                           ('receive.fsckObjects', 'true'),
                           ('receive.maxInputSize', str(max_push)),
                           ('core.sharedRepository', 'group'),
                           # receive-pack writes the pushes: fsync them.
                           *core.git_fsync_settings()):
            git(repo, 'config', key, value)
        self.install_hook(repo, 'post-update', self.hook_text(client))
        self.install_hook(repo, 'update', UPDATE_HOOK, foreign_ok=True)
        self.node.pool(client).create(mode=0o2775)
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


IGNORED_NOTES = '.ignored'


def parse_tree(data):
    """[(mode, kind, sha, raw name)] of a raw tree object (what `git
    ls-tree` prints, modes zero-padded as it does)."""
    entries, pos = [], 0
    while pos < len(data):
        space = data.index(b' ', pos)
        nul = data.index(b'\0', space)
        mode = data[pos:space].decode().zfill(6)
        kind = {'040000': 'tree', '160000': 'commit'}.get(mode, 'blob')
        entries.append((mode, kind, data[nul + 1:nul + 21].hex(),
                        data[space + 1:nul]))
        pos = nul + 21
    return entries


def note_ignored(pool, text):
    """Remember what ingest ignored in a pushed tree (symlinks, bad names,
    oversized or surplus request files), so that the next run's summary
    mail tells the admins once per push instead of once per entry."""
    with open(os.path.join(pool, IGNORED_NOTES), 'a', encoding='utf-8') as f:
        f.write(clean_text(text, 1000) + '\n')


def take_ignored_notes(node, client):
    """The ingest notes of a client's pool since the last run (removed)."""
    pool = node.pool(client)
    path = os.path.join(pool.path, IGNORED_NOTES)
    if not os.path.exists(path):
        return []
    lock = pool.lock()
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


class Ingest:
    """Pushed request commits of one client -> RQ files in its pool, under
    the pool lock, within the per-push and per-request caps.  Run by the
    post-update hook and caught up by `run` (a hook that did not run)."""

    def __init__(self, node):
        self.node = node
        self.config = node.config

    def ingest(self, client, repo=None, tip=None):
        """Turn new pushed commits into RQ files; return how many.  tip:
        master's commit when the caller has just read it ('' for none)."""
        check_client_name(client)
        repo = os.path.abspath(repo or os.environ.get('GIT_DIR') or '.')
        pool = self.node.pool(client)
        pool.create(mode=0o2775)
        if tip is not None and tip == self.ingested(pool):
            # Nothing new (the hook ingested the last push): no lock, no
            # git.  The marker only ever moves to a tip, under the lock.
            return 0
        lock = pool.lock()
        if not lock.acquire(wait=5):
            raise GitBackupError(f'pool {pool.path} is locked by pid '
                                 f'{lock.holder()}; the next push or run '
                                 'ingests these requests')
        with lock:
            return self._ingest_locked(client, repo, pool)

    @staticmethod
    def ingested(pool):
        """The last commit ingested into the pool ('' for none)."""
        try:
            with open(os.path.join(pool.path, '.ingested')) as f:
                return f.read().strip()
        except FileNotFoundError:
            return ''

    def _ingest_locked(self, client, repo, pool):
        ledger = Ledger(repo, 'refs/heads/master', self.node.name)
        tip = ledger.tip()
        marker = os.path.join(pool.path, '.ingested')
        last = self.ingested(pool)
        if not tip or tip == last:
            return 0
        commits = ledger.since(last, tip)
        existing = pool.keys()
        if not ledger.knows(last):
            # The marker is gone (a restored or recreated todo_dir): what
            # was ingested is known from the pool and, for the F*/X* that
            # prune removed, from the results journal.
            journaled = self.journaled_keys(client, repo)
            if journaled is None:
                return 0
            existing |= journaled
            commits = self.skip_seen(client, repo, commits, existing)
        wanted, done = self.new_requests(client, repo, pool, commits,
                                         existing)
        accepted = self.within_size(client, repo, pool, wanted)
        if accepted:
            self.write_requests(repo, pool, accepted)
        atomic_write(marker, (done[-1] if done else tip) + '\n', mode=0o664)
        log.info('ingested %d request(s) of %d commit(s) from %s',
                 len(accepted), len(done), client)
        return len(accepted)

    def journaled_keys(self, client, repo):
        """The keys of every request with an outcome in the results
        journal (never pruned).  The git account running the hook may not
        read it (README: data_dir is adminbackup's alone): a client with
        no results branch yet has no outcomes (its first push), so the
        empty set; else None, and `run`, which catches up on ingest as the
        account that reads the journal, takes the push in."""
        try:
            entries = self.node.client_results.journal(client).read()[0]
        except PermissionError as e:
            if not Ledger(repo, RESULTS_REF, self.node.name).tip():
                return set()
            log.info('%s: ingest marker missing and %s; the next run '
                     'ingests this push', client, e)
            return None
        return {str(e.get('request')) for e in entries}

    def skip_seen(self, client, repo, commits, existing):
        """commits without the oldest ones whose requests are all in
        existing: already ingested, they neither run again nor count
        against max_commits_per_push."""
        seen = 0
        for commit, entries in self.commit_trees(repo, commits):
            names = [raw.decode('utf-8', 'replace')
                     for _, _, _, raw in entries]
            if any(RQ_NAME_RE.match(n) and not n.endswith('.reason') and
                   f'{commit}-{n}' not in existing for n in names):
                break
            seen += 1
        if seen:
            log.warning('%s: ingest marker missing: %d commit(s) found '
                        'already ingested (pool and results journal); '
                        'not ingested again', client, seen)
        return commits[seen:]

    def new_requests(self, client, repo, pool, commits, existing):
        """([(key, blob)] not in existing, the commits they come from).
        max_requests_per_push caps a whole push, not each commit: the
        commits beyond it wait for the next ingest (run catches up)."""
        limit = self.config.get_int('server', 'max_requests_per_push')
        commits = self.within_commit_cap(client, pool, commits)
        wanted, done = [], []
        for commit, entries in self.commit_trees(repo, commits):
            found = self.request_blobs(client, commit, entries, existing,
                                       limit)
            if wanted and len(wanted) + len(found) > limit:
                log.warning('%s: %d commit(s) left for the next run '
                            '(max_requests_per_push %d reached)', client,
                            len(commits) - len(done), limit)
                break
            wanted += found
            done.append(commit)
        return wanted, done

    def within_commit_cap(self, client, pool, commits):
        """The first max_commits_per_push commits; the others wait for the
        next ingest (nothing is lost), and the admins hear of it."""
        cap = self.config.get_int('server', 'max_commits_per_push')
        if len(commits) <= cap:
            return commits
        text = (f'{client}: {len(commits)} new commits, more than '
                f'max_commits_per_push {cap}: {len(commits) - cap} left for '
                'the next ingest')
        log.warning('%s', text)
        note_ignored(pool.path, text)
        return commits[:cap]

    def commit_trees(self, repo, commits):
        """(commit, [(mode, kind, blob, raw name)]) of each commit's root
        tree, oldest first, read by a few `git cat-file` processes however
        many commits there are (one `ls-tree` per commit cost ~3 ms each:
        13 s for 4000 empty commits, under the pool lock)."""
        if not commits:
            return
        out = git(repo, 'cat-file', '--batch-check', input=''.join(
            f'{c}^{{tree}}\n' for c in commits)).stdout.splitlines()
        trees = [(c, *line.split()) for c, line in zip(commits, out)]
        start = 0
        while start < len(trees):
            # Chunks of at most 16 MiB of tree data held at once.
            end, size = start, 0
            while end < len(trees) and (end == start or size < 16 << 20):
                size += int(trees[end][3])
                end += 1
            chunk = trees[start:end]
            raw = self.blob_contents(repo, sorted({t[1] for t in chunk}))
            for commit, tree, _, _ in chunk:
                yield commit, parse_tree(raw[tree])
            start = end

    def within_size(self, client, repo, pool, wanted):
        """The requests no larger than max_request_size; the others are
        noted (the run's mail tells the admins) and left out."""
        max_size = self.config.get_int('server', 'max_request_size')
        sizes = self.blob_sizes(repo, [blob for _, blob in wanted])
        accepted = []
        for key, blob in wanted:
            if sizes.get(blob, max_size + 1) > max_size:
                text = (f'{client}: ignored {key}: {sizes.get(blob, "?")} '
                        f'bytes, more than max_request_size {max_size}')
                log.warning('%s', text)
                note_ignored(pool.path, text)
            else:
                accepted.append((key, blob))
        return accepted

    def write_requests(self, repo, pool, accepted):
        """Export into .incomplete/, fsync, then move into the pool."""
        incomplete = os.path.join(pool.path, '.incomplete')
        shutil.rmtree(incomplete, ignore_errors=True)
        os.mkdir(incomplete)
        contents = self.blob_contents(repo, [b for _, b in accepted])
        files = []
        for key, blob in accepted:
            path = os.path.join(incomplete, NEW + key)
            with open(path, 'wb') as f:
                f.write(contents[blob])
                f.flush()
                os.fsync(f.fileno())
            files.append((path, key))
        fsync_dir(incomplete)
        core.pause_point('ingest:written')
        pool.adopt(files, NEW)
        os.rmdir(incomplete)

    def request_blobs(self, client, commit, entries, existing, limit):
        """[(key, blob)] of the RQ files in one commit's root tree."""
        found, ignored = [], []
        for mode, kind, blob, raw_name in entries:
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
            text = '%s: commit %s: ignored %d entr%s: %s' % (
                client, commit[:12], len(ignored),
                'y' if len(ignored) == 1 else 'ies',
                clean_text(', '.join(ignored[:5])))
            log.warning('%s', text)
            note_ignored(self.node.pool(client).path, text)
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


# ==========================================================================
# 2. Store: what the node holds, and every journal it keeps
#
# The write side first: how a pulled file becomes a snapshot directory with
# its manifest, atomically.  Then the read model that every later chapter
# asks: stored snapshots, their chains, mirrors, the node's clients, the
# request files of a pool, and the readers of each journal (results,
# drills, offsite).  It comes before `run`, which fills it, so that no
# chapter uses a later one.

def manifest_request_id(manifest):
    """The client request id a snapshot's manifest records."""
    if not isinstance(manifest, dict):
        return None
    return manifest.get('request_id') or core.request_id_of(
        str(manifest.get('request', '')))


def manifest_requests(manifest):
    """The node request keys a manifest says it holds (old manifests
    name one, `request`)."""
    keys = manifest.get('requests')
    if isinstance(keys, list):
        return [k for k in keys if isinstance(k, str)]
    return [manifest['request']] if isinstance(manifest.get('request'),
                                               str) else []


def snapshots_of(client_dir, source):
    """(path, manifest) of every snapshot of a source, newest name first;
    directories without a readable manifest are skipped."""
    base = os.path.join(client_dir, 'files', source)
    try:
        names = sorted(os.listdir(base), reverse=True)
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith('.'):
            continue
        manifest = read_json(os.path.join(base, name, 'manifest.json'))
        if isinstance(manifest, dict):
            yield os.path.join(base, name), manifest


def join_snapshot(snapshot, existing, incoming, manifest):
    """Add the staged files of a further node request of the same client
    request to its snapshot: each file is renamed into the snapshot, then
    the manifest is rewritten atomically with them.  A crash in between
    leaves a file the manifest does not list: not stored, so the request
    is handled again and the new download replaces it.  Returns the
    snapshot, or None when it already holds a different file of that name
    (then the caller makes a snapshot of its own: nothing is overwritten)."""
    have = {f.get('name'): f for f in existing.get('files') or []
            if isinstance(f, dict)}
    new_files = []
    for entry in manifest['files']:
        old = have.get(entry['name'])
        if old and old.get('sha256') != entry['sha256']:
            return None
        if not old:
            new_files.append(dict(entry, request=manifest['request']))
    keep_private(incoming, [entry['name'] for entry in new_files])
    for entry in new_files:
        path = os.path.join(incoming, entry['name'])
        with open(path, 'rb') as f:
            os.fsync(f.fileno())
        os.rename(path, os.path.join(snapshot, entry['name']))
    fsync_dir(snapshot)
    core.pause_point('run:joined')
    requests = manifest_requests(existing)
    updated = {**existing, 'files': list(existing.get('files') or []) +
               new_files, 'requests': requests + [manifest['request']],
               'updated': core.isotime()}
    core.write_json(os.path.join(snapshot, 'manifest.json'), updated)
    keep_private(snapshot, ['manifest.json'])
    shutil.rmtree(incoming, ignore_errors=True)
    core.pause_point('run:stored')
    return snapshot


def keep_private(directory, names):
    """Stored files are the client's data: never world-readable (0600
    stays 0600; the group that shares data_dir may read)."""
    for name in names:
        path = os.path.join(directory, name)
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        if mode & 0o137 and stat.S_ISREG(os.lstat(path).st_mode):
            os.chmod(path, mode & 0o640)


def store_staged(ctx, name, staging, allowance, stdout):
    """Store what an executable module left in staging as one snapshot."""
    source = name
    for line in stdout.splitlines():
        key, eq, value = line.strip().partition('=')
        if key == 'source' and eq and SOURCE_NAME_RE.match(value):
            source = value
    files = []
    for entry in sorted(os.listdir(staging)):
        path = os.path.join(staging, entry)
        if not os.path.isfile(path) or os.path.islink(path) or \
                entry == 'manifest.json' or not core.NAME_RE.match(entry):
            shutil.rmtree(staging, ignore_errors=True)
            raise TransientError(f'module {name} left {clean_text(entry)!r} '
                                 'in staging: plain files with plain names '
                                 'only')
        digest, size = core.sha256_file(path)
        files.append({'name': entry, 'sha256': digest, 'size': size})
    if not files:
        shutil.rmtree(staging, ignore_errors=True)
        return {'stored': None, 'fetched': False}
    if sum(f['size'] for f in files) > allowance:
        shutil.rmtree(staging, ignore_errors=True)
        raise TransientError(f'module {name} fetched more than the '
                             f'{allowance} bytes the quota and free-space '
                             'floor allow')
    stored = ctx.store(staging, source, {
        'module': name, 'received': core.isotime(), 'files': files})
    return {'stored': stored, 'size': sum(f['size'] for f in files)}


SOURCE_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._/+-]{0,200}$')
# What restore extracts and streams as a tar archive, by file name ending.
TAR_SUFFIXES = ('.tar', '.tar.gz', '.tgz', '.tar.xz', '.txz', '.tar.zst',
                '.tar.bz2', '.tbz2')
TAR_TOOLS = ((('.tar.gz', '.tgz'), 'gzip'), (('.tar.xz', '.txz'), 'xz'),
             (('.tar.zst',), 'zstd'), (('.tar.bz2', '.tbz2'), 'bzip2'))
SHIPPED_MODULES = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               'modules')


class StoredFormats:
    """Which module's format each stored file is, as the node's modules
    declare it (docs/modules.md, "Proving what a module stored"): a Python
    module's STORED_SUFFIXES name its data files, its COMPANION_SUFFIXES
    the files it sends beside them describing them (an archive's listing,
    a dump's row counts), and its verify_stored(path, timeout) and
    drill_stored(ctx, names, scratch) prove them.  A file no module claims
    is a plain file: its sha256 is all that is checked ("hashes only")."""

    def __init__(self, modules_dir):
        self.modules_dir = modules_dir
        self.codes = {}           # name: module code or None, loaded once
        self.stored = []          # (suffix, module code), longest first
        companions = []
        try:
            names = sorted(os.listdir(modules_dir))
        except OSError:
            names = []
        for name in names:
            code = self.load(name[:-3]) if name.endswith('.py') and \
                not name.startswith('_') else None
            if code is None:
                continue
            self.stored += [(suffix, code) for suffix in
                            getattr(code, 'STORED_SUFFIXES', ())]
            companions += getattr(code, 'COMPANION_SUFFIXES', ())
        self.stored.sort(key=lambda pair: -len(pair[0]))
        self.companions = tuple(companions)

    def load(self, name):
        """The Python code of module `name` (loaded once), or None: none
        there, an executable, or one that does not load (a warning)."""
        if name not in self.codes:
            self.codes[name] = None
            if os.path.isfile(os.path.join(self.modules_dir, name + '.py')):
                try:
                    self.codes[name] = core.load_module(
                        self.modules_dir, name).python
                except core.ModuleError as e:
                    log.warning('%s', e)
        return self.codes[name]

    def owner(self, name):
        """The module code whose STORED_SUFFIXES a file name ends with."""
        for suffix, code in self.stored:
            if name.endswith(suffix):
                return code
        return None

    def is_companion(self, name):
        return bool(self.companions) and str(name).endswith(self.companions)


_FORMATS = {}


def stored_formats(modules_dir=SHIPPED_MODULES):
    """The StoredFormats of a modules directory, read once per process."""
    if modules_dir not in _FORMATS:
        _FORMATS[modules_dir] = StoredFormats(modules_dir)
    return _FORMATS[modules_dir]


class StoredBackup:
    """One directory files/<source>/<node time>/ and its manifest."""

    def __init__(self, source, path, manifest, formats=None):
        self.source = source
        self.path = path
        self.formats = formats or stored_formats()
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
        """The names of the data files it holds: snapshots of one source
        with the same names (one directory's archive, one database's dump,
        the dumps and globals of `postgresdb all`) form a series; retention,
        the restore check and drills work per series.  Not the source
        alone: `postgresdb all` and `postgresdb shop` share a source but
        neither may push the other out of retention.  Companion files (an
        archive's listing, row statistics) do not count, so that adding
        them did not start new series."""
        return tuple(sorted(str(f.get('name')) for f in
                            (self.manifest or {}).get('files') or []
                            if isinstance(f, dict) and
                            not self.formats.is_companion(f.get('name'))))

    @property
    def seq(self):
        """Arrival number (0: a manifest older than sequences)."""
        seq = (self.manifest or {}).get('seq')
        return seq if isinstance(seq, int) and seq > 0 else 0

    def sort_key(self):
        # Arrival first: a node clock that went back must not make an older
        # backup look newer (prune would keep the wrong one).
        return (self.seq,
                self.time or datetime.datetime.min.replace(tzinfo=UTC),
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
            backups.append(StoredBackup(source, path, manifest,
                                        node.formats))
        backups.sort(key=StoredBackup.sort_key)
        result[source] = backups
    return result


def manifest_level(manifest):
    """0 for a full archive or a plain file, n for an increment."""
    try:
        return max(int((manifest or {}).get('level') or 0), 0)
    except (TypeError, ValueError):
        return 0


def archive_entry(backup):
    """The manifest entry of a snapshot's tar archive, or None."""
    for entry in (backup.manifest or {}).get('files') or []:
        if isinstance(entry, dict) and \
                str(entry.get('name')).endswith(TAR_SUFFIXES):
            return entry
    return None


def snapshot_kind(backup):
    if manifest_level(backup.manifest) > 0:
        return 'incremental'
    return 'full' if archive_entry(backup) else 'file'


class Chain:
    """One snapshot's increment chain as the node holds it: `links`, the
    snapshots to extract in order (its full first, the snapshot itself
    last) as far down as they are stored, and `problem`, None when the
    chain is whole, else why the snapshot cannot be restored from what is
    here.  `missing` is the client request id of the first link not
    stored (None when none is missing).  A plain file or a full is a
    chain of one link."""

    def __init__(self, links, problem=None, missing=None):
        self.links = links
        self.problem = problem
        self.missing = missing

    @property
    def whole(self):
        return self.problem is None

    @property
    def base(self):
        """The stored snapshot the increment builds on directly, or None."""
        return self.links[-2] if len(self.links) > 1 else None

    @property
    def size(self):
        """The restorable size: bytes of every link a restore reads."""
        return sum(link.size for link in self.links)


def snapshot_chains(backups):
    """{snapshot path: Chain} of every good snapshot of one source: the one
    chain model that list, report, verify, prune, restore, drill and
    offsite ask.  An increment's `base` (a client request id) names the
    stored snapshot it builds on (the newest, if two stored that request);
    the chain is walked down to a level 0 full, whatever its depth, and a
    base met twice is a loop, not a longer chain."""
    good = sorted((b for b in backups if b.good), key=StoredBackup.sort_key)
    by_request = {manifest_request_id(b.manifest): b for b in good
                  if manifest_request_id(b.manifest)}
    return {b.path: chain_of(b, by_request) for b in good}


def chain_of(backup, by_request):
    """The Chain of one good snapshot; by_request as snapshot_chains."""
    links = [backup]
    while manifest_level(links[0].manifest) > 0:
        link = links[0]
        level = manifest_level(link.manifest)
        wanted = link.manifest.get('base')
        base = by_request.get(wanted) if isinstance(wanted, str) else None
        if base is None:
            return Chain(links, f'missing link: {link.name} (level {level}) '
                         f'builds on request {clean_text(wanted)}, which is '
                         'not stored on this node', missing=str(wanted))
        if base in links:
            return Chain(links, f'{link.name} (level {level}) builds on '
                         f'{base.name}, which builds on it: a loop')
        links.insert(0, base)
    if len(links) > 1:
        for link in links:
            if archive_entry(link) is None:
                return Chain(links, f'{link.name} holds no archive: not a '
                             'link of an incremental chain')
    return Chain(links)


def chain_to_extract(backups, backup):
    """[full, increment, ..., backup]: the links to extract in order.  A
    chain that is not whole is a RestoreError saying why."""
    chain = snapshot_chains(backups).get(backup.path) or Chain([backup])
    if not chain.whole:
        raise RestoreError(f'{backup.source} {backup.name}: chain broken: '
                           f'{chain.problem}')
    return chain.links


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


def walk_dirs(top):
    """top and every directory below it (none when top is missing); one
    this user cannot list is still named (os.walk would skip it)."""
    found = [top] if os.path.isdir(top) else []
    for parent, dirs, _ in os.walk(top):
        found += [os.path.join(parent, d) for d in dirs]
    return found


def mirror_time(repo):
    """When a git mirror last changed, on the node's clock (its last fetch:
    FETCH_HEAD, packed-refs or refs), or None.  What report and list use
    for a mirror without a journaled fetch (one made by hand)."""
    stamps = [os.stat(os.path.join(repo, name)).st_mtime
              for name in ('FETCH_HEAD', 'packed-refs', 'refs')
              if os.path.exists(os.path.join(repo, name))]
    return datetime.datetime.fromtimestamp(max(stamps), UTC) \
        if stamps else None


def known_clients(node):
    """The node's clients: those that push to it (a pool or a repository),
    those with stored data, and every [client NAME] of its configuration
    (one that never arrived is news).  Every command but `run` works on
    these."""
    names = set(node.pushing_clients())
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
    return node.client_results.journal(client).read()[0]


def read_request_line(path):
    try:
        with open(path, 'rb') as f:
            data = f.read(4096)
    except OSError:
        return ''
    return data.decode('utf-8', 'replace').split('\n', 1)[0]


def request_source(node, client, line):
    """The source a request line belongs to: what its module's
    request_source(settings, rest) names (sftp: its source=, git:
    'git/<path>' of the mirror it feeds), else the module's name.  None if
    the line says nothing usable."""
    module, _, rest = line.partition(' ')
    if not core.MODULE_RE.match(module):
        return None
    code = node.formats.load(module)
    if code is None or not hasattr(code, 'request_source'):
        return module
    try:
        settings = node.client_settings(client)
    except GitBackupError:
        settings = {}
    source = code.request_source(settings, rest)
    return source if isinstance(source, str) and SOURCE_RE.match(source) \
        and '..' not in source else None


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
    for state, keys in pool.list().items():
        kind = 'failed' if state == FAILED else \
            'pending' if state in (NEW, PROCESSING) else None
        if kind is None:
            continue
        for key in keys:
            source = request_source(node, client, read_request_line(
                pool.file(state, key))) or '?'
            counts[kind][source] = counts[kind].get(source, 0) + 1
            counts[kind + '_total'] += 1
            if kind == 'failed':
                counts['failed_keys'][key] = source
    return counts


def client_limits(node, client):
    """stale_after (seconds) and expected sources of a client."""
    # A [client NAME] with a mistake counts with the [server] defaults
    # (report shows it misconfigured).
    section = {} if client in node.config.client_problems else \
        node.config.section(f'client {client}')
    value = section.get('stale_after') or node.settings['stale_after']
    try:
        stale = core.parse_duration(value)
    except ValueError as e:
        raise ConfigError(f'[client {client}] stale_after: {e}') from None
    return stale, section.get('expect', '').split()


def journal_tail(path, end, size=4096):
    """A digest of the bytes of a journal just before end ('' for none,
    None when the file is shorter): what publishing checks it left off
    after."""
    if end <= 0:
        return ''
    try:
        with open(path, 'rb') as f:
            f.seek(max(0, end - size))
            data = f.read(min(end, size))
    except FileNotFoundError:
        return None
    if len(data) < min(end, size):
        return None
    return hashlib.sha256(data).hexdigest()


# Where `drill` journals its outcomes, one JSON object per line like
# results.jsonl: source, snapshot, run (its start), finished (node time),
# ok (true only when the proof passed), proof ('restored', or 'hashes only'
# when no module proves the snapshot's files), detail.
DRILL_JOURNAL = 'drills.jsonl'


def drill_journal(node, client):
    """Drill outcomes of one client, oldest first: [{'source', 'snapshot',
    'run', 'time', 'ok', 'proof', 'detail'}]; lines without a source or
    a readable time are skipped.  The one reader of drills.jsonl."""
    drills = []
    for entry in Journal(os.path.join(node.settings['data_dir'], client,
                                      DRILL_JOURNAL)).read()[0]:
        when = parse_node_time(entry.get('finished'))
        if not when or not isinstance(entry.get('source'), str):
            continue
        drills.append({
            'source': entry['source'], 'snapshot': entry.get('snapshot'),
            'run': str(entry.get('run') or entry['finished']), 'time': when,
            'ok': entry.get('ok') is True,
            'proof': entry.get('proof') or 'restored',
            'detail': clean_text(entry.get('detail') or '', 500)})
    return drills


OFFSITE_JOURNAL = 'offsite.jsonl'


def offsite_journal(node, client):
    return Journal(os.path.join(node.settings['data_dir'], client,
                                OFFSITE_JOURNAL))


# What `prune` removed and why, one JSON object per snapshot (source,
# snapshot, rule, time): the only grounds on which `offsite` removes a
# remote copy.  Written before the directory goes, so that a prune cut
# short is still known.
PRUNE_JOURNAL = 'pruned.jsonl'


def prune_journal(node, client):
    return Journal(os.path.join(node.settings['data_dir'], client,
                                PRUNE_JOURNAL))


def pruned_entry(source, snapshot, rule):
    """One line of prune's journal."""
    return {'event': 'pruned', 'source': source, 'snapshot': snapshot,
            'time': core.isotime(), 'rule': rule}


def pruned_snapshots(node, client):
    """{'files/<source>/<snapshot>': journal entry} of what prune removed."""
    pruned = {}
    for entry in prune_journal(node, client).read()[0]:
        if isinstance(entry, dict) and entry.get('event') == 'pruned' and \
                isinstance(entry.get('source'), str) and \
                isinstance(entry.get('snapshot'), str):
            pruned[f'files/{entry["source"]}/{entry["snapshot"]}'] = entry
    return pruned


def failed_requests(node, client, journal):
    """{request: (when, reason)} of the client's failed requests: from the
    journal, else from the note of a request given up before the journal
    existed."""
    failed = {}
    for entry in journal:
        when = parse_node_time(entry.get('finished'))
        if entry.get('outcome') == 'failed' and when and \
                isinstance(entry.get('request'), str):
            failed[entry['request']] = (when, entry.get('reason'))
    pool = node.pool(client)
    for key in pool.list()[FAILED]:
        if key not in failed:
            # Given up before the journal existed: the note says when.
            note = Attempts(pool, 0).reason(key)
            when = parse_node_time(note.split(' ', 1)[0])
            if when:
                failed[key] = (when, note.partition(' ')[2])
    return failed


def arrival_last_success(good, now):
    """(time to measure staleness from, clock notes) of good backups in
    arrival order.  A backup stamped in the future was stored while the
    node's clock was ahead: when it really arrived is unknown, so age is
    measured from the newest arrival stamped before now (too old rather
    than falsely fresh), and the report says so."""
    notes = []
    ahead = datetime.timedelta(seconds=CLOCK_SLACK)
    future = [b for b in good if b.time > now + ahead]
    if future:
        latest = core.isotime(max(b.time for b in future))
        notes.append(f'clock problem: {len(future)} backup(s) stamped in the '
                     f'future (up to {latest}): the node clock was ahead when they were stored; age '
                     'counts from the newest arrival stamped before now')
    times = [b.time for b in good]
    if any(later < earlier for earlier, later in zip(times, times[1:])):
        notes.append('stored times are out of arrival order (the node clock '
                     'went back): prune and report follow arrival order')
    trusted = [b for b in good if b.time <= now + ahead]
    return (trusted[-1].time if trusted else None), notes


def newest_of_series(backups):
    """The newest good backup of each series (see StoredBackup.series)."""
    newest = {}
    for backup in sorted(backups, key=StoredBackup.sort_key):
        newest[backup.series] = backup
    return list(newest.values())


def last_outcomes(node, client):
    """({path: verify outcome}, {(source, snapshot): drill outcome}) from
    the last verify and the drill journal."""
    state = read_json(os.path.join(node.state_dir, 'verify.json'), {}) or {}
    verify = {}
    if isinstance(state, dict) and state.get('finished'):
        problems = [str(p) for p in state.get('problems') or []]
        verify = {'time': state['finished'], 'problems': problems}
    drills = {(d['source'], d['snapshot']): {
        'outcome': 'failed' if not d['ok'] else 'ok'
        if d['proof'] == 'restored' else 'hashes only',
        'time': core.isotime(d['time']), 'detail': d['detail']}
        for d in drill_journal(node, client)}
    return verify, drills


def verify_outcome(verify, path, made=None):
    """The last verify's word on one snapshot or mirror path, or None
    when there was none, or when the snapshot (made: its node time) or
    the mirror's newest fetch came after it: that verify never saw it."""
    if not verify:
        return None
    checked = parse_node_time(verify['time'])   # whole seconds
    if made and (checked is None or made.replace(microsecond=0) > checked):
        return None
    bad = [p for p in verify['problems'] if p.startswith(path + '/') or
           p.startswith(path + ':')]
    return {'outcome': 'failed' if bad else 'ok', 'time': verify['time']}


# -- scratch trees: registered when made, reaped after a crash --------------

# What reap_scratch_trees does with a registered entry of each kind
# whose command died (scratch PostgreSQL clusters have their own registry:
# Node.scratch_registry, postgresdb.reap_scratch_clusters).
SCRATCH_REAPERS = {}
SCRATCH_PREFIX = '.gitbackup-'


def process_start(pid):
    """A process's start time (clock ticks since boot), or None when it
    is gone: with the pid it names one process, reused pids excluded."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            return f.read().rsplit(b')', 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def scratch_tree_registry(node):
    return os.path.join(node.state_dir, 'scratch')


def register_scratch(node, kind, path, **extra):
    """Record that this process made path (a scratch tree, a scratch
    cluster...); returns the record's file, None if it cannot be written
    (an account that may not write the node's state: its scratch is then
    removed by itself only)."""
    record = os.path.join(scratch_tree_registry(node),
                          f'{os.getpid()}-{os.path.basename(path)}.json')
    try:
        core.make_dirs(scratch_tree_registry(node))
        write_json(record, {'pid': os.getpid(), 'kind': kind, 'path': path,
                            'started': process_start(os.getpid()), **extra})
    except OSError as e:
        log.debug('scratch %s not registered: %s', path, e)
        return None
    return record


def remove_scratch_tree(entry):
    path = str(entry.get('path') or '')
    if os.path.basename(path).startswith(SCRATCH_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


SCRATCH_REAPERS['tree'] = remove_scratch_tree


def reap_scratch_trees(node):
    """End what a restore or drill killed before its cleanup left behind:
    every registered scratch whose process is gone (a pid alive with the
    recorded start time is a running command, left alone).  Run by
    restore, drill, run and prune before they start (Node.reap_scratch)."""
    try:
        names = os.listdir(scratch_tree_registry(node))
    except OSError:
        return
    for name in sorted(names):
        record = os.path.join(scratch_tree_registry(node), name)
        entry = read_json(record)
        if not isinstance(entry, dict):
            continue
        if entry.get('started') and process_start(entry.get('pid')) == \
                entry['started']:
            continue
        log.warning('removing %s %s left by a killed command (pid %s)',
                    entry.get('kind'), clean_text(entry.get('path')),
                    entry.get('pid'))
        reaper = SCRATCH_REAPERS.get(entry.get('kind'))
        try:
            if reaper:
                reaper(entry)
            os.unlink(record)
        except OSError as e:
            log.error('could not reap %s: %s', record, e)


@contextlib.contextmanager
def scratch(node, parent, what):
    """A fresh 0700 directory under parent for one restore or drill,
    registered while it lives and removed whatever happens."""
    core.make_dirs(parent)
    path = tempfile.mkdtemp(prefix=f'{SCRATCH_PREFIX}{what}-', dir=parent)
    record = register_scratch(node, 'tree', path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if record:
            with contextlib.suppress(OSError):
                os.unlink(record)


def scratch_tree(path):
    """Where a tree is extracted inside a 0700 scratch directory: tar
    gives it the archive root's mode, the scratch keeps others out."""
    tree = os.path.join(path, 'tree')
    os.mkdir(tree, 0o700)
    return tree


# ==========================================================================
# 3. Run: pull what the requests name
#
# `run` (cron, every five minutes) takes each client's pool in turn, in
# parallel up to [server] jobs: P* left by a crash first, then RQ* -> P* ->
# handled by a node module (sftp download, git fetch) -> F*, or X* with the
# reason.  The module works through a NodeContext that holds the client's
# limits; results go back to the client on its results branch.

class NodeContext(ModuleContext):
    """What a node module's ``handle`` sees for one request: the client's
    settings as this node configures them, validation of untrusted fields,
    and storage (staging, the free-space floor and quota, the one rename
    that makes a backup stored).  Transports live in their modules."""

    def __init__(self, node, client, key, leftover):
        super().__init__(node.config, 'server')
        self.node = node
        self.client = client
        self.key = key
        self.leftover = leftover
        # A node module's settings are the client's, as this node
        # configures them (sftp, sftp_port, sftp_root, git, quota): never
        # anything a request says.
        self.settings = node.client_settings(client)
        self.client_dir = os.path.join(node.settings['data_dir'], client)

    def refuse(self, message):
        raise RequestRefused(message)

    def shared_ssh(self, ssh_words, target):
        """Options that make an ssh or sftp command to target share this
        client's one connection of the turn (see core.SharedSSH)."""
        shared = self.node.shared_ssh.get(self.client)
        if shared is None or shared.target != target:
            if shared is not None:
                shared.close()
            shared = self.node.shared_ssh[self.client] = core.SharedSSH(
                ssh_words, target, self.node.ssh_registry(self.client))
        connect = self.config.get_duration('server', 'connect_timeout',
                                           '30s')
        return shared.options(timeout=2 * max(1, connect) + 5)

    # -- validation of untrusted fields -----------------------------------

    def check_timestamp(self, text):
        if not re.fullmatch(r'[0-9]{8}T[0-9]{6}Z', text):
            self.refuse(f'bad timestamp {clean_text(text)!r}')
        return text

    def parse_options(self, tokens):
        """key=value tokens: unknown keys ignored, malformed refused."""
        checks = {'sha256': r'[0-9a-f]{64}', 'size': r'[0-9]{1,15}',
                  'source': r'[A-Za-z0-9][A-Za-z0-9._-]{0,63}',
                  # A file describing the main one (listing, stats),
                  # fetched from the same directory: a plain name ending
                  # as a module's COMPANION_SUFFIXES (checked below).
                  'companion': r'[A-Za-z0-9][A-Za-z0-9._-]{0,127}',
                  'companion_sha256': r'[0-9a-f]{64}',
                  'companion_size': r'[0-9]{1,15}',
                  # A git tip the client saw (sha1 or sha256 object name).
                  'head': r'[0-9a-f]{40}(?:[0-9a-f]{24})?',
                  'level': r'[0-9]{1,6}', 'base': core.REQUEST_ID,
                  # Stored with warnings: how many, and the first lines
                  # (read with request_warnings: hostile text).
                  'warnings': r'[0-9]{1,9}', 'warned': core.WARNED_RE}
        options = {}
        for token in tokens:
            key, eq, value = token.partition('=')
            if not eq or not re.fullmatch(r'[a-z][a-z0-9_]{0,31}', key):
                self.refuse(f'malformed option {clean_text(token)!r}')
            if key in checks:
                if not re.fullmatch(checks[key], value) or (
                        key == 'companion' and
                        not self.node.formats.is_companion(value)):
                    self.refuse(f'malformed {key}={clean_text(value)!r}')
                options[key] = value
        return options

    def request_warnings(self, options):
        """{'warning_count': n, 'warnings': [lines]} of a request a client
        stored with warnings (files it could not read, the rest stored),
        or {}.  The lines are another host's text: decoded, bounded and
        cleaned by core.decode_warnings."""
        if 'warnings' not in options and 'warned' not in options:
            return {}
        lines = core.decode_warnings(options.get('warned', ''))
        count = max(int(options.get('warnings') or 0), len(lines), 1)
        return {'warning_count': count, 'warnings': lines}

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
        core.make_dirs(data_dir)
        self.check_possible(size, data_dir)
        self.check_inodes(data_dir)
        # This request's own staging (an earlier attempt's) is removed
        # before the fetch: its bytes must not refuse the request itself.
        free = shutil.disk_usage(data_dir).free + core.tree_size(
            os.path.join(self.client_dir, 'files', '.incoming', self.key))
        if free - size < floor:
            raise NoSpace(
                f'not fetching {core.human_size(size)} for {self.client}: only '
                f'{core.human_size(free)} free on {data_dir}, floor is '
                f'{core.human_size(floor)} ([server] free_space_floor)')
        quota = self.settings['quota']
        if quota:
            used = core.tree_size(self.client_dir)
            if used + size > quota:
                raise NoSpace(
                    f'not fetching {core.human_size(size)} for {self.client}: '
                    f'quota {core.human_size(quota)}, used {core.human_size(used)}')
            return min(free - floor, quota - used)
        return free - floor

    def check_possible(self, size, data_dir):
        """A size no run could ever make room for is refused at once: as
        a wait it would stay RQ forever and keep the space alarm busy."""
        total = shutil.disk_usage(data_dir).total
        if size > total:
            self.refuse(f'{core.human_size(size)} announced, more than the '
                        f'whole file system of {data_dir} '
                        f'({core.human_size(total)})')
        quota = self.settings['quota']
        if quota and size > quota:
            self.refuse(f'{core.human_size(size)} announced, more than the '
                        f'quota of {self.client} ({core.human_size(quota)})')
    def check_inodes(self, data_dir):
        st = os.statvfs(data_dir)
        # f_files == 0: a file system without an inode limit (btrfs).
        if st.f_files and st.f_favail < MIN_FREE_INODES:
            raise NoSpace(f'not fetching for {self.client}: only '
                          f'{st.f_favail} inodes free on {data_dir} (need '
                          f'{MIN_FREE_INODES}); remove files or grow it')

    def next_sequence(self):
        """The next arrival number of this client's snapshots: the order
        they arrived in, whatever the clock said (docs/operations.md,
        "The node's clock").  Kept in
        data_dir/<client>/.sequence; if that is lost, the manifests say
        how far it got.  A crash after counting leaves a gap, never a
        repeat."""
        path = os.path.join(self.client_dir, '.sequence')
        try:
            with open(path) as f:
                last = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            last = max([b.seq for backups in stored_backups(
                self.node, self.client).values() for b in backups] or [0])
        core.atomic_write(path, f'{last + 1}\n')
        return last + 1

    def incoming_dir(self):
        """A fresh staging directory for this request's files."""
        path = os.path.join(self.client_dir, 'files', '.incoming', self.key)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def already_stored(self, source):
        """After a crash between storing and finishing a request, find what
        was stored, so nothing is stored twice: the snapshot whose manifest
        names this request (a file that was moved into a snapshot but not
        yet written into its manifest does not count)."""
        for path, manifest in snapshots_of(self.client_dir, source):
            if self.key in manifest_requests(manifest):
                return path
        return None

    def check_base(self, source, options):
        """(level, base) of an incremental archive (0, None for a full).
        An increment is accepted only onto a chain this node holds whole
        down to its full, with no link its last verify or drill found bad;
        otherwise it is refused (X* with the reason), and the client, told
        so by the failed result, makes a full at once."""
        level = int(options.get('level', 0))
        base = options.get('base')
        if level and not base:
            self.refuse(f'level={level} without base=')
        problem = self.chain_problem(source, base) if level else None
        if problem:
            self.refuse(f'level {level} increment on {base}: chain broken: '
                        f'{problem}; the client makes a full archive next')
        return level, (base if level else None)

    def chain_problem(self, source, base):
        """Why the chain an increment on client request `base` would
        extend is not whole and good on this node, or None."""
        backups = stored_backups(self.node, self.client).get(source, [])
        stored = [b for b in backups
                  if b.good and manifest_request_id(b.manifest) == base]
        if not stored:
            return (f'its base {base} is not stored on this node '
                    f'(files/{source})')
        chain = snapshot_chains(backups)[stored[-1].path]
        if not chain.whole:
            return chain.problem
        verify, drills = last_outcomes(self.node, self.client)
        for link in chain.links:
            if (verify_outcome(verify, link.path) or {}).get('outcome') \
                    == 'failed':
                return f'{link.name}, a link of it, failed the last verify'
            if (drills.get((source, link.name)) or {}).get('outcome') \
                    == 'failed':
                return f'{link.name}, a link of it, failed its last drill'
        return None

    def store(self, incoming, source, manifest):
        """Store the files staged in incoming as (part of) the snapshot of
        their client request: everything one client request produced (all
        dumps of `postgresdb all`, an archive and its listing) lands in one
        directory files/<source>/<node time>/.  The first file of a request
        becomes a new snapshot by renaming the staging directory into place;
        later ones join it (see join_snapshot).  Either way the manifest,
        written atomically last, is what makes a file stored."""
        request_id = core.request_id_of(self.key)
        manifest = {'client': self.client, 'source': source,
                    'request': self.key, 'request_id': request_id,
                    'requests': [self.key], 'stored': core.isotime(),
                    **manifest}
        base = os.path.join(self.client_dir, 'files', source)
        core.make_dirs(base)
        # Requests of one client are handled one at a time today; the lock
        # keeps a snapshot's manifest single-writer should that change.
        # (In state_dir: files/<source>/ holds snapshots only.)
        core.make_dirs(self.node.state_dir)
        lock = core.Lock(os.path.join(self.node.state_dir,
                                      f'store-{self.client}.lock'))
        if not lock.acquire(wait=self.timeout):
            raise TransientError(f'{base}: locked by pid {lock.holder()}')
        with lock:
            for path, existing in snapshots_of(self.client_dir, source):
                if request_id and existing.get('request_id') == request_id:
                    joined = join_snapshot(path, existing, incoming,
                                           manifest)
                    if joined:
                        return joined
                    break
            return self.new_snapshot(incoming, base, manifest)

    def new_snapshot(self, incoming, base, manifest):
        """Write the manifest and rename the staging directory into
        files/<source>/<node time>: the one step that makes it stored.
        A new snapshot gets the next arrival number (next_sequence)."""
        manifest = {**manifest, 'seq': self.next_sequence()}
        core.write_json(os.path.join(incoming, 'manifest.json'), manifest)
        core.pause_point('run:manifest')
        keep_private(incoming, os.listdir(incoming))
        for name in os.listdir(incoming):
            with open(os.path.join(incoming, name), 'rb') as f:
                os.fsync(f.fileno())
        fsync_dir(incoming)
        stamp = core.timestamp()
        final = os.path.join(base, stamp)
        n = 1
        while os.path.exists(final):
            n += 1
            final = os.path.join(base, f'{stamp}.{n}')
        os.rename(incoming, final)
        fsync_dir(base)
        core.pause_point('run:stored')
        return final


# Exit statuses of an executable node module (sysexits.h): the request is
# refused (X* at once), or waits without costing an attempt (the client is
# down).  Any other failure is retried and costs an attempt.
EXIT_REFUSED, EXIT_WAIT = 65, 75


def run_executable_handler(ctx, module, name, rest):
    """Handle a request with an executable node module (the seed's server
    side cmds/): ``$1`` module, ``$2`` client, ``$3`` the rest of the
    request line (untrusted: validate it).  It writes what it fetched into
    $GITBACKUP_STAGING; the node stores those files as one snapshot with a
    manifest.  See docs/modules.md, "Writing a module"."""
    source = name
    if ctx.leftover:
        stored = ctx.already_stored(source)
        if stored:
            return {'stored': stored, 'recovered': True}
    allowance = ctx.check_space(0)
    staging = ctx.incoming_dir()
    env = {**os.environ, 'GITBACKUP_SIDE': 'node',
           'GITBACKUP_CLIENT': ctx.client, 'GITBACKUP_KEY': ctx.key,
           'GITBACKUP_STAGING': staging,
           'GITBACKUP_SFTP': ctx.settings['sftp'],
           'GITBACKUP_SFTP_PORT': str(ctx.settings['sftp_port']),
           'GITBACKUP_SFTP_ROOT': ctx.settings['sftp_root'],
           'GITBACKUP_GIT': ctx.settings['git'],
           'GITBACKUP_SSH_COMMAND': ctx.node.settings['ssh_command'],
           'LC_ALL': 'C',
           'GITBACKUP_LEFTOVER': '1' if ctx.leftover else ''}
    proc = core.run([module.path, name, ctx.client, rest], env=env,
                    check=False, timeout=ctx.timeout, cwd=staging)
    reason = clean_text(proc.stderr.strip() or f'exit {proc.returncode}',
                        1000)
    if proc.returncode == EXIT_REFUSED:
        shutil.rmtree(staging, ignore_errors=True)
        raise RequestRefused(f'module {name}: {reason}')
    if proc.returncode == EXIT_WAIT:
        shutil.rmtree(staging, ignore_errors=True)
        raise Unreachable(f'module {name}: {reason}')
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise TransientError(f'module {name} failed (exit '
                             f'{proc.returncode}): {reason}')
    return store_staged(ctx, name, staging, allowance, proc.stdout)


class ClientResults:
    """The outcome of each request: journaled on the node (read by
    ``report``) and sent back to the client on its results branch."""

    def __init__(self, node):
        self.node = node
        self.settings = node.settings

    def journal(self, client):
        return Journal(os.path.join(self.settings['data_dir'], client,
                                    'results.jsonl'))

    def record(self, client, key, outcome, start, result):
        """Append the outcome to the client's result journal (read by
        ``report`` and sent back to the client)."""
        self.journal(client).append([
            {'request': key, 'outcome': outcome, 'started': start,
             'finished': core.isotime(), **result}])

    def publish(self, client):
        """Send new outcomes back to the client: one commit on the results
        branch of its own repository, holding only the new R<key> files
        (the mirror image of the request commits)."""
        repo = self.node.repository(client)
        journal = self.journal(client)
        if not os.path.isdir(repo) or not os.path.exists(journal.path):
            return 0
        state_path = os.path.join(self.settings['data_dir'], client,
                                  '.results-published.json')
        offset = self.published_offset(client, journal.path, state_path)
        entries, end = journal.read(offset)
        if end == offset:
            return 0
        latest = {}  # a request journaled twice (after a crash): last wins
        for entry in entries:
            if KEY_RE.match(str(entry.get('request', ''))):
                latest[entry['request']] = entry
        if latest:
            # Compare-and-swap; only the node writes this ref (the update
            # hook and gitolite's rules keep clients off it).
            name = self.node.name
            Ledger(repo, RESULTS_REF, name).append(
                [(f'R{key}', json.dumps(entry, sort_keys=True) + '\n')
                 for key, entry in sorted(latest.items())],
                f'{name} {core.isotime()}: {len(latest)} result(s)\n',
                parent=core.ref_from_files(repo, RESULTS_REF))
        write_json(state_path, {'offset': end,
                                'tail': journal_tail(journal.path, end)})
        log.info('%s: published %d result(s)', client, len(latest))
        return len(latest)

    def published_offset(self, client, path, state_path):
        """Where publishing goes on in results.jsonl.  A journal that no
        longer holds what was published up to there (the node restored
        from an older copy: shorter, or other bytes before the offset) is
        published again from the start, once: the client skips results it
        already has."""
        state = read_json(state_path, {}) or {}
        offset = state.get('offset', 0)
        if not offset:
            return 0
        current = journal_tail(path, offset)     # None: file too short
        # (A state written before the digest was kept has no 'tail'.)
        if current is not None and state.get('tail', current) == current:
            return offset
        log.warning('%s: %s does not hold what was published up to byte %d '
                    '(restored from an older copy?): publishing every result '
                    'again', client, path, offset)
        write_json(state_path, {'offset': 0, 'tail': ''})
        return 0


def mail_stored_warnings(node):
    """One mail per run and client for the requests stored with
    warnings (each request is stored once, so each is told once).
    They are stored backups: the run's exit status does not change."""
    for client, warned in sorted(node.stored_warnings.items()):
        core.mail_admins(
            node.config, 'server', f'gitbackup: run on {node.name}: '
            f'{len(warned)} request(s) of {client} stored with warnings',
            '\n\n'.join(warned) + '\n\nThe rest of each backup is '
            'stored; what is named above is not in it.\n',
            sorted(set(node.config.admins('server') +
                       node.config.admins(f'client {client}'))))
    node.stored_warnings.clear()


class Node:
    """The node as `run` sees it: its configuration ([server], each
    client's settings as this node configures them, its modules and what
    they say about stored files), where each client's pool and repository
    are, and the run pipeline (per client: catch up on ingest, handle the
    pool's requests through their modules, record each outcome and the
    client's health, publish the results).  The read side is chapter 2's
    functions, the checks chapter 9's."""

    def __init__(self, config):
        self.config = config
        self.settings = config.require('server')
        self.name = self.settings['name']
        self.state_dir = os.path.join(self.settings['log_dir'], 'state')
        # Clients found unreachable (or stalling) in this run: each worker
        # adds only its own client, so a set needs no lock.
        self.unreachable = set()
        # {client: (Waiting kinds proved working, kinds that made a request
        # wait)} of this run, settled once the client's pool is done.
        self.health_seen = {}
        self.modules = {}   # name: BackupModule or None, loaded once a run
        self._formats = None
        # {client: core.SharedSSH} of the clients being handled: each
        # worker only touches its own client's entry.
        self.shared_ssh = {}
        # {client: [request stored with warnings, ...]} of this run, mailed
        # once at its end (each worker touches only its own client's).
        self.stored_warnings = {}
        self.client_repositories = ClientRepositories(self)
        self.request_ingest = Ingest(self)
        self.client_results = ClientResults(self)

    @property
    def formats(self):
        """What the node's modules say about the files they store
        (StoredFormats of [server] modules_dir), read on first use."""
        if self._formats is None:
            self._formats = stored_formats(self.config.modules_dir('server'))
        return self._formats

    def pool(self, client):
        """The request pool of a client on this node."""
        return Pool(os.path.join(self.settings['todo_dir'], client),
                    NODE_STATES, KEY_RE)

    def repository(self, client):
        return os.path.join(self.settings['repositories'], client + '.git')

    def client_settings(self, client):
        """Where this node fetches a client's data: the node's own
        configuration, never anything a request says."""
        if client in self.config.client_problems:
            raise ConfigError(self.config.client_problems[client])
        section = self.config.section(f'client {client}')
        server = self.settings
        sftp = section.get('sftp') or f'{server["sftp_user"]}@{client}'
        if '@' not in sftp:
            sftp = f'{server["sftp_user"]}@{sftp}'
        try:
            quota = core.parse_size(section.get('quota') or server['quota'])
            port = int(section.get('sftp_port') or 22)
            # Kbit/s, as sftp -l takes it; 0 = no cap.
            bwlimit = int(section.get('bwlimit') or server['bwlimit'])
            # Refs per mirrored git repository; 0 = no cap.
            max_refs = int(section.get('max_refs') or server['max_refs'])
        except ValueError as e:
            raise ConfigError(f'[client {client}]: {e}') from None
        return {'sftp': sftp, 'sftp_port': port,
                'sftp_root': section.get('sftp_root') or server['sftp_root'],
                'git': (section.get('git') or f'git://{client}').rstrip('/'),
                'quota': quota, 'bwlimit': bwlimit, 'max_refs': max_refs}

    def pushing_clients(self):
        """The clients that push to this node: a pool or a repository here.
        `run` handles these; the node's clients (every one it reports on,
        verifies, drills and prunes) are known_clients()."""
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

    # -- client repositories and ingest (see ClientRepositories, Ingest) --

    def hook_text(self, client):
        return self.client_repositories.hook_text(client)

    def ensure_repository(self, client, repo=None):
        return self.client_repositories.ensure_repository(client, repo)

    def ingest(self, client, repo=None):
        """Turn new pushed commits into RQ files; return how many."""
        return self.request_ingest.ingest(client, repo)

    # -- run ----------------------------------------------------------------

    def run(self):
        """Handle every client's pool; return the list of errors.  Per
        client, in order: catch up on ingest (a hook that did not run),
        collect ingest notes, handle the pool, publish the results.
        [server] jobs clients are handled at once, one worker each (the
        work is subprocesses, threads suffice), so a slow or hostile client
        only ever holds its own worker; the mails are sent here, in the
        main thread, once every worker is done."""
        errors = []
        core.flush_mail_queue(self.config, 'server')
        clients = self.pushing_clients()
        jobs = max(1, self.config.get_int('server', 'jobs'))
        with concurrent.futures.ThreadPoolExecutor(jobs) as workers:
            outcomes = list(workers.map(self.run_worker, clients))
        for client, problems in zip(clients, outcomes):
            # [client NAME] admin hears of that client's problems too.
            core.mail_summary(self.config, 'server', f'gitbackup: run on '
                              f'{self.name}: {{n}} problem(s) of {client}',
                              problems, self.config.admins(f'client {client}'))
            errors += problems
        core.mail_summary(self.config, 'server',
                          f'gitbackup: run on {self.name}: {{n}} problem(s)',
                          errors)
        mail_stored_warnings(self)
        return errors

    def run_worker(self, client):
        """One client under a lock of its own: two runs (cron and a manual
        one with another lock directory, say) never handle one client at
        once."""
        core.make_dirs(self.state_dir)
        lock = core.Lock(os.path.join(self.state_dir, f'run-{client}.lock'))
        if not lock.acquire():
            log.info('%s: being handled by pid %s; skipped', client,
                     lock.holder())
            return []
        with lock:
            try:
                core.reap_shared_ssh(self.ssh_registry(client))
                return self.run_client(client)
            except (GitBackupError, OSError) as e:
                # One client's broken disk or state never stops the others.
                problem = core.problem(f'{client}: run stopped: {e}')
                return [problem]

    def scratch_registry(self):
        """Where a drill's live scratch PostgreSQL cluster is registered
        (postgresdb.ScratchCluster), so that a killed drill's is stopped."""
        return os.path.join(self.state_dir, 'scratch-postgres')

    def reap_scratch(self):
        """Stop what a killed drill or restore left: before anything
        else, its scratch clusters, then its scratch trees."""
        postgresdb.reap_scratch_clusters(
            core.ModuleContext(self.config, 'server'), self.scratch_registry())
        reap_scratch_trees(self)

    def ssh_registry(self, client):
        """Where the client's shared ssh connection leaves its pid."""
        return os.path.join(self.state_dir, f'ssh-{client}')

    def run_client(self, client):
        errors = []
        repo = self.repository(client)
        if os.path.isdir(repo):
            try:
                self.request_ingest.ingest(client, repo, core.ref_from_files(
                    repo, 'refs/heads/master'))
            except GitBackupError as e:
                errors.append(f'{client}: ingest: {e}')
                log.error('%s', errors[-1])
        errors += take_ignored_notes(self, client)
        try:
            errors += self.process_pool(client)
        finally:
            shared = self.shared_ssh.pop(client, None)
            if shared is not None:
                shared.close()
        try:
            self.client_results.publish(client)
        except (GitBackupError, OSError) as e:
            errors.append(f'{client}: publishing results: {e}')
            log.error('%s', errors[-1])
        return errors

    def process_pool(self, client):
        """P* left by a crash first, then RQ* -> P* -> handled."""
        pool = self.pool(client)
        states = pool.list()
        errors = []
        self.unreachable.discard(client)
        self.health_seen[client] = (set(), set())
        for key in states[PROCESSING]:
            log.info('%s: resuming %s after an interrupted run', client, key)
            errors += self.handle(client, key, leftover=True)
        for key in states[NEW]:
            if client in self.unreachable:
                break  # the rest waits for the next run
            if pool.move(key, NEW, PROCESSING):
                errors += self.handle(client, key, leftover=False)
        self.settle_health(client)
        return errors

    def settle_health(self, client):
        """Mark recovered, once the pool is done, what a request proved
        working and no request of this run found failing: a health record
        changes at most once per run (never recovered and failing again
        because one request fit and the next did not)."""
        proved, waited = self.health_seen.pop(client, (set(), set()))
        for kind in (Unreachable, NoSpace, Misconfigured):
            if kind not in proved or kind in waited:
                continue
            health = self.health(client, kind)
            if kind is Unreachable or health.state.get('first_failure'):
                health.ok()

    def read_request(self, client, key):
        path = self.pool(client).file(PROCESSING, key)
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
        if not core.MODULE_RE.match(module):
            raise RequestRefused(f'bad module name {clean_text(module)!r}')
        return line, module, rest

    def handle(self, client, key, leftover):
        """Handle one P* request; return a list with the error, if any."""
        start = core.isotime()
        try:
            _, module_name, rest = self.read_request(client, key)
            module = self.node_module(module_name)
            try:
                ctx = NodeContext(self, client, key, leftover)
            except ConfigError as e:
                raise Misconfigured(str(e)) from None
            if module.python is None:
                result = run_executable_handler(ctx, module, module_name,
                                                rest)
            else:
                result = module.python.handle(ctx, rest) or {}
        except RequestRefused as e:
            return [self.outcome(self.give_up, client, key, f'refused: {e}')]
        except Waiting as e:
            return [self.outcome(self.wait, client, key, e)]
        except (GitBackupError, OSError) as e:
            if NO_SPACE_RE.search(str(e)):
                # The node's own disk filled while storing: a wait, as the
                # free-space floor would have made it.
                e = NoSpace(f'{client}: disk full while storing: {e}')
                return [self.outcome(self.wait, client, key, e)]
            return [self.outcome(self.failed, client, key, e)]
        try:
            self.finish(client, key, start, result)
            log.info('%s: %s done (%s) %s', client, key, module_name,
                     result.get('stored') or '')
        except OSError as e:
            return [core.problem(f'{client}: {key}: stored, but recording '
                                 f'it failed: {e}')]
        return []

    def outcome(self, record, client, key, error):
        """Record a request's outcome (give_up, wait or failed).  If that
        itself fails (a full disk: ENOSPC writing the journal or the count)
        the request stays P*, which the next run resumes first, and this
        run goes on with the other requests and clients; the admins hear
        of it once, through the client's space Health record."""
        self.remove_staging(client, key)
        try:
            return record(client, key, error)
        except (GitBackupError, OSError) as e:
            text = (f'{client}: {key}: could not record its outcome ({e}); '
                    f'kept as {PROCESSING}{key} for the next run')
            log.error('%s', text)
            try:
                self.health(client, NoSpace).failed(text, 0)
            except OSError:
                pass    # the log line above is all that can be done
            return core.problem(text, mail=False)

    def remove_staging(self, client, key):
        """A failed request's half-stored download goes at once: left in
        staging, it would keep a full disk full."""
        shutil.rmtree(os.path.join(self.settings['data_dir'], client,
                                   'files', '.incoming', key),
                      ignore_errors=True)

    def node_module(self, name):
        """The node module a request names (Python with handle(), or an
        executable); an unknown one refuses the request."""
        # Loaded once per run, not per request (1000 clients, 1000 loads).
        module = self.modules.get(name, False)
        if module is False:
            try:
                module = core.load_module(self.config.modules_dir('server'),
                                          name)
            except core.ModuleError:
                module = None
            self.modules[name] = module
        if module is None or (module.python is not None and
                              not module.has('handle')):
            raise RequestRefused(f'unknown server module {clean_text(name)!r}')
        return module

    def finish(self, client, key, start, result):
        """P* -> F*.  The outcome is journaled first: a crash in between
        re-handles the request (modules find what they stored) and journals
        it again, which readers deduplicate."""
        pool = self.pool(client)
        self.client_results.record(client, key, 'stored', start, result)
        pool.move(key, PROCESSING, FINISHED)
        if result.get('warning_count'):
            text = (f'{client}: {key}: stored with '
                    f'{result["warning_count"]} warning(s) in '
                    f'{result.get("stored")}:\n' + '\n'.join(
                        f'  {clean_text(w)}' for w in result['warnings']))
            log.warning('%s', text)
            self.stored_warnings.setdefault(client, []).append(text)
        Attempts(pool, 0).clear(key)
        # Only a request that fetched something proves the client
        # reachable, the space sufficient and the configuration right
        # (recorded when the pool is done: settle_health).
        if result.get('fetched', True):
            self.health_seen.setdefault(client, (set(), set()))[0].update(
                (Unreachable, NoSpace, Misconfigured))

    def health(self, client, kind):
        """The Health record of one kind of Waiting for one client."""
        return core.Health(
            os.path.join(self.state_dir, f'{kind.health}-{client}.json'),
            self.config, 'server', kind.what.format(client=client))

    def wait(self, client, key, error):
        """Put the request back untouched: it costs no attempt; the admins
        hear of it once, through the Health record of its kind."""
        self.pool(client).move(key, PROCESSING, NEW)
        if error.stops_pool:
            self.unreachable.add(client)
        # Recorded as its Health kind (core.AccessDenied is a Misconfigured).
        kind = next(k for k in (Unreachable, NoSpace, Misconfigured)
                    if isinstance(error, k))
        self.health_seen.setdefault(client, (set(), set()))[1].add(kind)
        alert_after = self.config.get_duration('server', error.alert_after) \
            if error.alert_after else 0
        self.health(client, kind).failed(str(error), alert_after)
        return core.problem(f'{client}: {key}: waits for the next run: '
                            f'{error}', mail=False)

    def failed(self, client, key, error):
        """A transient failure: retried by later runs, X* after
        max_attempts."""
        pool = self.pool(client)
        if getattr(error, 'stops_pool', False):
            self.unreachable.add(client)    # it timed out: once per run
        attempts = Attempts(pool, self.config.get_int('server',
                                                      'max_attempts'))
        count, give_up = attempts.failed(key, error)
        if give_up:
            return self.give_up(client, key, f'failed {count} times, last: '
                                f'{error}')
        pool.move(key, PROCESSING, NEW)
        return core.problem(f'{client}: {key}: attempt {count} of '
                            f'{attempts.limit} failed (retried next run): '
                            f'{clean_text(error, 2000)}', mail=False)

    def give_up(self, client, key, reason):
        """X*: kept with the reason beside it, admins told in the run's
        summary mail."""
        attempts = Attempts(self.pool(client), 0)
        reason = clean_text(reason, 2000)
        self.client_results.record(client, key, 'failed', core.isotime(),
                                   {'reason': reason})
        attempts.give_up(key, PROCESSING, reason)
        return core.problem(f'{client}: {key}: given up, kept as '
                            f'{FAILED}{key}: {reason}')

    # -- check ----------------------------------------------------------------


# ==========================================================================
# 4. Keep: retry, gc, prune, verify
#
# What keeps a node healthy for years: given-up requests put back, git
# repositories kept small, retention applied per series, and stored files
# re-hashed and read back.  Every age is measured on the node's own clock
# (the manifest's `stored` time, the directory name, the result journal),
# never on a timestamp a client supplied.  prune removes snapshots only
# while no drill, verify, restore or offsite reads that client's
# (client_data_lock).

def client_data_lock(node, client, reader):
    """The lock over one client's stored snapshots, acquired: shared by
    its readers (drill, verify, restore, offsite: reader names which),
    which wait for a running prune up to command_timeout, so that no
    snapshot vanishes under them; exclusive for prune (reader None), which
    waits [server] prune_wait and returns None if the readers are still
    there.  A reader that may not create the lock file (restore run by
    another account) reads without it, and says so."""
    path = os.path.join(node.state_dir, f'data-{client}.lock')
    lock = core.Lock(path)
    try:
        core.make_dirs(node.state_dir)
        if reader is None:
            wait = node.config.get_duration('server', 'prune_wait')
            return lock if lock.acquire(wait=wait) else None
        wait = node.config.get_duration('server', 'command_timeout')
        if lock.acquire(wait=wait, shared=True):
            return lock
    except PermissionError as e:
        if reader is None:
            raise
        log.warning('%s of %s without the prune lock: %s', reader, client, e)
        return lock
    raise TransientError(f'{reader} of {client}: a prune (pid '
                         f'{lock.holder()}) still holds its snapshots after '
                         f'{wait} s; try again')


def mail_client_admins(node, client, subject, body):
    """Mail [client NAME] admin, the extra admins of one client's
    problems (the [server] admins are mailed separately)."""
    admins = node.config.admins(f'client {client}')
    return bool(admins) and core.mail_admins(node.config, 'server', subject,
                                             body, admins)


def retry_command(node, client, key=None, all_failed=False, out=sys.stdout):
    """Put given-up requests (X*) of a client back as RQ* with a fresh
    attempt count (docs/operations.md, "Given-up requests"); the next run
    handles them and reports the new outcome to the client.  Returns how
    many."""
    check_client_name(client)
    if bool(key) == bool(all_failed):
        raise UsageError('give a request key or --all-failed')
    pool = node.pool(client)
    attempts = Attempts(pool, 0)
    failed = pool.list()[FAILED]
    keys = failed if all_failed else [k for k in failed if k == key]
    if key and not keys:
        raise UsageError(f'{client}: no given-up request {key!r} (see '
                         f'server.py report, or ls {pool.path})')
    count = 0
    for k in keys:
        if attempts.retry(k, NEW):
            out.write(f'{client}: {k} put back\n')
            log.info('%s: %s put back by retry', client, k)
            count += 1
    return count


def gc_command(node, aggressive=False):
    """git gc of every mirror and client repository; log mailed.  Returns
    the repositories whose gc failed."""
    repos = []
    data_dir = node.settings['data_dir']
    for client in known_clients(node):
        repos += find_repositories(os.path.join(data_dir, client, 'git'))
    repos += find_repositories(node.settings['repositories'])
    return core.gc_repositories(node.config, 'server', repos, aggressive,
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
        if client in node.config.client_problems:
            # Its retention cannot be read: nothing of it is removed.
            errors.append(f'[client {client}] not pruned: '
                          f'{node.config.client_problems[client]}')
            continue
        retain = retention(node, client)
        # A dry run only reads: it shares the lock like the readers.
        lock = client_data_lock(node, client,
                                'prune --dry-run' if dry_run else None)
        if lock is None:
            out.write(f'skipped {client}: its snapshots are being read (a '
                      f'drill, verify, restore or offsite) for longer than '
                      f'prune_wait; the next prune removes what is due\n')
            log.warning('prune: skipped %s: its snapshots are being read',
                        client)
            continue
        with lock:
            for source, backups in stored_backups(node, client).items():
                directory = os.path.join(node.settings['data_dir'], client,
                                         'files', source)
                source_errors, source_removed, source_kept = prune_source(
                    directory, backups, retain, dry_run, verb, out,
                    None if dry_run else prune_journal(node, client))
                errors += source_errors
                removed += source_removed
                kept += source_kept
        pool = node.pool(client)
        states = pool.list()
        errors += prune_incoming(node, client, states, dry_run, out)
        errors += prune_request_files(pool, states, now, keep_requests,
                                      dry_run, verb, out)
        if not dry_run and os.path.isdir(pool.path):
            fsync_dir(pool.path)
    log.info('prune%s: %d backup(s) %s, %d kept', ' --dry-run' if dry_run
             else '', removed, verb, kept)
    return errors


def prune_snapshot(node, client, source, snapshot, out=sys.stdout):
    """`prune --snapshot CLIENT SOURCE SNAPSHOT`: remove one snapshot on
    purpose (data that must go), here and, through prune's journal, on
    the offsite remote at its next run; also for one already lost here
    that must not come back.  Refused while a stored increment builds on
    it."""
    check_client_name(client)
    if not SOURCE_NAME_RE.match(source) or not STORED_NAME_RE.match(snapshot):
        raise UsageError(f'not a source and snapshot name: {source!r} '
                         f'{snapshot!r} (see `server.py list`)')
    backups = stored_backups(node, client).get(source) or []
    path = os.path.join(node.settings['data_dir'], client, 'files', source,
                        snapshot)
    users = [b.name for b in backups if b.path != path and
             any(link.path == path for link in
                 snapshot_chains(backups).get(b.path, Chain([])).links)]
    if users:
        raise UsageError(f'{source} {snapshot}: {", ".join(users)} build on '
                         'it; remove those first (newest first)')
    lock = client_data_lock(node, client, None)
    if lock is None:
        raise TransientError(f'{client}: its snapshots are being read (a '
                             'drill, verify, restore or offsite); try again')
    with lock:
        prune_journal(node, client).append([pruned_entry(
            source, snapshot, 'by hand (prune --snapshot)')])
        if os.path.isdir(path):
            remove_tree(path)
    out.write(f'removed {path}\n')
    return 0


def prune_source(directory, backups, retain, dry_run, verb, out,
                 journal=None):
    """Apply retention (daily, weekly, monthly) to the backups of one
    source; return (errors, how many removed, how many kept).  Each
    removal is journaled first (the offsite copy follows the journal)."""
    daily, weekly, monthly = retain
    errors = []
    removed = kept = 0
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
    # A chain is never cut below a kept link: every link a kept snapshot
    # needs, down to its full, is kept with it.
    chains = snapshot_chains(good)
    for path in list(keep):
        for link in chains[path].links[:-1] if path in chains else []:
            keep.setdefault(link.path, f'base of {os.path.basename(path)}')
    # Newest arrival first: an increment always arrives after its base, so
    # a chain goes from its newest link down, and a prune killed at any
    # point never leaves a link without its base.
    for backup in sorted(good, key=StoredBackup.sort_key, reverse=True):
        if backup.path in keep:
            kept += 1
            log.debug('keeping %s (%s)', backup.path,
                      keep[backup.path])
            continue
        try:
            if journal is not None:
                journal.append([pruned_entry(
                    backup.source, backup.name,
                    f'not kept by keep_daily {daily}, keep_weekly '
                    f'{weekly}, keep_monthly {monthly}')])
            if not dry_run:
                remove_tree(backup.path)
        except OSError as e:
            errors.append(f'{backup.path}: {e}')
            log.error('cannot remove %s: %s', backup.path, e)
            continue
        removed += 1
        out.write(f'{verb} {backup.path}\n')
        core.pause_point('prune:removed')
    for backup in backups:
        if not backup.good or not backup.time:
            log.warning('%s: no readable manifest; not pruned (see '
                        '`server.py verify`)', backup.path)
    return errors, removed, kept


def prune_request_files(pool, states, now, keep_requests, dry_run, verb,
                        out):
    """Remove F*/X* request files (and their .reason and attempt count)
    last changed more than keep_requests seconds before now; return the
    list of errors."""
    errors = []
    for state in (FINISHED, FAILED):
        for key in states[state]:
            path = pool.file(state, key)
            extras = [p for p in (path + '.reason',
                                  Attempts(pool, 0).path(key))
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
    return core.remove_listed(core.older_than(paths, limit), dry_run, out)

# -- verify -----------------------------------------------------------------


def read_back(formats, path, timeout):
    """Read one stored file back the way a restore would, through the
    module that stored it (its verify_stored): (word, problem) with word
    'read back', 'hashes only' (no module claims the file, or its module
    has no read-back proof) or 'failed', and problem (level, message) or
    None.  A program the proof needs that is missing is a check that
    could not run (a warning), not a corrupt file."""
    code = formats.owner(os.path.basename(path))
    if code is None or not hasattr(code, 'verify_stored'):
        return 'hashes only', None
    try:
        code.verify_stored(path, timeout)
    except (FileNotFoundError, core.ToolMissing) as e:
        return 'failed', (WARNING, f'{path}: cannot check: {e}')
    except Exception as e:       # whatever the module raises: its proof failed
        return 'failed', (CRITICAL, f'{path}: restore check failed: {e}')
    log.debug('restore check of %s passed', path)
    return 'read back', None


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
            digest, size = core.sha256_file(path)
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
    hashes_only = []
    files = repos = 0
    clients = [check_client_name(only_client)] if only_client else \
        known_clients(node)
    for client in clients:
        with client_data_lock(node, client, 'verify'):
            for backups in stored_backups(node, client).values():
                source_problems, source_files, source_hashes_only = \
                    verify_source(backups, restore, timeout, node.formats)
                problems += source_problems
                files += source_files
                hashes_only += source_hashes_only
        repo_problems, repo_count = fsck_client_repositories(node, client,
                                                             timeout)
        problems += repo_problems
        repos += repo_count
    status = max([level for level, _ in problems] or [OK])
    for level, message in problems:
        out.write(f'{STATUS_NAMES[level]}: {message}\n')
    for path in hashes_only:
        out.write(f'hashes only: {path} (no module proves this file)\n')
    summary = (f'verify on {node.name}: {files} file(s) re-hashed, {repos} '
               f'repositories checked, {len(hashes_only)} newest file(s) '
               f'checked by hashes only, {len(problems)} problem(s): '
               f'{STATUS_NAMES[status].upper()}')
    out.write(summary + '\n')
    log.info('%s', summary, extra=core.FILE_ONLY)
    write_json(os.path.join(node.state_dir, 'verify.json'),
               {'finished': core.isotime(), 'status': STATUS_NAMES[status],
                'problems': [m for _, m in problems][:100]})
    if problems:
        core.mail_admins(node.config, 'server',
                       f'gitbackup: verify on {node.name}: '
                       f'{STATUS_NAMES[status].upper()}',
                       '\n'.join(f'{STATUS_NAMES[level]}: {message}'
                                 for level, message in problems) +
                       '\n\n' + summary + '\n')
    return status


def verify_source(backups, restore, timeout, formats):
    """Re-hash the backups of one source, check its incremental chains and,
    with restore, read its newest backups back through their modules;
    return ([(level, message)], how many files were re-hashed, the newest
    files that could only be re-hashed ("hashes only"))."""
    problems = []
    files = 0
    for backup in backups:
        found = verify_backup(backup)
        if found and not os.path.isdir(backup.path):
            continue  # pruned meanwhile
        problems += found
        files += len((backup.manifest or {}).get('files') or [])
    good = [b for b in backups if b.good]
    problems += [(CRITICAL, f'{path}: incremental chain broken: '
                  f'{chain.problem}')
                 for path, chain in snapshot_chains(good).items()
                 if not chain.whole]
    hashes_only = []
    for backup in newest_of_series(good) if restore else []:
        for entry in backup.manifest['files']:
            if isinstance(entry, dict) and \
                    isinstance(entry.get('name'), str) and \
                    '/' not in entry['name'] and \
                    not formats.is_companion(entry['name']):
                path = os.path.join(backup.path, entry['name'])
                word, found = read_back(formats, path, timeout)
                if found:
                    problems.append(found)
                if word == 'hashes only':
                    hashes_only.append(path)
    return problems, files, hashes_only


def fsck_client_repositories(node, client, timeout):
    """git fsck the client's mirrors and its request repository; return
    ([(level, message)], how many repositories were checked)."""
    problems = []
    targets = list(client_mirrors(node, client).values())
    repository = node.repository(client)
    if os.path.isdir(os.path.join(repository, 'objects')):
        targets.append(repository)
    git_module = node.formats.load('git')
    for repo in targets:
        try:
            git_module.verify_stored(repo, timeout)
        except Exception as e:   # the git module's proof failed
            problems.append((CRITICAL, f'{repo}: {e}'))
    return problems, len(targets)


# ==========================================================================
# 5. Copy away: the offsite copy on an rclone remote
#
# rclone is the engine: it speaks the remote's protocol (sftp, S3, WebDAV,
# ...), encrypts when the remote is a `crypt` remote, and checks hashes.
# This section decides what to copy, what to remove there, and how a node
# that holds nothing reads the remote on its own.  The remote mirrors
# data_dir:
#   <remote>/<client>/files/<source>/<snapshot>/   (manifest.json included)
#   <remote>/<client>/files/<source>/index.json    (every snapshot of it)
#   <remote>/<client>/git/<path>.git/<node time>.bundle
#   <remote>/<client>/git/<path>.git/index.json    (its newest bundle)
#   <remote>/<client>/results.jsonl                (request outcomes)
# An index names each snapshot with its kind, its base as a snapshot name,
# its files with size and sha256, and its whole manifest: `list --from
# offsite`, `restore --from offsite` and `offsite --rebuild` need nothing
# else.  The results journal lets a rebuilt node recognise the requests it
# already handled when a client pushes its ledger again.
# A git mirror travels as one `git bundle --all` whenever its refs changed:
# one self-contained file that `git bundle verify` and a hash can prove,
# where a file-by-file `rclone copy` of a bare repository (never `sync`)
# would keep stale loose refs and packs beside the new ones after a gc.
# The mirror never loses history (preserved refs), so its newest bundle
# holds all that older ones did: those are removed once it is verified.
# A snapshot is removed remotely only when prune's journal says prune
# removed it here.  One missing here for any other reason (a disk error,
# an fsck, a mistaken rm, an older data_dir put back) is kept there,
# reported critical and mailed once: the remote copy is then the last one.
# Every step is recorded in data_dir/<client>/offsite.jsonl: 'start'
# before a copy (so a copy cut short is still known to be there, partly),
# 'copied' once verified, 'removed' once gone.  It comes before the
# chapters that give data back and report, which read it.

OFFSITE_REMOTE_RE = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_. -]*:[^\s]*$')
# rclone's exit statuses for "directory not found" and "file not found":
# what was to be removed is already gone.
RCLONE_NOT_FOUND = (3, 4)
# What rclone says when it cannot reach the remote at all: the run stops
# there (one try, not one per snapshot) and waits for the next run.
RCLONE_UNREACHABLE_RE = re.compile(
    r"Failed to create file system|couldn't connect|connection refused|"
    r'dial tcp|no route to host|i/o timeout|network is unreachable|'
    r'no such host|TLS handshake', re.IGNORECASE)
OFFSITE_PROBE_TIMEOUT = 120   # seconds the first listing of a run may take
OFFSITE_INDEX = 'index.json'
OFFSITE_RESULTS = 'results.jsonl'
# files/<source>/<snapshot>: the remote path of one snapshot.
SNAPSHOT_REL_RE = re.compile(r'^files/([A-Za-z0-9][A-Za-z0-9._-]{0,63})/'
                             r'([0-9]{8}T[0-9]{6}Z(?:\.[0-9]+)?)$')


class OffsiteFailed(GitBackupError):
    """A copy, a check or a fetch from the offsite remote failed."""


class OffsiteUnreachable(OffsiteFailed):
    """The remote cannot be reached at all: nothing more is tried this
    run."""


class Offsite:
    """rclone with this node's [offsite] settings."""

    def __init__(self, node):
        if not node.config.has('offsite'):
            raise ConfigError(f'{node.config.path}: no [offsite] section '
                              '(remote = name:path, rclone_config = PATH)')
        settings = node.config.section('offsite')
        self.remote = settings['remote'].strip()
        if not OFFSITE_REMOTE_RE.match(self.remote):
            raise ConfigError(f'[offsite] remote = {self.remote}: not an '
                              'rclone remote (name:path)')
        self.rclone_config = settings['rclone_config']
        if not os.path.isfile(self.rclone_config):
            raise ConfigError(f'[offsite] rclone_config = '
                              f'{self.rclone_config}: no such file')
        self.program = shlex.split(settings['rclone'])
        self.options = ['--transfers', settings['transfers'] or '4']
        if settings['bwlimit']:
            self.options += ['--bwlimit', settings['bwlimit']]
        self.timeout = node.config.get_duration('server', 'command_timeout')
        self.crypt = self.remote_type() == 'crypt'

    def rclone(self, *args, check=True, input=None, timeout=None):
        """rclone with our config; a remote it cannot reach at all is
        OffsiteUnreachable, any other failure CommandFailed."""
        # --ask-password=false: cron has no terminal to type one into.
        result = core.run([*self.program, '--config', self.rclone_config,
                           '--ask-password=false', *args],
                          timeout=timeout or self.timeout, check=False,
                          input=input)
        if result.returncode and RCLONE_UNREACHABLE_RE.search(
                result.stderr or ''):
            last = clean_text(result.stderr.strip().splitlines()[-1], 500)
            raise OffsiteUnreachable(f'offsite remote {self.remote} cannot '
                                     f'be reached: {last}')
        if check and result.returncode:
            raise core.CommandFailed(result.args, result.returncode,
                                     result.stderr)
        return result

    def reachable(self):
        """One quick listing (one try, no retries): raises
        OffsiteUnreachable when the remote is down.  An empty remote
        (directory not found) is reachable."""
        try:
            # A remote that accepts connections and then says nothing (a
            # tarpit) must cost this one probe, not a timeout per copy.
            result = self.rclone(
                'lsf', '--max-depth', '1', '--retries', '1',
                '--low-level-retries', '1', '--contimeout', '30s',
                '--timeout', '60s', self.remote, check=False,
                timeout=min(self.timeout, OFFSITE_PROBE_TIMEOUT))
        except core.CommandFailed as e:
            raise OffsiteUnreachable(f'offsite remote {self.remote} cannot '
                                     f'be reached: {e}') from None
        if result.returncode and result.returncode not in RCLONE_NOT_FOUND:
            raise OffsiteFailed(f'offsite remote {self.remote}: listing '
                                f'failed: {clean_text(result.stderr, 500)}')

    def remote_type(self):
        """The type of the named remote ('crypt', 's3', ...); a name the
        rclone config lacks is a configuration error, said now."""
        name = self.remote.split(':', 1)[0]
        dump = self.rclone('config', 'dump').stdout
        try:
            remotes = json.loads(dump)
        except ValueError:
            remotes = {}
        if name not in remotes:
            raise ConfigError(f'[offsite] remote = {self.remote}: no remote '
                              f'[{name}] in {self.rclone_config}')
        return remotes[name].get('type')

    def path(self, client, rel=''):
        base = self.remote if self.remote.endswith((':', '/')) \
            else self.remote + '/'
        return f'{base}{client}/{rel}'.rstrip('/')

    def check_args(self):
        """check or cryptcheck: a crypt remote stores no plaintext hashes;
        cryptcheck encrypts ours and compares."""
        return ['cryptcheck'] if self.crypt else ['check']

    def verify(self, local_dir, remote_dir):
        """Prove that every file of local_dir arrived whole.  A remote
        without a hash in common (WebDAV) would be compared by size
        alone: download and compare bytes instead."""
        result = self.rclone(*self.check_args(), '--one-way', local_dir,
                             remote_dir)
        if 'No common hash' in result.stderr:
            self.rclone('check', '--one-way', '--download', local_dir,
                        remote_dir)

    def remove(self, remote_path, directory):
        """Remove a snapshot directory or a file; gone already is fine."""
        result = self.rclone('purge' if directory else 'deletefile',
                             remote_path, check=False)
        if result.returncode and result.returncode not in RCLONE_NOT_FOUND:
            raise core.CommandFailed(result.args, result.returncode,
                                     result.stderr)

    def read_json(self, client, rel):
        """A small JSON file of the remote (an index), or None if absent
        or not JSON."""
        result = self.rclone('cat', self.path(client, rel), check=False)
        if result.returncode:
            return None
        try:
            return json.loads(result.stdout)
        except ValueError:
            return None

    def put_text(self, client, rel, text, staging):
        """Write a small file there and read it back: what arrived is what
        was meant.  Returns its sha256."""
        local = os.path.join(staging, os.path.basename(rel))
        atomic_write(local, text)
        # --ignore-times: rclone skips a file of the same size and
        # modification time (to the remote's precision, a second on
        # sftp): an index rewritten over a damaged copy within the
        # same second would not be sent (seen in a test).
        self.rclone('copyto', '--ignore-times', local,
                    self.path(client, rel))
        back = self.rclone('cat', self.path(client, rel)).stdout
        if back != text:
            raise OffsiteFailed(f'{self.path(client, rel)}: read back '
                                'differs from what was written')
        return hashlib.sha256(text.encode()).hexdigest()

    def entry(self, event, rel, **extra):
        return {'event': event, 'remote': self.remote, 'path': rel,
                'time': core.isotime(), **extra}


def offsite_state(node, client, remote):
    """{remote path: last journal entry} on this remote: what is there
    ('start': perhaps partly, 'copied': verified); removed ones dropped."""
    state = {}
    for entry in offsite_journal(node, client).read()[0]:
        if entry.get('remote') == remote and isinstance(entry.get('path'),
                                                        str):
            state[entry['path']] = entry
    return {path: e for path, e in state.items()
            if e.get('event') in ('start', 'copied')}


def snapshot_rel(backup):
    return f'files/{backup.source}/{backup.name}'


def offsite_missing(node, client, state):
    """What the remote holds whose original this node lost for a reason
    other than prune: snapshot paths and mirror paths (git/<path>.git),
    sorted.  The remote copy is then the last one: kept, never removed."""
    data = os.path.join(node.settings['data_dir'], client)
    pruned = pruned_snapshots(node, client)
    missing = set()
    for rel, entry in state.items():
        if entry.get('event') != 'copied':
            continue
        if SNAPSHOT_REL_RE.match(rel):
            if rel not in pruned and not os.path.isdir(
                    os.path.join(data, rel)):
                missing.add(rel)
        elif rel.endswith('.bundle'):
            mirror = rel.rsplit('/', 1)[0]
            if not os.path.isdir(os.path.join(data, mirror)):
                missing.add(mirror)
    return sorted(missing)


def offsite_copy_snapshot(off, journal, client, backup):
    rel = snapshot_rel(backup)
    manifest_sha256 = core.sha256_file(
        os.path.join(backup.path, 'manifest.json'))[0]
    journal.append([off.entry('start', rel)])
    target = off.path(client, rel)
    off.rclone('copy', *off.options, backup.path, target)
    off.verify(backup.path, target)
    journal.append([off.entry('copied', rel, bytes=backup.size,
                              manifest_sha256=manifest_sha256)])
    log.info('offsite: copied %s/%s', client, rel)


def local_snapshots(node, client):
    """{'files/<source>/<snapshot>': StoredBackup} of the good ones."""
    return {snapshot_rel(b): b
            for backups in stored_backups(node, client).values()
            for b in backups if b.good and b.time}


def offsite_snapshots(off, node, client, state, out):
    """Copy the snapshots not yet verified there (oldest first, so an
    increment's base goes before it); remove there those prune's journal
    says it removed here, and nothing else.  Returns (copied, removed,
    errors)."""
    journal = offsite_journal(node, client)
    local = local_snapshots(node, client)
    copied, removed, errors = 0, 0, []
    for rel, backup in local.items():
        if state.get(rel, {}).get('event') == 'copied':
            continue
        try:
            offsite_copy_snapshot(off, journal, client, backup)
        except OffsiteUnreachable:
            raise
        except (GitBackupError, OSError) as e:
            errors.append(f'{client}/{rel}: {e}')
            continue
        copied += 1
        out.write(f'copied {client}/{rel}\n')
    pruned = pruned_snapshots(node, client)
    data = os.path.join(node.settings['data_dir'], client)
    for rel in sorted(state):
        if not SNAPSHOT_REL_RE.match(rel) or rel not in pruned or \
                rel in local or os.path.exists(os.path.join(data, rel)):
            continue
        try:
            off.remove(off.path(client, rel), directory=True)
        except OffsiteUnreachable:
            raise
        except GitBackupError as e:
            errors.append(f'{client}/{rel}: cannot remove: {e}')
            continue
        journal.append([off.entry('removed', rel, pruned=pruned[rel])])
        removed += 1
        out.write(f'removed {client}/{rel} (pruned: '
                  f'{pruned[rel].get("time")})\n')
    return copied, removed, errors


def index_entry(chains, backup, manifest_sha256):
    """One snapshot as an index (and `list --from offsite`) names it;
    chains as snapshot_chains gives them."""
    base = chains[backup.path].base
    return {'snapshot': backup.name, 'time': core.isotime(backup.time),
            'kind': snapshot_kind(backup),
            'level': manifest_level(backup.manifest),
            'base': base.name if base else None, 'size': backup.size,
            'files': [{'name': f.get('name'), 'size': f.get('size'),
                       'sha256': f.get('sha256')}
                      for f in backup.manifest['files']
                      if isinstance(f, dict)],
            'manifest_sha256': manifest_sha256, 'manifest': backup.manifest}


def index_backups(index, top, source, formats=None):
    """StoredBackups (oldest first) of an index's snapshots, their paths
    under top (where they are, or will be, fetched)."""
    backups = [StoredBackup(source, os.path.join(top, e['snapshot']),
                            e.get('manifest'), formats)
               for e in (index or {}).get('snapshots') or []
               if isinstance(e, dict) and
               STORED_NAME_RE.match(str(e.get('snapshot')))]
    return sorted((b for b in backups if b.good), key=StoredBackup.sort_key)


def remote_manifest(off, client, rel, entry):
    """A snapshot only the remote holds, from its manifest there (an index
    lost or written before it): a StoredBackup, or None when the manifest
    is not the one journaled when it was copied."""
    result = off.rclone('cat', off.path(client, f'{rel}/manifest.json'),
                        check=False)
    text = result.stdout.encode('utf-8', 'surrogateescape')
    if result.returncode or hashlib.sha256(text).hexdigest() != \
            entry.get('manifest_sha256'):
        log.error('offsite: %s: its manifest there is missing or not the '
                  'one copied; left out of the index', off.path(client, rel))
        return None
    source, name = rel.split('/')[1:]
    backup = StoredBackup(source, '/' + name, json.loads(text))
    return backup if backup.good else None


def source_index(off, client, source, state, local):
    """The index of one source: every snapshot verified on the remote,
    from the local manifest (local: local_snapshots), else (kept there,
    gone here) from the index written before."""
    there = {rel: e for rel, e in state.items() if e.get('event') ==
             'copied' and SNAPSHOT_REL_RE.match(rel) and
             rel.split('/')[1] == source}
    backups = [local[rel] for rel in there if rel in local]
    gone = [rel for rel in there if rel not in local]
    if gone:
        old = {b.name: b for b in index_backups(off.read_json(
            client, f'files/{source}/{OFFSITE_INDEX}'), '/', source)}
        for rel in gone:
            backup = old.get(rel.rsplit('/', 1)[1]) or \
                remote_manifest(off, client, rel, there[rel])
            if backup:
                backups.append(backup)
    backups.sort(key=StoredBackup.sort_key)
    chains = snapshot_chains(backups)
    return {'format': 1, 'client': client, 'source': source,
            'kind': 'files',
            'snapshots': [index_entry(chains, b, there[snapshot_rel(b)].get(
                'manifest_sha256')) for b in backups]}


def offsite_indexes(off, node, client, state, staging):
    """Write the index of every source whose snapshots there changed since
    its index was written (and the client's results journal); returns the
    errors."""
    journal = offsite_journal(node, client)
    errors = []
    sources = {m.group(1) for m in map(SNAPSHOT_REL_RE.match, state) if m}
    local = local_snapshots(node, client)
    texts = {f'files/{s}/{OFFSITE_INDEX}': json.dumps(
        source_index(off, client, s, state, local), indent=1,
        sort_keys=True) + '\n' for s in sorted(sources)}
    results = os.path.join(node.settings['data_dir'], client,
                           OFFSITE_RESULTS)
    if os.path.isfile(results):
        with open(results, encoding='utf-8', errors='replace') as f:
            texts[OFFSITE_RESULTS] = f.read()
    errors += offsite_mirror_indexes(off, journal, client, state, staging)
    for rel, text in texts.items():
        digest = hashlib.sha256(text.encode()).hexdigest()
        if state.get(rel, {}).get('sha256') == digest:
            continue
        try:
            off.put_text(client, rel, text, staging)
        except OffsiteUnreachable:
            raise
        except (GitBackupError, OSError) as e:
            errors.append(f'{client}/{rel}: {e}')
            continue
        journal.append([off.entry('copied', rel, sha256=digest)])
    return errors


def newest_bundles(state):
    """{'git/<path>.git': journal entry of its newest verified bundle}."""
    newest = {}
    for rel, entry in state.items():
        if rel.startswith('git/') and rel.endswith('.bundle') and \
                entry.get('event') == 'copied':
            mirror = rel.rsplit('/', 1)[0]
            if rel > newest.get(mirror, {}).get('path', ''):
                newest[mirror] = entry
    return newest


def offsite_mirror_indexes(off, journal, client, state, staging):
    """Write the index of every mirror there whose index does not name its
    newest bundle (one copied before indexes existed, or whose mirror is
    gone here); returns the errors."""
    errors = []
    for mirror, entry in sorted(newest_bundles(state).items()):
        if state.get(f'{mirror}/{OFFSITE_INDEX}', {}).get('bundle') == \
                entry['path'].rsplit('/', 1)[1]:
            continue
        try:
            offsite_mirror_index(off, journal, client, entry, staging)
        except OffsiteUnreachable:
            raise
        except (GitBackupError, OSError) as e:
            errors.append(f'{client}/{mirror}: {e}')
    return errors


def mirror_refs_digest(repo):
    """A digest of every ref and its target: a changed mirror changes it.
    None for a mirror without refs (git refuses an empty bundle)."""
    refs = git(repo, 'for-each-ref', '--format=%(objectname) %(refname)',
               env={**os.environ, 'LC_ALL': 'C'}).stdout
    return hashlib.sha256(refs.encode()).hexdigest() if refs.strip() \
        else None


def offsite_copy_bundle(off, journal, client, rel, repo, digest, staging):
    """Bundle one mirror into staging/, prove the bundle, copy and check
    it, then write the mirror's index beside it; return its remote
    path."""
    os.makedirs(staging)
    # Node time to the microsecond: two runs in one second must not name
    # the new bundle as the old one they then remove.
    name = f'{core.new_request_id()}.bundle'
    bundle = os.path.join(staging, name)
    git(repo, 'bundle', 'create', bundle, '--all')
    git(repo, 'bundle', 'verify', bundle)
    bundle_rel = f'git/{rel}.git/{name}'
    journal.append([off.entry('start', bundle_rel)])
    target = off.path(client, f'git/{rel}.git')
    off.rclone('copy', *off.options, staging, target)
    off.verify(staging, target)
    sha256, size = core.sha256_file(bundle)
    entry = off.entry('copied', bundle_rel, refs=digest, sha256=sha256,
                      bytes=size)
    journal.append([entry])
    os.unlink(bundle)
    offsite_mirror_index(off, journal, client, entry, staging)
    return bundle_rel


def offsite_mirror_index(off, journal, client, entry, staging):
    """Write the index of a mirror: its newest bundle (a journal entry)."""
    mirror, name = entry['path'].rsplit('/', 1)
    index = {'format': 1, 'client': client,
             'source': mirror[:-len('.git')], 'kind': 'git', 'bundle': name,
             'sha256': entry.get('sha256'), 'size': entry.get('bytes'),
             'refs': entry.get('refs'), 'time': entry.get('time')}
    index_rel = f'{mirror}/{OFFSITE_INDEX}'
    text = json.dumps(index, indent=1, sort_keys=True) + '\n'
    journal.append([off.entry('copied', index_rel, bundle=name,
                              sha256=off.put_text(client, index_rel, text,
                                                  staging))])


def offsite_mirrors(off, node, client, state, out):
    """A new bundle of each mirror whose refs changed since its last
    verified bundle; older bundles of it removed after.  A mirror gone
    here keeps its bundles there.  Returns (copied, removed, errors)."""
    journal = offsite_journal(node, client)
    staging_top = os.path.join(node.settings['data_dir'], client,
                               '.offsite-staging')
    copied, removed, errors = 0, 0, []
    for source, repo in sorted(client_mirrors(node, client).items()):
        rel = source[len('git/'):]
        prefix = f'git/{rel}.git/'
        mine = {p: e for p, e in state.items()
                if p.startswith(prefix) and p.endswith('.bundle')}
        last = max((e for e in mine.values() if e['event'] == 'copied'),
                   key=lambda e: e['path'], default={})
        staging = os.path.join(staging_top, core.new_request_id())
        try:
            digest = mirror_refs_digest(repo)
            if digest is None or digest == last.get('refs'):
                continue
            new = offsite_copy_bundle(off, journal, client, rel, repo,
                                      digest, staging)
            copied += 1
            out.write(f'copied {client}/{new}\n')
            for old in sorted(mine):
                off.remove(off.path(client, old), directory=False)
                journal.append([off.entry('removed', old)])
                removed += 1
                out.write(f'removed {client}/{old} (superseded)\n')
        except OffsiteUnreachable:
            raise
        except (GitBackupError, OSError) as e:
            errors.append(f'{client}/{source}: {e}')
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return copied, removed, errors


def offsite_client(off, node, client, out):
    """One client's offsite run: copies, removals by prune's journal,
    indexes, and the snapshots lost here.  Returns (copied, removed,
    errors); OffsiteUnreachable stops the whole run."""
    state = offsite_state(node, client, off.remote)
    copied, removed, errors = offsite_snapshots(off, node, client, state,
                                                out)
    more = offsite_mirrors(off, node, client, state, out)
    copied, removed, errors = copied + more[0], removed + more[1], \
        errors + more[2]
    state = offsite_state(node, client, off.remote)
    staging = os.path.join(node.settings['data_dir'], client,
                           '.offsite-staging', core.new_request_id())
    os.makedirs(staging)
    try:
        errors += offsite_indexes(off, node, client, state, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    offsite_missing_alert(node, client, offsite_missing(node, client,
                                                        state))
    return copied, removed, errors


def offsite_missing_text(client, missing):
    return (f'{len(missing)} snapshot(s) or mirror(s) are on the offsite '
            f'remote but missing on this node, not removed by prune: '
            f'{", ".join(missing[:10])}{" ..." if len(missing) > 10 else ""}'
            f'; kept on the remote: restore it with `server.py restore '
            f'{client} SOURCE --from offsite --at SNAPSHOT`, or put the '
            f'client back whole with `server.py offsite --rebuild {client}` '
            f'(if it is to go: `server.py prune --snapshot {client} SOURCE '
            'SNAPSHOT`)')


def offsite_missing_alert(node, client, missing):
    """One mail when snapshots go missing here (again when more do), one
    when that is over (the Health record an outage uses, alerting at
    once)."""
    health = core.Health(os.path.join(node.state_dir,
                                      f'offsite-missing-{client}.json'),
                         node.config, 'server',
                         f'the node\'s own copy of {client}\'s snapshots')
    if missing:
        # Told once by mail and every time by `report`: not a cron mail a
        # night (the log has it at info level).
        core.problem(f'offsite: {offsite_missing_text(client, missing)}',
                     mail=False)
        if not set(missing) <= set(health.state.get('missing') or []):
            health.state['alerted'] = False     # more is lost: tell again
        health.state['missing'] = missing
        health.failed(offsite_missing_text(client, missing), 0)
    elif health.state.get('first_failure'):
        health.ok()


def offsite_health(node, off):
    return core.Health(os.path.join(node.state_dir, 'offsite-remote.json'),
                       node.config, 'server', f'offsite remote {off.remote}')


def offsite_command(node, out=sys.stdout):
    """Copy every client's new snapshots and changed mirrors to the
    remote, remove what prune removed here; return the errors (each item
    is tried, a failure does not stop the others; a remote that cannot be
    reached stops the run at once and is alerted after alert_after, like
    any outage)."""
    off = Offsite(node)
    core.make_dirs(node.state_dir)
    health = offsite_health(node, off)
    totals, errors = [0, 0], []
    try:
        off.reachable()
        for client in known_clients(node):
            if not os.path.isdir(os.path.join(node.settings['data_dir'],
                                              client)):
                continue    # configured, nothing stored yet
            with client_data_lock(node, client, 'offsite'):
                copied, removed, failed = offsite_client(off, node, client,
                                                         out)
            totals[0] += copied
            totals[1] += removed
            errors += failed
    except OffsiteUnreachable as e:
        health.failed(str(e), node.config.get_duration('server',
                                                       'alert_after'))
        # An outage: one mail after alert_after (the Health record), not
        # a cron mail a night; under -q it prints nothing.
        return [core.problem(f'offsite: {e}; nothing more tried this run '
                             '(the next run carries on)', mail=False)]
    health.ok()
    for error in errors:
        log.error('offsite: %s', error)
    log.info('offsite to %s: %d copied and verified, %d removed, %d '
             'error(s)', off.remote, totals[0], totals[1], len(errors))
    return errors


# -- reading the remote on its own ------------------------------------------

def offsite_clients(off):
    """The clients the remote holds (directories with a client's name)."""
    result = off.rclone('lsf', '--dirs-only', '--max-depth', '1',
                        off.remote, check=False)
    if result.returncode in RCLONE_NOT_FOUND:
        return []
    if result.returncode:
        raise core.CommandFailed(result.args, result.returncode,
                                 result.stderr)
    names = []
    for line in result.stdout.splitlines():
        try:
            names.append(check_client_name(line.rstrip('/')))
        except UsageError:
            continue
    return sorted(names)


def index_source(rel):
    """The source an index path belongs to (files/<source>/index.json,
    git/<path>.git/index.json), or None for any other path."""
    parts = rel.split('/')
    if len(parts) == 3 and parts[0] == 'files' and \
            SOURCE_NAME_RE.match(parts[1]) and parts[2] == OFFSITE_INDEX:
        return parts[1]
    if len(parts) >= 3 and parts[0] == 'git' and parts[-1] == OFFSITE_INDEX \
            and parts[-2].endswith('.git') and \
            all(core.NAME_RE.match(p) for p in parts[1:-1]):
        return 'git/' + '/'.join(parts[1:-1])[:-len('.git')]
    return None


def source_index_rel(source):
    if source.startswith('git/'):
        return f'{source}.git/{OFFSITE_INDEX}'
    return f'files/{source}/{OFFSITE_INDEX}'


def offsite_catalogue(off, client, source=None):
    """{source: index} of one client as the remote holds it (only that
    source if given).  An index that names another source than its path
    is skipped, loudly."""
    if source:
        if index_source(source_index_rel(source)) != source:
            raise UsageError(f'{clean_text(source)!r}: not a source name '
                             '(app, postgresdb, git/<path>)')
        rels = [source_index_rel(source)]
    else:
        result = off.rclone('lsf', '-R', '--files-only', '--include',
                            OFFSITE_INDEX, off.path(client), check=False)
        if result.returncode and result.returncode not in RCLONE_NOT_FOUND:
            raise core.CommandFailed(result.args, result.returncode,
                                     result.stderr)
        rels = [line for line in result.stdout.splitlines()
                if index_source(line)]
    catalogue = {}
    for rel in rels:
        index = off.read_json(client, rel)
        if index is None:
            continue
        if not isinstance(index, dict) or \
                index.get('source') != index_source(rel):
            log.warning('offsite: %s: not an index of %s; skipped',
                        off.path(client, rel), index_source(rel))
            continue
        catalogue[index['source']] = index
    return catalogue


def index_snapshot(index, name):
    for entry in index.get('snapshots') or []:
        if isinstance(entry, dict) and entry.get('snapshot') == name:
            return entry
    raise RestoreError(f'{index.get("source")} {name}: not in the offsite '
                       'index')


def offsite_fetch_into(off, client, source, entry, target_dir):
    """Download one snapshot into target_dir and prove every file against
    its manifest, and the manifest against the sha256 the index (or this
    node's journal) recorded.  Returns the manifest; raises OffsiteFailed
    naming what is damaged."""
    rel = f'files/{source}/{entry["snapshot"]}'
    os.makedirs(target_dir, exist_ok=True)
    off.rclone('copy', *off.options, off.path(client, rel), target_dir)
    problems = offsite_fetch_problems(target_dir, entry)
    if problems:
        raise OffsiteFailed(
            f'{off.path(client, rel)} is DAMAGED on the offsite remote '
            f'(fetched into {target_dir}): ' + '; '.join(problems) +
            '. Refusing to use it; `server.py verify --offsite` copies it '
            'again while this node still holds the snapshot')
    return read_json(os.path.join(target_dir, 'manifest.json'))


def offsite_fetch(node, client, source, snapshot, target_dir):
    """`offsite --fetch`: one snapshot from the remote into target_dir
    (absent or empty), proven as offsite_fetch_into does, with the
    manifest's sha256 this node journaled when it copied it, else the
    index's (a plain remote cannot swap manifest and files together
    unnoticed)."""
    check_client_name(client)
    if not SOURCE_NAME_RE.match(source or '') or \
            not STORED_NAME_RE.match(snapshot or ''):
        raise UsageError(f'not a source and snapshot name: {source!r} '
                         f'{snapshot!r} (see `server.py list`)')
    if os.path.exists(target_dir) and (not os.path.isdir(target_dir) or
                                       os.listdir(target_dir)):
        raise UsageError(f'{target_dir}: exists and is not an empty '
                         'directory')
    off = Offsite(node)
    rel = f'files/{source}/{snapshot}'
    entry = offsite_state(node, client, off.remote).get(rel)
    if not (entry or {}).get('manifest_sha256'):
        index = offsite_catalogue(off, client, source).get(source)
        entry = index_snapshot(index, snapshot) if index else {}
    manifest = offsite_fetch_into(off, client, source,
                                  {**entry, 'snapshot': snapshot}, target_dir)
    log.info('offsite: fetched %s/%s into %s; every sha256 matches its '
             'manifest', client, rel, target_dir)
    return manifest


def offsite_fetch_problems(target_dir, journal_entry):
    """What is wrong with a fetched snapshot directory ([] when nothing)."""
    manifest_path = os.path.join(target_dir, 'manifest.json')
    if not os.path.isfile(manifest_path):
        return ['no manifest.json (no such snapshot on the remote?)']
    recorded = journal_entry.get('manifest_sha256')
    if recorded and core.sha256_file(manifest_path)[0] != recorded:
        return ['manifest.json differs from the one this node copied']
    manifest = read_json(manifest_path)
    files = manifest.get('files') if isinstance(manifest, dict) else None
    if not isinstance(files, list):
        return ['manifest.json lists no files']
    problems, named = [], {'manifest.json'}
    for entry in files:
        name = entry.get('name') if isinstance(entry, dict) else None
        if not isinstance(name, str) or not core.NAME_RE.match(name):
            problems.append(f'bad entry {clean_text(entry)!r} in manifest')
            continue
        named.add(name)
        path = os.path.join(target_dir, name)
        if not os.path.isfile(path):
            problems.append(f'{name}: missing')
            continue
        digest, size = core.sha256_file(path)
        if digest != entry.get('sha256') or size != entry.get('size'):
            problems.append(f'{name}: sha256 {digest} size {size}, manifest '
                            f'says {entry.get("sha256")} size '
                            f'{entry.get("size")}')
    problems += [f'{name}: not in the manifest'
                 for name in sorted(set(os.listdir(target_dir)) - named)]
    return problems


BUNDLE_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.bundle$')


def offsite_fetch_bundle(off, client, index, name, scratch):
    """Download a mirror's bundle into scratch and check its sha256 and
    size against the index; returns its path, raises OffsiteFailed."""
    rel = f'{index["source"]}.git/{name}'
    bundle = os.path.join(scratch, name)
    off.rclone('copyto', off.path(client, rel), bundle)
    digest, size = core.sha256_file(bundle) if os.path.isfile(bundle) \
        else ('nothing', 0)
    if digest != index.get('sha256') or size != index.get('size'):
        raise OffsiteFailed(
            f'{off.path(client, rel)} is DAMAGED on the offsite remote: '
            f'sha256 {digest} ({size} bytes), its index says '
            f'{index.get("sha256")} ({index.get("size")} bytes). Refusing '
            'to use it; `server.py verify --offsite` copies it again while '
            'this node still holds the mirror')
    return bundle


def offsite_fetch_mirror(off, client, index, mirror, scratch):
    """A git mirror back from its newest bundle: the bundle's sha256
    checked against the index, then cloned into mirror (a bare repository
    with every ref, refs/preserved/* included).  Raises OffsiteFailed."""
    name = str(index.get('bundle'))
    if not BUNDLE_NAME_RE.match(name):
        raise OffsiteFailed(f'{index.get("source")}: the offsite index '
                            f'names no bundle ({clean_text(name)!r})')
    bundle = offsite_fetch_bundle(off, client, index, name, scratch)
    core.run([*core.git_program(), 'clone', '--quiet', '--mirror', '--',
              bundle, mirror])
    git(mirror, 'remote', 'remove', 'origin', check=False)
    os.unlink(bundle)
    return mirror


# -- rebuilding a node --------------------------------------------------------

def offsite_rebuild(node, only_client=None, out=sys.stdout):
    """`offsite --rebuild [CLIENT]`: every snapshot and mirror the remote
    holds of a client (or of every client) put back into data_dir,
    proven as a restore proves it, with the results journal when this
    node has none, and journaled as already offsite.  What is here
    already is left alone.  Returns the errors."""
    off = Offsite(node)
    off.reachable()
    clients = [check_client_name(only_client)] if only_client else \
        offsite_clients(off)
    errors = []
    for client in clients:
        catalogue = offsite_catalogue(off, client)
        if not catalogue:
            errors.append(f'{client}: nothing on {off.path(client)}')
            continue
        core.make_dirs(os.path.join(node.settings['data_dir'], client))
        with client_data_lock(node, client, 'offsite --rebuild'):
            errors += rebuild_client(off, node, client, catalogue, out)
        results = os.path.join(node.settings['data_dir'], client,
                               OFFSITE_RESULTS)
        if not os.path.exists(results):
            off.rclone('copyto', off.path(client, OFFSITE_RESULTS), results,
                       check=False)
    for error in errors:
        log.error('offsite --rebuild: %s', error)
    return errors


def rebuild_client(off, node, client, catalogue, out):
    """Every source of one client's catalogue put back; the errors."""
    errors = []
    for source, index in sorted(catalogue.items()):
        try:
            if index.get('kind') == 'git':
                rebuild_mirror(off, node, client, index, out)
            else:
                rebuild_source(off, node, client, source, index, out)
        except OffsiteUnreachable:
            raise
        except (GitBackupError, OSError) as e:
            errors.append(f'{client}/{source}: {e}')
    return errors


def rebuild_source(off, node, client, source, index, out):
    """Fetch every snapshot of one source not here into files/<source>/,
    each proven before it is renamed into place (oldest first)."""
    data = os.path.join(node.settings['data_dir'], client)
    top = os.path.join(data, 'files', source)
    journal = offsite_journal(node, client)
    for backup in index_backups(index, top, source, node.formats):
        if os.path.isdir(backup.path):
            continue
        entry = index_snapshot(index, backup.name)
        staging = os.path.join(data, 'files', '.incoming',
                               f'offsite-{core.new_request_id()}')
        try:
            offsite_fetch_into(off, client, source, entry, staging)
            core.make_dirs(top)
            os.rename(staging, backup.path)
            fsync_dir(top)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        journal.append([off.entry('copied', snapshot_rel(backup),
                                  bytes=backup.size, rebuilt=True,
                                  manifest_sha256=entry['manifest_sha256'])])
        out.write(f'rebuilt {client}/{snapshot_rel(backup)}\n')


def rebuild_mirror(off, node, client, index, out):
    """Clone a mirror back from its bundle, under a hidden name renamed
    into place, with the settings the git module gives its mirrors."""
    data = os.path.join(node.settings['data_dir'], client)
    rel = f'{index["source"]}.git'
    mirror = os.path.join(data, rel)
    if os.path.isdir(mirror):
        return
    parent = os.path.dirname(mirror)
    core.make_dirs(parent)
    tmp = os.path.join(parent, '.' + os.path.basename(mirror) + '.incoming')
    shutil.rmtree(tmp, ignore_errors=True)
    scratch = tempfile.mkdtemp(prefix='.offsite-rebuild-', dir=data)
    try:
        offsite_fetch_mirror(off, client, index, tmp, scratch)
        module = core.load_module(node.config.modules_dir('server'), 'git')
        for key, value in getattr(module.python, 'MIRROR_CONFIG', ()):
            git(tmp, 'config', key, value)
        os.rename(tmp, mirror)
        fsync_dir(parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    offsite_journal(node, client).append([off.entry(
        'copied', f'{rel}/{index["bundle"]}', refs=index.get('refs'),
        sha256=index.get('sha256'), bytes=index.get('size'), rebuilt=True)])
    out.write(f'rebuilt {client}/{rel}\n')


# -- checking the remote ------------------------------------------------------

def offsite_verify_command(node, only_client=None, out=sys.stdout):
    """`verify --offsite`: rclone check (cryptcheck) of every snapshot
    against the node's copy, every index read back and, within
    command_timeout, a download and re-hash of mirror bundles and of the
    snapshots only the remote still holds.  What is damaged or missing there is copied again while
    the node still holds it.  Mails problems; returns 0/1/2 like
    verify."""
    off = Offsite(node)
    off.reachable()
    clients = [check_client_name(only_client)] if only_client else \
        known_clients(node)
    deadline = time.monotonic() + off.timeout
    problems = []
    for client in clients:
        top = os.path.join(node.settings['data_dir'], client)
        if not os.path.isdir(top):
            continue    # nothing stored, nothing copied
        scratch = tempfile.mkdtemp(prefix='.offsite-verify-', dir=top)
        try:
            with client_data_lock(node, client, 'verify --offsite'):
                problems += verify_offsite_client(off, node, client, scratch,
                                                  deadline)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    status = max([level for level, _ in problems] or [OK])
    for level, message in problems:
        out.write(f'{STATUS_NAMES[level]}: {message}\n')
    summary = (f'verify --offsite of {off.remote}: {len(problems)} '
               f'problem(s): {STATUS_NAMES[status].upper()}')
    out.write(summary + '\n')
    log.info('%s', summary)
    if problems:
        core.mail_admins(node.config, 'server', f'gitbackup: {summary}',
                         '\n'.join(f'{STATUS_NAMES[level]}: {message}'
                                   for level, message in problems) +
                         '\n\n' + summary + '\n')
    return status


def verify_offsite_client(off, node, client, scratch, deadline):
    """verify --offsite of one client: [(level, message)]."""
    return (verify_offsite_snapshots(off, node, client) +
            verify_offsite_indexes(off, node, client, scratch) +
            verify_offsite_mirrors(off, node, client, scratch, deadline) +
            verify_offsite_kept(off, node, client, scratch, deadline))


def offsite_check_differences(off, local, remote):
    """{relative path: '*' differs, '+' missing there, '!' unreadable}
    from one one-way rclone check (cryptcheck) of local against remote."""
    result = off.rclone(*off.check_args(), '--one-way', '--combined', '-',
                        '--exclude', '.*/**', '--exclude', '.*', local,
                        remote, check=False)
    found = {}
    for line in result.stdout.splitlines():
        if len(line) > 2 and line[0] in '*+!' and line[1] == ' ':
            found[line[2:]] = line[0]
    if result.returncode and not found and \
            result.returncode not in RCLONE_NOT_FOUND:
        raise OffsiteFailed(f'rclone {off.check_args()[0]} {remote} '
                            f'failed: {clean_text(result.stderr, 500)}')
    return found


def verify_offsite_snapshots(off, node, client):
    """Check the snapshots journaled as offsite against the node's copy;
    copy again those damaged or missing there.  [(level, message)]:
    critical when the copy could not be repaired, warning when it was."""
    state = offsite_state(node, client, off.remote)
    local = local_snapshots(node, client)
    files = os.path.join(node.settings['data_dir'], client, 'files')
    if not os.path.isdir(files):
        return []
    found = offsite_check_differences(off, files, off.path(client, 'files'))
    damaged = {}
    for path, sign in found.items():
        rel = 'files/' + '/'.join(path.split('/')[:2])
        if rel in local and state.get(rel, {}).get('event') == 'copied':
            damaged.setdefault(rel, []).append(
                f'{path.split("/")[-1]} '
                f'{ {"*": "differs", "+": "missing", "!": "unreadable"}[sign]}')
    problems = []
    journal = offsite_journal(node, client)
    for rel, what in sorted(damaged.items()):
        text = f'{off.path(client, rel)}: {", ".join(what)} on the remote'
        try:
            off.remove(off.path(client, rel), directory=True)
            offsite_copy_snapshot(off, journal, client, local[rel])
        except (GitBackupError, OSError) as e:
            problems.append((CRITICAL, f'{text}; copying it again failed: '
                             f'{e}'))
            continue
        problems.append((WARNING, f'{text}; copied again from the node and '
                         'verified'))
    return problems


def verify_offsite_indexes(off, node, client, scratch):
    """Read back every index (and the results journal) there against the
    sha256 journaled when it was written; write again what differs."""
    state = offsite_state(node, client, off.remote)
    damaged = []
    for rel, entry in sorted(state.items()):
        if not (rel.endswith('/' + OFFSITE_INDEX) or
                rel == OFFSITE_RESULTS) or not entry.get('sha256'):
            continue
        result = off.rclone('cat', off.path(client, rel), check=False)
        if result.returncode or hashlib.sha256(result.stdout.encode(
                'utf-8', 'surrogateescape')).hexdigest() != entry['sha256']:
            damaged.append(rel)
    if not damaged:
        return []
    kept = {k: v for k, v in state.items() if k not in damaged}
    errors = offsite_indexes(off, node, client, kept, scratch)
    return [(CRITICAL if any(rel in e for e in errors) else WARNING,
             f'{off.path(client, rel)}: differs on the remote; ' +
             ('writing it again failed' if any(rel in e for e in errors)
              else 'written again and read back')) for rel in damaged]


def verify_offsite_mirrors(off, node, client, scratch, deadline):
    """Download each mirror's newest bundle there and re-hash it, in a
    random order while time is left (a sample when there is not time
    for all); a damaged or missing one is replaced by a new bundle while
    the mirror is here."""
    state = offsite_state(node, client, off.remote)
    mirrors = client_mirrors(node, client)
    journal = offsite_journal(node, client)
    problems = []
    order = sorted((mirror[:-len('.git')], entry) for mirror, entry in
                   newest_bundles(state).items())
    random.shuffle(order)
    for source, entry in order:
        if time.monotonic() > deadline:
            log.info('verify --offsite: out of time before %s/%s', client,
                     source)
            break
        index = {'source': source, 'bundle': entry['path'].rsplit('/', 1)[1],
                 'sha256': entry.get('sha256'), 'size': entry.get('bytes')}
        try:
            os.unlink(offsite_fetch_bundle(off, client, index,
                                           index['bundle'], scratch))
            continue
        except OffsiteUnreachable:
            raise
        except (GitBackupError, OSError) as e:
            text = str(e)
        if source not in mirrors:
            problems.append((CRITICAL, f'{text}; the node no longer holds '
                             'the mirror to copy it again'))
            continue
        try:
            staging = os.path.join(scratch, core.new_request_id())
            offsite_copy_bundle(off, journal, client, source[len('git/'):],
                                mirrors[source], mirror_refs_digest(
                                    mirrors[source]), staging)
            off.remove(off.path(client, entry['path']), directory=False)
            journal.append([off.entry('removed', entry['path'])])
        except (GitBackupError, OSError) as e:
            problems.append((CRITICAL, f'{text}; a new bundle failed: {e}'))
            continue
        problems.append((WARNING, f'{text}; replaced by a new bundle'))
    return problems


def verify_offsite_kept(off, node, client, scratch, deadline):
    """The snapshots only the remote holds (lost here): downloaded and
    re-hashed in a random order while time is left.  Nothing can repair
    them: critical."""
    state = offsite_state(node, client, off.remote)
    problems = []
    missing = offsite_missing(node, client, state)
    random.shuffle(missing)
    for rel in missing:
        match = SNAPSHOT_REL_RE.match(rel)
        if not match:
            continue
        if time.monotonic() > deadline:
            log.info('verify --offsite: out of time before %s/%s', client,
                     rel)
            break
        target = os.path.join(scratch, 'kept')
        try:
            offsite_fetch_into(off, client, match.group(1),
                               {**state[rel], 'snapshot': match.group(2)},
                               target)
        except OffsiteUnreachable:
            raise
        except (GitBackupError, OSError) as e:
            problems.append((CRITICAL, f'{e} (the node no longer holds it)'))
        finally:
            shutil.rmtree(target, ignore_errors=True)
    return problems


def offsite_check_connection(node, out):
    """`check --connect`: list the remote, then write, read back and
    delete a small file in a scratch path there.  [] or the problem."""
    if not node.config.has('offsite'):
        return []
    fix = (f'test it with `rclone --config <rclone_config> lsd <remote>` '
           f'and correct [offsite] remote / rclone_config in '
           f'{node.config.path} or the remote in rclone.conf')
    what = 'offsite remote'
    try:
        off = Offsite(node)
        what = f'offsite remote {off.remote}'
        off.reachable()
        with tempfile.TemporaryDirectory() as staging:
            rel = f'check-{core.new_request_id()}'
            off.put_text('.gitbackup-check', rel,
                         f'gitbackup check --connect {core.isotime()}\n',
                         staging)
            off.remove(off.path('.gitbackup-check', rel), directory=False)
            off.rclone('rmdir', off.path('.gitbackup-check'), check=False)
    except GitBackupError as e:
        return core.connection_line(out, what, f'{clean_text(e, 500)}; '
                                    f'{fix}')
    return core.connection_line(out, what + ' (list, write, read, delete)',
                                None)


# -- what `report` says of the offsite copy -----------------------------------

def offsite_lag(node, client, now):
    """For `report`: the client's snapshots not yet verified offsite, the
    newest of them and its age, the age of the oldest (how far the
    offsite copy is behind), and what the remote holds that this node
    lost (`missing`).  None when no [offsite] is configured."""
    if not node.config.has('offsite'):
        return None
    remote = node.config.section('offsite')['remote'].strip()
    state = offsite_state(node, client, remote)
    copied = [e for e in state.values() if e.get('event') == 'copied']
    pending = sorted((b for backups in stored_backups(node, client).values()
                      for b in backups if b.good and b.time and
                      state.get(snapshot_rel(b), {}).get('event') !=
                      'copied'), key=StoredBackup.sort_key)

    def age(backup):
        return int(max((now - backup.time).total_seconds(), 0))
    return {'remote': remote, 'pending': len(pending),
            'newest_pending': snapshot_rel(pending[-1]) if pending else None,
            'newest_pending_age_seconds': age(pending[-1]) if pending
            else None,
            'lag_seconds': age(pending[0]) if pending else 0,
            'last_copy': max((e.get('time') for e in copied), default=None),
            'missing': offsite_missing(node, client, state)}


def offsite_lost_sources(lag):
    """The sources (git/<path> for a mirror) with something the remote
    keeps that this node lost (lag: offsite_lag's answer or None)."""
    lost = set()
    for rel in (lag or {}).get('missing') or []:
        match = SNAPSHOT_REL_RE.match(rel)
        lost.add(match.group(1) if match else rel[:-len('.git')])
    return lost


def offsite_cli(node, args, out=sys.stdout):
    """`server.py offsite [--fetch ... | --rebuild [CLIENT]]`; -q prints
    nothing but problems (they go to the log and stderr)."""
    if args.fetch:
        offsite_fetch(node, *args.fetch)
        return 0
    if args.quiet:
        out = open(os.devnull, 'w')
    if args.rebuild is not None:
        work = lambda: offsite_rebuild(node, args.rebuild or None, out)  # noqa: E731
    else:
        work = lambda: offsite_command(node, out)  # noqa: E731
    return core.exclusive(node.settings['log_dir'], 'offsite',
                          lambda: 1 if work() else 0)


# ==========================================================================
# 6. Give back: list, restore, drill
#
# A backup is only worth its restore.  `list` shows what a node holds under
# the names `restore` and `drill` accept; `restore` gets any of it back
# with one command (hashes checked before anything is written); `drill`
# restores the newest snapshot of every series into a scratch directory
# and proves it against what the client recorded when it made it.

# `restore --at`: a snapshot name, or ISO 8601 (UTC unless an offset).
AT_COMPACT_RE = re.compile(r'^[0-9]{8}T[0-9]{6}Z$')
AT_DATE_RE = re.compile(r'^[0-9]{4}-[0-9]{2}-[0-9]{2}$')
GIT_SNAPSHOT = 'mirror'       # the one "snapshot" of a git mirror


def list_snapshots(node, client, source=None):
    """The `list` entries of one client: every good snapshot, oldest
    first per source, then its git mirrors."""
    verify, drills = last_outcomes(node, client)
    entries = []
    for name, backups in stored_backups(node, client).items():
        if source and name != source:
            continue
        good = [b for b in backups if b.good and b.time]
        chains = snapshot_chains(good)
        for b in good:
            base = chains[b.path].base
            wanted = b.manifest.get('base')
            entries.append({
                'client': client, 'source': name, 'snapshot': b.name,
                'time': core.isotime(b.time), 'kind': snapshot_kind(b),
                'level': manifest_level(b.manifest),
                'base': base.name if base else None,
                # The client request id the increment builds on; the chain
                # is broken when any link down to its full is not stored.
                'base_request': wanted,
                'chain_broken': not chains[b.path].whole,
                'request_id': b.manifest.get('request_id'),
                'size': b.size,
                'files': [{'name': f.get('name'), 'size': f.get('size'),
                           'sha256': f.get('sha256')}
                          for f in b.manifest['files'] if isinstance(f, dict)],
                'verify': verify_outcome(verify, b.path, b.time),
                'drill': drills.get((name, b.name))})
    for name, repo in client_mirrors(node, client).items():
        if source and name != source:
            continue
        entries.append({
            'client': client, 'source': name, 'snapshot': GIT_SNAPSHOT,
            'time': core.isotime(mirror_time(repo)) if mirror_time(repo)
            else None, 'kind': 'git', 'level': 0, 'base': None,
            'base_request': None, 'chain_broken': False, 'request_id': None, 'size': core.tree_size(repo), 'files': [],
            'verify': verify_outcome(verify, repo, mirror_time(repo)),
            'drill': drills.get((name, GIT_SNAPSHOT))})
    return entries


def offsite_list_entries(node, client=None, source=None):
    """`list --from offsite`: the remote's snapshots and mirrors under
    the names `list` and `restore` use, read from its indexes alone (this
    node may hold nothing)."""
    off = Offsite(node)
    clients = [check_client_name(client)] if client else offsite_clients(off)
    entries = []
    for name in clients:
        for src, index in sorted(offsite_catalogue(off, name, source).items()):
            if index.get('kind') == 'git':
                entries.append(offsite_list_entry(name, src, {
                    'snapshot': GIT_SNAPSHOT, 'time': index.get('time'),
                    'kind': 'git', 'size': index.get('size'),
                    'files': [{k: index.get(v) for k, v in (
                        ('name', 'bundle'), ('size', 'size'),
                        ('sha256', 'sha256'))}]}))
                continue
            entries += [offsite_list_entry(name, src, e)
                        for e in index.get('snapshots') or []
                        if isinstance(e, dict) and
                        STORED_NAME_RE.match(str(e.get('snapshot')))]
    return entries


def offsite_list_entry(client, source, e):
    """One `list` entry from an index entry: read from the remote, so
    every field is checked or cleaned before it is printed."""
    manifest = e.get('manifest') if isinstance(e.get('manifest'), dict) \
        else {}
    level = manifest_level(manifest)
    base = e.get('base') if STORED_NAME_RE.match(str(e.get('base'))) \
        else None
    kind = e.get('kind') if e.get('kind') in ('full', 'incremental',
                                                'file', 'git') else '?'
    return {'client': client, 'source': source, 'snapshot': e['snapshot'],
            'time': clean_text(e.get('time') or '', 40) or None,
            'kind': kind, 'level': level, 'base': base,
            'base_request': manifest.get('base'),
            'chain_broken': bool(level) and not base,
            'request_id': manifest.get('request_id'),
            'size': e.get('size') if isinstance(e.get('size'), int) else 0,
            'files': [f for f in e.get('files') or [] if isinstance(f, dict)],
            'verify': None, 'drill': None}


def list_text(entries):
    """The `list` table, each column as wide as its widest cell: a long
    kind (an increment and its base) or a snapshot name with a .N suffix
    never pushes the columns after it out of line."""
    rows = [('CLIENT', 'SOURCE', 'SNAPSHOT', 'KIND', 'SIZE', 'VERIFY',
             'DRILL', 'FILES')]
    for e in entries:
        kind = e['kind'] + (f' <{e["base"]}' if e['base'] else
                            ' <MISSING BASE' if e['chain_broken'] else '')
        rows.append((
            clean_text(e['client']), clean_text(e['source']),
            clean_text(e['snapshot']), kind, core.human_size(e['size']),
            (e['verify'] or {}).get('outcome', '-'),
            (e['drill'] or {}).get('outcome', '-'),
            ' '.join(clean_text(f['name']) for f in e['files'])))
    widths = [max(len(row[i]) for row in rows) for i in range(7)]
    return ''.join('  '.join([cell.rjust(widths[i]) if i == 4 else
                              cell.ljust(widths[i])
                              for i, cell in enumerate(row[:7])] +
                             [row[7]]).rstrip() + '\n' for row in rows)


def list_command(node, client=None, source=None, fmt='text',
                 out=sys.stdout, origin='local'):
    if origin == 'offsite':
        entries = offsite_list_entries(node, client, source)
    else:
        clients = [check_client_name(client)] if client else \
            known_clients(node)
        entries = []
        for name in clients:
            entries += list_snapshots(node, name, source)
    if fmt == 'json':
        out.write(json.dumps(entries, indent=1, sort_keys=True) + '\n')
    else:
        out.write(list_text(entries))
    return 0

# -- browse: find, ls, diff -------------------------------------------------
# What a snapshot holds, read from what the node already has, nothing
# extracted: an archive's listing and, for an increment, its directory
# records (modules/_tarlisting.py: ONE listing model, also what the drill
# compares a restored tree with); any other snapshot's manifest.


def link_paths(backup):
    """(listing, archive) paths of an archive snapshot."""
    archive = os.path.join(backup.path, archive_entry(backup)['name'])
    return archive + tarlisting.LISTING_SUFFIX, archive


class SourceTrees:
    """The trees the snapshots of one source restore, each computed once
    from its base's tree: an archive's by applying its link of the chain
    (tarlisting.apply_link), any other snapshot's from its manifest."""

    def __init__(self, node, backups):
        self.backups = backups
        self.good = [b for b in backups if b.good and b.time]
        self.timeout = node.config.get_duration('server', 'command_timeout')
        self.formats = node.formats
        self.done = {}

    def tree(self, backup):
        """({path: Entry}, {paths changed in this snapshot}).  RestoreError
        for a broken chain, ListingError for a missing or bad listing."""
        if backup.path not in self.done:
            if archive_entry(backup):
                self.archive_tree(backup)
            else:
                self.done[backup.path] = self.manifest_tree(backup)
        return self.done[backup.path]

    def archive_tree(self, backup):
        tree = {}
        for n, link in enumerate(chain_to_extract(self.good, backup)):
            if link.path in self.done:
                tree = self.done[link.path][0]
                continue
            listing, archive = link_paths(link)
            self.done[link.path] = tarlisting.apply_stored_link(
                tree, listing, archive, link.name, n == 0, self.timeout)
            tree = self.done[link.path][0]

    def keep_only(self, backup):
        """Forget every tree but backup's, to walk a source's snapshots in
        order in the memory of two trees (a forgotten base is read again
        if a later snapshot needs it)."""
        self.done = {backup.path: self.done[backup.path]} \
            if backup.path in self.done else {}

    def manifest_tree(self, backup):
        """The stored files as a flat tree; changed unless the previous
        snapshot of the series stored the same bytes under the name."""
        before = [b for b in self.good if b.series == backup.series and
                  b.sort_key() < backup.sort_key()]
        old = {f.get('name'): f.get('sha256') for f in
               (before[-1].manifest['files'] if before else [])
               if isinstance(f, dict)}
        tree, changed = {}, set()
        for f in backup.manifest['files']:
            name = f.get('name') if isinstance(f, dict) else None
            if not isinstance(name, str) or self.formats.is_companion(name):
                continue
            tree[name] = tarlisting.Entry(
                path=name, kind='file', size=f.get('size'),
                snapshot=backup.name)
            if old.get(name) != f.get('sha256'):
                changed.add(name)
        return tree, changed


def browse_path(path):
    """PATH of ls, restore --path: relative to the source's root."""
    found = tarlisting.member_path('./' + (path or '').strip('/'))
    if found is None:
        raise UsageError(f'{clean_text(path)!r}: want a path inside the '
                         'backup, e.g. www/uploads')
    return found


def nearest_snapshot_holding(node, client, source, backup, path):
    """The name of the snapshot of source nearest in time to backup whose
    restored tree holds path (a file or a directory), or None."""
    backups = stored_backups(node, client).get(source) or []
    trees = SourceTrees(node, backups)
    holding = []
    for other in trees.good:
        try:
            if browse_path(path) in trees.tree(other)[0]:
                holding.append(other)
        except (GitBackupError, tarlisting.ListingError, OSError):
            continue
        trees.keep_only(other)
    if not holding:
        return None
    return min(holding, key=lambda b: (
        abs((b.time - backup.time).total_seconds()), b.sort_key())).name


def missing_path_error(node, client, source, backup, path):
    """The error of a restore or ls asking for a path the snapshot does
    not hold: it names the nearest snapshot that does."""
    nearest = nearest_snapshot_holding(node, client, source, backup, path)
    return RestoreError(
        f'{source} {backup.name} holds no {clean_text(path)!r}; ' + (
            f'the nearest snapshot that does is {nearest} (--at {nearest})'
            if nearest else 'no snapshot of it does (see `server.py find`)'))


def find_matches(node, client, pattern, source=None):
    """(matches, problems): every snapshot in which a path matching the
    shell pattern (against the path and its base name) exists."""
    pattern = pattern.strip('/')
    pattern = pattern[2:] if pattern.startswith('./') else pattern
    matches, problems = [], []
    for name, backups in stored_backups(node, client).items():
        if source and name != source:
            continue
        trees = SourceTrees(node, backups)
        for backup in trees.good:
            try:
                tree, changed = trees.tree(backup)
            except (GitBackupError, tarlisting.ListingError, OSError) as e:
                problems.append(f'{name} {backup.name}: {e}')
                continue
            trees.keep_only(backup)
            for path in sorted(tree):
                if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(
                        path.rpartition('/')[2], pattern):
                    matches.append({**tree[path].as_dict(), 'source': name,
                                    'snapshot': backup.name,
                                    'changed': path in changed})
    return matches, problems


def browse_json(rows, out):
    out.write(json.dumps(rows, indent=1, sort_keys=True) + '\n')


def shown(name):
    """A name from a listing on a terminal: escaped as tar shows it."""
    return tarlisting.escape_name(str(name))


def entry_text(row):
    """One path as ls and find print it (names cleaned for a terminal)."""
    size = '-' if row['size'] is None else str(row['size'])
    target = f' -> {shown(row["target"])}' if row.get('target') else ''
    return (f'{row["type"]:<5} {row["mode"] or "-":>4} '
            f'{shown(row["owner"] or "-"):<14} {size:>10} '
            f'{row["mtime"] or "-":<20} {shown(row["path"])}{target}')


def find_command(node, client, words, fmt='text', out=sys.stdout):
    """server.py find CLIENT [SOURCE] PATTERN: 0 found, 1 nothing found or
    a snapshot that could not be read."""
    if len(words) not in (1, 2):
        raise UsageError('find: give CLIENT [SOURCE] PATTERN')
    source, pattern = (None, *words) if len(words) == 1 else words
    matches, problems = find_matches(node, check_client_name(client),
                                     pattern, source)
    for problem in problems:
        log.error('find: %s', clean_text(problem))
    if fmt == 'json':
        browse_json(matches, out)
    else:
        for row in matches:
            out.write(f'{row["source"]} {row["snapshot"]} '
                      f'{"changed" if row["changed"] else "same   "} '
                      f'{entry_text(row)}\n')
    return 1 if problems or not matches else 0


def source_trees(node, client, source):
    """SourceTrees of one source, or a RestoreError if nothing is stored."""
    backups = stored_backups(node, check_client_name(client)).get(source)
    if not backups:
        raise RestoreError(f'nothing stored for {client} {source} (see '
                           '`server.py list`)')
    return SourceTrees(node, backups)


def tree_at(trees, source, at):
    """(backup, tree) of the snapshot --at picks (default newest)."""
    backup = choose_snapshot(trees.backups, source, at)
    try:
        return backup, trees.tree(backup)[0]
    except (tarlisting.ListingError, OSError) as e:
        raise RestoreError(f'{source} {backup.name}: {e}') from None


def ls_command(node, client, source, at=None, path=None, fmt='text',
               out=sys.stdout):
    """server.py ls: the tree the chain restores at --at, below PATH."""
    backup, tree = tree_at(source_trees(node, client, source), source, at)
    top = browse_path(path) if path else ''
    if top and top not in tree:
        raise missing_path_error(node, client, source, backup, path)
    rows = [tree[p].as_dict() for p in sorted(tree)
            if not top or p == top or p.startswith(top + '/')]
    if fmt == 'json':
        browse_json(rows, out)
    else:
        out.write(f'# {client} {source} {backup.name}: {len(rows)} '
                  'entries\n' + ''.join(entry_text(r) + '\n' for r in rows))
    return 0


def diff_command(node, client, source, snap_a, snap_b, fmt='text',
                 out=sys.stdout):
    """server.py diff: + added, - removed, M changed from A to B."""
    trees = source_trees(node, client, source)
    a, old = tree_at(trees, source, snap_a)
    b, new = tree_at(trees, source, snap_b)
    rows = []
    for path in sorted(set(old) | set(new)):
        change = '+' if path not in old else '-' if path not in new else \
            'M' if not old[path].same_content(new[path]) else None
        if change:
            rows.append({'change': change, **(new.get(path) or
                                              old[path]).as_dict()})
    if fmt == 'json':
        browse_json(rows, out)
    else:
        out.write(f'# {client} {source} {a.name} -> {b.name}\n' + ''.join(
            f'{r["change"]} {shown(r["path"])}\n' for r in rows))
    return 0


# -- restore ----------------------------------------------------------------


def parse_at(text):
    """TIME of `restore --at` -> aware datetime (a bare date: the end of
    that day, UTC unless an offset is given)."""
    try:
        if AT_COMPACT_RE.match(text):
            return datetime.datetime.strptime(
                text, core.TIMESTAMP_FORMAT).replace(tzinfo=UTC)
        if AT_DATE_RE.match(text):
            day = datetime.date.fromisoformat(text)
            return datetime.datetime.combine(
                day, datetime.time.max).replace(tzinfo=UTC)
        when = datetime.datetime.fromisoformat(
            re.sub(r'[zZ]$', '+00:00', text))
    except ValueError:
        raise UsageError(f'--at {clean_text(text)!r}: not a snapshot name '
                         'nor an ISO date/time (2026-11-20, '
                         '2026-11-20T13:00Z, 20261120T130000Z)') from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def choose_snapshot(backups, source, at=None, file=None):
    """The newest good snapshot at or before `at` (a snapshot name or a
    time), holding `file` if given."""
    good = [b for b in backups if b.good and b.time]
    if file:
        good = [b for b in good if any(
            isinstance(f, dict) and f.get('name') == file
            for f in b.manifest['files'])]
    if at and any(b.name == at for b in backups):
        chosen = [b for b in good if b.name == at]
        if not chosen:
            raise RestoreError(f'{source} {at}: no readable manifest'
                               + (f' or no file {file}' if file else ''))
        return chosen[0]
    if at:
        limit = parse_at(at)
        good = [b for b in good if b.time <= limit]
    if not good:
        raise RestoreError(f'no snapshot of {source}' +
                           (f' holding {file}' if file else '') +
                           (f' at or before {at}' if at else '') +
                           ' on this node (see `server.py list`)')
    return good[-1]


def check_hashes(backups, names, force):
    """Re-hash (streaming) every file a restore will read, before it writes
    anything; a mismatch is refused unless force."""
    for backup in backups:
        for entry in backup.manifest['files']:
            if not isinstance(entry, dict) or (
                    names is not None and entry.get('name') not in names):
                continue
            path = os.path.join(backup.path, str(entry.get('name')))
            try:
                digest, size = core.sha256_file(path)
            except OSError as e:
                raise RestoreError(f'{path}: cannot read: {e}') from None
            if digest == entry.get('sha256') and size == entry.get('size'):
                continue
            message = (f'{path}: DAMAGED: sha256 {digest} ({size} bytes), '
                       f'the manifest says {entry.get("sha256")} '
                       f'({entry.get("size")} bytes)')
            if not force:
                raise RestoreError(message + '; refusing to restore it '
                                   '(--force restores it anyway)')
            log.error('%s; restoring it anyway (--force)', message)


def prepare_target(directory):
    """DIR may exist if empty, else it is created; never written into
    when it holds anything."""
    check_target(directory)
    if not os.path.lexists(directory):
        os.makedirs(directory)
    return os.path.abspath(directory)


def check_target(directory):
    """--to DIR: absent, or an empty directory (not a symlink to one)."""
    if os.path.lexists(directory):
        if not os.path.isdir(directory) or os.path.islink(directory):
            raise RestoreError(f'{directory}: exists and is not a directory')
        if os.listdir(directory):
            raise RestoreError(f'{directory}: not empty; refusing to '
                               'restore into it')
    return os.path.abspath(directory)


def member_path(path):
    """--path PATH -> its name in the archive (fs archives are made with
    `-C DIR .`), as bytes; no absolute paths, no '..'."""
    rel = os.path.normpath(path.strip('/'))
    if not path.strip('/') or rel in ('.', '..') or rel.startswith('../'):
        raise UsageError(f'--path {clean_text(path)!r}: want a file or '
                         'directory inside the backup, e.g. --path '
                         'www/uploads')
    return os.fsencode(rel)


def check_same_owner(target):
    """--same-owner restores owners, setuid files and device nodes: only
    root may, and only into a directory root owns (nobody else can then
    swap what lies under it while it is written)."""
    if os.geteuid() != 0:
        raise UsageError('--same-owner: only root restores owners, setuid '
                         'files and device nodes (use --stdout | ssh '
                         'root@client tar -x ... to restore them there)')
    existing = target
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    st = os.lstat(existing)
    if st.st_uid != 0 or not stat.S_ISDIR(st.st_mode):
        raise UsageError(f'--same-owner: {existing} is not a directory root '
                         'owns; restore into one that is')


def stream_file(path, out):
    """Copy a file to a binary stream in chunks (never whole in memory)."""
    with open(path, 'rb') as f:
        shutil.copyfileobj(f, out, core.CHUNK)
    out.flush()


def chain_archives(chain):
    """The archive paths of a chain, full first."""
    paths = []
    for backup in chain:
        entry = archive_entry(backup)
        if entry is None:
            raise RestoreError(f'{backup.path}: no archive in this snapshot')
        paths.append(os.path.join(backup.path, entry['name']))
    return paths


def restore_bounds(node, archives, space_path):
    """Size (what the links' listings declare, times a margin), the
    free-space floor and command_timeout, for one restore or drill."""
    declared = []
    for path in archives:
        listing = path + fs_archive.LISTING_SUFFIX
        try:
            entries = tarlisting.parse_listing(listing)
        except (OSError, ValueError):
            declared.append(None)
            continue
        declared.append((sum(e.size or 0 for e in entries
                             if isinstance(e.size, int)), len(entries)))
    stored = [os.path.getsize(p) for p in archives]
    return fs_archive.Bounds(
        fs_archive.size_bound(declared, stored),
        node.config.get_size('server', 'free_space_floor'),
        time.monotonic() + node.config.get_duration('server',
                                                    'command_timeout'),
        space_path)


def restore_tree(node, archives, directory, paths=(), same_owner=False):
    """The one safe extraction into directory (fs_archive.restore_tree),
    within restore_bounds; its warnings logged.  Wrap in chain_errors."""
    done = fs_archive.restore_tree(archives, directory, paths, same_owner,
                                   restore_bounds(node, archives, directory))
    for warning in done.warnings:
        log.warning('%s', clean_text(warning, 2000))
    return done


@contextlib.contextmanager
def chain_errors(node, client, backup):
    """A refused chain, a bound hit or a path the snapshot lacks, as the
    RestoreError that says which."""
    try:
        yield
    except fs_archive.PathNotHeld as e:
        raise path_not_held(node, client, backup, e) from None
    except (fs_archive.ChainRefused, fs_archive.TarFailed) as e:
        raise RestoreError(f'refused: {clean_text(str(e), 1000)}') from None
    except fs_archive.BoundExceeded as e:
        raise RestoreError(f'stopped: {e}') from None


class PathNotHeldError(RestoreError):
    """restore --path named what the snapshot does not hold (.paths: the
    archive names, bytes); nothing was written."""

    def __init__(self, message, paths):
        super().__init__(message)
        self.paths = paths


def path_not_held(node, client, backup, error):
    """The error for --path names a snapshot does not hold, with a hint
    where they are (path_hint)."""
    hint = path_hint(node, client, backup, error.paths)
    return PathNotHeldError(
        f'{backup.source} {backup.name}: {error}' + (
            f' ({hint})' if hint else ''), error.paths)


def path_hint(node, client, backup, paths):
    """Where the paths a snapshot lacks can be found (e.g. the nearest
    snapshot that holds them, from the listings), or ''."""
    return ''


def move_into_place(scratch_path, target):
    """The restored tree replaces the (absent or empty) target in one
    rename; where that cannot be (a mount point), its entries move."""
    try:
        os.rename(scratch_path, target)
        return
    except OSError:
        pass
    os.makedirs(target, exist_ok=True)
    st = os.stat(scratch_path)
    os.chmod(scratch_path, 0o700)     # its entries must be movable
    for name in os.listdir(scratch_path):
        os.rename(os.path.join(scratch_path, name),
                  os.path.join(target, name))
    os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def restore_archive(node, client, backups, backup, args, out):
    """A directory backup: its chain judged whole, then extracted into
    --to DIR (through a scratch directory beside it, moved into place),
    or written to stdout as one tar stream of the restored tree."""
    chain = chain_to_extract(backups, backup)
    check_hashes(chain, None, args.force)
    check_paths_held(node, client, backups, backup, args.path)
    archives = chain_archives(chain)
    paths = [member_path(p) for p in args.path or []]
    if args.stdout:
        try:
            with chain_errors(node, client, backup):
                fs_archive.restore_stream(
                    archives, out.write, paths,
                    restore_bounds(node, archives, None))
            out.flush()
        except BrokenPipeError:
            raise RestoreError('the stream\'s reader left before its end: '
                               'nothing complete was restored') from None
        return
    target = check_target(args.to)
    if args.same_owner:
        check_same_owner(target)
    # Beside DIR, so that one rename puts the tree in place; inside an
    # existing DIR whose parent the restoring account may not write.
    parent = os.path.dirname(target)
    if os.path.isdir(target) and os.path.isdir(parent) and \
            not os.access(parent, os.W_OK | os.X_OK):
        parent = target
    with scratch(node, parent, 'restore') as path:
        tree = scratch_tree(path)
        with chain_errors(node, client, backup):
            restore_tree(node, archives, tree, paths, args.same_owner)
        core.pause_point('restore:extracted')
        move_into_place(tree, target)


def check_paths_held(node, client, backups, backup, paths):
    """restore --path: every path must be in the tree the snapshot
    restores, else an error naming the nearest snapshot that holds it,
    before anything is written.  A snapshot whose listings cannot say is
    left to the extraction."""
    paths = [paths] if isinstance(paths, str) else list(paths or [])
    if not paths:
        return
    try:
        tree = SourceTrees(node, backups).tree(backup)[0]
    except (GitBackupError, tarlisting.ListingError, OSError) as e:
        log.info('restore --path: %s: not checked against the listings: '
                 '%s', backup.name, clean_text(e))
        return
    for path in paths:
        if browse_path(path) not in tree:
            raise missing_path_error(node, client, backup.source, backup,
                                     path)


def restore_file(backup, name, args, out):
    """One stored file (a dump, globals.sql, any file) to stdout or DIR;
    in DIR it keeps its stored mode, never more than 0640 (a dump or
    globals.sql holds secrets: 0600 stays 0600)."""
    check_hashes([backup], {name}, args.force)
    path = os.path.join(backup.path, name)
    if args.stdout:
        stream_file(path, out)
        return
    target = os.path.join(prepare_target(args.to), name)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with open(path, 'rb') as f, os.fdopen(fd, 'wb') as w:
        shutil.copyfileobj(f, w, core.CHUNK)
    os.chmod(target, stat.S_IMODE(os.stat(path).st_mode) & 0o640)


def git_safe(mirror):
    """git options that let any account (root) read a mirror it does not
    own: without them git >= 2.35.2 refuses with "dubious ownership"."""
    return [*core.git_program(), '-c', f'safe.directory={mirror}']


def restore_git(node, client, mirror, args, out):
    """A mirror: --to DIR clones it with every ref (refs/preserved/*
    included: --mirror copies all of refs/), --stdout writes a bundle.
    With --at, the refs are those the mirror had then (mirror_refs_then)."""
    then = mirror_refs_then(node, mirror, args.at) \
        if args.at and args.at != GIT_SNAPSHOT else None
    if args.stdout and then is None:
        out.flush()
        core.run([*git_safe(mirror), f'--git-dir={mirror}', 'bundle',
                  'create', '-', '--all'], stdout=out.fileno(), text=False)
        return
    scratch = None if args.to else tempfile.mkdtemp(
        prefix=f'{SCRATCH_PREFIX}restore-',
        dir=core.make_dirs(os.path.join(node.settings['data_dir'], client))
        or os.path.join(node.settings['data_dir'], client))
    target = prepare_target(args.to) if args.to else \
        os.path.join(scratch, 'mirror.git')
    try:
        core.run([*git_safe(mirror), 'clone', '--quiet', '--mirror',
                  '--no-hardlinks', '--', mirror, target])
        # The clone is a copy, not a mirror of the node: fetching into it
        # must not prune what it restored.
        core.run([*core.git_program(), f'--git-dir={target}', 'config',
                  '--unset', 'remote.origin.mirror'], check=False)
        if then is not None:
            set_refs(target, then)
        if args.stdout:
            out.flush()
            core.run([*core.git_program(), f'--git-dir={target}', 'bundle',
                      'create', '-', '--all'], stdout=out.fileno(),
                     text=False)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def repository_refs(repo):
    """{ref: tip} of every ref of a repository."""
    out = core.run([*git_safe(repo), f'--git-dir={repo}', 'for-each-ref',
                    '--format=%(objectname) %(refname)']).stdout
    return {ref: sha for sha, _, ref in
            (line.partition(' ') for line in out.splitlines()) if ref}


def mirror_refs_then(node, mirror, at):
    """{ref: tip} of a mirror as it was at --at TIME (from its reflogs and
    preserved refs, the git module's refs_at), or a RestoreError saying
    why no record tells: never today's refs in their place."""
    when = parse_at(at)
    git_module = node.formats.load('git')
    if git_module is None or not hasattr(git_module, 'refs_at'):
        raise RestoreError(f'{mirror}: restore --at needs the git module '
                           '(refs_at) in [server] modules_dir')
    refs, unknown, assumed, first = git_module.refs_at(
        mirror, repository_refs(mirror), when.timestamp())
    if first is None or when.timestamp() < first:
        raise RestoreError(f'{mirror}: ' + (
            f'no record of its refs reaches back to {at}: the oldest is '
            f'from {core.isotime(datetime.datetime.fromtimestamp(first, UTC))}'
            ' (its first fetch)' if first else
            'it keeps no record (reflog) of its refs') +
            '; restore without --at gives every ref, the preserved old '
            'tips included')
    if unknown:
        raise RestoreError(
            f'{mirror}: what {len(unknown)} ref(s) pointed to at {at} is '
            'not recorded (no reflog reaches back so far): '
            + ', '.join(clean_text(r) for r in unknown[:5])
            + '; restore without --at gives every ref, the preserved old '
            'tips included')
    if assumed:
        log.warning('%s: %d ref(s) restored at a tip whose start no record '
                    'tells (deleted since, or tags fetched before tags had '
                    'a reflog); they may have come after %s: %s', mirror,
                    len(assumed), at,
                    ', '.join(clean_text(r) for r in assumed[:5]))
    return refs


def set_refs(repo, refs):
    """Make a repository's refs exactly refs, in one transaction."""
    now = repository_refs(repo)
    core.run([*core.git_program(), f'--git-dir={repo}', 'update-ref',
              '--stdin'], input=''.join(
        [f'delete {ref}\n' for ref in sorted(now) if ref not in refs] +
        [f'update {ref} {sha}\n' for ref, sha in sorted(refs.items())
         if now.get(ref) != sha]))


def restore_command(node, args, out=None):
    """server.py restore: see build_parser."""
    out = out or sys.stdout.buffer
    client = check_client_name(args.client)
    if args.stdout == bool(args.to):
        raise UsageError('restore: give exactly one of --to DIR, --stdout')
    if args.same_owner and not args.to:
        raise UsageError('--same-owner goes with --to DIR (--stdout always '
                         'carries owners, modes and special files)')
    if getattr(args, 'origin', 'local') == 'offsite':
        return restore_from_offsite(node, client, args, out)
    mirrors = client_mirrors(node, client)
    if args.source in mirrors or args.source.startswith('git/'):
        if args.source not in mirrors:
            raise RestoreError(f'no git mirror {args.source} of {client}')
        restore_git(node, client, mirrors[args.source], args, out)
        log.info('restored %s %s', client, args.source)
        return 0
    with client_data_lock(node, client, 'restore'):
        backups = stored_backups(node, client).get(args.source)
        if not backups:
            raise RestoreError(f'nothing stored for {client} {args.source} '
                               '(see `server.py list`)')
        backup = choose_snapshot(backups, args.source, args.at, args.file or (
            (args.database or args.globals) and database_file(args)))
        return restore_snapshot(node, client, backups, backup, args, out)


def restore_from_offsite(node, client, args, out):
    """restore --from offsite, whatever the kind, on any node (one that
    holds nothing too): the source's index read from the remote, the
    snapshot --at names chosen as locally, its whole chain fetched into
    scratch with every sha256 proven, then restored by the same code as
    a local restore.  A mirror comes back from its bundle, every ref."""
    off = Offsite(node)
    index = offsite_catalogue(off, client, args.source).get(args.source)
    if not index:
        raise RestoreError(f'no {args.source} of {client} on '
                           f'{off.path(client)} (see `server.py list '
                           f'{client} --from offsite`)')
    core.make_dirs(node.settings['data_dir'])
    scratch = tempfile.mkdtemp(prefix='.offsite-restore-',
                               dir=node.settings['data_dir'])
    try:
        if index.get('kind') == 'git':
            if args.at and args.at != GIT_SNAPSHOT:
                raise UsageError('restore --from offsite of a mirror: the '
                                 'remote holds its newest bundle only (no '
                                 'reflogs); leave out --at (every ref, '
                                 'preserved old tips included)')
            args.at = None
            mirror = offsite_fetch_mirror(off, client, index, os.path.join(
                scratch, 'mirror.git'), scratch)
            restore_git(node, client, mirror, args, out)
            return 0
        backups = index_backups(index, scratch, args.source, node.formats)
        file = args.file or ((args.database or args.globals) and
                             database_file(args))
        backup = choose_snapshot(backups, args.source, args.at, file)
        chain = chain_to_extract(backups, backup) \
            if archive_entry(backup) and not file else [backup]
        for link in chain:
            offsite_fetch_into(off, client, args.source,
                               index_snapshot(index, link.name), link.path)
        log.info('offsite: fetched %d snapshot(s) of %s %s, every sha256 '
                 'checked', len(chain), client, args.source)
        return restore_snapshot(node, client, chain, backup, args, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def earlier_snapshots(backups, backup):
    """(directory, manifest) of the good snapshots stored before backup
    in backups (one source), oldest first."""
    good = [b for b in backups if b.good]
    before = good[:good.index(backup)] if backup in good else []
    return [(b.path, b.manifest) for b in before]


def database_file(args):
    """The stored file restore --database/--globals start from."""
    if args.database:
        # Any name `all` dumped (spaces included): it only picks the file.
        if not args.database.isprintable():
            raise UsageError(f'--database {clean_text(args.database)!r}: '
                             'not a database name')
        return postgresdb.dump_file_name(args.database)
    return postgresdb.GLOBALS_FILE


def restore_database(node, client, backups, backup, args, out):
    """--database NAME / --globals: one psql script (postgresdb
    restore_script) that creates the roles, then the database exactly."""
    if not args.stdout:
        raise UsageError('restore --database/--globals: give --stdout and '
                         'pipe it into psql (see --help)')
    name = database_file(args)
    check_hashes([backup], {name}, args.force)
    try:
        globals_path = postgresdb.snapshot_globals(
            earlier_snapshots(backups, backup) + [(backup.path,
                                                   backup.manifest)])
    except ValueError as e:
        raise RestoreError(str(e)) from None
    if globals_path is None:
        log.warning('%s %s: no globals.sql stored at or before %s: the '
                    'roles must exist on the target', client, args.source,
                    backup.name)
    postgresdb.restore_script(
        core.ModuleContext(node.config, 'server'), out,
        f'{client} {args.source} {backup.name}', args.database,
        args.database and os.path.join(backup.path, name), globals_path)


def restore_snapshot(node, client, backups, backup, args, out):
    """Restore one chosen snapshot (its chain from backups)."""
    log.info('restoring %s %s %s', client, args.source, backup.name)
    if args.database or args.globals:
        restore_database(node, client, backups, backup, args, out)
    elif args.file:
        restore_file(backup, args.file, args, out)
    elif archive_entry(backup):
        restore_archive(node, client, backups, backup, args, out)
    else:
        names = [f.get('name') for f in backup.manifest['files']]
        raise UsageError(f'{args.source} {backup.name} holds no archive: '
                         'name one of its files with --file ('
                         + ', '.join(map(str, names)) + ')')
    return 0

# -- drill ------------------------------------------------------------------


class DrillContext(ModuleContext):
    """What a module's drill_stored(ctx, names, scratch) sees: the
    snapshot (a directory; for a git mirror, the mirror) as `snapshot`
    and `manifest`, the node's [server] settings as `node_settings`, the
    tips the client announced for a mirror as `heads`, and the node's own
    way to extract a chain (checked against the manifests first)."""

    def __init__(self, node, client, path, manifest=None, chain=(),
                 heads=(), earlier=()):
        super().__init__(node.config, 'server')
        self.node = node
        self.client = client
        self.snapshot = path
        self.manifest = manifest or {}
        self.node_settings = node.settings
        self.heads = list(heads)
        self.chain = list(chain)
        # The source's snapshots stored before this one, oldest first, as
        # (directory, manifest): what a module may need beside it (the
        # globals of an earlier `postgresdb all`).
        self.earlier = list(earlier)
        # Where a module registers what it starts (a scratch cluster), so
        # that what a killed drill left is stopped by the next command.
        self.scratch_registry = node.scratch_registry()

    def extract_chain(self, directory):
        """Check the sha256 of every link below the snapshot (the
        snapshot's own files are checked before any module's proof),
        then the one safe extraction of the chain (judged whole, no
        privilege: restore_tree) into a tree inside directory.  Returns
        ExtractedChain: how many links, where the tree is, which device
        nodes were left out (by design, not missing)."""
        check_hashes(self.chain[:-1], None, force=False)
        top = scratch_tree(directory)
        with chain_errors(self.node, self.client, self.chain[-1]):
            done = restore_tree(self.node, chain_archives(self.chain), top)
        return ExtractedChain(len(self.chain), top, done.left_out)


# What DrillContext.extract_chain gives a module's drill_stored.
ExtractedChain = collections.namedtuple('ExtractedChain',
                                        'links top left_out')


def announced_heads(node, client, repo):
    """Every tip the client announced for a mirror (results journal)."""
    heads = set()
    for entry in read_results(node, client):
        stored = entry.get('stored')
        if entry.get('outcome') == 'stored' and isinstance(stored, str) and \
                os.path.join(node.settings['data_dir'], client, stored) \
                == repo:
            heads.update(h for h in entry.get('heads') or []
                         if isinstance(h, str) and
                         re.fullmatch(r'[0-9a-f]{40,64}', h))
    return sorted(heads)


def drill_snapshot(node, client, backups, backup, scratch):
    """Prove one snapshot through the modules that stored its files: their
    sha256 first, then each module's drill_stored for its files.  Returns
    (problems, detail, proven): proven is False when no module proved
    anything ("hashes only": no module claims its files)."""
    problems = check_hashes([backup], None, force=False) or []
    groups, unclaimed = {}, []
    for entry in backup.manifest['files']:
        name = str(entry.get('name')) if isinstance(entry, dict) else ''
        code = node.formats.owner(name)
        if node.formats.is_companion(name):
            continue
        if code is not None and hasattr(code, 'drill_stored'):
            groups.setdefault(code, []).append(name)
        else:
            unclaimed.append(name)
    details = []
    for code, names in groups.items():
        ctx = DrillContext(node, client, backup.path, backup.manifest,
                           chain=chain_to_extract(backups, backup)
                           if manifest_level(backup.manifest) or
                           archive_entry(backup) else [backup],
                           earlier=earlier_snapshots(backups, backup))
        found, detail = code.drill_stored(ctx, names, scratch)
        problems += found
        details.append(detail)
    if unclaimed:
        details.append(f'{", ".join(unclaimed)}: hashes only (no module '
                       'proves these files)')
    return problems, '; '.join(details), bool(groups)


def drill_mirror(node, client, repo, scratch):
    """Prove a git mirror through the git module's drill_stored."""
    ctx = DrillContext(node, client, repo,
                       heads=announced_heads(node, client, repo))
    problems, detail = node.formats.load('git').drill_stored(ctx, [],
                                                             scratch)
    return problems, detail, True


def drill_targets(node, client):
    """(source, snapshot name, proof) of the newest snapshot of every
    series and of every mirror; proof(scratch) -> (problems, detail,
    proven)."""
    targets = []
    for source, backups in stored_backups(node, client).items():
        good = [b for b in backups if b.good and b.time]
        for backup in newest_of_series(good):
            targets.append((source, backup.name, lambda s, b=backup, g=good:
                            drill_snapshot(node, client, g, b, s)))
    for source, repo in client_mirrors(node, client).items():
        targets.append((source, GIT_SNAPSHOT, lambda s, r=repo:
                        drill_mirror(node, client, r, s)))
    return targets


def drill_failure_reason(error):
    """The reason a proof stopped, in the words of its error (the type
    for what is not one of ours, e.g. a malformed number)."""
    if isinstance(error, (GitBackupError, OSError, tarlisting.ListingError)):
        return str(error)
    return f'{type(error).__name__}: {error}'


def drill_word(drill):
    """How a drill outcome is told: FAILED, ok, or hashes only (passed,
    but no module proved the files: never called ok)."""
    if not drill['ok']:
        return 'FAILED'
    return 'ok' if drill.get('proof', 'restored') == 'restored' \
        else 'hashes only'


def drill_one(node, client, run_id, source, name, proof):
    """Run one proof in a scratch directory; its journal entry."""
    try:
        with scratch(node, os.path.join(node.settings['data_dir'], client),
                     'drill') as path:
            core.pause_point('drill:reading')
            problems, detail, proven = proof(path)
    except Exception as e:
        # One bad snapshot is one failure: malformed listings, statistics
        # or anything else a client sent fail this series, never the drill.
        log.debug('drill %s %s %s', client, source, name, exc_info=True)
        problems, detail, proven = [drill_failure_reason(e)], '', False
    return {'source': source, 'snapshot': name, 'run': run_id,
            'finished': core.isotime(), 'ok': not problems,
            'proof': 'restored' if proven else 'hashes only',
            'detail': clean_text('; '.join(problems) if problems else detail,
                                 2000)}


def drill_client(node, client, run_id, out):
    """Drill every series and mirror of one client, journal the outcomes;
    (number drilled, failure lines)."""
    entries, failed = [], []
    with client_data_lock(node, client, 'drill'):
        for source, name, proof in drill_targets(node, client):
            entry = drill_one(node, client, run_id, source, name, proof)
            entries.append(entry)
            word = drill_word(entry)
            line = f'{word}: {client} {source} {name}: {entry["detail"]}'
            out.write(line + '\n')
            (log.info if entry['ok'] else log.error)(
                'drill %s', line, extra=core.FILE_ONLY)
            if not entry['ok']:
                failed.append(line)
    Journal(os.path.join(node.settings['data_dir'], client,
                         DRILL_JOURNAL)).append(entries)
    return len(entries), failed


def drill_command(node, only_client=None, out=sys.stdout):
    """server.py drill: prove the newest snapshot of every series restores.
    Outcomes journaled per client (drills.jsonl, read by report); failures
    printed with the snapshot's list name and mailed.  0 ok, 2 critical."""
    clients = [check_client_name(only_client)] if only_client else \
        known_clients(node)
    run_id = core.isotime()
    failed = []
    count = 0
    for client in clients:
        try:
            drilled, failures = drill_client(node, client, run_id, out)
        except Exception as e:
            # What no series' proof caught (its snapshots unreadable, its
            # journal unwritable) fails this client, not the drill.
            log.debug('drill %s', client, exc_info=True)
            drilled, failures = 0, [f'FAILED: {client}: '
                                    f'{clean_text(drill_failure_reason(e))}']
            out.write(failures[0] + '\n')
            log.error('drill %s', failures[0], extra=core.FILE_ONLY)
        count += drilled
        failed += failures
    status = CRITICAL if failed else OK
    # "checked", not "restored": without drill_postgres a dump is only
    # read back, and each line says which proof it had.
    summary = (f'drill on {node.name}: {count} snapshot(s) and mirror(s) '
               f'checked, {len(failed)} failed: '
               f'{STATUS_NAMES[status].upper()}')
    out.write(summary + '\n')
    log.info('%s', summary, extra=core.FILE_ONLY)
    if failed:
        core.mail_admins(node.config, 'server',
                         f'gitbackup: drill on {node.name}: CRITICAL',
                         '\n'.join(failed) + '\n\n' + summary + '\n')
    return status


def last_drills(node, client, now):
    """{source: last drill} for report: the newest drill run that covered
    the source; failed if any of its series failed there; its proof
    'hashes only' when no module proved any of them."""
    runs = {}
    for drill in drill_journal(node, client):
        last = runs.get(drill['source'])
        if last is None or drill['run'] > last['run']:
            last = runs[drill['source']] = {'run': drill['run'], 'ok': True,
                                            'time': drill['time'],
                                            'proof': 'hashes only',
                                            'problems': []}
        if drill['run'] == last['run']:
            last['time'] = max(last['time'], drill['time'])
            if drill['proof'] == 'restored':
                last['proof'] = 'restored'
            if not drill['ok']:
                last['ok'] = False
                words = [clean_text(drill[k], 500) for k in ('snapshot',
                                                              'detail')
                         if drill[k]]
                if words:
                    last['problems'].append(': '.join(words))
    for last in runs.values():
        last['age_seconds'] = int(max((now - last['time']).total_seconds(),
                                      0))
    return runs


def drill_level(row, drill):
    """A source's report level from its last drill (failed = critical)."""
    row['last_drill'] = drill and {k: drill[k] for k in
                                   ('time', 'ok', 'proof', 'age_seconds')}
    if drill and not drill['ok']:
        row['problems'].append('last restore drill failed' + (
            ': ' + '; '.join(drill['problems']) if drill['problems'] else ''))
        return CRITICAL
    return OK


# ==========================================================================
# 7. Tell: the report in every format
#
# `report` tells when backups silently stopped: one report is built per
# client and series (levels decided here, once), then rendered as text,
# JSON, Nagios output, a Prometheus textfile or a static HTML page.

# The Prometheus series of `report --format prometheus`, all gauges, with
# their HELP text (names: gitbackup_ prefix, base units; checked by
# `promtool check metrics` in tests/test_monitoring.py).
PROM_HELP = {
    'gitbackup_last_success_timestamp_seconds':
        'Node time (Unix seconds) of the newest good backup of a source.',
    'gitbackup_last_success_age_seconds':
        'Seconds since the newest good backup of a source, when the report '
        'was made (alert on time() - ..._timestamp_seconds instead).',
    'gitbackup_backup_size_bytes':
        'Restorable size of the newest good backup of each series of a '
        'source (an increment with its chain down to the full).',
    'gitbackup_stored_bytes':
        'Bytes kept for a source (all its stored backups).',
    'gitbackup_backups':
        'Stored backups of a source (git mirrors: successful fetches).',
    'gitbackup_failed_requests':
        'Failed requests of a source kept as X* in the pool.',
    'gitbackup_newest_backup_warnings':
        'Newest backups of a source stored with warnings (files the client '
        'could not read; the rest is stored).',
    'gitbackup_pending_requests':
        'Requests of a source waiting in the pool (RQ* and P*).',
    'gitbackup_status':
        'Status of a source: 0 ok, 1 warning, 2 critical.',
    'gitbackup_client_status':
        'Worst status of a client: 0 ok, 1 warning, 2 critical.',
    'gitbackup_client_misconfigured':
        'Whether fetches from a client wait for a human (1): the node '
        'configuration for it, or ssh refusing the login or host key.',
    'gitbackup_stale_after_seconds':
        'Age at which a source of the client becomes a warning.',
    'gitbackup_last_drill_timestamp_seconds':
        'Node time (Unix seconds) of the last restore drill of a source.',
    'gitbackup_last_drill_success':
        'Whether the last restore drill of a source passed (1) or not (0).',
    'gitbackup_offsite_pending_snapshots':
        'Good snapshots of a client not yet verified in the offsite copy.',
    'gitbackup_offsite_lag_seconds':
        'Age of the oldest snapshot of a client not yet offsite (0: the '
        'offsite copy is up to date).',
    'gitbackup_offsite_missing':
        'Snapshots and mirrors the offsite remote holds that this node '
        'lost other than by prune (critical: restore --from offsite).',
    'gitbackup_report_timestamp_seconds':
        'When this report was made (node time).',
}
WAITING_KINDS = ((Unreachable, 'cannot be reached'),
                 (NoSpace, 'no space to store'),
                 (Misconfigured, 'misconfigured (node configuration or ssh '
                  'access)'))


def report_row(rows, client, source):
    """The report row of one source in rows, added empty if new."""
    return rows.setdefault(source, {
        'client': client, 'source': source, 'kind': 'files',
        'last_success': None, 'age_seconds': None, 'size_bytes': 0,
        'stored_bytes': 0, 'count': 0, 'failed': 0, 'pending': 0,
        'last_failure': None, 'last_failure_reason': None,
        'expected': False, 'status': 'ok', 'problems': []})


def add_stored_rows(node, client, now, rows):
    """Rows of the sources with good stored backups (files, databases)."""
    for source, backups in stored_backups(node, client).items():
        good = [b for b in backups if b.good and b.time]
        if not good:
            continue
        r = report_row(rows, client, source)
        chains = snapshot_chains(good)
        r['count'] = len(good)
        r['stored_bytes'] = sum(b.size for b in good)
        # Restorable: an increment counts with its chain down to the full.
        r['size_bytes'] = sum(chains[b.path].size
                              for b in newest_of_series(good))
        r['last_success'], r['clock'] = arrival_last_success(good, now)
        for backup in newest_of_series(good):
            if not chains[backup.path].whole:
                r['broken_chain'] = \
                    f'{backup.name}: {chains[backup.path].problem}'
            if backup.manifest.get('warning_count'):
                r.setdefault('stored_warnings', []).append(
                    stored_warnings_text(backup))


def stored_warnings_text(backup):
    """The report's line on a newest backup stored with warnings (files
    the client could not read; the rest is stored)."""
    warned = [clean_text(w, 200) for w in
              backup.manifest.get('warnings') or [] if isinstance(w, str)]
    return (f'newest backup {backup.name} stored with '
            f'{clean_text(backup.manifest["warning_count"])} warning(s): '
            + '; '.join(warned[:3]))


def add_mirror_rows(node, client, journal, rows):
    """Rows of the git mirrors: their fetches come from the journal."""
    fetched = {}
    for entry in journal:
        if entry.get('outcome') != 'stored':
            continue
        source = stored_source(node, client, entry.get('stored'))
        when = parse_node_time(entry.get('finished'))
        if source and source.startswith('git/') and when:
            fetched.setdefault(source, []).append(when)
    for source, repo in client_mirrors(node, client).items():
        r = report_row(rows, client, source)
        r['kind'] = 'git'
        times = fetched.get(source, [])
        if not times:
            # Before the first journal entry (or a mirror made by hand):
            # the mirror's own last change, on the node's clock.
            times = [mirror_time(repo)] if mirror_time(repo) else []
        r['count'] = len(fetched.get(source, [])) or (1 if times else 0)
        r['last_success'] = max(times) if times else None
        r['size_bytes'] = r['stored_bytes'] = core.tree_size(repo)


def add_pool_counts(client, pool, journal, rows):
    """Pending and failed requests per source, and the latest failure."""
    for source, n in pool['pending'].items():
        if source != '?':
            report_row(rows, client, source)['pending'] = n
    for source, n in pool['failed'].items():
        if source != '?':
            report_row(rows, client, source)['failed'] = n
    for entry in journal:
        if entry.get('outcome') != 'failed':
            continue
        source = pool['failed_keys'].get(entry.get('request'))
        when = parse_node_time(entry.get('finished'))
        if source and source != '?' and when:
            r = report_row(rows, client, source)
            if not r['last_failure'] or when > r['last_failure']:
                r['last_failure'] = when
                r['last_failure_reason'] = clean_text(
                    entry.get('reason') or '', 300)


def row_level(r, drill, now, stale):
    """The status level of one report row; its problems are added to it."""
    level = drill_level(r, drill)
    if r['expected'] and not r['last_success']:
        level = CRITICAL
        r['problems'].append('expected source has no backup on this '
                             'node')
    elif r['last_success']:
        age = (now - r['last_success']).total_seconds()
        r['age_seconds'] = int(max(age, 0))
        if age > stale:
            level = max(level, CRITICAL if r['expected'] or
                        age > 2 * stale else WARNING)
            r['problems'].append(
                f'last good backup {human_age(age)} ago (stale_after '
                f'{human_age(stale)})')
    else:
        level = max(level, CRITICAL if r['expected'] else WARNING)
        r['problems'].append('no good backup stored yet')
    for note in r.get('clock', ()):
        level = max(level, WARNING if 'future' in note else OK)
        r['problems'].append(note)
    for text in r.get('stored_warnings', ()):
        # Stored, but without what the client could not read: until a
        # backup without warnings replaces it.
        level = max(level, WARNING)
        r['problems'].append(text)
    if r.get('broken_chain'):
        # The newest backup cannot be restored: as bad as none.
        level = CRITICAL
        r['problems'].append('incremental chain broken: '
                             f'{r["broken_chain"]}')
    if r['last_failure'] and (not r['last_success'] or
                              r['last_failure'] > r['last_success']):
        level = max(level, WARNING)
        r['problems'].append(f'latest request failed: '
                             f'{r["last_failure_reason"]}')
    return level


def source_report(node, client, now):
    """The report of one client: a row per source, the client's own facts
    (pending and failed requests, why fetches wait, its offsite lag), and
    the statuses report_status decides from them."""
    stale, expected = client_limits(node, client)
    rows = {}
    add_stored_rows(node, client, now, rows)
    journal = read_results(node, client)
    add_mirror_rows(node, client, journal, rows)
    pool = pool_requests(node, client)
    add_pool_counts(client, pool, journal, rows)
    for token in expected:
        matches = [s for s in rows if s == token or
                   (token == 'git' and s.startswith('git/'))]
        for s in matches or [token]:
            report_row(rows, client, s)['expected'] = True
    waiting = report_waiting(node, client)
    if client in node.config.client_problems:
        waiting.append({'what': 'misconfigured', 'since': None,
                        'kind': Misconfigured,
                        'error': node.config.client_problems[client]})
    report = {'client': client, 'status': 'ok', 'stale_after_seconds': stale,
              'expect': expected, 'pending': pool['pending_total'],
              'failed': pool['failed_total'], 'problems': [],
              'misconfigured': any(w['kind'] is Misconfigured
                                   for w in waiting),
              'sources': [rows[s] for s in sorted(rows)],
              'history': report_history(node, client, now),
              'offsite': offsite_lag(node, client, now)}
    report_status(report, last_drills(node, client, now), waiting, now,
                  node.config.get_duration('server', 'alert_after'))
    return report


def waiting_level(waiting, now, alert_after):
    """The level of one reason fetches from a client wait, from the moment
    the admins are mailed about it: an outage (unreachable) once it has
    lasted alert_after, a full disk at once (warnings: nothing is lost,
    requests wait); a misconfiguration or a refused login at once and
    critical (only a human ends it).  Before alert_after an outage is the
    blip the mail policy holds back, so no monitor rings for it either."""
    kind = waiting['kind']
    if issubclass(kind, Misconfigured):
        return CRITICAL
    after = alert_after if kind.alert_after else 0
    return WARNING if (now - waiting['since']).total_seconds() >= after \
        else OK


def report_status(c, drills, waiting, now, alert_after):
    """The one status rule of the report: it sets the status and problems
    of every row and of the client c; text, JSON, Nagios, Prometheus and
    HTML render them and decide nothing.  A row: row_level (age against
    stale_after, expected sources, clock notes, broken chain, last drill,
    latest failure).  The client: why its fetches wait (waiting_level),
    its offsite copy behind by more than stale_after (warning), nothing
    stored yet (warning).  A client's level holds for each of its rows
    (nothing more arrives, or goes offsite, for any of them until it
    ends), but its problem is recorded once, on the client."""
    level = OK
    for w in waiting:
        found = waiting_level(w, now, alert_after)
        if found > OK:
            c['problems'].append(report_waiting_text(w))
            level = max(level, found)
    lag = c.get('offsite')
    if lag and lag['lag_seconds'] > c['stale_after_seconds']:
        c['problems'].append(
            f'{lag["pending"]} snapshot(s) not yet offsite, the oldest '
            f'{human_age(lag["lag_seconds"])} old (`server.py offsite`)')
        level = max(level, WARNING)
    client_level = level
    lost = offsite_lost_sources(lag)
    if lost:
        c['problems'].append(offsite_missing_text(c['client'],
                                                  lag['missing']))
        level = CRITICAL
    for r in c['sources']:
        row = max(row_level(r, drills.get(r['source']), now,
                            c['stale_after_seconds']), client_level)
        if r['source'] in lost:
            row = CRITICAL     # its last copy is offsite only
        r['status'] = STATUS_NAMES[row]
        level = max(level, row)
    if not c['sources'] and not c['expect']:
        c['problems'].append('nothing stored for this client yet')
        level = max(level, WARNING)
    c['status'] = STATUS_NAMES[level]
    return c


def report_transfer_seconds(entry):
    """Seconds a journaled request took (handling started -> finished,
    the download included), or None."""
    if not entry:
        return None
    started = parse_node_time(entry.get('started'))
    finished = parse_node_time(entry.get('finished'))
    if not started or not finished:
        return None
    return max(int((finished - started).total_seconds()), 0)


def report_request_line(node, client, key):
    """The first line of a request in any state of the pool, or ''."""
    if not KEY_RE.match(key or ''):
        return ''
    pool = node.pool(client)
    for state in (FAILED, NEW, PROCESSING, FINISHED):
        path = pool.file(state, key)
        if os.path.exists(path):
            return read_request_line(path)
    return ''


def report_waiting(node, client):
    """[{'what', 'since', 'error'}]: why fetches from this client wait
    right now (unreachable, no space, misconfigured)."""
    waiting = []
    for kind, what in WAITING_KINDS:
        state = read_json(os.path.join(
            node.state_dir, f'{kind.health}-{client}.json'), {}) or {}
        since = parse_node_time(state.get('first_failure'))
        if since:
            waiting.append({'what': what, 'since': since, 'kind': kind,
                            'error': clean_text(
                                state.get('last_error') or '', 300)})
    return waiting


def report_waiting_text(waiting):
    """One line per entry of report_waiting(), as every format shows it."""
    if not waiting['since']:       # the configuration file says so now
        return f'{waiting["what"]}: {waiting["error"]}'
    return f'{waiting["what"]} since {core.isotime(waiting["since"])}: ' \
        f'{waiting["error"]}'


HISTORY_DAYS = 90
# Bounds what one series adds to the report (and the JSON report).
HISTORY_POINTS = 500
SVG_WIDTH, SVG_HEIGHT = 240, 40
# A snapshot smaller than this fraction of the one before is marked.
SIZE_DROP = 0.5


def history_series(sources, source):
    """The entry of `source` in report_history()'s 'sources', made empty
    on first use."""
    return sources.setdefault(source, {
        'snapshots': [], 'failures': [], 'drills': [], 'before': None})


def add_history_snapshot(sources, start, source, when, size, seconds):
    """One snapshot of a series: drawn if inside the window; older, it
    only moves 'before', the newest snapshot older than the window."""
    s = history_series(sources, source)
    if when < start:
        s['before'] = max(s['before'] or when, when)
    else:
        s['snapshots'].append({'time': when, 'size': size,
                               'seconds': seconds})


def add_stored_history(sources, start, node, client, journal):
    """The snapshots of every source: stored backups with their transfer
    time from the journal, then git mirrors' journaled fetches, then the
    last change of mirrors that have none."""
    # A request journaled twice (re-handled after a crash): the last wins.
    stored = {e['request']: e for e in journal
              if e.get('outcome') == 'stored' and
              isinstance(e.get('request'), str)}
    for source, backups in stored_backups(node, client).items():
        chains = snapshot_chains(backups)
        for b in backups:
            if b.good and b.time:
                # The restorable size, so that an increment is no "drop".
                add_history_snapshot(
                    sources, start, source, b.time, chains[b.path].size,
                    report_transfer_seconds(
                        stored.get(b.manifest.get('request'))))
    mirrors = client_mirrors(node, client)
    for entry in stored.values():
        source = stored_source(node, client, entry.get('stored'))
        when = parse_node_time(entry.get('finished'))
        if source in mirrors and when:
            add_history_snapshot(sources, start, source, when, None,
                                 report_transfer_seconds(entry))
    for source, repo in mirrors.items():
        if source not in sources:
            when = mirror_time(repo)
            if when:
                add_history_snapshot(sources, start, source, when, None,
                                     None)


def add_failure_history(sources, start, node, client, journal):
    """Failed requests inside the window, on the series of their source."""
    for key, (when, reason) in failed_requests(node, client,
                                               journal).items():
        source = request_source(node, client,
                                report_request_line(node, client, key))
        if source and when >= start:
            history_series(sources, source)['failures'].append(
                {'time': when, 'reason': clean_text(reason or '', 300)})


def report_history(node, client, now, days=HISTORY_DAYS):
    """What the status page draws for one client over the last `days`:
    per source its snapshots (node time, stored bytes, transfer seconds
    from the journal; a git mirror's fetches, size unknown), its failed
    requests and drill outcomes, and 'before', the newest snapshot older
    than the window (where a gap began); plus 'waiting', why fetches from
    this client wait right now (unreachable, no space, misconfigured)."""
    start = now - datetime.timedelta(days=days)
    journal = read_results(node, client)
    sources = {}
    add_stored_history(sources, start, node, client, journal)
    add_failure_history(sources, start, node, client, journal)
    for drill in drill_journal(node, client):
        if drill['time'] >= start and drill['source'] in sources:
            sources[drill['source']]['drills'].append(
                {'time': drill['time'], 'ok': drill['ok']})
    for s in sources.values():
        for name in ('snapshots', 'failures', 'drills'):
            s[name] = sorted(s[name], key=lambda x: x['time'])[
                -HISTORY_POINTS:]
    waiting = [{k: v for k, v in w.items() if k != 'kind'}
               for w in report_waiting(node, client)]
    return {'days': days, 'sources': sources, 'waiting': waiting}


def build_report(node, now=None):
    now = now or core.utcnow()
    clients = [source_report(node, client, now)
               for client in known_clients(node)]
    worst = max([STATUS_NAMES.index(c['status']) for c in clients] or [OK])
    return {'node': node.name, 'generated': core.isotime(now),
            'status': STATUS_NAMES[worst], 'clients': clients}

# -- text, JSON, Nagios and Prometheus --------------------------------------


def report_json(report):
    def plain(value):
        if isinstance(value, datetime.datetime):
            return core.isotime(value)
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
                         core.isotime(r['last_success']) if r['last_success']
                         else 'never', human_age(r['age_seconds']),
                         core.human_size(r['size_bytes']), str(r['count']),
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
    lines += offsite_report_lines(report)
    drills = [f'  {c["client"]}/{r["source"]}: '
              f'{drill_word(r["last_drill"])} '
              f'{human_age(r["last_drill"]["age_seconds"])} ago'
              for c in report['clients'] for r in c['sources']
              if r.get('last_drill')]
    if drills:
        lines += ['', 'Last restore drill:'] + drills
    if problems:
        lines += ['', 'Problems:'] + ['  ' + clean_text(p, 1000)
                                      for p in problems]
    if any(c['failed'] for c in report['clients']):
        lines += ['', 'Given-up requests go back with: server.py retry '
                  '<client> <key>|--all-failed']
    return '\n'.join(lines) + '\n'


def offsite_report_lines(report):
    """The text report's offsite block (empty without [offsite])."""
    lines = []
    for c in report['clients']:
        lag = c.get('offsite')
        if not lag:
            continue
        if lag['pending']:
            lines.append(
                f'  {c["client"]}: {lag["pending"]} snapshot(s) not yet '
                f'offsite; newest {lag["newest_pending"]} '
                f'({human_age(lag["newest_pending_age_seconds"])} old), '
                f'oldest {human_age(lag["lag_seconds"])} old')
        else:
            lines.append(f'  {c["client"]}: up to date (last copy '
                         f'{lag["last_copy"] or "never"})')
        if lag.get('missing'):
            lines.append(f'  {c["client"]}: {len(lag["missing"])} kept '
                         'there, lost here (critical, see Problems)')
    if lines:
        remote = clean_text(report['clients'][0]['offsite']['remote'])
        lines = ['', f'Offsite ({remote}):'] + [clean_text(l, 1000)
                                                 for l in lines]
    return lines


UNKNOWN = 3   # report: the check itself could not be made (Nagios)
NAGIOS_STATES = ('OK', 'WARNING', 'CRITICAL', 'UNKNOWN')


def nagios_text(text):
    """Plugin output text: printable, one line, no '|' (it starts the
    performance data)."""
    return clean_text(text, 1000).replace('|', '/')


def nagios_label(text):
    """A performance data label: quoted, quotes doubled, no '='."""
    return "'" + str(text).replace("'", "''").replace('=', '_') + "'"


def report_nagios(report):
    """A Nagios/Icinga plugin answer (plugin guidelines): the status line
    `GITBACKUP <STATE> - <summary> | <performance data>`, then one line per
    problem.  Per source: age in seconds (warn at stale_after, crit at
    twice that, or at stale_after for an expected source), size in bytes,
    failed and pending requests."""
    counts = [0, 0, 0]
    problems = []          # (level, where, text), worst first below
    perfdata = []
    for c in report['clients']:
        stale = c['stale_after_seconds']
        for r in c['sources']:
            level = STATUS_NAMES.index(r['status'])
            counts[level] += 1
            name = f'{c["client"]}/{r["source"]}'
            problems += [(level, name, p) for p in r['problems']]
            crit = stale if r['expected'] else 2 * stale
            age = 'U' if r['age_seconds'] is None else f'{r["age_seconds"]}s'
            perfdata += [
                f'{nagios_label(name + "_age")}={age};{stale};{crit};0;',
                f'{nagios_label(name + "_size")}={r["size_bytes"]}B;;;0;',
                f'{nagios_label(name + "_failed")}={r["failed"]};;;0;',
                f'{nagios_label(name + "_pending")}={r["pending"]};;;0;']
        level = STATUS_NAMES.index(c['status'])
        if not c['sources']:
            counts[level] += 1
        problems += [(level, c['client'], p) for p in c['problems']]
    status = STATUS_NAMES.index(report['status'])
    total = sum(counts)
    if status == OK:
        summary = (f'{total} of {total} sources ok on node '
                   f'{report["node"]}')
    else:
        bad = [f'{counts[level]} {STATUS_NAMES[level]}'
               for level in (CRITICAL, WARNING) if counts[level]]
        summary = f'{", ".join(bad)} of {total} sources on node ' \
            f'{report["node"]}'
    problems.sort(key=lambda problem: -problem[0])
    if problems:
        summary += f': {problems[0][1]}: {problems[0][2]}'
    line = f'GITBACKUP {NAGIOS_STATES[status]} - {nagios_text(summary)}'
    if perfdata:
        line += ' | ' + ' '.join(perfdata)
    return '\n'.join([line] + [
        nagios_text(f'{where}: {STATUS_NAMES[level]}: {text}')
        for level, where, text in problems]) + '\n'


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
        samples['gitbackup_client_misconfigured'].append(
            (f'{{client="{client}"}}', int(bool(c.get('misconfigured')))))
        samples['gitbackup_stale_after_seconds'].append(
            (f'{{client="{client}"}}', c['stale_after_seconds']))
        if c.get('offsite'):
            samples['gitbackup_offsite_pending_snapshots'].append(
                (f'{{client="{client}"}}', c['offsite']['pending']))
            samples['gitbackup_offsite_lag_seconds'].append(
                (f'{{client="{client}"}}', c['offsite']['lag_seconds']))
            samples['gitbackup_offsite_missing'].append(
                (f'{{client="{client}"}}', len(c['offsite']['missing'])))
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
            samples['gitbackup_newest_backup_warnings'].append(
                (labels, len(r.get('stored_warnings', ()))))
            samples['gitbackup_status'].append(
                (labels, STATUS_NAMES.index(r['status'])))
            if r.get('last_drill'):
                samples['gitbackup_last_drill_timestamp_seconds'].append(
                    (labels, int(r['last_drill']['time'].timestamp())))
                samples['gitbackup_last_drill_success'].append(
                    (labels, int(r['last_drill']['ok'])))
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

# -- the HTML status page ---------------------------------------------------
#
# One static page: a banner with the worst state, counts per state, and a
# table of every series (client + source), worst first, each with a
# sparkline of its last HISTORY_DAYS.  Inline SVG and CSS only: no script,
# no network, no external file, so it can be served as a plain file or
# mailed.  Every client-provided string is escaped.


def report_html_time(value):
    """A datetime, or the ISO text a JSON report holds, -> datetime."""
    if isinstance(value, datetime.datetime):
        return value
    return parse_node_time(value)


def report_html_gaps(times, before, start, now, stale):
    """[(from, to)]: periods longer than stale (seconds) without a
    snapshot, clipped to the window start..now.  `times` sorted; `before`
    is the newest snapshot older than the window, or None."""
    gaps = []
    previous = before
    if not times and before is None:
        return [(start, now)]
    for when in list(times) + [now]:
        if previous is not None and when > previous and \
                (when - previous).total_seconds() > stale:
            gaps.append((max(previous, start), min(when, now)))
        previous = max(previous, when) if previous else when
    return [(a, b) for a, b in gaps if b > a]


def svg_series_points(history):
    """(snapshots, failures, drills) of one series, times parsed, entries
    without a readable time dropped: snapshots as sorted (time, size,
    seconds), failures as times, drills as (time, ok)."""
    snapshots = []
    for s in history.get('snapshots') or []:
        when = report_html_time(s.get('time'))
        if when:
            snapshots.append((when, s.get('size'), s.get('seconds')))
    snapshots.sort(key=lambda s: s[0])
    failures = [t for t in (report_html_time(f.get('time')) for f in
                            history.get('failures') or []) if t]
    drills = [(t, bool(d.get('ok'))) for t, d in
              ((report_html_time(d.get('time')), d) for d in
               history.get('drills') or []) if t]
    return snapshots, failures, drills


def svg_time_scale(start, now, width):
    """time -> x: the window start..now across the width, 1 pixel of
    margin on either side; times outside are clamped to the edge."""
    span = max((now - start).total_seconds(), 1)

    def x(when):
        offset = (when - start).total_seconds() / span * (width - 2) + 1
        return round(min(max(offset, 1), width - 1), 1)
    return x


def svg_size_scale(biggest, top, bottom):
    """size -> y: 0 at the bottom, the biggest at the top."""
    def y(size):
        if biggest <= 0:
            return bottom
        return round(bottom - size / biggest * (bottom - top), 1)
    return y


def svg_transfer_bars(snapshots, x, bottom, slowest):
    """Transfer time as grey bars from the bottom, the slowest 12 pixels
    high; [] when no snapshot knows its transfer time."""
    timed = [s for s in snapshots if isinstance(s[2], (int, float))]
    if not timed:
        return []
    # At most 12 pixels high; at least one, so that a transfer the
    # journal's one-second resolution rounds to 0 still shows.
    bars = ''.join(
        f'M{x(s[0])} {bottom}V'
        f'{round(bottom - max(s[2] / max(slowest, 1) * 12, 1), 1)}'
        for s in timed)
    return [f'<path class="transfer" d="{bars}" stroke="#7c8797" '
            f'stroke-width="1.5"/>']


def svg_size_points(sized, x, y, stale):
    """[(x, y, broken)]: one point per pixel column of the sized
    snapshots; broken where the line must start afresh (first point, or
    more than stale seconds after the snapshot before)."""
    # One point per pixel column keeps the page small with many
    # snapshots; drops are found on the full series.
    # The line is broken where a gap is: no slope drawn across it.
    columns = {}
    previous = None
    for when, size, _ in sized:
        broken = previous is None or \
            (when - previous).total_seconds() > stale
        if x(when) not in columns or broken:
            columns[x(when)] = (x(when), y(size), broken)
        else:
            columns[x(when)] = (x(when), y(size), columns[x(when)][2])
        previous = when
    return list(columns.values())


def svg_size_line(sized, x, y, stale):
    """Stored size as a blue line (with a dot per snapshot while there
    are few), a drop below SIZE_DROP of the snapshot before ringed red."""
    if not sized:
        return []
    parts = []
    points = svg_size_points(sized, x, y, stale)
    if len(points) > 1:
        parts.append('<path class="size" fill="none" stroke="#2563eb" '
                     'stroke-width="1.5" stroke-linejoin="round" d="' +
                     ''.join(f'{"M" if broken else "L"}{px} {py}'
                             for px, py, broken in points) + '"/>')
    if len(points) <= 60:
        parts.append('<path class="snapshot" stroke="#1d4ed8" '
                     'stroke-width="3" stroke-linecap="round" d="' +
                     ''.join(f'M{px} {py}h0' for px, py, _ in points) +
                     '"/>')
    for previous, current in zip(sized, sized[1:]):
        if previous[1] > 0 and current[1] < previous[1] * SIZE_DROP:
            parts.append(f'<circle class="drop" cx="{x(current[0])}" '
                         f'cy="{y(current[1])}" r="3" fill="none" '
                         f'stroke="#dc2626" stroke-width="1.5"/>')
    return parts


def svg_event_marks(unsized, failures, drills, x, middle, height):
    """Git fetches as dots on the middle line, failed requests as red
    vertical lines, drills as diamonds at the top (green ok, red
    failed)."""
    parts = []
    if unsized:
        # Git fetches: when they landed (size per fetch is not recorded).
        parts.append('<path class="snapshot" stroke="#1d4ed8" '
                     'stroke-width="3" stroke-linecap="round" d="' +
                     ''.join(f'M{x(s[0])} {middle}h0'
                             for s in unsized) + '"/>')
    if failures:
        parts.append('<path class="failure" stroke="#dc2626" '
                     'stroke-width="1.5" d="' +
                     ''.join(f'M{x(t)} 0V{height}' for t in failures) +
                     '"/>')
    for ok in (True, False):
        marks = [t for t, outcome in drills if outcome is ok]
        if marks:
            parts.append(
                f'<path class="drill {"ok" if ok else "failed"}" fill="'
                f'{"#16a34a" if ok else "#dc2626"}" stroke="#333" '
                'stroke-width="0.5" d="' +
                ''.join(f'M{x(t)} 0l3 3l-3 3l-3-3z' for t in marks) + '"/>')
    return parts


def svg_series_summary(label, days, stale, facts, sized, drills):
    """The sparkline's text for screen readers and tooltips: counts,
    newest and largest size, slowest transfer, failures, gaps, drills."""
    summary = [f'{label}: ' if label else '',
               f'{facts["snapshots"]} snapshot(s) in {days} days']
    if sized:
        summary.append(f', newest {core.human_size(sized[-1][1])}, largest '
                       f'{core.human_size(facts["largest"])}')
    if facts['slowest']:
        summary.append(f', slowest transfer {human_age(facts["slowest"])}')
    if facts['failures']:
        summary.append(f', {facts["failures"]} failed')
    if facts['gaps']:
        summary.append(f', {facts["gaps"]} gap(s) longer than '
                       f'{human_age(stale)}')
    if drills:
        summary.append(f', drills {sum(ok for _, ok in drills)} ok '
                       f'{sum(not ok for _, ok in drills)} failed')
    return ''.join(summary)


def svg_series(history, now, stale, days=HISTORY_DAYS, width=SVG_WIDTH,
               height=SVG_HEIGHT, label=''):
    """A sparkline of one series as inline SVG: restorable size per
    snapshot (blue line; a drop below SIZE_DROP of the snapshot before
    ringed red), transfer time (grey bars from the bottom), failed
    requests (red lines), drill outcomes (diamonds at the top: green ok, red failed;
    none drawn when there are none) and gaps longer than stale_after
    (amber bands).  `history` is one entry of report_history()'s
    'sources'; times may be datetimes or ISO text."""
    history = history or {}
    start = now - datetime.timedelta(days=days)
    x = svg_time_scale(start, now, width)
    snapshots, failures, drills = svg_series_points(history)
    gaps = report_html_gaps([s[0] for s in snapshots],
                            report_html_time(history.get('before')),
                            start, now, stale)
    top, bottom = (8 if drills else 3), height - 3
    parts = [f'<rect width="{width}" height="{height}" fill="#fbfbfb" '
             f'stroke="#c8c8c8"/>']
    for a, b in gaps:
        parts.append(f'<rect class="gap" x="{x(a)}" y="0" width="'
                     f'{max(round(x(b) - x(a), 1), 1.5)}" height="{height}" '
                     f'fill="#f59e0b" fill-opacity="0.35"/>')
    seconds = [s[2] for s in snapshots if isinstance(s[2], (int, float))]
    slowest = max(seconds or [0])
    parts += svg_transfer_bars(snapshots, x, bottom, slowest)
    sized = [s for s in snapshots if isinstance(s[1], (int, float))]
    biggest = max([s[1] for s in sized] or [0])
    parts += svg_size_line(sized, x, svg_size_scale(biggest, top, bottom),
                           stale)
    parts += svg_event_marks(
        [s for s in snapshots if not isinstance(s[1], (int, float))],
        failures, drills, x, round((top + bottom) / 2, 1), height)
    facts = {'snapshots': len(snapshots), 'failures': len(failures),
             'gaps': len(gaps), 'largest': biggest, 'slowest': slowest,
             'transfers': len(seconds)}
    title = html.escape(svg_series_summary(label, days, stale, facts, sized,
                                           drills))
    return (f'<svg class="series" xmlns="http://www.w3.org/2000/svg" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} '
            f'{height}" role="img" aria-label="{title}"><title>{title}'
            f'</title>{"".join(parts)}</svg>'), facts


def report_html_rows(report, now):
    """(level, client, source, cells, svg, caption, problems) per series,
    worst first, each at the status the report decided.  A client's own
    problems (it cannot be reached, its offsite copy is behind) are on its
    first row only, not repeated on each of its series."""
    rows = []
    for c in report['clients']:
        history = c.get('history') or {}
        stale = c.get('stale_after_seconds') or 86400
        for r in c['sources'] or [None]:
            level = STATUS_NAMES.index(r['status'] if r else c['status'])
            source = r['source'] if r else '-'
            svg, facts = svg_series(
                (history.get('sources') or {}).get(source), now, stale,
                days=history.get('days') or HISTORY_DAYS,
                label=f'{c["client"]} {source}')
            last = report_html_time(r['last_success']) if r else None
            cells = [c['client'], source, STATUS_NAMES[level].upper(),
                     core.isotime(last) if last else 'never',
                     human_age(r['age_seconds']) if r else '-',
                     core.human_size(r['size_bytes']) if r else '-',
                     str(r['count']) if r else '0',
                     str(r['failed'] if r else c['failed']),
                     str(r['pending'] if r else c['pending'])]
            caption = [f'max {core.human_size(facts["largest"])}'
                       if facts['largest'] else '',
                       f'xfer ≤ {human_age(facts["slowest"])}'
                       if facts['slowest'] else
                       'xfer < 1s' if facts['transfers'] else '',
                       f'{facts["failures"]} failed' if facts['failures']
                       else '',
                       f'{facts["gaps"]} gap(s)' if facts['gaps'] else '',
                       offsite_caption(c.get('offsite'))]
            rows.append([level, c['client'], source, cells, svg,
                         ' · '.join(p for p in caption if p),
                         list(r['problems']) if r else []])
    rows.sort(key=lambda row: (-row[0], row[1], row[2]))
    problems = {c['client']: c['problems'] for c in report['clients']}
    for row in rows:
        row[6] = problems.pop(row[1], []) + row[6]
    return [tuple(row) for row in rows]


def offsite_caption(lag):
    """The status page's word on a client's offsite copy ('' without
    [offsite])."""
    if not lag:
        return ''
    if lag.get('missing'):
        return f'offsite: {len(lag["missing"])} kept there, lost here'
    if not lag['pending']:
        return 'offsite up to date'
    return (f'offsite: {lag["pending"]} behind, oldest '
            f'{human_age(lag["lag_seconds"])}')


REPORT_HTML_STYLE = '''
body { font: 14px/1.35 sans-serif; margin: 0; color: #1f2328; }
header { position: sticky; top: 0; z-index: 2; background: #fff; }
.banner { padding: 0.7em 1.2em; font-size: 1.35em; font-weight: bold; }
.banner.ok { background: #15803d; color: #fff; }
.banner.warning { background: #f59e0b; color: #111; }
.banner.critical { background: #b91c1c; color: #fff; }
.summary { padding: 0.5em 1.2em; border-bottom: 1px solid #ccc; }
.count { display: inline-block; padding: 0.15em 0.6em; margin-right: 0.4em;
  border-radius: 0.8em; font-weight: bold; }
.count.ok { background: #dcfce7; } .count.warning { background: #fef3c7; }
.count.critical { background: #fee2e2; }
.legend { color: #555; font-size: 12px; margin-left: 1em; }
.legend i { display: inline-block; width: 1.1em; height: 0.7em;
  margin: 0 0.3em 0 0.8em; vertical-align: middle; }
.scroll { max-height: calc(100vh - 8.5em); overflow: auto; margin: 0 1.2em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2em 0.5em; text-align: left;
  white-space: nowrap; vertical-align: middle; }
th { background: #eee; position: sticky; top: 0; z-index: 1; }
td.problems { white-space: normal; min-width: 12em; max-width: 26em;
  font-size: 12px; overflow-wrap: break-word; }
td.history { padding: 2px 0.5em; line-height: 1; }
td.history svg { display: block; }
.caption { font-size: 10px; color: #555; }
tr.ok td.status { background: #15803d; color: #fff; }
tr.warning td.status { background: #f59e0b; color: #111; }
tr.critical td.status { background: #b91c1c; color: #fff; }
tr.warning td { background-color: #fffbeb; }
tr.critical td { background-color: #fef2f2; }
td.status { font-weight: bold; text-align: center; }
'''


def report_html_table_row(row):
    """One <tr> of the table: its cells escaped, the status cell marked,
    the sparkline with its caption, the problems."""
    e = html.escape
    level, client, source, cells, svg, caption, problems = row
    tds = ''.join(f'<td>{e(cell)}</td>' for cell in cells[:2])
    tds += f'<td class="status">{e(cells[2])}</td>'
    tds += ''.join(f'<td>{e(cell)}</td>' for cell in cells[3:])
    tds += (f'<td class="history">{svg}<span class="caption">'
            f'{e(caption)}</span></td>')
    tds += '<td class="problems">' + ''.join(
        f'<div>{e(p)}</div>' for p in problems) + '</td>'
    return (f'<tr class="{STATUS_NAMES[level]}" data-client="{e(client)}" '
            f'data-source="{e(source)}">{tds}</tr>')


def report_html_summary(report, rows):
    """The line under the banner: series per state as pills, clients per
    state (a client counts at its worst series), when the report was made,
    and the legend of the sparklines."""
    e = html.escape
    counts = [0, 0, 0]
    for row in rows:
        counts[row[0]] += 1
    client_levels = {}
    for row in rows:
        client_levels[row[1]] = max(client_levels.get(row[1], OK), row[0])
    client_counts = [list(client_levels.values()).count(level)
                     for level in (OK, WARNING, CRITICAL)]
    pills = ''.join(
        f'<span class="count {name}">{counts[level]} {name}</span>'
        for level, name in reversed(list(enumerate(STATUS_NAMES))))
    client_text = ', '.join(f'{client_counts[level]} {name}' for level, name
                            in reversed(list(enumerate(STATUS_NAMES))))
    legend = ''.join(
        f'<i style="background:{color}"></i>{e(text)}' for color, text in (
            ('#2563eb', 'restorable size'), ('#7c8797', 'transfer time'),
            ('#dc2626', 'failed request / size drop'),
            ('rgba(245,158,11,0.5)', 'gap > stale_after'),
            ('#16a34a', 'drill ok (red: failed)')))
    return f'''Series: {pills} Clients ({len(client_levels)}): {e(
        client_text)}. Generated {e(report["generated"])} (node time).
<span class="legend">{legend}</span>'''


def report_html(report):
    """A static, self-contained page (no scripts, no external files): the
    worst state as a coloured banner, counts per state, then one row per
    series, worst first, with a sparkline of its last HISTORY_DAYS."""
    e = html.escape
    now = report_html_time(report['generated']) or core.utcnow()
    rows = report_html_rows(report, now)
    worst = max([row[0] for row in rows] +
                [STATUS_NAMES.index(report['status'])])
    overall = STATUS_NAMES[worst]
    body = [report_html_table_row(row) for row in rows]
    head = ''.join(f'<th>{e(h)}</th>' for h in (
        'Client', 'Source', 'Status', 'Last good (node time)', 'Age', 'Size',
        'Backups', 'Failed', 'Pending', f'Last {HISTORY_DAYS} days',
        'Problems'))
    title = f'gitbackup: node {report["node"]}'
    return f'''<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="refresh" content="300">
<title>{e(overall.upper())} - {e(title)}</title>
<style>{REPORT_HTML_STYLE}</style>
</head>
<body>
<header>
<div id="overall" class="banner {overall}">{e(overall.upper())} &mdash; {e(
        title)}</div>
<div class="summary">{report_html_summary(report, rows)}</div>
</header>
<div class="scroll">
<table id="clients">
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
</div>
</body>
</html>
'''


REPORT_FORMATS = {'text': report_text, 'json': report_json,
                  'prometheus': report_prometheus, 'html': report_html,
                  'nagios': report_nagios}


def report_command(node, fmt='text', mail=False, output=None,
                   out=sys.stdout):
    """Print (or write atomically to output) the report; return the
    Nagios exit status: 0 ok, 1 warning, 2 critical, 3 unknown.

    Unknown means the check could not be made (data_dir unreadable,
    --output not writable): that says nothing about the backups, so it
    must not look like a warning.  The nagios format then still prints its
    status line, and --mail tells the admins."""
    try:
        report = build_report(node)
        text = REPORT_FORMATS[fmt](report)
        if output:
            atomic_write(output, text, mode=0o644)
        else:
            out.write(text)
    except BrokenPipeError:
        raise
    except (GitBackupError, OSError) as e:
        reason = f'could not check: {e}'
        log.error('report: %s', reason)
        if fmt == 'nagios':
            out.write(f'GITBACKUP UNKNOWN - {nagios_text(reason)}\n')
        if mail:
            core.mail_admins(node.config, 'server',
                           f'gitbackup: report of {node.name}: UNKNOWN',
                           reason + '\n')
        return UNKNOWN
    status = STATUS_NAMES.index(report['status'])
    if mail and status != OK:
        core.mail_admins(node.config, 'server',
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


def mail_test(node, out):
    """`check --connect --mail-test`: one message to the admins through
    the configured [mail] transport, said OK or FAILED with the fix (a
    failed one waits in the mail queue like any other)."""
    import sendmail  # here, as core.mail_admins does (it imports core)
    admins = node.config.admins('server')
    what = f'mail to {" ".join(admins) or "the admins"} ' \
        f'({node.config.section("mail").get("method") or "sendmail"})'
    if not admins:
        return core.connection_line(out, what, 'no admin in [server]: '
                                    'set admin = you@example.org')
    try:
        how = sendmail.send(f'gitbackup: mail test from node {node.name}',
                            f'check --connect --mail-test on {node.name} at '
                            f'{core.isotime()}: mail from this node reaches '
                            'you.\n', admins, node.config.section('mail'),
                            node.settings['log_dir'])
    except sendmail.MailError as e:
        return core.connection_line(out, what, f'{clean_text(e, 500)}; fix '
                                    f'[mail] in {node.config.path} (method, '
                                    'sendmail, smtp, from)')
    return core.connection_line(out, f'{what}: {how}', None)


# ==========================================================================
# 8. Access: who may push to which <client>.git
#
# Three ways, one guarantee (a client's key may only push to, and fetch
# from, its own repository):
#
# * gitosis: its gitosis.conf names the repositories; ``provision`` (run by
#   the gitosis-admin post-update hook) gives each one the ingest hook and
#   the ledger settings.
# * gitolite3: ``RW`` (never ``RW+``) per client; a repo-specific
#   post-update hook runs ``ingest "$GL_REPO"`` (see docs/access-control.md).
# * neither: ``gate <client>`` is the ssh forced command of the client's
#   key (``add-client`` writes that authorized_keys line).  Its structure
#   follows gitosis' serve.py: a side-effect-free gate_command() that checks
#   SSH_ORIGINAL_COMMAND against an allowlist and a strict pattern and
#   returns what to exec; main() creates the repository and execs.

class GateRefused(GitBackupError):
    """An ssh command the gate does not allow a client's key (told to the
    client on stderr, logged, exit 1).  Not core.AccessDenied, which is
    the other direction: ssh refusing the node's own login to a client."""


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
    optional, as gitosis allows).  Anything else raises GateRefused.
    Creates nothing: main() does that.
    """
    check_client_name(client)
    if original_command is None:
        raise GateRefused(f'no command: the key of {client} may only push '
                           f'to or fetch from {client}.git (no shell)')
    shown = clean_text(original_command, 200)
    if '\n' in original_command or '\r' in original_command or \
            '\0' in original_command:
        raise GateRefused(f'refused command {shown!r}: contains a newline')
    words = original_command.split(None, 1)
    if words and words[0] == 'git':
        rest = original_command.split(None, 2)
        if len(rest) == 3:
            words = [f'{rest[0]} {rest[1]}', rest[2]]
    if len(words) != 2 or words[0] not in GATE_VERBS:
        raise GateRefused(f'refused command {shown!r}: the key of {client} '
                           f'may only run git-upload-pack or '
                           f'git-receive-pack of {client}.git')
    match = GATE_PATH_RE.match(words[1].strip())
    if not match:
        raise GateRefused(f'refused command {shown!r}: unsafe repository '
                           'argument')
    name = match.group('name')
    if name.endswith('.git'):
        name = name[:-len('.git')]
    if name != client:
        raise GateRefused(f'refused command {shown!r}: the key of {client} '
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


# ==========================================================================
# 9. Check: is this node ready?
#
# `check [--connect]`: what an admin runs after installing or changing the
# configuration.  It only reads: the configuration, the tools, the
# directories, every [client NAME], stored times against the clock, the
# client repositories' permissions, and with --connect every connection
# `run` would make.


def check_node(node, out=sys.stdout, connect=False, mail=False):
    """server.py check: the configuration, tools, directories, every
    [client NAME], the clock and the repositories; with connect, every
    connection `run` makes and the offsite remote, and with mail one
    test message to the admins.  Returns the problems (each printed)."""
    if mail and not connect:
        raise UsageError('check: --mail-test goes with --connect')
    out.write(f'{node.config.path}: node {node.name}\n')
    out.write('restore --same-owner keeps: '
              + fs_archive.metadata_text(['tar']) + '\n')
    problems = check_node_settings(node) + check_client_sections(node)
    problems += check_clock(node)
    problems += unwritable_repositories(node)
    problems += core.log_file_problems(node.settings['log_dir'], [
        (name, account) for name, account in (
            ('server.py.log', core.owner_of(node.settings['data_dir'])),
            ('server-git.log', core.owner_of(node.settings['repositories'])))
        if account])
    for name in ('sftp', 'git'):
        try:
            core.load_module(node.config.modules_dir('server'), name)
        except core.ModuleError as e:
            problems.append(str(e))
    for p in problems:
        out.write(f'problem: {p}\n')
    # On a host that is a client too, its crontab shows backup-all.
    for warning in _schedule.backup_all_warnings(
            node.config.get_duration('server', 'stale_after'),
            '[server] stale_after') + unit_mail_warnings(node):
        out.write(f'warning: {warning}\n')
    if connect:
        problems += check_connections(node, out)
        problems += offsite_check_connection(node, out)
    if mail:
        problems += mail_test(node, out)
    if not problems:
        out.write(f'looks ready ({len(known_clients(node))} client(s): '
                  f'{len(node.config.client_sections())} configured, '
                  f'{len(node.pushing_clients())} with a repository or '
                  'pool)\n')
    return problems


def check_node_settings(node):
    """Problems of the tools, the directories and the [server] keys."""
    problems = []
    try:
        core.check_git_version()
    except GitBackupError as e:
        problems.append(str(e))
    for tool in ('sftp', 'ssh'):
        if not shutil.which(tool):
            problems.append(f'{tool}: not installed or not in PATH')
    problems += core.directory_problems('server', node.settings, (
        'todo_dir', 'data_dir', 'log_dir'))
    # The git account's (gitosis, gitolite, gate): `run` only writes into
    # each client repository, which unwritable_repositories checks.
    repositories = node.settings['repositories']
    if not os.path.isdir(repositories):
        problems.append(f'[server] repositories = {repositories}: no such '
                        'directory')
    elif not os.access(repositories, os.R_OK | os.X_OK):
        problems.append(f'[server] repositories = {repositories}: not '
                        'readable')
    for key in ('alert_after', 'stale_after', 'command_timeout',
                'keep_requests'):
        node.config.get_duration('server', key)
    for key in ('quota', 'free_space_floor'):
        node.config.get_size('server', key)
    for key in ('max_attempts', 'max_request_size',
                'max_requests_per_push', 'keep_daily', 'keep_weekly',
                'keep_monthly'):
        node.config.get_int('server', key)
    return problems


def check_client_sections(node):
    """Problems of each [client NAME]: a valid name, an sftp_root and a git
    URL whose scheme [server] git_protocols allows."""
    problems = []
    for client in node.config.client_sections():
        try:
            check_client_name(client)
            settings = node.client_settings(client)
        except GitBackupError as e:
            problems.append(f'[client {client}]: {e}')
            continue
        if not settings['sftp_root']:
            problems.append(f'[client {client}]: no sftp_root (here or '
                            'in [server]): sftp requests would fail')
        scheme = settings['git'].split('://', 1)[0]
        allowed = node.settings['git_protocols'].split()
        if '://' not in settings['git'] or scheme not in allowed or \
                scheme in ('file', 'ext'):
            problems.append(f'[client {client}] git = {settings["git"]}: '
                            f'want a URL whose scheme is one of '
                            f'[server] git_protocols ({", ".join(allowed)})')
    return problems


def unit_mail_warnings(node):
    """[mail] method = sendmail while the node's timers (which run with
    NoNewPrivileges=yes) are enabled: a sendmail that needs a set-id
    helper (Postfix, Exim) cannot queue their mail."""
    sendmail = core.sendmail   # the one modules/_core.py imports
    mail = node.config.section('mail')
    timers = _schedule.enabled_timers('gitbackup-server-*.timer')
    program = mail.get('sendmail') or sendmail.DEFAULT_SENDMAIL
    helper = sendmail.setid_helper(program)
    if mail.get('method') != 'sendmail' or not timers or not helper:
        return []
    return [f'[mail] method = sendmail: {", ".join(timers)} run with '
            f'NoNewPrivileges=yes, under which {program} cannot use the '
            f'set-id {helper}; their mail would only queue: use method '
            f'= smtp (the default)']


def check_connections(node, out):
    """`check --connect`: for every configured client, each connection
    `run` makes (sftp login into sftp_root; its git server when
    [client NAME] git is set), one line each, OK or FAILED with the
    fix.  Returns the failures."""
    problems = []
    modules_dir = node.config.modules_dir('server')
    for client in sorted(node.config.client_sections()):
        try:
            check_client_name(client)
            ctx = NodeContext(node, client, None, False)
        except GitBackupError as e:
            problems += core.connection_line(out, client, str(e))
            continue
        names = ['sftp'] + (['git'] if node.config.section(
            f'client {client}').get('git') else [])
        for name in names:
            try:
                module = core.load_module(modules_dir, name)
            except core.ModuleError as e:
                problems += core.connection_line(out, client, str(e))
                continue
            if module.has('check_connection'):
                for what, problem in \
                        module.python.check_connection(ctx):
                    problems += core.connection_line(out, what, problem)
    return problems


def unwritable_repositories(node):
    """Client repositories this user cannot write: `run` writes each
    client's results into its repository (objects and a ref), so every
    directory under objects/ and refs/ must be writable, e.g. through
    the git account's group (docs/access-control.md)."""
    problems = []
    for client in node.pushing_clients():
        repo = node.repository(client)
        if not os.path.isdir(repo):
            continue
        for where in [repo] + [d for top in ('objects', 'refs') for d in
                               walk_dirs(os.path.join(repo, top))]:
            if not os.access(where, os.W_OK | os.X_OK):
                problems.append(
                    f'{repo}: {where} is not writable by '
                    f'{core.user_name(os.geteuid())}: the results of '
                    f'client {client} cannot be recorded (share the '
                    'repository through the git account\'s group: see '
                    'docs/access-control.md)')
                break
    return problems


def check_clock(node):
    """Stored times ahead of the node's clock: it was (or is) wrong."""
    problems = []
    now = core.utcnow()
    for client in known_clients(node):
        for source, backups in stored_backups(node, client).items():
            good = [b for b in backups if b.good and b.time]
            problems += [f'{client}/{source}: {note}' for note in
                         arrival_last_success(good, now)[1]
                         if 'future' in note]
    return problems


# ==========================================================================
# 10. Command line
#
# The parser lists the commands in the order of the chapters above; main()
# and the COMMANDS table are the only places that call into every chapter.

def build_parser():
    parser = argparse.ArgumentParser(
        prog='server.py', formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split('\n\n')[0] + '\n\n' + '''\
Typical crontab of the backup user on the node:
  */5 * * * *  server.py run -q
  0 0 8 * *    server.py gc -q
  30 3 * * *   server.py prune -q
  0 4 * * 0    server.py verify -q >/dev/null
  0 5 * * 0    server.py drill -q >/dev/null
  0 7 * * *    server.py report -q --mail >/dev/null
  30 4 * * *   server.py offsite -q         (after prune; if [offsite])
  0 6 * * 0    server.py verify --offsite -q >/dev/null   (if [offsite])
and the post-update hook of every client repository <client>.git:
  exec python3 /path/to/server.py --config /path/backup.ini ingest <client>

Exit status: 0 success, 1 failure, 2 bad usage or configuration;
report and verify: 0 ok, 1 warning, 2 critical (Nagios); report: 3 unknown
(could not check).  Commands that write (all but check, report, list,
find, ls, diff and restore) refuse a user who neither owns todo_dir, data_dir
and log_dir nor shares them through their setgid group (root too): exit 2.

Python 3.8 or later (client.py: 3.6 or later); `make test` runs a node on
3.8 with a client on 3.6.''')
    core.common_options(parser, suppress=False)
    parser.add_argument('--version', action='version', version=core.VERSION)
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True

    def command(name, help, description=''):
        p = sub.add_parser(name, help=help, description=description or help,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        core.common_options(p, suppress=True)
        return p

    # In the order of the chapters, as --help lists them.
    pipeline_parsers(command)
    keep_parsers(command)
    offsite_parser(command)
    restore_parsers(command)
    browse_parsers(command)
    drill_parser(command)
    report_parser(command)
    access_parsers(command)
    check_parser(command)
    return parser


def pipeline_parsers(command):
    """ingest and run: the request pipeline of the node (1, 3)."""
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


def retry_parser(command):
    """retry: given-up requests put back."""
    p = command('retry', 'put given-up (X*) requests of a client back',
                'Put a request given up after max_attempts (X* in '
                'todo_dir/<client>/, counted under\nFAILED in `report`) back '
                'as RQ* with a fresh attempt count; the next `run`\nhandles '
                'it and sends the new outcome to the client.  The old reason '
                'is kept in\ntodo_dir/<client>/.attempts/<key>.history.')
    p.add_argument('client', help='the client')
    p.add_argument('key', nargs='?', help='the request key (the file name '
                   'without X)')
    p.add_argument('--all-failed', action='store_true',
                   help='every given-up request of the client')


def keep_parsers(command):
    """retry, gc, prune and verify: what keeps the store healthy (4)."""
    retry_parser(command)
    p = command('gc', 'git gc of every mirror and client repository; the '
                'log is mailed (cron, monthly)',
                'Run `git gc` on every stored mirror (data_dir/<client>/git/'
                '**.git) and every client\nrepository (repositories/*.git).  '
                'The collected log is written to\nlog_dir/git-gc-<time>.log '
                'and mailed to the admins.  Exit 1 if any gc failed.')
    p.add_argument('--aggressive', action='store_true',
                   help='git gc --aggressive (slow; as the seed did)')
    p = command('prune', 'apply retention to stored backups and old '
                'request files (cron, daily)',
                'Per series, on node time: keep the newest backup of each of '
                'the last keep_daily\ndays, keep_weekly ISO weeks and '
                'keep_monthly months ([client NAME], else\n[server]); never '
                'the newest good backup, nor a link a kept increment needs;\n'
                'remove the rest.  Git mirrors are never pruned; '
                'directories without a\nreadable manifest are left for '
                'verify.\nF* and X* request files (with .reason and '
                'attempts) older than keep_requests\nare removed, and '
                'staging directories a crash left behind (files/.incoming/,\n'
                'git/**/.<name>.git.incoming).  Every removal is printed.\n'
                'A chain goes from its newest link down (a prune killed '
                'midway leaves no\nincrement without its base).  A client '
                'whose snapshots a drill, verify,\nrestore or offsite is '
                'reading is waited for ([server] prune_wait), then\nskipped '
                '(and said so).')
    p.add_argument('--dry-run', action='store_true',
                   help='print what would be removed; remove nothing')
    p.add_argument('--snapshot', nargs=3, metavar=('CLIENT', 'SOURCE',
                                                   'SNAPSHOT'),
                   help='remove this one snapshot on purpose, here and (at '
                   'the next offsite run) on the offsite remote; refused '
                   'while an increment builds on it')
    p = command('verify', 're-hash stored files, git fsck, sample restore '
                'check (cron, weekly)',
                'Re-hash every stored file against its manifest (sha256 and '
                'size); git fsck every\nmirror and client repository; read '
                'the newest backup of each series back\nthrough the module '
                'that stored it (tar --list of archives, pg_restore --list\n'
                'of .dump files; a file no module claims: "hashes only"); '
                'every broken\nincremental chain.  Problems are '
                'printed and mailed.  Exit status like report:\n0 ok, 1 '
                'warning (a check could not run), 2 critical (corruption).')
    p.add_argument('--client', help='only this client')
    p.add_argument('--offsite', action='store_true',
                   help='check the [offsite] remote instead (cron, weekly): '
                   'rclone check\n(cryptcheck) of every snapshot against '
                   'this node\'s copy, every index read back,\nbundles '
                   're-hashed within command_timeout; what is damaged or '
                   'missing\nthere is copied again while this node holds '
                   'it')
    p.add_argument('--no-restore-check', dest='restore',
                   action='store_false',
                   help='skip the tar/pg_restore read-back')


def offsite_parser(command):
    """offsite: the second copy (5)."""
    p = command('offsite', 'copy new snapshots and changed mirrors to the '
                '[offsite] rclone remote (cron, daily after prune)',
                'Copy every stored snapshot not yet offsite (rclone copy, '
                'never sync) to\n<remote>/<client>/files/<source>/<snapshot>/'
                ' and check it (rclone check, or\nrclone cryptcheck for a '
                'crypt remote); a git mirror whose refs changed goes\nas one '
                'verified `git bundle --all` to <remote>/<client>/git/<path>'
                '.git/, its\nolder bundles removed after.  A snapshot prune '
                'removed here (by its journal,\ndata_dir/<client>/pruned.jsonl) is '
                'removed there; nothing else is ever deleted:\na snapshot '
                'or mirror lost here otherwise is kept there and reported '
                'critical.\nEach source gets an index there (index.json) '
                'that list, restore and\n--rebuild read.  Journal: '
                'data_dir/<client>/offsite.jsonl.  -q prints only problems.'
                '\n\n'
                '--fetch CLIENT SOURCE SNAPSHOT DIR downloads one snapshot '
                'into DIR (absent or\nempty) and checks every file against '
                'its manifest\'s sha256.')
    p.add_argument('--fetch', nargs=4, metavar=('CLIENT', 'SOURCE',
                                                'SNAPSHOT', 'DIR'),
                   help='get one snapshot back from the remote into DIR')
    p.add_argument('--rebuild', nargs='?', const='', metavar='CLIENT',
                   help='put every snapshot and mirror the remote holds of '
                   'CLIENT (default: of every client) back into data_dir: '
                   'a lost node rebuilt (README, "When the node is lost")')


RESTORE_HELP = (
    'Restore a snapshot of <client> <source> (default: the '
    'newest).\n'
    '  directory archive (an incremental one with its chain): '
    'the whole chain is\n    judged first and refused, naming '
    'the member, if anything in it would\n    write outside DIR '
    'or through a symlink.  --to DIR extracts it as the\n    '
    'running user: no device nodes, no setuid/setgid bits, only '
    'user.* xattrs\n    (named in a warning) unless --same-owner '
    '(root, into a root-owned DIR).\n'
    '    --stdout writes one plain tar stream of the restored tree, '
    'exact (owners,\n    modes, devices, sparse files, xattrs, '
    'ACLs, ns times) whoever runs it:\n'
    '      server.py restore c1 app --stdout | ssh root@c1 tar -x '
    '--xattrs \\\n        --xattrs-include=\'*\' --acls '
    '--numeric-owner -C /srv/restore\n'
    '    --path PATH (repeatable): only that file or directory.\n'
    '  a database, exactly (roles first, then the database '
    'with its owner,\n    encoding, locale, settings and ACL): '
    '--database NAME --stdout | psql\n'
    '      server.py restore c1 postgresdb --database shop '
    '--stdout |\n'
    '          ssh root@c1 sudo -u postgres psql -X -d postgres\n'
    '    (--globals --stdout alone: the roles and tablespaces, '
    'for a whole cluster)\n'
    '  one file (a dump, globals.sql): --file NAME --stdout\n'
    '  git mirror (source git/<path>): --to DIR clones every ref '
    '(refs/preserved/*\n    included), --stdout writes a git '
    'bundle; with --at, the refs it had\n    then (from its '
    'reflogs and preserved refs), or a refusal saying why.\n'
    'Every file read is checked against its sha256 first; a '
    'damaged snapshot is\nrefused unless --force.  DIR may exist '
    'only if empty; a refused or stopped\nrestore leaves nothing '
    'in it.  Bounds: size (what the listings declare, x2),\n'
    '[server] free_space_floor, command_timeout.')


def restore_parsers(command):
    """The parsers of list and restore."""
    p = command('list', 'the snapshots this node holds',
                'Every stored snapshot (and git mirror): node time, source, '
                'kind (full, incremental\nwith its base, file, git), size, '
                'files, the last verify and drill outcome.\nSNAPSHOT is the '
                'name restore --at and drill reports use.')
    p.add_argument('client', nargs='?', help='only this client')
    p.add_argument('source', nargs='?', help='only this source (e.g. app, '
                   'postgresdb, git/proj)')
    p.add_argument('--format', choices=('text', 'json'), default='text')
    p.add_argument('--from', dest='origin', choices=('local', 'offsite'),
                   default='local', help='offsite: what the [offsite] '
                   'remote holds, read from its indexes (also on a node '
                   'that holds nothing)')
    p = command('restore', 'get a backup back', RESTORE_HELP)
    p.add_argument('client')
    p.add_argument('source')
    p.add_argument('--at', metavar='TIME', help='a snapshot name as list '
                   'prints it, or an ISO date/time (2026-11-20 = end of that '
                   'day, 2026-11-20T13:00Z, 20261120T130000Z; UTC unless an '
                   'offset is given): the newest snapshot stored at or '
                   'before it')
    p.add_argument('--file', metavar='NAME', help='one stored file of the '
                   'snapshot')
    p.add_argument('--path', metavar='PATH', action='append',
                   help='only this file or directory of an archive (at any '
                   'point of a chain; repeatable); a path the snapshot does '
                   'not hold is refused, naming the nearest snapshot that '
                   'does')
    p.add_argument('--same-owner', action='store_true',
                   help='with --to, as root into a directory root owns: '
                   'restore owners, setuid/setgid bits, device nodes and '
                   'every xattr namespace (default: left out, named in a '
                   'warning)')
    p.add_argument('--database', metavar='NAME', help='postgresdb: a psql '
                   'script that creates the roles, then the database NAME '
                   'exactly as it was (owner, encoding, locale, settings, '
                   'ACL); with --stdout')
    p.add_argument('--globals', action='store_true', help='postgresdb: '
                   'only the roles and tablespaces (globals.sql), for a '
                   'whole-cluster restore; with --stdout')
    p.add_argument('--to', metavar='DIR', help='restore into DIR (created; '
                   'may exist if empty)')
    p.add_argument('--stdout', action='store_true',
                   help='write a tar stream, the file, or a git bundle')
    p.add_argument('--force', action='store_true',
                   help='restore a snapshot whose sha256 does not match')
    p.add_argument('--from', dest='origin', choices=('local', 'offsite'),
                   default='local', help='offsite: fetch the snapshot --at '
                   'chooses, with its whole chain, from the [offsite] '
                   'remote (every sha256 checked, damaged data refused), '
                   'then restore it as above; works on a node that holds '
                   'nothing')


def browse_parsers(command):
    """The parsers of find, ls and diff (nothing is extracted)."""
    p = command('find', 'which snapshots hold a path',
                'Every snapshot in which a path matching the shell PATTERN '
                'exists (matched\nagainst the path below the source\'s root '
                'and against its base name):\nsource, snapshot, whether it '
                'changed in that snapshot, type, mode, owner,\nsize, mtime, '
                'path.  Read from listings and manifests, nothing extracted.'
                '\n  server.py find c1 app \'report*.odt\'      a file a '
                'user deleted: the\n                                        '
                'newest snapshot listed holds it\n'
                'Exit 0 found, 1 nothing found (or a snapshot could not be '
                'read).')
    p.usage = 'server.py find [options] CLIENT [SOURCE] PATTERN'
    p.add_argument('client', metavar='CLIENT')
    p.add_argument('words', nargs='+', metavar='[SOURCE] PATTERN',
                   help='only this source (default: every one); the shell '
                   'pattern')
    p.add_argument('--format', choices=('text', 'json'), default='text')
    p = command('ls', 'the tree a snapshot restores',
                'The tree as the chain (full, then each increment, deletions '
                'and renames\nincluded) restores it at --at (default: the '
                'newest), below PATH.\n  server.py ls c1 app --at 2026-11-20 '
                'www/uploads')
    p.add_argument('client')
    p.add_argument('source')
    p.add_argument('path', nargs='?', metavar='PATH')
    p.add_argument('--at', metavar='TIME', help='as for restore')
    p.add_argument('--format', choices=('text', 'json'), default='text')
    p = command('diff', 'what changed between two snapshots',
                'Paths added (+), removed (-) and changed (M: type, size, '
                'mode, owner,\nmtime or link target) from SNAP_A to SNAP_B '
                '(snapshot names or times as\nfor restore --at).\n'
                '  server.py diff c1 app 2026-11-19 2026-11-20   what changed '
                'last night')
    p.add_argument('client')
    p.add_argument('source')
    p.add_argument('snap_a', metavar='SNAP_A')
    p.add_argument('snap_b', metavar='SNAP_B')
    p.add_argument('--format', choices=('text', 'json'), default='text')


def drill_parser(command):
    """The parser of drill."""
    p = command('drill', 'restore the newest snapshot of every series and '
                'prove it (cron, weekly)',
                'Into a scratch directory on the node, per client: every '
                'archive is restored\n(its chain) and compared entry by '
                'entry with the tree its listings describe\n(type, size, '
                'mode, mtime, xattrs and ACLs where recorded); every dump '
                'is\nrestored into a scratch PostgreSQL cluster when '
                '[server] drill_postgres names\nthe server programs (roles '
                'of the globals first, the dump by a role that is\nno '
                'superuser, over a private socket), and its row counts must '
                'equal the\nexact counts the client took (else read back with '
                'pg_restore --list); every\ngit mirror is cloned, fsck\'d and '
                'must hold every tip the client announced.\nOutcomes go to '
                'data_dir/<client>/drills.jsonl (report shows them); failures'
                '\nare printed with the snapshot\'s list name and mailed.  One '
                'bad snapshot is\none failure: the drill goes on with the next '
                'series and client.  Exit 0 ok,\n2 critical.')
    p.add_argument('client', nargs='?', help='only this client')


def report_parser(command):
    """report: the status page, mail and monitoring check."""
    p = command('report', 'status per client and source; exit 0/1/2/3 like '
                'a Nagios check',
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
                'Exit status (Nagios plugin convention), whatever the '
                'format:\n'
                '  0 OK        every source ok\n'
                '  1 WARNING   a source is warning, none critical\n'
                '  2 CRITICAL  a source is critical\n'
                '  3 UNKNOWN   could not check (data_dir unreadable, '
                '--output not writable)\n'
                'As for every other command, bad usage or a configuration '
                'file that cannot be\nread exits 2 before any check: it '
                'shows as critical.\n\n'
                'Formats: text (a table), json, nagios (a plugin status line\n'
                '"GITBACKUP OK - ... | \'c1/app_age\'=300s;172800;345600;0; '
                '..." and one line per\nproblem; for check_by_ssh or NRPE), '
                'prometheus (node_exporter textfile\ncollector; use --output '
                '/var/lib/prometheus/node-exporter/gitbackup.prom), html\n'
                '(a static self-contained page for any web server).')
    p.add_argument('--format', choices=sorted(REPORT_FORMATS),
                   default='text', help='output format (default: text)')
    p.add_argument('--mail', action='store_true',
                   help='mail the text report to the admins when not ok')
    p.add_argument('--output', metavar='PATH',
                   help='write to PATH (replaced atomically) instead of '
                   'stdout')


def access_parsers(command):
    """provision, gate and add-client: who may push where."""
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


def check_parser(command):
    """check: is this node ready (9)."""
    p = command('check', 'test the configuration and environment',
                'Test the configuration, directories and tools; exit 1 when '
                'anything is wrong.\nThe node counts every [client NAME] '
                'section, with or without a repository.')
    p.add_argument('--connect', action='store_true',
                   help='also make every connection `run` makes, for each '
                   '[client NAME]: the sftp\nlogin into sftp_root (key '
                   'authorized, host key known), and the git server\nat '
                   '[client NAME] git when set; one line each, OK or FAILED '
                   'with the fix;\nand the [offsite] remote (a listing, a '
                   'small write, read and delete)')
    p.add_argument('--mail-test', action='store_true',
                   help='with --connect: also send one test message to the '
                   'admins through [mail]')


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args, extras = parser.parse_known_args(argv)
        if extras and not take_trailing_operands(args, extras):
            parser.error(f'unrecognized arguments: {" ".join(extras)}')
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    # ingest runs as the git user from a hook: files it creates must stay
    # readable and renamable by the backup user's group.
    if args.command in GIT_SIDE_COMMANDS:
        os.umask(0o002)
    core.setup_logging(None, 'server.py', args.verbose, args.quiet)
    return core.guarded(lambda: run_command(args))


def take_trailing_operands(args, extras):
    """argparse gives an optional operand its empty value before it sees
    an option, so `ls CLIENT SOURCE --at TIME PATH` and `find CLIENT
    --format json PATTERN` leave PATH and PATTERN over: they are taken
    here, as SPEC's command lines write them.  False if extras are not
    such operands."""
    if any(word.startswith('-') for word in extras):
        return False
    if args.command == 'ls' and args.path is None and len(extras) == 1:
        args.path = extras[0]
        return True
    if args.command == 'find' and len(args.words) + len(extras) <= 2:
        args.words += extras
        return True
    return False


def gate_exec(node, client):
    """The forced command: check, create the repository if need be, exec."""
    argv = gate_command(node, client, os.environ.get('SSH_ORIGINAL_COMMAND'))
    if gate_needs_repository(node, client):
        node.ensure_repository(client)
    log.debug('gate %s: exec %s', client, shlex.join(argv))
    os.execvp(argv[0], argv)


def run_cron(node):
    node.reap_scratch()
    return core.exclusive(
        node.settings['log_dir'], 'run', lambda: 1 if node.run() else 0,
        2 * node.config.get_duration('server', 'command_timeout'))


COMMANDS = {
    'ingest': lambda n, a: n.ingest(a.client, a.repository) and 0,
    'check': lambda n, a: 1 if check_node(n, connect=a.connect,
                                          mail=a.mail_test) else 0,
    # -- access control
    'provision': lambda n, a: 1 if provision(n, a.gitosis_conf) else 0,
    'add-client': lambda n, a: add_client(
        n, a.client, a.public_key, a.authorized_keys) and 0,
    'gate': lambda n, a: gate_exec(n, a.client),
    # -- operations
    'run': lambda n, a: run_cron(n),
    'gc': lambda n, a: 1 if gc_command(n, a.aggressive) else 0,
    'report': lambda n, a: report_command(n, a.format, a.mail, a.output),
    'prune': lambda n, a: core.exclusive(
        n.settings['log_dir'], 'prune',
        lambda: prune_snapshot(n, *a.snapshot) if a.snapshot else
        1 if prune_command(n, a.dry_run) else 0),
    'verify': lambda n, a: offsite_verify_command(n, a.client)
    if a.offsite else verify_command(n, a.client, a.restore),
    # -- offsite
    'offsite': lambda n, a: offsite_cli(n, a),
    'retry': lambda n, a: retry_command(n, a.client, a.key,
                                        a.all_failed) and 0,
    # -- list, restore, drill
    'list': lambda n, a: list_command(n, a.client, a.source, a.format,
                                      origin=a.origin),
    'restore': lambda n, a: restore_command(n, a),
    'drill': lambda n, a: n.reap_scratch() or drill_command(n, a.client),
    'find': lambda n, a: find_command(n, a.client, a.words, a.format),
    'ls': lambda n, a: ls_command(n, a.client, a.source, a.at, a.path,
                                  a.format),
    'diff': lambda n, a: diff_command(n, a.client, a.source, a.snap_a,
                                      a.snap_b, a.format),
}
# Commands that write nothing another run needs to change (restore writes
# only where --to says, as whoever runs it); every other command is refused
# to a user who does not own the directories it writes (check_run_user).
READING_COMMANDS = ('check', 'report', 'list', 'restore', 'find', 'ls',
                    'diff')
# The cron jobs: at [server] priority (idle), with all they start.
BACKGROUND_COMMANDS = ('run', 'verify', 'drill', 'gc', 'prune', 'offsite')


def run_command(args):
    config = core.Config(core.find_config(args.config, __file__),
                         side='server')
    node = Node(config)
    # The git account runs ingest/gate/provision: its own log file, so
    # that neither account needs to write the other's.
    git_side = args.command in GIT_SIDE_COMMANDS
    if args.command not in READING_COMMANDS:
        # The right account: the owner of the repositories for the git
        # side, of the stored data for the rest (todo_dir and log_dir are
        # shared by both through the git group).
        core.check_run_user('server.py', args.command, 'server', node.settings,
                            ('todo_dir', 'log_dir', 'repositories')
                            if git_side else
                            ('todo_dir', 'data_dir', 'log_dir'),
                            'repositories' if git_side else 'data_dir')
    core.setup_logging(node.settings['log_dir'], 'server.py',
                       args.verbose, args.quiet,
                       create=args.command != 'check',
                       log_name='server-git.log' if git_side else None)
    if args.command in BACKGROUND_COMMANDS:
        core.lower_priority('server', node.settings)
    # Not on the hook's path (ingest, gate): a push must not pay one more
    # git process for it; check and the cron commands say it.
    if args.command not in ('check', 'report', 'ingest', 'gate'):
        core.check_git_version()   # check reports it as a problem
    # Scratch trees and clusters a killed restore or drill left behind
    # (run and drill reap them themselves, first of all).
    if args.command in ('restore', 'prune'):
        node.reap_scratch()
    return COMMANDS[args.command](node, args)


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
