"""postgresdb: back up PostgreSQL databases with pg_dump (client side).

``postgresdb <database>`` dumps one database; ``postgresdb all`` dumps every
database that is not a template and accepts connections (listed with psql),
plus ``pg_dumpall --globals-only`` (roles, tablespaces) as a plain SQL file.
Each database becomes one custom-format dump (``pg_dump -Fc``: compressed,
restorable table by table with ``pg_restore``), streamed to a file in the
request's directory of export_dir and offered to the node as one ``sftp``
server request with its sha256 and size, and with it, as a companion file
``<dump>.stats.json``, every table's live-row estimate at dump time (for the
node's restore drill).  A file appears under its final
name only when its dump exited 0: a node is never offered half a dump.

The programs are run as ``[client] pg_dump``, ``pg_dumpall`` and ``psql``
say, so a prefix such as ``sudo -n -u postgres pg_dump`` works (see the
sudoers lines in docs/modules.md).  The server is found through the usual
libpq environment (PGHOST, PGPORT, PGUSER, ~/.pgpass ...) or
``[client] pg_host`` (host name or socket directory), ``pg_port`` and
``pg_user``, passed as command-line options so that they survive sudo.

A dump that fails (no such database, server down, permission denied) fails
that request only, with pg_dump's own message; ``send`` retries it and the
other requests go on.  Within ``all``, a database whose dump fails becomes
a request of its own (retried and given up on by itself, the admins
mailed) while the other databases are sent.
"""

import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile

from modules import _core as core
from modules._core import clean_text

ALL = 'all'
# Database names accepted on the command line: what people actually use.
# No '=' (libpq would read a connection string), no leading '-' (an option).
DATABASE_RE = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.$-]{0,62}$')
GLOBALS_FILE = 'globals.sql'
# Row estimates of every user table, one JSON array (names stay exact).
ROW_COUNTS = ("SELECT coalesce(json_agg(json_build_array(schemaname, relname, "
              "n_live_tup) ORDER BY schemaname, relname), '[]') "
              "FROM pg_stat_user_tables")
STATS_SUFFIX = '.stats.json'
# Node side: the files this module stores (pg_dump -Fc) and the companion
# beside each (its tables' row counts at dump time).  globals.sql is plain
# SQL that nothing here proves: it is checked by its sha256 only.
STORED_SUFFIXES = ('.dump',)
COMPANION_SUFFIXES = (STATS_SUFFIX,)
LIST_DATABASES = ("SELECT datname FROM pg_database "
                  "WHERE NOT datistemplate AND datallowconn ORDER BY datname")


def check_path(ctx, module, path):
    """'all' or a plain database name; the database itself is looked up
    only when the request is prepared (the server may be down now)."""
    if path == ALL or DATABASE_RE.match(path):
        return path
    raise ValueError(f'{path!r}: not a database name (letters, digits, '
                     f'_ . $ -) nor "{ALL}"')


def connection_options(settings):
    """-h/-p/-U from [client] pg_host, pg_port, pg_user (empty: libpq's
    environment and defaults decide)."""
    options = []
    for key, option in (('pg_host', '--host'), ('pg_port', '--port'),
                        ('pg_user', '--username')):
        if settings.get(key):
            options.append(f'{option}={settings[key]}')
    return options


def conninfo_dbname(name):
    """A connection string naming one database, quoted the libpq way, so
    that any name listed by the server (spaces, '=' ...) means itself."""
    return "dbname='%s'" % name.replace('\\', '\\\\').replace("'", "\\'")


def dump_file_name(name):
    """A file name for the dump of one database, safe and distinct: odd
    characters become '_' plus a short hash of the real name."""
    slug = re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('._-')[:80]
    if slug != name or not slug:
        slug = (slug or 'db') + '-' + \
            hashlib.sha256(name.encode('utf-8')).hexdigest()[:8]
    return slug + '.dump'


def command(ctx, key):
    words = shlex.split(ctx.settings[key])
    if not words:
        raise ctx.ModuleError(f'[client] {key} is empty')
    return words


