"""What comes back is exactly what was there (SPEC 4 and 7).  A tree with
user and security xattrs (a file capability), POSIX access and default
ACLs with named entries, nanosecond times, a sparse file, hard links,
device nodes, a fifo, setuid/setgid bits, secret modes and odd names goes
through the real pipeline (client tar, sftp, node) as a full archive and
two increments with every kind of change; each point comes back through
`restore --to --same-owner` (root), through `restore --stdout` run as an
unprivileged account into the documented `tar -x`, and by `--path`;
compared with `rsync -naHAXc --itemize-changes` and lstat/xattrs."""

import contextlib
import os
import shutil
import stat
import subprocess
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline
from tests.test_restore import ClassCase, pipe

NOBODY = 65534
# The receiving end of `restore --stdout` (README, "Restoring").
RECEIVE = ['tar', '-x', '--xattrs', '--xattrs-include=*', '--acls',
           '--numeric-owner']


def write(path, data, mode=0o644, owner=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)
    if owner:
        os.chown(path, *owner)
    os.chmod(path, mode)


def run(*args):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def make_tree(src):
    write(os.path.join(src, 'dir', 'a'), b'hello\n')
    os.link(os.path.join(src, 'dir', 'a'), os.path.join(src, 'dir', 'b'))
    write(os.path.join(src, 'links', 'keep'), b'k\n')
    os.link(os.path.join(src, 'dir', 'a'), os.path.join(src, 'links', 'h'))
    write(os.path.join(src, 'keep', 'unchanged.txt'), b'same\n', 0o640)
    write(os.path.join(src, 'olddir', 'in', 'x'), b'x\n')
    write(os.path.join(src, 'gone.txt'), b'deleted later\n')
    write(os.path.join(src, 's600'), b'secret\n', 0o600)
    write(os.path.join(src, 's640'), b'secret\n', 0o640, (1234, 2345))
    write(os.path.join(src, 'su'), b'#!/bin/sh\n', 0o4755, (1234, 2345))
    os.makedirs(os.path.join(src, 'sgid'))
    os.chmod(os.path.join(src, 'sgid'), 0o2775)
    shutil.copy(shutil.which('true'), os.path.join(src, 'cap'))
    run('setcap', 'cap_net_raw+ep', os.path.join(src, 'cap'))
    os.setxattr(os.path.join(src, 'dir', 'a'), 'user.color', b'blue')
    write(os.path.join(src, 'acl', 'f'), b'acl\n')
    run('setfacl', '-m', 'u:1234:rw,g:2345:r,m::rw',
        os.path.join(src, 'acl', 'f'))
    os.makedirs(os.path.join(src, 'acl', 'd'))
    run('setfacl', '-d', '-m', 'u:1234:rwx', os.path.join(src, 'acl', 'd'))
    with open(os.path.join(src, 'sparse'), 'wb') as f:
        f.truncate(16 << 20)
        f.seek(0, os.SEEK_END)
        f.write(b'end')
    os.makedirs(os.path.join(src, 'dev'))
    os.mknod(os.path.join(src, 'dev', 'null'), 0o666 | stat.S_IFCHR,
             os.makedev(1, 3))
    os.mkfifo(os.path.join(src, 'dev', 'fifo'))
    write(os.fsencode(src) + b'/odd name\n\twith \xe9', b'odd\n')
    write(os.path.join(src, '\u00fcn\u00efc\u00f6de'), b'u\n')
    os.symlink('/etc/passwd', os.path.join(src, 'abslink'))
    os.symlink('dir/a', os.path.join(src, 'rellink'))
    os.utime(os.path.join(src, 'keep', 'unchanged.txt'),
             ns=(1577836800123456789, 1577836800123456789))
    write(os.path.join(src, 'todel', 'f'), b'f\n')


