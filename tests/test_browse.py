"""Find and browse what a node holds, and a drill that proves the whole
tree (issue 22 items 5 and 7, issue 21 item 6): a real full and two
increments through the pipeline with every kind of change (add, modify,
delete, rename a file and a directory, hard links, a symlink become a
directory); `find`, `ls` and `diff` read from the listings match the
source tree at each point; `restore --path` of a path the snapshot does
not hold names the nearest snapshot that does; the drill compares every
entry of the chain's tree and fails when a middle link's listing no
longer matches; one bad snapshot is one drill failure."""

import calendar
import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
import unittest

from modules import _tarlisting as tarlisting
from tests import support
from tests.modules_pipeline import ModulePipeline, PostgresMixin
from tests.pipeline import CLIENT, Pipeline
from tests.test_incremental import set_config
from tests.test_restore import ClassCase, write


def make_tree(root):
    write(os.path.join(root, 'keep.txt'), 'kept\n' * 50)
    write(os.path.join(root, 'change.txt'), 'before\n')
    write(os.path.join(root, 'delete.txt'), 'deleted later\n')
    write(os.path.join(root, 'old name.txt'), 'renamed later\n')
    write(os.path.join(root, 'run.sh'), '#!/bin/sh\n', 0o755)
    write(os.path.join(root, 'sub', 'deep', 'x.txt'), 'deep\n')
    write(os.path.join(root, 'olddir', 'y.txt'), 'dir renamed later\n')
    write(os.path.join(root, 'odd\nname \\ here'), 'odd\n', 0o600)
    os.makedirs(os.path.join(root, 'empty'))
    os.symlink('sub/deep/x.txt', os.path.join(root, 'link'))
    os.link(os.path.join(root, 'keep.txt'), os.path.join(root, 'hard'))


def first_changes(root):
    """Modify, delete, add, rename a file and a directory, a new hard
    link pair, a changed mode."""
    write(os.path.join(root, 'change.txt'), 'after, and longer\n')
    os.unlink(os.path.join(root, 'delete.txt'))
    os.rename(os.path.join(root, 'old name.txt'),
              os.path.join(root, 'new name.txt'))
    os.rename(os.path.join(root, 'olddir'), os.path.join(root, 'newdir'))
    write(os.path.join(root, 'sub', 'added.txt'), 'new\n')
    os.link(os.path.join(root, 'sub', 'added.txt'),
            os.path.join(root, 'sub', 'hard2'))
    os.chmod(os.path.join(root, 'run.sh'), 0o700)


def second_changes(root):
    """A symlink replaced by a directory, a directory deleted, a file
    added in a renamed directory.  (The new directory is made first: one
    that reused the deleted one's inode would look to GNU tar like that
    directory renamed, and its increment would not extract over the
    symlink: a tar limit, not what this test is about.)"""
    os.unlink(os.path.join(root, 'link'))
    write(os.path.join(root, 'link', 'inside.txt'), 'was a symlink\n')
    shutil.rmtree(os.path.join(root, 'sub', 'deep'))
    write(os.path.join(root, 'newdir', 'z.txt'), 'z\n')


def source_state(root):
    """{path: (type, size of a file, mode, mtime in s, link target)}."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            kind = 'dir' if stat.S_ISDIR(st.st_mode) else 'link' if \
                stat.S_ISLNK(st.st_mode) else 'file'
            state[os.path.relpath(path, root)] = (
                kind, st.st_size if kind == 'file' else None,
                None if kind == 'link' else stat.S_IMODE(st.st_mode),
                int(st.st_mtime),
                os.readlink(path) if kind == 'link' else None)
    return state


def listed_state(rows):
    """ls --format json rows in source_state's shape."""
    return {r['path']: (
        r['type'], r['size'], None if r['type'] == 'link' else
        int(r['mode'], 8), calendar.timegm(time.strptime(
            r['mtime'], '%Y-%m-%dT%H:%M:%SZ')),
        r['target']) for r in rows}


def read_bytes(path):
    with open(path, 'rb') as f:
        return f.read()


def write_bytes(path, data):
    with open(path, 'wb') as f:
        f.write(data)


