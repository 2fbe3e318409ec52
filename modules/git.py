"""git: back up a git repository that the client exports with git daemon.

Client side, ``git <repository>`` accepts only a repository below
``[client] git_base`` (resolved real paths, so no symlink or '..' leads out
of it) and emits the server request ``git <git_export>/<relative path> head=<sha>``
(the commit HEAD named, which the node checks its mirror holds); it
prepares no data, since git daemon (or ssh, https) already serves the
repository.  A repository's ``post-update`` hook runs
``client.py commit git "$PWD"``, so every push is backed up (see
docs/modules.md).

Node side, the request is validated strictly and only its *path* is used:
it must lie below the path of the node's own base URL for the client
(``[client NAME] git``, default ``git://NAME``); scheme, host and port of
the request are ignored (a client and its node may spell the host
differently), so a request can never make the node fetch from anywhere
else.  The path is made of plain segments (letters, digits, ``._+-``, none
starting with '.' or '-'); ``file://``, ``ext::``, scp-style and bare paths
are refused and kept as X*.

The repository is mirrored into ``data_dir/<client>/git/<path>.git`` (a
trailing ``.git`` of the path is not doubled).  The first backup creates the
mirror under a temporary name and renames it into place; later ones fetch
into it.  Every fetch is hardened: only the protocols of ``[server]
git_protocols`` (never file or ext), ``--`` before the URL, no submodules,
``transfer.fsckObjects``, no terminal prompts, the node's ssh_command and
command_timeout; bwlimit caps it over ssh and git:// (_throttle.py as
git's transport).  Branches, tags and notes are mirrored with
``fetch --prune``; nothing a client does destroys history the node already
has: before a fetch the refs are recorded (in the mirror, so a crash cannot
lose them), and every ref that the fetch deletes or moves to a commit that
does not contain the old one (a force-push, a moved tag) keeps its old tip
as ``refs/preserved/<node time>/<ref>``.  The client cannot write below
``refs/preserved/``: only heads, tags and notes are fetched.
"""

import calendar
import contextlib
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

# Protocols a node may ever fetch with; [server] git_protocols picks among
# them.  file:// and ext:: would let a URL reach the node's own disk or run
# a program: never.
NETWORK_PROTOCOLS = ('git', 'ssh', 'http', 'https')
# What a request's URL may look like: scheme://authority/path.
URL_RE = re.compile(r'(?P<scheme>[a-z][a-z0-9+.-]{0,15})://'
                    r'(?P<authority>[A-Za-z0-9._~@:\[\]-]{0,255})'
                    r'(?P<path>/[^\s]{0,1000})?')
SEGMENT_RE = re.compile(r'[A-Za-z0-9_][A-Za-z0-9._+-]{0,127}')
MAX_DEPTH = 16
# Only these are mirrored (and pruned).  refs/preserved/ is the node's own.
REFSPECS = ('+refs/heads/*:refs/heads/*', '+refs/tags/*:refs/tags/*',
            '+refs/notes/*:refs/notes/*')
MIRRORED = ('refs/heads/', 'refs/tags/', 'refs/notes/')
PRESERVED = 'refs/preserved/'
# The refs before a fetch, kept until their changes are preserved.
SNAPSHOT = 'gitbackup-refs-before-fetch'
# Moved refs that the bulk walk cannot decide get one merge-base each, up
# to this many (see moved_forward).
MAX_ANCESTRY_CHECKS = 16
# The rate limiter git runs as its transport when bwlimit is set (see
# throttle_fetch); beside us, wherever the modules are installed.
THROTTLE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        '_throttle.py')


# --------------------------------------------------------------------------
# Both sides

def check_relative_path(rel):
    """The path of a repository below the git base: plain segments joined
    by '/', no '.', '..', hidden or option-like names; only the last one
    may end in .git.  Returns an error message, or None if it is fine."""
    segments = rel.split('/')
    if not rel or len(rel) > 1000 or len(segments) > MAX_DEPTH:
        return 'empty or too long'
    for i, segment in enumerate(segments):
        if not SEGMENT_RE.fullmatch(segment):
            return (f'segment {segment!r} is not plain (letters, digits, '
                    '._+-, not starting with . or -)')
        if segment.endswith('.git') and i < len(segments) - 1:
            return f'repository {segment!r} nested in a path'
    if segments[-1] == '.git' or segments[-1].endswith('.lock'):
        return f'bad last segment {segments[-1]!r}'
    return None


def is_git_dir(path):
    """What git itself checks: HEAD, objects/ and refs/."""
    return os.path.isfile(os.path.join(path, 'HEAD')) and \
        os.path.isdir(os.path.join(path, 'objects')) and \
        os.path.isdir(os.path.join(path, 'refs'))


# --------------------------------------------------------------------------
# Client

