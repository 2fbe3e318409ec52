"""Backups come back: `server.py list`, `restore` and `drill` on real
programs (sshd, sftp, tar, git daemon, PostgreSQL): trees backed up twice
come back as they were at each time, a `postgresdb all` run is one
snapshot whose dump and globals restore, a mirror comes back with every
ref, and drills fail, naming the snapshot, on damage a re-hash misses."""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import unittest

from tests import support
from tests.modules_pipeline import ModulePipeline, PostgresMixin
from tests.pipeline import CLIENT, Pipeline

ROOT = os.geteuid() == 0
# As root, --to restores owners only when asked (and into a root-owned DIR).
SAME_OWNER = ['--same-owner'] if ROOT else []


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, mode)


def first_tree(root):
    write(os.path.join(root, 'www', 'index.html'), '<h1>v1</h1>\n')
    write(os.path.join(root, 'www', 'uploads', 'a.txt'), 'a\n', 0o600)
    write(os.path.join(root, 'bin', 'run.sh'), '#!/bin/sh\n', 0o755)
    write(os.path.join(root, 'name with spaces.txt'), 'spaces\n')
    os.makedirs(os.path.join(root, 'empty', 'dir'))
    os.symlink('www/index.html', os.path.join(root, 'home'))
    if ROOT:
        os.chown(os.path.join(root, 'www', 'uploads', 'a.txt'), 1234, 4321)
        os.chown(os.path.join(root, 'empty'), 2345, 2345)


def change_tree(root):
    write(os.path.join(root, 'www', 'index.html'), '<h1>v2</h1>\n')
    os.unlink(os.path.join(root, 'bin', 'run.sh'))
    write(os.path.join(root, 'www', 'uploads', 'b.txt'), 'b\n')
    os.chmod(os.path.join(root, 'www'), 0o750)


