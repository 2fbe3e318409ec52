"""Nothing lost, everyone told: fault injection with the real programs.

Crashes are real processes killed with SIGKILL at named points
($GITBACKUP_PAUSE_AT makes a program stop there until killed); outages are
the private sshd stopped and started again; mail is read from the spool.
"""

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline


class Paused:
    """Start a client.py/server.py command that stops at a pause point;
    kill -9 it once it got there."""

    def __init__(self, pipeline, script, point, *args, cwd=None):
        env = {**pipeline.env, 'GITBACKUP_PAUSE_AT': point}
        self.proc = subprocess.Popen(
            [support.PYTHON, os.path.join(support.ROOT, script), '--config',
             pipeline.config, *args], env=env, cwd=cwd,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.point = point
        self.seen = []
        for line in self.proc.stderr:
            self.seen.append(line)
            if f'pausing at {point}' in line:
                break
        else:
            raise AssertionError(f'{script} never reached {point}:\n'
                                 + ''.join(self.seen))

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc.stderr.close()


def write_tree(root, size=1 << 20):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, 'data.bin'), 'wb') as f:
        f.write(os.urandom(size))


class CrashTest(unittest.TestCase):
    """kill -9 at every stage, then normal runs: every request arrives,
    each backup is stored exactly once, partial downloads never count."""

    def setUp(self):
        self.p = Pipeline(self)
        self.src = os.path.join(self.p.root, 'src')
        write_tree(self.src)

    def finish_and_check(self, sends=1):
        for _ in range(sends):
            self.p.client('send')
        self.p.server('run')
        self.assertEqual(self.p.states(), {'F': 1})
        self.assertEqual(self.p.states('node'), {'F': 1})
        stored = self.p.stored('app')
        self.assertEqual(len(stored), 1, stored)
        files = sorted(os.listdir(stored[0]))
        # The archive, its listing (fetched with it) and the manifest.
        self.assertEqual(len(files), 3, files)
        self.assertIn('manifest.json', files)
        self.assertTrue(files[1].endswith(('.tar.zst', '.tar.gz')), files)
        self.assertEqual(files[2], files[1] + '.listing')
        incoming = os.path.join(self.p.node_dir, 'data', CLIENT, 'files',
                                '.incoming')
        self.assertEqual(os.listdir(incoming) if os.path.isdir(incoming)
                         else [], [])

    def test_kill_during_commit(self):
        Paused(self.p, 'client.py', 'commit:written', 'commit', 'app',
               self.src).kill()
        self.assertEqual(list(self.p.states()), ['i'])
        # A complete, fsynced i* file is recovered once it is clearly
        # abandoned (older than a minute).
        [name] = self.p.pool()
        path = os.path.join(self.p.client_dir, 'requests', 'n1', name)
        os.utime(path, (time.time() - 120,) * 2)
        self.finish_and_check()

    def test_torn_request_of_a_killed_commit_is_kept_not_sent(self):
        pool = os.path.join(self.p.client_dir, 'requests', 'n1')
        os.makedirs(pool)
        torn = os.path.join(pool, 'i20260101T000000.000000Z-1-0001')
        with open(torn, 'w') as f:
            f.write(f'app\t{self.src}')  # no final newline: cut short
        os.utime(torn, (time.time() - 120,) * 2)
        self.p.client('send')
        self.assertEqual(self.p.states(), {'i': 1})
        self.assertEqual(self.p.states('node'), {})

    def test_kill_between_claim_and_push(self):
        self.p.client('commit', 'app', self.src)
        Paused(self.p, 'client.py', 'send:prepared', 'send').kill()
        self.assertEqual(self.p.states(), {'P': 1})
        self.finish_and_check()

    def test_kill_after_commit_before_push(self):
        self.p.client('commit', 'app', self.src)
        Paused(self.p, 'client.py', 'send:committed', 'send').kill()
        self.finish_and_check()
        # Exactly one commit reached the node: nothing prepared twice.
        out = subprocess.run(['git', '--git-dir', self.p.repo, 'rev-list',
                              '--count', 'master'], stdout=subprocess.PIPE,
                             text=True, check=True).stdout
        self.assertEqual(out.strip(), '1')

    def test_kill_after_push_before_recording(self):
        self.p.client('commit', 'app', self.src)
        Paused(self.p, 'client.py', 'send:pushed', 'send').kill()
        self.assertEqual(self.p.states(), {'P': 1})
        self.finish_and_check()

    def test_kill_during_ingest(self):
        hook = os.path.join(self.p.repo, 'hooks', 'post-update')
        os.rename(hook, hook + '.off')
        self.p.client('commit', 'app', self.src)
        self.p.client('commit', 'dummy', 'x')
        self.p.client('send')
        Paused(self.p, 'server.py', 'ingest:written', 'ingest', CLIENT,
               cwd=self.p.repo).kill()
        self.assertEqual(self.p.states('node'), {})
        self.p.server('run')  # catches up the interrupted ingest
        self.assertEqual(self.p.states('node'), {'F': 2})
        self.assertEqual(len(self.p.stored('app')), 1)
        self.assertFalse(os.path.exists(os.path.join(
            self.p.node_dir, 'TODO', CLIENT, '.incomplete')))

    def test_kill_during_download(self):
        self.p.client('commit', 'app', self.src)
        self.p.client('send')
        Paused(self.p, 'server.py', 'run:downloaded', 'run').kill()
        self.assertEqual(self.p.stored('app'), [])  # a .part is not stored
        verify = self.p.server('verify', check=False)
        self.assertEqual(verify.returncode, 0, verify.stdout + verify.stderr)
        self.assertNotIn('.incoming', verify.stdout + verify.stderr)
        self.finish_and_check(sends=0)

    def test_kill_while_writing_manifest(self):
        self.p.client('commit', 'app', self.src)
        self.p.client('send')
        paused = Paused(self.p, 'server.py', 'run:manifest', 'run')
        # The manifest is complete before the backup is renamed into place.
        incoming = os.path.join(self.p.node_dir, 'data', CLIENT, 'files',
                                '.incoming')
        [staged] = os.listdir(incoming)
        self.assertIn('manifest.json', os.listdir(os.path.join(incoming,
                                                                staged)))
        paused.kill()
        self.assertEqual(self.p.stored('app'), [])
        self.finish_and_check(sends=0)

    def test_kill_after_storing(self):
        self.p.client('commit', 'app', self.src)
        self.p.client('send')
        Paused(self.p, 'server.py', 'run:stored', 'run').kill()
        self.assertEqual(len(self.p.stored('app')), 1)
        self.finish_and_check(sends=0)