def check_path(ctx, module, path):
    """A git repository below git_base, as a resolved real path.  Called by
    ``commit`` from hooks: no git process, only a few stat calls."""
    settings = ctx.settings
    if not settings.get('git_base'):
        raise ValueError('[client] git_base is not set: the git module '
                         'backs up repositories below it')
    if not settings.get('git_export'):
        raise ValueError('[client] git_export is not set: nodes need the '
                         'URL under which git_base is exported')
    base = os.path.realpath(settings['git_base'])
    real = os.path.realpath(path)
    # A hook of a non-bare repository runs in its .git directory; git
    # daemon finds <path>/.git by itself.
    if os.path.basename(real) == '.git' and is_git_dir(real):
        real = os.path.dirname(real)
    if not (real + '/').startswith(base.rstrip('/') + '/') or real == base:
        raise ValueError(f'{path}: not below git_base {base} (resolved: '
                         f'{real})')
    if not (is_git_dir(real) or is_git_dir(os.path.join(real, '.git'))):
        raise ValueError(f'{path}: not a git repository')
    rel = os.path.relpath(real, base)
    problem = check_relative_path(rel)
    if problem:
        raise ValueError(f'{path}: {rel} cannot be backed up by name: '
                         f'{problem}')
    return real


def repositories_below(base):
    """Every repository below base (bare, or a work tree with .git), as
    real paths, not looking inside one, MAX_DEPTH levels at most."""
    base = os.path.realpath(base)
    found = []
    for parent, dirs, _ in os.walk(base):
        depth = parent[len(base):].count('/')
        if parent != base and (is_git_dir(parent) or
                               is_git_dir(os.path.join(parent, '.git'))):
            found.append(parent)
            dirs[:] = []
        elif depth >= MAX_DEPTH:
            dirs[:] = []
        dirs.sort()
    return found


def refs_digest(ctx, repo):
    """sha256 of the repository's refs (one `git for-each-ref`): what
    changes when anything is pushed to it; None without any ref (nothing
    to back up yet).  safe.directory: the repository belongs to its git
    account, not to the one running send."""
    out = ctx.run(['git', '-c', f'safe.directory={repo}', '-C', repo,
                   'for-each-ref', '--format=%(objectname) %(refname)'],
                  timeout=60).stdout
    if not out.strip():
        return None
    return hashlib.sha256(out.encode('utf-8', 'surrogateescape')).hexdigest()


def prepare(ctx, module, path):
    try:
        real = check_path(ctx.client, module, path)
    except ValueError as e:
        raise ctx.ModuleError(str(e)) from None
    rel = os.path.relpath(real, os.path.realpath(ctx.settings['git_base']))
    line = f'git {ctx.settings["git_export"].rstrip("/")}/{rel}'
    head = client_head(ctx, real)
    yield 'git', line + (f' head={head}' if head else '')


def client_head(ctx, repo):
    """The commit HEAD names now, announced so that the node can check its
    mirror holds it (and its drill, that a restore does); None for an
    empty repository.  safe.directory: the repository belongs to its git
    account, not to the one preparing the backup."""
    proc = ctx.run(['git', '-c', f'safe.directory={repo}', '-C', repo,
                    'rev-parse', '--verify', '--quiet', 'HEAD^{commit}'],
                   check=False, timeout=60)
    head = proc.stdout.strip()
    return head if proc.returncode == 0 and re.fullmatch(
        r'[0-9a-f]{40}(?:[0-9a-f]{24})?', head) else None


# --------------------------------------------------------------------------
# Node

def base_url(ctx):
    """(scheme, path) of the node's base URL for this client; a protocol
    the node does not allow is the node's configuration error."""
    base = ctx.settings['git']
    m = URL_RE.fullmatch(base)
    if not m or not m.group('authority'):
        raise ctx.Misconfigured(
            f'[client {ctx.client}] git = {base!r} is not a URL like '
            'git://host, ssh://user@host/path or https://host/path')
    allowed = allowed_protocols(ctx)
    if m.group('scheme') not in allowed:
        raise ctx.Misconfigured(
            f'[client {ctx.client}] git = {base}: protocol '
            f'{m.group("scheme")!r} is not in [server] git_protocols '
            f'({" ".join(allowed) or "empty"})')
    return m.group('scheme'), (m.group('path') or '').rstrip('/')


def allowed_protocols(ctx):
    words = ctx.config.section('server')['git_protocols'].split()
    refused = [w for w in words if w not in NETWORK_PROTOCOLS]
    if refused:
        ctx.log.warning('[server] git_protocols: ignoring %s (only %s are '
                        'possible)', ' '.join(refused),
                        ' '.join(NETWORK_PROTOCOLS))
    return [w for w in words if w in NETWORK_PROTOCOLS]


def requested_path(ctx, url, base_path):
    """The repository path a request names, relative to the node's base."""
    m = URL_RE.fullmatch(url)
    if not m:
        ctx.refuse(f'not a git URL: {url!r} (want scheme://host/path; '
                   'file paths, scp-style and ext:: are refused)')
    if m.group('scheme') not in NETWORK_PROTOCOLS:
        ctx.refuse(f'protocol {m.group("scheme")!r} refused in {url!r}')
    path = m.group('path') or ''
    prefix = base_path + '/'
    if not path.startswith(prefix):
        ctx.refuse(f'{url!r}: path not below {prefix!r}, the path of '
                   f'[client {ctx.client}] git')
    rel = path[len(prefix):]
    problem = check_relative_path(rel)
    if problem:
        ctx.refuse(f'{url!r}: bad repository path {rel!r}: {problem}')
    return rel


