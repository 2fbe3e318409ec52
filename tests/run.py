"""Run the whole suite (make test) and end with one plain summary line,
'N passed, N failed, N skipped', that CI and people can read."""

import os
import sys
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv):
    sys.path.insert(0, ROOT)
    loader = unittest.TestLoader()
    if argv:
        suite = loader.loadTestsFromNames(argv)
    else:
        suite = loader.discover(os.path.join(ROOT, 'tests'), top_level_dir=ROOT)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors) + \
        len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print(f'{passed} passed, {failed} failed, {skipped} skipped')
    return 0 if failed == 0 and result.testsRun else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
