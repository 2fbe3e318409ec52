"""The Debian package (make deb) and its systemd units, with Debian's own
tools: dpkg-deb builds and lists it, lintian passes it with no error,
systemd-analyze verifies every unit, and -- once it is installed (CI runs
`apt-get install ./build/gitbackup_*.deb` before `make test`) -- the
installed gitbackup-client and gitbackup-server run a backup end to end.

The end-to-end test runs when the package is installed and we are root,
or when GITBACKUP_INSTALLED=1; under CI=true as root, a package that is
not installed is a failure, not a skip.
"""

import glob
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline

BUILD_SCRIPT = os.path.join(support.ROOT, 'packaging', 'build-deb.sh')
UNITS_DIR = os.path.join(support.ROOT, 'packaging', 'systemd')
CONFFILE = '/etc/gitbackup/backup.ini'
SHARE = '/usr/share/gitbackup'
COMMANDS = ('gitbackup-client', 'gitbackup-server')
# The README's crontab lines, as timers: (side, command) of every unit.
UNIT_JOBS = {('client', 'send'), ('client', 'backup-all'),
             ('client', 'prune'), ('client', 'gc'),
             ('server', 'run'), ('server', 'prune'), ('server', 'verify'),
             ('server', 'drill'), ('server', 'gc'), ('server', 'report'),
             ('server', 'offsite')}
# What a maintainer script of this package must never do.
FORBIDDEN_IN_MAINTAINER_SCRIPTS = ('adduser', 'useradd', 'ssh-keygen',
                                   'systemctl', 'deb-systemd', 'chown')


def run(argv, **kwargs):
    return subprocess.run(argv, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=300, **kwargs)


def tree_version():
    proc = run([support.PYTHON, os.path.join(support.ROOT, 'client.py'),
                '--version'], check=True)
    return proc.stdout.split()[-1]


def package_installed():
    proc = run(['dpkg-query', '-W', '-f=${Status}', 'gitbackup'])
    return proc.returncode == 0 and proc.stdout.endswith(' installed')


class Built:
    """One build of the package per test run, in a temporary directory."""
    path = None
    root = None
    temp = None

    @classmethod
    def get(cls):
        if cls.path is None:
            support.require_tools('dpkg-deb', 'help2man', 'gzip')
            cls.temp = tempfile.mkdtemp(prefix='gitbackup-deb-')
            proc = run(['sh', BUILD_SCRIPT, cls.temp])
            if proc.returncode != 0:
                raise AssertionError('build-deb.sh failed (exit %d):\n%s'
                                     % (proc.returncode, proc.stderr))
            cls.path = proc.stdout.strip().splitlines()[-1]
            cls.root = os.path.join(cls.temp, 'root')
            run(['dpkg-deb', '-x', cls.path, cls.root], check=True)
        return cls


def tearDownModule():
    if Built.temp:
        shutil.rmtree(Built.temp, ignore_errors=True)