class OutageTest(unittest.TestCase):
    def setUp(self):
        self.p = Pipeline(self, extra_config='')
        # Alert at the first failure so the test needs no waiting.
        with open(self.p.config) as f:
            text = f.read()
        text = text.replace('[client]\n', '[client]\nalert_after = 0\n', 1)
        text = text.replace('[server]\n', '[server]\nalert_after = 0\n', 1)
        with open(self.p.config, 'w') as f:
            f.write(text)

    def subjects(self):
        return [m['Subject'] for m in self.p.mails()]

    def test_node_down_during_send(self):
        self.p.sshd.stop()
        for i in range(3):
            self.p.client('commit', 'dummy', f'r{i}')
            self.assertEqual(self.p.client('send', check=False).returncode, 1)
        self.p.sshd.start()
        self.p.client('send')
        self.p.client('send')
        self.assertEqual(self.subjects(), [
            'gitbackup: pushing to node n1 failing',
            'gitbackup: pushing to node n1 recovered'])
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 3})

    def test_sshd_stopped_in_the_middle_of_send_and_download(self):
        """sshd goes away while send is between commit and push, and again
        while run is downloading: nothing is lost, nothing half-stored,
        one mail each way per peer."""
        with open(self.p.config) as f:
            text = f.read()
        with open(self.p.config, 'w') as f:
            f.write(text.replace('[client]\n', '[client]\ncompression = '
                                 'none\n', 1))
        src = os.path.join(self.p.root, 'src')
        write_tree(src, 300 << 20)
        self.p.client('commit', 'app', src)
        env = {**self.p.env, 'GITBACKUP_PAUSE_AT': 'send:committed',
               'GITBACKUP_PAUSE_SECONDS': '2'}
        send = subprocess.Popen(
            [support.PYTHON, os.path.join(support.ROOT, 'client.py'),
             '--config', self.p.config, 'send'], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for line in send.stderr:
            if 'pausing at send:committed' in line:
                break
        self.p.sshd.stop()
        send.stderr.close()
        self.assertEqual(send.wait(), 1)
        self.assertEqual(self.p.states(), {'P': 1})
        self.p.sshd.start()
        self.p.client('send')
        self.assertEqual(self.p.states(), {'F': 1})

        run = subprocess.Popen(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', self.p.config, 'run'], env=self.p.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        incoming = os.path.join(self.p.node_dir, 'data', CLIENT, 'files',
                                '.incoming')
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            parts = [os.path.join(d, n) for d, _, names in os.walk(incoming)
                     for n in names if n.endswith('.part')]
            if parts and os.path.getsize(parts[0]) > 0:
                # Cut the connection at once: every process below sshd.
                children = support._children_map()
                todo, tree = [self.p.sshd.process.pid], []
                while todo:
                    for child in children.get(todo.pop(), ()):
                        tree.append(child)
                        todo.append(child)
                for pid in tree:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                break
            time.sleep(0.01)
        else:
            self.fail('the download never started')
        self.p.sshd.stop()
        self.assertEqual(run.wait(), 1)
        self.assertEqual(self.p.stored('app'), [])
        self.assertEqual(self.p.states('node'), {'RQ': 1})
        self.p.sshd.start()
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 1})
        [stored] = self.p.stored('app')
        self.assertEqual(self.subjects(), [
            'gitbackup: pushing to node n1 failing',
            'gitbackup: pushing to node n1 recovered',
            f'gitbackup: fetching from client {CLIENT} failing',
            f'gitbackup: fetching from client {CLIENT} recovered'],
            self.p.node_log())

    def test_client_down_during_run(self):
        src = os.path.join(self.p.root, 'src')
        write_tree(src)
        self.p.client('commit', 'app', src)
        self.p.client('send')
        self.p.sshd.stop()
        for _ in range(3):  # far beyond max_attempts would not matter
            self.assertEqual(self.p.server('run', check=False).returncode, 1)
        self.assertEqual(self.p.states('node'), {'RQ': 1})
        self.p.sshd.start()
        self.p.server('run')
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 1})
        self.assertEqual(len(self.p.stored('app')), 1)
        self.assertEqual(self.subjects(), [
            f'gitbackup: fetching from client {CLIENT} failing',
            f'gitbackup: fetching from client {CLIENT} recovered'])

    def test_corrupt_download_retried_then_given_up(self):
        with open(self.p.config) as f:
            text = f.read()
        with open(self.p.config, 'w') as f:
            f.write(text.replace('[server]\n', '[server]\nmax_attempts = 2\n',
                                 1))
        src = os.path.join(self.p.root, 'src')
        write_tree(src)
        self.p.client('commit', 'app', src)
        self.p.client('send')
        export = os.path.join(self.p.client_dir, 'export')
        [request_dir] = os.listdir(export)
        [archive] = [n for n in os.listdir(os.path.join(export, request_dir))
                     if n.endswith(('.tar.gz', '.tar.zst'))]
        path = os.path.join(export, request_dir, archive)
        with open(path, 'r+b') as f:  # same size, different bytes
            f.seek(100)
            f.write(b'\0' * 16)
        proc = self.p.server('run', check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('does not match', proc.stderr)
        self.assertEqual(self.p.states('node'), {'RQ': 1})
        self.assertEqual(self.subjects(), [])  # a retry is no news yet
        self.p.server('run', check=False)
        self.assertEqual(self.p.states('node'), {'X': 1, 'reason': 1})
        self.assertEqual(self.p.stored('app'), [])
        [mail] = self.p.mails()
        self.assertIn('given up', mail.get_content())
        # The client learns that its request failed.
        self.p.client('send')
        self.assertIn('node failed 1', self.p.client('status').stdout)

    def test_free_space_floor(self):
        with open(self.p.config) as f:
            text = f.read()
        with open(self.p.config, 'w') as f:
            f.write(text.replace('free_space_floor = 0',
                                 'free_space_floor = 1000000T'))
        src = os.path.join(self.p.root, 'src')
        write_tree(src)
        self.p.client('commit', 'app', src)
        self.p.client('send')
        for _ in range(3):
            proc = self.p.server('run', check=False)
            self.assertEqual(proc.returncode, 1)
            self.assertIn('free_space_floor', proc.stderr)
        self.assertEqual(self.p.states('node'), {'RQ': 1})  # kept
        self.assertEqual(self.p.stored('app'), [])
        self.assertEqual(self.subjects(),
                         [f'gitbackup: storing backups of {CLIENT} failing'])
        with open(self.p.config, 'w') as f:
            f.write(text)
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 1})
        self.assertEqual(self.subjects()[-1],
                         f'gitbackup: storing backups of {CLIENT} recovered')

    def test_mail_failure_is_queued_and_retried(self):
        with open(self.p.config) as f:
            text = f.read()
        port = support.free_port()  # nothing listens there
        broken = text.replace('method = spool', f'method = smtp\n'
                              f'smtp = 127.0.0.1:{port}')
        with open(self.p.config, 'w') as f:
            f.write(broken)
        self.p.sshd.stop()
        self.p.client('commit', 'dummy', 'x')
        self.p.client('send', check=False)
        queue = os.path.join(self.p.client_dir, 'log', 'mail-queue')
        self.assertEqual(len(os.listdir(queue)), 1)
        with open(self.p.config, 'w') as f:
            f.write(text)
        self.p.sshd.start()
        self.p.client('send')
        self.assertEqual([n for n in os.listdir(queue)
                          if not n.startswith('.')], [])
        self.assertEqual(self.subjects(), [
            'gitbackup: pushing to node n1 failing',
            'gitbackup: pushing to node n1 recovered'])


