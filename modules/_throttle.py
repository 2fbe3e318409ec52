"""_throttle: cap what a git fetch downloads, for the node's bwlimit.

Neither OpenSSH nor git has a rate option, so the node's git module runs
this program as git's transport when [client NAME] bwlimit (or [server]
bwlimit) is set; it is plumbing, not a backup module (module names start
with a letter, so it can never be loaded as one).

    _throttle.py KBITS -- SSH_COMMAND...    as GIT_SSH_COMMAND (ssh://)
    _throttle.py KBITS --connect HOST PORT  as core.gitProxy (git://)

Guarantees: what comes from the client (ssh's stdout, or the TCP
connection) reaches git at KBITS Kbit/s at most, averaged over a quarter
of a second or one 64 KiB chunk, whichever is longer; what git sends is
not slowed.  Memory stays at one chunk.  With ssh, ssh's stderr and exit
status are ssh's own, SIGTERM and SIGINT are passed on to it, and ssh is
stopped when git stops reading.  The program runs in git's process group:
killing the group (the node's stall and command timeouts) kills it too.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

MAX_CHUNK = 64 << 10
MIN_CHUNK = 4 << 10
USAGE = ('usage: _throttle.py KBITS -- COMMAND [ARG...]\n'
         '       _throttle.py KBITS --connect HOST PORT\n')


class Bucket:
    """A token bucket of bytes: take(n) sleeps until n more bytes fit
    under the rate since the start; idle time earns no more than one
    chunk of credit, so a pause is never followed by a long burst."""

    def __init__(self, kbits):
        self.rate = kbits * 1000 / 8
        self.chunk = int(min(MAX_CHUNK, max(MIN_CHUNK, self.rate / 4)))
        self.free_at = time.monotonic()

    def take(self, n):
        now = time.monotonic()
        self.free_at = max(self.free_at, now - self.chunk / self.rate)
        self.free_at += n / self.rate
        if self.free_at > now:
            time.sleep(self.free_at - now)


def pump(read, bucket):
    """Copy what read(size) returns to our stdout at the bucket's rate,
    until read returns b''.  Returns False when git stopped reading."""
    while True:
        data = read(bucket.chunk)
        if not data:
            return True
        bucket.take(len(data))
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]
        except BrokenPipeError:
            return False


def run_command(bucket, command):
    """ssh mode: start the command on our stdin and stderr (what git
    sends is not slowed: ssh reads it itself) and pump its stdout."""
    try:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE)
    except OSError as e:
        sys.stderr.write(f'_throttle: cannot run {command[0]}: {e}\n')
        return 127

    def forward(signum, frame):
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if not pump(lambda size: proc.stdout.read1(size), bucket):
        proc.terminate()    # git is gone: nobody wants the rest
    proc.stdout.close()
    status = proc.wait()
    return 128 - status if status < 0 else status   # as a shell says it


def send_all(sock):
    """What git writes goes to the connection as it comes; our stdin's
    end closes the connection's sending half, as git's own socket
    would."""
    try:
        while True:
            data = os.read(0, MAX_CHUNK)
            if not data:
                break
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass    # the connection is gone: the pump sees it end


def run_connect(bucket, host, port):
    """git:// mode (git's proxy command): connect to host:port and carry
    the protocol both ways, the download at the bucket's rate."""
    try:
        sock = socket.create_connection((host, int(port)))
    except (OSError, ValueError) as e:
        # "unable to connect": the node counts the client unreachable.
        sys.stderr.write(f'_throttle: unable to connect to {host}:{port}: '
                         f'{e}\n')
        return 1
    threading.Thread(target=send_all, args=(sock,), daemon=True).start()
    try:
        pump(sock.recv, bucket)
    except OSError as e:
        sys.stderr.write(f'_throttle: {host}:{port}: {e}\n')
        return 1
    return 0


def main(argv):
    try:
        kbits = int(argv[0])
        mode = argv[1]
    except (IndexError, ValueError):
        kbits, mode = 0, None
    if kbits <= 0 or mode not in ('--', '--connect') or \
            (mode == '--' and len(argv) < 3) or \
            (mode == '--connect' and len(argv) != 4):
        sys.stderr.write(USAGE)
        return 2
    bucket = Bucket(kbits)
    if mode == '--':
        return run_command(bucket, argv[2:])
    return run_connect(bucket, argv[2], argv[3])


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
