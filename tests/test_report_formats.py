"""Every report format tells the same story: text, JSON, Nagios,
Prometheus and the HTML page render one status decision, so for each
client and series in each state they say the same thing, and the
statuses are the documented ones (docs/operations.md, "report").

The node is built by hand (snapshots with manifests, the health records
`run` writes, an offsite journal): `report` reads only files, so no
pipeline is needed, and each format is the real `server.py report`."""

import datetime
import hashlib
import html
import json
import os
import re
import shutil
import subprocess
import tempfile
import unittest

from tests import support

UTC = datetime.timezone.utc
NOW = datetime.datetime.now(UTC).replace(microsecond=0)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)

# client -> (expected client status, what makes it so)
STATES = {
    'ok': ('ok', 'a full and an increment on it, fresh'),
    'stale': ('warning', 'newest backup 3 days old (stale_after 2d)'),
    'blip': ('ok', 'unreachable for 10 minutes (alert_after 1h)'),
    'outage': ('warning', 'unreachable for 2 hours (alert_after 1h)'),
    'misconf': ('critical', 'the node configuration for it is wrong'),
    'broken': ('critical', 'its newest increment lost its full'),
    'behind': ('warning', 'a snapshot 3 days old not yet offsite'),
}
OUTAGE_ERROR = 'ssh: connect to host 127.0.0.1 port 9: Connection refused'


def iso(when):
    return when.strftime('%Y-%m-%dT%H:%M:%SZ')


def store(data_dir, client, when, size, request_id, level=0, base=None,
          seq=1):
    """A snapshot of source `app` as the node stores it."""
    path = os.path.join(data_dir, client, 'files', 'app',
                        when.strftime('%Y%m%dT%H%M%SZ'))
    os.makedirs(path)
    data = b'x' * size
    with open(os.path.join(path, 'app.tar.zst'), 'wb') as f:
        f.write(data)
    manifest = {'stored': iso(when), 'request_id': request_id, 'seq': seq,
                'files': [{'name': 'app.tar.zst', 'size': size,
                           'sha256': hashlib.sha256(data).hexdigest()}]}
    if level:
        manifest.update(level=level, base=base)
    with open(os.path.join(path, 'manifest.json'), 'w') as f:
        json.dump(manifest, f)
    return path


def waiting(state_dir, kind, client, since, error):
    """The Health record `run` keeps while fetches from a client wait."""
    with open(os.path.join(state_dir, f'{kind}-{client}.json'), 'w') as f:
        json.dump({'first_failure': iso(since), 'last_error': error,
                   'failures': 3}, f)


class ReportFormatsAgreeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix='gitbackup-formats-')
        node = os.path.join(cls.root, 'node')
        data = os.path.join(node, 'data')
        state = os.path.join(node, 'log', 'state')
        for d in (data, state, os.path.join(node, 'TODO'),
                  os.path.join(node, 'repositories')):
            os.makedirs(d)
        cls.config = os.path.join(cls.root, 'backup.ini')
        with open(cls.config, 'w') as f:
            f.write(f'[server]\nname = n1\ntodo_dir = {node}/TODO\n'
                    f'data_dir = {data}\nlog_dir = {node}/log\n'
                    f'repositories = {node}/repositories\n\n'
                    '[offsite]\nremote = offsite:gitbackup\n'
                    f'rclone_config = {cls.root}/rclone.conf\n')
        for client in STATES:
            if client not in ('stale', 'broken', 'behind'):
                store(data, client, NOW - DAY, 100000, f'{client}-full')
                store(data, client, NOW - HOUR, 100, f'{client}-inc', 1,
                      f'{client}-full', seq=2)
        store(data, 'stale', NOW - 3 * DAY, 5000, 'stale-full')
        store(data, 'broken', NOW - HOUR, 100, 'broken-inc', 1, 'gone')
        store(data, 'behind', NOW - 3 * DAY, 5000, 'behind-1')
        store(data, 'behind', NOW - HOUR, 5000, 'behind-2', seq=2)
        waiting(state, 'client', 'blip', NOW - 10 * datetime.timedelta(
            minutes=1), OUTAGE_ERROR)
        waiting(state, 'client', 'outage', NOW - 2 * HOUR, OUTAGE_ERROR)
        waiting(state, 'config', 'misconf', NOW - HOUR,
                '[client misconf] sftp: missing')
        # Every snapshot but behind's old one is offsite already.
        for client in STATES:
            with open(os.path.join(data, client, 'offsite.jsonl'), 'w') as f:
                for snapshot in sorted(os.listdir(os.path.join(
                        data, client, 'files', 'app'))):
                    if (client, snapshot) != ('behind', min(os.listdir(
                            os.path.join(data, 'behind', 'files', 'app')))):
                        f.write(json.dumps({
                            'remote': 'offsite:gitbackup', 'event': 'copied',
                            'path': f'files/app/{snapshot}',
                            'time': iso(NOW)}) + '\n')
        cls.outputs = {fmt: cls.report(fmt) for fmt in
                       ('text', 'json', 'nagios', 'prometheus', 'html')}

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.root, ignore_errors=True)

    @classmethod
    def report(cls, fmt):
        proc = subprocess.run(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', cls.config, 'report', '--format', fmt],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        return proc.returncode, proc.stdout, proc.stderr

    def statuses(self, fmt):
        """({client: status}, {(client, source): status}, overall) as one
        format tells them."""
        code, out, err = self.outputs[fmt]
        self.assertEqual(code, 2, f'{fmt}: {err}')   # critical, as Nagios
        if fmt == 'json':
            report = json.loads(out)
            return ({c['client']: c['status'] for c in report['clients']},
                    {(c['client'], r['source']): r['status']
                     for c in report['clients'] for r in c['sources']},
                    report['status'])
        if fmt == 'text':
            rows = re.findall(r'^(\S+) +(app) +(ok|warning|critical) ', out,
                              re.M)
            overall = re.search(r'^gitbackup report .*: (\w+)$', out, re.M)
            series = {(c, s): v for c, s, v in rows}
            return (self.worst_per_client(series), series,
                    overall[1].lower())
        if fmt == 'prometheus':
            clients = dict(re.findall(
                r'^gitbackup_client_status\{client="([^"]+)"\} (\d)$', out,
                re.M))
            series = re.findall(r'^gitbackup_status\{client="([^"]+)",'
                                r'source="([^"]+)"\} (\d)$', out, re.M)
            names = ('ok', 'warning', 'critical')
            return ({c: names[int(v)] for c, v in clients.items()},
                    {(c, s): names[int(v)] for c, s, v in series},
                    names[max(int(v) for v in clients.values())])
        if fmt == 'html':
            rows = re.findall(r'<tr class="(\w+)" data-client="([^"]+)" '
                              r'data-source="([^"]+)">', out)
            series = {(c, s): v for v, c, s in rows}
            overall = re.search(r'<div id="overall" class="banner (\w+)">',
                                out)
            return self.worst_per_client(series), series, overall[1]
        line = out.splitlines()[0]     # nagios
        counts = re.search(r'^GITBACKUP (\w+) - 2 critical, 3 warning of 7 '
                           r'sources on node n1', line)
        self.assertTrue(counts, line)
        # Its problem lines name a client, or a client's series; the
        # counts above cover every series.
        problems = re.findall(r'^([^/\s]+)(?:/app)?: (warning|critical): ',
                              out, re.M)
        clients = self.worst_per_client(
            {(c, i): v for i, (c, v) in enumerate(problems)})
        return clients, None, counts[1].lower()

    @staticmethod
    def worst_per_client(series):
        names = ('ok', 'warning', 'critical')
        worst = {}
        for (client, _), status in series.items():
            worst[client] = max(worst.get(client, 'ok'), status,
                                key=names.index)
        return worst

    def test_every_format_gives_each_state_its_documented_status(self):
        expected = {c: status for c, (status, _) in STATES.items()}
        for fmt in self.outputs:
            clients, series, overall = self.statuses(fmt)
            with self.subTest(format=fmt):
                self.assertEqual(overall, 'critical')
                if fmt == 'nagios':
                    # Nagios names only what has a problem.
                    self.assertEqual(clients, {c: s for c, s in
                                               expected.items() if s != 'ok'})
                    continue
                self.assertEqual(clients, expected)
                # A client's level holds for each of its series.
                self.assertEqual(series, {(c, 'app'): s for c, s in
                                          expected.items()})

    def test_a_client_problem_is_told_once_and_whole(self):
        page = self.outputs['html'][1]
        text = self.outputs['text'][1]
        for out in (page, text):
            self.assertEqual(out.count('cannot be reached since'), 1)
            self.assertIn(html.escape(OUTAGE_ERROR), out)
        self.assertNotIn('overflow-wrap: anywhere', page)
        # Under alert_after the outage is not news anywhere yet.
        self.assertNotIn('blip: warning', text)

    def test_size_is_what_a_restore_reads(self):
        report = json.loads(self.outputs['json'][1])
        ok = {c['client']: c for c in report['clients']}['ok']
        self.assertEqual(ok['sources'][0]['size_bytes'], 100100)
        self.assertIn('gitbackup_backup_size_bytes{client="ok",source="app"}'
                      ' 100100\n', self.outputs['prometheus'][1])
        self.assertIn('97.8 KiB', self.outputs['text'][1])
        # The increment is no "size drop" on the page.
        row = re.search(r'<tr class="ok" data-client="ok".*?</tr>',
                        self.outputs['html'][1], re.S)[0]
        self.assertNotIn('class="drop"', row)


if __name__ == '__main__':
    unittest.main()
