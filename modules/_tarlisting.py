"""_tarlisting: the tree a chain of fs archives restores, from their listings.

Node-side plumbing of the fs module (not a backup module: module names
start with a letter).  The client records beside every archive tar's own
verbose index (``tar -cvvv --quoting-style=escape --index-file``, see
fs.py): one ``ls -l``-like line per member it stored (with its extended
attribute names and ACLs on indented lines).  A full archive's
listing is its whole tree.  An increment (GNU ``--listed-incremental``)
lists every directory of the tree and only the files that changed; what
was deleted or renamed is not in the listing but in the archive's own
directory records ("dumpdirs": the names each directory held, and the
renames), which GNU tar applies when it extracts.  ``apply_link``
applies one link's dumpdirs and then its listing, as tar applies its
archive; applied link by link from the full (server.py's SourceTrees),
the result is the tree a restore of that point gives: what ``find``,
``ls``, ``diff`` and the drill (``compare_tree``) read.  Nothing is
extracted; dumpdirs are read from the increments with ``read_dumpdirs``.

Listings and archives come from a client, so they are hostile text: every
line is bounded and parsed strictly, and anything malformed raises
ListingError naming the file and the line, never a traceback.

Parses on Python 3.6 (it sits among the client's modules); only the node
runs it.
"""

import calendar
import os
import re
import stat
import subprocess
import tarfile
import time

# What fs.py names a listing: the archive's name and this.
LISTING_SUFFIX = '.listing'
# Bounds on what one listing or archive may make the node hold in memory.
MAX_LINE = 65536
MAX_ENTRIES = 5000000
MAX_DUMPDIR = 64 * 1024 * 1024
MAX_RENAMES = 10000

# One member line: mode (with tar's ACL/xattr mark), owner/group, size
# (major,minor for devices), date and time (seconds and nanoseconds with
# --full-time, which fs.py asks for in UTC; tar pads the fraction with
# spaces), the escaped name (always "./..." in our archives).
LINE_RE = re.compile(
    r'^(?P<type>[-hdlpcbCDMNSV?])(?P<perms>[-rwxsStTlL]{9})(?P<mark>[+*.]?)'
    r' +(?P<owner>\S+) +(?P<size>[0-9]{1,20}|[0-9]{1,10}, *[0-9]{1,10}) '
    r'(?P<date>[0-9]{4}-[0-9]{2}-[0-9]{2}) '
    r'(?P<time>[0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?) +'
    r'(?P<name>\..*)$')
# tar -vvv writes an entry's extended attributes ("x: LENGTH NAME") and
# ACLs ("a: ..." access, "d: ..." default) on indented lines after it.
XATTR_RE = re.compile(r'^  x: (?P<length>[0-9]{1,10}) (?P<name>.+)$')
ACL_RE = re.compile(r'^  (?P<which>[ad]): (?P<text>.*)$')
KINDS = {'-': 'file', 'h': 'file', 'C': 'file', 'S': 'file', 'd': 'dir',
         'D': 'dir', 'l': 'link', 'p': 'fifo', 'c': 'char', 'b': 'block'}
# What a restore on the node leaves out unless asked to keep owners
# (device nodes are privilege, not structure).
SPECIAL_KINDS = ('char', 'block')
ESCAPES = {'\\': b'\\', 'n': b'\n', 't': b'\t', 'a': b'\a', 'b': b'\b',
           'f': b'\f', 'r': b'\r', 'v': b'\v', ' ': b' ', '?': b'?'}
# Archive names the decompressor that lets tarfile read them as a stream.
DECOMPRESSORS = ((('.tar.zst', '.tzst'), ['zstd', '-d', '-c', '-q']),
                 (('.tar.gz', '.tgz'), ['gzip', '-d', '-c']),
                 (('.tar.xz', '.txz'), ['xz', '-d', '-c']),
                 (('.tar.bz2', '.tbz2'), ['bzip2', '-d', '-c']))


class ListingError(ValueError):
    """A listing or an archive's directory records that cannot be read as
    tar writes them; the message names the file and the line."""


