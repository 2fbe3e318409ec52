"""Test support for gitbackup: real servers on the loopback interface.

The tests of this project run the real programs -- git, ssh, sftp, tar,
PostgreSQL -- against servers that the tests start themselves and that listen
only on 127.0.0.1 (or on a unix socket):

- ``SSHD``: a private OpenSSH server with its own configuration, host key and
  authorized_keys file, run by absolute path (/usr/sbin/sshd) as the current
  user.  It serves exec requests and sftp (internal-sftp).
- ``GitDaemon``: ``git daemon`` exporting one base directory.
- ``PostgresCluster``: a throw-away cluster made by initdb in a temporary
  directory, reachable only through a unix socket.  When the tests run as
  root, the cluster runs as the ``postgres`` user (PostgreSQL refuses root).
- ``Postfix``: a private Postfix instance (``postfix -c DIR``) with its own
  configuration, queue and mail spool in a temporary directory, SMTP on a
  127.0.0.1 port, local delivery only, into mbox files.  Needs root (the
  Postfix master does).
- ``NodeExporter``: ``prometheus-node-exporter`` serving only its textfile
  collector on a 127.0.0.1 port.

Guarantees: nothing here mutates ``os.environ``; every ``start()`` either
returns with the server accepting connections or raises ``RuntimeError``
with the tail of the server's log; every ``stop()`` may be called any number
of times and leaves no process behind (servers still running when the
interpreter exits are stopped by an atexit hook).

Missing programs: ``require_tools()`` skips the test (``unittest.SkipTest``),
unless the environment says ``CI=true``, where a missing tool is a failure
(``MissingToolError``, a ``RuntimeError``), so that a CI machine that lacks a
package cannot pass by skipping everything.
"""

import atexit
import email.parser
import email.policy
import errno
import glob
import grp
import mailbox
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable

HOST = '127.0.0.1'
SSHD_PATH = '/usr/sbin/sshd'
SSHD_PRIVSEP_DIR = '/run/sshd'
POSTGRES_USER = 'postgres'      # OS account running clusters when we are root
START_TIMEOUT = 15.0            # seconds a server may take to come up
STOP_TIMEOUT = 10.0             # seconds a server may take to go away
LOG_TAIL_LINES = 30

# Debian package that provides each tool require_tools() knows about.
TOOL_PACKAGES = {
    'git': 'git',
    'git-daemon': 'git',
    'ssh': 'openssh-client',
    'sftp': 'openssh-client',
    'ssh-keygen': 'openssh-client',
    'scp': 'openssh-client',
    'sshd': 'openssh-server',
    'tar': 'tar',
    'gzip': 'gzip',
    'xz': 'xz-utils',
    'zstd': 'zstd',
    'gitolite': 'gitolite3',
    'runuser': 'util-linux',
    'pg_dump': 'postgresql-client',
    'pg_dumpall': 'postgresql-client',
    'pg_restore': 'postgresql-client',
    'psql': 'postgresql-client',
    'initdb': 'postgresql',
    'pg_ctl': 'postgresql',
    'postgres': 'postgresql',
    'postfix': 'postfix',
    'sendmail': 'postfix',
    'promtool': 'prometheus',
    'prometheus-node-exporter': 'prometheus-node-exporter',
}
# Programs in /usr/sbin, which is not in every user's $PATH.
SBIN_TOOLS = {'postfix': '/usr/sbin/postfix', 'sendmail': '/usr/sbin/sendmail'}
# PostgreSQL server programs: Debian keeps them out of $PATH.
PG_SERVER_TOOLS = {'initdb', 'pg_ctl', 'postgres', 'pg_controldata',
                   'pg_resetwal'}
# PostgreSQL client programs: in $PATH (postgresql-client), else in bindir.
PG_CLIENT_TOOLS = {'psql', 'pg_dump', 'pg_dumpall', 'pg_restore', 'createdb',
                   'dropdb', 'pg_isready'}

# Environment variables that must not leak from the developer's shell (or
# from a git hook running the tests) into the programs under test.
_LEAKY_VARIABLES = ('GITBACKUP_CONFIG', 'SSH_AUTH_SOCK', 'SSH_AGENT_PID',
                    'SSH_ASKPASS', 'EMAIL', 'XDG_CONFIG_HOME')


class MissingToolError(RuntimeError):
    """A program the test needs is not installed (fatal under CI=true)."""


# ---------------------------------------------------------------------------
# Helpers


def _ci():
    return os.environ.get('CI', '').strip().lower() in ('true', '1', 'yes')


def _is_root():
    return os.geteuid() == 0


def current_user():
    """Name of the account the tests run as."""
    return pwd.getpwuid(os.getuid()).pw_name


