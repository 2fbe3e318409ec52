"""A compromised client attacks the node through its own repository.

Each test pushes, with the client's own key, what a client that an attacker
controls could push: trees crafted with git plumbing (symlinks, '..',
'.git', a 10 MB request, 100,000 files, a flood of commits) and request
lines aimed at the node's sftp and git modules.  Every case must be
refused with one clear, sanitised log line, reported in the run's summary
mail, write nothing outside that client's own tree on the node, leave other
clients alone, and not stop the valid requests of the same push.
"""

import hashlib
import os
import re
import shutil
import subprocess
import time
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline

TS = '20260101T000000Z'
# A second client on the same node, which the attacker must not reach.
OTHER = 'c2'


def set_config(pipeline, section, key, value):
    """Set one key of one section of the pipeline's configuration file."""
    with open(pipeline.config) as f:
        lines = f.read().splitlines()
    start = lines.index(f'[{section}]')
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].startswith('[')), len(lines))
    for i in range(start + 1, end):
        if re.match(rf'{re.escape(key)}\s*=', lines[i]):
            lines[i] = f'{key} = {value}'
            break
    else:
        lines.insert(start + 1, f'{key} = {value}')
    with open(pipeline.config, 'w') as f:
        f.write('\n'.join(lines) + '\n')


class Forger:
    """Builds commits for the client's repository with git plumbing, as a
    compromised client would, and pushes them with the client's key."""

    def __init__(self, pipeline):
        self.p = pipeline
        self.git_dir = os.path.join(pipeline.root, 'forge.git')
        self.env = {**pipeline.env, 'GIT_SSH_COMMAND':
                    pipeline.sshd.ssh_command(pipeline.client_key)}
        self.url = pipeline.sshd.url(pipeline.repo)
        self.git('init', '--quiet', '--bare')
        self.last = None

    def git(self, *args, input=None, check=True):
        proc = subprocess.run(['git', '--git-dir', self.git_dir, *args],
                              input=input, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=self.env,
                              timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f'git {args[0]} failed: '
                                 f'{proc.stderr.decode(errors="replace")}')
        return proc

    def blob(self, data):
        if isinstance(data, str):
            data = data.encode()
        return self.git('hash-object', '-w', '--stdin',
                        input=data).stdout.decode().strip()

    def tree(self, entries):
        """entries: [(mode, type, sha, name bytes or str)]."""
        chunks = []
        for mode, kind, sha, name in entries:
            if isinstance(name, str):
                name = name.encode()
            chunks.append(f'{mode} {kind} {sha}\t'.encode() + name + b'\0')
        return self.git('mktree', '-z', '--missing',
                        input=b''.join(chunks)).stdout.decode().strip()

    def files(self, files):
        """{name: content} -> tree of regular blobs."""
        return self.tree([('100644', 'blob', self.blob(content), name)
                          for name, content in files.items()])

    def tip(self):
        out = self.git('ls-remote', self.url, 'refs/heads/master')
        words = out.stdout.decode().split()
        return words[0] if words else None

    def commit(self, tree, parent='tip'):
        """A commit of tree; by default on top of what we pushed last (the
        Pipeline's repository starts empty and only we push to it)."""
        if parent == 'tip':
            parent = self.last
        args = ['commit-tree', tree, '-m', 'forged']
        if parent:
            args += ['-p', parent]
        return self.git(*args).stdout.decode().strip()

    def push(self, commit, ref='refs/heads/master', force=False):
        spec = f'{"+" if force else ""}{commit}:{ref}' if commit else \
            f':{ref}'
        return self.git('push', '--quiet', self.url, spec, check=False)

    def push_tree(self, tree):
        commit = self.commit(tree)
        proc = self.push(commit)
        if proc.returncode != 0:
            raise AssertionError('push failed: ' +
                                 proc.stderr.decode(errors='replace'))
        self.last = commit
        return commit