def check_connection(ctx):
    """`client.py check --connect`: each configured program runs as
    configured (a sudo prefix needs its sudoers line: sudo -n fails
    without one instead of asking), and psql reaches the server.  Returns
    [(what was tried, '' or what fails and how to fix it)]."""
    if ctx.side != 'client':
        return []
    checks = []
    for key in ('pg_dump', 'pg_dumpall', 'psql'):
        what = f'[client] {key} = {ctx.settings[key]}'
        checks.append((what, program_problem(ctx, key, ['--version'])))
    if not checks[-1][1]:
        checks.append(('PostgreSQL server (psql: SELECT 1)', program_problem(
            ctx, 'psql', ['-X', '-A', '-t', '-q', *connection_options(
                ctx.settings), '--dbname=postgres', '--command', 'SELECT 1'])))
    return checks


def program_problem(ctx, key, args):
    """'' when [client] <key> runs args, else its error and the fix."""
    try:
        words = command(ctx, key)
        proc = ctx.run(words + args, check=False, timeout=60)
    except (ctx.ModuleError, ctx.ToolMissing, ctx.CommandFailed) as e:
        return ctx.clean_text(str(e))
    if proc.returncode == 0:
        return ''
    error = ctx.clean_text(proc.stderr.strip(), 300) or \
        f'exit {proc.returncode}'
    if os.path.basename(words[0]) == 'sudo' and 'sudo:' in proc.stderr:
        return (f'{error}: add the sudoers line for it (docs/modules.md, '
                '"PostgreSQL"), visudo -f /etc/sudoers.d/gitbackup')
    return f'{error}: fix [client] {key}, pg_host, pg_port or pg_user'


def list_databases(ctx):
    """Every database that is not a template and allows connections."""
    args = command(ctx, 'psql') + [
        '-X', '-A', '-t', '-q', '-v', 'ON_ERROR_STOP=1',
        *connection_options(ctx.settings)]
    errors = []
    # Like pg_dumpall: the 'postgres' database, else template1.
    for maintenance_db in ('postgres', 'template1'):
        proc = ctx.run(args + [f'--dbname={maintenance_db}',
                               '--command', LIST_DATABASES],
                       check=False, timeout=300)
        if proc.returncode == 0:
            return [line for line in proc.stdout.split('\n') if line]
        errors.append(proc.stderr.strip())
    raise ctx.ModuleError('cannot list the databases (psql failed): '
                          + ' / '.join(e[-500:] for e in errors if e))


def dump(ctx, args, filename, what):
    """Stream one dump into the export directory, publish it, return the
    published path."""
    path = ctx.export_path(filename)
    status, stderr = ctx.stream_command_to_file(args, path)
    if status != 0:
        try:
            os.unlink(path + '.part')
        except OSError:
            pass
        raise ctx.ModuleError(f'{what} failed (exit {status}): '
                              f'{stderr.strip()[-1000:] or "no message"}')
    if stderr.strip():
        ctx.log.warning('%s: %s', what, stderr.strip()[-500:])
    ctx.publish(path)
    return path


def record_row_counts(ctx, database, filename):
    """Write <dump>.stats.json: every user table's live-row estimate
    (pg_stat_user_tables.n_live_tup, kept by the statistics collector, so
    reading it costs the database nothing noticeable), taken just before
    the dump.  The node's drill compares a restored dump's row counts with
    it.  Statistics are a nicety: if they cannot be read, the dump goes
    without them (with a warning).  Returns the file, or None."""
    proc = ctx.run(command(ctx, 'psql') + [
        '-X', '-A', '-t', '-q', '-v', 'ON_ERROR_STOP=1',
        *connection_options(ctx.settings),
        f'--dbname={conninfo_dbname(database)}', '--command', ROW_COUNTS],
        check=False, timeout=300)
    try:
        tables = json.loads(proc.stdout) if proc.returncode == 0 else None
    except ValueError:
        tables = None
    if not isinstance(tables, list):
        ctx.log.warning('no row statistics for database %r: %s', database,
                        proc.stderr.strip()[-300:])
        return None
    path = ctx.export_path(filename + STATS_SUFFIX)
    ctx.atomic_write(path, json.dumps({
        'database': database, 'dump': filename, 'recorded': ctx.now(),
        'source': 'pg_stat_user_tables.n_live_tup',
        'tables': [{'schema': t[0], 'table': t[1], 'rows': t[2]}
                   for t in tables if isinstance(t, list) and len(t) == 3]},
        indent=1, sort_keys=True) + '\n')
    return path