class PackageTest(unittest.TestCase):
    def setUp(self):
        self.deb = Built.get()

    def field(self, name):
        return run(['dpkg-deb', '-f', self.deb.path, name],
                   check=True).stdout.strip()

    def test_name_and_control_fields(self):
        version = tree_version()
        self.assertEqual(os.path.basename(self.deb.path),
                         f'gitbackup_{version}-1_all.deb')
        self.assertEqual(self.field('Package'), 'gitbackup')
        self.assertEqual(self.field('Version'), f'{version}-1')
        self.assertEqual(self.field('Architecture'), 'all')
        depends = [d.strip() for d in self.field('Depends').split(',')]
        for wanted in ('git', 'openssh-client', 'python3 (>= 3.6)'):
            self.assertIn(wanted, depends)
        # tar is essential: lintian wants a version, and --zstd needs 1.31.
        self.assertIn('tar (>= 1.31)', depends)
        self.assertEqual(
            sorted(d.strip() for d in self.field('Recommends').split(',')),
            ['postgresql-client', 'sudo', 'zstd'])
        info = run(['dpkg-deb', '-I', self.deb.path], check=True).stdout
        self.assertIn('conffiles', info)

    def test_contents(self):
        listing = run(['dpkg-deb', '-c', self.deb.path], check=True).stdout
        paths = {line.split()[5].lstrip('.') for line in listing.splitlines()}
        modes = {line.split()[5].lstrip('.'): line.split()[0]
                 for line in listing.splitlines()}
        expected = {f'/usr/bin/{c}' for c in COMMANDS}
        expected |= {f'{SHARE}/{s}' for s in
                     ('client.py', 'server.py', 'sendmail.py')}
        # Every module of the tree, shared plumbing (modules/_*.py) too.
        expected |= {f'{SHARE}/modules/{os.path.basename(m)}' for m in
                     glob.glob(os.path.join(support.ROOT, 'modules', '*.py'))}
        expected |= {CONFFILE,
                     '/usr/share/man/man1/gitbackup-client.1.gz',
                     '/usr/share/man/man1/gitbackup-server.1.gz',
                     '/usr/share/doc/gitbackup/copyright',
                     '/usr/share/doc/gitbackup/changelog.Debian.gz'}
        for side, job in UNIT_JOBS:
            for kind in ('service', 'timer'):
                expected.add(f'/lib/systemd/system/gitbackup-{side}-{job}.'
                             f'{kind}')
        self.assertEqual(expected - paths, set())
        self.assertFalse([p for p in paths if '__pycache__' in p
                          or p.endswith('.pyc')])
        for command in COMMANDS:
            self.assertEqual(modes[f'/usr/bin/{command}'], '-rwxr-xr-x')
        control = os.path.join(self.deb.temp, 'control')
        run(['dpkg-deb', '-e', self.deb.path, control], check=True)
        with open(os.path.join(control, 'conffiles')) as f:
            self.assertEqual(f.read().split(), [CONFFILE])

    def test_scripts_are_the_trees(self):
        for rel in ['client.py', 'server.py', 'sendmail.py'] + [
                os.path.join('modules', os.path.basename(m)) for m in
                glob.glob(os.path.join(support.ROOT, 'modules', '*.py'))]:
            with open(os.path.join(support.ROOT, rel), 'rb') as a, \
                    open(os.path.join(self.deb.root, SHARE.lstrip('/'), rel),
                         'rb') as b:
                self.assertEqual(a.read(), b.read(), rel)

    def test_no_maintainer_script_makes_accounts_keys_or_enables(self):
        control = os.path.join(self.deb.temp, 'control-scripts')
        run(['dpkg-deb', '-e', self.deb.path, control], check=True)
        for name in ('preinst', 'postinst', 'prerm', 'postrm'):
            path = os.path.join(control, name)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                text = f.read()
            for word in FORBIDDEN_IN_MAINTAINER_SCRIPTS:
                self.assertNotIn(word, text, f'{name} runs {word}')

    def test_conffile_is_the_example_disabled(self):
        """As shipped it configures nothing: every command exits 2 naming
        the missing section; removing the leading '#' of each line gives
        back conf.example.ini below a header of comments."""
        conffile = os.path.join(self.deb.root, CONFFILE.lstrip('/'))
        with open(conffile) as f:
            text = f.read()
        self.assertFalse([line for line in text.splitlines()
                          if line.strip() and line[0] not in '#;'])
        # What the header promises: removing every leading '#' enables the
        # whole example; the header itself stays a comment.
        enabled = re.sub(r'(?m)^#', '', text)
        header, body = enabled.split('\n;\n', 1)
        self.assertFalse([line for line in header.splitlines()
                          if not line.startswith(';')])
        with open(os.path.join(support.ROOT, 'conf.example.ini')) as f:
            self.assertEqual(body.rstrip('\n'), f.read().rstrip('\n'))
        for script, section in (('client.py', 'client'),
                                ('server.py', 'server')):
            proc = run([support.PYTHON,
                        os.path.join(support.ROOT, script),
                        '--config', conffile, 'check'])
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn(f'no [{section}] section', proc.stderr)

    def test_man_pages(self):
        for side in ('client', 'server'):
            path = os.path.join(self.deb.root, 'usr/share/man/man1',
                                f'gitbackup-{side}.1.gz')
            with gzip.open(path, 'rt') as f:
                text = f.read()
            self.assertIn(f'.TH GITBACKUP-{side.upper()} "1"', text)
            self.assertIn('.SH COMMANDS', text)
            self.assertIn('.SS "check"', text)
            self.assertIn('/etc/gitbackup/backup.ini', text)
            proc = run(['man', '--warnings', '-l', '-Tutf8', path],
                       env={**os.environ, 'MANWIDTH': '80'}) \
                if shutil.which('man') else None
            if proc is not None:
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(proc.stderr, '')

    def test_lintian_reports_no_errors(self):
        support.require_tools('lintian')
        proc = run(['lintian', '--fail-on', 'error', self.deb.path])
        errors = [line for line in proc.stdout.splitlines()
                  if line.startswith('E:')]
        self.assertEqual(errors, [])
        self.assertEqual(proc.returncode, 0, proc.stdout + proc.stderr)

    def test_reproducible(self):
        """The same tree builds the same .deb, byte for byte."""
        again = os.path.join(self.deb.temp, 'again')
        proc = run(['sh', BUILD_SCRIPT, again], check=True)
        digests = set()
        for path in (self.deb.path, proc.stdout.strip().splitlines()[-1]):
            with open(path, 'rb') as f:
                digests.add(hashlib.sha256(f.read()).hexdigest())
        self.assertEqual(len(digests), 1)