def change_once(src):
    """Contents, xattrs, modes, a directory renamed, types replaced,
    a hard link and new directories."""
    os.rename(os.path.join(src, 'olddir'), os.path.join(src, 'newdir'))
    write(os.path.join(src, 'newdir', 'in', 'added'), b'added\n')
    with open(os.path.join(src, 'dir', 'a'), 'wb') as f:
        f.write(b'changed in place\n')      # dir/b and links/h follow
    os.setxattr(os.path.join(src, 's600'), 'user.note', b'xattr only')
    shutil.rmtree(os.path.join(src, 'acl', 'd'))
    write(os.path.join(src, 'acl', 'd'), b'a file now\n')
    os.unlink(os.path.join(src, 'rellink'))
    write(os.path.join(src, 'rellink', 'q'), b'a directory now\n')
    os.chmod(os.path.join(src, 'dir'), 0o750)
    os.link(os.path.join(src, 's600'), os.path.join(src, 's600-link'))
    write(os.path.join(src, 'added', 'dir', 'f'), b'new tree\n')


def change_twice(src):
    """Deletions, a directory replaced by a symlink, a new device, a
    time-only change, the sparse file grown."""
    os.unlink(os.path.join(src, 'gone.txt'))
    os.unlink(os.path.join(src, 'dev', 'fifo'))
    os.mknod(os.path.join(src, 'dev', 'zero'), 0o666 | stat.S_IFCHR,
             os.makedev(1, 5))
    shutil.rmtree(os.path.join(src, 'todel'))
    os.symlink('newdir', os.path.join(src, 'todel'))
    os.utime(os.path.join(src, 's640'), ns=(1, 1600000000987654321))
    with open(os.path.join(src, 'sparse'), 'r+b') as f:
        f.truncate(32 << 20)


def lstat_tree(top, ignore=()):
    """{path: what lstat, the xattrs and the ACLs say}, plus the hard-link
    groups: everything a restore must give back."""
    out, inodes = {}, {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, top)
            if rel in ignore:
                continue
            st = os.lstat(path)
            xattrs = {} if stat.S_ISLNK(st.st_mode) else {
                k: os.getxattr(path, k, follow_symlinks=False)
                for k in os.listxattr(path, follow_symlinks=False)}
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                        st.st_uid, st.st_gid, st.st_rdev,
                        st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                        st.st_mtime_ns, xattrs)
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, set()).add(rel)
    return out, sorted(sorted(g) for g in inodes.values())