def snapshot(root, allowed):
    """{path: (size, mtime_ns)} of everything under root, except below the
    `allowed` prefixes (the attacked client's own tree, logs, mail)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            if any(path == a or path.startswith(a + os.sep) for a in allowed) \
                    or name == '.lock':     # run locks every pool it reads
                continue
            st = os.lstat(path)
            out[path] = (st.st_size, st.st_mtime_ns if not
                         os.path.isdir(path) else 0)
    return out


class HostileTestCase(unittest.TestCase):
    extra_config = ''

    def setUp(self):
        self.p = Pipeline(self, extra_config=self.extra_config)
        self.forge = Forger(self.p)
        n = self.p.node_dir
        # Another client with a repository, a pool and stored data.
        code = ('import sys; sys.path.insert(0, sys.argv[1]); import server; '
                'from modules._core import Config; '
                'server.Node(Config(sys.argv[2])).ensure_repository(sys.argv[3])')
        subprocess.run([support.PYTHON, '-c', code, support.ROOT,
                        self.p.config, OTHER], check=True, env=self.p.env)
        self.secret = os.path.join(n, 'data', OTHER, 'files', 'app', 'x',
                                   'secret.txt')
        os.makedirs(os.path.dirname(self.secret))
        with open(self.secret, 'w') as f:
            f.write('the other client\'s data\n')
        self.canary = os.path.join(self.p.root, 'pwned')
        self.allowed = [os.path.join(n, 'data', CLIENT),
                        os.path.join(n, 'TODO', CLIENT),
                        os.path.join(n, 'repositories', CLIENT + '.git'),
                        os.path.join(n, 'log'),
                        os.path.join(self.p.root, 'mail'),
                        os.path.join(self.p.root, 'sshd'),
                        os.path.join(self.p.root, 'home'),
                        self.forge.git_dir, self.p.config,
                        # the tests export files there; the node only reads
                        os.path.join(self.p.client_dir, 'export')]
        self.before = snapshot(self.p.root, self.allowed)

    def assert_contained(self):
        """Nothing written outside the attacked client's tree; the other
        client untouched; no command of the attacker ran."""
        after = snapshot(self.p.root, self.allowed)
        changed = sorted(path for path in set(after) | set(self.before)
                         if after.get(path) != self.before.get(path))
        self.assertEqual(changed, [])
        self.assertFalse(os.path.exists(self.canary))

    def node_log(self):
        """The node's logs: server.py.log (run) and, if there is one, the
        git account's (ingest, gate)."""
        text = ''
        for name in ('server.py.log', 'server-git.log'):
            try:
                with open(os.path.join(self.p.node_dir, 'log', name),
                          encoding='utf-8', errors='replace') as f:
                    text += f.read()
            except FileNotFoundError:
                pass
        return text

    def assert_clean_log(self):
        """Log lines carry no control characters from the attacker."""
        text = self.node_log()
        bad = [c for c in text if not c.isprintable() and c != '\n']
        self.assertEqual(bad, [], 'control characters in the node log')

    def pool_names(self):
        return self.p.pool('node')

    def mail_text(self):
        return '\n'.join(m.get_content() for m in self.p.mails())