def request_source(settings, rest):
    """The source a request line feeds, for the node's report of pending
    and failed requests: ``git/<path>`` of the mirror it would fill (only
    the URL's path counts, below the path of the node's base URL for the
    client, as handle takes it), else ``git``."""
    words = (rest or '').split()
    url = URL_RE.fullmatch(words[0]) if words else None
    base = URL_RE.fullmatch(settings.get('git') or '')
    if not url:
        return 'git'
    prefix = ((base.group('path') if base else '') or '').rstrip('/') + '/'
    path = url.group('path') or ''
    rel = path[len(prefix):] if path.startswith(prefix) else ''
    if not rel or check_relative_path(rel):
        return 'git'
    return 'git/' + (rel[:-len('.git')] if rel.endswith('.git') else rel)


def git_environment(ctx, protocols):
    env = {k: v for k, v in os.environ.items()
           if k not in ('GIT_DIR', 'GIT_WORK_TREE', 'GIT_INDEX_FILE',
                        'GIT_OBJECT_DIRECTORY', 'GIT_COMMON_DIR',
                        'GIT_ALTERNATE_OBJECT_DIRECTORIES', 'GIT_NAMESPACE',
                        'GIT_CONFIG_PARAMETERS', 'GIT_CONFIG_COUNT')}
    env.update({
        # Overrides any protocol.*.allow configuration, like -c below.
        'GIT_ALLOW_PROTOCOL': ':'.join(protocols),
        'GIT_PROTOCOL_FROM_USER': '0',
        'GIT_TERMINAL_PROMPT': '0',
        # Bounded connect and keepalives: a client that accepts and never
        # answers costs connect_timeout, not command_timeout.
        'GIT_SSH_COMMAND': ' '.join([
            ctx.config.section('server')['ssh_command'],
            *ctx.ssh_timeout_options()]),
        # http(s): a transfer slower than 1 byte/s for stall_timeout stops.
        'GIT_HTTP_LOW_SPEED_LIMIT': '1',
        'GIT_HTTP_LOW_SPEED_TIME': str(ctx.config.get_duration(
            'server', 'stall_timeout', '10m')),
        'LC_ALL': 'C',  # ctx.connection_lost reads English messages
    })
    return env


def hardening(protocols):
    options = ['-c', 'protocol.allow=never']
    for p in protocols:
        options += ['-c', f'protocol.{p}.allow=always']
    # Redirects off: a client's server answering 302 must not make the
    # node mirror a repository from another host or port.
    return options + ['-c', 'http.followRedirects=false',
                      '-c', 'transfer.fsckObjects=true',
                      '-c', 'fetch.fsckObjects=true',
                      '-c', 'fetch.recurseSubmodules=false',
                      '-c', 'submodule.recurse=false']


def git(ctx, mirror, *args, check=True, **kwargs):
    kwargs.setdefault('timeout', ctx.timeout)
    proc = ctx.run([*ctx.git_program(), f'--git-dir={mirror}', *args],
                   check=False, **kwargs)
    if check and proc.returncode != 0:
        raise ctx.TransientError(
            f'git {" ".join(args[:2])} in {mirror} failed (exit '
            f'{proc.returncode}): '
            f'{ctx.clean_text(proc.stderr.strip()[-1000:], 1000)}')
    return proc


def list_refs(ctx, mirror, prefixes=MIRRORED):
    out = git(ctx, mirror, 'for-each-ref',
              '--format=%(objectname) %(refname)').stdout
    refs = {}
    for line in out.splitlines():
        sha, _, ref = line.partition(' ')
        if ref.startswith(prefixes):
            refs[ref] = sha
    return refs


def fetch(ctx, mirror, url, protocols, allowance=None):
    # A stall or command_timeout raises TimedOut: the client is treated as
    # unreachable for the rest of the run (its other requests wait).
    # allowance: the bytes the quota and free-space floor leave (None: no
    # cap); a pack growing past it is stopped and removed.
    proc = fetch_process(ctx, mirror, url, protocols, allowance)
    if proc.returncode != 0:
        # Cannot connect at all: the client is down, not the request bad;
        # ssh refusing the login waits for a human (alerted at once).
        hint = ''
        if ctx.access_denied(proc.stderr):
            error, hint = ctx.AccessDenied, f' ({ctx.ACCESS_DENIED_HINT})'
        elif ctx.connection_lost(proc.stderr):
            error = ctx.Unreachable
        else:
            error = ctx.TransientError
        if re.search(r'returned error: 30[1-8]', proc.stderr):
            hint = (' (the server redirects; the node follows no redirect: '
                    f'set [client {ctx.client}] git to the final URL)')
        raise error(f'git fetch from {url} failed (exit {proc.returncode}): '
                    f'{ctx.clean_text(proc.stderr.strip()[-1000:], 1000)}'
                    f'{hint}')