class FidelityTest(unittest.TestCase):
    """One tree, full -> two increments, every way of getting it back."""

    @classmethod
    def setUpClass(cls):
        support.require_root('devices, owners, capabilities')
        support.require_tools('setcap', 'setfacl', 'getfacl', 'rsync')
        cls.p = Pipeline(ClassCase(cls))
        cls.src = os.path.join(cls.p.root, 'src')
        cls.refs = []
        for change in (make_tree, change_once, change_twice):
            change(cls.src)
            ref = os.path.join(cls.p.root, f'ref{len(cls.refs)}')
            # The reference copy keeps all that is compared (times of
            # directories, links and devices included, which rsync -a
            # does not always set).
            run('cp', '-a', '--preserve=all', '--sparse=always', cls.src,
                ref)
            cls.refs.append(ref)
            cls.p.client('commit', 'app', cls.src)
            cls.p.client('send')
            cls.p.server('run')
            cls.p.client('send')
        cls.snapshots = [os.path.basename(s) for s in cls.p.stored('app')]

    def target(self, name):
        return os.path.join(self.p.root, self.id().rsplit('.', 1)[1] + name)

    def assert_same(self, got, ref, ignore=()):
        proc = subprocess.run(
            ['rsync', '-naHAXc', '--numeric-ids', '--itemize-changes',
             got + '/', ref + '/'], stdout=subprocess.PIPE, text=True,
            errors='replace', check=True)
        self.assertEqual([line for line in proc.stdout.splitlines()
                          if line.split(' ', 1)[-1] not in ignore], [])
        self.assertEqual(lstat_tree(got, ignore), lstat_tree(ref, ignore))
        for rel in ('acl/f', 'acl/d', 'cap'):
            if rel in ignore or not os.path.exists(os.path.join(ref, rel)):
                continue
            self.assertEqual(*[subprocess.run(
                ['getfacl', '-cp', os.path.join(top, rel)], check=True,
                stdout=subprocess.PIPE).stdout for top in (got, ref)])

    def test_chain_is_full_then_increments(self):
        import json
        levels = [json.load(open(os.path.join(s, 'manifest.json')))['level']
                  for s in self.p.stored('app')]
        self.assertEqual(levels, [0, 1, 2])
        listing = [n for n in os.listdir(self.p.stored('app')[0])
                   if n.endswith('.listing')]
        self.assertTrue(listing)
        self.assertIn('archives keep: owners, modes', self.p.client(
            'check', check=False).stdout)
        self.assertIn('restore --same-owner keeps: owners, modes, hardlinks, '
                      'sparse files, nanosecond times, xattrs (all '
                      'namespaces), POSIX ACLs', self.p.server(
                          'check', check=False).stdout)
        # Stored files are the client's data: none world-readable.
        for snap in self.p.stored('app'):
            for name in os.listdir(snap):
                mode = os.stat(os.path.join(snap, name)).st_mode
                self.assertEqual(mode & 0o007, 0, name)

    def test_to_same_owner_at_each_point_is_exact(self):
        for n, (snap, ref) in enumerate(zip(self.snapshots, self.refs)):
            out = self.target(str(n))
            self.p.server('restore', CLIENT, 'app', '--at', snap, '--to',
                          out, '--same-owner')
            self.assert_same(out, ref)
        sparse = os.lstat(os.path.join(out, 'sparse'))
        self.assertLess(sparse.st_blocks * 512, 1 << 20)
        self.assertEqual(os.getxattr(os.path.join(out, 'cap'),
                                     'security.capability')[:4],
                         os.getxattr(os.path.join(self.refs[2], 'cap'),
                                     'security.capability')[:4])

    def test_to_without_same_owner_leaves_privilege_out(self):
        out = self.target('')
        proc = self.p.server('restore', CLIENT, 'app', '--to', out)
        for word in ('device node left out', 'dev/null, dev/zero',
                     'setuid/setgid bits left out', 'sgid, su',
                     'xattrs outside user.* left out', 'cap'):
            self.assertIn(word, proc.stderr)
        self.assertEqual(sorted(os.listdir(os.path.join(out, 'dev'))), [])
        st = os.lstat(os.path.join(out, 'su'))
        self.assertEqual((st.st_mode & 0o7777, st.st_uid), (0o755, 0))
        self.assertNotIn('security.capability',
                         os.listxattr(os.path.join(out, 'cap')))
        self.assertEqual(os.getxattr(os.path.join(out, 's600'),
                                     'user.note'), b'xattr only')
        for name, mode in (('s600', 0o600), ('s640', 0o640),
                           ('keep/unchanged.txt', 0o640)):
            self.assertEqual(os.lstat(os.path.join(out, name)).st_mode
                             & 0o777, mode, name)
        self.assertEqual(*[subprocess.run(
            ['getfacl', '-cp', '--omit-header', os.path.join(top, 'acl/f')],
            check=True, stdout=subprocess.PIPE).stdout
            for top in (out, self.refs[2])])

    @contextlib.contextmanager
    def node_account(self):
        """The node's data owned by an unprivileged account, as on a node
        whose cron runs as adminbackup; root's again afterwards."""
        node = self.p.node_dir
        run('chown', '-R', f'{NOBODY}:{NOBODY}', node)
        top = node
        while top != '/':
            os.chmod(top, os.stat(top).st_mode | 0o005)
            top = os.path.dirname(top)
        try:
            yield ['setpriv', f'--reuid={NOBODY}', f'--regid={NOBODY}',
                   '--clear-groups']
        finally:
            run('chown', '-R', '0:0', node)

    def test_to_as_an_unprivileged_account(self):
        """Least privilege: the account's own files, modes, user xattrs
        and ACLs as they were; no device, setuid bit or capability."""
        out = self.target('')
        os.makedirs(out)
        os.chown(out, NOBODY, NOBODY)
        with self.node_account() as as_node:
            proc = subprocess.run(
                [*as_node, *self.p.commands['server.py'], '--config',
                 self.p.config, 'restore', CLIENT, 'app', '--to', out],
                env=self.p.env, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, timeout=300)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        privileged = ('dev/null', 'dev/zero', 'su', 'sgid', 'cap')
        got, groups = lstat_tree(out, privileged)
        want, want_groups = lstat_tree(self.refs[2], privileged)
        self.assertEqual(groups, want_groups)
        for rel in want:
            g, w = got[rel], want[rel]
            self.assertEqual((g[2], g[3]), (NOBODY, NOBODY), rel)
            self.assertEqual(g[:2] + g[4:], w[:2] + w[4:], rel)
        self.assertEqual(os.listdir(os.path.join(out, 'dev')), [])
        self.assertEqual(os.lstat(os.path.join(out, 'su')).st_mode & 0o7777,
                         0o755)

    def test_stdout_as_an_unprivileged_account_is_exact(self):
        """The node's own account (not root) owns the data: its stream,
        extracted as root with the documented command, is the tree."""
        with self.node_account() as as_node:
            for n in (1, 2):
                out = self.target(str(n))
                os.makedirs(out)
                status, err, tar = pipe(
                    [*as_node, *self.p.commands['server.py'],
                     '--config', self.p.config, 'restore', CLIENT, 'app',
                     '--at', self.snapshots[n], '--stdout'],
                    RECEIVE + ['-C', out], self.p.env)
                self.assertEqual((status, tar.returncode), (0, 0),
                                 err + tar.stderr.decode())
                self.assert_same(out, self.refs[n])

    def test_path_at_any_point_of_the_chain(self):
        cases = [
            # (snapshot, paths, ignore nothing: compared with the ref)
            (2, ['keep/unchanged.txt']),           # unchanged since full
            (2, ['newdir']),                       # renamed since full
            (2, ['added/dir', 'rellink']),         # added later; repeated
            (1, ['gone.txt']),                     # deleted later
            (2, ['links/h']),                      # its other names outside
            (2, ['dev/zero'])]                     # a device, --same-owner
        for n, (at, paths) in enumerate(cases):
            out = self.target(str(n))
            args = [x for p in paths for x in ('--path', p)]
            self.p.server('restore', CLIENT, 'app', '--at',
                          self.snapshots[at], '--to', out, '--same-owner',
                          *args)
            got, _ = lstat_tree(out)
            ref, _ = lstat_tree(self.refs[at])
            for rel, what in got.items():
                if os.path.isdir(os.path.join(out, rel)) and \
                        not any(rel == p or rel.startswith(p + '/')
                                for p in paths):
                    continue      # a directory above a path: mode only
                self.assertEqual(what, ref[rel], rel)
            self.assertEqual(
                {r for r in got if any(r == p or r.startswith(p + '/')
                                       for p in paths)},
                {r for r in ref if any(r == p or r.startswith(p + '/')
                                       for p in paths)}, paths)
        # Through --stdout too.
        out = self.target('stdout')
        os.makedirs(out)
        status, err, tar = pipe(
            [*self.p.commands['server.py'], '--config', self.p.config,
             'restore', CLIENT, 'app', '--path', 'newdir', '--stdout'],
            RECEIVE + ['-C', out], self.p.env)
        self.assertEqual((status, tar.returncode), (0, 0), err)
        self.assertEqual(sorted(os.listdir(os.path.join(out, 'newdir', 'in'))),
                         ['added', 'x'])
        # A path the snapshot does not hold: a clear error, nothing left.
        out = self.target('gone')
        proc = self.p.server('restore', CLIENT, 'app', '--path', 'gone.txt',
                             '--to', out, check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f"app {self.snapshots[2]} holds no 'gone.txt'; the "
                      'nearest snapshot that does is '
                      f'{self.snapshots[1]}', proc.stderr)
        self.assertNotIn('refused', proc.stderr)
        self.assertFalse(os.path.lexists(out))

    def test_drill_passes_on_the_honest_chain(self):
        proc = self.p.server('drill')
        self.assertIn(f'ok: {CLIENT} app {self.snapshots[2]}', proc.stdout)


if __name__ == '__main__':
    unittest.main()