def tree_state(root):
    """{relative path: (type, mode, owner, content digest or target)}."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            owner = (st.st_uid, st.st_gid) if ROOT else None
            if stat.S_ISLNK(st.st_mode):
                what = ('link', os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                what = ('dir', stat.S_IMODE(st.st_mode))
            else:
                with open(path, 'rb') as f:
                    what = ('file', stat.S_IMODE(st.st_mode),
                            hashlib.sha256(f.read()).hexdigest())
            out[os.path.relpath(path, root)] = what + (owner,)
    return out


def pipe(first, second, env):
    """first | second; returns (first's exit, its stderr, second's run)."""
    a = subprocess.Popen(first, stdout=subprocess.PIPE, env=env,
                         stderr=subprocess.PIPE)
    b = subprocess.run(second, stdin=a.stdout, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env, timeout=120)
    a.stdout.close()
    err = a.stderr.read().decode()
    a.stderr.close()
    return a.wait(), err, b


class ClassCase:
    """What Pipeline needs of a test case, for one shared by a class (a
    tree backed up twice is set up once for all its restores)."""

    def __init__(self, cls):
        self.addCleanup = cls.addClassCleanup

    def fail(self, message):
        raise AssertionError(message)


class TreeRestoreTest(unittest.TestCase):
    """One Pipeline, a tree backed up twice, every way of getting it back."""

    @classmethod
    def setUpClass(cls):
        cls.p = Pipeline(ClassCase(cls))
        cls.src = os.path.join(cls.p.root, 'src')
        first_tree(cls.src)
        cls.states = [tree_state(cls.src)]
        cls.backup()
        change_tree(cls.src)
        cls.states.append(tree_state(cls.src))
        cls.backup()
        cls.snapshots = [os.path.basename(s) for s in cls.p.stored('app')]

    @classmethod
    def backup(cls):
        cls.p.client('commit', 'app', cls.src)
        cls.p.client('send')
        cls.p.server('run')

    def target(self, name):
        return os.path.join(self.p.root, 'restored-' + self.id().rsplit(
            '.', 1)[1] + '-' + name)

    def server_cmd(self, *args):
        return [*self.p.commands['server.py'], '--config', self.p.config,
                *args]

    def test_list(self):
        self.assertEqual(len(self.snapshots), 2)
        out = json.loads(self.p.server('list', CLIENT, 'app', '--format',
                                       'json').stdout)
        self.assertEqual([e['snapshot'] for e in out], self.snapshots)
        for entry in out:
            self.assertEqual(entry['kind'], 'full')
            self.assertIsNone(entry['base'])
            self.assertTrue(entry['time'].endswith('Z'))
            [archive] = [f for f in entry['files']
                         if f['name'].endswith(('.tar.gz', '.tar.zst'))]
            self.assertEqual(len(archive['sha256']), 64)
        text = self.p.server('list').stdout
        self.assertIn(self.snapshots[1], text)

    def test_restore_at_first_and_default(self):
        first, second = self.target('1'), self.target('2')
        self.p.server('restore', CLIENT, 'app', '--at', self.snapshots[0],
                      '--to', first, *SAME_OWNER)
        self.assertEqual(tree_state(first), self.states[0])
        os.makedirs(second)     # an empty directory is fine
        self.p.server('restore', CLIENT, 'app', '--to', second, *SAME_OWNER)
        self.assertEqual(tree_state(second), self.states[1])
        # Never into a non-empty directory.
        proc = self.p.server('restore', CLIENT, 'app', '--to', second,
                             check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('not empty', proc.stderr)
        # A time before the first snapshot has nothing; a date far ahead
        # (end of that day) picks the newest.
        proc = self.p.server('restore', CLIENT, 'app', '--at', '2000-01-01',
                             '--to', self.target('old'), check=False)
        self.assertIn('no snapshot of app', proc.stderr)
        self.p.server('restore', CLIENT, 'app', '--at', '2999-01-01',
                      '--to', self.target('3'), *SAME_OWNER)
        self.assertEqual(tree_state(self.target('3')), self.states[1])

    def test_stdout_into_tar(self):
        for at, state in zip(self.snapshots, self.states):
            out = self.target(at)
            os.makedirs(out)
            status, err, tar = pipe(
                self.server_cmd('restore', CLIENT, 'app', '--at', at,
                                '--stdout'),
                ['tar', '-x', '--numeric-owner', '-C', out], self.p.env)
            self.assertEqual((status, tar.returncode), (0, 0), err)
            state = {k: v for k, v in state.items()}
            got = tree_state(out)
            self.assertEqual(got, state)

    def test_path_restores_one_subtree(self):
        out = self.target('sub')
        self.p.server('restore', CLIENT, 'app', '--path', 'www/uploads',
                      '--to', out, *SAME_OWNER)
        self.assertEqual(tree_state(out), {
            k: v for k, v in self.states[1].items()
            if k == 'www' or k.startswith('www/uploads')
            } | {'www': tree_state(out)['www']})
        self.assertEqual(sorted(os.listdir(os.path.join(out, 'www',
                                                        'uploads'))),
                         ['a.txt', 'b.txt'])
        # --path through --stdout too.
        out2 = self.target('sub2')
        os.makedirs(out2)
        status, err, tar = pipe(
            self.server_cmd('restore', CLIENT, 'app', '--path', 'www/uploads',
                            '--stdout'), ['tar', '-x', '-C', out2], self.p.env)
        self.assertEqual((status, tar.returncode), (0, 0), err)
        self.assertEqual(sorted(os.listdir(os.path.join(out2, 'www',
                                                        'uploads'))),
                         ['a.txt', 'b.txt'])

    def test_damaged_snapshot_refused_unless_force(self):
        damaged = os.path.join(self.p.root, 'damaged')
        shutil.copytree(self.p.stored('app')[0], damaged, symlinks=True)
        try:
            [archive] = [n for n in os.listdir(self.p.stored('app')[0])
                         if n.endswith(('.tar.gz', '.tar.zst'))]
            path = os.path.join(self.p.stored('app')[0], archive)
            with open(path, 'r+b') as f:
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
                f.seek(-1, os.SEEK_END)
                f.write(bytes([last[0] ^ 0xff]))
            proc = self.p.server('restore', CLIENT, 'app', '--at',
                                 self.snapshots[0], '--to',
                                 self.target('bad'), check=False)
            self.assertEqual(proc.returncode, 1)
            self.assertIn('DAMAGED', proc.stderr)
            self.assertFalse(os.path.exists(self.target('bad')))
            # --force restores it anyway, loudly (tar itself then decides).
            proc = self.p.server('restore', CLIENT, 'app', '--at',
                                 self.snapshots[0], '--to',
                                 self.target('forced'), '--force',
                                 check=False)
            self.assertIn('restoring it anyway', proc.stderr)
        finally:
            shutil.rmtree(self.p.stored('app')[0])
            os.rename(damaged, os.path.join(self.p.node_dir, 'data', CLIENT,
                                            'files', 'app',
                                            self.snapshots[0]))


class TreeDrillTest(unittest.TestCase):
    """drill passes on a healthy snapshot and fails, naming it, when its
    archive was replaced by another valid archive whose hash was also
    rewritten in the manifest (so re-hashing alone would pass)."""

    def test_drill_healthy_then_replaced_archive(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        first_tree(src)
        p.client('commit', 'app', src)
        p.client('send')
        p.server('run')
        proc = p.server('drill')
        self.assertIn('ok: c1 app', proc.stdout)
        self.assertIn('entries compared with the tree the listings of 1 '
                      'link(s) describe', proc.stdout)
        report = json.loads(p.server('report', '--format', 'json',
                                     check=False).stdout)
        [row] = report['clients'][0]['sources']
        self.assertTrue(row['last_drill']['ok'])
        self.assertIn('Last restore drill:', p.server('report',
                                                      check=False).stdout)
        [snap] = p.stored('app')
        manifest_path = os.path.join(snap, 'manifest.json')
        with open(manifest_path) as f:
            manifest = json.load(f)
        [entry] = [e for e in manifest['files']
                   if e['name'].endswith(('.tar.gz', '.tar.zst'))]
        other = os.path.join(p.root, 'other')
        write(os.path.join(other, 'www', 'index.html'), 'something else\n')
        archive = os.path.join(snap, entry['name'])
        subprocess.run(['tar', '-czf', archive, '-C', other, '.'],
                       check=True)
        with open(archive, 'rb') as f:
            data = f.read()
        entry.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        with open(manifest_path, 'w') as f:
            json.dump(manifest, f)
        self.assertEqual(p.server('verify', '--no-restore-check',
                                  check=False).returncode, 0)
        proc = p.server('drill', check=False)
        self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
        self.assertIn(f'FAILED: c1 app {os.path.basename(snap)}: ',
                      proc.stdout)
        self.assertIn('www/uploads: missing', proc.stdout)
        report = p.server('report', '--format', 'json', check=False)
        self.assertEqual(report.returncode, 2)
        [row] = json.loads(report.stdout)['clients'][0]['sources']
        self.assertFalse(row['last_drill']['ok'])
        prom = p.server('report', '--format', 'prometheus',
                        check=False).stdout
        self.assertIn('gitbackup_last_drill_success{client="c1",source="app"}'
                      ' 0', prom)
        self.assertTrue(any('drill' in str(m['Subject']) for m in p.mails()))


class DatabaseAndGitRestoreTest(PostgresMixin, unittest.TestCase):
    """A `postgresdb all` run is one snapshot; its dump and globals come
    back through --file --stdout as the README shows; a mirror with
    preserved refs comes back with every ref; drill proves both and fails
    on a dump that lost a table's rows and a mirror lacking a tip."""

    @classmethod
    def create_data(cls, cluster):
        cluster.psql('CREATE DATABASE shop')
        cluster.psql('CREATE ROLE clerk LOGIN CONNECTION LIMIT 2')
        cluster.psql('CREATE TABLE items (id int PRIMARY KEY, name text); '
                     'INSERT INTO items SELECT n, \'item \' || n FROM '
                     'generate_series(1, 200) n; '
                     'CREATE TABLE notes (t text)', db='shop')

    def setUp(self):
        support.require_tools('pg_dump', 'pg_dumpall', 'psql', 'pg_restore')
        self.p = ModulePipeline(self, extra_config='')
        self.p.edit_config('free_space_floor = 0\n', 'free_space_floor = 0\n'
                           f'drill_postgres = {support.pg_bindir()}\n')
        self.p.use_postgres(self.cluster, 'config')

    def restore_cmd(self, *args):
        return [*self.p.commands['server.py'], '--config', self.p.config,
                'restore', CLIENT, *args]

    def pg_env(self):
        return {**{k: v for k, v in self.p.env.items()
                   if not k.startswith('PG')}, **self.cluster.env()}

    def test_postgres_all_restore_and_drill(self):
        p = self.p
        p.client('commit', 'postgresdb', 'all')
        p.client('send')
        p.server('run')
        [snap] = p.stored('postgresdb')           # one request, one snapshot
        self.cluster.psql('CREATE DATABASE shop_restored')
        status, err, proc = pipe(
            self.restore_cmd('postgresdb', '--file', 'shop.dump', '--stdout'),
            [support.pg_tool('pg_restore'), '--exit-on-error', '-d',
             'shop_restored'], self.pg_env())
        self.assertEqual((status, proc.returncode), (0, 0),
                         err + proc.stderr.decode())
        self.assertEqual(self.cluster.psql('SELECT count(*), max(name) FROM '
                                           'items', db='shop_restored'),
                         '200|item 99')
        self.cluster.psql('DROP ROLE clerk')
        status, err, proc = pipe(
            self.restore_cmd('postgresdb', '--file', 'globals.sql',
                             '--stdout'),
            [support.pg_tool('psql'), '-X', '-q', '-d', 'postgres'],
            self.pg_env())
        self.assertEqual(self.cluster.psql(
            "SELECT rolconnlimit FROM pg_roles WHERE rolname = 'clerk'"), '2')
        proc = p.server('drill')
        self.assertIn(f'ok: c1 postgresdb {os.path.basename(snap)}: ',
                      proc.stdout)
        self.assertIn('restored into a scratch cluster', proc.stdout)
        # The dump loses the rows of items; its hash is rewritten too.
        self.cluster.psql('CREATE DATABASE shop_empty')
        self.cluster.psql('CREATE TABLE items (id int PRIMARY KEY, name '
                          'text); CREATE TABLE notes (t text)',
                          db='shop_empty')
        dump = os.path.join(snap, 'shop.dump')
        self.pg('pg_dump', '-Fc', '-f', dump, 'shop_empty')
        manifest_path = os.path.join(snap, 'manifest.json')
        with open(manifest_path) as f:
            manifest = json.load(f)
        with open(dump, 'rb') as f:
            data = f.read()
        for entry in manifest['files']:
            if entry['name'] == 'shop.dump':
                entry.update(sha256=hashlib.sha256(data).hexdigest(),
                             size=len(data))
        with open(manifest_path, 'w') as f:
            json.dump(manifest, f)
        proc = p.server('drill', check=False)
        self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
        self.assertIn(f'FAILED: c1 postgresdb {os.path.basename(snap)}: '
                      'shop.dump: table "public"."items": 0 rows restored, '
                      '200 counted at dump time', proc.stdout)

    def test_git_mirror_restore_and_drill(self):
        p = self.p
        p.start_daemon()
        bare = p.client_repository('proj.git')
        work = p.work_clone(bare)
        first = p.commit_file(work, 'README', 'one\n')
        p.commit_file(work, 'README', 'two\n')
        p.git('push', '--quiet', 'origin', 'master', cwd=work)
        p.client('send')
        p.server('run')
        p.git('reset', '--quiet', '--hard', first, cwd=work)
        p.git('push', '--quiet', '--force', 'origin', 'master', cwd=work)
        p.client('send')
        p.server('run')
        mirror = p.mirror('proj.git')
        refs = p.refs(mirror)
        self.assertTrue(any(r.startswith('refs/preserved/') for r in refs))
        out = os.path.join(p.root, 'restored.git')
        p.server('restore', CLIENT, 'git/proj', '--to', out)
        self.assertEqual(p.refs(out), refs)
        bundle = os.path.join(p.root, 'proj.bundle')
        with open(bundle, 'wb') as f:
            subprocess.run(self.restore_cmd('git/proj', '--stdout'),
                           stdout=f, check=True, env=p.env)
        heads = p.git('bundle', 'list-heads', bundle).stdout
        for sha in refs.values():
            self.assertIn(sha, heads)
        proc = p.server('drill')
        self.assertIn('ok: c1 git/proj mirror: cloned, fsck passed, 2 '
                      'announced tip(s)', proc.stdout)
        # A tip the client announced that the mirror does not hold.
        other = p.commit_file(work, 'README', 'never fetched\n')
        with open(os.path.join(p.node_dir, 'data', CLIENT, 'results.jsonl'),
                  'a') as f:
            f.write(json.dumps({'request': 'x', 'outcome': 'stored',
                                'stored': mirror, 'heads': [other]}) + '\n')
        proc = p.server('drill', check=False)
        self.assertEqual(proc.returncode, 2)
        self.assertIn(f'FAILED: c1 git/proj mirror: announced tip {other} is '
                      'not in the restored clone', proc.stdout)