def check_connection(ctx):
    """`server.py check --connect`: whether the client's git server (git
    daemon, ssh, https) answers at [client NAME] git.  Listing the base URL
    itself: an answer such as "repository not exported" proves the server
    up; only a refused connection or login fails.  Returns [(what was
    tried, '' or what fails and how to fix it)]."""
    if ctx.side != 'server':
        return []
    url = ctx.settings['git']
    what = f'{ctx.client}: git server at {url}'
    try:
        scheme, _ = base_url(ctx)
    except ctx.Misconfigured as e:
        return [(what, str(e))]
    protocols = allowed_protocols(ctx)
    try:
        proc = ctx.run(['git', *hardening(protocols), 'ls-remote', '--',
                        url + '/'], env=git_environment(ctx, protocols),
                       check=False, timeout=120)
    except ctx.CommandFailed as e:
        return [(what, ctx.clean_text(str(e)))]
    if proc.returncode == 0 or not (ctx.access_denied(proc.stderr) or
                                    ctx.connection_lost(proc.stderr)):
        return [(what, '')]
    m = URL_RE.fullmatch(url)
    authority = m.group('authority') if m else url
    host, _, port = authority.rpartition('@')[2].partition(':')
    if scheme == 'ssh':
        return [(what, ctx.ssh_problem(
            proc.stderr, authority.partition(':')[0], port or 22,
            "add the node's public key to the client account's "
            'authorized_keys'))]
    return [(what, f'{ctx.clean_text(proc.stderr.strip(), 300)}: '
             f'nothing answers at {url}: start the git server on {host} '
             f'(git daemon: see docs/modules.md), open port '
             f'{port or {"git": 9418, "http": 80}.get(scheme, 443)} to the '
             f'node, or fix [client {ctx.client}] git')]


def fetch_process(ctx, mirror, url, protocols, allowance=None):
    env = git_environment(ctx, protocols)
    # unpackLimit=1: whatever the client sends arrives as one pack,
    # written as objects/pack/tmp_pack_* while it comes, whose size the
    # watch holds against the allowance (never thousands of loose files).
    pack_dir = os.path.join(mirror, 'objects', 'pack')
    return run_transfer(ctx, [*ctx.git_program(), *hardening(protocols),
                              *throttle_fetch(ctx, url, env),
                              '-c', 'fetch.unpackLimit=1',
                              f'--git-dir={mirror}', 'fetch', '--prune',
                              '--no-recurse-submodules', '--quiet', '--',
                              url, *REFSPECS],
                        env, f'git fetch from {url}',
                        None if allowance is None else (pack_dir, allowance))


def throttle_fetch(ctx, url, env):
    """Cap the fetch at [client NAME] bwlimit (else [server] bwlimit),
    Kbit/s, as sftp -l caps sftp: neither ssh nor git has a rate option,
    so git's transport runs through _throttle.py.  ssh: GIT_SSH_COMMAND
    (updated in env) wraps the node's ssh command; git://: git's proxy
    command makes the connection.  http(s) stays uncapped (git offers no
    hook there).  Returns the extra git options; none without a limit."""
    limit = ctx.settings.get('bwlimit') or 0
    scheme = url.partition('://')[0]
    if limit <= 0 or scheme not in ('ssh', 'git'):
        return []
    program = [sys.executable, THROTTLE, str(limit)]
    if scheme == 'ssh':
        ssh = env['GIT_SSH_COMMAND']
        env['GIT_SSH_COMMAND'] = (ctx.shell_line([*program, '--']) + ' '
                                  + ssh)
        # git tells OpenSSH by the command's first word, now python's; as
        # it would have decided, else it probes with `-G` (harmless).
        if os.path.basename(shlex.split(ssh)[0]) == 'ssh':
            env.setdefault('GIT_SSH_VARIANT', 'ssh')
        return []
    proxy = git_proxy(ctx, program)
    return ['-c', f'core.gitProxy={proxy}'] if proxy else []


def git_proxy(ctx, program):
    """A shell script in the node's state directory that runs program in
    --connect mode: git runs core.gitProxy as one program (no shell, no
    arguments of ours), with HOST PORT.  None (and a warning: the fetch
    is then uncapped) where it cannot be run, e.g. a noexec mount."""
    path = os.path.join(ctx.node.state_dir, f'git-proxy-{program[-1]}')
    text = ('#!/bin/sh\n# Written by gitbackup (modules/git.py): git:// '
            'fetches at bwlimit.\n'
            f'exec {ctx.shell_line(program)} --connect "$@"\n')
    try:
        with open(path, encoding='utf-8') as f:
            current = f.read()
    except OSError:
        current = None
    if current != text:
        ctx.make_dirs(ctx.node.state_dir)
        ctx.atomic_write(path, text, mode=0o755)
    if not os.access(path, os.X_OK):
        ctx.log.warning('%s: cannot run %s (noexec mount?): git:// fetch '
                        'not capped at bwlimit', ctx.client, path)
        return None
    return path


def run_transfer(ctx, args, env, what, size_cap=None):
    """Run a git command that talks to the client, like ctx.run with
    check=False, but stopped (its whole process group) when none of its
    processes has read a byte for [server] stall_timeout, or after
    command_timeout: git:// and ssh have no stall bound of their own (git's
    low-speed limit covers http only).  Raises ctx.TimedOut.  size_cap:
    (pack directory, bytes): a pack arriving there that grows past the
    bytes is stopped and removed (ctx.TransientError)."""
    stall = ctx.config.get_duration('server', 'stall_timeout', '10m')
    ctx.log.debug('running: %s', ' '.join(args))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err,
                                    start_new_session=True)
        except FileNotFoundError:
            raise ctx.ModuleError('git: not installed or not in PATH') \
                from None
        stopped = watch_reads(ctx, proc, stall, size_cap)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(
            args, proc.returncode,
            out.read().decode('utf-8', 'surrogateescape'),
            err.read().decode('utf-8', 'replace'))
    if stopped and size_cap and stopped.startswith('the pack'):
        remove_partial_packs(size_cap[0])
        raise ctx.TransientError(f'{what}: {stopped}; stopped')
    if stopped:
        raise ctx.TimedOut(f'{what}: {stopped}; stopped')
    return result


