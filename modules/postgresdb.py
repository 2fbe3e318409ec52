"""postgresdb: back up PostgreSQL databases with pg_dump, and everything
the node knows about those dumps (verify, drill, restore).

``postgresdb <database>`` dumps one database; ``postgresdb all`` dumps every
database that is not a template and accepts connections (listed with psql),
plus ``pg_dumpall --globals-only`` (roles, tablespaces) as a plain SQL file.
Each database becomes one custom-format dump (``pg_dump -Fc``: compressed,
restorable table by table with ``pg_restore``), streamed to a file in the
request's directory of export_dir and offered to the node as one ``sftp``
server request with its sha256 and size, and with it, as a companion file
``<dump>.stats.json``, every table's exact row count, taken in the very
snapshot pg_dump read (``[client] pg_row_counts``; for the node's restore
drill).  A file appears under its final name only when its dump exited 0:
a node is never offered half a dump.

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
mailed) while the other databases are sent.  A database that refuses
connections (datallowconn = false) cannot be dumped: ``all`` names it in
a warning.

On the node (Python 3.8+, below "Node side"): ``verify_stored`` reads a
dump back; ``drill_stored`` restores a snapshot's dumps in a scratch
cluster where they have no power (a role that is no superuser, a socket
only the drill reaches, reaped if a drill is killed) and holds the row
counts against the statistics; ``restore_script`` writes the psql script
that recreates roles, then one database exactly.
"""

import hashlib
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from modules import _core as core
from modules._core import clean_text

ALL = 'all'
# Database names accepted on the command line: what people actually use.
# No '=' (libpq would read a connection string), no leading '-' (an option).
DATABASE_RE = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.$-]{0,62}$')
GLOBALS_FILE = 'globals.sql'
# Every table pg_dump dumps the rows of (ordinary tables and partitions,
# not an extension's), with its exact row count, as one JSON array of
# [schema, table, rows] (names stay exact).  ONLY: a parent's rows are its
# own, its children are counted as tables of their own.  The client runs
# it in the snapshot pg_dump reads, the drill in the restored database.
COUNT_ROWS = (
    "SELECT coalesce(json_agg(json_build_array(n.nspname, c.relname, "
    "(xpath('/row/c/text()', query_to_xml(format("
    "'SELECT count(*) AS c FROM ONLY %I.%I', n.nspname, c.relname), "
    "false, true, '')))[1]::text::bigint) ORDER BY n.nspname, c.relname), "
    "'[]') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.relkind = 'r' AND c.relpersistence <> 't' "
    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
    "AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = "
    "'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')")
# [client] pg_row_counts = estimate: the statistics collector's live-row
# estimates (free to read, but not evidence of a complete restore).
ESTIMATE_ROWS = (
    "SELECT coalesce(json_agg(json_build_array(schemaname, relname, "
    "n_live_tup) ORDER BY schemaname, relname), '[]') "
    "FROM pg_stat_user_tables")
COUNT_SOURCES = {'exact': "count(*) in the snapshot pg_dump read",
                 'estimate': 'pg_stat_user_tables.n_live_tup'}
STATS_SUFFIX = '.stats.json'
# Node side: the files this module stores (pg_dump -Fc) and the companion
# beside each (its tables' row counts at dump time).  globals.sql is plain
# SQL that nothing here proves: it is checked by its sha256 only.
STORED_SUFFIXES = ('.dump',)
COMPANION_SUFFIXES = (STATS_SUFFIX,)
# Every database but the templates, and whether it accepts connections.
LIST_DATABASES = ("SELECT coalesce(json_agg(json_build_array(datname, "
                  "datallowconn) ORDER BY datname), '[]') FROM pg_database "
                  "WHERE NOT datistemplate")


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
        found = parse_databases(proc.stdout) if proc.returncode == 0 \
            else None
        if found is not None:
            refusing = [name for name, allowed in found if allowed is False]
            if refusing:
                # Not dumpable (pg_dump cannot connect), but an admin who
                # thinks `all` covers it must hear that it does not.
                ctx.log.warning(
                    'postgresdb all: skipping %d database(s) that refuse '
                    'connections (datallowconn = false): %s', len(refusing),
                    ', '.join(ctx.clean_text(n, 100) for n in refusing))
            return [name for name, allowed in found if allowed is True]
        errors.append(proc.stderr.strip() or 'unreadable list')
    raise ctx.ModuleError('cannot list the databases (psql failed): '
                          + ' / '.join(e[-500:] for e in errors if e))


