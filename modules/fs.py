"""fs: back up a directory as one tar archive (client side).

The archive is written by tar to a file in the request's own directory of
export_dir (streamed, never held in memory), published by rename when
complete, and offered to the node as one ``sftp`` server request with its
sha256 and size, together with ``<archive>.listing``, tar's verbose index
made while archiving, which the node's ``drill`` proves restores against.  ``[client] tar_command`` may carry a prefix such as
``sudo -n tar`` (see docs/modules.md), ``compression`` picks auto (the
default: multithreaded zstd when tar and zstd support it, else gzip),
gzip, xz, zstd, bzip2 or none.

With ``full_every`` (default 7d) the archives are a chain: a full one
(``level=0``), then GNU tar ``--listed-incremental`` increments, each on
the last archive the node confirmed storing (``level=<n> base=<request
id>``); see ArchiveChain in client.py.

Archives carry every piece of metadata the local tar can keep (POSIX
format, all xattr namespaces, ACLs, SELinux labels: metadata_options).
On the node, restore_tree() and restore_stream() are the one way a chain
comes back: judged whole first, then replayed (modules/_tarchain.py).
"""

import os
import re
import shlex
import shutil
import stat
import subprocess

from modules import _core, _tarchain
from modules._core import clean_text

# Beside every archive: tar's verbose index of it (drill_stored proves a
# restored tree against it).
LISTING_SUFFIX = '.listing'
# Node side: the files this module stores (what tar and the compressors
# make of a directory) and the companion it sends beside each.
STORED_SUFFIXES = ('.tar', '.tar.gz', '.tgz', '.tar.xz', '.txz', '.tar.zst',
                   '.tar.bz2', '.tbz2')
COMPANION_SUFFIXES = (LISTING_SUFFIX,)
# The program that reads each compressed kind (one table: _tarchain's).
TAR_TOOLS = tuple((suffixes, args[0])
                  for suffixes, args in _tarchain.DECOMPRESSORS)


def check_path(ctx, module, path):
    if not os.path.isdir(path):
        raise ValueError(f'{path}: not a directory')
    return os.path.abspath(path)


def archive_name(path):
    """/var/www/code -> var_www_code: readable and safe in file names."""
    slug = re.sub(r'[^A-Za-z0-9._-]+', '_', path.strip('/')).strip('._') \
        or 'root'
    return slug[:100]


def prepare(ctx, module, path):
    options, suffix = ctx.compression
    archive = ctx.export_path(archive_name(path) + suffix)
    listing = archive + LISTING_SUFFIX
    # The listing is tar's own verbose index, written while it archives
    # (no second read of the data): one `ls -l`-like line per member, names
    # escaped (\n, \\, octal) so that every name is one line.  The node's
    # drill proves a restored tree against it (names, types, sizes).
    # None when [client] full_every = 0: every archive is full.
    chain = ctx.archive_chain(path)
    incremental = chain.start() if chain else []
    tar = shlex.split(ctx.settings['tar_command'])
    args = tar + [
        '--create', '--file=-', '--sparse', *metadata_options(tar),
        *options, *incremental,
        '--verbose', '--verbose', '--quoting-style=escape',
        f'--index-file={listing}.part', f'--directory={path}', '.']
    status, stderr = ctx.stream_command_to_file(args, archive)
    # GNU tar: 1 = some files changed while being read (a live system);
    # the archive is still good.  2 = fatal.
    if status == 1:
        ctx.log.warning('tar %s: files changed while archiving: %s', path,
                        stderr.strip()[-500:])
    elif status != 0:
        raise ctx.ModuleError(f'tar of {path} failed (exit {status}): '
                              f'{stderr.strip()[-1000:]}')
    ctx.publish(archive)
    ctx.publish(listing)
    if chain:
        chain.advance()
    yield 'fs', ctx.sftp_request(archive, source=module, companion=listing,
                                 **(chain.request_options() if chain else {}))


# -- full metadata -----------------------------------------------------------

def tar_binary(tar):
    """The tar program in [client] tar_command's words: what it supports
    is asked of it alone (`sudo -n /bin/tar --help` is not what sudoers
    allows, see docs/modules.md)."""
    for word in reversed(tar):
        if os.path.basename(word).startswith(('tar', 'gtar')):
            return [word]
    return tar