def partial_pack_size(pack_dir):
    """Bytes of the packs being received into pack_dir (index-pack's
    tmp_pack_* files)."""
    try:
        names = os.listdir(pack_dir)
    except FileNotFoundError:
        return 0
    total = 0
    for name in names:
        if name.startswith('tmp_pack_'):
            try:
                total += os.path.getsize(os.path.join(pack_dir, name))
            except FileNotFoundError:
                pass
    return total


def remove_partial_packs(pack_dir):
    """What a stopped index-pack left: it must not keep the disk full."""
    for name in os.listdir(pack_dir) if os.path.isdir(pack_dir) else ():
        if name.startswith(('tmp_pack_', 'tmp_idx_', 'tmp_rev_')):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(pack_dir, name))


def watch_reads(ctx, proc, stall, size_cap=None):
    """Wait for proc; kill its process group when it read nothing for
    stall seconds, outlived ctx.timeout, or its pack outgrew size_cap.
    Returns why, or None."""
    deadline = time.monotonic() + ctx.timeout
    last_read, last_progress = -1, time.monotonic()
    while proc.poll() is None:
        now = time.monotonic()
        read = bytes_read(proc.pid)
        if read != last_read:
            last_read, last_progress = read, now
        why = None
        if now > deadline:
            why = f'still running after {ctx.timeout} s ([server] ' \
                  'command_timeout)'
        elif now - last_progress > stall:
            why = f'no data for {stall} s ([server] stall_timeout)'
        elif size_cap and partial_pack_size(size_cap[0]) > size_cap[1]:
            why = (f'the pack passed the {size_cap[1]} bytes the quota and '
                   'free-space floor leave for this client')
        if why:
            ctx.kill_tree(proc)
            return why
        time.sleep(0.2)
    return None


def bytes_read(group):
    """Bytes read so far by the processes of a process group (git, its
    ssh, index-pack...), from /proc.  Where /proc tells nothing, a value
    that always changes: then only command_timeout bounds the transfer."""
    total, seen = 0, False
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/stat') as f:
                if int(f.read().rpartition(')')[2].split()[2]) != group:
                    continue
            with open(f'/proc/{pid}/io') as f:
                total += int(f.read().split('rchar:')[1].split()[0])
                seen = True
        except (OSError, ValueError, IndexError):
            continue
    return total if seen else time.monotonic()


def remote_refs(ctx, url, protocols):
    """One ls-remote before the fetch: (the branch HEAD names or None,
    how many refs the fetch would mirror), or (None, None) when it fails
    (the fetch then says why)."""
    proc = run_transfer(ctx, ['git', *hardening(protocols), 'ls-remote',
                              '--symref', '--', url],
                        git_environment(ctx, protocols), f'git ls-remote {url}')
    if proc.returncode != 0:
        ctx.log.debug('ls-remote %s: %s', url, proc.stderr.strip()[-300:])
        return None, None
    m = re.search(r'^ref: (refs/heads/\S+)\tHEAD$', proc.stdout, re.M)
    count = 0
    for line in proc.stdout.splitlines():
        ref = line.partition('\t')[2]
        if ref.startswith(MIRRORED) and not ref.endswith('^{}'):
            count += 1
    return (m.group(1) if m else None), count


def check_ref_count(ctx, url, count):
    """Refuse a repository with more refs than max_refs: each costs the
    node work at every fetch and a file or line in the mirror."""
    cap = ctx.settings['max_refs']
    if cap and count is not None and count > cap:
        ctx.refuse(f'{url} has {count} refs (branches, tags, notes), more '
                   f'than max_refs {cap} ([client {ctx.client}] max_refs or '
                   '[server] max_refs); the mirror was not changed')


def follow_head(ctx, mirror, head, refs):
    """Point the mirror's HEAD where the client's points (for cgit and
    clones); without an answer from the client it stays as it is."""
    if head in refs:
        git(ctx, mirror, 'symbolic-ref', 'HEAD', head)


def node_stamp():
    """Node time for preserved ref names (no ':' allowed in refs)."""
    return time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())


