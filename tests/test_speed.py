"""What the node's speed rests on, checked for correctness, never timed
(timings are bench/'s): one ssh handshake per client per run however many
files it offers, and no connection left behind, even by a killed
transfer."""

import os
import re
import time
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline
from tests.test_compromised import TS, processes_mentioning, set_config


def logins(p):
    """Public-key logins accepted so far by the pipeline's sshd."""
    with open(p.sshd.log, errors='replace') as f:
        return f.read().count('Accepted publickey')


def control_paths(text):
    return set(re.findall(r'ControlPath=(\S+)', text))


class SharedConnectionTest(unittest.TestCase):
    def setUp(self):
        self.p = Pipeline(self)

    def assert_nothing_left(self, stderr):
        paths = control_paths(stderr)
        self.assertTrue(paths, stderr)
        time.sleep(0.3)
        for path in paths:
            self.assertEqual(processes_mentioning(path), [])
            self.assertFalse(os.path.exists(os.path.dirname(path)))
        self.assertEqual(processes_mentioning(str(self.p.sshd.port)), [])

    def test_one_handshake_for_three_requests_with_companions(self):
        p = self.p
        for n in range(3):
            src = os.path.join(p.root, f'src{n}')
            os.makedirs(src)
            with open(os.path.join(src, 'f'), 'w') as f:
                f.write(f'{n}\n' * 1000)
            p.client('commit', 'app', src)
        p.client('send')
        before = logins(p)
        proc = p.server('-v', 'run')
        self.assertEqual(p.states('node'), {'F': 3}, proc.stderr)
        # Six transfers (each archive and its listing), one login.
        self.assertEqual(proc.stderr.count('running: sftp '), 6, proc.stderr)
        self.assertEqual(logins(p) - before, 1, proc.stderr)
        self.assert_nothing_left(proc.stderr)
        p.client('send')        # the results came back over the branch
        self.assertEqual(p.states('client').get('F'), 3, p.pool('client'))

    def test_stalled_transfer_leaves_no_connection(self):
        """A client whose ssh lets the node in but whose sftp server never
        answers: the transfer is killed for making no progress, and
        neither it nor the shared connection is left behind."""
        p = self.p
        mute = support.SSHD(os.path.join(p.root, 'sshd-mute'))
        with open(p.node_key + '.pub') as f:
            mute.add_key(f.read(), 'restrict,command="cat >/dev/null"')
        mute.start()
        self.addCleanup(mute.stop)
        with open(mute.known_hosts) as f, \
                open(p.sshd.known_hosts, 'a') as out:
            out.write(f.read())
        set_config(p, 'server', 'stall_timeout', '2s')
        set_config(p, f'client {CLIENT}', 'sftp_port', str(mute.port))
        path = os.path.join(p.client_dir, 'export', 'f')
        with open(path, 'w') as f:
            f.write('x' * 10)
        pool = os.path.join(p.node_dir, 'TODO', CLIENT)
        os.makedirs(pool, exist_ok=True)
        for n in range(2):
            with open(os.path.join(pool, f'RQ{"0" * 40}-RQ{n}'), 'w') as f:
                f.write(f'sftp {TS} {p.sshd.user}@127.0.0.1:{path} size=10 '
                        f'source=s{n}\n')
        proc = p.server('-v', 'run', check=False)
        self.assertIn('made no progress for 2 s', proc.stderr)
        # The second request waits for the next run: one login in all.
        self.assertEqual(proc.stderr.count('running: sftp '), 1, proc.stderr)
        with open(mute.log, errors='replace') as f:
            self.assertEqual(f.read().count('Accepted publickey'), 1)
        self.assert_nothing_left(proc.stderr)
        self.assertEqual(processes_mentioning(str(mute.port)), [])

    def test_killed_run_leaves_its_connection_to_the_next_run(self):
        """server.py killed with SIGKILL cannot close its shared
        connection (the master is in a process group of its own): the
        next run for that client ends it, and still stores the backup."""
        import subprocess
        p = self.p
        src = os.path.join(p.root, 'src')
        os.makedirs(src)
        with open(os.path.join(src, 'f'), 'w') as f:
            f.write('data\n' * 100)
        p.client('commit', 'app', src)
        p.client('send')
        run = subprocess.Popen(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', p.config, '-v', 'run'],
            env={**p.env, 'GITBACKUP_PAUSE_AT': 'run:downloaded'},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = ''
        for line in run.stderr:
            seen += line
            if 'pausing at run:downloaded' in line:
                break
        run.kill()
        run.wait()
        run.stderr.close()
        [path] = control_paths(seen)
        self.assertNotEqual(processes_mentioning(path), [])
        proc = p.server('run')
        self.assertIn('left by a killed run', proc.stderr)
        time.sleep(0.3)
        self.assertEqual(processes_mentioning(path), [])
        self.assertFalse(os.path.exists(os.path.dirname(path)))
        self.assertEqual(p.states('node'), {'F': 1})
        self.assertEqual(len(p.stored('app')), 1)


if __name__ == '__main__':
    unittest.main()
