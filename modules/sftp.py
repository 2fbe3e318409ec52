"""sftp: fetch one file a client prepared (node side).

Request: ``sftp <timestamp> <user@host:/absolute/path> [sha256=.. size=..
source=..]``.  Only the path is taken from the request, and only if it lies
inside the client's ``sftp_root``; the user, host and port are the node's
own (``[client NAME] sftp``, ``sftp_port``), and a request naming another
account is refused.  The file is downloaded by ``sftp`` in batch mode with
the node's key straight to disk, checked against the announced size and
sha256, and stored with a manifest as ``files/<source>/<node time>/``.
"""

import os


def handle(ctx, rest):
    words = rest.split(' ')
    if len(words) < 2:
        ctx.refuse('sftp request needs <timestamp> <user@host:/path>')
    client_time = ctx.check_timestamp(words[0])
    account, sep, path = words[1].partition(':')
    if not sep or not path.startswith('/'):
        ctx.refuse(f'bad sftp URL {words[1]!r}: want user@host:/path')
    if account != ctx.settings['sftp']:
        ctx.refuse(f'request names {account!r}, but this node fetches from '
                   f'{ctx.settings["sftp"]!r} for client {ctx.client} '
                   f'(see [client {ctx.client}] sftp)')
    options = ctx.parse_options(words[2:])
    remote = ctx.check_remote_path(path, ctx.settings['sftp_root'])
    source = options.get('source', 'files')
    name = os.path.basename(remote)
    if name == 'manifest.json':
        ctx.refuse('a file may not be called manifest.json')
    if ctx.leftover:
        stored = ctx.already_stored(source)
        if stored:
            return {'stored': stored, 'recovered': True}
    size = int(options['size']) if 'size' in options else None
    # Without an announced size the download is capped at what the quota
    # and the free-space floor still allow (a client cannot fill the disk).
    allowance = ctx.check_space(size or 0)
    incoming = ctx.incoming_dir()
    part = os.path.join(incoming, name + '.part')
    ctx.sftp_get(remote, part, max_size=size if size is not None
                 else allowance)
    ctx.pause_point('run:downloaded')
    digest, got = ctx.sha256_file(part)
    if size is None and allowance is not None and got > allowance:
        raise ctx.TransientError(f'{remote}: {got} bytes, more than the '
                                 f'{allowance} the quota and free-space '
                                 'floor allow')
    if size is not None and got != size:
        raise ctx.TransientError(f'{remote}: got {got} bytes, request says '
                                 f'{size}')
    if 'sha256' in options and digest != options['sha256']:
        raise ctx.TransientError(f'{remote}: sha256 {digest} does not match '
                                 f'the request\'s {options["sha256"]}')
    os.rename(part, os.path.join(incoming, name))
    received = ctx.now()
    stored = ctx.store(incoming, source, {
        'module': 'sftp', 'client_timestamp': client_time,
        'remote': remote, 'received': received,
        'files': [{'name': name, 'sha256': digest, 'size': got}]})
    return {'stored': stored, 'sha256': digest, 'size': got}