def preserve(ctx, mirror, before, after):
    """Keep the old tip of every ref that was deleted or rewritten, all
    created by one ``update-ref --stdin`` transaction; the number of git
    processes does not grow with the number of refs (moved_forward)."""
    already, stamps = {}, set()
    for ref, sha in list_refs(ctx, mirror, (PRESERVED,)).items():
        parts = ref.split('/', 3)
        if len(parts) == 4:
            stamps.add(parts[2])
            already.setdefault(parts[3], set()).add(sha)
    changed = {ref: (old, after.get(ref)) for ref, old in before.items()
               if after.get(ref) != old and old not in already.get(ref, ())}
    # A moved tag is always kept; a moved branch or notes ref only when
    # its new tip does not contain the old one (a fast-forward loses
    # nothing).
    forward = moved_forward(ctx, mirror, {
        ref: pair for ref, pair in changed.items()
        if pair[1] is not None and not ref.startswith('refs/tags/')})
    lost = {ref: old for ref, (old, _) in sorted(changed.items())
            if ref not in forward}
    if not lost:
        return []
    stamp = node_stamp()
    stamp = next(s for s in (stamp, *(f'{stamp}.{n}' for n in
                                      range(2, len(stamps) + 3)))
                 if s not in stamps)
    names = {ref: f'{PRESERVED}{stamp}/{ref}' for ref in lost}
    # One transaction: all preserved refs exist, or none and a retry.
    proc = git(ctx, mirror, 'update-ref', '-m', 'gitbackup: preserved',
               '--stdin', check=False, input=''.join(
                   f'create {names[ref]} {old}\n' for ref, old in lost.items()))
    if proc.returncode != 0:
        raise ctx.TransientError(
            f'{mirror}: cannot create {len(lost)} preserved refs: '
            f'{ctx.clean_text(proc.stderr.strip()[-500:], 500)}')
    for n, (ref, old) in enumerate(lost.items()):
        if n == 10:
            ctx.log.warning('%s: %s: %d more refs rewritten or deleted, old '
                            'tips kept below %s%s/', ctx.client, mirror,
                            len(lost) - n, PRESERVED, stamp)
            break
        what = 'deleted' if changed[ref][1] is None else 'rewritten'
        ctx.log.warning('%s: %s: %s by the client; old tip %s kept as %s',
                        ctx.client, mirror, what, old[:12], names[ref])
    return list(names.values())


def moved_forward(ctx, mirror, moved):
    """The refs of moved ({ref: (old tip, new tip)}) whose new tip
    contains the old one.

    One ``rev-list`` walks from the new and old tips down to the old tips'
    parents: what the fetch added and what was rewritten, not the whole
    history.  An old tip that is in the walk is an ancestor of a new tip
    exactly when a path inside the walk leads there (every commit on such
    a path descends from it, so none is cut off); ``reachable_olds``
    follows the paths for all old tips at once, as bit sets.  An old tip
    below another old tip's parent is not in the walk: up to
    MAX_ANCESTRY_CHECKS such refs get a ``merge-base --is-ancestor``
    each, the others count as rewritten (a spare preserved ref costs
    nothing, a lost tip everything)."""
    if not moved:
        return set()
    olds = sorted({old for old, _ in moved.values()})
    starts = sorted({new for _, new in moved.values()} | set(olds))
    walk = git(ctx, mirror, 'rev-list', '--parents', '--topo-order',
               '--stdin', check=False, input=''.join(
                   [f'{c}\n' for c in starts] + [f'^{c}^@\n' for c in olds]))
    if walk.returncode != 0:
        ctx.log.warning('%s: rev-list failed, every moved ref counts as '
                        'rewritten: %s', mirror, walk.stderr.strip()[-300:])
        return set()
    bits, reach = reachable_olds(walk.stdout, olds)
    forward, hidden = set(), []
    for ref, (old, new) in sorted(moved.items()):
        if old not in reach:
            hidden.append(ref)
        elif reach.get(new, 0) & bits[old]:
            forward.add(ref)
    for ref in hidden[:MAX_ANCESTRY_CHECKS]:
        old, new = moved[ref]
        if git(ctx, mirror, 'merge-base', '--is-ancestor', old, new,
               check=False).returncode == 0:
            forward.add(ref)
    if len(hidden) > MAX_ANCESTRY_CHECKS:
        ctx.log.info('%s: %d moved refs preserved without an ancestry '
                     'check', mirror, len(hidden) - MAX_ANCESTRY_CHECKS)
    return forward


def reachable_olds(walk, olds):
    """({old: its bit}, {commit: bits of the old tips it reaches}) from
    ``rev-list --parents --topo-order`` output (children first, so read
    backwards every parent comes before its children)."""
    bits = {old: 1 << n for n, old in enumerate(olds)}
    reach = {}
    for line in reversed(walk.splitlines()):
        commit, *parents = line.split()
        found = bits.get(commit, 0)
        for parent in parents:
            found |= reach.get(parent, 0)
        if found:
            reach[commit] = found
    return bits, reach


def create_mirror(ctx, mirror, url, protocols, allowance=None):
    """First backup: an empty bare repository under a temporary name,
    filled by the same hardened fetch, then renamed into place."""
    head, count = remote_refs(ctx, url, protocols)
    check_ref_count(ctx, url, count)
    parent = os.path.dirname(mirror)
    ctx.make_dirs(parent)
    tmp = os.path.join(parent, '.' + os.path.basename(mirror) + '.incoming')
    shutil.rmtree(tmp, ignore_errors=True)
    ctx.run([*ctx.git_program(), 'init', '--quiet', '--bare', tmp],
            timeout=ctx.timeout)
    # 'always': tags get a reflog too, so that `restore --at` knows when
    # each ref came (refs_at); kept for as long as the mirror.
    for key, value in (('core.logAllRefUpdates', 'always'),
                       ('gc.reflogExpire', 'never'),
                       ('gc.reflogExpireUnreachable', 'never'),
                       ('transfer.fsckObjects', 'true'),
                       ('fetch.fsckObjects', 'true'),
                       ('gc.auto', '0')):
        git(ctx, tmp, 'config', key, value)
    fetch(ctx, tmp, url, protocols, allowance)
    refs = list_refs(ctx, tmp)
    if over_cap(ctx, refs):
        # More refs than ls-remote showed: the client added some meanwhile.
        shutil.rmtree(tmp)
        check_ref_count(ctx, url, len(refs))
    follow_head(ctx, tmp, head, refs)
    os.rename(tmp, mirror)
    ctx.fsync_dir(parent)
    return refs