def prepare(ctx, module, path):
    check_path(None, module, path)
    connection = connection_options(ctx.settings)
    if path == ALL:
        databases = list_databases(ctx)
        ctx.log.info('postgresdb all: %d database(s): %s', len(databases),
                     ', '.join(databases))
        globals_file = dump(
            ctx, command(ctx, 'pg_dumpall') + ['--globals-only', *connection],
            GLOBALS_FILE, 'pg_dumpall --globals-only')
        yield 'globals', ctx.sftp_request(globals_file, source=module)
    else:
        databases = [path]
    names = set()
    for database in databases:
        filename = dump_file_name(database)
        if filename in names:
            raise ctx.ModuleError(f'two databases map to the file name '
                                  f'{filename}; rename one of them')
        names.add(filename)
        stats = None
        try:
            stats = record_row_counts(ctx, database, filename)
            dumped = dump(
                ctx, command(ctx, 'pg_dump') + [
                    '--format=custom', *connection,
                    f'--dbname={conninfo_dbname(database)}'],
                filename, f'pg_dump of database {database!r}')
        except ctx.ModuleError as e:
            if stats:
                os.unlink(stats)    # statistics of a dump never sent
            if path != ALL:
                raise
            # One broken database must not stop the others: it becomes a
            # request of its own, retried and given up on by itself.
            ctx.request_separately(module, database, e)
            continue
        yield 'db-' + filename[:-len('.dump')], \
            ctx.sftp_request(dumped, source=module, companion=stats)


# -- node side: proving what this module stored -----------------------------

def verify_stored(path, timeout):
    """`verify`'s read-back of one stored dump: pg_restore lists it.
    Raises FileNotFoundError when pg_restore is missing (a check that
    could not run), ValueError when the dump does not read back."""
    proc = subprocess.run(['pg_restore', '--list', '--', path],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)
    if proc.returncode != 0:
        raise ValueError(f'pg_restore --list failed (exit '
                         f'{proc.returncode}): '
                         f'{clean_text(proc.stderr.strip(), 500)}')


def drill_stored(ctx, names, scratch):
    """`drill`'s proof of a snapshot's dumps (ctx.snapshot; their sha256
    already checked): restored into a scratch cluster with their row
    counts compared when [server] drill_postgres is set, else read back
    with pg_restore --list.  Returns (problems, what was proven)."""
    bindir = ctx.node_settings.get('drill_postgres')
    problems = []
    if not bindir:
        for name in names:
            try:
                verify_stored(os.path.join(ctx.snapshot, name), ctx.timeout)
            except (OSError, ValueError) as e:
                problems.append(f'{os.path.join(ctx.snapshot, name)}: '
                                f'restore check failed: {e}')
        return problems, (f'{len(names)} dump(s) read back with pg_restore '
                          '--list only ([server] drill_postgres not set)')
    with ScratchCluster(bindir, ctx.timeout) as cluster:
        for n, name in enumerate(names):
            stats = core.read_json(os.path.join(ctx.snapshot,
                                                name + STATS_SUFFIX))
            problems += [f'{name}: {p}' for p in drill_dump_rows(
                cluster, os.path.join(ctx.snapshot, name),
                stats if isinstance(stats, dict) else None, f'drill{n}')]
    return problems, (f'{len(names)} dump(s) restored into a scratch '
                      'cluster, row counts compared')


# A restored table with fewer than this fraction of the rows recorded at
# dump time fails the drill (n_live_tup is an estimate, not a count).
ROWS_FLOOR = 0.5


