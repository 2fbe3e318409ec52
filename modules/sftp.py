"""sftp: fetch one file a client prepared (node side).

Request: ``sftp <timestamp> <user@host:/absolute/path> [sha256=.. size=..
source=.. companion=NAME companion_sha256=.. companion_size=..]``; a
companion is a file beside the main one that describes it (an archive's
listing, a dump's row statistics), stored in the same snapshot; ``level=.. base=..`` mark an
increment (level > 0), refused unless its chain is whole here;
``warnings=N warned=..`` mark a backup stored with warnings (files the
client could not read; the lines read as hostile text, bounded).  Only the path is taken from the request, and only if it lies
inside the client's ``sftp_root``; the user, host and port are the node's
own (``[client NAME] sftp``, ``sftp_port``), and a request naming another
account is refused.  The file is downloaded by ``sftp`` in batch mode with
the node's key straight to disk, checked against the announced size and
sha256, and stored with a manifest as ``files/<source>/<node time>/``.
"""

import os
import shlex
import subprocess
import tempfile
import time


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
    level, base = ctx.check_base(source, options)
    # Files the client could not read (the rest is in the archive).
    warnings = ctx.request_warnings(options)
    name = os.path.basename(remote)
    if name == 'manifest.json':
        ctx.refuse('a file may not be called manifest.json')
    if ctx.leftover:
        stored = ctx.already_stored(source)
        if stored:
            return {'stored': stored, 'recovered': True, **warnings}
    size = int(options['size']) if 'size' in options else None
    # Without an announced size the download is capped at what the quota
    # and the free-space floor still allow (a client cannot fill the disk).
    allowance = ctx.check_space(size or 0)
    incoming = ctx.incoming_dir()
    part = os.path.join(incoming, name + '.part')
    sftp_get(ctx, remote, part, max_size=size if size is not None
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
    files = [{'name': name, 'sha256': digest, 'size': got}]
    files += fetch_companion(ctx, remote, options, incoming)
    received = ctx.now()
    stored = ctx.store(incoming, source, {
        'module': 'sftp', 'client_timestamp': client_time,
        'remote': remote, 'received': received, 'files': files,
        # An incremental archive: restore needs the chain down to level 0.
        **({'level': level} if 'level' in options else {}),
        **({'base': base} if base else {}), **warnings})
    return {'stored': stored, 'sha256': digest, 'size': got, **warnings}


def request_source(settings, rest):
    """The source a request line feeds (its ``source=``, default
    ``files``), for the node's report of pending and failed requests;
    the node validates what this returns."""
    for word in rest.split()[2:]:
        if word.startswith('source='):
            return word[len('source='):]
    return 'files'


def fetch_companion(ctx, remote, options, incoming):
    """The file beside the main one that describes it (``companion=NAME``
    with its own sha256 and size): fetched, checked and stored in the same
    snapshot.  Returns its manifest entries ([] when there is none)."""
    name = options.get('companion')
    if not name:
        return []
    if 'companion_sha256' not in options or 'companion_size' not in options:
        ctx.refuse('companion= needs companion_sha256= and companion_size=')
    if name == os.path.basename(remote):
        ctx.refuse('a companion must be another file')
    path = ctx.check_remote_path(os.path.join(os.path.dirname(remote), name),
                                 ctx.settings['sftp_root'])
    size = int(options['companion_size'])
    ctx.check_space(size)
    part = os.path.join(incoming, name + '.part')
    sftp_get(ctx, path, part, max_size=size)
    digest, got = ctx.sha256_file(part)
    if (digest, got) != (options['companion_sha256'], size):
        raise ctx.TransientError(f'{path}: got sha256 {digest}, {got} bytes; '
                                 f'request says {options["companion_sha256"]}'
                                 f', {size}')
    os.rename(part, os.path.join(incoming, name))
    return [{'name': name, 'sha256': digest, 'size': got}]


# -- transport ---------------------------------------------------------------

# OpenSSH's default ciphers, the AES-GCM ones first: with AES instructions
# (any x86 server of the last decade) they move a 590 MB archive over
# loopback in 2.5 s where chacha20-poly1305, the default first, takes 4 s.
# An explicit -o Ciphers= in [server] ssh_command still wins (it comes
# first); a Ciphers line in an ssh_config file does not.
CIPHERS = ('aes128-gcm@openssh.com,aes256-gcm@openssh.com,'
           'chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr')

def ssh_args(ctx):
    """[server] ssh_command split into what sftp accepts: -S program and
    the options."""
    words = shlex.split(ctx.node.settings['ssh_command'])
    args = [] if words[0] == 'ssh' else ['-S', words[0]]
    return args + words[1:]


def bwlimit_args(ctx):
    """sftp's own cap (-l, Kbit/s) from [client NAME] bwlimit, else
    [server] bwlimit: a nightly full must not fill a small site's uplink."""
    limit = ctx.settings.get('bwlimit') or 0
    return ['-l', str(limit)] if limit > 0 else []


def sftp_get(ctx, remote, local, max_size=None):
    """Download one file with sftp in batch mode into local.  Streams to
    disk; stops the transfer if the file grows beyond max_size."""
    target = ctx.settings['sftp']
    options = ['-o', f'Port={ctx.settings["sftp_port"]}',
               '-o', 'BatchMode=yes', '-o', f'Ciphers={CIPHERS}',
               *ctx.ssh_timeout_options()]
    # All transfers of the client's turn go over one ssh connection (one
    # handshake), opened by the first and closed with the turn.
    options += ctx.shared_ssh(shlex.split(ctx.node.settings['ssh_command'])
                              + options, target)
    args = ['sftp', '-b', '-', *ssh_args(ctx), *options,
            *bwlimit_args(ctx), '--', target]
    batch = 'get "%s" "%s"\n' % (remote, local.replace('\\', '\\\\')
                                 .replace('"', '\\"'))
    ctx.log.debug('running: %s <<< %s', ctx.shell_line(args),
                  batch.strip())
    # stderr goes to a file: a pipe nobody reads while we poll could fill
    # up and stall the transfer.
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=err,
                                    env={**os.environ, 'LC_ALL': 'C'},
                                    start_new_session=True)
        except FileNotFoundError:
            raise ctx.ModuleError('sftp: not installed or not in PATH') \
                from None
        proc.stdin.write(batch.encode())
        proc.stdin.close()
        stopped = watch(ctx, proc, local, max_size, target, remote)
        err.seek(0)
        stderr = err.read().decode('utf-8', 'replace')
    if stopped:
        message, error = stopped
        raise error(message)
    if proc.returncode != 0:
        # sftp exits 255 when ssh cannot connect or authenticate, and 1
        # with a message when the connection drops in the middle; killed
        # by a signal (SIGPIPE from a dead ssh) it says nothing.  A file
        # that had started to arrive and then failed is a cut connection,
        # whatever the wording: an outage, not a bad request.
        # A login ssh refuses (key not authorized, host key unknown or
        # changed) also exits 255, but waits for a human, not an outage.
        started = os.path.exists(local) and os.path.getsize(local) > 0
        hint = ''
        if not started and ctx.access_denied(stderr):
            error, hint = ctx.AccessDenied, f' ({ctx.ACCESS_DENIED_HINT})'
        elif proc.returncode == 255 or proc.returncode < 0 or started or \
                ctx.connection_lost(stderr):
            error = ctx.Unreachable
        else:
            error = ctx.TransientError
        raise error(
            f'sftp from {target} port {ctx.settings["sftp_port"]} '
            f'failed (exit {proc.returncode}): '
            f'{ctx.clean_text(stderr.strip(), 1000)}{hint}')


