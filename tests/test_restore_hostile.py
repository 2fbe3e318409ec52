"""Restoring hostile data never hurts the node (SECURITY.md, "Restoring
hostile data").  A compromised client's chains, stored on the node as
snapshots the way ingest stores them: a link that plants a symlink and a
later link that writes, hard-links or deletes through it; absolute and
`..` names; setuid root files and device nodes; a zstd bomb.  Each is
refused before anything is written (or, for privilege, left out and
named), nothing outside the destination or scratch changes, other
clients' stored data stays byte-identical, the node's private key never
appears in any output, and a killed restore's scratch is reaped."""

import hashlib
import io
import json
import os
import signal
import subprocess
import tarfile
import time
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline
from tests.test_compromised import processes_with

ROOT = os.geteuid() == 0
STAMPS = ['20260101T000000Z', '20260102T000000Z', '20260103T000000Z']


def member(name, kind='file', data=b'', target='', mode=0o644, uid=0,
           pax=None, devmajor=0, devminor=0):
    """A TarInfo and its data for tar_bytes."""
    info = tarfile.TarInfo(name)
    info.type = {'file': tarfile.REGTYPE, 'dir': tarfile.DIRTYPE,
                 'sym': tarfile.SYMTYPE, 'hard': tarfile.LNKTYPE,
                 'chr': tarfile.CHRTYPE}[kind]
    info.mode, info.uid, info.gid = mode, uid, uid
    info.linkname = target
    info.size = len(data) if kind == 'file' else 0
    info.devmajor, info.devminor = devmajor, devminor
    info.mtime = 1767225600
    info.pax_headers = dict(pax or {})
    return info, data


def tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w', format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            t.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def store_chain(data_dir, client, source, links, suffix='.tar',
                listings=None):
    """Store tar archives (bytes, oldest first) as one chain of snapshots
    (full, then increments naming their base), as ingest does."""
    snaps = []
    for level, data in enumerate(links):
        stamp = STAMPS[level]
        snap = os.path.join(data_dir, client, 'files', source, stamp)
        os.makedirs(snap)
        name = 'src' + suffix
        with open(os.path.join(snap, name), 'wb') as f:
            f.write(data)
        manifest = {'client': client, 'source': source,
                    'stored': f'{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}'
                              'T00:00:00Z',
                    'request_id': f'{stamp[:8]}T000000.000000Z-1-{level}',
                    'level': level, 'files': [{
                        'name': name, 'size': len(data),
                        'sha256': hashlib.sha256(data).hexdigest()}]}
        if listings:
            with open(os.path.join(snap, name + '.listing'), 'w') as f:
                f.write(listings[level])
        if level:
            manifest['base'] = f'{STAMPS[level - 1][:8]}T000000.000000Z-1-' \
                f'{level - 1}'
        with open(os.path.join(snap, 'manifest.json'), 'w') as f:
            json.dump(manifest, f)
        snaps.append(snap)
    return snaps


def tree_digest(top):
    """{path: (mode, content or link target)} of everything under top."""
    out = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if os.path.islink(path):
                what = os.readlink(path)
            elif os.path.isfile(path):
                with open(path, 'rb') as f:
                    what = hashlib.sha256(f.read()).hexdigest()
            else:
                what = None
            out[os.path.relpath(path, top)] = (st.st_mode, what)
    return out