class Entry:
    """One path of a tree as a listing describes it."""

    __slots__ = ('path', 'kind', 'size', 'mode', 'owner', 'mtime',
                 'mtime_text', 'target', 'hardlink', 'device', 'xattrs',
                 'acl', 'snapshot')

    def __init__(self, path=None, kind=None, size=None, mode=None,
                 owner=None, mtime=None, mtime_text=None, target=None,
                 hardlink=None, device=None, xattrs=None, acl=None,
                 snapshot=None):
        self.path, self.kind, self.size, self.mode = path, kind, size, mode
        self.owner, self.mtime, self.mtime_text = owner, mtime, mtime_text
        self.target, self.hardlink, self.device = target, hardlink, device
        self.xattrs, self.acl, self.snapshot = xattrs, acl, snapshot

    def same_content(self, other):
        """Would a restore give the same file (what `diff` calls M)."""
        return all(getattr(self, k) == getattr(other, k) for k in (
            'kind', 'size', 'mode', 'owner', 'mtime_text', 'target',
            'device'))

    def as_dict(self):
        return {'path': self.path, 'type': self.kind, 'size': self.size,
                'mode': None if self.mode is None else '%04o' % self.mode,
                'owner': self.owner, 'mtime': iso_mtime(self),
                'target': self.target, 'snapshot': self.snapshot}


def iso_mtime(entry):
    """ISO 8601 UTC when the listing gave seconds, else tar's text (the
    client's local time, to the minute)."""
    if entry.mtime is None:
        return entry.mtime_text
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(entry.mtime))


def unescape_name(text):
    """tar's escape quoting (\\n, \\\\, \\ooo ...) -> the file name."""
    if '\\' not in text:
        return text
    out, i = bytearray(), 0
    raw = text.encode('utf-8', 'surrogateescape')
    while i < len(raw):
        c = raw[i:i + 1]
        if c == b'\\' and i + 1 < len(raw):
            octal = re.match(rb'[0-7]{3}', raw[i + 1:i + 4])
            if octal:
                out.append(int(octal.group(), 8) & 0xff)
                i += 4
                continue
            nxt = chr(raw[i + 1])
            out += ESCAPES.get(nxt, b'\\' + nxt.encode('latin-1'))
            i += 2
            continue
        out += c
        i += 1
    return os.fsdecode(bytes(out))


def escape_name(name):
    """A name as tar's escape quoting shows it (the inverse of
    unescape_name): one printable line, whatever the name holds."""
    shown = []
    for c in name:
        if c == '\\':
            shown.append('\\\\')
        elif c in '\n\t\r' or not c.isprintable():
            shown.append({'\n': '\\n', '\t': '\\t', '\r': '\\r'}.get(c) or
                         ''.join('\\%03o' % b for b in
                                 c.encode('utf-8', 'surrogateescape')))
        else:
            shown.append(c)
    return ''.join(shown)


def member_path(name):
    """'./a/b/' -> 'a/b'; '' for the root; None for what no archive made
    with `tar -C DIR .` holds (absolute, '..', no './')."""
    if name in ('.', './'):
        return ''
    if not name.startswith('./'):
        return None
    rest = name[2:].rstrip('/')
    if '..' not in rest and '//' not in rest and '/./' not in rest and \
            not rest.startswith('./') and not rest.endswith('/.'):
        return rest
    parts = [p for p in name[2:].split('/') if p not in ('', '.')]
    if '..' in parts:
        return None
    return '/'.join(parts)


_modes = {}


def parse_mode(perms):
    """'rwsr-x--T' -> 0o4750 | sticky."""
    if perms not in _modes and len(_modes) < 4096:
        _modes[perms] = mode_bits(perms)
    return _modes.get(perms) or mode_bits(perms)


def mode_bits(perms):
    mode = 0
    for n, c in enumerate(perms):
        bit = 1 << (8 - n)
        if c in 'rwxst':
            mode |= bit
        if c in 'sS' and n == 2:
            mode |= stat.S_ISUID
        elif c in 'sS' and n == 5:
            mode |= stat.S_ISGID
        elif c in 'tT' and n == 8:
            mode |= stat.S_ISVTX
    return mode


