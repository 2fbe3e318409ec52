"""Run the suite (make test) and end with one plain summary line,
'N passed, N failed, N skipped', that CI and people can read.

Test modules run in parallel worker processes (they spend their time
waiting on sshd, git and PostgreSQL, not on the CPU); each module's output
is printed whole when it finishes.  `tests/run.py tests.test_pipeline ...`
runs only the named modules or tests.  JOBS=1 runs them one by one.
"""

import concurrent.futures
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = '''
import sys, unittest
sys.path.insert(0, sys.argv[1])
suite = unittest.TestLoader().loadTestsFromNames(sys.argv[2:])
result = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
for test, reason in result.skipped:
    print('SKIPPED %s: %s' % (test.id(), ' '.join(reason.split())))
print('RESULT %d %d %d' % (result.testsRun,
      len(result.failures) + len(result.errors) +
      len(result.unexpectedSuccesses), len(result.skipped)))
'''


def test_modules():
    names = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, 'tests'))
                   if f.startswith('test_') and f.endswith('.py'))
    return ['tests.' + n for n in names]


def run_one(name):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, '-c', WORKER, ROOT, name],
                          cwd=ROOT, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    m = re.search(r'^RESULT (\d+) (\d+) (\d+)$', proc.stdout, re.M)
    counts = tuple(map(int, m.groups())) if m else (0, 1, 0)
    if proc.returncode and not m:
        counts = (0, 1, 0)  # the module did not even load
    return name, proc.stdout, counts, time.monotonic() - start


def print_skips(skips):
    """What was skipped and why, one line per reason: a run that is not
    root, or lacks a package, says so instead of passing quietly."""
    reasons = {}
    for test, reason in skips:
        reasons.setdefault(reason, []).append(test.rsplit('.', 1)[-1])
    print(f'skipped, by reason ({len(skips)} tests):')
    for reason, tests in sorted(reasons.items(), key=lambda r: -len(r[1])):
        shown = ', '.join(tests[:3]) + (', ...' if len(tests) > 3 else '')
        print(f'  {len(tests):3d}  {reason}  [{shown}]')
    if os.geteuid() != 0:
        print('  (not root: run `make deps && make test` as root, as CI '
              'does, to skip nothing)')


def main(argv):
    names = argv or test_modules()
    jobs = int(os.environ.get('JOBS') or 3)
    total = failed = skipped = 0
    skips = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for name, output, (ran, bad, skip), seconds in pool.map(run_one,
                                                                names):
            print(f'==== {name} ({seconds:.1f} s)')
            print(output.rstrip())
            sys.stdout.flush()
            total += ran
            failed += bad
            skipped += skip
            skips += re.findall(r'^SKIPPED (\S+): (.*)$', output, re.M)
    if skips:
        print_skips(skips)
    passed = total - failed - skipped
    print(f'{passed} passed, {failed} failed, {skipped} skipped')
    return 0 if failed == 0 and total else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