def parse_databases(text):
    """[(name, accepts connections)] from LIST_DATABASES, or None."""
    try:
        rows = json.loads(text)
    except ValueError:
        return None
    if not isinstance(rows, list):
        return None
    return [(r[0], r[1]) for r in rows if isinstance(r, list) and
            len(r) == 2 and isinstance(r[0], str)]


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
        ctx.log.warning('%s: %s', what,
                        ctx.clean_text(stderr.strip()[-500:], 500))
    ctx.publish(path)
    return path


class SnapshotSession:
    """One psql session holding a REPEATABLE READ transaction open: the
    snapshot `pg_dump --snapshot` reads is exported from it, and the exact
    row counts are taken in it, so that they are the counts of the rows in
    the dump (not of the tables a moment before or after).  Killed with
    everything it started after [client] command_timeout."""

    def __init__(self, ctx, database):
        self.ctx = ctx
        self.err = tempfile.TemporaryFile()
        args = command(ctx, 'psql') + [
            '-X', '-A', '-t', '-q', '-v', 'ON_ERROR_STOP=1',
            *connection_options(ctx.settings),
            '--dbname=' + conninfo_dbname(database)]
        try:
            self.proc = subprocess.Popen(
                args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=self.err, start_new_session=True,
                universal_newlines=True, encoding='utf-8',
                errors='surrogateescape')
        except FileNotFoundError:
            self.err.close()
            raise ctx.ToolMissing(args[0] + ': not installed or not in PATH')
        self.timer = threading.Timer(ctx.timeout, ctx.kill_tree, [self.proc])
        self.timer.daemon = True
        self.timer.start()

    def query(self, sql):
        """The one line sql prints (it must print one)."""
        try:
            self.proc.stdin.write(sql + ';\n')
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:
            line = ''
        if not line:
            self.close()
            raise self.ctx.ModuleError('psql: ' + (self.ctx.clean_text(
                self.stderr, 500) or 'no answer'))
        return line.rstrip('\n')

    def begin(self):
        """Start the transaction; the snapshot's name for pg_dump."""
        # row_security off, as pg_dump sets it: a policy that would hide
        # rows is an error, never a smaller count.
        self.query('SET row_security = off; BEGIN ISOLATION LEVEL '
                   'REPEATABLE READ READ ONLY; SELECT 1')
        return self.query('SELECT pg_export_snapshot()')

    def close(self):
        """End the session (the transaction ends with it); keep stderr."""
        if self.err.closed:
            return
        self.timer.cancel()
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.ctx.kill_tree(self.proc)
        self.err.seek(0)
        self.stderr = self.err.read().decode('utf-8', 'replace').strip()
        self.err.close()


def parse_tables(text):
    """[(schema, table, rows)] from COUNT_ROWS/ESTIMATE_ROWS output, or
    None when it is not that."""
    try:
        tables = json.loads(text)
    except ValueError:
        return None
    if not isinstance(tables, list):
        return None
    return [tuple(t) for t in tables if isinstance(t, list) and len(t) == 3]


def write_stats(ctx, database, filename, tables, counts):
    """<dump>.stats.json beside the dump: its tables' row counts, and
    which kind of count they are ('exact' or 'estimate')."""
    path = ctx.export_path(filename + STATS_SUFFIX)
    ctx.atomic_write(path, json.dumps({
        'database': database, 'dump': filename, 'recorded': ctx.now(),
        'counts': counts, 'source': COUNT_SOURCES[counts],
        'tables': [{'schema': t[0], 'table': t[1], 'rows': t[2]}
                   for t in tables]}, indent=1, sort_keys=True) + '\n')
    return path