def make_chain(node_data, work):
    """Three snapshots of source 'inc' made by real GNU tar
    --listed-incremental (full, then two increments with changes and
    deletions), stored by hand with manifests naming level and base.
    Returns the trees' states, oldest first."""
    src = os.path.join(work, 'src')
    snar = os.path.join(work, 'snar')
    write(os.path.join(src, 'keep.txt'), 'keep\n')
    write(os.path.join(src, 'gone.txt'), 'will be deleted\n')
    write(os.path.join(src, 'dir', 'x.txt'), 'x1\n')
    states, stamps = [], ['20260101T000000Z', '20260102T000000Z',
                          '20260103T000000Z']
    for level, stamp in enumerate(stamps):
        if level == 1:
            os.unlink(os.path.join(src, 'gone.txt'))
            write(os.path.join(src, 'dir', 'x.txt'), 'x2 changed\n')
        if level == 2:
            shutil.rmtree(os.path.join(src, 'dir'))
            write(os.path.join(src, 'new.txt'), 'new\n')
        states.append(tree_state(src))
        snap = os.path.join(node_data, CLIENT, 'files', 'inc', stamp)
        os.makedirs(snap)
        archive = os.path.join(snap, 'src.tar.gz')
        subprocess.run(['tar', f'--listed-incremental={snar}', '-czf',
                        archive, '-C', src, '.'], check=True)
        with open(archive, 'rb') as f:
            data = f.read()
        manifest = {'client': CLIENT, 'source': 'inc', 'stored':
                    f'{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T00:00:00Z',
                    'request_id': f'{stamp[:8]}T000000.000000Z-1-{level}',
                    'level': level, 'files': [{
                        'name': 'src.tar.gz', 'size': len(data),
                        'sha256': hashlib.sha256(data).hexdigest()}]}
        if level:
            manifest['base'] = f'{stamps[level - 1][:8]}T000000.000000Z-1-' \
                f'{level - 1}'
        with open(os.path.join(snap, 'manifest.json'), 'w') as f:
            json.dump(manifest, f)
    return states, stamps