def _tool_present(name):
    if name == 'sshd':
        return os.access(SSHD_PATH, os.X_OK)
    if name in SBIN_TOOLS:
        return os.access(SBIN_TOOLS[name], os.X_OK)
    if name == 'git-daemon':
        git = shutil.which('git')
        if not git:
            return False
        try:
            exec_path = subprocess.run(
                [git, '--exec-path'], stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, universal_newlines=True,
                check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return False
        return os.access(os.path.join(exec_path, 'git-daemon'), os.X_OK)
    if name == 'gitolite':
        return bool(shutil.which('gitolite') or shutil.which('gitolite3'))
    if name in PG_SERVER_TOOLS:
        bindir = pg_bindir()
        return bool(bindir) and os.access(os.path.join(bindir, name), os.X_OK)
    if name in PG_CLIENT_TOOLS:
        return bool(shutil.which(name) or pg_tool(name))
    return bool(shutil.which(name))


def _missing(message):
    """Skip the test, or fail it under CI=true."""
    if _ci():
        raise MissingToolError(message + ' (CI=true: missing tools are '
                               'failures, not skips)')
    raise unittest.SkipTest(message)


def require_root(why):
    """Skip (or under CI=true fail) unless running as root."""
    if not _is_root():
        _missing('must run as root: ' + why)


def require_tools(*names):
    """Skip (or under CI=true fail) unless every named program is usable.

    Names are program names as in $PATH, plus: 'sshd' (/usr/sbin/sshd),
    'git-daemon' (`git daemon` works), 'gitolite' (gitolite or gitolite3),
    and the PostgreSQL server programs ('initdb', 'pg_ctl', 'postgres'),
    found through pg_bindir().
    """
    missing = [name for name in names if not _tool_present(name)]
    if missing:
        described = ', '.join(
            '%s (Debian package: %s)' % (name, TOOL_PACKAGES.get(name, name))
            for name in missing)
        _missing('required tool missing: ' + described)


def pg_bindir():
    """Directory of the PostgreSQL server programs, or None.

    The newest /usr/lib/postgresql/<version>/bin holding initdb (Debian),
    else the directory of `initdb` found in $PATH.
    """
    def version_key(path):
        version = path.split(os.sep)[-2]
        return [int(part) if part.isdigit() else -1
                for part in version.split('.')]

    candidates = [os.path.dirname(path) for path in
                  glob.glob('/usr/lib/postgresql/*/bin/initdb')
                  if os.access(path, os.X_OK)]
    if candidates:
        return max(candidates, key=version_key)
    initdb = shutil.which('initdb')
    return os.path.dirname(initdb) if initdb else None


def pg_tool(name):
    """Absolute path of a PostgreSQL program: pg_bindir() first, then $PATH."""
    bindir = pg_bindir()
    if bindir and os.access(os.path.join(bindir, name), os.X_OK):
        return os.path.join(bindir, name)
    return shutil.which(name)


_ports_given = set()


def require_python(version):
    """Path of a Python interpreter of version ('3.6': its newest 3.6.x),
    found with `pyenv prefix`; skip (or under CI=true fail) without it.
    The image carries 3.6 to 3.13 under pyenv for the compatibility tests
    (tests/test_compat.py)."""
    pyenv = shutil.which('pyenv') or os.path.join(
        os.environ.get('PYENV_ROOT') or os.path.expanduser('~/.pyenv'),
        'bin', 'pyenv')
    try:
        prefix = subprocess.run(
            [pyenv, 'prefix', version], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, universal_newlines=True,
            timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        prefix = ''
    python = os.path.join(prefix, 'bin', 'python' + version)
    if not prefix or not os.access(python, os.X_OK):
        _missing(f'required tool missing: Python {version} (pyenv install '
                 f'{version})')
    return python


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago.

    Never returns the same port twice in one process, so that two servers of
    one test cannot be handed the same port before either binds it.
    """
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port
    raise RuntimeError('could not find a free port on %s' % HOST)


def _port_open(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect((HOST, port))
            return True
        except OSError:
            return False


def wait_for_port(port, timeout=10.0, process=None, log=None):
    """Wait until 127.0.0.1:port accepts connections.

    Optional `process` (a Popen): give up at once if it exits.  Optional
    `log`: a file whose tail goes into the error message.  Raises
    RuntimeError on timeout.
    """
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                'server process %d exited with status %s before listening '
                'on %s:%d%s' % (process.pid, process.returncode, HOST, port,
                                _log_excerpt(log)))
        if _port_open(port):
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(
                'nothing accepted connections on %s:%d within %.1f s (is the '
                'server running, and listening on that address?)%s'
                % (HOST, port, timeout, _log_excerpt(log)))
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _wait_for_log(path, offset, needle, process, timeout, what):
    """Wait until `needle` appears in the log after `offset`.

    A port that accepts connections might belong to someone else; the
    server's own "listening" line cannot.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, 'rb') as handle:
                handle.seek(offset)
                if needle.encode() in handle.read():
                    return
        except OSError:
            pass
        if process.poll() is not None:
            raise RuntimeError('%s exited with status %s before it was ready%s'
                               % (what, process.returncode,
                                  _log_excerpt(path)))
        if time.monotonic() >= deadline:
            raise RuntimeError('%s did not say %r within %.1f s%s'
                               % (what, needle, timeout, _log_excerpt(path)))
        time.sleep(0.02)


def tail(path, lines=LOG_TAIL_LINES):
    """Last lines of a text file, or '' if it cannot be read."""
    try:
        with open(path, 'rb') as handle:
            data = handle.read()
    except OSError:
        return ''
    text = data.decode('utf-8', 'replace')
    return '\n'.join(text.splitlines()[-lines:])


def _log_excerpt(path):
    if not path:
        return ''
    text = tail(path)
    indented = '\n'.join('    ' + line for line in text.splitlines())
    return '\n  last lines of %s:\n%s' % (path, indented or '    (empty)')


def isolated_env(home):
    """A copy of os.environ for child processes, with HOME isolated.

    HOME is `home` (created if missing), so ~/.gitconfig, ~/.ssh and the
    like of the person running the tests cannot leak in; system git config
    is off; author and committer are fixed; locale and time zone are fixed.
    GIT_* variables (except GIT_TRACE*), PG* variables and other leaky ones
    are removed.
    """
    os.makedirs(home, exist_ok=True)
    env = {key: value for key, value in os.environ.items()
           if key not in _LEAKY_VARIABLES
           and not (key.startswith('GIT_') and not key.startswith('GIT_TRACE'))
           and not key.startswith('PG')}
    env.update({
        'HOME': os.path.abspath(home),
        'GIT_CONFIG_NOSYSTEM': '1',
        'GIT_AUTHOR_NAME': 'Gitbackup Test',
        'GIT_AUTHOR_EMAIL': 'test@gitbackup.invalid',
        'GIT_COMMITTER_NAME': 'Gitbackup Test',
        'GIT_COMMITTER_EMAIL': 'test@gitbackup.invalid',
        'GIT_TERMINAL_PROMPT': '0',
        'LC_ALL': 'C.UTF-8',
        'TZ': 'UTC',
    })
    return env


def temp_dir(testcase, prefix='gitbackup-test-'):
    """A fresh temporary directory, removed when `testcase` finishes."""
    path = tempfile.mkdtemp(prefix=prefix)
    testcase.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def _run(argv, what, **kwargs):
    """Run a command; on failure raise RuntimeError with its output."""
    kwargs.setdefault('stdin', subprocess.DEVNULL)
    kwargs.setdefault('timeout', 120)
    try:
        result = subprocess.run(argv, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                universal_newlines=True, **kwargs)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError('%s failed: %s: %s'
                           % (what, ' '.join(map(shlex.quote, argv)), exc))
    if result.returncode != 0:
        raise RuntimeError('%s failed (exit %d): %s\n%s' % (
            what, result.returncode, ' '.join(map(shlex.quote, argv)),
            '\n'.join('    ' + line for line in result.stdout.splitlines())))
    return result.stdout


def make_identity(directory, name):
    """Create an ed25519 key pair, no passphrase: (key_path, pubkey_line)."""
    require_tools('ssh-keygen')
    os.makedirs(directory, exist_ok=True)
    key_path = os.path.join(os.path.abspath(directory), name)
    _run(['ssh-keygen', '-t', 'ed25519', '-N', '', '-C', name, '-f',
          key_path, '-q'], 'ssh-keygen')
    with open(key_path + '.pub') as handle:
        return key_path, handle.read().strip()


# ---------------------------------------------------------------------------
# Process handling


def _children_map():
    """{ppid: [pid, ...]} for every process visible in /proc."""
    children = {}
    for entry in os.listdir('/proc') if os.path.isdir('/proc') else ():
        if not entry.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % entry) as handle:
                stat = handle.read()
        except OSError:
            continue
        # Field 4 is the parent pid; field 2 (comm) may hold spaces.
        fields = stat[stat.rfind(')') + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _descendants(pid):
    """All processes below pid (they may have left its process group)."""
    children = _children_map()
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid, signum, group=False):
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise


def _alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    try:      # a zombie that nobody reaps counts as gone
        with open('/proc/%d/stat' % pid) as handle:
            return handle.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except (OSError, IndexError):
        return True


def _terminate_tree(process, timeout=STOP_TIMEOUT):
    """Stop a server started with start_new_session=True, and all below it.

    sshd puts each connection in a session of its own, so killing the
    process group is not enough.  Descendants are stopped leaves first
    (SIGTERM to every live process without live children, repeatedly), so
    each parent can reap its children -- an init that does not reap would
    otherwise collect zombies; SIGKILL what is left after `timeout`.  Then
    the server's process group gets SIGTERM (SIGKILL after `timeout`) and the
    server is reaped.
    """
    if process is None:
        return
    pid = process.pid
    if process.poll() is None:
        signalled = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            children = _children_map()
            tree, todo = [], [pid]
            while todo:
                for child in children.get(todo.pop(), ()):
                    tree.append(child)
                    todo.append(child)
            live = [member for member in tree if _alive(member)]
            if not live:
                if not tree or time.monotonic() > deadline - timeout + 1.0:
                    break           # gone, or zombies the parent won't reap
            for victim in live:
                if victim not in signalled and not any(
                        _alive(child) for child in children.get(victim, ())):
                    _signal(victim, signal.SIGTERM)
                    signalled.add(victim)
            time.sleep(0.02)
        for victim in _descendants(pid):
            if _alive(victim):
                _signal(victim, signal.SIGKILL)
    _signal(pid, signal.SIGTERM, group=True)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        _signal(pid, signal.SIGKILL, group=True)
        process.wait(timeout)


_running = set()


@atexit.register
def _stop_leftovers():
    for server in list(_running):
        try:
            server.stop()
        except Exception:   # at exit, do what can be done
            pass


class _Server:
    """start/stop bookkeeping shared by the servers below."""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False


# ---------------------------------------------------------------------------
# sshd


class SSHD(_Server):
    """A private sshd on 127.0.0.1 that lets the current user in by key.

    Everything lives in `workdir`: sshd_config, host key, authorized_keys,
    known_hosts and ssh_config for clients, pid file, sshd.log.  start()
    after stop() reuses the same port and keys, so clients keep working.
    """

    host = HOST

    def __init__(self, workdir):
        require_tools('sshd', 'ssh', 'ssh-keygen')
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.port = free_port()
        self.user = current_user()
        self.process = None
        self.host_key = os.path.join(self.workdir, 'ssh_host_ed25519_key')
        self.authorized_keys = os.path.join(self.workdir, 'authorized_keys')
        self.known_hosts = os.path.join(self.workdir, 'known_hosts')
        self.ssh_config = os.path.join(self.workdir, 'ssh_config')
        self.sshd_config = os.path.join(self.workdir, 'sshd_config')
        self.pid_file = os.path.join(self.workdir, 'sshd.pid')
        self.log = os.path.join(self.workdir, 'sshd.log')

        if not os.path.exists(self.host_key):
            _run(['ssh-keygen', '-t', 'ed25519', '-N', '', '-C',
                  'gitbackup-test-host', '-f', self.host_key, '-q'],
                 'ssh-keygen (host key)')
        with open(self.host_key + '.pub') as handle:
            host_pub = ' '.join(handle.read().split()[:2])
        if not os.path.exists(self.authorized_keys):
            _write(self.authorized_keys, '', 0o600)
        _write(self.known_hosts,
               '[%s]:%d %s\n' % (HOST, self.port, host_pub), 0o644)
        _write(self.ssh_config, '\n'.join([
            'Host %s' % HOST,
            '    UserKnownHostsFile %s' % _config_quote(self.known_hosts),
            '    GlobalKnownHostsFile /dev/null',
            '    StrictHostKeyChecking yes',
            '    UpdateHostKeys no',
            '    BatchMode yes',
            '    IdentitiesOnly yes',
            '    PasswordAuthentication no',
            '    KbdInteractiveAuthentication no',
            '    ControlMaster no',
            '    ControlPath none',
            '    ConnectTimeout 5',
            '    LogLevel ERROR',
            '']), 0o644)
        _write(self.sshd_config, '\n'.join([
            '# private sshd for gitbackup tests',
            'ListenAddress %s:%d' % (HOST, self.port),
            'HostKey %s' % _config_quote(self.host_key),
            'PidFile %s' % _config_quote(self.pid_file),
            'AuthorizedKeysFile %s' % _config_quote(self.authorized_keys),
            'StrictModes no',
            'UsePAM no',
            'PasswordAuthentication no',
            'KbdInteractiveAuthentication no',
            'PubkeyAuthentication yes',
            'PermitRootLogin prohibit-password',
            'Subsystem sftp internal-sftp',
            'LogLevel VERBOSE',
            'AllowUsers %s' % self.user,
            '']), 0o644)

    def add_key(self, pubkey_line, options=''):
        """Allow a key, with authorized_keys options (e.g. 'restrict')."""
        line = ('%s %s' % (options, pubkey_line.strip())).strip()
        with open(self.authorized_keys, 'a') as handle:
            handle.write(line + '\n')

    def add_config(self, text, users=()):
        """Append sshd_config lines (e.g. a Match block, which must come
        last) and let more accounts in (AllowUsers); before start()."""
        with open(self.sshd_config) as handle:
            lines = handle.read().splitlines()
        lines = [' '.join([line, *users]) if line.startswith('AllowUsers ')
                 else line for line in lines]
        _write(self.sshd_config, '\n'.join(lines + text.splitlines()) + '\n',
               0o644)

    def ssh_command(self, key_path):
        """'ssh -F <ssh_config> -i <key>', for GIT_SSH_COMMAND or the like."""
        return 'ssh -F %s -i %s' % (shlex.quote(self.ssh_config),
                                    shlex.quote(os.path.abspath(key_path)))

    def url(self, path):
        """ssh:// URL of an absolute path on this server."""
        return 'ssh://%s@%s:%d%s' % (self.user, HOST, self.port,
                                     os.path.abspath(path))

    def start(self):
        if self.process is not None and self.process.poll() is None:
            return
        if _is_root() and not os.path.isdir(SSHD_PRIVSEP_DIR):
            os.makedirs(SSHD_PRIVSEP_DIR, 0o755, exist_ok=True)
            os.chmod(SSHD_PRIVSEP_DIR, 0o755)
        _run([SSHD_PATH, '-t', '-f', self.sshd_config],
             'sshd configuration test')
        if _is_root() and _shadow_locked(self.user):
            raise RuntimeError(
                'sshd (UsePAM no) refuses the locked account %r: its '
                '/etc/shadow password starts with "!"; unlock it for key '
                "logins with: usermod -p '*' %s" % (self.user, self.user))
        with open(self.log, 'ab') as log:
            offset = log.tell()
            self.process = subprocess.Popen(
                [SSHD_PATH, '-D', '-e', '-f', self.sshd_config],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.workdir, start_new_session=True)
        _running.add(self)
        try:
            _wait_for_log(self.log, offset, 'Server listening on %s port %d'
                          % (HOST, self.port), self.process, START_TIMEOUT,
                          'sshd')
            wait_for_port(self.port, START_TIMEOUT, self.process, self.log)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError('sshd did not start: %s' % exc) from None

    def stop(self):
        _running.discard(self)
        process, self.process = self.process, None
        _terminate_tree(process)

    def restart(self):
        self.stop()
        self.start()


def _shadow_locked(user):
    """True if sshd without PAM would call `user` locked (root can tell)."""
    try:
        with open('/etc/shadow') as handle:
            for line in handle:
                fields = line.split(':')
                if fields[0] == user and len(fields) > 1:
                    return fields[1].startswith('!')
    except OSError:
        pass
    return False


def _config_quote(path):
    """Quote a path for ssh_config/sshd_config when it needs it."""
    if any(char.isspace() or char in '"\'#' for char in path):
        if '"' in path:
            raise ValueError('cannot quote %r for an ssh configuration' % path)
        return '"%s"' % path
    return path


def _grant_traversal(workdir):
    """Let another account (postgres, postfix) reach workdir.

    workdir becomes 0755; its parents up to the temp directory get o+x
    when we own them.  Directories outside the temp directory are not
    touched.
    """
    os.chmod(workdir, 0o755)
    top = os.path.realpath(tempfile.gettempdir())
    path = os.path.dirname(os.path.realpath(workdir))
    while path.startswith(top + os.sep):
        info = os.stat(path)
        if info.st_uid == os.getuid() and not info.st_mode & 0o001:
            os.chmod(path, (info.st_mode & 0o7777) | 0o001)
        path = os.path.dirname(path)


def _write(path, text, mode):
    with open(path, 'w') as handle:
        handle.write(text)
    os.chmod(path, mode)


# ---------------------------------------------------------------------------
# git daemon


class GitDaemon(_Server):
    """`git daemon` on 127.0.0.1 exporting every repository under base_path."""

    host = HOST

    def __init__(self, base_path, workdir):
        require_tools('git', 'git-daemon')
        self.base_path = os.path.abspath(base_path)
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.port = free_port()
        self.log = os.path.join(self.workdir, 'git-daemon.log')
        self.process = None

    def url(self, relpath):
        return 'git://%s:%d/%s' % (HOST, self.port, relpath.lstrip('/'))

    def start(self):
        if self.process is not None and self.process.poll() is None:
            return
        argv = ['git', 'daemon', '--reuseaddr', '--verbose',
                '--listen=%s' % HOST, '--port=%d' % self.port,
                '--base-path=%s' % self.base_path, '--export-all',
                '--informative-errors', self.base_path]
        env = isolated_env(os.path.join(self.workdir, 'git-daemon-home'))
        with open(self.log, 'ab') as log:
            offset = log.tell()
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.workdir, env=env, start_new_session=True)
        _running.add(self)
        try:
            _wait_for_log(self.log, offset, 'Ready to rumble', self.process,
                          START_TIMEOUT, 'git daemon')
            wait_for_port(self.port, START_TIMEOUT, self.process, self.log)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError('git daemon did not start: %s' % exc) from None

    def stop(self):
        _running.discard(self)
        process, self.process = self.process, None
        _terminate_tree(process)