class WaitingTest(unittest.TestCase):
    """What is nobody's fault waits without using up attempts, and quietly:
    cron (-q) prints nothing while the admins get their one mail."""

    def setUp(self):
        self.p = Pipeline(self)

    def set(self, section, key, value):
        with open(self.p.config) as f:
            text = f.read()
        with open(self.p.config, 'w') as f:
            f.write(text.replace(f'[{section}]\n',
                                 f'[{section}]\n{key} = {value}\n', 1))

    def test_exports_survive_a_long_outage(self):
        """export_keep counts from the push: a node offline longer than
        export_keep still finds every file when it comes back."""
        self.set('client', 'export_keep', '3')
        src = os.path.join(self.p.root, 'src')
        write_tree(src)
        # A client that has sent before (its ledger continues the node's).
        self.p.client('commit', 'dummy', 'before')
        self.p.client('send')
        self.p.sshd.stop()
        self.p.client('commit', 'app', src)
        for _ in range(2):
            proc = self.p.client('-q', 'send', check=False)
            self.assertEqual(proc.returncode, 1)
            self.assertEqual(proc.stderr, '')  # cron mails nothing
        time.sleep(3.5)
        self.p.client('send', check=False)
        export = os.path.join(self.p.client_dir, 'export')
        self.assertEqual(len(os.listdir(export)), 1)
        self.p.sshd.start()
        self.p.client('send')
        self.p.server('run')
        self.assertEqual(len(self.p.stored('app')), 1)
        self.assertEqual(self.p.states('node'), {'F': 2})

    def test_node_misconfiguration_waits_and_alerts_once(self):
        self.set('server', 'max_attempts', '1')
        with open(self.p.config) as f:
            good = f.read()
        with open(self.p.config, 'w') as f:
            f.write(good.replace(f'sftp_root = {self.p.client_dir}/export\n',
                                 ''))
        src = os.path.join(self.p.root, 'src')
        write_tree(src)
        self.p.client('commit', 'app', src)
        self.p.client('send')
        for _ in range(3):
            proc = self.p.server('-q', 'run', check=False)
            self.assertEqual(proc.returncode, 1)
            self.assertEqual(proc.stderr, '')
        self.assertEqual(self.p.states('node'), {'RQ': 1})
        subjects = [m['Subject'] for m in self.p.mails()]
        self.assertEqual(subjects, [
            f'gitbackup: the node configuration for client {CLIENT} '
            'failing'])
        with open(self.p.config, 'w') as f:
            f.write(good)
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 1})
        self.assertEqual(self.p.mails()[-1]['Subject'],
                         f'gitbackup: the node configuration for client '
                         f'{CLIENT} recovered')

    def test_big_batches_are_split_and_all_arrive(self):
        self.set('client', 'max_batch', '2')
        self.set('server', 'max_requests_per_push', '3')
        for i in range(7):
            self.p.client('commit', 'dummy', f'r{i}')
        self.p.client('send')
        commits = subprocess.run(
            ['git', '--git-dir', self.p.repo, 'rev-list', '--count',
             'master'], stdout=subprocess.PIPE, text=True, check=True)
        self.assertEqual(commits.stdout.strip(), '4')
        # The hook took what one push may carry; runs catch up the rest.
        self.assertLessEqual(len(self.p.pool('node')), 3)
        for _ in range(3):
            self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 7})


