"""_tarchain: the one safe way the node gives a tar chain back (node side).

Not a backup module (its name starts with an underscore).  modules/fs.py
uses it for ``restore --to``, ``--stdout``, ``--path`` and ``drill``.

A chain is a full GNU tar archive and the ``--listed-incremental``
increments made after it; a compromised client made every byte of it.  So:

1. **Judge the whole chain before anything is written.**  Every link is
   read (decompressed, headers parsed here, data skipped) and replayed in
   order on a model of the tree: members, the dumpdirs' deletions and
   directory renames.  The chain is refused, naming the link and the
   member, if a name is absolute or holds ``..``, if a member (or a rename)
   passes through a path that is a symlink or a file at that point (made
   by an earlier member or an earlier link), if a hard link points outside
   the archive, at a symlink or through one, or if a header is malformed,
   duplicated or of a kind GNU tar would read differently.
2. **Replay, not re-extract.**  What is written is ONE plain tar stream of
   the final tree, made of the links' own header and data bytes (owners,
   modes, xattrs, ACLs, sparse maps and nanosecond times exactly as the
   client's tar wrote them): a member a later link replaced or deleted is
   left out, a member a directory rename moved is renamed.  Dumpdirs stay
   (GNU tar, seeing them, sets directory times after their contents; they
   delete or rename only under ``--listed-incremental``, which no tar on
   the node is ever given), so no tar deletes anything, and one tar run
   extracts a tree whose every parent is a real directory.
3. **Least privilege.**  Without ``same_owner`` device nodes are left
   out, setuid/setgid bits cleared and xattrs outside ``user.*`` not
   restored (file capabilities are privilege, like setuid); each is named
   in one warning.  The stream to stdout keeps everything: it is meant for
   ``tar -x`` as root on the client, where those files belong.
4. **Bounds.**  Bytes read and written are capped (a size derived from
   what the snapshot declares), the target's free space is held above a
   floor, and a deadline applies; the outcome names the bound hit.

Must parse on Python 3.6 (every file in modules/ must).
"""

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

BLOCK = 512
# A pax header or GNU long name larger than this is not a file name.
EXT_MAX = 1 << 20
# A dumpdir (the names of one directory) larger than this is refused.
DUMPDIR_MAX = 256 << 20
DECOMPRESSORS = ((('.tar.gz', '.tgz'), ['gzip', '-dc']),
                 (('.tar.xz', '.txz'), ['xz', '-dc']),
                 (('.tar.zst', '.tzst'), ['zstd', '-dcq']),
                 (('.tar.bz2', '.tbz2'), ['bzip2', '-dc']))
REGULAR = (b'0', b'\0', b'7')
# Member types GNU tar writes for a directory tree (S: old GNU sparse,
# D: old GNU dumpdir); every other type is refused.
KNOWN_TYPES = REGULAR + (b'1', b'2', b'3', b'4', b'5', b'6', b'S', b'D')
KIND = {b'0': 'f', b'\0': 'f', b'7': 'f', b'S': 'f', b'1': 'h', b'2': 'l',
        b'3': 'c', b'4': 'b', b'5': 'd', b'D': 'd', b'6': 'p'}
PRIVILEGED_BITS = 0o6000
ZERO_BLOCK = bytes(BLOCK)
# How many names one warning lists before "and N more".
WARN_NAMES = 20


class ChainRefused(Exception):
    """The chain is not restored; the message names link and member."""


class BoundExceeded(Exception):
    """A size, free-space or time bound stopped the work; names it."""


def padded(size):
    return (size + BLOCK - 1) // BLOCK * BLOCK


def show(name):
    """A member name for a message: bytes, control characters escaped."""
    text = name.decode('utf-8', 'backslashreplace') if isinstance(
        name, bytes) else str(name)
    return re.sub(r'[\x00-\x1f\x7f]', lambda m: '\\x%02x' % ord(m.group()),
                  text)[:300] or '.'


def decompressor(path):
    """The argument list that writes path's tar bytes to stdout, or None
    for a plain .tar."""
    for suffixes, args in DECOMPRESSORS:
        if path.endswith(suffixes):
            return args + ['--', path]
    return None


