"""Dumps as hostile data, and a database back exactly: against a private
PostgreSQL cluster, through the real pipeline (commit, send, run, drill,
restore).

* A compromised client's dumps (a CHECK constraint whose function runs
  COPY TO PROGRAM, COPY TO a server file, lo_export, a function in an
  untrusted language) run nothing on the node when drilled: no sentinel
  file, the drill fails each with the reason, other clients are drilled.
* The scratch cluster refuses a second local account while it runs, and
  one left by a killed drill is stopped by the next drill.
* A database with its own owner role, grants, an RLS policy, settings and
  LATIN1 encoding comes back with all of them through the one documented
  command; the drill of that dump passes with PGPORT set elsewhere.
* Row counts are exact (taken in the dump's own snapshot): a row added
  while the dump runs is in neither, a count that disagrees fails.
"""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import unittest

from tests import support
from tests.modules_pipeline import ModulePipeline, PostgresMixin
from tests.pipeline import CLIENT
from tests.test_confinement import add_account
from tests.test_restore import pipe


def rewrite_stored(snapshot, name, data):
    """Replace a stored file and its manifest entry (a client that lies
    consistently: the node's hashes cannot tell)."""
    with open(os.path.join(snapshot, name), 'wb') as f:
        f.write(data)
    path = os.path.join(snapshot, 'manifest.json')
    with open(path) as f:
        manifest = json.load(f)
    for entry in manifest['files']:
        if entry['name'] == name:
            entry.update(sha256=hashlib.sha256(data).hexdigest(),
                         size=len(data))
    with open(path, 'w') as f:
        json.dump(manifest, f)


class DrillPipelineMixin(PostgresMixin):
    def setUp(self):
        support.require_tools('pg_dump', 'pg_dumpall', 'psql', 'pg_restore')
        self.p = ModulePipeline(self)
        self.p.edit_config('free_space_floor = 0\n', 'free_space_floor = 0\n'
                           f'drill_postgres = {support.pg_bindir()}\n')
        self.p.use_postgres(self.cluster, 'config')

    def pg_env(self):
        return {**{k: v for k, v in self.p.env.items()
                   if not k.startswith('PG')}, **self.cluster.env()}

    def backup(self, what='all'):
        self.p.client('commit', 'postgresdb', what)
        send = self.p.client('send')
        self.p.server('run')
        return send


# Each attack is a CHECK constraint whose function does harm when the
# restore's COPY checks a row; the function is made harmless while the
# row goes in, then replaced (the source never runs it).
ATTACKS = {
    'evil_program': "COPY (SELECT 1) TO PROGRAM 'touch {sentinel}'",
    'evil_file': "COPY (SELECT 'owned') TO '{sentinel}'",
    # (The large object in a statement of its own: the export must see it.)
    'evil_lo': "PERFORM lo_from_bytea(4242, 'owned'); "
               "PERFORM lo_export(4242, '{sentinel}')",
    # An untrusted language: an `internal` function around lo_export's C
    # code, which skips the SQL function's permission check.
    'evil_lang': "PERFORM lo_from_bytea(4243, 'owned'); "
                 "PERFORM public.writer(4243, '{sentinel}')",
}