def estimated_rows(ctx, database):
    """[(schema, table, rows)] from the statistics collector (costs the
    database nothing noticeable, but only an estimate), or None."""
    proc = ctx.run(command(ctx, 'psql') + [
        '-X', '-A', '-t', '-q', '-v', 'ON_ERROR_STOP=1',
        *connection_options(ctx.settings),
        '--dbname=' + conninfo_dbname(database), '--command', ESTIMATE_ROWS],
        check=False, timeout=300)
    tables = parse_tables(proc.stdout) if proc.returncode == 0 else None
    if tables is None:
        ctx.log.warning('no row statistics for database %r: %s', database,
                        ctx.clean_text(proc.stderr.strip()[-300:]))
    return tables


def dump_database(ctx, database, filename):
    """pg_dump of one database into export_dir, and <dump>.stats.json.

    Exact counts ([client] pg_row_counts = exact, the default): a psql
    session exports its snapshot, pg_dump reads that snapshot, and the
    session counts every table's rows (count(*), a second scan of each
    table) in it.  If the session cannot be opened the dump goes on
    without statistics (a warning).  Returns (dump path, stats or None)."""
    args = command(ctx, 'pg_dump') + [
        '--format=custom', *connection_options(ctx.settings),
        '--dbname=' + conninfo_dbname(database)]
    what = 'pg_dump of database %r' % database
    # (The configuration allows only exact or estimate.)
    if ctx.settings.get('pg_row_counts') == 'estimate':
        tables = estimated_rows(ctx, database)
        dumped = dump(ctx, args, filename, what)
        if tables is None:
            return dumped, None
        return dumped, write_stats(ctx, database, filename, tables,
                                   'estimate')
    session = None
    try:
        session = SnapshotSession(ctx, database)
        snapshot = session.begin()
    except (ctx.ModuleError, ctx.ToolMissing) as e:
        ctx.log.warning('database %r: no exact row counts (%s); dumping '
                        'without them', database, e)
        if session:
            session.close()
        return dump(ctx, args, filename, what), None
    try:
        dumped = dump(ctx, args + ['--snapshot=' + snapshot], filename, what)
        try:
            tables = parse_tables(session.query(COUNT_ROWS))
        except ctx.ModuleError as e:
            tables, why = None, str(e)
        else:
            why = 'unreadable output'
    finally:
        session.close()
    if tables is None:
        # The dump is good; only the drill's evidence is missing.
        ctx.log.warning('database %r: no row counts (%s)', database, why)
        return dumped, None
    return dumped, write_stats(ctx, database, filename, tables, 'exact')


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
        try:
            dumped, stats = dump_database(ctx, database, filename)
        except ctx.ModuleError as e:
            if path != ALL:
                raise
            # One broken database must not stop the others: it becomes a
            # request of its own, retried and given up on by itself.
            ctx.request_separately(module, database, e)
            continue
        yield 'db-' + filename[:-len('.dump')], \
            ctx.sftp_request(dumped, source=module, companion=stats)


# ---------------------------------------------------------------------------
# Node side: what the node does with the dumps it stores (verify, drill,
# restore).  A dump is hostile data: the drill restores it with no power on
# the node (ScratchCluster), and what restore hands an admin is made by
# pg_restore, never by running the dump here.

DRILL_ROLE = 'gitbackup_drill'      # restores, owns the scratch databases
DRILL_ADMIN = 'postgres'            # creates roles and databases, nothing else
SCRATCH_PREFIX = 'gitbackup-drill-pg-'
SCRATCH_PORT = '5432'               # names the socket file in a private dir
# A table restored with fewer than this fraction of the rows an old
# statistics file *estimated* fails the drill; exact counts must be equal.
ROWS_FLOOR = 0.5
# `CREATE ROLE name;` as pg_dumpall --globals-only writes it.
ROLE_LINE_RE = re.compile(r'^CREATE ROLE ("(?:[^"]|"")+"|[A-Za-z_][A-Za-z0-9_]*);$')
ENCODING_RE = re.compile(r"^CREATE DATABASE .* ENCODING = '([A-Za-z0-9_]{1,30})'",
                         re.M)
# What PostgreSQL says when a restore needs more than owning the database.
NEEDS_POWER_RE = re.compile(
    r'must be superuser|permission denied|must be owner|must have privileges'
    r'|pg_execute_server_program|pg_write_server_files|pg_read_server_files')


