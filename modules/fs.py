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

# Beside every archive: tar's verbose index of it (server.py's drill reads
# files ending so as listings).
LISTING_SUFFIX = '.listing'


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