class ScratchCluster:
    """A throw-away PostgreSQL cluster for drills: initdb in a temporary
    directory, unix socket only, trust auth, run as the `postgres` account
    when we are root (postgres refuses to run as root); removed on exit."""

    def __init__(self, bindir, timeout):
        self.bindir, self.timeout = bindir, timeout
        self.as_postgres = ['runuser', '-u', 'postgres', '--'] \
            if os.geteuid() == 0 else []

    def tool(self, name):
        path = os.path.join(self.bindir, name)
        return path if os.path.exists(path) else name

    def __enter__(self):
        # /tmp, not data_dir: the postgres account must reach it, and the
        # socket path must stay short.
        self.work = tempfile.mkdtemp(prefix='gitbackup-drill-pg-')
        os.chmod(self.work, 0o755)
        self.data = os.path.join(self.work, 'data')
        os.mkdir(self.data, 0o700)
        if self.as_postgres:
            owner = pwd.getpwnam('postgres')
            os.chown(self.data, owner.pw_uid, owner.pw_gid)
            os.chown(self.work, owner.pw_uid, owner.pw_gid)
        env = {**os.environ, 'LC_ALL': 'C'}
        try:
            core.run(self.as_postgres + [
                self.tool('initdb'), '-D', self.data, '--auth=trust', '-U',
                'postgres', '-E', 'UTF8', '--locale=C', '--no-sync'],
                env=env, cwd=self.work, timeout=self.timeout)
            core.run(self.as_postgres + [
                self.tool('pg_ctl'), '-w', '-t', '120', '-D', self.data,
                '-l', os.path.join(self.work, 'log'), '-o',
                f"-k {self.work} -c listen_addresses='' -c fsync=off",
                'start'], env=env, cwd=self.work, timeout=self.timeout)
        except BaseException:
            shutil.rmtree(self.work, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc):
        core.run(self.as_postgres + [self.tool('pg_ctl'), '-w', '-D',
                                     self.data, '-m', 'immediate', 'stop'],
                 check=False, cwd=self.work, timeout=120)
        shutil.rmtree(self.work, ignore_errors=True)

    def run(self, program, *args, check=True):
        env = {k: v for k, v in os.environ.items() if not k.startswith('PG')}
        env.update({'PGHOST': self.work, 'PGUSER': 'postgres'})
        return core.run([self.tool(program), *args], env=env, check=check,
                        timeout=self.timeout)


def quote_ident(name):
    return '"' + str(name).replace('"', '""') + '"'


def drill_dump_rows(cluster, dump, stats, database):
    """Restore one dump into the scratch cluster; compare every table's
    row count with the client's statistics.  Problems, [] when fine."""
    cluster.run('psql', '-X', '-q', '-d', 'postgres', '-c',
                f'CREATE DATABASE {quote_ident(database)}')
    # Without the globals the dump's owners and grants would not resolve:
    # the drill proves data, so they are left out.
    proc = cluster.run('pg_restore', '--exit-on-error', '--no-owner',
                       '--no-privileges', '-d', database, '--', dump,
                       check=False)
    if proc.returncode != 0:
        return [f'pg_restore failed: {clean_text(proc.stderr, 500)}']
    problems = []
    for table in (stats or {}).get('tables') or []:
        name = f'{quote_ident(table.get("schema"))}.' \
            f'{quote_ident(table.get("table"))}'
        got = cluster.run('psql', '-X', '-A', '-t', '-q', '-d', database,
                          '-c', f'SELECT count(*) FROM {name}', check=False)
        recorded = int(table.get('rows') or 0)
        rows = int(got.stdout.strip()) if got.returncode == 0 and \
            got.stdout.strip().isdigit() else None
        if rows is None:
            problems.append(f'table {clean_text(name)} did not come back')
        elif recorded > 0 and (rows == 0 or rows < recorded * ROWS_FLOOR):
            problems.append(f'table {clean_text(name)}: {rows} rows '
                            f'restored, {recorded} recorded at dump time')
    return problems
