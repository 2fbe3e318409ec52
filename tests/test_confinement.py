"""The node's key on a client, really confined (issue 10, item 8).

README "Install a client" step 4 and docs/access-control.md recommend a
dedicated account for the node with an sshd ``Match User`` block:
``ChrootDirectory`` (a root-owned directory holding export_dir),
``ForceCommand internal-sftp -R`` and no forwarding or tty.  This test
builds exactly that with the private sshd (as root: sshd only chroots as
root, and the account is created with useradd and removed afterwards), then
with the node's key and real sftp: export_dir is readable, nothing outside
the chroot is, writes and commands are refused, and a real ``server.py
run`` fetches through it with the client's paths unchanged.  It also shows
what the ``authorized_keys``-only variant does not confine.
"""

import json
import os
import shutil
import subprocess
import tempfile
import unittest

from tests import support
from tests.pipeline import Pipeline
from tests.test_hostile import set_config


def make_chroot(testcase):
    """A chroot that sshd accepts: every component of its path root-owned
    and not writable by group or others (so not below /tmp).  Returns
    (chroot, a root-owned directory beside it for the account's keys)."""
    base = tempfile.mkdtemp(prefix='gitbackup-chroot-', dir='/srv')
    testcase.addCleanup(shutil.rmtree, base, ignore_errors=True)
    os.chmod(base, 0o755)
    chroot = os.path.join(base, 'chroot')
    os.mkdir(chroot, 0o755)
    path = chroot
    while path != '/':
        st = os.stat(path)
        assert st.st_uid == 0 and not st.st_mode & 0o022, path
        path = os.path.dirname(path)
    # Requests name export_dir's real path; inside the chroot that same
    # path leads back to the chroot's root, so they need no translation.
    inside = os.path.join(chroot, chroot.lstrip('/'))
    os.makedirs(os.path.dirname(inside), 0o755)
    os.symlink('/', inside)
    return chroot, base


def add_account(testcase, name, group):
    """A login-less account for the node (password '*', not '!': the test
    sshd runs without PAM and refuses locked accounts)."""
    subprocess.run(['userdel', name], stderr=subprocess.DEVNULL)
    subprocess.run(['useradd', '--no-create-home', '--home-dir', '/',
                    '--shell', '/usr/sbin/nologin', '--gid', str(group),
                    '--password', '*', name], check=True)
    testcase.addCleanup(subprocess.run, ['userdel', name],
                        stderr=subprocess.DEVNULL)