class HostileDumpTest(DrillPipelineMixin, unittest.TestCase):
    @classmethod
    def create_data(cls, cluster):
        cls.sentinels = tempfile.mkdtemp(prefix='gb-sentinel-')
        os.chmod(cls.sentinels, 0o1777)     # the postgres account writes
        cls.addClassCleanup(shutil.rmtree, cls.sentinels, True)
        cluster.psql('CREATE DATABASE shop')
        cluster.psql('CREATE TABLE items (id int); INSERT INTO items '
                     'SELECT generate_series(1, 50)', db='shop')
        for name, harm in ATTACKS.items():
            cluster.psql(f'CREATE DATABASE {name}')
            if name == 'evil_lang':
                cluster.psql('CREATE FUNCTION public.writer(oid, text) '
                             'RETURNS int LANGUAGE internal STRICT AS '
                             "'be_lo_export'", db=name)
            cluster.psql(
                'CREATE FUNCTION public.gate(int) RETURNS bool LANGUAGE '
                'plpgsql AS $$ BEGIN RETURN true; END $$; CREATE TABLE t '
                '(id int CHECK (public.gate(id))); INSERT INTO t VALUES (1)',
                db=name)
            cluster.psql(
                'CREATE OR REPLACE FUNCTION public.gate(int) RETURNS bool '
                'LANGUAGE plpgsql AS $$ BEGIN ' + harm.format(
                    sentinel=cls.sentinel(name)) + '; RETURN true; END $$',
                db=name)
        # A database nobody can connect to: `all` skips it, and says so.
        cluster.psql('CREATE DATABASE closed')
        cluster.psql('ALTER DATABASE closed ALLOW_CONNECTIONS false')

    @classmethod
    def sentinel(cls, name):
        return os.path.join(cls.sentinels, name)

    def assert_live_ammunition(self, dumps):
        """Each hostile dump does write its sentinel when restored as a
        superuser (as the drill did before): the test's dumps are real
        attacks, so their failing below is the drill's doing."""
        for name in ATTACKS:
            self.cluster.psql(f'CREATE DATABASE live_{name}')
            self.pg('pg_restore', '-d', f'live_{name}', dumps[name + '.dump'],
                    check=False)
            self.cluster.psql(f'DROP DATABASE live_{name}')
            self.assertTrue(os.path.exists(self.sentinel(name)), name)
            os.unlink(self.sentinel(name))

    def test_hostile_dumps_run_nothing_on_the_node(self):
        p = self.p
        # An honest client first: its own snapshot, drilled after c1's.
        self.backup('shop')
        data = os.path.join(p.node_dir, 'data')
        shutil.copytree(os.path.join(data, CLIENT),
                                os.path.join(data, 'c2'), symlinks=True)
        send = self.backup('all')
        self.assertIn("skipping 1 database(s) that refuse connections "
                      "(datallowconn = false): closed", send.stderr)
        self.assert_live_ammunition(p.stored_files('postgresdb'))
        proc = p.server('drill', check=False)
        self.assertEqual(proc.returncode, 2, proc.stdout + proc.stderr)
        self.assertEqual(os.listdir(self.sentinels), [])
        [failed] = [line for line in proc.stdout.splitlines()
                    if line.startswith('FAILED: c1 postgresdb')]
        for name in ATTACKS:
            self.assertIn(f'{name}.dump: needs more than owning its database'
                          ' to restore (the drill restores as a role that is '
                          'no superuser)', failed)
        for reason in ('pg_execute_server_program role to COPY to or from '
                       'an external program', 'pg_write_server_files role to '
                       'COPY to a file', 'permission denied for function '
                       'lo_export', 'permission denied for language internal'):
            self.assertIn(reason, failed)
        self.assertNotIn('shop.dump', failed)
        # The one-database series of c1 and the other client: drilled, ok.
        ok = [line for line in proc.stdout.splitlines()
              if line.startswith('ok: ')]
        self.assertEqual([line.split(' ')[1] for line in ok], ['c1', 'c2'])
        self.assertIn('shop.dump: 1 table(s), exact row counts equal', ok[1])
        self.assertIn('1 failed: CRITICAL', proc.stdout)
        # No cluster outlives the drill.
        self.assertEqual(glob.glob(os.path.join(
            p.node_dir, 'log', 'state', 'scratch-postgres', '*')), [])

    def test_scratch_cluster_refuses_other_accounts_and_dies_with_drill(self):
        support.require_root('the test creates a second local account')
        support.require_tools('useradd', 'userdel', 'runuser')
        p = self.p
        self.backup('shop')
        user = f'gbdrill{os.getpid()}'
        add_account(self, user, 65534)
        env = {**p.env, 'GITBACKUP_PAUSE_AT': 'drill-scratch-cluster'}
        drill = subprocess.Popen(
            [*p.commands['server.py'], '--config', p.config, 'drill'],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.addCleanup(lambda: drill.poll() is None and os.killpg(
            drill.pid, signal.SIGKILL))
        registry = os.path.join(p.node_dir, 'log', 'state',
                                'scratch-postgres')
        work = self.wait_for_cluster(registry)
        self.assertEqual(os.stat(work).st_mode & 0o777, 0o700)
        for role in ('postgres', 'gitbackup_drill'):
            other = subprocess.run(
                ['runuser', '-u', user, '--', support.pg_tool('psql'), '-X',
                 '-h', work, '-p', '5432', '-U', role, '-d', 'postgres',
                 '-c', 'SELECT 1'], stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                universal_newlines=True, cwd='/', env={
                    'PATH': os.environ['PATH'], 'PGCONNECT_TIMEOUT': '5'})
            self.assertNotEqual(other.returncode, 0)
            self.assertIn('Permission denied', other.stderr)
        # (Killed mid-drill: the next drill stops the cluster first.)
        os.killpg(drill.pid, signal.SIGKILL)
        drill.wait()
        pid_file = os.path.join(work, 'data', 'postmaster.pid')
        with open(pid_file) as f:
            postmaster = int(f.readline())
        self.assertTrue(os.path.exists(f'/proc/{postmaster}'))
        proc = p.server('drill')
        self.assertIn('stopping the scratch PostgreSQL cluster', proc.stderr)
        self.assertFalse(os.path.exists(work))
        self.assertFalse(os.path.exists(f'/proc/{postmaster}'))
        self.assertIn('ok: c1 postgresdb', proc.stdout)

    def wait_for_cluster(self, registry):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for entry in glob.glob(os.path.join(registry, '*.json')):
                with open(entry) as f:
                    work = json.load(f)['work']
                if os.path.exists(os.path.join(work, '.s.PGSQL.5432')):
                    return work
            time.sleep(0.1)
        self.fail('no scratch cluster came up')


class ExactDatabaseTest(DrillPipelineMixin, unittest.TestCase):
    @classmethod
    def create_data(cls, cluster):
        cluster.psql('CREATE ROLE app_owner NOLOGIN')
        cluster.psql("CREATE ROLE app_user LOGIN PASSWORD 'secret' "
                     'CONNECTION LIMIT 4')
        cluster.psql("CREATE DATABASE legacy OWNER app_owner ENCODING "
                     "'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        cluster.psql("ALTER DATABASE legacy SET work_mem = '7MB'; "
                     'REVOKE CONNECT ON DATABASE legacy FROM PUBLIC; '
                     'GRANT CONNECT ON DATABASE legacy TO app_user; '
                     "COMMENT ON DATABASE legacy IS 'the old one'")
        cluster.psql(
            'SET ROLE app_owner; CREATE TABLE notes (id int, owner text, '
            "body text); INSERT INTO notes VALUES (1, 'app_user', 'caf\u00e9'),"
            " (2, 'someone', 'other'); ALTER TABLE notes ENABLE ROW LEVEL "
            'SECURITY; CREATE POLICY mine ON notes TO app_user USING '
            '(owner = current_user); GRANT SELECT ON notes TO app_user',
            db='legacy')
        cluster.psql('CREATE DATABASE shop')
        cluster.psql('CREATE TABLE items (id int); INSERT INTO items '
                     'SELECT generate_series(1, 200)', db='shop')

    def restore_cmd(self, *args):
        return [*self.p.commands['server.py'], '--config', self.p.config,
                'restore', CLIENT, 'postgresdb', *args]

    def state_of_legacy(self):
        sql = self.cluster.psql
        return {
            'database': sql("SELECT pg_get_userbyid(datdba), "
                            "pg_encoding_to_char(encoding), datcollate, "
                            "ARRAY(SELECT unnest(datacl)::text ORDER BY 1) "
                            "FROM pg_database WHERE datname = 'legacy'"),
            'comment': sql("SELECT shobj_description(oid, 'pg_database') "
                           "FROM pg_database WHERE datname = 'legacy'"),
            'settings': sql("SELECT setconfig FROM pg_db_role_setting s "
                            "JOIN pg_database d ON d.oid = s.setdatabase "
                            "WHERE datname = 'legacy'"),
            'roles': sql("SELECT rolname, rolcanlogin, rolconnlimit, "
                         "rolpassword IS NOT NULL FROM pg_authid WHERE "
                         "rolname LIKE 'app_%' ORDER BY 1"),
            'table': sql("SELECT pg_get_userbyid(relowner), ARRAY(SELECT "
                         "unnest(relacl)::text ORDER BY 1), "
                         "relrowsecurity FROM pg_class WHERE relname = "
                         "'notes'", db='legacy'),
            'policy': sql("SELECT polname, pg_get_expr(polqual, polrelid), "
                          "polroles::regrole[] FROM pg_policy", db='legacy'),
            'rows': sql("SELECT id, owner, body, md5(convert_to(body, "
                        "'LATIN1')) FROM notes ORDER BY id", db='legacy'),
        }

    def test_database_restores_exactly_through_the_documented_command(self):
        self.backup('all')
        before = self.state_of_legacy()
        self.assertIn('LATIN1', before['database'])
        # The drill restores as the recipe does, roles first: the policy's
        # role exists, the LATIN1 rows come back, the counts are equal.
        drill = self.p.server('drill')
        self.assertIn('after the roles of the globals', drill.stdout)
        self.assertIn('legacy.dump: 1 table(s), exact row counts equal',
                      drill.stdout)
        # A new cluster, as after losing the host: no database, no roles.
        self.cluster.psql('DROP DATABASE legacy')
        self.cluster.psql('DROP ROLE app_owner')
        self.cluster.psql('DROP ROLE app_user')
        status, err, proc = pipe(
            self.restore_cmd('--database', 'legacy', '--stdout'),
            [support.pg_tool('psql'), '-X', '-q', '-d', 'postgres'],
            self.pg_env())
        self.assertEqual((status, proc.returncode), (0, 0),
                         err + proc.stderr.decode())
        # No error at all: postgres (which the target has) is kept.
        self.assertNotIn(b'ERROR', proc.stderr)
        self.assertEqual(self.state_of_legacy(), before)
        # Again onto the same cluster: the database exists, psql stops.
        status, err, proc = pipe(
            self.restore_cmd('--database', 'legacy', '--stdout'),
            [support.pg_tool('psql'), '-X', '-q', '-d', 'postgres'],
            self.pg_env())
        self.assertEqual(proc.returncode, 3)
        self.assertIn(b'database "legacy" already exists', proc.stderr)
        # --globals alone: the roles (for a whole-cluster restore).
        out = subprocess.run(self.restore_cmd('--globals', '--stdout'),
                             env=self.p.env, stdout=subprocess.PIPE,
                             check=True).stdout
        self.assertIn(b'CREATE ROLE app_owner;', out)
        self.assertNotIn(b'pg_restore', out.split(b'\n-- ', 1)[0])

    def test_drill_exact_counts_ignore_the_pg_environment(self):
        p = self.p
        # A row arrives while pg_dump runs: in neither the dump nor the
        # counts, which are taken in the dump's own snapshot.
        pg = self.cluster.env()
        wrapper = os.path.join(p.root, 'pg_dump_while_busy')
        with open(wrapper, 'w') as f:
            f.write(f'#!/bin/sh\n{support.pg_tool("psql")} -X -q -h '
                    f'{pg["PGHOST"]} -p {pg["PGPORT"]} -U postgres -d shop '
                    '-c "INSERT INTO items VALUES (0)" || exit 9\n'
                    f'exec {support.pg_tool("pg_dump")} "$@"\n')
        os.chmod(wrapper, 0o755)
        p.edit_config('\n[nodes]\n', f'pg_dump = {wrapper}\n\n[nodes]\n')
        self.backup('shop')
        self.cluster.psql('DELETE FROM items WHERE id = 0', db='shop')
        [snap] = p.stored('postgresdb')
        with open(os.path.join(snap, 'shop.dump.stats.json')) as f:
            stats = json.load(f)
        self.assertEqual((stats['counts'], stats['tables']), ('exact', [
            {'schema': 'public', 'table': 'items', 'rows': 200}]))
        # The admin's libpq variables point elsewhere: the drill ignores
        # them.
        p.env.update({'PGPORT': '1', 'PGHOST': '/nonexistent',
                      'PGUSER': 'nobody', 'PGDATABASE': 'nowhere'})
        proc = p.server('drill')
        self.assertIn('ok: c1 postgresdb', proc.stdout)
        self.assertIn('shop.dump: 1 table(s), exact row counts equal',
                      proc.stdout)
        self.assertIn('by a role that is no superuser', proc.stdout)
        # One row fewer in the dump than counted: caught.
        stats['tables'][0]['rows'] = 201
        rewrite_stored(snap, 'shop.dump.stats.json',
                       json.dumps(stats).encode())
        proc = p.server('drill', check=False)
        self.assertEqual(proc.returncode, 2)
        self.assertIn('shop.dump: table "public"."items": 200 rows '
                      'restored, 201 counted at dump time', proc.stdout)
        # Old statistics (estimates) say so, and pass at half.
        stats.update(counts=None, source='pg_stat_user_tables.n_live_tup')
        stats['tables'][0]['rows'] = 390
        rewrite_stored(snap, 'shop.dump.stats.json',
                       json.dumps(stats).encode())
        proc = p.server('drill')
        self.assertIn('shop.dump: 1 table(s) against estimated row counts',
                      proc.stdout)

    def test_estimates_when_asked_and_the_drill_says_so(self):
        """[client] pg_row_counts = estimate: no second scan; the drill
        checks the estimates loosely and says they were estimates."""
        self.cluster.psql('ANALYZE items', db='shop')
        self.p.edit_config('\n[nodes]\n', 'pg_row_counts = estimate\n\n'
                           '[nodes]\n')
        self.backup('shop')
        [snap] = self.p.stored('postgresdb')
        with open(os.path.join(snap, 'shop.dump.stats.json')) as f:
            stats = json.load(f)
        self.assertEqual((stats['counts'], stats['source']),
                         ('estimate', 'pg_stat_user_tables.n_live_tup'))
        proc = self.p.server('drill')
        self.assertIn('shop.dump: 1 table(s) against estimated row counts',
                      proc.stdout)


if __name__ == '__main__':
    unittest.main()
