"""fs: back up a directory as one tar archive (client side).

The archive is written by tar to a file in the request's own directory of
export_dir (streamed, never held in memory), published by rename when
complete, and offered to the node as one ``sftp`` server request with its
sha256 and size.  ``[client] tar_command`` may carry a prefix such as
``sudo -n tar`` (see docs/modules.md), ``compression`` picks gzip, xz,
zstd, bzip2 or none.
"""

import os
import re
import shlex


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
    args = shlex.split(ctx.settings['tar_command']) + [
        '--create', '--file=-', '--sparse', *options,
        f'--directory={path}', '.']
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
    yield 'fs', ctx.sftp_request(archive, source=module)
