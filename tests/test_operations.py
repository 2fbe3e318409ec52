"""Operations on real stored backups: gc, report, prune, verify, the client's
gc and prune, a git daemon serving a stored mirror, and the HTML status page
in headless Chromium.

setUpClass runs the real pipeline once (commit -> send -> push -> ingest ->
run -> sftp pull) and makes a real git mirror and, where PostgreSQL is
installed, a real pg_dump; every test then works on its own copy of that
node and client, with its own configuration file.  Older backups are the
stored one copied under older node times (as `store()` names them)."""

import datetime
import email
import email.policy
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import time
import unittest
from html.parser import HTMLParser

from tests import support
from tests.pipeline import CLIENT, NODE, Pipeline

DAY = 86400
# Prometheus text exposition format: a sample line.
PROM_SAMPLE_RE = re.compile(
    r'^[a-zA-Z_:][a-zA-Z0-9_:]*'
    r'(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
    r'(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*")*\})?'
    r' -?[0-9.eE+-]+(?: -?[0-9]+)?$')
PROM_COMMENT_RE = re.compile(
    r'^# (HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* '
    r'(gauge|counter|untyped|summary|histogram))$')
UTC = datetime.timezone.utc


def stamp(when):
    return when.strftime('%Y%m%dT%H%M%SZ')


def iso(when):
    return when.strftime('%Y-%m-%dT%H:%M:%SZ')