# ---------------------------------------------------------------------------
# PostgreSQL


class PostgresCluster(_Server):
    """A private PostgreSQL cluster in workdir, unix socket only.

    workdir/pgdata holds the cluster, workdir/socket the socket, and
    workdir/postgres.log the server log.  As root the server programs run as
    the `postgres` account (via runuser), which is given the directories it
    needs and the right to traverse to them.
    """

    def __init__(self, workdir):
        as_postgres = _is_root()
        require_tools('initdb', 'pg_ctl', 'postgres', 'psql',
                      *(['runuser'] if as_postgres else []))
        self.bindir = pg_bindir()
        self.workdir = os.path.abspath(workdir)
        self.port = free_port()      # only names the socket file
        self.data = os.path.join(self.workdir, 'pgdata')
        self.socket_dir = os.path.join(self.workdir, 'socket')
        self.log = os.path.join(self.workdir, 'postgres.log')
        self.initdb_log = os.path.join(self.workdir, 'initdb.log')
        self._owner = None
        if as_postgres:
            try:
                self._owner = pwd.getpwnam(POSTGRES_USER)
            except KeyError:
                _missing('the %r account is missing (Debian package: '
                         'postgresql)' % POSTGRES_USER)
        socket_path = os.path.join(self.socket_dir, '.s.PGSQL.%d' % self.port)
        if len(socket_path.encode()) > 107:
            raise RuntimeError('unix socket path too long (%d bytes, max 107):'
                               ' %s; use a shorter TMPDIR'
                               % (len(socket_path.encode()), socket_path))
        os.makedirs(self.workdir, exist_ok=True)
        for path, mode in ((self.data, 0o700), (self.socket_dir, 0o755)):
            os.makedirs(path, exist_ok=True)
            os.chmod(path, mode)
        if not os.path.exists(self.log):
            _write(self.log, '', 0o644)
        if self._owner:
            self._grant_traversal()
            for path in (self.data, self.socket_dir, self.log):
                os.chown(path, self._owner.pw_uid, self._owner.pw_gid)
        self._started = False

    def _grant_traversal(self):
        """Let the postgres account reach workdir (mkdtemp makes it 0700)."""
        _grant_traversal(self.workdir)

    def _server_argv(self, argv):
        """Run as the postgres account when we are root."""
        if self._owner:
            return ['runuser', '-u', self._owner.pw_name, '--'] + argv
        return argv

    def _server_env(self):
        env = {key: value for key, value in os.environ.items()
               if not key.startswith('PG')}
        env['LC_ALL'] = 'C.UTF-8'
        env['TZ'] = 'UTC'
        return env

    def env(self):
        """Variables that point libpq clients at this cluster."""
        return {'PGHOST': self.socket_dir, 'PGPORT': str(self.port),
                'PGUSER': 'postgres'}

    def _initdb(self):
        if os.path.exists(os.path.join(self.data, 'PG_VERSION')):
            return
        outputs = []
        for locale in ('C.UTF-8', 'C'):
            argv = self._server_argv([
                os.path.join(self.bindir, 'initdb'), '-D', self.data,
                '--auth=trust', '-U', 'postgres', '-E', 'UTF8',
                '--locale=%s' % locale, '--no-sync'])
            result = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, universal_newlines=True,
                cwd=self.workdir, env=self._server_env(), timeout=120)
            outputs.append('$ %s\n%s' % (' '.join(map(shlex.quote, argv)),
                                         result.stdout))
            with open(self.initdb_log, 'a') as handle:
                handle.write(outputs[-1])
            if result.returncode == 0:
                return
            self._empty_data_dir()
        raise RuntimeError('initdb failed in %s:\n%s'
                           % (self.data, '\n'.join(outputs)))

    def _empty_data_dir(self):
        for name in os.listdir(self.data):
            path = os.path.join(self.data, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)

    def start(self):
        if self._started and self._postmaster_pid():
            return
        self._initdb()
        options = ' '.join([
            '-k', shlex.quote(self.socket_dir),
            "-c listen_addresses=''",
            '-p', str(self.port),
            '-c fsync=off',          # throw-away data: speed over durability
        ])
        argv = self._server_argv([
            os.path.join(self.bindir, 'pg_ctl'), '-w', '-t', str(int(
                START_TIMEOUT * 2)), '-D', self.data, '-l', self.log,
            '-o', options, 'start'])
        _running.add(self)
        self._started = True
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, universal_newlines=True,
            cwd=self.workdir, env=self._server_env(), timeout=120)
        if result.returncode != 0:
            self.stop()
            raise RuntimeError('PostgreSQL did not start (pg_ctl exit %d): %s'
                               '\n%s%s' % (
                                   result.returncode,
                                   ' '.join(map(shlex.quote, argv)),
                                   result.stdout.rstrip(),
                                   _log_excerpt(self.log)))

    def _postmaster_pid(self):
        try:
            with open(os.path.join(self.data, 'postmaster.pid')) as handle:
                pid = int(handle.readline().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def stop(self):
        _running.discard(self)
        self._started = False
        pid = self._postmaster_pid()
        if pid is None:
            return
        argv = self._server_argv([
            os.path.join(self.bindir, 'pg_ctl'), '-w', '-t',
            str(int(STOP_TIMEOUT)), '-D', self.data, '-m', 'fast', 'stop'])
        try:
            subprocess.run(argv, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, cwd=self.workdir,
                           env=self._server_env(), timeout=STOP_TIMEOUT + 5)
        except subprocess.TimeoutExpired:
            pass
        if not _alive(pid):
            return
        # pg_ctl could not stop it: immediate shutdown, then kill.
        victims = _descendants(pid)
        _signal(pid, signal.SIGQUIT)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        for victim in [pid] + victims:
            if _alive(victim):
                _signal(victim, signal.SIGKILL)

    def psql(self, sql, db='postgres'):
        """Run SQL with psql; return its unaligned, tuples-only output."""
        argv = [pg_tool('psql'), '-X', '-A', '-t', '-v', 'ON_ERROR_STOP=1',
                '-d', db, '-c', sql]
        env = {key: value for key, value in os.environ.items()
               if not key.startswith('PG')}
        env.update(self.env())
        result = subprocess.run(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, env=env,
            timeout=120)
        if result.returncode != 0:
            raise RuntimeError('psql failed (exit %d) on %r:\n%s'
                               % (result.returncode, sql,
                                  result.stderr.rstrip()))
        return result.stdout.strip()


# ---------------------------------------------------------------------------
# Postfix


POSTFIX_MAIN_CF = """\
# A private instance for the tests: local delivery only, nothing relayed.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
mail_spool_directory = {spool}
maillog_file = {maillog}
maillog_file_prefixes = {workdir}
syslog_name = postfix-gitbackup-test
mail_owner = postfix
setgid_group = postdrop
myhostname = gitbackup-test.invalid
mydomain = invalid
myorigin = $myhostname
mydestination = $myhostname, localhost
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
default_transport = error
relay_transport = error
alias_maps =
alias_database =
home_mailbox =
mailbox_command =
biff = no
"""
# No chroot (the queue directory would need copies of /etc files), and only
# the services local delivery needs.
POSTFIX_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup     unix n - n 60 1 pickup
cleanup    unix n - n -  0 cleanup
qmgr       unix n - n 300 1 qmgr
rewrite    unix - - n -  - trivial-rewrite
bounce     unix - - n -  0 bounce
defer      unix - - n -  0 bounce
trace      unix - - n -  0 bounce
verify     unix - - n -  1 verify
flush      unix n - n 1000? 0 flush
proxymap   unix - - n -  - proxymap
proxywrite unix - - n -  1 proxymap
showq      unix n - n -  - showq
error      unix - - n -  - error
retry      unix - - n -  - error
discard    unix - - n -  - discard
local      unix - n n -  - local
anvil      unix - - n -  1 anvil
scache     unix - - n -  1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


class Postfix(_Server):
    """A private Postfix on 127.0.0.1:port that delivers locally only.

    workdir/conf holds main.cf and master.cf, workdir/queue the queue,
    workdir/mail the mbox files (one per local user), workdir/maillog the
    log.  Mail for other domains bounces (default_transport = error).
    `env()` points Postfix's own /usr/sbin/sendmail at this instance
    (MAIL_CONFIG; postdrop honours it for root).  Runs as root only.
    """

    POSTFIX = SBIN_TOOLS['postfix']
    SENDMAIL = SBIN_TOOLS['sendmail']

    def __init__(self, workdir):
        require_tools('postfix', 'sendmail')
        if not _is_root():
            _missing('a private postfix needs root (its master process '
                     'runs as root)')
        for name, lookup in (('postfix', pwd.getpwnam),
                             ('postdrop', grp.getgrnam)):
            try:
                lookup(name)
            except KeyError:
                _missing('the %r account is missing (Debian package: '
                         'postfix)' % name)
        self.workdir = os.path.abspath(workdir)
        self.port = free_port()
        self.conf = os.path.join(self.workdir, 'conf')
        self.queue = os.path.join(self.workdir, 'queue')
        self.data = os.path.join(self.workdir, 'data')
        self.spool = os.path.join(self.workdir, 'mail')
        self.log = os.path.join(self.workdir, 'maillog')
        self.out = os.path.join(self.workdir, 'postfix.out')
        for path in (self.workdir, self.conf, self.queue, self.data,
                     self.spool):
            os.makedirs(path, exist_ok=True)
            os.chmod(path, 0o755)
        _grant_traversal(self.workdir)
        owner = pwd.getpwnam('postfix')
        os.chown(self.data, owner.pw_uid, owner.pw_gid)
        _write(os.path.join(self.conf, 'main.cf'), POSTFIX_MAIN_CF.format(
            queue=self.queue, data=self.data, spool=self.spool,
            maillog=self.log, workdir=self.workdir), 0o644)
        _write(os.path.join(self.conf, 'master.cf'), POSTFIX_MASTER_CF.format(
            listen='%s:%d' % (HOST, self.port)), 0o644)
        self.process = None

    @property
    def address(self):
        return '%s:%d' % (HOST, self.port)

    def env(self):
        """Variables that make /usr/sbin/sendmail use this instance."""
        return {'MAIL_CONFIG': self.conf}

    def _env(self):
        return {**os.environ, 'LC_ALL': 'C', 'TZ': 'UTC', **self.env()}

    def start(self):
        if self.process is not None and self.process.poll() is None:
            return
        offset = os.path.getsize(self.log) if os.path.exists(self.log) else 0
        with open(self.out, 'ab') as out:
            self.process = subprocess.Popen(
                [self.POSTFIX, '-c', self.conf, 'start-fg'],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                cwd=self.workdir, env=self._env(), start_new_session=True)
        _running.add(self)
        try:
            _wait_for_log(self.log, offset, 'daemon started', self.process,
                          START_TIMEOUT, 'postfix')
            wait_for_port(self.port, START_TIMEOUT, self.process, self.log)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError('postfix did not start: %s%s'
                               % (exc, _log_excerpt(self.out))) from None

    def stop(self):
        _running.discard(self)
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            try:   # the master stops its children and exits
                subprocess.run([self.POSTFIX, '-c', self.conf, 'stop'],
                               stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=self._env(),
                               timeout=STOP_TIMEOUT)
                process.wait(STOP_TIMEOUT)
            except (OSError, subprocess.SubprocessError):
                pass
        _terminate_tree(process)   # whatever `postfix stop` left

    def mailbox(self, user):
        return os.path.join(self.spool, user)

    def wait_for_mail(self, user, count, timeout=30.0):
        """The messages in user's mbox (email.message.EmailMessage, policy
        default), once it holds `count` of them; RuntimeError after
        `timeout` seconds, with the tail of the mail log."""
        deadline = time.monotonic() + timeout
        while True:
            messages = []
            if os.path.exists(self.mailbox(user)):
                box = mailbox.mbox(self.mailbox(user), create=False)
                try:
                    messages = [email.parser.BytesParser(
                        policy=email.policy.default).parsebytes(
                            box.get_bytes(key)) for key in box.keys()]
                finally:
                    box.close()
            if len(messages) >= count:
                return messages
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    '%d of %d messages in %s after %.0f s%s'
                    % (len(messages), count, self.mailbox(user), timeout,
                       _log_excerpt(self.log)))
            time.sleep(0.1)


