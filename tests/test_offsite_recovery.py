"""The day the node is lost: a new node with only its configuration and
the rclone config reads the offsite copy on its own.

Each test runs the real pipeline (commit -> send -> run -> sftp pull) for
a full archive and two increments of a changing tree, adds a git mirror
with a preserved ref, and copies it all with `server.py offsite` to a
crypt remote over `rclone serve sftp` on 127.0.0.1.  Then a brand-new
node (an empty data_dir) lists, restores and rebuilds from that remote
alone, and the client's next backup lands on the rebuilt node."""

import json
import os
import shutil
import subprocess
import textwrap
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline
from tests.test_incremental import change_tree, make_tree, set_config, write
from tests.test_offsite import MARKER, RcloneSFTP
from tests.test_pipeline import snapshot

SOURCE = 'app'


class RecoveryTest(unittest.TestCase):
    """One pipeline and remote for the class (built by a fixture instance
    whose cleanups run at the end): the new node only reads the remote;
    the rebuild test, last by name, then replaces the pipeline's node."""

    SHARED = ('p', 'root', 'env', 'served', 'rclone', 'rclone_conf', 'src',
              'points', 'mirror')

    @classmethod
    def setUpClass(cls):
        support.require_tools('rclone', 'git', 'tar')
        cls.fixture = cls('build')
        try:
            cls.fixture.build()
        except BaseException:
            cls.fixture.doCleanups()
            raise
        for name in cls.SHARED:
            setattr(cls, name, getattr(cls.fixture, name))

    @classmethod
    def tearDownClass(cls):
        cls.fixture.doCleanups()

    def build(self):
        self.p = Pipeline(self)
        self.root = self.p.root
        self.env = self.p.env
        self.served = os.path.join(self.root, 'served')
        os.makedirs(self.served)
        self.rclone = RcloneSFTP(self.served, self.root, self.env)
        self.rclone.start()
        self.addCleanup(self.rclone.stop)
        self.rclone_conf = os.path.join(self.root, 'rclone.conf')
        self.rclone.rclone_conf(self.rclone_conf, self.env)
        with open(self.p.config, 'a') as f:
            f.write(f'\n[offsite]\nremote = secret:gitbackup\n'
                    f'rclone_config = {self.rclone_conf}\n')
        self.src = os.path.join(self.root, 'src')
        make_tree(self.src)
        write(os.path.join(self.src, 'marker.txt'), f'{MARKER}\n' * 20)
        self.points = [(self.backup(), snapshot(self.src))]
        write(os.path.join(self.src, 'second.txt'), 'second point\n')
        self.points.append((self.backup(), snapshot(self.src)))
        change_tree(self.src)
        self.points.append((self.backup(), snapshot(self.src)))
        levels = [self.manifest(s)['level'] for s, _ in self.points]
        self.assertEqual(levels, [0, 1, 2])
        self.mirror = self.make_mirror()
        self.p.server('offsite')

    def backup(self):
        self.p.client('commit', SOURCE, self.src)
        self.p.client('send')
        self.p.server('run')
        self.p.client('send')
        return os.path.basename(self.p.stored(SOURCE)[-1])

    def manifest(self, name):
        with open(os.path.join(self.p.node_dir, 'data', CLIENT, 'files',
                               SOURCE, name, 'manifest.json')) as f:
            return json.load(f)

    def git(self, *args):
        return subprocess.run(['git', *args], check=True, env=self.env,
                              stdout=subprocess.PIPE,
                              universal_newlines=True).stdout

    def make_mirror(self):
        """A mirror with two branches, a tag and a preserved old tip."""
        work = os.path.join(self.root, 'work')
        self.git('init', '-q', work)
        write(os.path.join(work, 'README'), f'{MARKER} in git\n')
        self.git('-C', work, 'add', 'README')
        self.git('-C', work, 'commit', '-q', '-m', 'first')
        old = self.git('-C', work, 'rev-parse', 'HEAD').strip()
        self.git('-C', work, 'branch', 'topic')
        self.git('-C', work, 'tag', 'v1')
        self.git('-C', work, 'commit', '-q', '--allow-empty', '-m', 'second')
        mirror = os.path.join(self.p.node_dir, 'data', CLIENT, 'git',
                              'proj.git')
        self.git('clone', '-q', '--mirror', '--no-local', work, mirror)
        self.git('--git-dir', mirror, 'update-ref',
                 'refs/preserved/20261204T000000Z/heads/gone', old)
        return mirror

    def refs(self, repo):
        return self.git('--git-dir', repo, 'for-each-ref',
                        '--format=%(objectname) %(refname)')

    def new_node(self):
        """A brand-new node: backup.ini with its own empty directories,
        [offsite] and the rclone config; nothing else."""
        n = os.path.join(self.root, 'new-node')
        for d in ('TODO', 'data', 'log', 'repositories'):
            os.makedirs(os.path.join(n, d))
        config = os.path.join(self.root, 'new-node.ini')
        with open(config, 'w') as f:
            f.write(textwrap.dedent(f'''\
                [server]
                name = n2
                todo_dir = {n}/TODO
                data_dir = {n}/data
                log_dir = {n}/log
                repositories = {n}/repositories
                free_space_floor = 0

                [offsite]
                remote = secret:gitbackup
                rclone_config = {self.rclone_conf}

                [mail]
                method = spool
                spool_dir = {self.root}/mail
                '''))
        return n, config

    def server(self, config, *args, status=0, stdout=subprocess.PIPE):
        proc = subprocess.run(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', config, *args], env=self.env,
            stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=300)
        self.assertEqual(proc.returncode, status,
                         f'server.py {" ".join(args)}:\n{proc.stdout}\n'
                         f'{proc.stderr}')
        return proc

    # -- the tests ----------------------------------------------------------

    def test_new_node_lists_and_restores_every_point_from_offsite_alone(self):
        node, config = self.new_node()
        listed = json.loads(self.server(config, 'list', '--from', 'offsite',
                                        '--format', 'json').stdout)
        files = [e for e in listed if e['source'] == SOURCE]
        names = [name for name, _ in self.points]
        self.assertEqual([e['snapshot'] for e in files], names)
        self.assertEqual([(e['kind'], e['base']) for e in files],
                         [('full', None), ('incremental', names[0]),
                          ('incremental', names[1])])
        for entry, (name, _) in zip(files, self.points):
            stored = self.manifest(name)['files']
            self.assertEqual(
                sorted((f['name'], f['size'], f['sha256']) for f in stored),
                sorted((f['name'], f['size'], f['sha256'])
                       for f in entry['files']))
        self.assertIn('git/proj', [e['source'] for e in listed])
        text = self.server(config, 'list', CLIENT, SOURCE, '--from',
                           'offsite').stdout
        for name in names:
            self.assertIn(name, text)
        # Each point in one command, the chain fetched and applied.
        for n, (name, tree) in enumerate(self.points):
            target = os.path.join(self.root, f'restored-{n}')
            self.server(config, 'restore', CLIENT, SOURCE, '--from',
                        'offsite', '--at', name, '--to', target)
            self.assertEqual(snapshot(target), tree, name)
        # One directory of the middle point.
        part = os.path.join(self.root, 'part')
        self.server(config, 'restore', CLIENT, SOURCE, '--from', 'offsite',
                    '--at', names[1], '--path', 'sub', '--to', part)
        self.assertEqual(snapshot(os.path.join(part, 'sub')),
                         {k[len('sub/'):]: v for k, v in
                          self.points[1][1].items()
                          if k.startswith('sub/')})
        # A tar stream of the newest point, without --at.
        with open(os.path.join(self.root, 'newest.tar'), 'w') as out:
            self.server(config, 'restore', CLIENT, SOURCE, '--from',
                        'offsite', '--stdout', stdout=out)
        unpacked = os.path.join(self.root, 'unpacked')
        os.makedirs(unpacked)
        subprocess.run(['tar', '-xf', os.path.join(self.root, 'newest.tar'),
                        '-C', unpacked], check=True)
        self.assertEqual(snapshot(unpacked), self.points[-1][1])
        # The mirror with every ref, the preserved one included.
        clone = os.path.join(self.root, 'mirror-restored')
        self.server(config, 'restore', CLIENT, 'git/proj', '--from',
                    'offsite', '--to', clone)
        self.assertEqual(self.refs(clone), self.refs(self.mirror))
        self.assertIn('refs/preserved/', self.refs(clone))
        # The new node kept nothing: its scratch is gone again.
        self.assertEqual([f for _, _, fs in os.walk(os.path.join(
            node, 'data')) for f in fs], [])
        self.assertNothingPlainOnTheRemote()

    def assertNothingPlainOnTheRemote(self):
        """The crypt remote's storage holds neither a name nor a byte of
        the client's data, manifests or indexes."""
        stored = os.path.join(self.served, 'encrypted')
        names = set(os.listdir(self.src)) | {
            'manifest.json', 'index.json', 'results.jsonl', SOURCE, 'files',
            'git', 'proj.git', CLIENT}
        for name, _ in self.points:
            names |= {name} | {f['name'] for f in self.manifest(name)['files']}
        found = 0
        for d, dirs, files in os.walk(stored):
            for part in dirs + files:
                self.assertNotIn(part, names)
            for f in files:
                found += 1
                with open(os.path.join(d, f), 'rb') as fh:
                    data = fh.read()
                for plain in (MARKER.encode(), b'"sha256"', b'refs/heads',
                              b'before\n', b'kept\n'):
                    self.assertNotIn(plain, data, f)
        self.assertGreater(found, 8)

    def test_rebuilt_node_serves_and_takes_the_next_backups(self):
        """The node's disk is lost (data_dir, pools, client repositories):
        the README's procedure rebuilds it from the remote, and it serves
        list/restore/report/verify and stores the client's next
        increment on the chain it rebuilt."""
        n = self.p.node_dir
        mirror_refs = self.refs(self.mirror)
        for d in ('TODO', 'data', 'repositories'):
            shutil.rmtree(os.path.join(n, d))
            os.makedirs(os.path.join(n, d))
        self.p.make_repository()     # as provision or add-client would
        out = self.p.server('offsite', '--rebuild').stdout
        self.assertEqual(out.count('rebuilt '), 4, out)
        listed = json.loads(self.p.server('list', '--format',
                                          'json').stdout)
        self.assertEqual([e['snapshot'] for e in listed
                          if e['source'] == SOURCE],
                         [name for name, _ in self.points])
        self.assertEqual(self.refs(self.mirror), mirror_refs)
        target = os.path.join(self.root, 'restored')
        self.p.server('restore', CLIENT, SOURCE, '--at',
                      self.points[1][0], '--to', target)
        self.assertEqual(snapshot(target), self.points[1][1])
        self.assertIn('0 problem(s)', self.p.server('verify').stdout)
        report = json.loads(self.p.server('report', '--format',
                                          'json').stdout)
        self.assertEqual(report['status'], 'ok', report)
        self.assertEqual(report['clients'][0]['offsite']['missing'], [])
        # Nothing to copy again: the rebuilt snapshots are known offsite.
        again = self.p.server('offsite').stdout
        self.assertNotIn('files/', again)
        # The client's next backup: an increment on the rebuilt chain.
        write(os.path.join(self.src, 'after.txt'), 'after the rebuild\n')
        newest = self.backup()
        self.assertNotIn(newest, [name for name, _ in self.points])
        manifest = self.manifest(newest)
        self.assertEqual(manifest['level'], 3)
        self.assertEqual(manifest['base'],
                         self.manifest(self.points[-1][0])['request_id'])
        restored = os.path.join(self.root, 'restored-next')
        self.p.server('restore', CLIENT, SOURCE, '--to', restored)
        self.assertEqual(snapshot(restored), snapshot(self.src))
        # No old request was handled a second time.
        self.assertEqual(len(self.p.stored(SOURCE)), 4)


if __name__ == '__main__':
    unittest.main()
