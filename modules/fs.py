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

Archives carry every piece of metadata the local tar can keep (POSIX
format, all xattr namespaces, ACLs, SELinux labels: metadata_options).
On the node, restore_tree() and restore_stream() are the one way a chain
comes back: judged whole first, then replayed (modules/_tarchain.py).
"""

import os
import re
import shlex
import shutil
import subprocess

from modules import _core, _tarchain
from modules import _tarlisting as tarlisting
from modules._core import clean_text

# Beside every archive: tar's verbose index of it (read by _tarlisting.py
# for drill_stored and the node's find, ls and diff).
LISTING_SUFFIX = tarlisting.LISTING_SUFFIX
# Node side: the files this module stores (what tar and the compressors
# make of a directory) and the companion it sends beside each.
STORED_SUFFIXES = ('.tar', '.tar.gz', '.tgz', '.tar.xz', '.txz', '.tar.zst',
                   '.tar.bz2', '.tbz2')
COMPANION_SUFFIXES = (LISTING_SUFFIX,)
# The program that reads each compressed kind (one table: _tarchain's).
TAR_TOOLS = tuple((suffixes, args[0])
                  for suffixes, args in _tarchain.DECOMPRESSORS)


_full_time = {}


def full_time_option(tar_command):
    """['--full-time'] when tar lists seconds with it (GNU tar >= 1.27),
    else [] (the node then compares no mtimes from the listing).  Asked of
    the tar program itself: a sudo prefix allows only --create."""
    if tar_command not in _full_time:
        words = shlex.split(tar_command) or ['tar']
        program = next((w for w in words if os.path.basename(w) in
                        ('tar', 'gtar')), words[-1])
        try:
            proc = subprocess.run(
                [program, '--help'],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, timeout=30,
                env=dict(os.environ, LC_ALL='C'))
            _full_time[tar_command] = ['--full-time'] \
                if b'--full-time' in proc.stdout else []
        except (OSError, subprocess.TimeoutExpired):
            _full_time[tar_command] = []
    return _full_time[tar_command]


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
    # drill proves a restored tree against it, and find/ls/diff read it
    # (both through _tarlisting.py, which knows this format).  The third
    # --verbose adds each member's extended attribute names and ACLs on
    # indented lines when tar archives them.
    # --full-time in UTC gives the node mtimes to the second it can
    # compare (tar prints local time, and minutes only without it).
    # None when [client] full_every = 0: every archive is full.
    chain = ctx.archive_chain(path)
    incremental = chain.start() if chain else []
    # --ignore-failed-read: a file that cannot be read (or has a name too
    # long, or vanished) is a warning, not a fatal error: the rest of the
    # tree is still a backup (tar_problems below names what is missing).
    tar = shlex.split(ctx.settings['tar_command'])
    args = tar + [
        '--create', '--file=-', '--sparse', '--ignore-failed-read',
        *metadata_options(tar), *options, *incremental,
        '--verbose', '--verbose', '--verbose', '--quoting-style=escape',
        *full_time_option(ctx.settings['tar_command']),
        f'--index-file={listing}.part', f'--directory={path}', '.']
    status, stderr = ctx.stream_command_to_file(
        args, archive, env=dict(os.environ, TZ='UTC'))
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
    not made)) and the restored tree is compared, entry by entry, with
    the complete tree the chain's listings describe at that point
    (_tarlisting.compare_tree).  Returns (problems, what was proven)."""
    extracted = ctx.extract_chain(scratch)
    links = extracted.links
    name = names[0]
    archives = [(stored_archive(link), link.name) for link in ctx.chain]
    stored = [(archive + LISTING_SUFFIX, archive, link_name)
              for archive, link_name in archives]
    if not all(os.path.isfile(listing) for listing, _, _ in stored):
        return [], f'{name}: extracted; no listing recorded to compare with'
    expected = tarlisting.chain_tree(stored, ctx.timeout)
    # Owners are not compared: a drill restores them by number, while
    # listings name them as the client's accounts do; privilege (device
    # nodes, setuid bits) is never restored on the node.
    problems, compared = tarlisting.compare_tree(
        extracted.top, expected, privileged=False)
    left_out = len(expected) - compared
    return [f'{clean_text(path)}: {problem}' for path, problem in problems], \
        (f'{name}: {compared} entries compared with the tree the listings '
         f'of {links} link(s) describe (type, size, mode, mtime, xattrs): '
         'all match' + (f'; {left_out} device node(s) left out'
                        if left_out else ''))


def stored_archive(link):
    """The path of the archive a stored snapshot (a link of a chain)
    holds, from its manifest."""
    for entry in (link.manifest or {}).get('files') or []:
        if isinstance(entry, dict) and \
                str(entry.get('name')).endswith(STORED_SUFFIXES):
            return os.path.join(link.path, entry['name'])
    raise ValueError(f'{link.name}: no archive in this snapshot')