def clean_environ(**extra):
    """The node's environment without the admin's PG* variables (PGPORT,
    PGHOST, PGSERVICE ... would point the drill's programs elsewhere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('PG')}
    env.update(extra)
    return env


def server_tool(bindir, name):
    """A PostgreSQL program from [server] drill_postgres, else from PATH."""
    path = os.path.join(bindir or '', name)
    return path if bindir and os.path.exists(path) else name


def quote_ident(name):
    return '"' + str(name).replace('"', '""') + '"'


def quote_literal(text):
    return "'" + str(text).replace("'", "''") + "'"


def verify_stored(path, timeout):
    """`verify`'s read-back of one stored dump: pg_restore lists it.
    Raises FileNotFoundError when pg_restore is missing (a check that
    could not run), ValueError when the dump does not read back."""
    proc = subprocess.run(
        ['pg_restore', '--list', '--', path], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        universal_newlines=True, env=clean_environ(), timeout=timeout)
    if proc.returncode != 0:
        raise ValueError(f'pg_restore --list failed (exit '
                         f'{proc.returncode}): '
                         f'{clean_text(proc.stderr.strip(), 500)}')


def snapshot_globals(snapshots):
    """The globals.sql a restore of the last snapshot's dumps runs first:
    its own (`postgresdb all`), else the newest stored before it (a
    one-database request has none).  snapshots: [(directory, manifest)]
    of one source, oldest first, ending with the one restored.  Its path
    (sha256 checked against its manifest), or None; ValueError when it is
    damaged."""
    for directory, manifest in reversed(snapshots):
        for entry in manifest.get('files') or []:
            if isinstance(entry, dict) and entry.get('name') == GLOBALS_FILE:
                path = os.path.join(directory, GLOBALS_FILE)
                try:
                    found = core.sha256_file(path)
                except OSError as e:
                    raise ValueError(f'{path}: cannot read: {e}') from None
                if found != (entry.get('sha256'), entry.get('size')):
                    raise ValueError(f'{path}: DAMAGED (its sha256 or size '
                                     'is not the manifest\'s)')
                return path
    return None


def process_start(pid):
    """The start time of a live process (to tell it from a reused pid)."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[19]
    except (OSError, IndexError, ValueError):
        return None


def postmaster_pid(data):
    """The pid of the postmaster running on data, or None."""
    try:
        with open(os.path.join(data, 'postmaster.pid')) as f:
            pid = int(f.readline().strip())
        with open('/proc/%d/cmdline' % pid, 'rb') as f:
            running = os.fsencode(data) in f.read()
    except (OSError, ValueError):
        return None
    return pid if running else None


def stop_postmaster(data, wait=10.0):
    """Immediate shutdown (SIGQUIT), then SIGKILL: the data is scratch."""
    pid = postmaster_pid(data)
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except OSError:
            return
        deadline = time.monotonic() + wait
        while postmaster_pid(data) == pid and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = postmaster_pid(data)


def reap_scratch_clusters(ctx, registry):
    """Stop and remove the scratch clusters a killed drill left behind
    (ScratchCluster registers each in registry while it runs).  A cluster
    whose drill still runs (same pid, same start time) is left alone, so
    a run or a second drill can call this any time."""
    try:
        names = sorted(os.listdir(registry))
    except FileNotFoundError:
        return
    except OSError as e:
        ctx.log.warning('cannot look for left-over scratch clusters: %s', e)
        return
    for name in names:
        entry = os.path.join(registry, name)
        try:
            with open(entry) as f:
                record = json.load(f)
            owner, work = int(record['owner']), str(record['work'])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if process_start(owner) == record.get('owner_start'):
            continue
        if not os.path.basename(work).startswith(SCRATCH_PREFIX):
            continue
        ctx.log.warning('stopping the scratch PostgreSQL cluster %s left by '
                        'a killed drill (pid %d)', work, owner)
        stop_postmaster(os.path.join(work, 'data'))
        left = postmaster_pid(os.path.join(work, 'data'))
        if left is not None:
            # Started by root, found by the backup account: kept on record
            # for the next drill as root.
            ctx.log.warning('cannot stop the scratch cluster %s (postmaster '
                            'pid %d): run `server.py drill` as root', work,
                            left)
            continue
        shutil.rmtree(work, ignore_errors=True)
        try:
            os.unlink(entry)
        except FileNotFoundError:
            pass