class SystemdUnitsTest(unittest.TestCase):
    def units(self):
        return sorted(glob.glob(os.path.join(UNITS_DIR, '*.service')) +
                      glob.glob(os.path.join(UNITS_DIR, '*.timer')))

    def verify(self, paths, env=None):
        proc = run(['systemd-analyze', 'verify', *paths],
                   env={**os.environ, **(env or {})})
        # Unknown keys are only warnings for systemd-analyze: any output
        # at all is a failure here.
        self.assertEqual((proc.returncode, proc.stdout + proc.stderr),
                         (0, ''))

    def test_one_timer_per_cron_job(self):
        names = {os.path.basename(p) for p in self.units()}
        want = {f'gitbackup-{side}-{job}.{kind}' for side, job in UNIT_JOBS
                for kind in ('service', 'timer')}
        self.assertEqual(names, want)
        for side, job in UNIT_JOBS:
            with open(os.path.join(UNITS_DIR,
                                   f'gitbackup-{side}-{job}.service')) as f:
                service = f.read()
            self.assertIn('\nUser=adminbackup\n', service)
            self.assertRegex(service, r'\nExecStart=/usr/bin/gitbackup-%s '
                             r'-q %s(\s|$)' % (side, re.escape(job)))
            with open(os.path.join(UNITS_DIR,
                                   f'gitbackup-{side}-{job}.timer')) as f:
                timer = f.read()
            self.assertIn('\nOnCalendar=', timer)

    def test_units_verify_in_a_temporary_root(self):
        """The units as shipped, with ExecStart pointing into the unpacked
        package and man pointed at its man pages."""
        support.require_tools('systemd-analyze', 'man')
        deb = Built.get()
        units = os.path.join(deb.temp, 'units')
        os.makedirs(units, exist_ok=True)
        for path in glob.glob(os.path.join(deb.root,
                                           'lib/systemd/system/gitbackup-*')):
            with open(path) as f:
                text = f.read()
            with open(os.path.join(units, os.path.basename(path)), 'w') as f:
                f.write(text.replace('ExecStart=/usr/bin/',
                                     f'ExecStart={deb.root}/usr/bin/'))
        self.assertEqual(len(os.listdir(units)), 2 * len(UNIT_JOBS))
        self.verify(sorted(glob.glob(os.path.join(units, '*'))),
                    {'MANPATH': os.path.join(deb.root, 'usr/share/man')})

    def test_units_verify_against_the_installed_package(self):
        support.require_tools('systemd-analyze', 'man')
        if not all(os.access(f'/usr/bin/{c}', os.X_OK) for c in COMMANDS):
            raise unittest.SkipTest('the package is not installed')
        self.verify(self.units())