class ClientGiveUpTest(unittest.TestCase):
    def test_module_failing_max_attempts_times_becomes_x(self):
        """A request whose module keeps failing is retried by later sends
        and, after [client] max_attempts, kept as X* and mailed."""
        p = Pipeline(self)
        modules = os.path.join(p.root, 'modules')
        shutil.copytree(os.path.join(support.ROOT, 'modules'), modules)
        with open(os.path.join(modules, 'broken'), 'w') as f:
            f.write('#!/bin/sh\necho "cannot read $2" >&2\nexit 1\n')
        os.chmod(os.path.join(modules, 'broken'), 0o755)
        with open(p.config) as f:
            text = f.read()
        with open(p.config, 'w') as f:
            f.write(text.replace('[client]\n', f'[client]\nmax_attempts = 2'
                                 f'\nmodules_dir = {modules}\n', 1)
                    .replace('[modules]\n', '[modules]\nbad = broken\n'))
        thing = os.path.join(p.root, 'thing')
        open(thing, 'w').close()
        p.client('commit', 'bad', thing)
        self.assertEqual(p.client('send', check=False).returncode, 1)
        self.assertEqual(p.states(), {'C': 1})
        self.assertEqual(p.mails(), [])  # a retry is no news yet
        self.assertEqual(p.client('send', check=False).returncode, 1)
        # Given up: X* with its reason beside it (as on the node), the
        # request itself unchanged, the attempts counted beside the pool.
        self.assertEqual(p.states(), {'X': 1, 'reason': 1})
        [name] = [n for n in p.pool() if not n.endswith('.reason')]
        pool = os.path.join(p.client_dir, 'requests', 'n1')
        with open(os.path.join(pool, name)) as f:
            self.assertEqual(f.read(), f'bad\t{thing}\n')
        with open(os.path.join(pool, name + '.reason')) as f:
            self.assertIn(f'cannot read {thing}', f.read())
        with open(os.path.join(pool, '.attempts', name[1:])) as f:
            self.assertEqual(json.load(f)['attempts'], 2)
        [mail] = p.mails()
        self.assertIn('given up', mail.get_content())
        self.assertIn(f'cannot read {thing}', mail.get_content())
        self.assertIn(f'cannot read {thing}', p.client('status').stdout)
        p.client('send')  # X* is left alone from now on
        self.assertEqual(p.states(), {'X': 1, 'reason': 1})


