"""The worked examples of docs/modules.md, "Writing a module", run for real:
a client module (docs/examples/hostinfo, an executable like the seed's
add_queue scripts) and a node module (docs/examples/pullfile, an executable
like the seed's server-side cmds/), joined by a private sshd."""

import hashlib
import json
import os
import shutil
import unittest

from tests import support
from tests.pipeline import Pipeline

EXAMPLES = os.path.join(support.ROOT, 'docs', 'examples')


class WritingAModuleTest(unittest.TestCase):
    def setUp(self):
        self.p = Pipeline(self)
        modules = os.path.join(self.p.root, 'modules')
        shutil.copytree(os.path.join(support.ROOT, 'modules'), modules)
        for name in ('hostinfo', 'pullfile'):
            shutil.copy2(os.path.join(EXAMPLES, name), modules)
        # A client that asks for what it should not (as a compromised one
        # would): a client module printing a hostile server request.
        with open(os.path.join(modules, 'hostile'), 'w') as f:
            f.write('#!/bin/sh\necho "x pullfile $2"\n')
        os.chmod(os.path.join(modules, 'hostile'), 0o755)
        with open(self.p.config) as f:
            text = f.read()
        with open(self.p.config, 'w') as f:
            f.write(text.replace('[client]\n', f'[client]\nmodules_dir = '
                                 f'{modules}\n', 1)
                    .replace('[server]\n', f'[server]\nmodules_dir = '
                             f'{modules}\n', 1)
                    .replace('[modules]\n', '[modules]\nhostinfo = '
                             'hostinfo\nhostile = hostile\n'))

    def test_client_and_node_examples_back_up_host_info(self):
        self.p.client('commit', 'hostinfo', '/')
        self.p.client('send')
        self.p.server('run')
        [stored] = self.p.stored('hostinfo')
        with open(os.path.join(stored, 'hostinfo.txt')) as f:
            text = f.read()
        self.assertTrue(text.startswith('# hostinfo of c1 at '))
        self.assertIn(os.uname().release, text)
        with open(os.path.join(stored, 'manifest.json')) as f:
            manifest = json.load(f)
        [entry] = manifest['files']
        self.assertEqual(entry['name'], 'hostinfo.txt')
        self.assertEqual(entry['size'], len(text.encode()))
        self.assertEqual(manifest['module'], 'pullfile')
        # The client hears back that it was stored, and cleans its export.
        self.p.client('send')
        self.assertIn('node stored 1', self.p.client('status').stdout)
        self.assertEqual(os.listdir(os.path.join(self.p.client_dir,
                                                 'export')), [])
        # Node side: unclaimed, the stored report is checked by hashes
        # only, never called ok; with docs/examples/hostinfoproof.py in
        # modules_dir, verify reads it back and drill restores and reads
        # it, and another host's report with a matching hash fails.
        name = os.path.basename(stored)
        verify = self.p.server('verify').stdout
        self.assertIn(f'hashes only: {stored}/hostinfo.txt', verify)
        drill = self.p.server('drill').stdout
        self.assertIn(f'hashes only: c1 hostinfo {name}: hostinfo.txt: '
                      'hashes only', drill)
        self.assertNotIn('ok: c1 hostinfo', drill)
        self.assertIn('c1/hostinfo: hashes only',
                      self.p.server('report', check=False).stdout)
        shutil.copy2(os.path.join(EXAMPLES, 'hostinfoproof.py'),
                     os.path.join(self.p.root, 'modules'))
        verify = self.p.server('verify').stdout
        self.assertNotIn('hashes only:', verify)
        self.assertIn('0 problem(s)', verify)
        self.assertIn(f'ok: c1 hostinfo {name}: 1 host report(s) restored '
                      'and read', self.p.server('drill').stdout)
        # Another host's report in its place, its hash rewritten too.
        path = os.path.join(stored, 'hostinfo.txt')
        with open(path) as f:
            text = f.read()
        data = text.replace('# hostinfo of c1 ', '# hostinfo of c9 ', 1)
        with open(path, 'w') as f:
            f.write(data)
        manifest_path = os.path.join(stored, 'manifest.json')
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest['files'][0].update(
            sha256=hashlib.sha256(data.encode()).hexdigest(),
            size=len(data.encode()))
        with open(manifest_path, 'w') as f:
            json.dump(manifest, f)
        drill = self.p.server('drill', check=False)
        self.assertEqual(drill.returncode, 2)
        self.assertIn(f'FAILED: c1 hostinfo {name}: hostinfo.txt: the '
                      'report of another host', drill.stdout)

    def test_node_example_refuses_a_path_outside_sftp_root(self):
        """A hostile request line is refused by the node module (exit 65):
        X* at once, with its reason, nothing stored."""
        self.p.client('commit', 'hostile', '/etc/shadow')
        self.p.client('send')
        self.p.server('run', check=False)
        self.assertEqual(self.p.states('node'), {'X': 1, 'reason': 1})
        [reason] = [n for n in self.p.pool('node') if n.endswith('.reason')]
        with open(os.path.join(self.p.node_dir, 'TODO', 'c1', reason)) as f:
            self.assertIn('outside sftp_root', f.read())
        self.assertEqual(self.p.stored('hostinfo'), [])

    def test_node_example_waits_while_the_client_is_down(self):
        """Exit 75 (client unreachable): the request waits, no attempt."""
        self.p.client('commit', 'hostinfo', '/')
        self.p.client('send')
        self.p.sshd.stop()
        self.p.server('run', check=False)
        self.assertEqual(self.p.states('node'), {'RQ': 1})
        self.p.sshd.start()
        self.p.server('run')
        self.assertEqual(len(self.p.stored('hostinfo')), 1)


if __name__ == '__main__':
    unittest.main()