class ChainRestoreTest(unittest.TestCase):
    def setUp(self):
        self.p = Pipeline(self, start=False)
        self.states, self.stamps = make_chain(
            os.path.join(self.p.node_dir, 'data'),
            os.path.join(self.p.root, 'chain'))

    def test_chain_applied_with_deletions(self):
        entries = json.loads(self.p.server('list', CLIENT, 'inc', '--format',
                                           'json').stdout)
        self.assertEqual([(e['kind'], e['base']) for e in entries],
                         [('full', None),
                          ('incremental', self.stamps[0]),
                          ('incremental', self.stamps[1])])
        for stamp, state in zip(self.stamps, self.states):
            out = os.path.join(self.p.root, 'out-' + stamp)
            self.p.server('restore', CLIENT, 'inc', '--at', stamp, '--to', out)
            self.assertEqual(tree_state(out), state, stamp)
        self.assertNotIn('gone.txt', tree_state(out))
        # --stdout of an increment: the restored tree, one tar stream.
        out = os.path.join(self.p.root, 'out-stdout')
        os.makedirs(out)
        status, err, tar = pipe(
            [*self.p.commands['server.py'], '--config', self.p.config,
             'restore', CLIENT, 'inc', '--stdout'],
            ['tar', '-x', '-C', out], self.p.env)
        self.assertEqual((status, tar.returncode), (0, 0), err)
        self.assertEqual(tree_state(out), self.states[2])

    def test_missing_link_named(self):
        shutil.rmtree(os.path.join(self.p.node_dir, 'data', CLIENT, 'files',
                                   'inc', self.stamps[1]))
        last = json.loads(self.p.server('list', CLIENT, 'inc', '--format',
                                        'json').stdout)[-1]
        self.assertEqual((last['base'], last['chain_broken']), (None, True))
        proc = self.p.server('restore', CLIENT, 'inc', '--to',
                             os.path.join(self.p.root, 'out'), check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('chain broken', proc.stderr)
        self.assertIn('20260102T000000.000000Z-1-1', proc.stderr)


if __name__ == '__main__':
    unittest.main()