def sha256(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


class TableParser(HTMLParser):
    """Rows of <table id="clients"> as lists of cell texts."""

    def __init__(self):
        super().__init__()
        self.in_table = False
        self.rows = []
        self.cell = None

    def handle_starttag(self, tag, attrs):
        if tag == 'table' and ('id', 'clients') in attrs:
            self.in_table = True
        elif self.in_table and tag == 'tr':
            self.rows.append([])
        elif self.in_table and tag in ('td', 'th'):
            self.cell = ''

    def handle_endtag(self, tag):
        if tag == 'table':
            self.in_table = False
        elif tag in ('td', 'th') and self.cell is not None:
            self.rows[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


class OperationsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.base = tempfile.mkdtemp(prefix='gitbackup-ops-')
        holder = unittest.TestCase()
        try:
            p = Pipeline(holder)
            src = os.path.join(p.root, 'src')
            os.makedirs(os.path.join(src, 'sub'))
            with open(os.path.join(src, 'sub', 'data.txt'), 'w') as f:
                f.write('stored by the operations tests\n' * 100)
            p.client('commit', 'app', src)
            p.client('send')
            p.server('run')
            assert p.stored('app'), 'the pipeline stored nothing'
            shutil.copytree(p.client_dir, os.path.join(cls.base, 'client'),
                            symlinks=True)
            shutil.copytree(p.node_dir, os.path.join(cls.base, 'node'),
                            symlinks=True)
            env = p.env
        finally:
            holder.doCleanups()
        cls.env = env
        # A real mirror, as the git module keeps them.
        work = os.path.join(cls.base, 'work')
        subprocess.run(['git', 'init', '-q', work], check=True, env=env)
        with open(os.path.join(work, 'README'), 'w') as f:
            f.write('mirrored\n')
        subprocess.run(['git', '-C', work, 'add', 'README'], check=True,
                       env=env)
        subprocess.run(['git', '-C', work, 'commit', '-q', '-m', 'first'],
                       check=True, env=env)
        mirror = os.path.join(cls.base, 'node', 'data', CLIENT, 'git',
                              'proj.git')
        subprocess.run(['git', 'clone', '-q', '--mirror', '--no-local', work,
                        mirror],
                       check=True, env=env)
        cls.dump = None
        cls.dump_error = None
        try:
            cls.dump = cls.make_dump()
        except unittest.SkipTest as e:
            cls.dump_error = str(e)

    @classmethod
    def make_dump(cls):
        """A real pg_dump -Fc file of a small database."""
        support.require_tools('pg_dump', 'pg_restore')
        cluster = support.PostgresCluster(os.path.join(cls.base, 'pg'))
        try:
            cluster.start()
            cluster.psql('CREATE DATABASE shop')
            cluster.psql('CREATE TABLE t (i int); INSERT INTO t VALUES (1)',
                         db='shop')
            path = os.path.join(cls.base, 'shop.dump')
            env = {k: v for k, v in cls.env.items()
                   if not k.startswith('PG')}
            env.update(cluster.env())
            subprocess.run([support.pg_tool('pg_dump'), '-Fc', '-f', path,
                            'shop'], check=True, env=env, timeout=120)
            return path
        finally:
            cluster.stop()

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.base, ignore_errors=True)

    # -- fixture ------------------------------------------------------------

    def setUp(self):
        self.root = support.temp_dir(self)
        self.node = os.path.join(self.root, 'node')
        self.client_dir = os.path.join(self.root, 'client')
        shutil.copytree(os.path.join(self.base, 'node'), self.node,
                        symlinks=True)
        shutil.copytree(os.path.join(self.base, 'client'), self.client_dir,
                        symlinks=True)
        self.files = os.path.join(self.node, 'data', CLIENT, 'files')
        self.mirror = os.path.join(self.node, 'data', CLIENT, 'git',
                                   'proj.git')
        self.write_config()

    def write_config(self, server='', client_section='', client=''):
        c, n = self.client_dir, self.node
        self.config = os.path.join(self.root, 'backup.ini')
        with open(self.config, 'w') as f:
            f.write(textwrap.dedent(f'''\
                [client]
                name = {CLIENT}
                default_node = {NODE}
                request_dir = {c}/requests
                queue_dir = {c}/queues
                export_dir = {c}/export
                sftp_export = backup@127.0.0.1
                log_dir = {c}/log
                admin = client-admin@example.invalid
                ''') + client + textwrap.dedent(f'''
                [nodes]
                {NODE} = ssh://backup@127.0.0.1:1/nowhere.git

                [modules]
                app = fs

                [server]
                name = {NODE}
                todo_dir = {n}/TODO
                data_dir = {n}/data
                log_dir = {n}/log
                repositories = {n}/repositories
                admin = node-admin@example.invalid
                ''') + server + textwrap.dedent(f'''
                [client {CLIENT}]
                sftp = backup@127.0.0.1
                ''') + client_section + textwrap.dedent(f'''
                [mail]
                method = spool
                spool_dir = {self.root}/mail
                '''))

    def run_script(self, script, *args, code=0):
        proc = subprocess.run(
            [support.PYTHON, os.path.join(support.ROOT, script),
             '--config', self.config, *args], env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        self.assertEqual(proc.returncode, code,
                         f'{script} {" ".join(args)}:\n{proc.stdout}\n'
                         f'{proc.stderr}')
        return proc

    def server(self, *args, code=0):
        return self.run_script('server.py', *args, code=code)

    def client(self, *args, code=0):
        return self.run_script('client.py', *args, code=code)

    def mails(self):
        out = []
        for path in sorted(glob.glob(os.path.join(self.root, 'mail', '*'))):
            with open(path, 'rb') as f:
                out.append(email.message_from_binary_file(
                    f, policy=email.policy.default))
        return out

    def backups(self, source='app'):
        return sorted(glob.glob(os.path.join(self.files, source, '*')))

    def add_backup(self, when, source='app', template=None, files=None):
        """A stored backup at node time `when`: a copy of the pipeline's
        (or the given files, with their real digests in the manifest)."""
        template = template or self.backups('app')[0]
        target = os.path.join(self.files, source, stamp(when))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if files is None:
            shutil.copytree(template, target)
        else:
            os.makedirs(target)
        with open(os.path.join(template, 'manifest.json')) as f:
            manifest = json.load(f)
        if files is not None:
            manifest['files'] = []
            for name, path in files.items():
                shutil.copy(path, os.path.join(target, name))
                manifest['files'].append({
                    'name': name, 'sha256': sha256(path),
                    'size': os.path.getsize(path)})
        manifest.update(stored=iso(when), source=source)
        with open(os.path.join(target, 'manifest.json'), 'w') as f:
            json.dump(manifest, f)
        return target

    def move_backup(self, path, when):
        """Give a stored backup an older node time (name and manifest)."""
        target = os.path.join(os.path.dirname(path), stamp(when))
        os.rename(path, target)
        manifest_path = os.path.join(target, 'manifest.json')
        with open(manifest_path) as f:
            manifest = json.load(f)
        manifest['stored'] = iso(when)
        with open(manifest_path, 'w') as f:
            json.dump(manifest, f)
        return target

    def age_everything(self, seconds):
        when = datetime.datetime.now(UTC) - datetime.timedelta(
            seconds=seconds)
        for path in self.backups('app'):
            self.move_backup(path, when)
        old = time.time() - seconds
        for name in ('refs', 'packed-refs', 'FETCH_HEAD'):
            path = os.path.join(self.mirror, name)
            if os.path.exists(path):
                os.utime(path, (old, old))

    def report(self, *args, code=0):
        proc = self.server('report', '--format', 'json', *args, code=code)
        return json.loads(proc.stdout)

    def source(self, report, name, client=CLIENT):
        [c] = [c for c in report['clients'] if c['client'] == client]
        [s] = [s for s in c['sources'] if s['source'] == name]
        return s

    def make_pool_file(self, state, key, content, age=0):
        pool = os.path.join(self.node, 'TODO', CLIENT)
        path = os.path.join(pool, state + key)
        with open(path, 'w') as f:
            f.write(content + '\n')
        paths = [path]
        if state == 'X':
            with open(path + '.reason', 'w') as f:
                f.write('2025-01-01T00:00:00Z refused: test\n')
            os.makedirs(os.path.join(pool, '.attempts'), exist_ok=True)
            with open(os.path.join(pool, '.attempts', key), 'w') as f:
                f.write('{"attempts": 5}\n')
            paths += [path + '.reason', os.path.join(pool, '.attempts', key)]
        if age:
            old = time.time() - age
            for p in paths:
                os.utime(p, (old, old))
        return paths

    # -- report -------------------------------------------------------------

    def test_report_formats_when_all_is_fresh(self):
        text = self.server('report').stdout
        self.assertIn(f'report of node {NODE}', text)
        self.assertRegex(text, rf'(?m)^{CLIENT}\s+app\s+ok\s')
        self.assertRegex(text, rf'(?m)^{CLIENT}\s+git/proj\s+ok\s')

        report = self.report()
        self.assertEqual(report['status'], 'ok')
        app = self.source(report, 'app')
        self.assertEqual(app['count'], 1)
        self.assertGreater(app['size_bytes'], 0)
        self.assertEqual(app['failed'], 0)
        self.assertLess(app['age_seconds'], 600)
        [stored] = self.backups()
        with open(os.path.join(stored, 'manifest.json')) as f:
            self.assertEqual(app['last_success'], json.load(f)['stored'])
        self.assertEqual(self.source(report, 'git/proj')['kind'], 'git')

        prom = self.server('report', '--format', 'prometheus').stdout
        for line in prom.splitlines():
            if line.startswith('#'):
                self.assertRegex(line, PROM_COMMENT_RE)
            else:
                self.assertRegex(line, PROM_SAMPLE_RE)
        self.assertRegex(prom, rf'(?m)^gitbackup_last_success_timestamp_'
                         rf'seconds{{client="{CLIENT}",source="app"}} \d+$')
        self.assertRegex(prom, rf'(?m)^gitbackup_status{{client="{CLIENT}",'
                         r'source="app"} 0$')
        self.assertIn('# TYPE gitbackup_backup_size_bytes gauge', prom)
        self.assertIn('gitbackup_failed_requests{', prom)

        page = os.path.join(self.root, 'status.html')
        self.server('report', '--format', 'html', '--output', page)
        parser = TableParser()
        with open(page, encoding='utf-8') as f:
            parser.feed(f.read())
        header, *rows = parser.rows
        self.assertEqual(header[:3], ['Client', 'Source', 'Status'])
        self.assertIn([CLIENT, 'app', 'OK'], [r[:3] for r in rows])

    def test_report_stale_is_warning_then_critical(self):
        self.age_everything(3 * DAY)      # stale_after 2d: warning
        report = self.report(code=1)
        self.assertEqual(self.source(report, 'app')['status'], 'warning')
        self.assertIn('stale_after', self.source(report, 'app')
                      ['problems'][0])
        self.age_everything(5 * DAY)      # past twice stale_after
        self.assertEqual(self.report(code=2)['status'], 'critical')
        # Per-client stale_after wins over [server].
        self.write_config(client_section='stale_after = 10d\n')
        self.assertEqual(self.report()['status'], 'ok')
        self.write_config(server='stale_after = 30d\n',
                          client_section='stale_after = 2d\n'
                          'admin = c1-admin@example.invalid\n')
        self.server('report', '--mail', code=2)
        mails = {m['to']: m for m in self.mails()}
        self.assertEqual(set(mails), {'node-admin@example.invalid',
                                      'c1-admin@example.invalid'})
        for mail in mails.values():
            self.assertIn('CRITICAL', mail['subject'])
            self.assertIn('app', mail.get_content())

    def test_report_expected_source_missing_is_critical(self):
        self.write_config(client_section='expect = app git\n')
        self.server('report', '--mail')
        self.assertEqual(self.mails(), [], 'no mail when all is ok')
        self.write_config(client_section='expect = app postgresdb\n')
        text = self.server('report', code=2).stdout
        self.assertRegex(text, rf'(?m)^{CLIENT}\s+postgresdb\s+critical\s+'
                         r'never\s')
        self.assertIn(f'{CLIENT}/postgresdb: critical: expected source has '
                      'no backup on this node', text)
        self.assertIn('CRITICAL', text.splitlines()[0])
        # An expected source that stopped arriving is critical at once.
        self.write_config(client_section='expect = app\n')
        self.age_everything(3 * DAY)
        self.assertEqual(self.source(self.report(code=2), 'app')['status'],
                         'critical')

    def test_report_counts_failed_and_pending_requests(self):
        key = '0' * 40 + '-RQ20260101T000000.000000Z-1-0001-fs'
        line = 'sftp 20260101T000000Z backup@127.0.0.1:/x/a.tgz source=app'
        self.make_pool_file('X', key, line)
        self.make_pool_file('RQ', '1' * 40 + '-RQx-fs', line)
        journal = os.path.join(self.node, 'data', CLIENT, 'results.jsonl')
        with open(journal, 'a') as f:
            f.write(json.dumps({'request': key, 'outcome': 'failed',
                                'started': iso(datetime.datetime.now(UTC)),
                                'finished': iso(datetime.datetime.now(UTC)
                                                + datetime.timedelta(
                                                    seconds=5)),
                                'reason': 'refused: test'}) + '\n')
        report = self.report(code=1)
        app = self.source(report, 'app')
        self.assertEqual((app['failed'], app['pending']), (1, 1))
        self.assertEqual(app['status'], 'warning')
        self.assertIn('latest request failed: refused: test',
                      app['problems'])
        self.assertEqual(report['clients'][0]['failed'], 1)

    def test_html_page_in_headless_chromium(self):
        support.require_tools('chromium')
        page = os.path.join(self.root, 'status.html')
        self.server('report', '--format', 'html', '--output', page)
        profile = os.path.join(self.root, 'chromium-profile')
        proc = subprocess.run(
            ['chromium', '--headless', '--no-sandbox', '--disable-gpu',
             '--disable-quic', '--no-first-run',
             '--disable-background-networking', '--disable-component-update',
             '--disable-sync', f'--user-data-dir={profile}', '--dump-dom',
             'file://' + page], env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
        parser = TableParser()
        parser.feed(proc.stdout)
        self.assertIn('<table id="clients">', proc.stdout)
        self.assertIn([CLIENT, 'app', 'OK'], [r[:3] for r in parser.rows])

    # -- prune --------------------------------------------------------------

    def test_prune_keeps_retention_set_and_newest(self):
        def at(text):
            return datetime.datetime.strptime(text, '%Y-%m-%d %H:%M') \
                .replace(tzinfo=UTC)
        [real] = self.backups()
        a = self.move_backup(real, at('2025-03-20 18:00'))   # Thu, week 12
        b = self.add_backup(at('2025-03-20 09:00'))          # same day
        c = self.add_backup(at('2025-03-19 12:00'))
        d = self.add_backup(at('2025-03-17 12:00'))          # Mon, week 12
        e = self.add_backup(at('2025-03-14 12:00'))          # week 11
        f = self.add_backup(at('2025-03-03 12:00'))          # week 10
        g = self.add_backup(at('2025-02-10 12:00'))
        h = self.add_backup(at('2025-01-15 12:00'))
        i = self.add_backup(at('2024-12-01 12:00'))
        odd = os.path.join(self.files, 'app', 'not-a-backup')
        os.makedirs(odd)
        self.write_config(client_section='keep_daily = 2\nkeep_weekly = 2\n'
                          'keep_monthly = 2\n')
        old_f = self.make_pool_file('F', '2' * 40 + '-RQold-fs', 'dummy x',
                                    age=100 * DAY)
        old_x = self.make_pool_file('X', '3' * 40 + '-RQold-fs', 'dummy x',
                                    age=100 * DAY)
        new_x = self.make_pool_file('X', '4' * 40 + '-RQnew-fs', 'dummy x')
        incoming = os.path.join(self.files, '.incoming')
        pending = '5' * 40 + '-RQpending-fs'
        self.make_pool_file('RQ', pending, 'dummy x')
        for key in ('6' * 40 + '-RQcrashed-fs', pending):
            os.makedirs(os.path.join(incoming, key))
            old = time.time() - 2 * DAY
            os.utime(os.path.join(incoming, key), (old, old))
        os.makedirs(os.path.join(incoming, '7' * 40 + '-RQrecent-fs'))
        git_staging = os.path.join(self.node, 'data', CLIENT, 'git', 'sub',
                                   '.gone.git.incoming')
        os.makedirs(os.path.join(git_staging, 'objects'))
        os.utime(git_staging, (time.time() - 2 * DAY,) * 2)
        before = self.backups()
        out = self.server('prune', '--dry-run').stdout
        self.assertEqual(self.backups(), before)
        for path in old_f + old_x:
            self.assertTrue(os.path.exists(path))
        self.assertTrue(os.path.isdir(git_staging))
        gone = {b, d, f, h, i}
        self.assertEqual(
            {line.split(' ', 2)[2] for line in out.splitlines()
             if line.startswith('would remove ') and '/files/app/' in line},
            gone)
        out = self.server('prune').stdout
        self.assertEqual(set(self.backups()), {a, c, e, g, odd})
        for path in old_f + old_x:
            self.assertFalse(os.path.exists(path), path)
            self.assertIn(f'removed {path}', out)
        for path in new_x:
            self.assertTrue(os.path.exists(path), path)
        self.assertEqual(sorted(os.listdir(incoming)),
                         [pending, '7' * 40 + '-RQrecent-fs'])
        self.assertFalse(os.path.exists(git_staging))
        self.assertIn(f'removed {git_staging}', out)
        # Nothing kept but the rule "never the newest good backup".
        self.write_config(client_section='keep_daily = 0\nkeep_weekly = 0\n'
                          'keep_monthly = 0\n')
        self.server('prune')
        self.assertEqual(set(self.backups()), {a, odd})
        self.assertTrue(os.path.isdir(self.mirror), 'mirrors are not pruned')
        self.server('verify', '--no-restore-check', code=2)  # odd: no manifest

    def test_prune_works_per_series(self):
        """One request per database: each database's dumps are a series
        of their own, so one day's newest dump of one database never
        pushes out the other's."""
        dump = os.path.join(self.root, 'x.dump')
        with open(dump, 'w') as f:
            f.write('not read by prune\n')
        now = datetime.datetime.now(UTC).replace(microsecond=0)
        made = {}
        for hours in (1, 2, 50, 51):
            name = 'a.dump' if hours % 2 else 'b.dump'
            made[hours] = self.add_backup(
                now - datetime.timedelta(hours=hours), source='postgresdb',
                files={name: dump})
        self.write_config(server='keep_daily = 0\nkeep_weekly = 0\n'
                          'keep_monthly = 0\n')
        self.server('prune')
        self.assertEqual(self.backups('postgresdb'),
                         sorted([made[1], made[2]]))

    def test_client_prune(self):
        exports = [p for p in glob.glob(os.path.join(self.client_dir,
                                                     'export', '*'))]
        finished = glob.glob(os.path.join(self.client_dir, 'requests', NODE,
                                          'F*'))
        self.assertEqual((len(exports), len(finished)), (1, 1))
        fresh = os.path.join(self.client_dir, 'export',
                             '20991231T000000.000000Z-1-0001')
        os.makedirs(fresh)
        old = time.time() - 40 * DAY
        for path in exports + finished:
            os.utime(path, (old, old))
        # 40 days of sends too: the clock alone expires nothing unconfirmed.
        with open(os.path.join(self.client_dir, 'log', 'state', 'sends'),
                  'w') as f:
            f.write(f'{40 * 288}\n')
        out = self.client('prune', '--dry-run').stdout
        self.assertEqual(len(out.splitlines()), 2, out)
        self.assertTrue(all(os.path.exists(p) for p in exports + finished))
        self.client('prune')
        self.assertFalse(any(os.path.exists(p) for p in exports + finished))
        self.assertTrue(os.path.isdir(fresh))

    # -- verify -------------------------------------------------------------

    def test_verify_intact_then_corrupted(self):
        if self.dump:
            self.add_backup(datetime.datetime.now(UTC), source='postgresdb',
                            files={'shop.dump': self.dump})
        out = self.server('verify').stdout
        self.assertIn('OK', out.splitlines()[-1])
        self.assertEqual(self.mails(), [])
        [stored] = self.backups()
        [archive] = [a for a in glob.glob(os.path.join(stored, '*.tar.*'))
                     if not a.endswith('.listing')]
        with open(archive, 'r+b') as f:
            f.seek(os.path.getsize(archive) // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0xff]))
        out = self.server('verify', code=2).stdout
        self.assertIn(f'critical: {archive}: sha256', out)
        [mail] = self.mails()
        self.assertIn('verify', mail['subject'])
        self.assertIn(archive, mail.get_content())

    def test_verify_restore_check_reads_archives_and_dumps(self):
        """Files whose digests match their manifest but that tar or
        pg_restore cannot read are caught by the sample restore check."""
        if not self.dump:
            support.require_tools('pg_restore')
            self.skipTest(self.dump_error)
        garbage = os.path.join(self.root, 'garbage')
        with open(garbage, 'wb') as f:
            f.write(os.urandom(4096))
        now = datetime.datetime.now(UTC)
        self.add_backup(now - datetime.timedelta(hours=1),
                        source='postgresdb', files={'shop.dump': self.dump})
        self.server('verify')
        self.add_backup(now, files={'bad.tar.gz': garbage})
        self.add_backup(now, source='postgresdb',
                        files={'shop.dump': garbage})
        out = self.server('verify', code=2).stdout
        self.assertRegex(out, r'critical: \S+/bad.tar.gz: restore check '
                         r'failed: tar ')
        self.assertRegex(out, r'critical: \S+/shop.dump: restore check '
                         r'failed: pg_restore ')
        self.assertNotIn('sha256', out)
        self.server('verify', '--no-restore-check')

    def test_verify_and_gc_catch_a_corrupted_mirror(self):
        [pack] = glob.glob(os.path.join(self.mirror, 'objects', 'pack',
                                        '*.pack'))
        os.chmod(pack, 0o644)
        with open(pack, 'r+b') as f:
            f.seek(20)
            f.write(b'\0' * 64)
        out = self.server('verify', code=2).stdout
        self.assertIn(f'{self.mirror}: git fsck failed', out)
        proc = self.server('gc', code=1)
        self.assertIn('git gc of', proc.stderr)
        [mail] = self.mails()[-1:]
        self.assertIn('FAILED', mail['subject'])

    # -- gc -----------------------------------------------------------------

    def loose_objects(self, repo):
        out = subprocess.run(['git', '--git-dir', repo, 'count-objects',
                              '-v'], env=self.env, stdout=subprocess.PIPE,
                             universal_newlines=True, check=True).stdout
        return int(re.search(r'^count: (\d+)$', out, re.M).group(1))

    def test_gc_node_and_client(self):
        repository = os.path.join(self.node, 'repositories', CLIENT + '.git')
        self.assertGreater(self.loose_objects(repository), 0)
        self.server('gc')
        [mail] = self.mails()
        self.assertIn('git gc on node n1: 2 repositories, 0 failed',
                      mail['subject'])
        body = mail.get_content()
        self.assertIn(f'git-dir="{self.mirror}"', body)
        self.assertIn(f'git-dir="{self.node}/repositories/{CLIENT}.git"',
                      body)
        [log] = glob.glob(os.path.join(self.node, 'log', 'git-gc-*.log'))
        with open(log) as f:
            self.assertEqual(f.read(), body)
        self.assertEqual(self.loose_objects(repository), 0)
        self.client('gc')
        mail = self.mails()[-1]
        self.assertIn(f'git gc on client {CLIENT}: 1 repositories, 0 failed',
                      mail['subject'])
        self.assertIn(f'queues/{NODE}.git', mail.get_content())

    # -- browsing -----------------------------------------------------------

    def test_git_daemon_serves_a_stored_mirror(self):
        base = os.path.join(self.node, 'data', CLIENT, 'git')
        daemon = support.GitDaemon(base, os.path.join(self.root, 'daemon'))
        daemon.start()
        self.addCleanup(daemon.stop)
        clone = os.path.join(self.root, 'clone')
        subprocess.run(['git', 'clone', '-q', daemon.url('proj.git'), clone],
                       env=self.env, check=True, timeout=60,
                       stdin=subprocess.DEVNULL)
        with open(os.path.join(clone, 'README')) as f:
            self.assertEqual(f.read(), 'mirrored\n')



class ModuleBackupsTest(unittest.TestCase):
    """report, verify and prune on what the real git and postgresdb
    modules stored through the whole pipeline (mirror fed by a push hook,
    one dump per database plus globals)."""

    def test_report_verify_prune_on_module_backups(self):
        support.require_tools('git-daemon', 'pg_dump', 'pg_dumpall',
                              'pg_restore')
        from tests.modules_pipeline import ModulePipeline
        cluster = support.PostgresCluster(support.temp_dir(self))
        cluster.start()
        self.addCleanup(cluster.stop)
        cluster.psql('CREATE DATABASE shop')
        p = ModulePipeline(self)
        p.use_postgres(cluster, 'config')
        p.start_daemon()
        bare = p.client_repository('proj/a.git')
        work = p.work_clone(bare)
        p.commit_file(work, 'README', 'one\n')
        p.git('push', '--quiet', 'origin', 'master', cwd=work)
        p.client('commit', 'postgresdb', 'all')
        p.client('send')
        p.server('run')
        p.edit_config(f'[client {CLIENT}]\n',
                      f'[client {CLIENT}]\nexpect = git postgresdb\n')
        report = json.loads(p.server('report', '--format', 'json').stdout)
        self.assertEqual(report['status'], 'ok', report)
        sources = {s['source']: s for s in report['clients'][0]['sources']}
        self.assertEqual(set(sources), {'git/proj/a', 'postgresdb'})
        self.assertEqual(sources['git/proj/a']['count'], 1)
        self.assertTrue(sources['git/proj/a']['expected'])
        # One `postgresdb all` request: one snapshot (dumps and globals).
        self.assertEqual(sources['postgresdb']['count'], 1)
        out = p.server('verify').stdout
        self.assertIn('OK', out.splitlines()[-1])
        # The snapshot is the newest of its series: nothing to prune.
        self.assertEqual(p.server('prune').stdout, '')
        stored = p.stored('postgresdb')
        dumps = [path for path in glob.glob(os.path.join(
            p.node_dir, 'data', CLIENT, 'files', 'postgresdb', '*', '*'))
            if path.endswith('.dump')]
        self.assertTrue(dumps)
        os.truncate(dumps[0], 100)
        out = p.server('verify', check=False)
        self.assertEqual(out.returncode, 2, out.stderr)
        self.assertIn(f'critical: {dumps[0]}: size 100', out.stdout)
        self.assertEqual(p.stored('postgresdb'), stored)


if __name__ == '__main__':
    unittest.main()
