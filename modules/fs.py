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
"""

import os
import re
import shlex
import subprocess

# Beside every archive: tar's verbose index of it (server.py's drill reads
# files ending so as listings).
LISTING_SUFFIX = '.listing'


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
    # drill proves a restored tree against it, and find/ls/diff read it
    # (both through _tarlisting.py, which knows this format).  The third
    # --verbose adds each member's extended attribute names and ACLs on
    # indented lines when tar archives them.
    # --full-time in UTC gives the node mtimes to the second it can
    # compare (tar prints local time, and minutes only without it).
    # None when [client] full_every = 0: every archive is full.
    chain = ctx.archive_chain(path)
    incremental = chain.start() if chain else []
    args = shlex.split(ctx.settings['tar_command']) + [
        '--create', '--file=-', '--sparse', *options, *incremental,
        '--verbose', '--verbose', '--verbose', '--quoting-style=escape',
        *full_time_option(ctx.settings['tar_command']),
        f'--index-file={listing}.part', f'--directory={path}', '.']
    status, stderr = ctx.stream_command_to_file(
        args, archive, env=dict(os.environ, TZ='UTC'))
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
