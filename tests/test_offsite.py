"""server.py offsite against a real rclone server on loopback.

setUpClass runs the real pipeline twice (commit -> send -> run -> sftp
pull), so the node holds two real snapshots of one source, and adds a real
git mirror.  Every test copies that node, starts its own `rclone serve
sftp` on 127.0.0.1 (user and password) serving an empty directory, and
writes an rclone.conf with that remote (`offsite`) and a crypt remote on
top of it (`secret`); server.py runs as a subprocess, as cron runs it."""

import email
import email.policy
import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline

SOURCE = 'app'
MARKER = 'offsite plaintext marker 7d1f'


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


class RcloneSFTP(support._Server):
    """`rclone serve sftp DIR` on 127.0.0.1:<free port>, user and password."""

    USER, PASSWORD = 'offsite', 'loopback-only-password'

    def __init__(self, served, workdir, env):
        support.require_tools('rclone')
        self.served, self.workdir, self.env = served, workdir, env
        self.port = support.free_port()
        self.log = os.path.join(workdir, 'rclone-serve.log')
        self.process = None

    def start(self):
        # --config /dev/null: the server needs no remote, only its dir.
        argv = ['rclone', '--config', '/dev/null', 'serve', 'sftp',
                self.served, '--addr', f'{support.HOST}:{self.port}',
                '--user', self.USER, '--pass', self.PASSWORD]
        with open(self.log, 'ab') as log:
            offset = log.tell()
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                env=self.env, cwd=self.workdir, start_new_session=True)
        support._running.add(self)
        support._wait_for_log(self.log, offset, 'SFTP server listening',
                              self.process, 60, 'rclone serve sftp')

    def stop(self):
        support._running.discard(self)
        process, self.process = self.process, None
        support._terminate_tree(process)

    def rclone_conf(self, path, env):
        def obscure(secret):
            return subprocess.run(['rclone', 'obscure', secret], env=env,
                                  check=True, stdout=subprocess.PIPE,
                                  universal_newlines=True).stdout.strip()
        with open(path, 'w') as f:
            f.write(textwrap.dedent(f'''\
                [offsite]
                type = sftp
                host = {support.HOST}
                port = {self.port}
                user = {self.USER}
                pass = {obscure(self.PASSWORD)}
                shell_type = unix
                md5sum_command = md5sum
                sha1sum_command = sha1sum

                [secret]
                type = crypt
                remote = offsite:encrypted
                password = {obscure('crypt passphrase of the test')}
                '''))


class OffsiteTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        support.require_tools('rclone', 'git')
        cls.base = tempfile.mkdtemp(prefix='gitbackup-offsite-')
        holder = unittest.TestCase()
        try:
            p = Pipeline(holder)
            src = os.path.join(p.root, 'src')
            os.makedirs(src)
            for n in (1, 2):
                with open(os.path.join(src, 'data.txt'), 'w') as f:
                    f.write(f'{MARKER} {n}\n' * 50)
                p.client('commit', SOURCE, src)
                p.client('send')
                p.server('run')
            assert len(p.stored(SOURCE)) == 2, p.stored(SOURCE)
            shutil.copytree(p.node_dir, os.path.join(cls.base, 'node'),
                            symlinks=True)
            cls.env = p.env
        finally:
            holder.doCleanups()
        cls.env['HOME'] = os.path.join(cls.base, 'home')
        work = os.path.join(cls.base, 'work')
        subprocess.run(['git', 'init', '-q', work], check=True, env=cls.env)
        with open(os.path.join(work, 'README'), 'w') as f:
            f.write(f'{MARKER} in git\n')
        cls.git(work, 'add', 'README')
        cls.git(work, 'commit', '-q', '-m', 'first')
        cls.work = work
        subprocess.run(['git', 'clone', '-q', '--mirror', '--no-local', work,
                        os.path.join(cls.base, 'node', 'data', CLIENT, 'git',
                                     'proj.git')], check=True, env=cls.env)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.base, ignore_errors=True)

    @classmethod
    def git(cls, *args):
        return subprocess.run(['git', '-C', *args], check=True, env=cls.env,
                              stdout=subprocess.PIPE,
                              universal_newlines=True).stdout

    def setUp(self):
        self.root = support.temp_dir(self, 'gitbackup-offsite-test-')
        self.node = os.path.join(self.root, 'node')
        shutil.copytree(os.path.join(self.base, 'node'), self.node,
                        symlinks=True)
        self.served = os.path.join(self.root, 'served')
        os.makedirs(self.served)
        self.rclone = RcloneSFTP(self.served, self.root, self.env)
        self.rclone.start()
        self.addCleanup(self.rclone.stop)
        self.rclone_conf = os.path.join(self.root, 'rclone.conf')
        self.rclone.rclone_conf(self.rclone_conf, self.env)
        self.write_config('offsite:gitbackup')

    def write_config(self, remote, server_extra=''):
        n = self.node
        self.config = os.path.join(self.root, 'backup.ini')
        with open(self.config, 'w') as f:
            f.write(textwrap.dedent(f'''\
                [server]
                name = n1
                admin = node-admin@example.invalid
                alert_after = 0
                todo_dir = {n}/TODO
                data_dir = {n}/data
                log_dir = {n}/log
                repositories = {n}/repositories
                free_space_floor = 0

                [offsite]
                remote = {remote}
                rclone_config = {self.rclone_conf}
                transfers = 2

                [mail]
                method = spool
                spool_dir = {self.root}/mail
                ''').replace('[offsite]', server_extra + '[offsite]'))

    def server(self, *args, status=0):
        proc = subprocess.run(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', self.config, *args], env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
        self.assertEqual(proc.returncode, status,
                         f'server.py {" ".join(args)}:\n{proc.stdout}\n'
                         f'{proc.stderr}')
        return proc

    def snapshots(self):
        return sorted(glob.glob(os.path.join(self.node, 'data', CLIENT,
                                             'files', SOURCE, '*')))

    def remote_files(self, top='gitbackup'):
        base = os.path.join(self.served, top)
        return sorted(os.path.relpath(os.path.join(d, name), base)
                      for d, _, names in os.walk(base) for name in names)

    def journal(self):
        with open(os.path.join(self.node, 'data', CLIENT,
                               'offsite.jsonl')) as f:
            return [json.loads(line) for line in f]

    def expected_files(self, snapshot):
        names = sorted(os.listdir(snapshot))
        rel = os.path.relpath(snapshot, os.path.join(self.node, 'data'))
        return [os.path.join(rel, name) for name in names]

    # -- the tests ----------------------------------------------------------

    def test_copies_verifies_and_then_has_nothing_new(self):
        out = self.server('offsite').stdout
        old, new = self.snapshots()
        files = self.remote_files()
        for snapshot in (old, new):
            for rel in self.expected_files(snapshot):
                self.assertIn(rel, files)
                self.assertEqual(
                    sha256(os.path.join(self.served, 'gitbackup', rel)),
                    sha256(os.path.join(self.node, 'data', rel)))
        bundles = [f for f in files if f.endswith('.bundle')]
        self.assertEqual(len(bundles), 1, files)
        self.assertTrue(bundles[0].startswith(f'{CLIENT}/git/proj.git/'))
        clone = os.path.join(self.root, 'clone')
        subprocess.run(['git', 'clone', '-q', os.path.join(
            self.served, 'gitbackup', bundles[0]), clone], check=True,
            env=self.env)
        with open(os.path.join(clone, 'README')) as f:
            self.assertIn(MARKER, f.read())
        self.assertEqual(out.count('copied '), 3, out)
        entries = len(self.journal())
        again = self.server('offsite')
        self.assertEqual(again.stdout, '')
        self.assertIn('0 copied', again.stderr)
        self.assertEqual(len(self.journal()), entries)
        self.assertEqual(self.remote_files(), files)

    def test_prune_removes_remotely_on_next_run_and_nothing_else(self):
        self.server('offsite')
        old, new = self.snapshots()
        before = self.remote_files()
        gone = self.expected_files(old)
        self.server('prune')     # two on one day: the older goes
        self.assertEqual(self.snapshots(), [new])
        out = self.server('offsite').stdout
        self.assertEqual(self.remote_files(),
                         [f for f in before if f not in gone])
        self.assertRegex(out.strip(), f'^removed {CLIENT}/files/{SOURCE}/'
                         f'{os.path.basename(old)} \\(pruned: [0-9TZ:-]+\\)$')
        removed = [e for e in self.journal() if e['event'] == 'removed']
        self.assertEqual([e['path'] for e in removed],
                         [f'files/{SOURCE}/{os.path.basename(old)}'])
        self.assertEqual(removed[0]['pruned']['event'], 'pruned')

    def test_changed_mirror_gets_a_new_bundle_replacing_the_old(self):
        self.server('offsite')
        self.git(self.work, 'commit', '-q', '--allow-empty', '-m', 'second')
        mirror = os.path.join(self.node, 'data', CLIENT, 'git', 'proj.git')
        subprocess.run(['git', '--git-dir', mirror, 'fetch', '-q', self.work,
                        '+refs/heads/*:refs/heads/*'], check=True,
                       env=self.env)
        first = [f for f in self.remote_files() if f.endswith('.bundle')]
        self.server('offsite')
        bundles = [f for f in self.remote_files() if f.endswith('.bundle')]
        self.assertEqual(len(bundles), 1)
        self.assertNotEqual(bundles, first)
        heads = subprocess.run(
            ['git', 'bundle', 'list-heads',
             os.path.join(self.served, 'gitbackup', bundles[0])],
            check=True, env=self.env, stdout=subprocess.PIPE,
            universal_newlines=True, cwd=mirror).stdout
        self.assertIn(self.git(self.work, 'rev-parse', 'HEAD').strip(), heads)

    def test_crypt_remote_hides_plaintext_and_fetch_proves_sha256(self):
        self.write_config('secret:gitbackup')
        self.server('offsite')
        old, new = self.snapshots()
        stored = os.path.join(self.served, 'encrypted')
        paths = [os.path.join(d, n) for d, _, names in os.walk(stored)
                 for n in names]
        self.assertTrue(paths)
        with open(os.path.join(new, 'manifest.json'), 'rb') as f:
            manifest_text = f.read()
        for path in paths:
            self.assertNotIn('manifest', path)
            self.assertNotIn(os.path.basename(new), path)
            with open(path, 'rb') as f:
                data = f.read()
            self.assertNotIn(MARKER.encode(), data)
            self.assertNotIn(b'"sha256"', data)
            self.assertNotIn(manifest_text[:40], data)
        target = os.path.join(self.root, 'fetched')
        self.server('offsite', '--fetch', CLIENT, SOURCE,
                    os.path.basename(new), target)
        with open(os.path.join(target, 'manifest.json')) as f:
            manifest = json.load(f)
        self.assertTrue(manifest['files'])
        for entry in manifest['files']:
            self.assertEqual(sha256(os.path.join(target, entry['name'])),
                             entry['sha256'])
        self.assertEqual(sorted(os.listdir(target)), sorted(os.listdir(new)))

    def test_restore_from_offsite_after_the_local_copy_is_gone(self):
        """`restore --from offsite` through the crypt remote: the snapshot
        is fetched, proven against its manifest and extracted, though the
        node no longer has it."""
        self.write_config('secret:gitbackup')
        self.server('offsite')
        first = self.snapshots()[0]
        name = os.path.basename(first)
        shutil.rmtree(first)                    # lost on the node
        target = os.path.join(self.root, 'restored')
        self.server('restore', CLIENT, SOURCE, '--from', 'offsite',
                    '--at', name, '--to', target)
        with open(os.path.join(target, 'data.txt')) as f:
            self.assertEqual(f.read(), f'{MARKER} 1\n' * 50)
        # Without --at: the newest snapshot the remote holds.
        newest = os.path.join(self.root, 'newest')
        self.server('restore', CLIENT, SOURCE, '--from', 'offsite',
                    '--to', newest)
        with open(os.path.join(newest, 'data.txt')) as f:
            self.assertEqual(f.read(), f'{MARKER} 2\n' * 50)
        # One stored file, byte for byte (a dump is restored this way).
        last = self.snapshots()[-1]
        with open(os.path.join(last, 'manifest.json')) as f:
            name = json.load(f)['files'][0]['name']
        proc = subprocess.run(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', self.config, 'restore', CLIENT, SOURCE, '--from',
             'offsite', '--file', name, '--stdout'], env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, timeout=300)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with open(os.path.join(last, name), 'rb') as f:
            self.assertEqual(proc.stdout, f.read())

    def test_fetch_refuses_a_file_changed_on_the_remote(self):
        self.server('offsite')
        new = self.snapshots()[-1]
        with open(os.path.join(new, 'manifest.json')) as f:
            name = json.load(f)['files'][0]['name']
        remote = os.path.join(self.served, 'gitbackup', os.path.relpath(
            new, os.path.join(self.node, 'data')), name)
        # Same size, one byte changed: what rclone's own size check cannot
        # see, and the remote's hash follows the changed bytes.
        with open(remote, 'r+b') as f:
            f.seek(os.path.getsize(remote) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xff]))
        target = os.path.join(self.root, 'fetched')
        proc = self.server('offsite', '--fetch', CLIENT, SOURCE,
                           os.path.basename(new), target, status=1)
        self.assertIn(f'{name}: sha256', proc.stderr)

    def test_report_shows_offsite_lag(self):
        report = json.loads(self.server('report', '--format', 'json').stdout)
        lag = report['clients'][0]['offsite']
        self.assertEqual(lag['pending'], 2)
        newest = os.path.basename(self.snapshots()[-1])
        self.assertEqual(lag['newest_pending'], f'files/{SOURCE}/{newest}')
        self.assertIsInstance(lag['newest_pending_age_seconds'], int)
        prom = self.server('report', '--format', 'prometheus').stdout
        self.assertIn(f'gitbackup_offsite_pending_snapshots{{client='
                      f'"{CLIENT}"}} 2\n', prom)
        self.assertRegex(prom, r'gitbackup_offsite_lag_seconds\{client="'
                         + CLIENT + r'"\} \d+\n')
        page = self.server('report', '--format', 'html').stdout
        self.assertIn('offsite: 2 behind, oldest', page)
        self.server('offsite')
        self.assertIn(f'gitbackup_offsite_lag_seconds{{client="{CLIENT}"}} 0\n',
                      self.server('report', '--format', 'prometheus').stdout)
        self.assertIn('offsite up to date',
                      self.server('report', '--format', 'html').stdout)
        text = self.server('report').stdout
        self.assertIn('Offsite (offsite:gitbackup):', text)
        self.assertIn(f'{CLIENT}: up to date', text)
        report = json.loads(self.server('report', '--format', 'json').stdout)
        self.assertEqual(report['clients'][0]['offsite']['pending'], 0)


    # -- deletion only by prune, integrity, outages (issue 18) --------------

    def mails(self):
        out = []
        for path in sorted(glob.glob(os.path.join(self.root, 'mail', '*'))):
            with open(path, 'rb') as f:
                out.append(email.message_from_binary_file(
                    f, policy=email.policy.default))
        return out

    def flip_a_byte(self, remote):
        """Same size, one byte changed: what rclone's size check cannot
        see, and the remote's hash follows the changed bytes."""
        with open(remote, 'r+b') as f:
            f.seek(os.path.getsize(remote) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xff]))

    def test_snapshot_deleted_by_hand_is_kept_remotely_and_reported(self):
        self.server('offsite')
        old, new = self.snapshots()
        before = self.remote_files()
        shutil.rmtree(old)          # a bad sector, an fsck, a mistaken rm
        out = self.server('offsite').stdout
        self.assertNotIn('removed', out)
        self.assertEqual(self.remote_files(), before)
        name = f'files/{SOURCE}/{os.path.basename(old)}'
        text = self.server('report', status=2).stdout
        self.assertIn(name, text)
        self.assertIn('restore it with `server.py restore', text)
        self.assertIn(f'{CLIENT}: 1 kept there, lost here', text)
        self.assertIn('--from offsite', text)
        report = json.loads(self.server('report', '--format', 'json',
                                        status=2).stdout)
        self.assertEqual(report['status'], 'critical')
        self.assertEqual(report['clients'][0]['offsite']['missing'], [name])
        nagios = self.server('report', '--format', 'nagios', status=2).stdout
        self.assertTrue(nagios.startswith('GITBACKUP CRITICAL'), nagios)
        self.assertIn(name, nagios)
        prom = self.server('report', '--format', 'prometheus',
                           status=2).stdout
        self.assertIn(f'gitbackup_client_status{{client="{CLIENT}"}} 2', prom)
        self.assertIn(f'gitbackup_offsite_missing{{client="{CLIENT}"}} 1',
                      prom)
        page = self.server('report', '--format', 'html', status=2).stdout
        self.assertIn(name, page)
        self.assertIn('offsite: 1 kept there, lost here', page)
        # Mailed once, not on every run.
        self.server('offsite')
        mails = [m for m in self.mails() if 'copy of' in m['Subject']]
        self.assertEqual(len(mails), 1, [m['Subject'] for m in mails])
        self.assertIn(name, mails[0].get_content())
        # A second loss is news: one more mail.
        shutil.rmtree(new)
        self.server('offsite')
        self.server('offsite')
        mails = [m for m in self.mails() if 'copy of' in m['Subject']]
        self.assertEqual(len(mails), 2, [m['Subject'] for m in mails])
        self.assertIn(os.path.basename(new), mails[1].get_content())
        # Its index lost too: verify --offsite writes it again from the
        # manifest there, and it is still listed and restorable.
        os.unlink(os.path.join(self.served, 'gitbackup', CLIENT, 'files',
                               SOURCE, 'index.json'))
        self.assertIn('index.json: differs on the remote; written again',
                      self.server('verify', '--offsite', status=1).stdout)
        listed = json.loads(self.server('list', '--from', 'offsite',
                                        '--format', 'json').stdout)
        self.assertIn(os.path.basename(old), [e['snapshot'] for e in listed])
        target = os.path.join(self.root, 'back')
        self.server('restore', CLIENT, SOURCE, '--from', 'offsite', '--at',
                    os.path.basename(old), '--to', target)
        with open(os.path.join(target, 'data.txt')) as f:
            self.assertEqual(f.read(), f'{MARKER} 1\n' * 50)

    def test_a_snapshot_removed_on_purpose_goes_there_too(self):
        """prune --snapshot: data that must go is removed here, journaled
        as prune's decision, and removed on the remote by the next run."""
        self.server('offsite')
        old, new = self.snapshots()
        gone = self.expected_files(new)
        self.server('prune', '--snapshot', CLIENT, SOURCE,
                    os.path.basename(new))
        self.assertEqual(self.snapshots(), [old])
        out = self.server('offsite').stdout
        self.assertIn(f'removed {CLIENT}/files/{SOURCE}/'
                      f'{os.path.basename(new)}', out)
        files = self.remote_files()
        self.assertFalse(set(gone) & set(files), files)
        self.assertEqual(json.loads(self.server(
            'report', '--format', 'json').stdout)['clients'][0]['offsite']
            ['missing'], [])

    def test_mirror_deleted_by_hand_keeps_its_bundle(self):
        self.server('offsite')
        bundles = [f for f in self.remote_files() if f.endswith('.bundle')]
        mirror = os.path.join(self.node, 'data', CLIENT, 'git', 'proj.git')
        head = self.git(mirror, 'rev-parse', 'HEAD')
        shutil.rmtree(mirror)
        self.server('offsite')
        self.assertEqual([f for f in self.remote_files()
                          if f.endswith('.bundle')], bundles)
        report = json.loads(self.server('report', '--format', 'json',
                                        status=2).stdout)
        self.assertEqual(report['clients'][0]['offsite']['missing'],
                         ['git/proj.git'])
        clone = os.path.join(self.root, 'proj.git')
        self.server('restore', CLIENT, 'git/proj', '--from', 'offsite',
                    '--to', clone)
        self.assertEqual(self.git(clone, 'rev-parse', 'HEAD'), head)

    def test_flipped_byte_refused_by_restore_found_and_repaired(self):
        self.server('offsite')
        new = self.snapshots()[-1]
        with open(os.path.join(new, 'manifest.json')) as f:
            name = json.load(f)['files'][0]['name']
        rel = os.path.relpath(new, os.path.join(self.node, 'data'))
        remote = os.path.join(self.served, 'gitbackup', rel, name)
        self.flip_a_byte(remote)
        bundle = [f for f in self.remote_files() if f.endswith('.bundle')][0]
        self.flip_a_byte(os.path.join(self.served, 'gitbackup', bundle))
        proc = self.server('restore', CLIENT, SOURCE, '--from', 'offsite',
                           '--to', os.path.join(self.root, 'x'), status=1)
        self.assertIn('DAMAGED', proc.stderr)
        self.assertIn(name, proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.root, 'x')))
        proc = self.server('restore', CLIENT, 'git/proj', '--from',
                           'offsite', '--to', os.path.join(self.root, 'y'),
                           status=1)
        self.assertIn('DAMAGED', proc.stderr)
        os.unlink(os.path.join(self.served, 'gitbackup', CLIENT, 'git',
                               'proj.git', 'index.json'))
        out = self.server('verify', '--offsite', status=1).stdout
        self.assertIn(f'{rel}: {name} differs on the remote; copied again',
                      out)
        self.assertIn('proj.git/index.json: differs on the remote; written '
                      'again', out)
        self.assertIn('replaced by a new bundle', out)
        self.assertEqual(sha256(remote), sha256(os.path.join(new, name)))
        self.assertIn('0 problem(s)', self.server('verify',
                                                  '--offsite').stdout)
        clone = os.path.join(self.root, 'proj.git')
        self.server('restore', CLIENT, 'git/proj', '--from', 'offsite',
                    '--to', clone)

    def test_crypt_remote_damage_is_found_by_cryptcheck(self):
        self.write_config('secret:gitbackup')
        self.server('offsite')
        stored = os.path.join(self.served, 'encrypted')
        # Below encrypted/: gitbackup/c1/files/app/index.json and
        # gitbackup/c1/files/app/<snapshot>/<file>.
        depth = {}
        for d, _, names in os.walk(stored):
            for n in names:
                level = os.path.relpath(d, stored).count('/') + 1
                depth.setdefault(level, []).append(os.path.join(d, n))
        for level in (4, 5):
            self.flip_a_byte(max(depth[level], key=os.path.getsize))
        out = self.server('verify', '--offsite', status=1).stdout
        self.assertIn('differs on the remote; copied again', out)
        self.assertIn('differs on the remote; written again', out)
        self.assertIn('0 problem(s)', self.server('verify',
                                                  '--offsite').stdout)

    def test_a_remote_that_is_down_costs_one_try_and_one_mail(self):
        self.rclone.stop()
        for _ in range(2):
            proc = self.server('offsite', status=1)
            self.assertEqual(proc.stderr.count('cannot be reached'), 1,
                             proc.stderr)
        # Nothing was started (no attempt per snapshot), one alert mail.
        self.assertFalse(os.path.exists(os.path.join(
            self.node, 'data', CLIENT, 'offsite.jsonl')))
        failing = [m for m in self.mails() if 'failing' in m['Subject']]
        self.assertEqual(len(failing), 1)
        self.assertIn('offsite remote offsite:gitbackup', failing[0]['Subject'])
        # Under cron (-q) an outage prints nothing: the mail tells.
        proc = self.server('-q', 'offsite', status=1)
        self.assertEqual((proc.stdout, proc.stderr), ('', ''))
        self.rclone.start()
        self.server('offsite')
        self.assertEqual(len([m for m in self.mails()
                              if 'recovered' in m['Subject']]), 1)

    def test_a_remote_that_never_answers_costs_one_probe(self):
        """A tarpit (connections accepted, nothing said): one bounded
        probe, not command_timeout per pending snapshot."""
        tarpit = socket.socket()
        self.addCleanup(tarpit.close)
        tarpit.bind((support.HOST, 0))
        tarpit.listen(16)
        with open(self.rclone_conf) as f:
            conf = f.read()
        with open(self.rclone_conf, 'w') as f:
            f.write(conf.replace(f'port = {self.rclone.port}\n',
                                 f'port = {tarpit.getsockname()[1]}\n'))
        self.write_config('offsite:gitbackup', 'command_timeout = 4s\n')
        start = time.monotonic()
        proc = self.server('offsite', status=1)
        self.assertLess(time.monotonic() - start, 3 * 4)
        self.assertEqual(proc.stderr.count('cannot be reached'), 1,
                         proc.stderr)
        self.assertFalse(os.path.exists(os.path.join(
            self.node, 'data', CLIENT, 'offsite.jsonl')))

    def test_check_connect_tests_the_remote_and_mail(self):
        out = self.server('check', '--connect', '--mail-test').stdout
        self.assertIn('OK      offsite remote offsite:gitbackup (list, '
                      'write, read, delete)', out)
        self.assertRegex(out, r'OK      mail to node-admin@example.invalid')
        self.assertTrue(out.rstrip().splitlines()[-1].startswith(
            'looks ready'), out)
        self.assertEqual(len(self.mails()), 1)
        self.assertEqual(self.remote_files(), [])   # scratch removed
        self.rclone.stop()
        proc = self.server('check', '--connect', status=1)
        self.assertIn('FAILED  offsite remote offsite:gitbackup', proc.stdout)
        self.assertIn('rclone --config', proc.stdout)

    def test_quiet_offsite_prints_nothing_but_problems(self):
        proc = self.server('-q', 'offsite')
        self.assertEqual(proc.stdout, '')
        self.assertEqual(proc.stderr, '')
        self.assertTrue(self.remote_files())


if __name__ == '__main__':
    unittest.main()