class ScratchCluster:
    """A throw-away PostgreSQL cluster in which the drill restores dumps
    with no power on the node.

    initdb in a fresh 0700 directory that is also the socket's (no other
    local account can reach the socket), unix socket only, and a pg_hba
    that admits two roles by scram-sha-256 passwords only this object
    knows (in a 0600 passfile).  DRILL_ADMIN creates roles and databases
    with SQL of ours; every dump is restored and read by DRILL_ROLE, which
    is no superuser: a dump's COPY TO PROGRAM, server-side file writes,
    untrusted languages and lo_export fail.  Server and client programs
    run as the `postgres` account when we are root (postgres refuses root,
    and pg_restore, which parses the dump, needs no more); a dump reaches
    pg_restore as its stdin.  Registered in
    registry from before initdb until removed, so that a killed drill's
    cluster is stopped by the next drill or run (reap_scratch_clusters);
    every PG* variable of the environment is ignored."""

    def __init__(self, ctx, bindir, registry):
        self.ctx, self.bindir, self.registry = ctx, bindir, registry
        self.as_postgres = ['runuser', '-u', 'postgres', '--'] \
            if os.geteuid() == 0 else []
        self.entry = self.work = None
        self.passwords = {DRILL_ADMIN: secrets.token_hex(24),
                          DRILL_ROLE: secrets.token_hex(24)}

    def __enter__(self):
        # /tmp, not data_dir: the postgres account must reach it, and the
        # socket's path must stay short.  mkdtemp makes it 0700.
        self.work = tempfile.mkdtemp(prefix=SCRATCH_PREFIX)
        self.data = os.path.join(self.work, 'data')
        self.register()
        try:
            self.initdb()
            self.start()
            self.admin_sql(f'CREATE ROLE {DRILL_ROLE} LOGIN NOSUPERUSER '
                           'NOCREATEDB NOCREATEROLE BYPASSRLS PASSWORD '
                           + quote_literal(self.passwords[DRILL_ROLE]))
            self.ctx.pause_point('drill-scratch-cluster')
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        stop_postmaster(self.data)
        shutil.rmtree(self.work, ignore_errors=True)
        if self.entry:
            try:
                os.unlink(self.entry)
            except FileNotFoundError:
                pass

    def register(self):
        os.makedirs(self.registry, mode=0o700, exist_ok=True)
        self.entry = os.path.join(self.registry, '%d-%s.json' % (
            os.getpid(), os.path.basename(self.work)))
        self.ctx.atomic_write(self.entry, json.dumps({
            'owner': os.getpid(), 'owner_start': process_start(os.getpid()),
            'work': self.work}) + '\n', 0o600)

    def postgres_account(self):
        try:
            return pwd.getpwnam('postgres')
        except KeyError:
            raise self.ctx.ModuleError(
                'the drill runs PostgreSQL as the postgres account when '
                'run as root, and there is none (install the postgresql '
                'package, or run drill as the backup account)') from None

    def server_run(self, args):
        self.ctx.run(self.as_postgres + args, cwd=self.work,
                     env=clean_environ(LC_ALL='C'), timeout=self.ctx.timeout)

    def initdb(self):
        pwfile = os.path.join(self.work, 'pwfile')
        with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT, 0o600), 'w') as f:
            f.write(self.passwords[DRILL_ADMIN] + '\n')
        if self.as_postgres:
            owner = self.postgres_account()
            for path in (self.work, pwfile):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        self.server_run([server_tool(self.bindir, 'initdb'), '-D', self.data,
                         '-U', DRILL_ADMIN, '--auth=scram-sha-256',
                         '--pwfile=' + pwfile, '-E', 'UTF8', '--locale=C',
                         '--no-sync'])
        os.unlink(pwfile)
        # Keeps initdb's owner (postgres): written in place.
        with open(os.path.join(self.data, 'pg_hba.conf'), 'w') as f:
            f.write('# gitbackup drill: unix socket only, two roles, by '
                    'password\n'
                    f'local all {DRILL_ADMIN} scram-sha-256\n'
                    f'local all {DRILL_ROLE} scram-sha-256\n')
        passfile = os.path.join(self.work, 'pgpass')
        with open(os.open(passfile, os.O_WRONLY | os.O_CREAT, 0o600),
                  'w') as f:
            f.writelines(f'*:*:*:{role}:{password}\n'
                         for role, password in self.passwords.items())
        if self.as_postgres:
            owner = self.postgres_account()
            os.chown(passfile, owner.pw_uid, owner.pw_gid)

    def start(self):
        options = (f'-k {shlex.quote(self.work)} -p {SCRATCH_PORT} '
                   "-c listen_addresses='' -c unix_socket_permissions=0700 "
                   '-c fsync=off')
        self.server_run([server_tool(self.bindir, 'pg_ctl'), '-w', '-t',
                         '120', '-D', self.data, '-l',
                         os.path.join(self.work, 'log'), '-o', options,
                         'start'])

    def run(self, program, *args, role=DRILL_ROLE, input=None, stdin=None):
        """A client program against this cluster, as role (and as the
        postgres account when we are root: pg_restore parses the dump,
        which it reads from stdin, opened here)."""
        env = clean_environ(PGPASSFILE=os.path.join(self.work, 'pgpass'),
                            PGHOST=self.work, PGPORT=SCRATCH_PORT,
                            PGUSER=role, LC_ALL='C')
        return self.ctx.run(
            self.as_postgres + [server_tool(self.bindir, program), *args],
            env=env, cwd=self.work, check=False, input=input, stdin=stdin,
            timeout=self.ctx.timeout)

    def admin_sql(self, sql, input=None):
        """Our own SQL as DRILL_ADMIN (never a dump's)."""
        proc = self.run('psql', '-X', '-q', '-v', 'ON_ERROR_STOP=1', '-d',
                        'postgres', *(['-c', sql] if sql else []),
                        role=DRILL_ADMIN, input=input)
        if proc.returncode != 0:
            raise self.ctx.ModuleError('scratch cluster: ' + self.ctx.clean_text(
                proc.stderr, 500))
        return proc

    def create_roles(self, names):
        """The roles a dump names (owners, policies' roles), as the
        globals would create them, but with no attribute: NOLOGIN."""
        if not names:
            return
        self.admin_sql(None, input=(
            "SELECT format('CREATE ROLE %I NOLOGIN', r) FROM unnest(ARRAY["
            + ', '.join(quote_literal(n) for n in sorted(names))
            + "]::text[]) r WHERE NOT EXISTS (SELECT 1 FROM pg_roles "
            "WHERE rolname = r) AND r NOT LIKE 'pg\\_%'\n\\gexec\n"))

    def create_database(self, name, encoding):
        self.admin_sql(f'CREATE DATABASE {quote_ident(name)} OWNER '
                       f'{DRILL_ROLE} TEMPLATE template0 ENCODING '
                       f"{quote_literal(encoding)} LC_COLLATE 'C' "
                       "LC_CTYPE 'C'")


