"""The core pipeline end to end: commit -> send -> push -> post-update hook
-> ingest -> run -> sftp pull -> restore, on real git, sshd, sftp and tar."""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import time
import unittest

from tests import support
from tests.pipeline import CLIENT, NODE, Pipeline


def make_tree(root):
    """A tree with what trips up backups: nesting, a symlink, an empty file,
    spaces and non-ASCII in names, an executable, and a 50 MB file."""
    os.makedirs(os.path.join(root, 'a', 'b', 'c'))
    with open(os.path.join(root, 'a', 'b', 'c', 'deep.txt'), 'w') as f:
        f.write('deep\n')
    open(os.path.join(root, 'empty'), 'w').close()
    with open(os.path.join(root, 'a', 'name with spaces ünï.txt'), 'w',
              encoding='utf-8') as f:
        f.write('spaces and non-ASCII\n')
    script = os.path.join(root, 'run.sh')
    with open(script, 'w') as f:
        f.write('#!/bin/sh\necho hello\n')
    os.chmod(script, 0o755)
    os.symlink('a/b/c/deep.txt', os.path.join(root, 'link'))
    os.chmod(os.path.join(root, 'a', 'b'), 0o750)
    with open(os.path.join(root, 'big.bin'), 'wb') as f:
        block = os.urandom(1 << 20)
        for i in range(50):
            f.write(block[i:] + block[:i])


