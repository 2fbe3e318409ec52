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

A file tar cannot read, a path too long or a file that vanishes does not
fail the backup: the rest is archived, and the lines tar wrote about them
go to the node with the request (``ctx.warn``: stored with warnings).
Only a fatal tar status (the archive itself not written) fails it.
"""

import os
import re
import shlex
import shutil
import stat
import subprocess

from modules._core import clean_text

# Beside every archive: tar's verbose index of it (drill_stored proves a
# restored tree against it).
LISTING_SUFFIX = '.listing'
# Node side: the files this module stores (what tar and the compressors
# make of a directory) and the companion it sends beside each.
STORED_SUFFIXES = ('.tar', '.tar.gz', '.tgz', '.tar.xz', '.txz', '.tar.zst',
                   '.tar.bz2', '.tbz2')
COMPANION_SUFFIXES = (LISTING_SUFFIX,)
TAR_TOOLS = ((('.tar.gz', '.tgz'), 'gzip'), (('.tar.xz', '.txz'), 'xz'),
             (('.tar.zst',), 'zstd'), (('.tar.bz2', '.tbz2'), 'bzip2'))


# What tar says on stderr that is no problem: --listed-incremental's notes
# on directories, and sockets, which no archive holds.
TAR_NOTE_RE = re.compile(r': (?:Directory is new|Directory has been renamed'
                         r'(?: from .*)?|socket ignored)$')


def tar_problems(stderr):
    """The lines of tar's stderr that name what it could not store as it
    was: unreadable files, names too long, files that vanished or changed
    while being read ('./secret: Warning: Cannot open: Permission
    denied')."""
    problems = []
    for line in stderr.splitlines():
        line = line.strip()
        if line and not TAR_NOTE_RE.search(line):
            problems.append(re.sub(r'^[^ :]*tar: ', '', line))
    return problems


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
    # --ignore-failed-read: a file that cannot be read (or has a name too
    # long, or vanished) is a warning, not a fatal error: the rest of the
    # tree is still a backup (tar_problems below names what is missing).
    args = shlex.split(ctx.settings['tar_command']) + [
        '--create', '--file=-', '--sparse', '--ignore-failed-read',
        *options, *incremental,
        '--verbose', '--verbose', '--quoting-style=escape',
        f'--index-file={listing}.part', f'--directory={path}', '.']
    status, stderr = ctx.stream_command_to_file(args, archive)
    # GNU tar: 0 = done, 1 = some files differ (changed or vanished while
    # being read: a live system), 2 = fatal (the archive itself could not
    # be written).  With --ignore-failed-read, unreadable files do not
    # make it 2.  Only a fatal status fails the request; every member tar
    # could not store as it was is named, whatever the status.
    if status not in (0, 1):
        raise ctx.ModuleError(f'tar of {path} failed (exit {status}): '
                              f'{stderr.strip()[-1000:]}')
    ctx.warn(path, tar_problems(stderr))
    ctx.publish(archive)
    ctx.publish(listing)
    if chain:
        chain.advance()
    yield 'fs', ctx.sftp_request(archive, source=module, companion=listing,
                                 **(chain.request_options() if chain else {}))


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
    (ctx.extract_chain, which checks every link's sha256 first) and the
    restored tree held against the listing tar wrote while archiving.
    Returns (problems, what was proven)."""
    links = ctx.extract_chain(scratch)
    name = names[0]
    listing = os.path.join(ctx.snapshot, name + LISTING_SUFFIX)
    if not os.path.exists(listing):
        return [], f'{name}: extracted; no listing recorded to compare with'
    tree = restored_tree(scratch)
    problems = compare_listing(parse_listing(listing), tree,
                               complete=links == 1)
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