def rewrite_stored(snap, name, change):
    """Change one stored file and its manifest entry alike (so that only
    a comparison of contents, not a re-hash, can tell)."""
    path = os.path.join(snap, name)
    with open(path, 'rb') as f:
        data = change(f.read())
    with open(path, 'wb') as f:
        f.write(data)
    with open(os.path.join(snap, 'manifest.json')) as f:
        manifest = json.load(f)
    for entry in manifest['files']:
        if entry['name'] == name:
            entry.update(sha256=hashlib.sha256(data).hexdigest(),
                         size=len(data))
    with open(os.path.join(snap, 'manifest.json'), 'w') as f:
        json.dump(manifest, f)


def backup_chain(p, src):
    """A full and two increments of src through the pipeline; the source
    state after each, and the snapshot names."""
    states = []
    for change in (make_tree, first_changes, second_changes):
        change(src)
        states.append(source_state(src))
        p.client('commit', 'app', src)
        p.client('send')
        p.server('run')
        p.client('send')        # the client learns it was stored
    snaps = [os.path.basename(s) for s in p.stored('app')]
    levels = [json.loads(p.server('list', CLIENT, 'app', '--format',
                                  'json').stdout)[n]['level'] for n in
              range(3)]
    assert levels == [0, 1, 2], levels
    return states, snaps


class ListingParseTest(unittest.TestCase):
    """Listings are hostile text: what tar writes is read exactly, and
    anything else is an error naming the line, never a traceback."""

    LINES = [
        'drwxr-xr-x  root/root         0 2026-12-04 18:30:27.8043797 ./',
        '-rwsr-x---  0/0               5 2026-01-01 00:00:00           '
        r'./a\\b\nc d',
        'hrwsr-x---  0/0               0 2026-01-01 00:00:00           '
        r'./h link to ./a\\b\nc d',
        'lrwxrwxrwx  u/g               0 2026-01-01 00:00:01.5         '
        './l -> ../outside',
        'crw-rw----+ root/disk      8, 1 2026-01-01 00:00 ./dev/sda1',
        '  a: user::rw-,group::r--',
    ]

    def listing(self, lines):
        path = os.path.join(support.temp_dir(self, 'listing-'), 'x.listing')
        with open(path, 'w', encoding='utf-8', errors='surrogateescape') as f:
            f.write('\n'.join(lines) + '\n')
        return path

    def test_what_tar_writes(self):
        entries = tarlisting.parse_listing(self.listing(self.LINES))
        self.assertEqual([(e.path, e.kind, e.size, e.mode) for e in entries],
                         [('a\\b\nc d', 'file', 5, 0o4750),
                          ('h', 'file', None, 0o4750),
                          ('l', 'link', None, 0o777),
                          ('dev/sda1', 'char', None, 0o660)])
        self.assertEqual(entries[1].hardlink, 'a\\b\nc d')
        self.assertEqual((entries[2].target, entries[2].mtime),
                         ('../outside', 1767225601))
        self.assertEqual((entries[3].device, entries[3].mtime,
                          entries[3].acl), ('8,1', None, True))

    def test_compare_tree_checks_every_recorded_field(self):
        top = support.temp_dir(self, 'restored-')
        write(os.path.join(top, 'd', 'f'), 'abc', 0o640)
        os.setxattr(os.path.join(top, 'd', 'f'), 'user.k', b'v')
        os.symlink('d/f', os.path.join(top, 'l'))
        for path in ('d/f', 'd'):
            os.utime(os.path.join(top, path), (1767225600, 1767225600))
        stamp = '2026-01-01 00:00:00.000000000'
        entries = tarlisting.parse_listing(self.listing([
            f'drwxr-xr-x  u/g 0 {stamp} ./d/',
            f'-rw-r-----* u/g 3 {stamp} ./d/f',
            '  x: 1 user.k',
            f'lrwxrwxrwx  u/g 0 {stamp} ./l -> d/f']))
        tree = {}
        tarlisting.apply_link(tree, entries, None, 'snap')
        os.chmod(os.path.join(top, 'd'), 0o755)
        self.assertEqual(tarlisting.compare_tree(top, tree), ([], 3))
        os.removexattr(os.path.join(top, 'd', 'f'), 'user.k')
        os.chmod(os.path.join(top, 'd', 'f'), 0o600)
        os.utime(os.path.join(top, 'd', 'f'), (1767225601, 1767225601))
        os.unlink(os.path.join(top, 'l'))
        os.symlink('elsewhere', os.path.join(top, 'l'))
        write(os.path.join(top, 'extra'), '')
        problems, count = tarlisting.compare_tree(top, tree)
        self.assertEqual(count, 3)
        self.assertEqual(problems, [
            ('d/f', 'mode 0600, listed as 0640'),
            ('d/f', 'mtime 1767225601, listed as 1767225600'),
            ('d/f', 'extended attribute user.k missing'),
            ('l', "points to 'elsewhere', listed to 'd/f'"),
            ('extra', 'not in the listings')])

    def test_an_increment_renames_deletes_and_replaces(self):
        stamp = '2026-01-01 00:00:00'
        full = tarlisting.parse_listing(self.listing([
            f'drwxr-xr-x  u/g 0 {stamp} ./old/',
            f'-rw-r--r--  u/g 1 {stamp} ./old/kept',
            f'drwxr-xr-x  u/g 0 {stamp} ./was-dir/',
            f'-rw-r--r--  u/g 1 {stamp} ./was-dir/inside',
            f'-rw-r--r--  u/g 1 {stamp} ./gone']))
        increment = tarlisting.parse_listing(self.listing([
            f'drwxr-xr-x  u/g 0 {stamp} ./new/',
            f'-rw-r--r--  u/g 2 {stamp} ./was-dir']))
        # What the increment's directory records say: old/ became new/
        # (its file unchanged), gone and was-dir/ are not in ./ any more
        # as they were.
        dumpdirs = [('', [('D', 'new'), ('Y', 'was-dir'), ('R', './old'),
                          ('T', './new')]),
                    ('new', [('N', 'kept')])]
        tree = {}
        tarlisting.apply_link(tree, full, None, 'full')
        changed = tarlisting.apply_link(tree, increment, dumpdirs, 'inc')
        self.assertEqual({p: (e.kind, e.size, e.snapshot)
                          for p, e in tree.items()}, {
            'new': ('dir', None, 'inc'), 'new/kept': ('file', 1, 'inc'),
            'was-dir': ('file', 2, 'inc')})
        self.assertEqual(changed, {'new', 'new/kept', 'was-dir'})

    def test_malformed_lines_are_errors_naming_the_line(self):
        for bad, words in (
                (self.LINES[1].replace(' 5 ', ' 5x '), 'not a member line'),
                (self.LINES[1].replace('./a', './../a'), 'not below'),
                (self.LINES[1].replace('./a', '/etc/a'), 'not a member line'),
                (self.LINES[2].replace('./a', '../a'), 'outside the tree'),
                (self.LINES[1] + 'x' * tarlisting.MAX_LINE, 'longer than')):
            path = self.listing([self.LINES[0], bad])
            with self.assertRaises(tarlisting.ListingError) as caught:
                tarlisting.parse_listing(path)
            self.assertIn('x.listing line 2: ', str(caught.exception))
            self.assertIn(words, str(caught.exception))