def over_cap(ctx, refs):
    return bool(ctx.settings['max_refs']) and \
        len(refs) > ctx.settings['max_refs']


def restore_refs(ctx, mirror, before, after):
    """Put the mirrored refs back as they were before the fetch, in one
    transaction (a fetch that brought more than max_refs)."""
    lines = [f'update {ref} {sha}\n' for ref, sha in sorted(before.items())
             if after.get(ref) != sha]
    lines += [f'delete {ref}\n' for ref in sorted(after) if ref not in before]
    git(ctx, mirror, 'update-ref', '-m', 'gitbackup: over max_refs',
        '--stdin', input=''.join(lines))


def update_mirror(ctx, mirror, url, protocols, allowance=None):
    """Later backups: fetch --prune, preserving what it would lose."""
    snapshot = os.path.join(mirror, SNAPSHOT)
    preserved = []
    if os.path.exists(snapshot):
        # A run died after fetching: preserve against that old state first.
        old = {}
        with open(snapshot, encoding='utf-8') as f:
            for line in f.read().splitlines():
                sha, _, ref = line.partition(' ')
                if ref.startswith(MIRRORED):
                    old[ref] = sha
        preserved += preserve(ctx, mirror, old, list_refs(ctx, mirror))
        os.unlink(snapshot)
    head, count = remote_refs(ctx, url, protocols)
    check_ref_count(ctx, url, count)
    ctx.pause_point('run:listed-refs')
    before = list_refs(ctx, mirror)
    ctx.atomic_write(snapshot, ''.join(f'{sha} {ref}\n'
                                       for ref, sha in before.items()))
    fetch(ctx, mirror, url, protocols, allowance)
    after = list_refs(ctx, mirror)
    if over_cap(ctx, after):
        # The client added refs after ls-remote: undo, then refuse.
        restore_refs(ctx, mirror, before, after)
        os.unlink(snapshot)
        check_ref_count(ctx, url, len(after))
    preserved += preserve(ctx, mirror, before, after)
    os.unlink(snapshot)
    follow_head(ctx, mirror, head, after)
    return after, preserved


# One reflog line: old and new tip, the committer, seconds, zone, message.
REFLOG_RE = re.compile(r'^([0-9a-f]{40,64}) ([0-9a-f]{40,64}) [^\t]*> '
                       r'([0-9]{1,12}) [+-][0-9]{4}(?:\t|$)')
STAMP_RE = re.compile(r'^([0-9]{8}T[0-9]{6}Z)(?:\.[0-9]+)?$')


def reflog(mirror, ref):
    """[(old tip, new tip, seconds)] of a ref's reflog, oldest first."""
    path = os.path.join(mirror, 'logs', *ref.split('/'))
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            lines = f.read(64 * 1024 * 1024).splitlines()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    return [(m.group(1), m.group(2), int(m.group(3)))
            for m in map(REFLOG_RE.match, lines) if m]


def preserved_at(refs):
    """{mirrored ref: [(seconds, old tip, preserved ref)]} of the refs
    below refs/preserved/<stamp>/, oldest first."""
    kept = {}
    for name, sha in refs.items():
        parts = name.split('/', 3)
        m = STAMP_RE.match(parts[2]) if len(parts) == 4 and \
            name.startswith(PRESERVED) else None
        if m:
            when = calendar.timegm(time.strptime(m.group(1),
                                                 '%Y%m%dT%H%M%SZ'))
            kept.setdefault(parts[3], []).append((when, sha, name))
    return {ref: sorted(v) for ref, v in kept.items()}


def ref_at(log, preserved, when):
    """(tip or None, how) of one ref at `when` from its reflog and the
    tips preserved when it was deleted or rewritten later; how is
    'known', 'assumed' (deleted later: its tip then is the one preserved
    first after `when`, but when it was created died with its reflog) or
    'unknown'."""
    before = [new for old, new, t in log if t <= when]
    if before:
        return (None if set(before[-1]) == {'0'} else before[-1]), 'known'
    later = [sha for t, sha, _ in preserved if t > when and
             (not log or t <= log[0][2])]
    if later:
        return later[0], 'known' if log else 'assumed'
    if log and set(log[0][0]) == {'0'}:
        return None, 'known'        # created after `when`
    return None, 'unknown'