def metadata_options(tar):
    """What makes an archive carry everything (SPEC 7): POSIX format (pax
    headers: nanosecond times, long names, any size), every xattr
    namespace, POSIX ACLs and SELinux labels, as far as this tar knows
    them (GNU tar >= 1.27 for xattrs and ACLs).  tar is the argument list
    that runs it ([client] tar_command, e.g. sudo -n tar)."""
    features = _tarchain.tar_features(tar_binary(tar))
    # Without their atime and ctime (which no restore sets) the pax
    # headers cost 0.02% of a zstd archive of /usr/share, not 7% of the
    # tar stream.
    options = ['--format=posix', '--pax-option=delete=atime,delete=ctime']
    if 'xattrs' in features:
        options += ['--xattrs', '--xattrs-include=*']
    if 'acls' in features:
        options.append('--acls')
    if 'selinux' in features:
        options.append('--selinux')
    return options


def metadata_text(tar):
    """One line for check: which metadata archives carry here."""
    features = _tarchain.tar_features(tar_binary(tar))
    kept = ['owners', 'modes', 'hardlinks', 'sparse files',
            'nanosecond times'] + [
        {'xattrs': 'xattrs (all namespaces)', 'acls': 'POSIX ACLs',
         'selinux': 'SELinux labels'}[f] for f in features]
    missing = [f for f in ('xattrs', 'acls', 'selinux') if f not in features]
    return ', '.join(kept) + (' (this tar lacks --' + ', --'.join(missing)
                              + ')' if missing else '')


# -- node side: giving a chain back (see modules/_tarchain.py) ---------------

# The size bound of a restore: what the listings declare (file sizes plus
# header blocks per entry) times a margin, plus slack; without a listing,
# the archives' own size times a ratio no honest tar of files exceeds
# (sparse files are stored without their holes).
SIZE_MARGIN = 2
SIZE_SLACK = 16 << 20
# A member's headers: pax header and its records, the header itself, its
# data's padding (GNU long names are rarer than this allows for).
ENTRY_BYTES = 5 * _tarchain.BLOCK
UNLISTED_RATIO = 1000

Bounds = _tarchain.Bounds
ChainRefused = _tarchain.ChainRefused
BoundExceeded = _tarchain.BoundExceeded
PathNotHeld = _tarchain.PathNotHeld
TarFailed = _tarchain.TarFailed


def size_bound(declared, stored):
    """Bytes of tar data a chain may produce: declared is the listings'
    (bytes, entries) per link, None for a link without one; stored the
    links' sizes on disk."""
    total = SIZE_SLACK
    for listed, size in zip(declared, stored):
        total += size * UNLISTED_RATIO if listed is None else \
            SIZE_MARGIN * (listed[0] + ENTRY_BYTES * listed[1])
    return total


def restore_stream(archives, write, paths=(), bounds=None):
    """Judge the chain, then write one plain tar stream of its final tree
    (or of paths in it) with write: every member as the client's tar made
    it, owners, devices, setuid bits, xattrs, ACLs and sparse maps
    included, for `tar -x` as root on the client."""
    chain = _tarchain.Chain(archives, bounds or _tarchain.Bounds(None))
    chain.judge()
    chain.replay(chain.plan(chain.select(paths), True), write)
    return chain


def restore_tree(archives, directory, paths=(), same_owner=False,
                 bounds=None, tar='tar'):
    """Judge the chain, then extract its final tree (or paths in it) into
    directory, a fresh one the caller moves into place.  Without
    same_owner: the running user's files, device nodes left out,
    setuid/setgid bits cleared, only user.* xattrs (chain.warnings names
    them; chain.left_out lists the device nodes)."""
    chain = _tarchain.Chain(archives, bounds or _tarchain.Bounds(None))
    chain.judge()
    _core.pause_point('restore:judged')
    plan = chain.plan(chain.select(paths), same_owner)
    _tarchain.extract(chain, plan, directory, same_owner, tar,
                      lambda: _core.pause_point('restore:replaying'))
    return chain


# -- node side: proving what this module stored -----------------------------

def verify_stored(path, timeout):
    """`verify`'s read-back of one stored archive: tar lists it whole
    (through its decompressor).  Raises FileNotFoundError when a program
    it needs is missing (a check that could not run), ValueError when the
    archive does not read back."""
    name = os.path.basename(path)
    for suffixes, tool in TAR_TOOLS:
        if name.endswith(suffixes) and not shutil.which(tool):
            raise FileNotFoundError(f'{tool}: not installed or not in PATH')
    proc = subprocess.run(['tar', '--list', '--file', path],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)
    if proc.returncode != 0:
        raise ValueError(f'tar --list failed (exit {proc.returncode}): '
                         f'{clean_text(proc.stderr.strip(), 500)}')