def global_role_names(path):
    """The roles a globals.sql creates (only the names)."""
    names = set()
    if not path:
        return names
    with open(path, encoding='utf-8', errors='surrogateescape') as f:
        for line in f:
            m = ROLE_LINE_RE.match(line.rstrip('\n'))
            if m:
                ident = m.group(1)
                names.add(ident[1:-1].replace('""', '"')
                          if ident.startswith('"') else ident)
    return names


def dump_encoding(cluster, dump):
    """The encoding of the database the dump was made from."""
    with open(dump, 'rb') as f:
        proc = cluster.run('pg_restore', '--create', '--section=pre-data',
                           '--file=-', stdin=f)
    m = ENCODING_RE.search(proc.stdout or '')
    return m.group(1) if m else 'UTF8'


def read_stats(path):
    """(kind of count, {(schema, table): rows}) of a .stats.json, or
    raise ValueError naming what is wrong (it is hostile data too)."""
    try:
        with open(path, encoding='utf-8') as f:
            stats = json.load(f)
    except FileNotFoundError:
        return None, {}
    except (OSError, ValueError) as e:
        raise ValueError('unreadable statistics: %s' % e)
    tables = stats.get('tables') if isinstance(stats, dict) else None
    if not isinstance(tables, list):
        raise ValueError('malformed statistics: no table list')
    rows = {}
    for t in tables:
        if not (isinstance(t, dict) and isinstance(t.get('schema'), str) and
                isinstance(t.get('table'), str) and
                type(t.get('rows')) is int and t['rows'] >= 0):
            raise ValueError('malformed statistics entry: %.100r' % (t,))
        rows[(t['schema'], t['table'])] = t['rows']
    kind = 'exact' if stats.get('counts') == 'exact' else 'estimate'
    return kind, rows