def parse_mtime(date, clock):
    """Seconds since the epoch when tar printed seconds (--full-time, in
    UTC); None when it printed only minutes (older clients, local time)."""
    if clock.count(':') < 2:
        return None
    year, month, day = date.split('-')
    hour, minute, second = clock.split('.')[0].split(':')
    return calendar.timegm((int(year), int(month), int(day), int(hour),
                            int(minute), int(second), 0, 0, 0))


def parse_line(m, where):
    """One matched member line -> Entry, or None for the root."""
    kind = KINDS.get(m.group('type'), 'other')
    name = m.group('name')
    target = hardlink = None
    if kind == 'link' and ' -> ' in name:
        name, target = name.split(' -> ', 1)
        target = unescape_name(target)
    elif m.group('type') == 'h' and ' link to ' in name:
        name, hardlink = name.split(' link to ', 1)
        hardlink = member_path(unescape_name(hardlink))
        if not hardlink:
            raise ListingError(f'{where}: hard link to a target outside '
                               'the tree')
    path = member_path(unescape_name(name))
    if path is None:
        raise ListingError(f'{where}: member {name[:200]!r} is not below '
                           '"./" (absolute or "..")')
    if path == '':
        return None
    size = m.group('size')
    device = size.replace(' ', '') if ',' in size else None
    return Entry(
        path=path, kind=kind, device=device, target=target,
        hardlink=hardlink,
        size=int(size) if kind == 'file' and not device and not hardlink
        else None,
        mode=parse_mode(m.group('perms')), owner=m.group('owner'),
        mtime=parse_mtime(m.group('date'), m.group('time')),
        mtime_text=m.group('date') + ' ' + m.group('time'),
        acl=m.group('mark') == '+' or None)


class Where:
    """'x.listing line 7', made only when an error needs it."""

    __slots__ = ('name', 'number')

    def __init__(self, name, number):
        self.name, self.number = name, number

    def __str__(self):
        return f'{self.name} line {self.number}'

    def __format__(self, spec):
        return format(str(self), spec)


def parse_listing(path):
    """[Entry] of one listing file, in the order tar stored the members.
    Raises ListingError naming the line of anything malformed."""
    entries, last = [], None
    with open(path, 'rb') as f:
        name = os.path.basename(path)
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1),
                                          b''), 1):
            where = Where(name, number)
            if len(raw) > MAX_LINE:
                raise ListingError(f'{where}: longer than {MAX_LINE} bytes')
            line = raw.decode('utf-8', 'surrogateescape').rstrip('\n')
            if not line:
                continue
            extra = XATTR_RE.match(line) or ACL_RE.match(line)
            if extra:
                if last is None:
                    raise ListingError(f'{where}: attribute line before '
                                       'any member')
                record_extra(last, extra)
                continue
            m = LINE_RE.match(line)
            if not m:
                raise ListingError(f'{where}: not a member line of tar\'s '
                                   f'index: {line[:120]!r}')
            last = parse_line(m, where)
            if last is not None:
                entries.append(last)
            if len(entries) > MAX_ENTRIES:
                raise ListingError(f'{where}: more than {MAX_ENTRIES} '
                                   'members')
    return entries


def record_extra(entry, m):
    if 'length' in m.groupdict():
        entry.xattrs = dict(entry.xattrs or {})
        entry.xattrs[m.group('name')] = int(m.group('length'))
    else:
        entry.acl = True


# -- an increment's directory records ---------------------------------------


def archive_member_path(name):
    """A tarfile name -> path below the root.  tarfile reads the atime
    and ctime that GNU incremental headers keep where ustar keeps a name
    prefix as one ("15304603232/./dir"): the '/./' tells them apart."""
    m = re.match(r'^(?:[0-7]{1,12}/)?(\.(?:/.*)?)$', name)
    return member_path(m.group(1) + ('/' if m.group(1) == '.' else '')) \
        if m else None


def decode_dumpdir(tarinfo, data):
    """[(flag, name)] of one directory record (GNU dumpdir format: each
    record a flag letter and a name, NUL-terminated, then an empty one)."""
    if data is None:
        data = tarinfo.pax_headers.get('GNU.dumpdir')
        if data is None:
            return None
        data = data.encode('utf-8', 'surrogateescape')
    records = []
    for record in data.split(b'\0'):
        if not record:
            continue
        flag, name = chr(record[0]), os.fsdecode(record[1:])
        if flag not in 'YNDRTX':
            raise ListingError(f'directory record of {tarinfo.name[:200]!r}:'
                               f' unknown flag {flag!r}')
        records.append((flag, name))
    return records