class HostileTreeTest(HostileTestCase):
    def test_symlink_subtree_gitlink_bad_names_and_10mb_request(self):
        f = self.forge
        valid = f.blob(f'dummy {TS} valid request\n')
        big = f.blob(b'dummy ' + b'x' * (10 << 20) + b'\n')
        # One byte over the default max_request_size (4096).
        just_over = f.blob(b'dummy ' + b'y' * 4090 + b'\n')
        tree = f.tree([
            ('100644', 'blob', valid, 'RQok'),
            ('120000', 'blob', f.blob(self.p.config), 'RQlink'),
            ('120000', 'blob', f.blob(self.secret), 'RQsecret'),
            ('040000', 'tree', f.files({'RQinner': 'dummy x\n'}), 'RQdir'),
            ('160000', 'commit', 'a' * 40, 'RQsub'),
            ('100644', 'blob', big, 'RQbig'),
            ('100644', 'blob', valid, 'RQ\x1b[31mevil\nname'),
            ('100644', 'blob', valid, 'RQ-x.reason'),
            ('100644', 'blob', valid, 'RQx.reason'),
            ('100644', 'blob', just_over, 'RQjustover'),
            ('100644', 'blob', valid, 'notarequest'),
        ])
        commit = f.push_tree(tree)
        names = self.pool_names()
        self.assertEqual(names, [f'RQ{commit}-RQok'])
        log_text = self.node_log()
        self.assertIn('ignored', log_text)
        self.assertIn('RQlink (blob 120000)', log_text)
        self.assertRegex(log_text, r'RQbig: 10485\d+ bytes, more than '
                         r'max_request_size')
        self.assertRegex(log_text, r'RQjustover: 4097 bytes, more than '
                         r'max_request_size')
        self.p.server('run', check=False)
        self.assertEqual(self.p.states('node'), {'F': 1})
        # The admins are told once, in the run's summary mail.
        mails = self.p.mails()
        self.assertEqual(len(mails), 1)
        text = self.mail_text()
        self.assertIn('RQlink (blob 120000)', text)
        self.assertIn('RQbig', text)
        self.assertNotIn('\x1b', text)
        # Told once: the next run does not repeat it.
        self.p.server('run', check=False)
        self.assertEqual(len(self.p.mails()), 1)
        self.assert_clean_log()
        self.assert_contained()

    def test_dotdot_and_dotgit_entries_refused_by_fsck(self):
        f = self.forge
        first = f.push_tree(f.files({'RQok': f'dummy {TS} first\n'}))
        valid = f.blob(f'dummy {TS} valid\n')
        for name in ('..', '.git', '.GIT'):
            kind, mode, sha = ('tree', '040000',
                               f.files({'config': '[core]\n'})) \
                if name.lower() == '.git' else ('blob', '100644', valid)
            tree = f.tree([(mode, kind, sha, name),
                           ('100644', 'blob', valid, 'RQok2')])
            proc = f.push(f.commit(tree))
            self.assertNotEqual(proc.returncode, 0, name)
            self.assertRegex(proc.stderr.decode(errors='replace'),
                             r'(?i)dot|fsck|invalid', name)
        self.assertEqual(f.tip(), first)
        self.assertEqual(self.pool_names(), [f'RQ{first}-RQok'])
        self.assert_contained()

    def test_100000_files_ingest_fast_and_capped(self):
        set_config(self.p, 'server', 'max_requests_per_push', '100')
        f = self.forge
        blob = f.blob(f'dummy {TS} flood\n')
        lines = ''.join(f'100644 blob {blob}\tRQ{i:06d}\n'
                        for i in range(100000))
        tree = f.git('mktree', input=lines.encode()).stdout.decode().strip()
        commit = f.commit(tree)
        start = time.monotonic()
        proc = f.push(commit)
        elapsed = time.monotonic() - start
        self.assertEqual(proc.returncode, 0, proc.stderr)
        # About 2 s alone; the bound catches a per-entry cost (one git
        # process per entry takes minutes), not a loaded machine (5.2 s
        # seen beside seven busy test workers).
        self.assertLess(elapsed, 15.0, 'push + ingest of 100,000 entries')
        self.assertEqual(len(self.pool_names()), 100)
        self.assertIn('(over max_requests_per_push)', self.node_log())
        self.assert_contained()

    def test_flood_of_commits_is_deferred_not_lost(self):
        """max_requests_per_push caps a push, not each commit; the commits
        beyond it are taken in by later ingests, none lost."""
        set_config(self.p, 'server', 'max_requests_per_push', '10')
        f = self.forge
        parent = None
        for n in range(3):
            tree = f.files({f'RQ{n}-{i}': f'dummy {TS} {n} {i}\n'
                            for i in range(6)})
            parent = f.git('commit-tree', tree, '-m', str(n),
                           *(['-p', parent] if parent else [])
                           ).stdout.decode().strip()
        self.assertEqual(f.push(parent).returncode, 0)
        self.assertEqual(len(self.pool_names()), 6)
        self.assertIn('left for the next run', self.node_log())
        for expected in (12, 18, 18):
            self.p.server('ingest', '--repository', self.p.repo, CLIENT)
            self.assertEqual(len(self.pool_names()), expected)
        self.assert_contained()


