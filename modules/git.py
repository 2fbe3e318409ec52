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
command_timeout.  Branches, tags and notes are mirrored with
``fetch --prune``; nothing a client does destroys history the node already
has: before a fetch the refs are recorded (in the mirror, so a crash cannot
lose them), and every ref that the fetch deletes or moves to a commit that
does not contain the old one (a force-push, a moved tag) keeps its old tip
as ``refs/preserved/<node time>/<ref>``.  The client cannot write below
``refs/preserved/``: only heads, tags and notes are fetched.
"""

import os
import re
import shutil
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
ZERO = '0' * 40


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

def check_path(client, module, path):
    """A git repository below git_base, as a resolved real path.  Called by
    ``commit`` from hooks: no git process, only a few stat calls."""
    settings = client.settings
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
    proc = ctx.run([*ctx.git_program(), f'--git-dir={mirror}', *args],
                   check=False, **kwargs)
    if check and proc.returncode != 0:
        raise ctx.TransientError(
            f'git {" ".join(args[:2])} in {mirror} failed (exit '
            f'{proc.returncode}): {proc.stderr.strip()[-1000:]}')
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


def fetch(ctx, mirror, url, protocols):
    try:
        proc = fetch_process(ctx, mirror, url, protocols)
    except ctx.CommandFailed as e:
        # command_timeout passed: the client is treated as unreachable for
        # the rest of the run (its other requests wait).
        raise ctx.TimedOut(f'git fetch from {url}: {e}') from None
    if proc.returncode != 0:
        # Cannot connect at all: the client is down, not the request bad.
        error = ctx.Unreachable if ctx.connection_lost(proc.stderr) \
            else ctx.TransientError
        hint = ''
        if re.search(r'returned error: 30[1-8]', proc.stderr):
            hint = (' (the server redirects; the node follows no redirect: '
                    f'set [client {ctx.client}] git to the final URL)')
        raise error(f'git fetch from {url} failed (exit {proc.returncode}): '
                    f'{proc.stderr.strip()[-1000:]}{hint}')


def fetch_process(ctx, mirror, url, protocols):
    return ctx.run([*ctx.git_program(), *hardening(protocols),
                    f'--git-dir={mirror}', 'fetch', '--prune',
                    '--no-recurse-submodules', '--quiet', '--', url,
                    *REFSPECS],
                   env=git_environment(ctx, protocols), check=False,
                   timeout=ctx.timeout)


def follow_head(ctx, mirror, url, protocols, refs):
    """Point the mirror's HEAD where the client's points (for cgit and
    clones); a failure here costs nothing but a warning."""
    proc = ctx.run(['git', *hardening(protocols), f'--git-dir={mirror}',
                    'ls-remote', '--symref', '--', url, 'HEAD'],
                   env=git_environment(ctx, protocols), check=False,
                   timeout=min(ctx.timeout, 300))
    m = re.match(r'ref: (refs/heads/\S+)\tHEAD$', proc.stdout, re.M)
    if proc.returncode != 0 or not m:
        ctx.log.debug('%s: no HEAD from %s: %s', mirror, url,
                      proc.stderr.strip()[-300:])
        return
    if m.group(1) in refs:
        git(ctx, mirror, 'symbolic-ref', 'HEAD', m.group(1))


def node_stamp():
    """Node time for preserved ref names (no ':' allowed in refs)."""
    return time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())


def preserve(ctx, mirror, before, after):
    """Keep the old tip of every ref that was deleted or rewritten."""
    already = {}
    for ref, sha in list_refs(ctx, mirror, (PRESERVED,)).items():
        original = ref.split('/', 3)[3] if ref.count('/') >= 3 else ''
        already.setdefault(original, set()).add(sha)
    stamp = node_stamp()
    kept = []
    for ref, old in sorted(before.items()):
        new = after.get(ref)
        if new == old or old in already.get(ref, ()):
            continue
        if new is not None and not ref.startswith('refs/tags/') and git(
                ctx, mirror, 'merge-base', '--is-ancestor', old, new,
                check=False).returncode == 0:
            continue        # a fast-forward loses nothing
        for n in range(1, 20):
            name = f'{PRESERVED}{stamp if n == 1 else f"{stamp}.{n}"}/{ref}'
            if git(ctx, mirror, 'update-ref', '-m', 'gitbackup: preserved',
                   name, old, ZERO, check=False).returncode == 0:
                break
        else:
            raise ctx.TransientError(f'{mirror}: cannot create a preserved '
                                     f'ref for {ref} at {old}')
        what = 'deleted' if new is None else 'rewritten'
        ctx.log.warning('%s: %s: %s by the client; old tip %s kept as %s',
                        ctx.client, mirror, what, old[:12], name)
        kept.append(name)
    return kept


def create_mirror(ctx, mirror, url, protocols):
    """First backup: an empty bare repository under a temporary name,
    filled by the same hardened fetch, then renamed into place."""
    parent = os.path.dirname(mirror)
    ctx.make_dirs(parent)
    tmp = os.path.join(parent, '.' + os.path.basename(mirror) + '.incoming')
    shutil.rmtree(tmp, ignore_errors=True)
    ctx.run([*ctx.git_program(), 'init', '--quiet', '--bare', tmp])
    for key, value in (('core.logAllRefUpdates', 'true'),
                       ('transfer.fsckObjects', 'true'),
                       ('fetch.fsckObjects', 'true'),
                       ('gc.auto', '0')):
        git(ctx, tmp, 'config', key, value)
    fetch(ctx, tmp, url, protocols)
    refs = list_refs(ctx, tmp)
    follow_head(ctx, tmp, url, protocols, refs)
    os.rename(tmp, mirror)
    ctx.fsync_dir(parent)
    return refs


def update_mirror(ctx, mirror, url, protocols):
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
    before = list_refs(ctx, mirror)
    ctx.atomic_write(snapshot, ''.join(f'{sha} {ref}\n'
                                       for ref, sha in before.items()))
    fetch(ctx, mirror, url, protocols)
    after = list_refs(ctx, mirror)
    preserved += preserve(ctx, mirror, before, after)
    os.unlink(snapshot)
    follow_head(ctx, mirror, url, protocols, after)
    return after, preserved


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
    ctx.check_space(0)
    if rest != url:
        ctx.log.debug('%s: request names %s; fetching from %s (the node\'s '
                      '[client %s] git)', ctx.client, rest, url, ctx.client)
    if os.path.lexists(mirror):
        if not is_git_dir(mirror):
            raise ctx.TransientError(f'{mirror} exists but is not a git '
                                     'repository; move it away')
        refs, preserved = update_mirror(ctx, mirror, url, protocols)
    else:
        refs, preserved = create_mirror(ctx, mirror, url, protocols), []
    check_tips(ctx, mirror, heads)
    ctx.log.info('%s: mirrored %s into %s (%d refs%s)', ctx.client, url,
                 mirror, len(refs),
                 f', {len(preserved)} preserved' if preserved else '')
    return {'stored': mirror, 'refs': len(refs), 'preserved': preserved,
            'heads': heads}
