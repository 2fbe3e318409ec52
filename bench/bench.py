"""make bench: size-dependent measurements, kept out of the timed suite.

For each size in $BENCH_SIZES (MiB, default "64 256 1024") a directory
holding one incompressible file of that size goes through the whole
pipeline on this machine (private sshd on 127.0.0.1, as in make demo):
client.py send (tar + gzip + sha256 + push) and server.py run (sftp
download + sha256 + store).  Printed per size: wall time of each step and
the peak resident memory of the largest process of that step (Python,
tar, ssh, sftp), which must stay flat as the size grows: data is streamed,
never held whole.  Then ingest's time for one push of $BENCH_REQUESTS
requests (default 1000).
"""

import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import support  # noqa: E402
from tests.demo import Demo  # noqa: E402
from tests.pipeline import Pipeline  # noqa: E402

MEASURE = '''
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(rc)
'''


def measured(p, script, *args):
    """(seconds, peak RSS in MiB of the largest process) of one command."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, '-c', MEASURE, sys.executable,
         os.path.join(support.ROOT, script), '--config', p.config, '-q',
         *args], env=p.env, stderr=subprocess.PIPE, text=True)
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f'{script} {" ".join(args)} failed:\n{proc.stderr}')
    return seconds, int(proc.stderr.strip().splitlines()[-1]) / 1024


def write_random(path, mib):
    block = os.urandom(1 << 20)
    with open(path, 'wb') as f:
        for i in range(mib):
            f.write(block[i % 4096:] + block[:i % 4096])


def main():
    sizes = [int(s) for s in os.environ.get('BENCH_SIZES',
                                            '64 256 1024').split()]
    n_requests = int(os.environ.get('BENCH_REQUESTS', '1000'))
    demo = Demo()
    with demo.cleanups:
        p = Pipeline(demo)
        demo.cleanups.callback(shutil.rmtree, p.root, ignore_errors=True)
        print(f'{"size":>8}  {"send s":>7} {"send MiB":>9}  {"run s":>7} '
              f'{"run MiB":>8}  {"MB/s":>6}')
        for mib in sizes:
            src = os.path.join(p.root, f'src-{mib}')
            os.makedirs(src)
            write_random(os.path.join(src, 'data.bin'), mib)
            p.client('commit', 'app', src)
            send_s, send_rss = measured(p, 'client.py', 'send')
            run_s, run_rss = measured(p, 'server.py', 'run')
            rate = mib * 1.048576 / (send_s + run_s)
            print(f'{mib:>5} MiB  {send_s:>7.1f} {send_rss:>9.1f}  '
                  f'{run_s:>7.1f} {run_rss:>8.1f}  {rate:>6.1f}')
            shutil.rmtree(src)
            sys.stdout.flush()

        # ingest: one push carrying many requests.
        for i in range(n_requests):
            p.client('commit', 'dummy', f'r{i}') if i < 3 else \
                open(os.path.join(p.client_dir, 'requests', 'n1',
                                  f'C20260101T000000.{i:06d}Z-1-0001'),
                     'w').write('dummy\tbench\n')
        hook = os.path.join(p.repo, 'hooks', 'post-update')
        os.rename(hook, hook + '.off')
        p.client('send')
        start = time.monotonic()
        p.server('ingest', '--repository', p.repo, 'c1')
        print(f'ingest of one push with {n_requests} requests: '
              f'{time.monotonic() - start:.2f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