class Bounds:
    """How many bytes of tar data one pass over a chain may read, how
    little space a replay must leave, and until when both may run."""

    def __init__(self, size, floor=0, deadline=None, space_path=None):
        self.size, self.floor = size, floor
        self.deadline, self.space_path = deadline, space_path
        self.read = 0

    def count(self, n):
        self.read += n
        if self.size is not None and self.read > self.size:
            raise BoundExceeded(
                'size bound: more than %d bytes of tar data, the bound '
                'derived from what the snapshot declares' % self.size)

    def check_time(self):
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise BoundExceeded('time bound: still not done after the '
                                'allowed time')

    def check_space(self):
        if self.space_path and self.floor:
            free = shutil.disk_usage(self.space_path).free
            if free < self.floor:
                raise BoundExceeded(
                    'free-space floor: %d bytes free on %s, the floor is %d '
                    '([server] free_space_floor)' % (
                        free, self.space_path, self.floor))


class Children:
    """The child processes of one replay: each in a process group of its
    own, all killed (group and all) when the replay ends or its deadline
    passes, whatever happened."""

    def __init__(self, deadline=None):
        self.procs = []
        self.timer = None
        self.timed_out = False
        if deadline is not None:
            self.timer = threading.Timer(max(deadline - time.monotonic(), 0),
                                         self.expire)
            self.timer.daemon = True
            self.timer.start()

    def start(self, args, **kwargs):
        proc = subprocess.Popen(args, start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def expire(self):
        self.timed_out = True
        self.kill()

    def kill(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    proc.kill()

    def close(self):
        if self.timer:
            self.timer.cancel()
        self.kill()
        for proc in self.procs:
            proc.wait()


class Reader:
    """Exact reads from a decompressor's pipe, counted against Bounds."""

    def __init__(self, stream, bounds, what):
        self.stream, self.bounds, self.what = stream, bounds, what
        self.seen = 0

    def read(self, n):
        parts = []
        self.copy(n, parts.append)
        return b''.join(parts)

    def account(self, n):
        self.seen += n
        self.bounds.count(n)
        if self.seen & ~((64 << 20) - 1) != (self.seen - n) & ~(
                (64 << 20) - 1):
            self.bounds.check_time()
            self.bounds.check_space()

    def copy(self, n, write):
        """Pass n bytes on to write (None: skip them), in chunks."""
        while n:
            chunk = self.stream.read(min(n, 1 << 20))
            if not chunk:
                raise ChainRefused('%s: truncated: the archive ends inside '
                                   'a member' % self.what)
            n -= len(chunk)
            self.account(len(chunk))
            if write is not None:
                write(chunk)


def octal(field, what):
    """A numeric header field: octal text, or GNU base-256."""
    if field[:1] and field[0] & 0x80:
        if field[0] != 0x80:
            raise ChainRefused('%s: negative number in a header' % what)
        n = 0
        for byte in field[1:]:
            n = n << 8 | byte
        return n
    text = field.split(b'\0', 1)[0].strip(b' ')
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ChainRefused('%s: malformed number %r in a header' % (
            what, text[:20]))


def cstring(field):
    return field.split(b'\0', 1)[0]


def check_sum(block, what):
    recorded = octal(block[148:156], what)
    blank = block[:148] + b' ' * 8 + block[156:]
    unsigned = sum(blank)
    if recorded == unsigned:
        return
    # Some old tars summed signed chars; GNU tar accepts both.
    signed = unsigned - 256 * sum(1 for b in blank if b > 127)
    if recorded != signed:
        raise ChainRefused('%s: header checksum mismatch (not a tar archive, '
                           'or damaged)' % what)


def pax_records(data, what):
    """[(key, value)] of a pax extended header, bytes both."""
    records, i = [], 0
    while i < len(data):
        if data[i:].strip(b'\0') == b'':
            break
        m = re.match(rb'([0-9]+) ', data[i:i + 24])
        if not m:
            raise ChainRefused('%s: malformed pax header' % what)
        length = int(m.group(1))
        record = data[i + m.end():i + length]
        if length <= m.end() or i + length > len(data) or \
                not record.endswith(b'\n') or b'=' not in record:
            raise ChainRefused('%s: malformed pax header' % what)
        key, value = record[:-1].split(b'=', 1)
        records.append((key, value))
        i += length
    return records


def pax_header(records, name=b'././@PaxHeader'):
    """A pax 'x' header (header block and padded data) of records."""
    body = b''
    for key, value in records:
        payload = b' ' + key + b'=' + value + b'\n'
        length = len(payload) + 1
        while len(str(length).encode()) + len(payload) != length:
            length += 1
        body += str(length).encode() + payload
    return tar_header(name, b'x', len(body)) + body + \
        bytes(padded(len(body)) - len(body))


def tar_header(name, kind, size, mode=0o644):
    """A ustar header block for the pax and GNU long-name headers made
    here."""
    block = bytearray(BLOCK)
    block[0:len(name[:99])] = name[:99]
    block[100:108] = b'%07o\0' % mode
    block[108:116] = b'0000000\0'
    block[116:124] = b'0000000\0'
    block[124:136] = b'%011o\0' % size
    block[136:148] = b'00000000000\0'
    block[156:157] = kind
    block[257:265] = b'ustar\x0000'
    return set_checksum(block)


def set_checksum(block):
    block = bytearray(block)
    block[148:156] = b' ' * 8
    block[148:156] = b'%06o\0 ' % sum(block)
    return bytes(block)


class Member:
    """One archive member as read: its name and link target as tar will
    read them, type, mode, pax records, dumpdir, data size, and (when
    kept) its raw header bytes."""

    __slots__ = ('index', 'raw_name', 'type', 'kind', 'mode', 'linkname',
                 'pax', 'dumpdir', 'size', 'ext', 'header', 'extra')

    def privileged(self):
        """What restoring this member as is would grant, or None."""
        if self.kind in 'cb':
            return 'device node'
        if self.mode & PRIVILEGED_BITS and self.kind in 'fdh':
            return 'setuid/setgid bits'
        return None

    def foreign_xattrs(self):
        return [k[len(b'SCHILY.xattr.'):] for k, v in self.pax
                if k.startswith(b'SCHILY.xattr.') and
                not k.startswith(b'SCHILY.xattr.user.')]


def normalise(name, what):
    """b'./a//b/' -> b'a/b'; b'./' -> b''.  Absolute names, '..' and NUL
    are refused."""
    if name.startswith(b'/'):
        raise ChainRefused('%s: absolute name %s' % (what, show(name)))
    if b'\0' in name:
        raise ChainRefused('%s: NUL in a name' % what)
    parts = [p for p in name.split(b'/') if p not in (b'', b'.')]
    if b'..' in parts:
        raise ChainRefused('%s: name %s holds ".."' % (what, show(name)))
    return b'/'.join(parts)


def read_extended(reader, block, what, keep):
    """The pax and GNU long-name headers before a member: ({kind: data},
    [(kind, raw bytes)] when keep, the member's own header block).  At
    most one of each kind; global headers refused."""
    ext, raw_ext = {}, []
    while True:
        check_sum(block, what)
        kind = block[156:157]
        if kind not in (b'x', b'L', b'K', b'g'):
            return ext, raw_ext, block
        if kind == b'g':
            raise ChainRefused('%s: a global pax header (GNU tar does not '
                               'write one for a directory tree)' % what)
        if kind in ext:
            raise ChainRefused('%s: two %r headers for one member' % (
                what, kind.decode()))
        size = octal(block[124:136], what)
        if size > EXT_MAX:
            raise ChainRefused('%s: extended header of %d bytes' % (
                what, size))
        data = reader.read(padded(size))
        ext[kind] = data[:size]
        if keep:
            raw_ext.append((kind, block + data))
        block = reader.read(BLOCK)


def read_member(reader, block, index, what, keep):
    """The member whose first header block is block (past any extended
    headers, which are read here too).  Returns a Member whose data
    (member.size bytes, padded) is still to be read."""
    ext, raw_ext, block = read_extended(reader, block, what, keep)
    member = Member()
    member.index, member.ext = index, raw_ext if keep else None
    member.header = block if keep else None
    member.type = block[156:157]
    if member.type not in KNOWN_TYPES:
        raise ChainRefused('%s: member type %r is not a file, link, '
                           'directory, fifo or device' % (
                               what, member.type.decode('latin-1')))
    name = cstring(block[0:100])
    if block[257:263] == b'ustar\0' and cstring(block[345:500]):
        name = cstring(block[345:500]) + b'/' + name
    linkname = cstring(block[157:257])
    member.pax = pax_records(ext[b'x'], what) if b'x' in ext else []
    pax = dict(member.pax)
    if b'L' in ext:
        name = cstring(ext[b'L'])
    if b'K' in ext:
        linkname = cstring(ext[b'K'])
    for key, wanted in ((b'path', b'L'), (b'linkpath', b'K')):
        if key in pax and wanted in ext:
            raise ChainRefused('%s: both a GNU long name and a pax %s' % (
                what, key.decode()))
    name = pax.get(b'GNU.sparse.name', pax.get(b'path', name))
    linkname = pax.get(b'linkpath', linkname)
    member.raw_name, member.linkname = name, linkname
    member.kind = KIND[member.type]
    member.mode = octal(block[100:108], what)
    if b'size' in pax and not pax[b'size'].isdigit():
        raise ChainRefused('%s: malformed pax size' % what)
    member.size = int(pax[b'size']) if b'size' in pax else \
        octal(block[124:136], what)
    member.extra = b''
    if member.type == b'S':
        extended = block[482]
        while extended:
            more = reader.read(BLOCK)
            member.extra += more
            extended = more[504]
    if member.kind not in 'fd' and member.size:
        raise ChainRefused('%s: member %s of type %r carries %d bytes of '
                           'data' % (what, show(name), member.type.decode(),
                                     member.size))
    member.dumpdir = pax.get(b'GNU.dumpdir')
    return member


def members(reader, what, keep=False):
    """Yield each member of one archive; after each yield, the member's
    data is skipped unless the consumer read it (member.size set to 0).
    Ends at the end-of-archive block."""
    index = 0
    while True:
        block = reader.read(BLOCK)
        if block == ZERO_BLOCK:
            return
        label = '%s, member %d' % (what, index + 1)
        member = read_member(reader, block, index, label, keep)
        if member.type == b'D':
            if member.size > DUMPDIR_MAX:
                raise ChainRefused('%s: dumpdir of %d bytes' % (
                    label, member.size))
            data = reader.read(padded(member.size))
            member.dumpdir = data[:member.size]
            member.size = 0
            if keep:
                member.extra += data
        yield member
        if member.size:
            reader.copy(padded(member.size), None)
        index += 1


def dumpdir_entries(data, what):
    """[(flag, name)] of a dumpdir: Y/N/D entries name the directory's
    children; X, R, T give directory renames (GNU tar incremen.c)."""
    entries = []
    for item in data.split(b'\0'):
        if not item:
            continue
        flag, name = item[:1], item[1:]
        if flag not in b'YNDXRT':
            raise ChainRefused('%s: unknown dumpdir entry %s' % (
                what, show(item)))
        entries.append((flag, name))
    return entries


class Entry:
    """What the model holds at one path: the member that put it there
    (link and index), its kind, and for a hard link the entry it shares
    its data with."""

    __slots__ = ('kind', 'link', 'index', 'target', 'privilege', 'xattrs')

    def __init__(self, kind, link, member, target=None):
        self.kind, self.link, self.index = kind, link, member.index
        self.target = target
        self.privilege = member.privileged()
        self.xattrs = member.foreign_xattrs()


TEMP = b'\0rename-stub'     # GNU tar's temporary name in rename cycles


def parent(path):
    return path.rpartition(b'/')[0] if path else None


class TreeModel:
    """The tree a chain restores, replayed member by member, link by link
    (the dumpdirs' deletions and directory renames included), refusing
    what would make GNU tar write outside it or through a symlink."""

    def __init__(self):
        self.paths = {}         # path -> Entry
        self.kids = {}          # directory path -> set of child paths
        self.what = ''

    def refuse(self, text):
        raise ChainRefused('%s: %s' % (self.what, text))

    def check_parents(self, path, verb='passes through'):
        """Every directory above path must be a directory now (or not
        exist yet: tar makes it): never a symlink or a file."""
        parts = path.split(b'/')
        for n in range(1, len(parts)):
            above = b'/'.join(parts[:n])
            entry = self.paths.get(above)
            if entry is not None and entry.kind != 'd':
                self.refuse('%s %s %s, which is a %s made by link %d '
                            'member %d' % (
                                show(path), verb, show(above),
                                'symlink' if entry.kind == 'l' else
                                'non-directory', entry.link + 1,
                                entry.index + 1))

    def put(self, path, entry):
        old = self.paths.get(path)
        was_dir = path in self.kids if old is None else old.kind == 'd'
        if (old is not None or was_dir) and not (
                was_dir and entry.kind == 'd'):
            self.remove(path)
        self.paths[path] = entry
        # Directories tar makes on the way (no member of their own) are
        # linked too: removing an ancestor must remove all below it.
        while path:
            above = self.kids.setdefault(parent(path), set())
            if path in above:
                break
            above.add(path)
            path = parent(path)

    def remove(self, path):
        """path and everything below it (no recursion: a hostile name may
        have a million components)."""
        for each in reversed(list(self.subtree(path))):
            self.kids.pop(each, None)
            self.paths.pop(each, None)
        if path:
            self.kids.get(parent(path), set()).discard(path)

    def subtree(self, path):
        """path, then everything below it, parents before children."""
        todo = [path]
        while todo:
            each = todo.pop()
            yield each
            todo.extend(sorted(self.kids.get(each, ()), reverse=True))

    def rename(self, src, dst):
        """A directory renamed since the last link (dumpdir R/T)."""
        for path in (src, dst):
            if path != TEMP:
                self.check_parents(path, 'is renamed through')
        if src == b'' or dst == b'' or src == dst:
            self.refuse('renames the archive\'s root or onto itself')
        if dst.startswith(src + b'/'):
            self.refuse('renames %s into itself' % show(src))
        entry = self.paths.get(src)
        if entry is None or entry.kind != 'd':
            self.refuse('renames %s, which is no directory here' % show(src))
        if dst in self.paths:
            self.refuse('renames %s onto %s, which exists' % (
                show(src), show(dst)))
        moved = [(p, self.paths[p]) for p in self.subtree(src)
                 if p in self.paths]
        self.remove(src)
        for p, e in moved:
            self.put(dst + p[len(src):], e)

    def apply_dumpdir(self, path, data):
        entries = dumpdir_entries(data, self.what)
        keep, temp, i = set(), None, 0
        while i < len(entries):
            flag, name = entries[i]
            if flag in b'YND':
                if b'/' in name or name in (b'', b'.', b'..'):
                    self.refuse('dumpdir of %s names %s' % (
                        show(path), show(name)))
                keep.add(name)
            elif flag == b'X':
                temp = TEMP
            elif flag == b'R':
                if i + 1 == len(entries) or entries[i + 1][0] != b'T':
                    self.refuse('dumpdir rename without its target')
                src, dst = name, entries[i + 1][1]
                src = normalise(src, self.what) if src else temp
                dst = normalise(dst, self.what) if dst else temp
                if src is None or dst is None:
                    self.refuse('dumpdir rename through an undefined '
                                'temporary name')
                self.rename(src, dst)
                i += 1
            i += 1
        for child in list(self.kids.get(path, ())):
            if child.rpartition(b'/')[2] not in keep:
                self.remove(child)

    def add(self, link, member):
        """Apply one member; refuse it if unsafe."""
        self.what = 'link %d member %d (%s)' % (link + 1, member.index + 1,
                                                show(member.raw_name))
        path = normalise(member.raw_name, self.what)
        if path == b'' and member.kind != 'd':
            self.refuse('the archive\'s root is not a directory')
        self.check_parents(path)
        target = None
        if member.kind == 'h':
            target = self.hardlink_target(link, path, member)
        entry = Entry(member.kind, link, member, target)
        self.put(path, entry)
        if member.kind == 'd' and member.dumpdir is not None:
            self.apply_dumpdir(path, member.dumpdir)

    def hardlink_target(self, link, path, member):
        """GNU tar writes a hard link only to a name it archived earlier
        in the same archive: anything else is refused."""
        name = normalise(member.linkname, self.what)
        self.check_parents(name, "(a hard link's target) passes through")
        found = self.paths.get(name)
        if found is None or found.link != link or name == path:
            self.refuse('hard link to %s, which this archive does not hold '
                        'before it' % show(member.linkname))
        if found.kind == 'h':
            found = found.target
        if found.kind != 'f':
            self.refuse('hard link to %s, a %s' % (
                show(member.linkname), 'symlink' if found.kind == 'l'
                else 'non-file'))
        return found


class Emit:
    """How one member is written into the replayed stream: under which
    path, as a hard link to which path, with privileged bits cleared."""

    __slots__ = ('path', 'linkname', 'clear')

    def __init__(self, path, linkname=None, clear=False):
        self.path, self.linkname, self.clear = path, linkname, clear


class PathNotHeld(ChainRefused):
    """restore --path names a path the snapshot does not hold; .paths
    lists them (for a hint naming a snapshot that does)."""

    def __init__(self, message, paths):
        ChainRefused.__init__(self, message)
        self.paths = paths


class Chain:
    """One chain (archive paths, full first): judged once, then replayed
    as one plain tar stream of its final tree, whole or some paths."""

    def __init__(self, archives, bounds):
        self.archives, self.bounds = list(archives), bounds
        self.model = TreeModel()
        self.warnings = []
        self.left_out = set()

    def open(self, link, children):
        """A Reader over one link's tar bytes (decompressed by a child)."""
        path = self.archives[link]
        what = 'link %d (%s)' % (link + 1, os.path.basename(path))
        args = decompressor(path)
        if args is None:
            return Reader(open(path, 'rb'), self.bounds, what)
        proc = children.start(args, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
        return Reader(proc.stdout, self.bounds, what)

    def judge(self):
        """Read every link; refuse the chain (ChainRefused) at the first
        unsafe member.  Nothing is written."""
        self.bounds.read = 0
        for link in range(len(self.archives)):
            self.each_member(link, False,
                             lambda m, reader: self.model.add(link, m))
        return self

    def each_member(self, link, keep, handle):
        children = Children(self.bounds.deadline)
        try:
            reader = self.open(link, children)
            try:
                for member in members(reader, reader.what, keep):
                    handle(member, reader)
                    self.bounds.check_time()
            finally:
                reader.stream.close()
        finally:
            children.close()
            if children.timed_out:
                self.bounds.check_time()

    def select(self, paths):
        """The final paths a restore of `paths` (all when empty) writes:
        each path, everything below it, and the directories above it."""
        final = self.model.paths
        if not paths:
            return set(final)
        missing = [p for p in paths
                   if p not in final and p not in self.model.kids]
        if missing:
            raise PathNotHeld('not in this snapshot: ' + ', '.join(
                show(p) for p in missing), missing)
        chosen = set()
        for wanted in paths:
            chosen.update(p for p in self.model.subtree(wanted) if p in final)
            above = parent(wanted)
            while above is not None:
                if above in final:
                    chosen.add(above)
                above = parent(above)
        return chosen

    def plan(self, chosen, keep_privilege):
        """{link: {member index: Emit}} for the chosen final paths; hard
        links whose data member is not written as itself get it under
        their first name (their other names link to that)."""
        final = self.model.paths
        at = {id(e): p for p, e in final.items()}
        plan = [{} for _ in self.archives]
        carriers = {}
        left_out = {}
        self.left_out = set()
        for path in sorted(chosen):
            entry = final[path]
            if not keep_privilege and entry.privilege:
                left_out.setdefault(entry.privilege, []).append(path)
                if entry.kind in 'cb':
                    self.left_out.add(os.fsdecode(path))
                    continue
            if not keep_privilege and entry.xattrs:
                left_out.setdefault('xattrs outside user.*', []).append(path)
            clear = not keep_privilege and bool(entry.privilege)
            if entry.kind != 'h':
                plan[entry.link][entry.index] = Emit(path, None, clear)
                continue
            target = entry.target
            if id(target) in at and at[id(target)] in chosen:
                carrier = at[id(target)]
            else:
                carrier = carriers.setdefault(id(target), path)
                if carrier == path:
                    plan[target.link][target.index] = Emit(
                        path, None, clear or (not keep_privilege and
                                              bool(target.privilege)))
                    continue
            plan[entry.link][entry.index] = Emit(path, carrier, clear)
        self.warnings = ['%s left out (restore with --same-owner as root, '
                         'or through --stdout): %s' % (what, ', '.join(
                             show(p) for p in sorted(paths)[:WARN_NAMES]) + (
                             ' and %d more' % (len(paths) - WARN_NAMES)
                             if len(paths) > WARN_NAMES else ''))
                         for what, paths in sorted(left_out.items())]
        return plan

    def replay(self, plan, write, progress=None):
        """Write the plan's members, in chain order, then the end of
        archive: one plain tar stream of the (chosen) final tree."""
        self.bounds.read = 0      # each pass is held to the size bound
        self.bounds.check_time()
        self.bounds.check_space()
        for link, emits in enumerate(plan):
            if emits:
                self.each_member(link, True, lambda m, r, e=emits: emit(
                    m, e.get(m.index), write, r, progress))
        write(ZERO_BLOCK * 2)



def emit(member, how, write, reader, progress=None):
    """Write one member (headers, then its data from reader) as `how`
    says; a member the plan leaves out is skipped by members()."""
    if how is None:
        return
    what = '%s, member %d' % (reader.what, member.index + 1)
    write(rendered_headers(member, how, what))
    size, member.size = member.size, 0
    reader.copy(padded(size), write)
    if progress:
        progress()


def dotted(path):
    return b'./' + path if path else b'./'


def rendered_headers(member, emit, what):
    """The member's header bytes as written into the replayed stream: the
    client's own bytes, or rebuilt where a name, a hard link's target or
    privileged bits must change."""
    expected = normalise(member.raw_name, what)
    relink = emit.linkname is not None and \
        emit.linkname != normalise(member.linkname, what)
    rename = emit.path != expected
    if emit.linkname is not None and member.kind != 'h':
        raise ChainRefused('%s: changed between two reads' % what)
    clear = emit.clear and member.mode & PRIVILEGED_BITS
    if not (rename or relink or clear):
        return b''.join(raw for _, raw in member.ext) + member.header + \
            member.extra
    records = list(member.pax)
    dropped = {b'x'}
    if rename:
        dropped.add(b'L')
        key = b'GNU.sparse.name' if any(
            k == b'GNU.sparse.name' for k, _ in records) else b'path'
        records = [(k, v) for k, v in records if k != key] + [
            (key, dotted(emit.path))]
    if relink:
        dropped.add(b'K')
        records = [(k, v) for k, v in records if k != b'linkpath'] + [
            (b'linkpath', dotted(emit.linkname))]
    header = bytearray(member.header)
    if clear:
        header[100:108] = b'%07o\0' % (member.mode & ~PRIVILEGED_BITS)
    parts = [raw for kind, raw in member.ext if kind not in dropped]
    if records:
        parts.append(pax_header(records))
    return b''.join(parts) + set_checksum(header) + member.extra


_features = {}


def tar_features(tar='tar'):
    """Which of xattrs, acls, selinux this GNU tar knows (its --help); tar
    is a program name or the argument list that runs it."""
    tar = (tar,) if isinstance(tar, str) else tuple(tar)
    if tar not in _features:
        try:
            out = subprocess.run(
                list(tar) + ['--help'], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                timeout=30, env=dict(os.environ, LC_ALL='C')).stdout
        except (OSError, subprocess.TimeoutExpired):
            out = b''
        _features[tar] = tuple(f for f in ('xattrs', 'acls', 'selinux')
                               if ('--' + f).encode() in out)
    return _features[tar]


def extract_command(directory, same_owner, tar='tar'):
    """GNU tar reading a replayed stream on stdin into directory: exact
    modes (privileged bits were cleared in the stream unless same_owner),
    owners and every xattr namespace only with same_owner."""
    args = [tar, '--extract', '--file=-', '--directory=' + directory,
            '--same-permissions']
    args += ['--same-owner', '--numeric-owner'] if same_owner else \
        ['--no-same-owner']
    features = tar_features(tar)
    if 'xattrs' in features:
        args += ['--xattrs', '--xattrs-include=' + (
            '*' if same_owner else 'user.*')]
    if 'acls' in features:
        args.append('--acls')
    if same_owner and 'selinux' in features:
        args.append('--selinux')
    return args


class TarFailed(Exception):
    """GNU tar failed extracting a judged stream (disk full, a file system
    that refuses an attribute...): its own words."""


def extract(chain, plan, directory, same_owner, tar='tar', progress=None):
    """Replay plan into a GNU tar extracting into directory (a fresh
    scratch directory: the caller moves it into place); progress() after
    each member."""
    children = Children(chain.bounds.deadline)
    with open(os.devnull, 'wb') as null:
        err = tempfile.TemporaryFile()
        try:
            proc = children.start(
                extract_command(directory, same_owner, tar),
                stdin=subprocess.PIPE, stdout=null, stderr=err,
                env=dict(os.environ, LC_ALL='C.UTF-8'))
            try:
                chain.replay(plan, proc.stdin.write, progress)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            status = proc.wait()
            if children.timed_out:
                chain.bounds.deadline = 0
                chain.bounds.check_time()
            if status != 0:
                err.seek(0)
                raise TarFailed('tar failed extracting (exit %d): %s' % (
                    status, show(err.read()[-2000:])))
        finally:
            children.close()
            err.close()