def archive_stream(path):
    """(process or None, file object) reading the plain tar of path."""
    for suffixes, command in DECOMPRESSORS:
        if path.endswith(suffixes):
            try:
                proc = subprocess.Popen(command + ['--', path],
                                        stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL,
                                        start_new_session=True)
            except OSError as e:
                raise ListingError(f'{os.path.basename(path)}: cannot run '
                                   f'{command[0]}: {e}') from None
            return proc, proc.stdout
    try:
        return None, open(path, 'rb')
    except OSError as e:
        raise ListingError(f'{os.path.basename(path)}: {e}') from None


def read_dumpdirs(path, timeout):
    """[(directory path, [(flag, name)])] of an incremental archive, in
    archive order; nothing is written.  ListingError when the archive
    cannot be read within timeout seconds or holds malformed records."""
    proc, stream = archive_stream(path)
    deadline = time.monotonic() + timeout
    found = []
    try:
        with tarfile.open(fileobj=stream, mode='r|') as archive:
            for n, member in enumerate(archive):
                if n > MAX_ENTRIES or time.monotonic() > deadline:
                    raise ListingError(f'{os.path.basename(path)}: more than '
                                       f'{MAX_ENTRIES} members or '
                                       f'{timeout} s to read')
                if not member.isdir() and member.type != b'D':
                    continue
                data = None
                if member.type == b'D':
                    if member.size > MAX_DUMPDIR:
                        raise ListingError(f'{member.name[:200]!r}: directory'
                                           ' record too large')
                    data = archive.extractfile(member).read()
                records = decode_dumpdir(member, data)
                where = archive_member_path(member.name)
                if records is not None and where is not None:
                    found.append((where, records))
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ListingError(f'{os.path.basename(path)}: cannot read its '
                           f'directory records: {e}') from None
    finally:
        stream.close()
        if proc:
            proc.kill()
            proc.wait()
    return found


# -- the tree a chain restores ------------------------------------------------


def children_index(tree):
    """{directory: [paths directly in it]} of a tree."""
    index = {}
    for path in tree:
        index.setdefault(path.rpartition('/')[0], []).append(path)
    return index


def remove_subtree(tree, path, index=None):
    """Drop path and everything below it (index: children_index(tree),
    to avoid a scan of the whole tree for each removal)."""
    if index is None:
        index = children_index(tree)
    todo = [path]
    while todo:
        name = todo.pop()
        tree.pop(name, None)
        todo.extend(index.pop(name, ()))


def rename_subtree(tree, source, target):
    """GNU tar's R/T records: a directory renamed since the last link
    keeps its unchanged contents under the new name."""
    source, target = member_path(source), member_path(target)
    if not source or not target:
        return []
    moved = {n: e for n, e in tree.items()
             if n == source or n.startswith(source + '/')}
    for name in moved:
        del tree[name]
    for name, entry in moved.items():
        new = target + name[len(source):]
        entry = Entry(**{k: getattr(entry, k) for k in Entry.__slots__})
        entry.path = new
        tree[new] = entry
    return [target + name[len(source):] for name in moved]


def apply_dumpdirs(tree, dumpdirs):
    """What extracting an increment does before its files: renames, then
    every directory loses the names it no longer holds.  Returns the
    paths that renames made."""
    renames = sum(flag == 'R' for _, records in dumpdirs
                  for flag, _ in records)
    if renames > MAX_RENAMES:
        raise ListingError(f'{renames} directories renamed in one archive '
                           f'(at most {MAX_RENAMES} are followed)')
    renamed = set()
    for directory, records in dumpdirs:
        source = None
        for flag, name in records:
            if flag == 'R':
                source = name
            elif flag == 'T' and source is not None:
                renamed.update(rename_subtree(tree, source, name))
                source = None
    index = children_index(tree)
    for directory, records in dumpdirs:
        held = {name for flag, name in records if flag in 'YND'}
        for path in list(index.get(directory, ())):
            if path.rpartition('/')[2] not in held and path in tree:
                remove_subtree(tree, path, index)
    return {path for path in renamed if path in tree}