def refs_at(mirror, refs, when):
    """The refs of a mirror (refs: every {ref: tip} it has now) as they
    were at `when` (seconds since the epoch), from its reflogs and
    preserved refs: ({ref: tip}, [refs no record tells], [refs assumed],
    first record in seconds or None).  Assumed: a tag with no reflog
    (fetched before tags had one) is taken as there at its tip (a tag
    that moved was preserved, so only whether it already existed is
    unknown); a ref deleted since is taken as there at its preserved
    tip."""
    preserved = preserved_at(refs)
    found, unknown, assumed, first = {}, [], [], None
    for ref in sorted(set(r for r in refs if r.startswith(MIRRORED)) |
                      set(preserved)):
        log = reflog(mirror, ref)
        if log:
            first = min(first or log[0][2], log[0][2])
        tip, how = ref_at(log, preserved.get(ref, []), when)
        if how == 'unknown' and not log and ref in refs and \
                ref.startswith('refs/tags/'):
            tip, how = refs[ref], 'assumed'
        if how == 'unknown':
            unknown.append(ref)
        elif how == 'assumed':
            assumed.append(ref)
        if tip and how != 'unknown':
            found[ref] = tip
    for kept in preserved.values():
        found.update((name, sha) for t, sha, name in kept if t <= when)
    return found, unknown, assumed, first


def check_tips(ctx, mirror, heads):
    """Every tip the client announced must be in the mirror after the
    fetch; one missing means the fetch did not get what the client had."""
    for head in heads:
        if git(ctx, mirror, 'cat-file', '-e', f'{head}^{{commit}}',
               check=False).returncode != 0:
            raise ctx.TransientError(f'{mirror}: the client announced '
                                     f'{head}, but the mirror lacks it '
                                     'after the fetch')


def handle(ctx, rest):
    words = (rest or '').split(' ')
    options = ctx.parse_options(words[1:])
    rest = words[0]
    if not rest:
        ctx.refuse(f'git request wants one URL, got {rest!r}')
    heads = [options['head']] if 'head' in options else []
    _, base_path = base_url(ctx)
    rel = requested_path(ctx, rest, base_path)
    protocols = allowed_protocols(ctx)
    url = f'{ctx.settings["git"].rstrip("/")}/{rel}'
    name = rel[:-len('.git')] if rel.endswith('.git') else rel
    root = os.path.join(ctx.client_dir, 'git')
    mirror = os.path.normpath(os.path.join(root, name + '.git'))
    if not mirror.startswith(root + os.sep):
        ctx.refuse(f'{rest!r}: leads outside {root}')
    allowance = ctx.check_space(0)
    if rest != url:
        ctx.log.debug('%s: request names %s; fetching from %s (the node\'s '
                      '[client %s] git)', ctx.client, rest, url, ctx.client)
    if os.path.lexists(mirror):
        if not is_git_dir(mirror):
            raise ctx.TransientError(f'{mirror} exists but is not a git '
                                     'repository; move it away')
        refs, preserved = update_mirror(ctx, mirror, url, protocols,
                                        allowance)
    else:
        refs, preserved = create_mirror(ctx, mirror, url, protocols,
                                        allowance), []
    check_tips(ctx, mirror, heads)
    ctx.log.info('%s: mirrored %s into %s (%d refs%s)', ctx.client, url,
                 mirror, len(refs),
                 f', {len(preserved)} preserved' if preserved else '')
    return {'stored': mirror, 'refs': len(refs), 'preserved': preserved,
            'heads': heads}


# -- node side: proving a mirror --------------------------------------------
# A mirror is no file in a snapshot: the node asks this module about every
# repository under data_dir/<client>/git/ (and its own request
# repositories, which are git repositories too).

def verify_stored(path, timeout):
    """`verify`'s proof of a repository: git fsck (objects and
    connectivity).  Raises ValueError with git's last lines when it
    fails."""
    proc = subprocess.run(
        ['git', '-c', f'safe.directory={path}', f'--git-dir={path}', 'fsck',
         '--no-progress', '--no-dangling'], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
    if proc.returncode != 0:
        detail = '\n'.join('    ' + line for line in
                           (proc.stderr + proc.stdout).strip()
                           .splitlines()[-20:])
        raise ValueError(f'git fsck failed (exit {proc.returncode}):\n'
                         f'{detail}')


def drill_stored(ctx, names, scratch):
    """`drill`'s proof of a mirror (ctx.snapshot): clone it, fsck the
    clone, find every tip the client announced (ctx.heads) in it.  A clone
    carries only what refs reach: a tip only in loose objects of the
    mirror does not count.  Returns (problems, what was proven)."""
    repo = ctx.snapshot
    clone = os.path.join(scratch, 'clone.git')
    ctx.run([*ctx.git_program(), '-c', f'safe.directory={repo}', 'clone',
             '--quiet', '--mirror', '--no-hardlinks', '--', repo, clone],
            timeout=ctx.timeout)
    problems = []
    proc = git(ctx, clone, 'fsck', '--no-progress', '--no-dangling',
               check=False)
    if proc.returncode != 0:
        problems.append(f'git fsck of the clone failed: '
                        f'{ctx.clean_text(proc.stderr, 500)}')
    for head in ctx.heads:
        if git(ctx, clone, 'cat-file', '-e', f'{head}^{{commit}}',
               check=False).returncode != 0:
            problems.append(f'announced tip {head} is not in the restored '
                            'clone')
    return problems, f'cloned, fsck passed, {len(ctx.heads)} announced ' \
        'tip(s) checked'