def compare_rows(kind, recorded, restored, clean):
    """Problems between recorded and restored row counts."""
    problems = []
    for key, rows in sorted(recorded.items()):
        name = clean(f'{quote_ident(key[0])}.{quote_ident(key[1])}')
        got = restored.get(key)
        if got is None:
            problems.append(f'table {name} did not come back')
        elif kind == 'exact' and got != rows:
            problems.append(f'table {name}: {got} rows restored, {rows} '
                            'counted at dump time')
        elif kind == 'estimate' and rows > 0 and (
                got == 0 or got < rows * ROWS_FLOOR):
            problems.append(f'table {name}: {got} rows restored, {rows} '
                            'recorded at dump time (estimate)')
    return problems


def drill_dump(cluster, dump, number):
    """Restore one dump into its own scratch database as DRILL_ROLE and
    compare its tables' row counts with <dump>.stats.json.  Returns
    (problems, what was compared)."""
    clean = cluster.ctx.clean_text
    try:
        kind, recorded = read_stats(dump + STATS_SUFFIX)
    except ValueError as e:
        return [clean(str(e), 300)], ''
    database = f'drill{number}'
    try:
        cluster.create_database(database, dump_encoding(cluster, dump))
    except cluster.ctx.ModuleError as e:     # a bad encoding, say
        return [clean(str(e), 500)], ''
    with open(dump, 'rb') as f:
        proc = cluster.run('pg_restore', '--exit-on-error', '--no-owner',
                           '--no-privileges', '--dbname=' + database,
                           stdin=f)
    if proc.returncode != 0:
        error = clean(proc.stderr, 500)
        if NEEDS_POWER_RE.search(proc.stderr):
            return ['needs more than owning its database to restore (the '
                    'drill restores as a role that is no superuser): '
                    + error], ''
        return ['pg_restore failed: ' + error], ''
    got = cluster.run('psql', '-X', '-A', '-t', '-q', '-v', 'ON_ERROR_STOP=1',
                      '-d', database, '-c', COUNT_ROWS)
    tables = parse_tables(got.stdout) if got.returncode == 0 else None
    if tables is None:
        return ['cannot count the restored rows: ' + clean(got.stderr)], ''
    restored = {(t[0], t[1]): t[2] for t in tables}
    what = ('no statistics recorded' if kind is None else
            f'{len(recorded)} table(s), exact row counts equal' if
            kind == 'exact' else f'{len(recorded)} table(s) against '
            'estimated row counts (old statistics)')
    return compare_rows(kind, recorded, restored, clean), what