# ---------------------------------------------------------------------------
# prometheus-node-exporter


class NodeExporter(_Server):
    """prometheus-node-exporter on 127.0.0.1:port with only the textfile
    collector (reading textfile_dir) and no metrics about itself."""

    PROGRAM = 'prometheus-node-exporter'

    def __init__(self, textfile_dir, workdir):
        require_tools(self.PROGRAM)
        self.textfile_dir = os.path.abspath(textfile_dir)
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.port = free_port()
        self.log = os.path.join(self.workdir, 'node-exporter.log')
        self.process = None

    def url(self, path='/metrics'):
        return 'http://%s:%d%s' % (HOST, self.port, path)

    def start(self):
        if self.process is not None and self.process.poll() is None:
            return
        argv = [shutil.which(self.PROGRAM), '--collector.disable-defaults',
                '--collector.textfile',
                '--collector.textfile.directory=%s' % self.textfile_dir,
                '--web.disable-exporter-metrics',
                '--web.listen-address=%s:%d' % (HOST, self.port)]
        with open(self.log, 'ab') as log:
            offset = log.tell()
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                cwd=self.workdir, start_new_session=True)
        _running.add(self)
        try:
            _wait_for_log(self.log, offset, 'Listening on', self.process,
                          START_TIMEOUT, 'node exporter')
            wait_for_port(self.port, START_TIMEOUT, self.process, self.log)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError('node exporter did not start: %s'
                               % exc) from None

    def scrape(self):
        """The text of one scrape of /metrics."""
        with urllib.request.urlopen(self.url(), timeout=10) as response:
            return response.read().decode('utf-8')

    def stop(self):
        _running.discard(self)
        process, self.process = self.process, None
        _terminate_tree(process)
