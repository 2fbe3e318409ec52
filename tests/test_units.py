"""Fast, in-process tests of pure logic: configuration errors, pools and
their state changes, the retry policy, journals, ledgers, request parsing,
path checks, retention buckets and gate decisions.  No servers; git only
where a ledger needs a repository."""

import datetime
import io
import os
import subprocess
import sys
import tempfile
import textwrap
import unittest

from tests import support

sys.path.insert(0, support.ROOT)
import client  # noqa: E402
import server  # noqa: E402
from modules import _core as core  # noqa: E402

KEY = 'a' * 40 + '-RQ20261126T000000.000000Z-1-0001-fs'


def write_config(directory, text):
    path = os.path.join(directory, 'backup.ini')
    with open(path, 'w') as f:
        f.write(textwrap.dedent(text))
    return path


NODE_CONFIG = '''\
    [server]
    name = n1
    todo_dir = {d}/TODO
    data_dir = {d}/data
    log_dir = {d}/log
    repositories = {d}/repos
    sftp_root = /var/backup/export

    [client c1]
    sftp = backup@c1.example
    '''


class TempDirTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix='gitbackup-unit-')
        self.addCleanup(subprocess.run, ['rm', '-rf', self.tmp])


class ConfigTest(TempDirTest):
    def test_unknown_key_names_its_line(self):
        path = write_config(self.tmp, '[client]\nname = c1\nnmae = x\n')
        with self.assertRaises(core.ConfigError) as caught:
            core.Config(path)
        self.assertIn(f'{path}:3: unknown key \'nmae\' in [client]',
                      str(caught.exception))
        self.assertEqual(caught.exception.exit_code, 2)

    def test_bad_values_are_refused_on_load(self):
        for key, value, words in (('alert_after', '1 hour', 'not a duration'),
                                  ('quota', 'lots', 'not a size'),
                                  ('max_attempts', '-1', 'whole number')):
            path = write_config(self.tmp, NODE_CONFIG.format(d=self.tmp)
                                .replace('[server]\n', f'[server]\n{key} = '
                                         f'{value}\n'))
            with self.assertRaises(core.ConfigError) as caught:
                core.Config(path)
            self.assertIn(f'[server] {key}', str(caught.exception))
            self.assertIn(words, str(caught.exception))

    def test_durations_and_sizes(self):
        self.assertEqual(core.parse_duration('90'), 90)
        self.assertEqual(core.parse_duration('2w'), 1209600)
        self.assertEqual(core.parse_size('10G'), 10 << 30)
        self.assertEqual(core.parse_size('512MB'), 512 << 20)
        for bad in ('', '1.5h', '-3d'):
            with self.assertRaises(ValueError):
                core.parse_duration(bad)

    def test_lookup_order(self):
        env = {'GITBACKUP_CONFIG': '/etc/x.ini'}
        self.assertEqual(core.find_config('/a.ini', '/s/client.py', env),
                         '/a.ini')
        self.assertEqual(core.find_config(None, '/s/client.py', env),
                         '/etc/x.ini')
        self.assertEqual(core.find_config(None, '/s/client.py', {}),
                         '/s/backup.ini')

    def test_clean_text_keeps_one_line(self):
        self.assertEqual(core.clean_text('denied (publickey).\nfatal: x'),
                         'denied (publickey). | fatal: x')
        self.assertEqual(core.clean_text('\x1b]0;owned\x07'), '?]0;owned?')
        # A tab is a space, not '?'; a block keeps its lines, each cleaned.
        self.assertEqual(core.clean_text('a\tb'), 'a b')
        self.assertEqual(core.clean_text('x\x1b[2J\r\ny\n', None, True),
                         'x?[2J?\ny\n')


class PoolTest(TempDirTest):
    def node_pool(self):
        return core.Pool(self.tmp, server.NODE_STATES, server.KEY_RE)

    def test_split_names(self):
        pool = self.node_pool()
        self.assertEqual(pool.split('RQ' + KEY), ('RQ', KEY))
        self.assertEqual(pool.split('P' + KEY), ('P', KEY))
        self.assertEqual(pool.split('X' + KEY + '.reason'), (None, None))
        self.assertEqual(pool.split('R' + KEY), (None, None))
        self.assertEqual(pool.split('.lock'), (None, None))
        self.assertEqual(pool.split('RQ../etc'), (None, None))

    def test_move_is_the_only_state_change_and_races_are_not_errors(self):
        pool = self.node_pool()
        open(pool.file('RQ', KEY), 'w').close()
        self.assertTrue(pool.move(KEY, 'RQ', 'P'))
        self.assertFalse(pool.move(KEY, 'RQ', 'P'))   # taken by another
        self.assertEqual(pool.list(), {'RQ': [], 'P': [KEY], 'F': [],
                                       'X': []})

    def test_attempts_give_up_after_the_limit_with_the_reason(self):
        pool = self.node_pool()
        open(pool.file('P', KEY), 'w').close()
        attempts = core.Attempts(pool, 2)
        self.assertEqual(attempts.failed(KEY, 'first\nline'), (1, False))
        self.assertEqual(attempts.failed(KEY, 'again'), (2, True))
        attempts.give_up(KEY, 'P', 'failed 2 times')
        self.assertEqual(pool.list()['X'], [KEY])
        self.assertTrue(attempts.reason(KEY).endswith('failed 2 times'))

    def test_client_pool_ids(self):
        pool = core.Pool(self.tmp, client.CLIENT_STATES, core.REQUEST_ID_RE)
        request_id = core.new_request_id()
        self.assertEqual(pool.split('C' + request_id), ('C', request_id))
        self.assertEqual(pool.split('C' + request_id + 'x'), (None, None))