def drill_stored(ctx, names, scratch):
    """`drill`'s restore-and-compare proof of a snapshot's dumps (their
    sha256 already checked).  ctx is the node's DrillContext: the snapshot
    (`snapshot`, `manifest`), the source's earlier snapshots (`earlier`:
    [(directory, manifest)], oldest first, for the globals), [server]
    (`node_settings`) and where a live scratch cluster is registered
    (`scratch_registry`, see reap_scratch_clusters); scratch is unused (the
    cluster needs a directory the postgres account can reach).

    With [server] drill_postgres set, one ScratchCluster: the roles the
    globals create (snapshot_globals) are created, names only, as the
    restore recipe runs the globals first; then each dump is restored as a
    role that is no superuser into a database of its own with the dump's
    encoding, and every table's row count is held against its statistics:
    equal to exact counts, at least ROWS_FLOOR of old estimates.  Without
    it, each dump is only read back (pg_restore --list).  Returns
    (problems, detail); each problem names its dump."""
    snapshot, dumps = ctx.snapshot, names
    try:
        globals_path = snapshot_globals(
            list(ctx.earlier) + [(ctx.snapshot, ctx.manifest)])
    except ValueError as e:
        return [clean_text(str(e), 500)], ''
    bindir = ctx.node_settings.get('drill_postgres')
    problems = []
    if not bindir:
        for name in dumps:
            try:
                verify_stored(os.path.join(snapshot, name), ctx.timeout)
            except (ValueError, OSError, subprocess.SubprocessError) as e:
                problems.append(f'{name}: {ctx.clean_text(str(e), 500)}')
        return problems, (f'{len(dumps)} dump(s) read back with pg_restore '
                          '--list, not restored ([server] drill_postgres '
                          'not set)')
    details = []
    with ScratchCluster(ctx, bindir, ctx.scratch_registry) as cluster:
        cluster.create_roles(global_role_names(globals_path))
        for number, name in enumerate(dumps):
            found, what = drill_dump(cluster, os.path.join(snapshot, name),
                                     number)
            problems += [f'{ctx.clean_text(name)}: {p}' for p in found]
            if what:
                details.append(f'{ctx.clean_text(name)}: {what}')
    return problems, (f'{len(dumps)} dump(s) restored into a scratch cluster '
                      'by a role that is no superuser'
                      + (globals_path and ' after the roles of the globals'
                         or '') + ('; ' + '; '.join(details) if details
                                   else ''))


RESTORE_HEADER = '''\
-- gitbackup: {what}
-- from {origin}.
-- A psql script: run it as a superuser of the target cluster, connected
-- to another database (postgres), e.g.
--   server.py restore CLIENT postgresdb --database NAME --stdout |
--       ssh root@HOST sudo -u postgres psql -X -d postgres
-- Roles and tablespaces come first (the globals; a role the target already
-- has is kept), then pg_restore --create recreates the database with its
-- owner, encoding, locale, comment, settings and ACL, and its contents;
-- psql stops at the first error there (an existing database of that name
-- is one: drop or rename it first).
'''


def rewrite_globals(line):
    """`CREATE ROLE x;` becomes "create x unless it exists", so that the
    globals can run on a cluster that has some of the roles (postgres
    always) without errors; ALTER ROLE still sets every attribute."""
    m = ROLE_LINE_RE.match(line.rstrip('\n'))
    if not m or '$' in m.group(1):
        return line
    return ('DO $gitbackup$ BEGIN CREATE ROLE %s; EXCEPTION WHEN '
            'duplicate_object THEN NULL; END $gitbackup$;\n' % m.group(1))


def restore_script(ctx, out, origin, database=None, dump=None,
                   globals_path=None):
    """Write to out (binary) the psql script that restores one database
    exactly (`server.py restore CLIENT postgresdb --database NAME
    --stdout`), or only the globals (database None: `--globals`).

    The globals first, because the database's objects name its roles;
    then `pg_restore --create --file=-` of the dump: the database is
    created as it was (owner, encoding, locale, settings, ACL, comment),
    which restoring into a database made with createdb loses.  Nothing
    here runs the dump: pg_restore only turns it into SQL.  origin names
    the client and snapshot for the header."""
    what = (f'restore of database {database}' if database else
            'roles and tablespaces (globals)')
    header = RESTORE_HEADER.format(what=ctx.clean_text(what, 200),
                                   origin=ctx.clean_text(origin, 300))
    if not globals_path:
        header += ('-- No globals.sql stored at or before this snapshot: '
                   'the roles the database\n-- names must exist on the '
                   'target already.\n')
    out.write(header.encode() + b'\\set ON_ERROR_STOP off\n')
    if globals_path:
        with open(globals_path, encoding='utf-8',
                  errors='surrogateescape') as f:
            for line in f:
                out.write(rewrite_globals(line).encode(
                    'utf-8', 'surrogateescape'))
    if dump:
        out.write(b'\n\\set ON_ERROR_STOP on\n')
        out.flush()
        ctx.run([server_tool(ctx.settings.get('drill_postgres'),
                             'pg_restore'), '--create', '--file=-', '--',
                 dump], stdout=out.fileno(), text=False, env=clean_environ())
    out.flush()
