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

from modules import _core, _tarchain

# Beside every archive: tar's verbose index of it (server.py's drill reads
# files ending so as listings).
LISTING_SUFFIX = '.listing'


def check_path(client, module, path):
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