class ConcurrencyTest(unittest.TestCase):
    def setUp(self):
        self.p = Pipeline(self)

    def test_commits_during_send(self):
        for i in range(5):
            self.p.client('commit', 'dummy', f'before-{i}')
        threads = [threading.Thread(target=self.p.client,
                                    args=('commit', 'dummy', f'during-{i}'))
                   for i in range(10)]
        send = threading.Thread(target=self.p.client, args=('send',))
        send.start()
        for t in threads:
            t.start()
        for t in threads + [send]:
            t.join()
        self.p.client('send')
        self.assertEqual(self.p.states(), {'F': 15})
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 15})

    def test_two_runs_together(self):
        src = os.path.join(self.p.root, 'src')
        write_tree(src, 8 << 20)
        self.p.client('commit', 'app', src)
        self.p.client('send')
        procs = [subprocess.Popen(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', self.p.config, 'run'], env=self.p.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
        outs = [p.communicate() for p in procs]
        self.assertEqual([p.returncode for p in procs], [0, 0], outs)
        self.assertTrue(any('another run' in err for _, err in outs), outs)
        self.assertEqual(self.p.states('node'), {'F': 1})
        self.assertEqual(len(self.p.stored('app')), 1)

    def test_two_sends_together(self):
        self.p.client('commit', 'dummy', 'x')
        procs = [subprocess.Popen(
            [support.PYTHON, os.path.join(support.ROOT, 'client.py'),
             '--config', self.p.config, 'send'], env=self.p.env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
        outs = [p.communicate() for p in procs]
        self.assertEqual([p.returncode for p in procs], [0, 0], outs)
        self.p.client('send')
        self.assertEqual(self.p.states(), {'F': 1})
        self.p.server('run')
        self.assertEqual(self.p.states('node'), {'F': 1})


if __name__ == '__main__':
    unittest.main()