class HostileRequestTest(HostileTestCase):
    def export_file(self, name, data):
        path = os.path.join(self.p.client_dir, 'export', name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as fh:
            fh.write(data)
        return path, hashlib.sha256(data).hexdigest(), len(data)

    def push_requests(self, requests):
        """{name: line bytes} -> {name: pool key}."""
        files = {f'RQ{name}': line if isinstance(line, bytes)
                 else line.encode() for name, line in requests.items()}
        commit = self.forge.push_tree(self.forge.files(files))
        return {name: f'{commit}-RQ{name}' for name in requests}

    def outcome(self, key):
        pool = os.path.join(self.p.node_dir, 'TODO', CLIENT)
        for state in ('F', 'X', 'P', 'RQ'):
            if os.path.exists(os.path.join(pool, state + key)):
                reason = ''
                if state == 'X':
                    with open(os.path.join(pool, f'X{key}.reason')) as fh:
                        reason = fh.read()
                return state, reason
        return None, ''

    def test_hostile_request_lines(self):
        user = self.p.sshd.user
        export = os.path.join(self.p.client_dir, 'export')
        path, digest, size = self.export_file('good/data.bin',
                                              os.urandom(5000))
        account = f'{user}@127.0.0.1'
        canary = self.canary
        hostile = {
            'dash-url': f'sftp {TS} -oProxyCommand=touch {canary}',
            'dash-url2': f'sftp {TS} -oProxyCommand=touch_{canary}:{path}',
            'ext-url': f'sftp {TS} ext::sh -c touch% {canary}',
            'file-url': f'sftp {TS} file:///etc/passwd',
            'plain-path': f'sftp {TS} {self.secret}',
            'other-user': f'sftp {TS} root2@127.0.0.1:{path}',
            'other-host': f'sftp {TS} {user}@10.1.2.3:{path}',
            'other-port': f'sftp {TS} {user}@127.0.0.1:2222:{path}',
            'dotdot': f'sftp {TS} {account}:{export}/../../node/data/'
                      f'{OTHER}/files/app/x/secret.txt',
            'dotdot2': f'sftp {TS} {account}:{export}/good/..',
            'outside-root': f'sftp {TS} {account}:{self.secret}',
            'the-root': f'sftp {TS} {account}:{export}',
            'prefix-trick': f'sftp {TS} {account}:{export}2/x',
            'bad-time': f'sftp yesterday {account}:{path}',
            'dash-time': f'sftp -{TS} {account}:{path}',
            'option-time': f'sftp -oProxyCommand=x {account}:{path}',
            'control-chars': f'sftp {TS} {account}:{path}\x1b[2J',
            'nul': f'dummy {TS} a\x00b',
            'two-lines': f'dummy {TS} a\ndummy {TS} b',
            'not-utf8': b'dummy \xff\xfe',
            'unknown-module': f'evil {TS} x',
            'module-path': f'../../sftp {TS} {account}:{path}',
            'bad-option': f'sftp {TS} {account}:{path} sha256=zz',
            'quote-in-path': f'sftp {TS} {account}:{export}/a"b',
            'manifest': f'sftp {TS} {account}:{export}/manifest.json',
        }
        if os.path.exists(os.path.join(support.ROOT, 'modules', 'git.py')):
            other_repo = os.path.join(self.p.node_dir, 'repositories',
                                      OTHER + '.git')
            hostile.update({
                'git-dash': f'git -uupload-pack=touch {canary}',
                'git-ext': f'git ext::sh -c touch% {canary}',
                'git-file': f'git file://{other_repo}',
                'git-plain': f'git {other_repo}',
                'git-dotdot': 'git git://127.0.0.1/../x.git',
            })
        valid = {
            'valid-sftp': f'sftp {TS} {account}:{path} sha256={digest} '
                          f'size={size} source=good',
            'valid-dummy': f'dummy {TS} valid',
        }
        keys = self.push_requests({**hostile, **valid})
        proc = self.p.server('run', check=False)
        self.assertEqual(proc.returncode, 1)
        for name in valid:
            self.assertEqual(self.outcome(keys[name])[0], 'F', name)
        [stored] = self.p.stored('good')
        with open(os.path.join(stored, 'data.bin'), 'rb') as fh:
            self.assertEqual(hashlib.sha256(fh.read()).hexdigest(), digest)
        log_text = self.node_log()
        mail = self.mail_text()
        self.assertEqual(len(self.p.mails()), 1)
        for name, key in ((n, keys[n]) for n in hostile):
            state, reason = self.outcome(key)
            self.assertEqual(state, 'X', f'{name}: {state}')
            self.assertIn('refused', reason, name)
            lines = [line for line in log_text.splitlines()
                     if key + ':' in line]
            self.assertEqual(len(lines), 1, f'{name}: {lines}')
            self.assertIn('refused', lines[0], name)
            self.assertIn(key, mail, name)
        self.assert_clean_log()
        self.assert_contained()

    def test_digest_and_size_mismatch(self):
        set_config(self.p, 'server', 'max_attempts', '1')
        user = self.p.sshd.user
        account = f'{user}@127.0.0.1'
        path, digest, size = self.export_file('f.bin', os.urandom(3000))
        huge_path, _, _ = self.export_file('huge.bin', os.urandom(30 << 20))
        keys = self.push_requests({
            'bad-sha': f'sftp {TS} {account}:{path} sha256={"0" * 64} '
                       f'size={size} source=bad',
            'short': f'sftp {TS} {account}:{path} size={size - 1} '
                     'source=bad',
            'long': f'sftp {TS} {account}:{path} size={size + 100} '
                    'source=bad',
            'huge': f'sftp {TS} {account}:{huge_path} size=1000 '
                    'source=bad',
            'ok': f'sftp {TS} {account}:{path} sha256={digest} size={size} '
                  'source=good',
        })
        self.p.server('run', check=False)
        self.assertEqual(self.outcome(keys['ok'])[0], 'F')
        self.assertEqual(len(self.p.stored('good')), 1)
        self.assertEqual(self.p.stored('bad'), [])
        for name in ('bad-sha', 'short', 'long', 'huge'):
            state, reason = self.outcome(keys[name])
            self.assertEqual(state, 'X', name)
            self.assertRegex(reason, r'sha256|bytes', name)
        # A file far larger than announced is cut off, not fetched whole.
        self.assertIn('larger than the 1000 bytes announced; stopped',
                      self.outcome(keys['huge'])[1])
        mail = self.mail_text()
        for name in ('bad-sha', 'short', 'long'):
            self.assertIn(keys[name], mail)
        self.assert_contained()

    def test_quota_and_free_space_floor(self):
        set_config(self.p, f'client {CLIENT}', 'quota', '4K')
        account = f'{self.p.sshd.user}@127.0.0.1'
        path, digest, size = self.export_file('big.bin', os.urandom(20000))
        keys = self.push_requests({
            'announced': f'sftp {TS} {account}:{path} size={size} '
                         'source=q1',
            'unannounced': f'sftp {TS} {account}:{path} source=q2',
            'ok': f'dummy {TS} still processed',
        })
        self.p.server('run', check=False)
        self.assertEqual(self.outcome(keys['ok'])[0], 'F')
        for name in ('announced', 'unannounced'):
            self.assertNotIn(self.outcome(keys[name])[0], ('F', None), name)
        self.assertEqual(self.p.stored('q1') + self.p.stored('q2'), [])
        log_text = self.node_log()
        self.assertRegex(log_text, keys['announced'] + r'.*quota')
        self.assertRegex(log_text, keys['unannounced'] + r'.*(quota|larger'
                         r'|more than)')
        # Nothing of the unannounced file beyond the quota stays on disk.
        self.assertLess(support_dir_size(os.path.join(
            self.p.node_dir, 'data', CLIENT)), 4096 + 20000)
        # The free-space floor.
        set_config(self.p, f'client {CLIENT}', 'quota', '0')
        # Room now, none once this fetch landed: announced the whole file
        # system (never free; more than that is refused at once).
        set_config(self.p, 'server', 'free_space_floor', '1M')
        total = shutil.disk_usage(self.p.node_dir).total
        keys = self.push_requests({
            'floor': f'sftp {TS} {account}:{path} size={total} '
                     'source=q3'})
        self.p.server('run', check=False)
        self.assertEqual(self.outcome(keys['floor']), ('RQ', ''),
                         self.node_log()[-2000:])
        self.assertRegex(self.node_log(),
                         keys['floor'] + r'.*free_space_floor')
        set_config(self.p, 'server', 'free_space_floor', '1000T')
        keys = self.push_requests({
            'floor': f'sftp {TS} {account}:{path} size={size} source=q3'})
        self.p.server('run', check=False)
        self.assertNotIn(self.outcome(keys['floor'])[0], ('F', None))
        self.assertEqual(self.p.stored('q3'), [])
        self.assertRegex(self.node_log(),
                         keys['floor'] + r'.*free_space_floor')
        self.assert_contained()


def support_dir_size(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(root, name)).st_size
    return total


class LedgerTest(HostileTestCase):
    def test_force_push_delete_and_other_branches_refused(self):
        f = self.forge
        first = f.push_tree(f.files({'RQa': f'dummy {TS} a\n'}))
        rewritten = f.commit(f.files({'RQb': f'dummy {TS} b\n'}), parent=None)
        proc = f.push(rewritten, force=True)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn('non-fast-forward', proc.stderr.decode())
        proc = f.push(None)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn('deletion', proc.stderr.decode())
        proc = f.push(first, ref='refs/heads/results')
        self.assertNotEqual(proc.returncode, 0)
        proc = f.push(first, ref='refs/tags/evil')
        self.assertNotEqual(proc.returncode, 0)
        self.assertEqual(f.tip(), first)
        self.assertEqual(self.pool_names(), [f'RQ{first}-RQa'])
        self.assert_contained()

    def test_push_larger_than_max_push_size_refused(self):
        set_config(self.p, 'server', 'max_push_size', '1M')
        self.p.make_repository()  # provisioning applies the new cap
        f = self.forge
        big = f.commit(f.files({'RQa': f'dummy {TS} a\n',
                                'junk': os.urandom(2 << 20)}))
        proc = f.push(big)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn('pack exceeds maximum allowed size', proc.stderr.decode())
        self.assertIsNone(f.tip())
        self.assertEqual(self.pool_names(), [])
        f.push_tree(f.files({'RQb': f'dummy {TS} b\n'}))  # small ones pass
        self.assertEqual(len(self.pool_names()), 1)


if __name__ == '__main__':
    unittest.main()