def installed_wanted():
    if os.environ.get('GITBACKUP_INSTALLED') == '1':
        return True
    ci = os.environ.get('CI', '').strip().lower() in ('true', '1', 'yes')
    return os.geteuid() == 0 and (package_installed() or ci)


class InstalledEndToEndTest(unittest.TestCase):
    """The installed commands, their scripts under /usr/share/gitbackup, a
    backup from commit to stored archive."""

    def setUp(self):
        if not installed_wanted():
            raise unittest.SkipTest('the package is not installed (run as '
                                    'root after apt-get install ./build/'
                                    'gitbackup_*.deb, or GITBACKUP_INSTALLED'
                                    '=1)')
        missing = [c for c in COMMANDS if not shutil.which(c)]
        if missing:
            self.fail(f'{", ".join(missing)} not on PATH: install the '
                      'package first (apt-get install -y ./build/'
                      'gitbackup_*.deb)')

    def test_backup_with_the_installed_commands(self):
        p = Pipeline(self, commands={'client.py': ['gitbackup-client'],
                                     'server.py': ['gitbackup-server']})
        with open(os.path.join(p.repo, 'hooks', 'post-update')) as f:
            self.assertIn(f'{SHARE}/server.py', f.read())
        src = os.path.join(p.root, 'src')
        os.makedirs(os.path.join(src, 'sub'))
        with open(os.path.join(src, 'sub', 'data.bin'), 'wb') as f:
            f.write(os.urandom(1 << 16))
        p.client('commit', 'app', src)
        p.client('send')
        self.assertEqual(p.states(), {'F': 1})
        self.assertEqual(p.states('node'), {'RQ': 1})
        p.server('run')
        self.assertEqual(p.states('node'), {'F': 1})
        [stored] = p.stored('app')
        # Back with the installed command, as an admin would get it.
        restored = os.path.join(p.root, 'restored')
        p.server('restore', CLIENT, 'app', '--to', restored)
        for name in ('sub/data.bin',):
            with open(os.path.join(src, name), 'rb') as f, \
                    open(os.path.join(restored, name), 'rb') as g:
                self.assertEqual(g.read(), f.read())
        p.client('send')
        self.assertIn('node stored 1, node failed 0, not yet confirmed 0',
                      p.client('status').stdout)
        self.assertIn(CLIENT, stored)

    def test_default_configuration_is_etc(self):
        """Without --config and $GITBACKUP_CONFIG the commands read
        /etc/gitbackup/backup.ini (here: as shipped, configuring nothing)."""
        with open(CONFFILE) as f:
            if re.search(r'(?m)^\[', f.read()):
                raise unittest.SkipTest(f'{CONFFILE} has been edited')
        env = support.isolated_env(support.temp_dir(self))
        for command, section in (('gitbackup-client', 'client'),
                                 ('gitbackup-server', 'server')):
            proc = run([command, 'check'], env=env)
            self.assertEqual(proc.returncode, 2, proc.stderr)
            self.assertIn(f'{CONFFILE}: no [{section}] section', proc.stderr)
        # $GITBACKUP_CONFIG still wins over the packaged default.
        proc = run(['gitbackup-client', 'check'],
                   env={**env, 'GITBACKUP_CONFIG': '/nonexistent/b.ini'})
        self.assertIn('/nonexistent/b.ini', proc.stderr)


if __name__ == '__main__':
    unittest.main()