class HostileChainTest(unittest.TestCase):
    """Chains a compromised client could have sent, against restore and
    drill on a node that also holds another client's data."""

    def setUp(self):
        self.p = Pipeline(self, start=False)
        self.data = os.path.join(self.p.node_dir, 'data')
        self.outside = os.path.join(self.p.root, 'outside')
        os.makedirs(os.path.join(self.outside, 'etc'))
        with open(os.path.join(self.outside, 'etc', 'passwd'), 'w') as f:
            f.write('root:x:0:0\n')
        # Another client's stored data, which nothing may touch.
        store_chain(self.data, 'c2', 'app', [tar_bytes([
            member('./', 'dir', mode=0o755),
            member('./keep.txt', data=b'c2 data\n')])])
        self.before = self.untouchable()

    def untouchable(self):
        return (tree_digest(self.outside),
                tree_digest(os.path.join(self.data, 'c2', 'files')),
                tree_digest(os.path.dirname(self.p.node_key)))

    def restore(self, *args):
        return subprocess.run(
            [*self.p.commands['server.py'], '--config', self.p.config,
             'restore', CLIENT, 'app', *args], env=self.p.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)

    def assert_refused(self, proc, *words, target=None):
        err = proc.stderr.decode()
        self.assertEqual(proc.returncode, 1, err)
        self.assertIn('refused', err)
        for word in words:
            self.assertIn(word, err)
        self.assertEqual(proc.stdout, b'')      # judged before writing
        if target:
            self.assertFalse(os.path.lexists(target))
            self.assertEqual([n for n in os.listdir(os.path.dirname(target))
                              if n.startswith('.gitbackup-')], [])
        self.assertEqual(self.untouchable(), self.before)

    def test_write_through_a_symlink_an_earlier_link_made(self):
        store_chain(self.data, CLIENT, 'app', [
            tar_bytes([member('./', 'dir', mode=0o755),
                       member('./esc', 'sym', target=self.outside)]),
            tar_bytes([member('./', 'dir', mode=0o755),
                       member('./esc/etc/passwd', data=b'owned\n')])])
        target = os.path.join(self.p.root, 'out')
        self.assert_refused(self.restore('--to', target),
                            'link 2 member 2 (./esc/etc/passwd)',
                            'symlink made by link 1 member 2',
                            target=target)
        self.assert_refused(self.restore('--stdout'), 'esc/etc/passwd')
        self.assert_refused(self.restore('--path', 'esc', '--stdout'),
                            'esc/etc/passwd')
        # The drill fails that series, naming why, and drills the others.
        proc = self.p.server('drill', check=False)
        self.assertEqual(proc.returncode, 2)
        self.assertIn(f'FAILED: {CLIENT} app {STAMPS[1]}: refused: link 2 '
                      'member 2 (./esc/etc/passwd)', proc.stdout)
        self.assertIn('ok: c2 app', proc.stdout)
        self.assertEqual(self.untouchable(), self.before)

    def test_hard_link_to_the_node_key_through_a_symlink(self):
        with open(self.p.node_key, 'rb') as f:
            key = f.read()
        keys = os.path.dirname(self.p.node_key)
        store_chain(self.data, CLIENT, 'app', [
            tar_bytes([member('./', 'dir', mode=0o755),
                       member('./keys', 'sym', target=keys)]),
            tar_bytes([member('./', 'dir', mode=0o755),
                       member('./loot', 'hard', target='./keys/' +
                              os.path.basename(self.p.node_key))])])
        for args in (['--stdout'], ['--to', os.path.join(self.p.root, 'o')]):
            proc = self.restore(*args)
            self.assert_refused(proc, 'hard link', 'keys')
            self.assertNotIn(key.strip()[40:80], proc.stdout + proc.stderr)
        # A hard link out of the tree by name alone, too.
        store_chain(self.data, CLIENT, 'other', [tar_bytes([
            member('./', 'dir', mode=0o755),
            member('./loot', 'hard', target=self.p.node_key)])])
        proc = subprocess.run(
            [*self.p.commands['server.py'], '--config', self.p.config,
             'restore', CLIENT, 'other', '--stdout'], env=self.p.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        self.assert_refused(proc, 'absolute name')
        self.assertNotIn(key.strip()[40:80], proc.stdout + proc.stderr)

    def test_absolute_and_dotdot_names(self):
        for source, name, word in (
                ('abs', self.outside + '/etc/passwd', 'absolute name'),
                ('dots', './a/../../outside/etc/passwd', 'holds ".."')):
            store_chain(self.data, CLIENT, source, [tar_bytes([
                member('./', 'dir', mode=0o755),
                member(name, data=b'owned\n')])])
            target = os.path.join(self.p.root, 'out-' + source)
            proc = subprocess.run(
                [*self.p.commands['server.py'], '--config', self.p.config,
                 'restore', CLIENT, source, '--to', target], env=self.p.env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
            self.assert_refused(proc, word, 'member 2', target=target)

    def test_deep_names_under_a_later_symlink(self):
        """3000 directories tar makes on the way, replaced later by a
        symlink: only the symlink comes back; the other order is refused
        (no recursion limit, no traceback)."""
        deep = tar_bytes([member('./', 'dir', mode=0o755),
                          member('./' + 'a/' * 3000 + 'f', data=b'x\n')])
        link = tar_bytes([member('./', 'dir', mode=0o755),
                          member('./a', 'sym', target=self.outside)])
        store_chain(self.data, CLIENT, 'app', [deep, link])
        store_chain(self.data, CLIENT, 'other', [link, deep])
        target = os.path.join(self.p.root, 'out')
        proc = self.restore('--to', target)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(os.listdir(target), ['a'])
        self.assertEqual(os.readlink(os.path.join(target, 'a')),
                         self.outside)
        proc = subprocess.run(
            [*self.p.commands['server.py'], '--config', self.p.config,
             'restore', CLIENT, 'other', '--stdout'], env=self.p.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        self.assert_refused(proc, 'link 2 member 2', 'symlink made by link '
                            '1 member 2')

    def test_drill_deletes_nothing_through_a_planted_symlink(self):
        # Link 1 makes victim -> the other client's data; link 2 lists
        # victim as an empty directory (GNU tar -G would empty the target)
        # and writes into it.
        store_chain(self.data, CLIENT, 'app', [
            tar_bytes([member('./', 'dir', mode=0o755),
                       member('./victim', 'sym', target='../../c2')]),
            tar_bytes([member('./', 'dir', mode=0o755, pax={
                'GNU.dumpdir': 'Dvictim\0\0'}),
                member('./victim', 'dir', mode=0o755,
                       pax={'GNU.dumpdir': 'Ynew\0\0'}),
                member('./victim/new', data=b'x\n')])])
        proc = self.p.server('drill', check=False)
        self.assertIn('ok: c2 app', proc.stdout)
        self.assertIn(f'{CLIENT} app {STAMPS[1]}', proc.stdout)
        self.assertEqual(self.untouchable(), self.before)
        self.assertEqual([n for n in os.listdir(os.path.join(
            self.data, CLIENT)) if n.startswith('.gitbackup-')], [])

    def test_zstd_bomb_stops_at_the_size_bound(self):
        support.require_tools('zstd')
        plain = tar_bytes([member('./', 'dir', mode=0o755),
                           member('./big', data=bytes(48 << 20))])
        packed = subprocess.run(['zstd', '-q', '-c'], input=plain,
                                stdout=subprocess.PIPE, check=True).stdout
        self.assertLess(len(packed), 64 << 10)
        store_chain(self.data, CLIENT, 'app', [packed], suffix='.tar.zst',
                    listings=['drwxr-xr-x root/root 0 2026-01-01 00:00 ./\n'
                              '-rw-r--r-- root/root 100 2026-01-01 00:00 '
                              './big\n'])
        target = os.path.join(self.p.root, 'out')
        proc = self.restore('--to', target)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('size bound', proc.stderr.decode())
        self.assertFalse(os.path.lexists(target))
        self.assertEqual([n for n in os.listdir(self.p.root)
                          if n.startswith('.gitbackup-')], [])
        proc = self.restore('--stdout')
        self.assertEqual(proc.returncode, 1)
        self.assertLess(len(proc.stdout), 40 << 20)
        proc = self.p.server('drill', check=False)
        self.assertEqual(proc.returncode, 2)
        self.assertIn('size bound', proc.stdout)
        self.assertEqual(self.untouchable(), self.before)

    def test_killed_mid_extraction_leaves_no_process_nor_scratch(self):
        """kill -9 of a restore while tar and zstd run: they end with
        their pipes; the next command removes the scratch."""
        support.require_tools('zstd')
        plain = tar_bytes([member('./', 'dir', mode=0o755)] + [
            member(f'./f{n}', data=b'x' * 4096) for n in range(20)])
        packed = subprocess.run(['zstd', '-q', '-c'], input=plain,
                                stdout=subprocess.PIPE, check=True).stdout
        store_chain(self.data, CLIENT, 'app', [packed], suffix='.tar.zst')
        target = os.path.join(self.p.root, 'out')
        proc = subprocess.Popen(
            [*self.p.commands['server.py'], '--config', self.p.config,
             'restore', CLIENT, 'app', '--to', target],
            env={**self.p.env, 'GITBACKUP_PAUSE_AT': 'restore:replaying'},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for line in proc.stderr:
            if b'pausing at restore:replaying' in line:
                break
        [scratch] = [n for n in os.listdir(self.p.root)
                     if n.startswith('.gitbackup-restore-')]
        stored = os.path.join(self.data, CLIENT, 'files', 'app')
        self.assertTrue(processes_with(scratch))      # tar, extracting
        self.assertTrue(processes_with(stored))       # zstd, reading
        proc.kill()
        proc.wait()
        proc.stderr.close()
        deadline = time.monotonic() + 30
        while processes_with(scratch) or processes_with(stored):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        self.assertFalse(os.path.exists(target))
        self.p.server('run')
        self.assertEqual([n for n in os.listdir(self.p.root)
                          if n.startswith('.gitbackup-')], [])

    def test_malformed_archives_are_refused_not_tracebacks(self):
        good = tar_bytes([member('./', 'dir', mode=0o755),
                          member('./a', data=b'a\n' * 1000)])
        for source, data, word in (
                ('garbage', bytes(range(256)) * 4, 'link 1 (src.tar), member 1'),
                ('truncated', good[:2048], 'truncated')):
            store_chain(self.data, CLIENT, source, [data])
            proc = subprocess.run(
                [*self.p.commands['server.py'], '--config', self.p.config,
                 'restore', CLIENT, source, '--stdout'], env=self.p.env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
            self.assert_refused(proc, word)
            self.assertNotIn('Traceback', proc.stderr.decode())
        proc = self.p.server('drill', check=False)
        self.assertIn(f'FAILED: {CLIENT} garbage', proc.stdout)
        self.assertIn(f'FAILED: {CLIENT} truncated', proc.stdout)
        self.assertIn('ok: c2 app', proc.stdout)
        self.assertNotIn('Traceback', proc.stderr)

    def test_restored_secret_keeps_its_mode(self):
        [snap] = store_chain(self.data, CLIENT, 'postgresdb', [b'x'])
        os.rename(os.path.join(snap, 'src.tar'),
                  os.path.join(snap, 'globals.sql'))
        os.chmod(os.path.join(snap, 'globals.sql'), 0o600)
        with open(os.path.join(snap, 'manifest.json')) as f:
            manifest = json.load(f)
        manifest['files'][0]['name'] = 'globals.sql'
        with open(os.path.join(snap, 'manifest.json'), 'w') as f:
            json.dump(manifest, f)
        out = os.path.join(self.p.root, 'out')
        self.p.server('restore', CLIENT, 'postgresdb', '--file',
                      'globals.sql', '--to', out)
        self.assertEqual(os.stat(os.path.join(out, 'globals.sql')).st_mode
                         & 0o777, 0o600)

    def set_server(self, old, new):
        with open(self.p.config) as f:
            text = f.read()
        self.assertIn(old, text)
        with open(self.p.config, 'w') as f:
            f.write(text.replace(old, new, 1))

    def test_free_space_floor_and_time_bound(self):
        store_chain(self.data, CLIENT, 'app', [tar_bytes([
            member('./', 'dir', mode=0o755),
            member('./a.txt', data=b'a\n')])])
        self.set_server('free_space_floor = 0\n',
                        'free_space_floor = 1000000T\n')
        target = os.path.join(self.p.root, 'out')
        proc = self.restore('--to', target)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('stopped: free-space floor', proc.stderr.decode())
        self.assertFalse(os.path.lexists(target))
        self.set_server('free_space_floor = 1000000T\n',
                        'free_space_floor = 0\ncommand_timeout = 1s\n')
        proc = subprocess.run(
            [*self.p.commands['server.py'], '--config', self.p.config,
             'restore', CLIENT, 'app', '--to', target],
            env={**self.p.env, 'GITBACKUP_PAUSE_AT': 'restore:judged',
                 'GITBACKUP_PAUSE_SECONDS': '1.5'},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('stopped: time bound', proc.stderr.decode())
        self.assertFalse(os.path.lexists(target))
        self.assertEqual([n for n in os.listdir(self.p.root)
                          if n.startswith('.gitbackup-')], [])

    @unittest.skipUnless(ROOT, 'setuid root files and devices need root')
    def test_privilege_left_out_unless_same_owner(self):
        store_chain(self.data, CLIENT, 'app', [tar_bytes([
            member('./', 'dir', mode=0o755),
            member('./bin/su', data=b'#!/bin/sh\n', mode=0o4755),
            member('./bin/sg', data=b'#!/bin/sh\n', mode=0o2755, uid=1234),
            member('./dev/null', 'chr', mode=0o666, devmajor=1, devminor=3),
            member('./secret', data=b'pw\n', mode=0o600)])])
        target = os.path.join(self.p.root, 'plain')
        proc = self.restore('--to', target)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        err = proc.stderr.decode()
        self.assertIn('device node left out', err)
        self.assertIn('dev/null', err)
        self.assertIn('setuid/setgid bits left out', err)
        self.assertIn('bin/su', err)
        self.assertFalse(os.path.lexists(os.path.join(target, 'dev',
                                                      'null')))
        for name, mode in (('bin/su', 0o755), ('bin/sg', 0o755),
                           ('secret', 0o600)):
            st = os.lstat(os.path.join(target, name))
            self.assertEqual((oct(st.st_mode & 0o7777), st.st_uid),
                             (oct(mode), 0), name)
        exact = os.path.join(self.p.root, 'exact')
        proc = self.restore('--to', exact, '--same-owner')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        st = os.lstat(os.path.join(exact, 'bin', 'sg'))
        self.assertEqual((st.st_mode & 0o7777, st.st_uid), (0o2755, 1234))
        st = os.lstat(os.path.join(exact, 'dev', 'null'))
        self.assertEqual(os.major(st.st_rdev), 1)
        # --same-owner into a directory another user owns: refused.
        theirs = os.path.join(self.p.root, 'theirs')
        os.makedirs(theirs)
        os.chown(theirs, 1234, 1234)
        proc = self.restore('--to', os.path.join(theirs, 'x'),
                            '--same-owner')
        self.assertEqual(proc.returncode, 2)
        self.assertIn('not a directory root owns', proc.stderr.decode())
        self.assertEqual(os.listdir(theirs), [])

    def test_killed_restore_leaves_nothing_after_the_next_command(self):
        store_chain(self.data, CLIENT, 'app', [tar_bytes([
            member('./', 'dir', mode=0o755),
            member('./a.txt', data=b'a\n')])])
        target = os.path.join(self.p.root, 'out')
        proc = subprocess.Popen(
            [*self.p.commands['server.py'], '--config', self.p.config,
             'restore', CLIENT, 'app', '--to', target],
            env={**self.p.env, 'GITBACKUP_PAUSE_AT': 'restore:extracted'},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        deadline = time.monotonic() + 60
        while not [n for n in os.listdir(self.p.root)
                   if n.startswith('.gitbackup-restore-')]:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        [left] = [n for n in os.listdir(self.p.root)
                  if n.startswith('.gitbackup-restore-')]
        self.assertEqual(os.stat(os.path.join(self.p.root, left)).st_mode
                         & 0o777, 0o700)
        self.assertEqual(os.stat(os.path.join(self.p.root, left, 'tree'))
                         .st_mode & 0o777, 0o755)   # the archive's root
        self.assertFalse(os.path.exists(target))
        self.p.server('drill')
        self.assertEqual([n for n in os.listdir(self.p.root)
                          if n.startswith('.gitbackup-')], [])
        self.assertEqual(os.listdir(os.path.join(
            self.p.node_dir, 'log', 'state', 'scratch')), [])


if __name__ == '__main__':
    unittest.main()