class JournalTest(TempDirTest):
    def test_torn_line_is_skipped_and_the_next_entry_kept(self):
        journal = core.Journal(os.path.join(self.tmp, 'results.jsonl'))
        journal.append([{'request': 'a', 'outcome': 'stored'}])
        with open(journal.path, 'a') as f:
            f.write('{"request": "b", "outc')     # power lost here
        journal.append([{'request': 'c', 'outcome': 'stored'}])
        entries, offset = journal.read()
        self.assertEqual([e['request'] for e in entries], ['a', 'c'])
        self.assertEqual(offset, os.path.getsize(journal.path))
        self.assertEqual(journal.read(offset), ([], offset))

    def test_a_line_being_written_waits(self):
        journal = core.Journal(os.path.join(self.tmp, 'results.jsonl'))
        with open(journal.path, 'w') as f:
            f.write('{"request": "a"}\n{"request": ')
        entries, offset = journal.read()
        self.assertEqual(entries, [{'request': 'a'}])
        self.assertEqual(offset, len('{"request": "a"}\n'))


class LedgerTest(TempDirTest):
    def test_append_and_since(self):
        support.require_tools('git')
        repo = os.path.join(self.tmp, 'q.git')
        core.git(repo, 'init', '--quiet', '--bare')
        ledger = core.Ledger(repo, 'refs/heads/master', 'c1')
        self.assertEqual(ledger.since(''), [])
        first = ledger.append([('RQ1-a', 'x\n')], 'one\n')
        second = ledger.append([('RQ2-a', 'y\n')], 'two\n')
        self.assertEqual(ledger.since(''), [first, second])
        self.assertEqual(ledger.since(first), [second])
        self.assertEqual(ledger.since('not-a-commit'), [first, second])
        # Each commit holds only its new files.
        names = core.git(repo, 'ls-tree', '--name-only', second).stdout
        self.assertEqual(names.split(), ['RQ2-a'])
        # The objects written without git are what git would write.
        core.git(repo, 'fsck', '--strict', '--no-dangling')

    def test_sha256_host_default_still_makes_sha1_ledgers(self):
        """A host whose git makes SHA-256 repositories by default: ours
        are made SHA-1 (git_init_sha1); a SHA-256 one is refused loudly, its
        branch untouched."""
        support.require_tools('git')
        env = {**os.environ, 'GIT_DEFAULT_HASH': 'sha256'}
        ours = os.path.join(self.tmp, 'ours.git')
        core.git(ours, *core.git_init_sha1(), '--quiet', '--bare', env=env)
        ledger = core.Ledger(ours, 'refs/heads/master', 'c1')
        ledger.append([('RQ1-a', 'x\n')], 'one\n')
        core.git(ours, 'fsck', '--strict', '--no-dangling', env=env)
        theirs = os.path.join(self.tmp, 'theirs.git')
        core.git(theirs, 'init', '--quiet', '--bare', env=env)
        self.assertFalse(core.sha1_repository(theirs))
        with self.assertRaisesRegex(core.GitBackupError, 'SHA-256'):
            core.Ledger(theirs, 'refs/heads/master', 'c1').append(
                [('RQ1-a', 'x\n')], 'one\n')
        self.assertEqual(core.Ledger(theirs, 'refs/heads/master',
                                     'c1').tip(), '')