class ChrootedNodeKeyTest(unittest.TestCase):
    def setUp(self):
        support.require_root('sshd chroots only as root; the test creates '
                             'an account')
        support.require_tools('useradd', 'userdel')
        self.p = p = Pipeline(self, start=False)
        self.user = f'gbnode{os.getpid()}'
        # The node's account is in the client account's group: client.py
        # writes export_dir with umask 027 (group-readable).
        add_account(self, self.user, os.getgid())
        self.chroot, base = make_chroot(self)
        self.export = os.path.join(self.chroot, 'export')
        os.mkdir(self.export, 0o750)
        keys = os.path.join(base, 'authorized_keys')
        with open(p.node_key + '.pub') as f, open(keys, 'w') as out:
            out.write(f.read())
        os.chmod(keys, 0o644)
        p.sshd.add_config('\n'.join([
            f'Match User {self.user}',
            f'    AuthorizedKeysFile {keys}',
            f'    ChrootDirectory {self.chroot}',
            '    ForceCommand internal-sftp -R',
            '    AllowTcpForwarding no',
            '    X11Forwarding no',
            '    PermitTTY no']), users=[self.user])
        p.sshd.start()
        self.addCleanup(p.sshd.stop)
        account = f'{self.user}@{support.HOST}'
        for section, key, value in (
                ('client', 'export_dir', self.export),
                ('client', 'sftp_export', account),
                ('server', 'sftp_root', self.export),
                ('client c1', 'sftp', account)):
            set_config(p, section, key, value)

    def sftp(self, batch, user=None):
        p = self.p
        return subprocess.run(
            ['sftp', '-b', '-', '-F', p.sshd.ssh_config, '-i', p.node_key,
             '-P', str(p.sshd.port), f'{user or self.user}@{support.HOST}'],
            input=batch, env=p.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=60)

    def test_node_key_reads_export_dir_only(self):
        p = self.p
        exported = os.path.join(self.export, 'data.txt')
        with open(exported, 'w') as f:
            f.write('exported\n')
        secret = os.path.join(p.root, 'secret')
        with open(secret, 'w') as f:
            f.write('not for the node\n')
        os.chmod(secret, 0o644)
        got = os.path.join(p.root, 'got')
        proc = self.sftp(f'get {exported} {got}\n')
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with open(got) as f:
            self.assertEqual(f.read(), 'exported\n')
        # Outside the chroot: nothing, not even world-readable files.
        for outside in (secret, '/etc/hostname', '/etc/passwd'):
            proc = self.sftp(f'get {outside} {got}.x\n')
            self.assertNotEqual(proc.returncode, 0, outside)
            self.assertIn('not found', proc.stderr)
            self.assertFalse(os.path.exists(got + '.x'))
        # -R: every write refused (root's permissions do not matter).
        proc = self.sftp(f'-put {secret} {self.export}/new\n'
                         f'-rm {exported}\n-mkdir {self.export}/d\n'
                         f'-rename {exported} {exported}.x\n'
                         f'-chmod 777 {exported}\n')
        self.assertEqual(proc.stderr.count('Permission denied'), 5,
                         proc.stderr)
        self.assertEqual(sorted(os.listdir(self.export)), ['data.txt'])
        # No command, no shell: ForceCommand runs the sftp server instead.
        canary = os.path.join(p.root, 'pwned')
        ssh = ['ssh', '-F', p.sshd.ssh_config, '-i', p.node_key, '-p',
               str(p.sshd.port), f'{self.user}@{support.HOST}']
        for command in (['touch', canary], ['-tt'], []):
            proc = subprocess.run(ssh + command, env=p.env,
                                  stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=60)
            self.assertNotEqual(proc.returncode, 0, command)
        self.assertFalse(os.path.exists(canary))

    def test_authorized_keys_only_variant_reads_any_readable_file(self):
        """restrict,command="internal-sftp -R" without the chroot: read
        only, but anything the account may read (what the docs warn of)."""
        p = self.p
        with open(p.sshd.authorized_keys) as f:
            lines = f.read().splitlines()
        with open(p.node_key + '.pub') as f:
            node_blob = f.read().split()[1]
        with open(p.sshd.authorized_keys, 'w') as f:
            f.write(''.join(f'restrict,command="internal-sftp -R" {line}\n'
                            if node_blob in line else line + '\n'
                            for line in lines))
        got = os.path.join(p.root, 'got')
        proc = self.sftp(f'get /etc/hostname {got}\n', user=p.sshd.user)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with open('/etc/hostname') as f, open(got) as g:
            self.assertEqual(g.read(), f.read())

    def test_node_fetches_through_the_chroot(self):
        p = self.p
        src = os.path.join(p.root, 'src')
        os.makedirs(src)
        with open(os.path.join(src, 'f'), 'w') as f:
            f.write('through the chroot\n')
        p.client('commit', 'app', src)
        p.client('send')
        proc = p.server('run')
        self.assertEqual(p.states('node'), {'F': 1}, proc.stderr)
        [stored] = p.stored('app')
        with open(os.path.join(stored, 'manifest.json')) as f:
            archive = os.path.join(stored, json.load(f)['files'][0]['name'])
        restored = os.path.join(p.root, 'restored')
        os.mkdir(restored)
        subprocess.run(['tar', '-xf', archive, '-C', restored], check=True)
        with open(os.path.join(restored, 'f')) as f:
            self.assertEqual(f.read(), 'through the chroot\n')
        # The node's sshd log shows the account chrooted.
        with open(p.sshd.log) as f:
            self.assertIn(f'Accepted publickey for {self.user}', f.read())


if __name__ == '__main__':
    unittest.main()