def apply_link(tree, entries, dumpdirs, snapshot):
    """Apply one link of a chain to tree (a dict path -> Entry) in place:
    its directory records (None for a full), then its listing.  Returns
    the set of paths this link changed (added, rewritten or renamed)."""
    changed = apply_dumpdirs(tree, dumpdirs) if dumpdirs else set()
    for path in changed:
        tree[path].snapshot = snapshot
    listed = {e.path: e for e in entries}
    for entry in entries:
        old = tree.get(entry.path)
        if old is not None and old.kind == 'dir' and entry.kind != 'dir':
            remove_subtree(tree, entry.path)
        if entry.hardlink:
            # A hard link has its target's content (listed as size 0).
            other = listed.get(entry.hardlink) or tree.get(entry.hardlink)
            entry.size = other.size if other is not None else None
        if old is None or old.kind != 'dir' or entry.kind != 'dir' or \
                not old.same_content(entry):
            changed.add(entry.path)
        entry.snapshot = snapshot if entry.path in changed or old is None \
            else old.snapshot
        tree[entry.path] = entry
    return changed


def apply_stored_link(tree, listing, archive, name, first, timeout):
    """The tree after one stored link of a chain: a copy of tree with the
    link's listing applied (and, unless it is the full, its archive's
    directory records); (tree, paths it changed).  ListingError when the
    link has no listing or a bad one."""
    if not os.path.isfile(listing):
        raise ListingError(f'{name}: no listing recorded with its archive')
    tree = dict(tree)
    changed = apply_link(tree, parse_listing(listing),
                         None if first else read_dumpdirs(archive, timeout),
                         name)
    return tree, changed


def chain_tree(links, timeout):
    """The tree a chain restores: links are (listing, archive, snapshot
    name) from the full to the point wanted."""
    tree = {}
    for n, (listing, archive, name) in enumerate(links):
        tree = apply_stored_link(tree, listing, archive, name, n == 0,
                                 timeout)[0]
    return tree


# -- what a restored directory holds, against the tree ------------------------


def kind_of(mode):
    for test, kind in ((stat.S_ISDIR, 'dir'), (stat.S_ISLNK, 'link'),
                       (stat.S_ISREG, 'file'), (stat.S_ISFIFO, 'fifo'),
                       (stat.S_ISCHR, 'char'), (stat.S_ISBLK, 'block')):
        if test(mode):
            return kind
    return 'other'


def restored_paths(top):
    """Every path below top, relative, without following symlinks.
    os.fwalk descends by directory descriptors, so a restored path
    longer than PATH_MAX once top is put before it is still seen (os.walk
    would silently skip what it cannot open)."""
    found = []
    for root, dirs, files, _fd in os.fwalk(top):
        rel = os.path.relpath(root, top)
        for name in dirs + files:
            found.append(name if rel == '.' else rel + '/' + name)
    return found


class Located:
    """One restored entry, reached by a short name: its parent directory
    opened component by component (never following a symlink) when the
    whole path would pass PATH_MAX, else by its plain path.  A tree
    restored into a scratch directory can hold a path just under the
    limit that the scratch's own prefix pushes over it."""

    def __init__(self, top, rel):
        self.fd = None
        self.name = os.path.join(top, rel)
        if len(os.fsencode(self.name)) < 4000:
            return
        parts = rel.split('/')
        fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY |
                              os.O_NOFOLLOW, dir_fd=fd)
                os.close(fd)
                fd = nxt
        except OSError:
            os.close(fd)
            raise
        self.fd, self.name = fd, parts[-1]

    def lstat(self):
        return os.stat(self.name, dir_fd=self.fd, follow_symlinks=False)

    def readlink(self):
        return os.readlink(self.name, dir_fd=self.fd)

    def xattr_handle(self):
        """What os.listxattr/getxattr take: the path, or for a long one
        an open descriptor of the entry itself (files and directories)."""
        if self.fd is None:
            return self.name, None
        fd = os.open(self.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK,
                     dir_fd=self.fd)
        return fd, fd

    def close(self):
        if self.fd is not None:
            os.close(self.fd)