def check_connection(ctx):
    """`server.py check --connect`: log in to the client as `run` does and
    change into sftp_root.  Returns [(what was tried, '' or what fails and
    how to fix it)]."""
    if ctx.side != 'server':
        return []
    target, port = ctx.settings['sftp'], ctx.settings['sftp_port']
    root = ctx.settings['sftp_root']
    what = f'{ctx.client}: sftp {target} port {port}, sftp_root {root}'
    if not root:
        return [(what, f'no sftp_root: set it in [client {ctx.client}] or '
                 '[server]')]
    args = ['sftp', '-b', '-', *ssh_args(ctx), '-o', f'Port={port}',
            '-o', 'BatchMode=yes', *ctx.ssh_timeout_options(), '--', target]
    batch = 'cd "%s"\npwd\n' % root.replace('\\', '\\\\') \
        .replace('"', '\\"')
    try:
        proc = ctx.run(args, input=batch, check=False, timeout=120,
                       env={**os.environ, 'LC_ALL': 'C'})
    except (ctx.CommandFailed, ctx.ToolMissing) as e:
        return [(what, ctx.clean_text(str(e)))]
    if proc.returncode == 0:
        return [(what, '')]
    return [(what, ctx.ssh_problem(
        proc.stderr, target, port,
        f"add the node's public key (the -i of [server] ssh_command) to "
        f"~{target.partition('@')[0]}/.ssh/authorized_keys on the client")
        or f'{ctx.clean_text(proc.stderr.strip(), 300)}: sftp_root is '
        f'missing or not readable by {target}: create it, or fix '
        f'[client {ctx.client}] sftp_root')]


def watch(ctx, proc, local, max_size, target, remote):
    """Wait for sftp; kill it and its ssh (the whole process group) when
    the file outgrows max_size, grows no more for stall_timeout, or
    command_timeout passes.  Returns (why, exception class) when it was
    stopped, or None."""
    stall = ctx.config.get_duration('server', 'stall_timeout', '10m')
    deadline = time.monotonic() + ctx.timeout
    last_size, last_progress = -1, time.monotonic()
    stopped = None
    while proc.poll() is None:
        now = time.monotonic()
        size = os.path.getsize(local) if os.path.exists(local) else 0
        if size != last_size:
            last_size, last_progress = size, now
        if max_size is not None and size > max_size:
            stopped = (f'{target}:{remote} is larger than the {max_size} '
                       'bytes announced; stopped', ctx.TransientError)
        elif now > deadline:
            stopped = (f'sftp from {target} still running after '
                       f'{ctx.timeout} s ([server] command_timeout); '
                       'stopped', ctx.TimedOut)
        elif now - last_progress > stall:
            stopped = (f'sftp from {target}: {remote} made no progress for '
                       f'{stall} s ([server] stall_timeout); stopped',
                       ctx.TimedOut)
        if stopped:
            ctx.kill_tree(proc)
            break
        try:
            # Wakes as soon as sftp ends: a small file costs no poll period.
            proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
    return stopped