def drill_stored(ctx, names, scratch):
    """`drill`'s proof of a snapshot's archive: its chain (full first) is
    extracted into scratch through the node's one extraction path
    (ctx.extract_chain, which checks every link's sha256 first, judges
    the chain and returns (links, top: the tree, left_out: device nodes
    not made)) and the restored tree held against the listing tar wrote
    while archiving.  Returns (problems, what was proven)."""
    extracted = ctx.extract_chain(scratch)
    name = names[0]
    listing = os.path.join(ctx.snapshot, name + LISTING_SUFFIX)
    if not os.path.exists(listing):
        return [], f'{name}: extracted; no listing recorded to compare with'
    tree = restored_tree(extracted.top)
    listed = parse_listing(listing)
    # Device nodes are not made on the node (by design): not missing.
    tree.update({n: listed[n] for n in extracted.left_out if n in listed})
    problems = compare_listing(listed, tree, complete=extracted.links == 1)
    return problems, f'{name}: {len(tree)} entries match the listing'


# One line of tar's verbose index (`tar -cvv --quoting-style=escape`):
# mode, owner/group, size (major,minor for devices), date, time, name.
LISTING_RE = re.compile(r'^(?P<type>\S)\S{9}\S*\s+\S+\s+'
                        r'(?P<size>[0-9]+|[0-9]+,\s*[0-9]+)\s+'
                        r'[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:]{5,8} (?P<name>.*)$')
LISTING_TYPES = {'-': 'file', 'h': 'file', 'd': 'dir', 'l': 'link',
                 'p': 'fifo', 'c': 'char', 'b': 'block'}
ESCAPES = {'\\': b'\\', 'n': b'\n', 't': b'\t', 'a': b'\a', 'b': b'\b',
           'f': b'\f', 'r': b'\r', 'v': b'\v', ' ': b' ', '?': b'?'}


def unescape_name(text):
    """tar's escape quoting (\\n, \\\\, \\ooo ...) -> the file name."""
    out, i = bytearray(), 0
    raw = text.encode('utf-8', 'surrogateescape')
    while i < len(raw):
        c = raw[i:i + 1]
        if c == b'\\' and i + 1 < len(raw):
            octal = re.match(rb'[0-7]{3}', raw[i + 1:i + 4])
            if octal:
                out.append(int(octal.group(), 8))
                i += 4
                continue
            nxt = chr(raw[i + 1])
            out += ESCAPES.get(nxt, b'\\' + nxt.encode())
            i += 2
            continue
        out += c
        i += 1
    return os.fsdecode(bytes(out))


def parse_listing(path):
    """{relative name: (type, size or None)} of a listing file."""
    entries = {}
    with open(path, encoding='utf-8', errors='surrogateescape') as f:
        for line in f:
            m = LISTING_RE.match(line.rstrip('\n'))
            if not m:
                continue
            kind = LISTING_TYPES.get(m.group('type'), 'other')
            name = m.group('name')
            # A symlink's target and a hard link's original follow the
            # name; names holding these words are too rare to guess for.
            for sep in ((' -> ',) if kind == 'link' else
                        (' link to ',) if m.group('type') == 'h' else ()):
                name = name.split(sep, 1)[0]
            name = unescape_name(name).rstrip('/')
            name = name[2:] if name.startswith('./') else name
            if name in ('', '.'):
                continue
            size = int(m.group('size')) if kind == 'file' and \
                m.group('type') != 'h' else None
            entries[name] = (kind, size)
    return entries


def restored_tree(top):
    """{relative name: (type, size or None)} of a restored directory."""
    found = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            mode = st.st_mode
            kind = 'dir' if stat.S_ISDIR(mode) else 'link' if \
                stat.S_ISLNK(mode) else 'file' if stat.S_ISREG(mode) else \
                'fifo' if stat.S_ISFIFO(mode) else 'char' if \
                stat.S_ISCHR(mode) else 'block' if stat.S_ISBLK(mode) \
                else 'other'
            found[os.path.relpath(path, top)] = (
                kind, st.st_size if kind == 'file' else None)
    return found


def compare_listing(listing, tree, complete):
    """Problems between what the client listed and what came back; an
    increment's listing names only what changed (complete=False)."""
    problems = []
    for name, (kind, size) in sorted(listing.items()):
        got = tree.get(name)
        if got is None:
            problems.append(f'{clean_text(name)}: missing')
        elif got[0] != kind:
            problems.append(f'{clean_text(name)}: {got[0]}, listed as {kind}')
        elif size is not None and got[1] != size:
            problems.append(f'{clean_text(name)}: {got[1]} bytes, listed '
                            f'with {size}')
    if complete:
        problems += [f'{clean_text(name)}: not in the listing'
                     for name in sorted(set(tree) - set(listing))]
    return problems
