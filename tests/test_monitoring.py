"""Monitoring checked by the real tools: `server.py report` on a node that
holds a real backup.

setUpClass runs the real pipeline once (commit -> send -> push -> ingest ->
run -> sftp pull) and adds a real git mirror, as test_operations does;
every test works on its own copy of that node.  The Prometheus textfile
must pass `promtool check metrics` and be served by a real
prometheus-node-exporter (textfile collector only, on a loopback port);
the nagios format must follow the plugin guidelines: one status line with
performance data, exit 0/1/2, and 3 UNKNOWN when the check itself could
not be made."""

import datetime
import json
import os
import re
import shutil
import subprocess
import tempfile
import textwrap
import unittest

from tests import support
from tests.pipeline import CLIENT, NODE, Pipeline

DAY = 86400
UTC = datetime.timezone.utc
STALE_AFTER = 2 * DAY      # the [server] default
# Nagios plugin guidelines: 'label'=value[UOM];[warn];[crit];[min];[max]
PERFDATA_RE = re.compile(
    r"'(?:[^'=]|'')+'=(?:-?[0-9.]+|U)(?:s|%|B|KB|MB|TB|c)?"
    r"(?:;[0-9.:~@-]*){0,4}")
STATUS_LINE_RE = re.compile(
    r'^GITBACKUP (OK|WARNING|CRITICAL|UNKNOWN) - ([^|\n]+?)'
    r'(?: \| (.*))?$')


def samples(text):
    """{'name{labels}': value} of a text exposition (node_exporter
    re-renders values, e.g. 1795691830 as 1.79569183e+09)."""
    result = {}
    for line in text.splitlines():
        if line and not line.startswith('#'):
            series, value = line.rsplit(' ', 1)
            result[series] = float(value)
    return result


def stamp(when):
    return when.strftime('%Y%m%dT%H%M%SZ')


def iso(when):
    return when.strftime('%Y-%m-%dT%H:%M:%SZ')


class MonitoringTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.base = tempfile.mkdtemp(prefix='gitbackup-monitor-')
        holder = unittest.TestCase()
        try:
            p = Pipeline(holder)
            src = os.path.join(p.root, 'src')
            os.makedirs(src)
            with open(os.path.join(src, 'data.txt'), 'w') as f:
                f.write('watched by the monitoring tests\n' * 100)
            p.client('commit', 'app', src)
            p.client('send')
            p.server('run')
            assert p.stored('app'), 'the pipeline stored nothing'
            shutil.copytree(p.node_dir, os.path.join(cls.base, 'node'),
                            symlinks=True)
            cls.env = p.env
        except BaseException:
            shutil.rmtree(cls.base, ignore_errors=True)
            raise
        finally:
            holder.doCleanups()
        # A real mirror, as the git module keeps them.
        work = os.path.join(cls.base, 'work')
        git = ['git', '-C', work]
        subprocess.run(['git', 'init', '-q', work], check=True, env=cls.env)
        with open(os.path.join(work, 'README'), 'w') as f:
            f.write('mirrored\n')
        subprocess.run(git + ['add', 'README'], check=True, env=cls.env)
        subprocess.run(git + ['commit', '-q', '-m', 'first'], check=True,
                       env=cls.env)
        subprocess.run(['git', 'clone', '-q', '--mirror', '--no-local', work,
                        os.path.join(cls.base, 'node', 'data', CLIENT, 'git',
                                     'proj.git')], check=True, env=cls.env)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.base, ignore_errors=True)

    # -- fixture ------------------------------------------------------------

    def setUp(self):
        self.root = support.temp_dir(self)
        self.node = os.path.join(self.root, 'node')
        shutil.copytree(os.path.join(self.base, 'node'), self.node,
                        symlinks=True)
        self.write_config()

    def write_config(self, client_section=''):
        n = self.node
        self.config = os.path.join(self.root, 'backup.ini')
        with open(self.config, 'w') as f:
            f.write(textwrap.dedent(f'''\
                [server]
                name = {NODE}
                todo_dir = {n}/TODO
                data_dir = {n}/data
                log_dir = {n}/log
                repositories = {n}/repositories
                admin = node-admin@example.invalid

                [client {CLIENT}]
                sftp = backup@127.0.0.1
                ''') + client_section + textwrap.dedent(f'''
                [mail]
                method = spool
                spool_dir = {self.root}/mail
                '''))

    def report(self, *args, code=0):
        proc = subprocess.run(
            [support.PYTHON, os.path.join(support.ROOT, 'server.py'),
             '--config', self.config, 'report', *args], env=self.env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
        self.assertEqual(proc.returncode, code,
                         f'report {" ".join(args)}:\n{proc.stdout}\n'
                         f'{proc.stderr}')
        return proc

    def age_app_backup(self, seconds):
        """Give the stored backup of 'app' an older node time, as store()
        would have named it then (directory name and manifest)."""
        files = os.path.join(self.node, 'data', CLIENT, 'files', 'app')
        [name] = os.listdir(files)
        when = datetime.datetime.now(UTC) - datetime.timedelta(
            seconds=seconds)
        target = os.path.join(files, stamp(when))
        os.rename(os.path.join(files, name), target)
        path = os.path.join(target, 'manifest.json')
        with open(path) as f:
            manifest = json.load(f)
        manifest['stored'] = iso(when)
        with open(path, 'w') as f:
            json.dump(manifest, f)

    def json_source(self, name, code=0):
        report = json.loads(self.report('--format', 'json', code=code).stdout)
        [c] = report['clients']
        [s] = [s for s in c['sources'] if s['source'] == name]
        return s

    def promtool(self, text):
        support.require_tools('promtool')
        proc = subprocess.run(['promtool', 'check', 'metrics'], input=text,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, env=self.env,
                              timeout=60)
        self.assertEqual((proc.returncode, proc.stdout), (0, ''),
                         'promtool check metrics:\n' + text)

    def nagios(self, code):
        """The nagios output: (state, summary, {label: perfdata}, long
        text lines)."""
        out = self.report('--format', 'nagios', code=code).stdout
        self.assertTrue(out.endswith('\n'))
        first, *rest = out[:-1].split('\n')
        m = STATUS_LINE_RE.match(first)
        self.assertTrue(m, first)
        state, summary, perfdata = m.groups()
        self.assertEqual(['OK', 'WARNING', 'CRITICAL', 'UNKNOWN'][code],
                         state)
        items = {}
        for item in (perfdata or '').split(' ') if perfdata else []:
            self.assertRegex(item, rf'\A{PERFDATA_RE.pattern}\Z')
            label, value = item.split('=', 1)
            items[label.strip("'")] = value
        for line in rest:
            self.assertNotIn('|', line)
        return state, summary, items, rest

    # -- Prometheus ---------------------------------------------------------

    def test_textfile_passes_promtool_in_every_state(self):
        textfiles = os.path.join(self.root, 'textfiles')
        os.makedirs(textfiles)
        prom = os.path.join(textfiles, 'gitbackup.prom')
        self.report('--format', 'prometheus', '--output', prom)
        with open(prom) as f:
            fresh = f.read()
        self.promtool(fresh)
        for name in ('gitbackup_last_success_timestamp_seconds',
                     'gitbackup_backup_size_bytes', 'gitbackup_status',
                     'gitbackup_report_timestamp_seconds'):
            self.assertIn(f'# HELP {name} ', fresh)
            self.assertIn(f'# TYPE {name} gauge', fresh)
        # Stale, failed, never stored: every kind of series still lints.
        self.age_app_backup(5 * DAY)
        self.write_config(client_section='expect = app postgresdb\n')
        out = self.report('--format', 'prometheus', code=2).stdout
        self.promtool(out)
        self.assertRegex(out, rf'(?m)^gitbackup_status{{client="{CLIENT}",'
                         r'source="postgresdb"} 2$')

    def test_node_exporter_serves_our_series(self):
        textfiles = os.path.join(self.root, 'textfiles')
        os.makedirs(textfiles)
        prom = os.path.join(textfiles, 'gitbackup.prom')
        self.report('--format', 'prometheus', '--output', prom)
        exporter = support.NodeExporter(textfiles,
                                        os.path.join(self.root, 'exporter'))
        self.addCleanup(exporter.stop)
        exporter.start()
        scrape = exporter.scrape()
        served = samples(scrape)
        self.assertEqual(served['node_textfile_scrape_error'], 0)
        app = self.json_source('app')
        stored = datetime.datetime.strptime(
            app['last_success'], '%Y-%m-%dT%H:%M:%SZ').replace(
                tzinfo=UTC).timestamp()
        labels = f'{{client="{CLIENT}",source="app"}}'
        self.assertEqual(
            served[f'gitbackup_last_success_timestamp_seconds{labels}'],
            stored)
        self.assertEqual(served[f'gitbackup_backup_size_bytes{labels}'],
                         app['size_bytes'])
        self.assertEqual(served[f'gitbackup_status{labels}'], 0)
        self.assertEqual(served[f'gitbackup_status{{client="{CLIENT}",'
                                'source="git/proj"}'], 0)
        self.assertEqual(served[f'gitbackup_stale_after_seconds'
                                f'{{client="{CLIENT}"}}'], STALE_AFTER)
        self.assertIn('# TYPE gitbackup_status gauge', scrape)
        self.assertIn('# HELP gitbackup_backup_size_bytes ', scrape)
        self.promtool(scrape)

        # The cron job replaces the file; the next scrape shows the change.
        self.age_app_backup(3 * DAY)
        self.report('--format', 'prometheus', '--output', prom, code=1)
        served = samples(exporter.scrape())
        self.assertEqual(served[f'gitbackup_status{labels}'], 1)
        self.assertEqual(served['node_textfile_scrape_error'], 0)
        self.assertEqual(os.listdir(textfiles), ['gitbackup.prom'])

    # -- Nagios -------------------------------------------------------------

    def test_nagios_ok(self):
        state, summary, perf, rest = self.nagios(0)
        self.assertEqual(summary, f'2 of 2 sources ok on node {NODE}')
        self.assertEqual(rest, [])
        app = self.json_source('app')
        self.assertRegex(perf[f'{CLIENT}/app_age'],
                         rf'\A[0-9]+s;{STALE_AFTER};{2 * STALE_AFTER};0;\Z')
        self.assertEqual(perf[f'{CLIENT}/app_size'],
                         f'{app["size_bytes"]}B;;;0;')
        self.assertEqual(perf[f'{CLIENT}/app_failed'], '0;;;0;')
        self.assertEqual(perf[f'{CLIENT}/app_pending'], '0;;;0;')
        self.assertIn(f'{CLIENT}/git/proj_age', perf)

    def test_nagios_warning_then_critical(self):
        self.age_app_backup(3 * DAY)
        state, summary, perf, rest = self.nagios(1)
        self.assertEqual(summary, f'1 warning of 2 sources on node {NODE}: '
                         f'{CLIENT}/app: last good backup 3d ago '
                         '(stale_after 2d)')
        self.assertEqual(rest, [f'{CLIENT}/app: warning: last good backup '
                                '3d ago (stale_after 2d)'])
        self.assertRegex(perf[f'{CLIENT}/app_age'], r'\A2592[0-9]{2}s;')

        # An expected source that never arrived: critical, and named first.
        self.write_config(client_section='expect = app postgresdb\n')
        state, summary, perf, rest = self.nagios(2)
        self.assertEqual(
            summary, f'2 critical of 3 sources on node {NODE}: '
            f'{CLIENT}/app: last good backup 3d ago (stale_after 2d)')
        self.assertEqual(rest, [
            f'{CLIENT}/app: critical: last good backup 3d ago (stale_after '
            '2d)', f'{CLIENT}/postgresdb: critical: expected source has no '
            'backup on this node'])
        # Expected: critical as soon as it is stale.
        self.assertRegex(perf[f'{CLIENT}/app_age'],
                         rf'\A[0-9]+s;{STALE_AFTER};{STALE_AFTER};0;\Z')
        self.assertEqual(perf[f'{CLIENT}/postgresdb_age'],
                         f'U;{STALE_AFTER};{STALE_AFTER};0;')

    def test_unwritable_output_is_unknown(self):
        missing = os.path.join(self.root, 'no-such-dir', 'gitbackup.prom')
        for fmt in ('prometheus', 'text'):
            proc = self.report('--format', fmt, '--output', missing, code=3)
            self.assertEqual(proc.stdout, '')
            self.assertIn('could not check', proc.stderr)
        proc = self.report('--format', 'nagios', '--output', missing, code=3)
        self.assertRegex(proc.stdout, r'\AGITBACKUP UNKNOWN - could not '
                         r'check: [^|\n]*no-such-dir[^|\n]*\n\Z')

    def test_unreadable_data_dir_is_unknown_and_mailed(self):
        # A symlink loop: even root cannot read it.
        data = os.path.join(self.node, 'data')
        shutil.rmtree(data)
        os.symlink(data, data)
        state, summary, perf, rest = self.nagios(3)
        self.assertRegex(summary, r'\Acould not check: .*data')
        self.assertEqual((perf, rest), ({}, []))
        self.report('--mail', code=3)
        [mail] = os.listdir(os.path.join(self.root, 'mail'))
        with open(os.path.join(self.root, 'mail', mail)) as f:
            self.assertIn(f'Subject: gitbackup: report of {NODE}: UNKNOWN',
                          f.read())

    def test_help_documents_the_exit_codes(self):
        out = self.report('--help').stdout
        for word in ('0 OK', '1 WARNING', '2 CRITICAL', '3 UNKNOWN',
                     'nagios'):
            self.assertIn(word, out)


if __name__ == '__main__':
    unittest.main()
