"""make demo keeps working: the newcomer's first command."""

import glob
import os
import re
import shutil
import subprocess
import tempfile
import unittest

from tests import support


class DemoTest(unittest.TestCase):
    def test_demo_backs_up_and_prints_where_and_sha256(self):
        support.require_tools('git', 'ssh', 'sftp', 'sshd', 'tar',
                              'git-daemon', 'initdb', 'pg_dump')
        pattern = os.path.join(tempfile.gettempdir(), 'gitbackup-demo-*')
        before = set(glob.glob(pattern))
        proc = subprocess.run(
            [support.PYTHON, os.path.join(support.ROOT, 'tests', 'demo.py')],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, timeout=300)
        for path in set(glob.glob(pattern)) - before:
            shutil.rmtree(path, ignore_errors=True)
        self.assertEqual(proc.returncode, 0, proc.stdout)
        out = proc.stdout
        self.assertRegex(out, r'c1/files/app/\d{8}T\d{6}Z/\S+\.tar\.(gz|zst)')
        self.assertRegex(out, r'c1/files/postgresdb/\S+/shop\.dump')
        self.assertRegex(out, r'c1/git/project\.git  refs/heads/master')
        self.assertGreaterEqual(len(re.findall(r'sha256 [0-9a-f]{64}', out)),
                                3)
        self.assertIn('identical', out)
        self.assertIn('gitbackup report of node n1', out)
        # Three requests (a tree, a git repository, `postgresdb all`);
        # the database request is stored as three parts in one snapshot.
        self.assertIn('node stored 3, node failed 0, not yet confirmed 0',
                      out)
        self.assertRegex(out, r'-0001 stored \(3 parts\) .*/postgresdb/')


if __name__ == '__main__':
    unittest.main()