def snapshot(root):
    """{relative path: (type, mode, content digest or link target)}."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ('link', os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ('dir', stat.S_IMODE(st.st_mode))
            else:
                digest = hashlib.sha256()
                with open(path, 'rb') as f:
                    for chunk in iter(lambda: f.read(1 << 20), b''):
                        digest.update(chunk)
                out[rel] = ('file', stat.S_IMODE(st.st_mode),
                            digest.hexdigest())
    return out


class PipelineTest(unittest.TestCase):
    def setUp(self):
        self.p = Pipeline(self)

    def test_tree_round_trip(self):
        src = os.path.join(self.p.root, 'src')
        make_tree(src)
        self.p.client('commit', 'app', src)
        self.assertEqual(self.p.states(), {'C': 1})
        self.p.client('send')
        self.assertEqual(self.p.states(), {'F': 1})
        # The real post-update hook ran ingest over ssh.
        self.assertEqual(self.p.states('node'), {'RQ': 1})
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 1})
        stored = self.p.stored('app')
        self.assertEqual(len(stored), 1)
        with open(os.path.join(stored[0], 'manifest.json')) as f:
            manifest = json.load(f)
        # The archive and, beside it, tar's listing of it.
        [entry, listing] = manifest['files']
        self.assertEqual(listing['name'], entry['name'] + '.listing')
        archive = os.path.join(stored[0], entry['name'])
        # compression = auto: zstd where tar and zstd support it.
        self.assertTrue(archive.endswith(('.tar.zst', '.tar.gz')))
        with open(archive, 'rb') as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(),
                             entry['sha256'])
        self.assertEqual(os.path.getsize(archive), entry['size'])
        restored = os.path.join(self.p.root, 'restored')
        os.mkdir(restored)
        subprocess.run(['tar', '-xf', archive, '-C', restored], check=True)
        self.assertEqual(snapshot(restored), snapshot(src))
        self.assertEqual(manifest['client'], CLIENT)
        self.assertTrue(manifest['request'].endswith('-fs'))
        # The node reports back; the client learns it and drops its export.
        export = os.path.join(self.p.client_dir, 'export')
        self.assertEqual(len(os.listdir(export)), 1)
        self.p.client('send')
        self.assertEqual(os.listdir(export), [])
        status = self.p.client('status').stdout
        self.assertIn('node stored 1, node failed 0, not yet confirmed 0',
                      status)
        self.assertIn(stored[0], status)
        # A run with nothing new publishes nothing again.
        count = ['git', '--git-dir', self.p.repo, 'rev-list', '--count',
                 'refs/heads/results']
        before = subprocess.run(count, stdout=subprocess.PIPE, text=True,
                                check=True).stdout
        self.p.server('run')
        self.assertEqual(subprocess.run(count, stdout=subprocess.PIPE,
                                        text=True, check=True).stdout, before)

    def test_memory_stays_flat(self):
        """Data is streamed, never held whole: backing up a 64 MiB file
        peaks well below 64 MiB in every process (Python, tar, git, ssh,
        sftp) of send and of run."""
        src = os.path.join(self.p.root, 'src')
        os.makedirs(src)
        with open(os.path.join(src, 'big.bin'), 'wb') as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
        self.p.client('commit', 'app', src)
        measure = ('import resource, subprocess, sys\n'
                   'rc = subprocess.run(sys.argv[1:]).returncode\n'
                   'print("PEAK_KB", resource.getrusage('
                   'resource.RUSAGE_CHILDREN).ru_maxrss)\n'
                   'sys.exit(rc)\n')
        for script, command in (('client.py', 'send'), ('server.py', 'run')):
            proc = subprocess.run(
                [support.PYTHON, '-c', measure, support.PYTHON,
                 os.path.join(support.ROOT, script), '--config',
                 self.p.config, command], env=self.p.env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.assertEqual(proc.returncode, 0, proc.stderr)
            peak_mib = int(proc.stdout.split('PEAK_KB')[-1]) / 1024
            self.assertLess(peak_mib, 60, f'{script} {command}')
        [stored] = self.p.stored('app')
        self.assertEqual(self.p.states('node'), {'F': 1})

    def test_node_offline_then_back(self):
        """Two sends while sshd is down keep every request; once it is back
        one send delivers them all (several commits in one push), none
        twice.  (A client whose ledger is still empty sends nothing while
        the node is away: test_durability.LostQueueWhileNodeDownTest.)"""
        self.p.client('commit', 'dummy', 'online')
        self.p.client('send')
        self.p.sshd.stop()
        for i in range(2):
            self.p.client('commit', 'dummy', f'offline-{i}')
            proc = self.p.client('send', check=False)
            self.assertEqual(proc.returncode, 1, proc.stderr)
            self.assertIn('push to n1 failed', proc.stderr)
        self.assertEqual(self.p.states(), {'F': 1, 'P': 2})
        self.assertIn('failing since', self.p.client('status').stdout)
        self.p.sshd.start()
        self.p.client('send')
        self.assertEqual(self.p.states(), {'F': 3})
        queue = os.path.join(self.p.client_dir, 'queues', NODE + '.git')
        commits = subprocess.run(
            ['git', '--git-dir', self.p.repo, 'rev-list', 'master'],
            stdout=subprocess.PIPE, check=True, text=True).stdout.split()
        self.assertEqual(len(commits), 3)
        self.assertEqual(commits, subprocess.run(
            ['git', '--git-dir', queue, 'rev-list', 'master'],
            stdout=subprocess.PIPE, check=True, text=True).stdout.split())
        self.assertEqual(self.p.states('node'), {'RQ': 3})
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 3})
        status = self.p.client('status').stdout
        self.assertIn('finished    3', status)
        self.assertNotIn('failing since', status)

    def test_lost_queue_repository_continues_the_ledger(self):
        """The node refuses rewinds; a client whose queue repository was
        lost picks up the node's history and goes on."""
        self.p.client('commit', 'dummy', 'before')
        self.p.client('send')
        queue = os.path.join(self.p.client_dir, 'queues', NODE + '.git')
        shutil.rmtree(queue)
        self.p.client('commit', 'dummy', 'after')
        self.p.client('send')
        self.assertEqual(self.p.states(), {'F': 2})
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 2})

    def test_executable_module_and_one_that_sends_nothing(self):
        """A module may be any executable: $1 module, $2 path, server
        requests as 'ID CONTENT' lines on stdout.  One that sends nothing
        is confirmed locally, not left looking lost."""
        modules = os.path.join(self.p.root, 'modules')
        shutil.copytree(os.path.join(support.ROOT, 'modules'), modules)
        with open(os.path.join(modules, 'notes'), 'w') as f:
            f.write('#!/bin/sh\nset -e\n'
                    'f="$GITBACKUP_EXPORT_DIR/notes.txt"\n'
                    'cp "$2" "$f"\n'
                    'sum=$(sha256sum "$f" | cut -d" " -f1)\n'
                    'size=$(stat -c %s "$f")\n'
                    'echo "notes sftp $GITBACKUP_TIMESTAMP '
                    '$GITBACKUP_SFTP_EXPORT:$f sha256=$sum size=$size '
                    'source=$1"\n')
        with open(os.path.join(modules, 'nothing'), 'w') as f:
            f.write('#!/bin/sh\nexit 0\n')
        for name in ('notes', 'nothing'):
            os.chmod(os.path.join(modules, name), 0o755)
        with open(self.p.config) as f:
            text = f.read()
        with open(self.p.config, 'w') as f:
            f.write(text.replace('[client]\n', f'[client]\nmodules_dir = '
                                 f'{modules}\n', 1).replace(
                '[modules]\n', '[modules]\nmemo = notes\nempty = nothing\n'))
        memo = os.path.join(self.p.root, 'memo.txt')
        with open(memo, 'w') as f:
            f.write('remember the milk\n')
        self.p.client('commit', 'memo', memo)
        self.p.client('commit', 'empty', memo)
        self.p.client('send')
        self.p.server('run')
        [stored] = self.p.stored('memo')
        with open(os.path.join(stored, 'notes.txt')) as f:
            self.assertEqual(f.read(), 'remember the milk\n')
        self.p.client('send')
        self.assertIn('not yet confirmed 0', self.p.client('status').stdout)

    def test_ingest_twice_creates_nothing_twice(self):
        self.p.client('commit', 'dummy', 'once')
        self.p.client('send')
        before = self.p.pool('node')
        self.assertEqual(len(before), 1)
        for _ in range(2):
            subprocess.run([support.PYTHON, os.path.join(support.ROOT,
                                                         'server.py'),
                            '--config', self.p.config, 'ingest', CLIENT],
                           cwd=self.p.repo, env=self.p.env, check=True)
        self.assertEqual(self.p.pool('node'), before)
        # Also after the request moved on to F: no new RQ for it.
        self.p.server('run')
        os.unlink(os.path.join(self.p.node_dir, 'TODO', CLIENT, '.ingested'))
        self.p.server('ingest', '--repository', self.p.repo, CLIENT)
        self.assertEqual(self.p.states('node'), {'F': 1})

    def test_kill_run_while_processing(self):
        """kill -9 of run while a request is P*: the next run completes it,
        and the backup is stored once."""
        src = os.path.join(self.p.root, 'src')
        os.makedirs(src)
        with open(os.path.join(src, 'f'), 'wb') as f:
            f.write(os.urandom(1 << 20))
        self.p.client('commit', 'app', src)
        self.p.client('send')
        env = {**self.p.env, 'GITBACKUP_PAUSE_AT': 'run:stored'}
        proc = subprocess.Popen(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', self.p.config, 'run'], env=env,
            stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.p.states('node').get('P') and self.p.stored('app'):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
        self.assertEqual(self.p.states('node'), {'P': 1})
        self.assertEqual(len(self.p.stored('app')), 1)
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 1})
        self.assertEqual(len(self.p.stored('app')), 1)


if __name__ == '__main__':
    unittest.main()