class NodeRequestTest(TempDirTest):
    def setUp(self):
        super().setUp()
        self.node = server.Node(core.Config(write_config(
            self.tmp, NODE_CONFIG.format(d=self.tmp))))
        self.ctx = server.NodeContext(self.node, 'c1', KEY, False)

    def test_settings_come_from_the_node(self):
        self.assertEqual(self.ctx.settings['sftp'], 'backup@c1.example')
        self.assertEqual(self.ctx.settings['sftp_port'], 22)
        self.assertEqual(self.ctx.settings['git'], 'git://c1')

    def test_remote_paths(self):
        root = '/var/backup/export'
        self.assertEqual(self.ctx.check_remote_path(
            f'{root}/id/a.tar.gz', root), f'{root}/id/a.tar.gz')
        for bad in (f'{root}/../etc/shadow', '/etc/shadow', f'{root}',
                    f'{root}x/a', f'{root}/a b', 'relative/path',
                    f'{root}//a', f'{root}/./a'):
            with self.assertRaises(core.RequestRefused, msg=bad):
                self.ctx.check_remote_path(bad, root)

    def test_options(self):
        self.assertEqual(self.ctx.parse_options(
            ['size=3', 'sha256=' + 'f' * 64, 'later=1']),
            {'size': '3', 'sha256': 'f' * 64})
        for bad in (['size=-1'], ['nokey'], ['Size=3'], ['source=../x']):
            with self.assertRaises(core.RequestRefused, msg=bad):
                self.ctx.parse_options(bad)

    def test_request_lines(self):
        pool = self.node.pool('c1')
        pool.create()
        for content, refused in ((b'sftp 1 2\n', None),
                                 (b'sftp a\nb\n', 'one printable line'),
                                 (b'\xff\xfe\n', 'not UTF-8'),
                                 (b'../x y\n', 'bad module name'),
                                 (b'x' * 5000, 'larger than')):
            with open(pool.file('P', KEY), 'wb') as f:
                f.write(content)
            if refused:
                with self.assertRaises(core.RequestRefused) as caught:
                    self.node.read_request('c1', KEY)
                self.assertIn(refused, str(caught.exception))
            else:
                self.assertEqual(self.node.read_request('c1', KEY)[1:],
                                 ('sftp', '1 2'))

    def test_client_names(self):
        for bad in ('gitosis-admin', '../x', 'x.git', '-x', 'a..b', ''):
            with self.assertRaises(core.UsageError, msg=bad):
                server.check_client_name(bad)
        self.assertEqual(server.check_client_name('172.16.0.60'),
                         '172.16.0.60')


class RetentionTest(unittest.TestCase):
    def backup(self, when):
        stamp = when.strftime(core.TIMESTAMP_FORMAT)
        return server.StoredBackup('app', f'/d/{stamp}', {
            'stored': when.strftime('%Y-%m-%dT%H:%M:%SZ'), 'files': []})

    def test_buckets(self):
        start = datetime.datetime(2026, 1, 1, 12, tzinfo=datetime.timezone.utc)
        backups = [self.backup(start + datetime.timedelta(hours=12 * i))
                   for i in range(120)]        # two a day for 60 days
        keep = server.backups_to_keep(backups, daily=3, weekly=2, monthly=3)
        newest = backups[-1].path
        self.assertEqual(keep[newest], 'newest')
        # The newest of each of the last three days (the newest of all
        # counts as its day's).
        last_days = set(sorted({b.time.date() for b in backups})[-3:])
        kept_days = {b.time.date() for b in backups if b.path in keep and
                     not keep[b.path].startswith(('weekly', 'monthly'))}
        self.assertEqual(kept_days, last_days)
        # January's newest stays as a monthly one.
        [january] = [b for b in backups if b.time.month == 1][-1:]
        self.assertTrue(keep[january.path].startswith('monthly'))
        # One per day: the newest of each day.
        self.assertNotIn(backups[-3].path, keep)


class GateTest(TempDirTest):
    def test_decisions(self):
        node = server.Node(core.Config(write_config(
            self.tmp, NODE_CONFIG.format(d=self.tmp))))
        repo = os.path.join(self.tmp, 'repos', 'c1.git')
        allowed = {"git-receive-pack 'c1.git'": ['git', 'receive-pack', repo],
                   "git upload-pack '/c1'": ['git', 'upload-pack', repo]}
        for command, argv in allowed.items():
            self.assertEqual(server.gate_command(node, 'c1', command), argv)
        for command in (None, 'sh', "git-receive-pack 'c2.git'",
                        "git-receive-pack '../c1.git'",
                        "git-upload-pack 'c1.git'; rm -rf /",
                        "git-receive-pack 'c1.git'\nsh"):
            with self.assertRaises(server.GateRefused, msg=command):
                server.gate_command(node, 'c1', command)


class CommandLineTest(TempDirTest):
    def test_status_with_a_missing_config_is_exit_2(self):
        stderr = io.StringIO()
        old, sys.stderr = sys.stderr, stderr
        try:
            code = client.main(['--config', os.path.join(self.tmp, 'no.ini'),
                                'status'])
        finally:
            sys.stderr = old
        self.assertEqual(code, 2)
        self.assertIn('configuration file not found', stderr.getvalue())

    def test_server_request_lines(self):
        self.assertTrue(client.SERVER_REQUEST_RE.match('sftp 1 u@h:/p'))
        self.assertFalse(client.SERVER_REQUEST_RE.match('sftp 1\nx'))
        self.assertEqual(client.request_id_of(KEY),
                         '20261126T000000.000000Z-1-0001')


if __name__ == '__main__':
    unittest.main()
