"""The HTML status page (`server.py report --format html`): a banner with
the worst state, counts per state, rows worst first, an inline SVG per
series (stored size, transfer time, failed runs, drills, gaps), hostile
names escaped; rendered in headless Chromium and looked at.

setUpClass runs the real pipeline (commit -> send -> push -> ingest ->
run -> sftp pull) three times with payloads of different sizes and once
with an export the client tampered with after announcing it (a real
failure, given up at once with max_attempts = 1); the stored backups are
then moved back in node time and copied, as `store()` names them, into a
90-day history with a gap.  A second client's fetch runs against a closed
port, so the node itself records it as unreachable.  The page of 100
clients is drawn from synthetic report data by calling report_html()."""

import datetime
import glob
import html
import json
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
from html.parser import HTMLParser

from tests import support
from tests.pipeline import CLIENT, Pipeline

if support.ROOT not in sys.path:
    sys.path.insert(0, support.ROOT)
import server  # noqa: E402

UTC = datetime.timezone.utc
DAY = 86400
HOSTILE_SOURCE = '<script>alert("owned")'
UNREACHABLE = 'c2'
SCREENSHOT_DIR = os.environ.get('TMPDIR') or tempfile.gettempdir()


def stamp(when):
    return when.strftime('%Y%m%dT%H%M%SZ')


def iso(when):
    return when.strftime('%Y-%m-%dT%H:%M:%SZ')


class PageParser(HTMLParser):
    """The banner, the summary and the rows of <table id="clients">, each
    row with its class, cell texts and the SVG elements in it."""

    def __init__(self):
        super().__init__()
        self.banner = None
        self.rows = []
        self.in_body = False
        self.cell = None
        self.svg = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get('id') == 'overall':
            self.banner = attrs.get('class')
        if tag == 'tbody':
            self.in_body = True
        elif self.in_body and tag == 'tr':
            self.rows.append({'class': attrs.get('class'), 'cells': [],
                              'svg': [], 'source': attrs.get('data-source')})
        elif self.in_body and tag == 'td':
            self.cell = ''
        elif self.in_body and tag == 'svg':
            self.svg = self.rows[-1]['svg']
        if self.svg is not None and tag != 'svg':
            self.svg.append((tag, attrs.get('class')))

    def handle_endtag(self, tag):
        if tag == 'tbody':
            self.in_body = False
        elif tag == 'svg':
            self.svg = None
        elif tag == 'td' and self.cell is not None:
            self.rows[-1]['cells'].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None and self.svg is None:
            self.cell += data


def png_size(path):
    """(width, height) from a PNG's IHDR chunk."""
    with open(path, 'rb') as f:
        head = f.read(24)
    if head[:8] != b'\x89PNG\r\n\x1a\n' or head[12:16] != b'IHDR':
        raise AssertionError(f'{path} is not a PNG')
    return struct.unpack('>II', head[16:24])


def screenshot(testcase, page, name, env=None):
    """Render `page` in headless Chromium; return the PNG's stable path
    (also printed)."""
    support.require_tools('chromium')
    work = support.temp_dir(testcase, 'gitbackup-chromium-')
    shot = os.path.join(work, name)
    proc = subprocess.run(
        ['chromium', '--headless', '--no-sandbox', '--disable-gpu',
         '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync',
         '--user-data-dir=' + os.path.join(work, 'profile'),
         '--screenshot=' + shot, '--window-size=1280,2000',
         'file://' + page], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        universal_newlines=True, timeout=120)
    testcase.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    testcase.assertTrue(os.path.exists(shot), proc.stderr[-2000:])
    testcase.assertEqual(png_size(shot), (1280, 2000))
    # A blank page compresses to a few kB; a drawn one does not.
    testcase.assertGreater(os.path.getsize(shot), 20000)
    stable = os.path.join(SCREENSHOT_DIR, name)
    shutil.copy(shot, stable)
    print(f'\nscreenshot: {stable}', flush=True)
    return stable


class StatusPageTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.base = tempfile.mkdtemp(prefix='gitbackup-status-')
        holder = unittest.TestCase()
        try:
            cls.make_node(holder)
        finally:
            holder.doCleanups()

    @classmethod
    def make_node(cls, holder):
        p = Pipeline(holder)
        with open(p.config) as f:
            config = f.read()
        # One failure is enough to give up: the failed run is then an X*
        # with a journal entry, as after max_attempts real failures.
        config = config.replace('free_space_floor = 0\n',
                                'free_space_floor = 0\nmax_attempts = 1\n')
        # Every archive a full: the drawn size is the restorable size (an
        # increment counts with its chain), and the drop must be real.
        config = config.replace('[client]\n', '[client]\nfull_every = 0\n',
                                1)
        closed_port = support.free_port()
        config += (f'\n[client {UNREACHABLE}]\nsftp = {p.sshd.user}@127.0.0.1'
                   f'\nsftp_port = {closed_port}\n')
        with open(p.config, 'w') as f:
            f.write(config)
        src = os.path.join(p.root, 'src')
        os.makedirs(src)
        # Random bytes: the archives keep the sizes apart, whatever the
        # compressor.
        for size in (60000, 120000, 15000):
            with open(os.path.join(src, 'data.bin'), 'wb') as f:
                f.write(os.urandom(size))
            p.client('commit', 'app', src)
            p.client('send')
            p.server('run')
        stored = p.stored('app')
        assert len(stored) == 3, stored
        # A real failure: the exported archive changes after the request
        # announced its size, the node refuses what it downloads.
        p.client('commit', 'app', src)
        p.client('send')
        export = os.path.join(p.client_dir, 'export')
        for root, _, files in os.walk(export):
            for name in files:
                with open(os.path.join(root, name), 'ab') as f:
                    f.write(b'tampered')
        p.server('run', check=False)
        assert 'X' in p.states('node'), p.states('node')
        # The unreachable client: one request in its pool, fetched from a
        # port where nothing listens.
        pool = os.path.join(p.node_dir, 'TODO', UNREACHABLE)
        os.makedirs(pool)
        with open(os.path.join(pool, 'RQ' + 'a' * 40 + '-RQ1'), 'w') as f:
            f.write(f'sftp 20260101T000000Z {p.sshd.user}@127.0.0.1:'
                    f'{export}/gone.tar size=1 source=app\n')
        p.server('run', check=False)
        shutil.copytree(p.node_dir, os.path.join(cls.base, 'node'),
                        symlinks=True)
        cls.config = os.path.join(cls.base, 'backup.ini')
        with open(cls.config, 'w') as f:
            f.write(config.replace(p.node_dir, os.path.join(cls.base,
                                                            'node')))
        cls.env = p.env
        cls.files = os.path.join(cls.base, 'node', 'data', CLIENT, 'files')
        cls.stored = [os.path.join(cls.files, 'app', os.path.basename(s))
                      for s in stored]
        cls.history()

    @classmethod
    def copy_backup(cls, template, when, source='app', client=CLIENT):
        """The stored backup `template`, stored again at node time `when`
        (directory name and manifest, as store() writes them)."""
        target = os.path.join(cls.base, 'node', 'data', client, 'files',
                              source, stamp(when))
        shutil.copytree(template, target)
        path = os.path.join(target, 'manifest.json')
        with open(path) as f:
            manifest = json.load(f)
        manifest.update(stored=iso(when), source=source)
        with open(path, 'w') as f:
            json.dump(manifest, f)
        return target

    @classmethod
    def history(cls):
        """c1/app: daily from 89 to 61 days ago (the small archive), a gap
        of 20 days, daily again from 40 days ago (the large one) and today
        the smallest (a drop).  c1/<hostile>: one backup 10 days ago.  c2:
        fresh, but unreachable.  c3: fresh."""
        now = datetime.datetime.now(UTC).replace(microsecond=0)
        first, second, third = cls.stored
        for day in range(89, 60, -1):
            cls.copy_backup(first, now - datetime.timedelta(days=day))
        for day in range(40, 0, -1):
            cls.copy_backup(second, now - datetime.timedelta(days=day))
        shutil.rmtree(first)
        shutil.rmtree(second)
        cls.copy_backup(third, now - datetime.timedelta(days=10),
                        source=HOSTILE_SOURCE)
        cls.copy_backup(third, now - datetime.timedelta(hours=3),
                        client=UNREACHABLE)
        cls.copy_backup(third, now - datetime.timedelta(hours=1),
                        client='c3')
        # c2 has been unreachable for longer than alert_after (1h): from
        # then on every format calls it a warning.
        [health] = glob.glob(os.path.join(cls.base, 'node', '**',
                                          f'client-{UNREACHABLE}.json'),
                             recursive=True)
        with open(health) as f:
            state = json.load(f)
        state['first_failure'] = iso(now - datetime.timedelta(hours=2))
        with open(health, 'w') as f:
            json.dump(state, f)
        # What a drill would journal; none is drawn where none is recorded.
        with open(os.path.join(cls.base, 'node', 'data', CLIENT,
                               'drills.jsonl'), 'w') as f:
            for days, ok in ((30, True), (2, False)):
                f.write(json.dumps({
                    'source': 'app', 'ok': ok,
                    'finished': iso(now - datetime.timedelta(days=days))})
                    + '\n')
            f.write('not json\n')

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.base, ignore_errors=True)

    def page(self):
        out = os.path.join(support.temp_dir(self), 'status.html')
        proc = subprocess.run(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', self.config, 'report', '--format', 'html',
             '--output', out], env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            universal_newlines=True, timeout=120)
        self.assertEqual(proc.returncode, 2, proc.stderr)  # critical
        with open(out, encoding='utf-8') as f:
            text = f.read()
        parser = PageParser()
        parser.feed(text)
        return out, text, parser

    def test_history_of_a_series(self):
        node = server.Node(server.core.Config(self.config))
        now = server.core.utcnow()
        history = server.report_history(node, CLIENT, now)
        app = history['sources']['app']
        self.assertEqual(len(app['snapshots']), 29 + 40 + 1)
        sizes = [s['size'] for s in app['snapshots']]
        self.assertLess(sizes[0], sizes[40])
        self.assertLess(sizes[-1], sizes[-2] * server.SIZE_DROP)
        # The journal's real transfers: seconds, not None.
        self.assertIsInstance(app['snapshots'][-1]['seconds'], int)
        [failure] = app['failures']
        self.assertIn('bytes', failure['reason'])
        self.assertEqual([d['ok'] for d in app['drills']], [True, False])
        self.assertEqual(history['waiting'], [])
        gaps = server.report_html_gaps(
            [s['time'] for s in app['snapshots']], app['before'],
            now - datetime.timedelta(days=90), now, 2 * DAY)
        self.assertEqual(len(gaps), 1)
        self.assertAlmostEqual((gaps[0][1] - gaps[0][0]).days, 21, delta=1)
        [waiting] = server.report_history(node, UNREACHABLE, now)['waiting']
        self.assertEqual(waiting['what'], 'cannot be reached')
        self.assertRegex(waiting['error'], 'refused|connect')

    def test_page_structure(self):
        path, text, page = self.page()
        self.assertEqual(page.banner, 'banner critical')
        self.assertRegex(text, r'\.banner\.critical \{ background: #b91c1c')
        self.assertNotIn('<script', text)
        self.assertIn(html.escape(HOSTILE_SOURCE), text)
        self.assertNotIn('src=', text)  # nothing loaded from anywhere
        rows = {(r['cells'][0], r['source']): r for r in page.rows}
        self.assertEqual(set(rows), {(CLIENT, 'app'), (CLIENT, HOSTILE_SOURCE),
                                     (UNREACHABLE, 'app'), ('c3', 'app')})
        # Worst first: critical, warning, ok.
        order = ['critical', 'warning', 'ok']
        classes = [r['class'] for r in page.rows]
        self.assertEqual(classes, sorted(classes, key=order.index))
        self.assertEqual(rows[(CLIENT, HOSTILE_SOURCE)]['class'], 'critical')
        # Its last restore drill failed: critical (issue 12).
        self.assertEqual(rows[(CLIENT, 'app')]['class'], 'critical')
        self.assertEqual(rows[('c3', 'app')]['class'], 'ok')
        # Fresh backup, but the node cannot reach it: not green.
        unreachable = rows[(UNREACHABLE, 'app')]
        self.assertEqual(unreachable['class'], 'warning')
        self.assertEqual(unreachable['cells'][2], 'WARNING')
        self.assertIn('cannot be reached since', unreachable['cells'][-1])
        # One SVG per series with what happened in it.
        self.assertEqual(text.count('<svg '), len(page.rows))
        app = dict((cls, tag) for tag, cls in rows[(CLIENT, 'app')]['svg'])
        for mark in ('size', 'transfer', 'failure', 'gap', 'drop',
                     'drill ok', 'drill failed'):
            self.assertIn(mark, app)
        c3 = [cls for _, cls in rows[('c3', 'app')]['svg']]
        self.assertIn('snapshot', c3)  # its one backup as a dot
        self.assertNotIn('failure', c3)
        self.assertNotIn('gap', c3)
        self.assertFalse([c for c in c3 if c and c.startswith('drill')])
        self.assertRegex(text, r'<span class="count critical">2 critical'
                         r'</span><span class="count warning">1 warning'
                         r'</span><span class="count ok">1 ok</span>')
        screenshot(self, path, 'gitbackup-status-page.png', self.env)

    def test_hundred_clients_stay_readable(self):
        rng = random.Random(14)
        now = datetime.datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
        report = {'node': 'n1', 'generated': iso(now), 'status': 'ok',
                  'clients': []}
        for i in range(100):
            client = f'host{i:03d}.example'
            sources = []
            history = {'days': 90, 'sources': {}, 'waiting': []}
            names = ['app', 'postgresdb', 'git/proj'][:rng.randint(1, 3)]
            for source in names:
                size = rng.randint(10, 4000) * 2 ** 20
                snapshots, when = [], now - datetime.timedelta(days=120)
                while when < now:
                    step = rng.choice([1] * 30 + [6])
                    if i % 17 == 0 and source == 'app':
                        step = rng.choice([1, 5])
                    when += datetime.timedelta(days=step, hours=rng.random())
                    if when >= now:
                        break
                    size = int(size * rng.uniform(0.97, 1.05))
                    if rng.random() < 0.01:
                        size //= 5
                    snapshots.append({
                        'time': when, 'size': None if source.startswith('git')
                        else size, 'seconds': rng.randint(1, 600)})
                stale = (now - snapshots[-1]['time']).total_seconds()
                status = 'ok' if stale < 2 * DAY else \
                    'warning' if stale < 4 * DAY else 'critical'
                history['sources'][source] = {
                    'snapshots': [s for s in snapshots if s['time'] >
                                  now - datetime.timedelta(days=90)],
                    'before': None,
                    'failures': [{'time': now - datetime.timedelta(
                        days=rng.uniform(0, 90))} for _ in range(
                            rng.choice([0] * 8 + [1, 3]))],
                    'drills': [{'time': now - datetime.timedelta(days=d),
                                'ok': rng.random() > 0.1}
                               for d in (80, 50, 20)] if i % 3 == 0 else []}
                sources.append({
                    'client': client, 'source': source, 'status': status,
                    'last_success': snapshots[-1]['time'],
                    'age_seconds': int(stale), 'size_bytes': size,
                    'count': len(snapshots), 'failed': 0, 'pending': 0,
                    'problems': [] if status == 'ok' else ['stale']})
            if i % 23 == 5:
                history['waiting'].append({
                    'what': 'cannot be reached', 'since': now,
                    'error': 'ssh: connect to host: Connection refused'})
            report['clients'].append({
                'client': client, 'status': max(
                    (s['status'] for s in sources),
                    key=server.STATUS_NAMES.index),
                'stale_after_seconds': 2 * DAY, 'pending': 0, 'failed': 0,
                'problems': [], 'sources': sources, 'history': history})
        text = server.report_html(report)
        self.assertLess(len(text.encode()), 2 * 2 ** 20)
        page = PageParser()
        page.feed(text)
        self.assertGreaterEqual(len(page.rows), 100)
        self.assertEqual(text.count('<svg '), len(page.rows))
        levels = [server.STATUS_NAMES.index(r['class']) for r in page.rows]
        self.assertEqual(levels, sorted(levels, reverse=True))
        self.assertEqual(page.banner, 'banner ' + page.rows[0]['class'])
        path = os.path.join(support.temp_dir(self), 'status-100.html')
        with open(path, 'w', encoding='utf-8') as f:
            f.write(text)
        print(f'\n100 clients: {len(page.rows)} series, '
              f'{len(text.encode())} bytes of HTML', flush=True)
        screenshot(self, path, 'gitbackup-status-page-100.png')

    def test_sparkline_draws_drills_only_when_given(self):
        now = datetime.datetime(2026, 11, 26, tzinfo=UTC)
        history = {'snapshots': [
            {'time': iso(now - datetime.timedelta(days=d)), 'size': 100,
             'seconds': 3} for d in range(10)], 'failures': [],
            'drills': [], 'before': None}
        svg, facts = server.svg_series(history, now, 2 * DAY)
        self.assertNotIn('drill', svg)
        self.assertEqual(facts['gaps'], 0)  # the series began 9 days ago
        history['before'] = iso(now - datetime.timedelta(days=91))
        history['drills'] = [{'time': iso(now), 'ok': False}]
        svg, facts = server.svg_series(history, now, 30 * DAY,
                                       label='<b>&')
        self.assertIn('class="drill failed"', svg)
        self.assertNotIn('class="drill ok"', svg)
        self.assertEqual(facts['gaps'], 1)  # day 91 to day 9: > 30 days
        self.assertNotIn('<b>', svg)
        self.assertIn('&lt;b&gt;&amp;', svg)
        self.assertTrue(re.fullmatch(r'<svg [^>]*width="240" height="40".*',
                                     svg, re.S))


if __name__ == '__main__':
    unittest.main()