class BrowseTest(unittest.TestCase):
    """One pipeline with a three-link chain, read every way; the drill of
    the chain compares every entry of its tree."""

    @classmethod
    def setUpClass(cls):
        cls.p = Pipeline(ClassCase(cls))
        cls.src = os.path.join(cls.p.root, 'src')
        cls.states, cls.snaps = backup_chain(cls.p, cls.src)

    def server(self, *args, check=True):
        return self.p.server(*args, check=check)

    def json(self, *args):
        return json.loads(self.server(*args, '--format', 'json').stdout)

    def test_ls_at_each_point_is_the_source_tree_then(self):
        for snap, state in zip(self.snaps, self.states):
            rows = self.json('ls', CLIENT, 'app', '--at', snap)
            self.assertEqual(listed_state(rows), state, snap)
        # The default is the newest; text names every entry.
        out = self.server('ls', CLIENT, 'app').stdout
        self.assertIn(f'{self.snaps[2]}: {len(self.states[2])} entries', out)
        self.assertIn('link/inside.txt', out)
        self.assertIn('odd\\nname \\\\ here', out)      # one line each

    def test_ls_path_and_a_path_the_snapshot_does_not_hold(self):
        rows = self.json('ls', CLIENT, 'app', 'newdir')
        self.assertEqual([r['path'] for r in rows],
                         ['newdir', 'newdir/y.txt', 'newdir/z.txt'])
        # Options before the operand, as SPEC writes the command line.
        rows = json.loads(self.server('ls', CLIENT, 'app', '--at',
                                      self.snaps[1], '--format', 'json',
                                      'newdir').stdout)
        self.assertEqual([r['path'] for r in rows],
                         ['newdir', 'newdir/y.txt'])
        proc = self.server('ls', CLIENT, 'app', '--at', self.snaps[1], 'a',
                           'b', check=False)
        self.assertEqual(proc.returncode, 2)
        self.assertIn('unrecognized arguments: a b', proc.stderr)
        proc = self.server('ls', CLIENT, 'app', 'delete.txt', check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn(f'the nearest snapshot that does is {self.snaps[0]}',
                      proc.stderr)

    def test_find_by_base_name_and_path(self):
        rows = json.loads(self.server('find', CLIENT, '--format', 'json',
                                      'app', 'delete.txt').stdout)
        self.assertEqual([(r['snapshot'], r['path'], r['changed'])
                          for r in rows],
                         [(self.snaps[0], 'delete.txt', True)])
        # x.txt: stored in the full, unchanged in the first increment,
        # gone with its directory in the second.
        rows = self.json('find', CLIENT, 'x.txt')
        self.assertEqual([(r['source'], r['snapshot'], r['path'],
                           r['changed'], r['size']) for r in rows],
                         [('app', self.snaps[0], 'sub/deep/x.txt', True, 5),
                          ('app', self.snaps[1], 'sub/deep/x.txt', False, 5)])
        # A renamed directory's file is new at its path, then the same.
        rows = self.json('find', CLIENT, 'app', 'newdir/*')
        self.assertEqual(sorted((r['snapshot'], r['path'], r['changed'])
                                for r in rows), [
            (self.snaps[1], 'newdir/y.txt', True),
            (self.snaps[2], 'newdir/y.txt', False),
            (self.snaps[2], 'newdir/z.txt', True)])
        rows = self.json('find', CLIENT, 'app', 'hard2')
        self.assertEqual([r['size'] for r in rows], [4, 4])
        proc = self.server('find', CLIENT, 'no-such-file', check=False)
        self.assertEqual((proc.returncode, proc.stdout), (1, ''))
        text = self.server('find', CLIENT, 'app', 'change.txt').stdout
        self.assertIn(f'app {self.snaps[1]} changed file', text)

    def expected_diff(self, a, b):
        old, new = self.states[a], self.states[b]
        return sorted(
            [('+', p) for p in new if p not in old] +
            [('-', p) for p in old if p not in new] +
            [('M', p) for p in old if p in new and old[p] != new[p]],
            key=lambda c: c[1])

    def test_diff_is_the_changes_made(self):
        for a, b in ((0, 1), (1, 2), (0, 2)):
            rows = self.json('diff', CLIENT, 'app', self.snaps[a],
                             self.snaps[b])
            self.assertEqual([(r['change'], r['path']) for r in rows],
                             self.expected_diff(a, b), (a, b))
        text = self.server('diff', CLIENT, 'app', self.snaps[0],
                           self.snaps[1]).stdout
        for line in ('+ new name.txt', '- old name.txt', '- delete.txt',
                     'M change.txt', '+ newdir/y.txt', '- olddir',
                     '+ sub/hard2'):
            self.assertIn('\n' + line + '\n', text)

    def test_drill_compares_every_entry_and_catches_a_middle_listing(self):
        p = self.p
        proc = p.server('drill')
        entries = len(self.states[2])
        self.assertIn(f'ok: {CLIENT} app {self.snaps[2]}: ', proc.stdout)
        self.assertIn(f': {entries} entries compared with the tree the '
                      'listings of 3 link(s) describe (type, size, mode, '
                      'mtime, xattrs): all match\n', proc.stdout)
        # The middle link's listing says 'new name.txt' (unchanged since,
        # so not in the newest listing) had another size and mode.
        middle = p.stored('app')[1]
        [listing] = [n for n in os.listdir(middle) if n.endswith('.listing')]
        for name in (listing, 'manifest.json'):     # as they were, after
            path = os.path.join(middle, name)
            self.addCleanup(write_bytes, path, read_bytes(path))

        def tamper(data):
            lines = data.split(b'\n')
            for n, line in enumerate(lines):
                if line.endswith(b' ./new name.txt'):
                    lines[n] = line.replace(b'-rw-r--r--', b'-rw-------') \
                        .replace(b' 14 ', b' 15 ')
            return b'\n'.join(lines)

        rewrite_stored(middle, listing, tamper)
        proc = p.server('drill', check=False)
        self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
        self.assertIn(f'FAILED: {CLIENT} app {self.snaps[2]}: ', proc.stdout)
        self.assertIn('new name.txt: 14 bytes, listed with 15', proc.stdout)
        self.assertIn('new name.txt: mode 0644, listed as 0600', proc.stdout)

    def test_restore_path_names_the_nearest_snapshot_holding_it(self):
        out = os.path.join(self.p.root, 'out-missing')
        proc = self.server('restore', CLIENT, 'app', '--path', 'delete.txt',
                           '--to', out, check=False)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn(f'holds no \'delete.txt\'; the nearest snapshot that '
                      f'does is {self.snaps[0]}', proc.stderr)
        self.assertFalse(os.path.exists(out))


class MirrorAtTest(unittest.TestCase):
    """restore --at of a git mirror gives the refs it had then (from its
    reflogs and preserved refs), or is refused: never today's."""

    def test_mirror_refs_as_they_were(self):
        p = ModulePipeline(self)
        p.start_daemon()
        bare = p.client_repository('proj.git')
        work = p.work_clone(bare)
        first = p.commit_file(work, 'README', 'one\n')
        p.git('push', '--quiet', 'origin', 'master', cwd=work)
        p.git('push', '--quiet', 'origin', 'master:topic', cwd=work)
        before_any = time.strftime('%Y-%m-%dT%H:%M:%SZ',
                                   time.gmtime(time.time() - 2))
        p.client('send')
        p.server('run')
        mirror = p.mirror('proj.git')
        then_refs = p.refs(mirror)
        time.sleep(1.1)
        then = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
        time.sleep(1.1)
        # Rewritten master, a deleted branch, a new tag.
        p.git('commit', '--quiet', '--amend', '-m', 'rewritten', cwd=work)
        p.git('tag', 'v1', cwd=work)
        p.git('push', '--quiet', '--force', 'origin', 'master', 'v1',
              ':topic', cwd=work)
        p.client('send')
        p.server('run')
        now_refs = p.refs(mirror)
        self.assertIn('refs/tags/v1', now_refs)
        self.assertNotIn('refs/heads/topic', now_refs)
        self.assertEqual(sum(r.startswith('refs/preserved/')
                             for r in now_refs), 2)
        out = os.path.join(p.root, 'then.git')
        proc = p.server('restore', CLIENT, 'git/proj', '--at', then, '--to',
                        out)
        self.assertEqual(p.refs(out), then_refs)
        # A deleted branch's start died with its reflog: said, not hidden.
        self.assertIn('1 ref(s) restored at a tip whose start no record '
                      'tells', proc.stderr)
        self.assertIn('refs/heads/topic', proc.stderr)
        self.assertEqual(p.refs(out)['refs/heads/master'], first)
        # The bundle likewise; without --at, every ref of today.
        bundle = os.path.join(p.root, 'then.bundle')
        with open(bundle, 'wb') as f:
            subprocess.run([*p.commands['server.py'], '--config', p.config,
                            'restore', CLIENT, 'git/proj', '--at', then,
                            '--stdout'], stdout=f, check=True, env=p.env)
        heads = p.git('bundle', 'list-heads', bundle).stdout
        self.assertEqual(sorted(line.split()[1] for line in
                                heads.splitlines() if 'HEAD' not in line),
                         sorted(then_refs))
        out = os.path.join(p.root, 'now.git')
        p.server('restore', CLIENT, 'git/proj', '--to', out)
        self.assertEqual(p.refs(out), now_refs)
        # Before the first fetch: refused, nothing written.
        out = os.path.join(p.root, 'before.git')
        proc = p.server('restore', CLIENT, 'git/proj', '--at', before_any,
                        '--to', out, check=False)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn(f'no record of its refs reaches back to {before_any}'
                      ': the oldest is from ', proc.stderr)
        self.assertFalse(os.path.exists(out))


class OneBadSnapshotTest(PostgresMixin, unittest.TestCase):
    """A malformed listing (client a0) and a non-numeric row count
    (client b0) are each their series' failure, with the reason, in the
    journal and the mail; a client whose journal cannot be written (a1)
    fails alone; c1, drilled after them, passes."""

    @classmethod
    def create_data(cls, cluster):
        cluster.psql('CREATE DATABASE shop')
        cluster.psql('CREATE TABLE items (id int); INSERT INTO items '
                     'VALUES (1), (2)', db='shop')

    def setUp(self):
        support.require_tools('pg_dump', 'pg_restore', 'psql')

    def test_bad_listing_and_bad_statistics_fail_only_their_series(self):
        p = Pipeline(self)
        set_config(p, 'server', f'drill_postgres = {support.pg_bindir()}\n')
        src = os.path.join(p.root, 'src')
        make_tree(src)
        p.client('commit', 'app', src)
        p.client('send')
        p.server('run')
        data = os.path.join(p.node_dir, 'data')
        shutil.copytree(os.path.join(data, CLIENT, 'files'),
                        os.path.join(data, 'a0', 'files'), symlinks=True)
        [snap] = [os.path.join(data, 'a0', 'files', 'app', n) for n in
                  os.listdir(os.path.join(data, 'a0', 'files', 'app'))]
        [listing] = [n for n in os.listdir(snap) if n.endswith('.listing')]
        rewrite_stored(snap, listing, lambda d: d.replace(
            b'         5 ', b'        5x ', 1))
        self.store_dump_with_bad_statistics(os.path.join(
            data, 'b0', 'files', 'postgresdb', '20260101T000000Z'))
        # a1: healthy data, but a journal that cannot be written.
        shutil.copytree(os.path.join(data, CLIENT, 'files'),
                        os.path.join(data, 'a1', 'files'), symlinks=True)
        os.makedirs(os.path.join(data, 'a1', 'drills.jsonl'))
        proc = p.server('drill', check=False)
        self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
        self.assertNotIn('Traceback', proc.stdout + proc.stderr)
        lines = proc.stdout.splitlines()
        self.assertRegex(lines[0], r'^FAILED: a0 app \S+: .*\.listing line '
                         r'[0-9]+: not a member line')
        self.assertRegex(lines[1], r'^ok: a1 app ')
        self.assertRegex(lines[2], r'^FAILED: a1: .*drills.jsonl')
        self.assertRegex(lines[3], r'^FAILED: b0 postgresdb 20260101T000000Z'
                         r': shop.dump: malformed statistics .*many')
        self.assertRegex(lines[4], rf'^ok: {CLIENT} app ')
        self.assertIn('3 snapshot(s) and mirror(s) checked, 3 failed',
                      lines[5])
        for client, ok in (('a0', False), ('b0', False), (CLIENT, True)):
            with open(os.path.join(data, client, 'drills.jsonl')) as f:
                [entry] = [json.loads(line) for line in f]
            self.assertEqual(entry['ok'], ok, entry)
        [mail] = [m for m in p.mails() if 'drill' in str(m['Subject'])]
        body = mail.get_content()
        self.assertIn('not a member line', body)
        self.assertIn('malformed statistics', body)
        # find reads manifests too, and names a listing it cannot read.
        rows = json.loads(p.server('find', 'b0', 'shop.*', '--format',
                                   'json').stdout)
        self.assertEqual([(r['source'], r['path'], r['changed'])
                          for r in rows], [
            ('postgresdb', 'shop.dump', True)])
        proc = p.server('find', 'a0', 'app', '*', check=False)
        self.assertEqual((proc.returncode, proc.stdout), (1, ''))
        self.assertRegex(proc.stderr, r'find: app \S+: .*\.listing line '
                         r'[0-9]+: not a member line')
        self.assertNotIn('Traceback', proc.stderr)

    def store_dump_with_bad_statistics(self, snap):
        os.makedirs(snap)
        dump = os.path.join(snap, 'shop.dump')
        self.pg('pg_dump', '-Fc', '-f', dump, 'shop')
        with open(dump + '.stats.json', 'w') as f:
            json.dump({'tables': [{'schema': 'public', 'table': 'items',
                                   'rows': 'many'}]}, f)
        files = []
        for name in ('shop.dump', 'shop.dump.stats.json'):
            with open(os.path.join(snap, name), 'rb') as f:
                data = f.read()
            files.append({'name': name, 'size': len(data),
                          'sha256': hashlib.sha256(data).hexdigest()})
        with open(os.path.join(snap, 'manifest.json'), 'w') as f:
            json.dump({'client': 'b0', 'source': 'postgresdb',
                       'stored': '2026-01-01T00:00:00Z', 'files': files,
                       'request_id': '20260101T000000.000000Z-1-1'}, f)


if __name__ == '__main__':
    unittest.main()