def owner_names(st):
    import grp
    import pwd
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return user + '/' + group


def entry_problems(top, entry, owners, mask, privileged):
    """How the restored copy of one entry differs from it ([] if not)."""
    located = Located(top, entry.path)
    try:
        return located_problems(located, entry, owners, mask, privileged)
    finally:
        located.close()


def located_problems(located, entry, owners, mask, privileged):
    st = located.lstat()
    kind = kind_of(st.st_mode)
    if kind != entry.kind:
        return [f'{kind}, listed as {entry.kind}']
    problems = []
    if kind == 'file' and entry.size is not None and st.st_size != entry.size:
        problems.append(f'{st.st_size} bytes, listed with {entry.size}')
    if kind == 'link' and entry.target is not None and \
            located.readlink() != entry.target:
        problems.append(f'points to {located.readlink()!r}, listed to '
                        f'{entry.target!r}')
    if kind != 'link' and entry.mode is not None and \
            stat.S_IMODE(st.st_mode) & mask != entry.mode & mask:
        problems.append('mode %04o, listed as %04o' % (
            stat.S_IMODE(st.st_mode), entry.mode))
    if kind != 'link' and entry.mtime is not None and \
            int(st.st_mtime) != entry.mtime:
        problems.append(f'mtime {int(st.st_mtime)}, listed as {entry.mtime}')
    if owners and owner_names(st) != entry.owner and \
            '%d/%d' % (st.st_uid, st.st_gid) != entry.owner:
        problems.append(f'owner {owner_names(st)}, listed as {entry.owner}')
    problems += attribute_problems(located, entry, kind, privileged)
    return problems


def attribute_problems(located, entry, kind, privileged):
    """Extended attributes and ACLs, where the listing recorded them (only
    user.* ones when a restore without privilege could not set others)."""
    if kind == 'link' or (not entry.xattrs and not entry.acl):
        return []
    if located.fd is not None and kind not in ('file', 'dir'):
        return []   # opening a device or fifo to read its xattrs: no
    opened = None
    try:
        handle, opened = located.xattr_handle()
        names = set(os.listxattr(handle, follow_symlinks=False)
                    if opened is None else os.listxattr(handle))
        problems = []
        for name, length in sorted((entry.xattrs or {}).items()):
            if not privileged and not name.startswith('user.'):
                continue
            if name not in names:
                problems.append(f'extended attribute {name} missing')
            elif len(os.getxattr(handle, name) if opened is not None else
                     os.getxattr(handle, name, follow_symlinks=False)) \
                    != length:
                problems.append(f'extended attribute {name} differs in '
                                'length')
    except OSError as e:
        return [f'cannot read its extended attributes: {e}']
    finally:
        if opened is not None:
            os.close(opened)
    if entry.acl and not names & {'system.posix_acl_access',
                                  'system.posix_acl_default'}:
        problems.append('ACL missing')
    return problems


def compare_tree(top, expected, owners=False, privileged=False,
                 mode_mask=None, left_out=None):
    """Problems [(path, what)] between a restored directory and the tree
    the listings describe (every entry: type, size, link target, mode,
    mtime where the listing has seconds, owner if owners, xattrs and ACLs
    where recorded), and the number of entries compared.  Without
    privileged, device nodes may be missing and setuid/setgid bits
    cleared (the node's safe extraction leaves them out); an extraction
    that leaves out more says so with mode_mask (the mode bits it keeps)
    and left_out (the kinds it skips)."""
    if mode_mask is None:
        mode_mask = 0o7777 if privileged else 0o1777
    if left_out is None:
        left_out = () if privileged else SPECIAL_KINDS
    problems, compared = [], 0
    restored = set(restored_paths(top))
    for path in sorted(expected):
        entry = expected[path]
        if path not in restored:
            if entry.kind not in left_out:
                problems.append((path, 'missing'))
            continue
        compared += 1
        problems += [(path, p) for p in entry_problems(
            top, entry, owners, mode_mask, privileged)]
    problems += [(path, 'not in the listings')
                 for path in sorted(restored - set(expected))]
    return problems, compared
