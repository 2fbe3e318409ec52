"""The postgresdb module end to end against a private PostgreSQL cluster:
dumps travel commit -> send -> ingest -> run (sftp) and restore with
pg_restore and psql into the same rows and roles."""

import os
import unittest

from tests import support
from tests.modules_pipeline import ModulePipeline, PostgresMixin

ROWS_SHOP = [('1', 'apple', '0.50'), ('2', 'pear', '0.75'),
             ('3', "o'range", '1.20')]


class PostgresModuleTest(PostgresMixin, unittest.TestCase):
    @classmethod
    def create_data(cls, cluster):
        cluster.psql('CREATE DATABASE shop')
        cluster.psql('CREATE DATABASE hr')
        cluster.psql('CREATE ROLE auditor LOGIN CONNECTION LIMIT 3')
        cluster.psql('CREATE TABLE items (id int PRIMARY KEY, name text, '
                     'price numeric(6,2)); INSERT INTO items VALUES '
                     "(1, 'apple', 0.50), (2, 'pear', 0.75), "
                     "(3, 'o''range', 1.20); GRANT SELECT ON items TO auditor",
                     db='shop')
        cluster.psql('CREATE TABLE staff (name text); INSERT INTO staff '
                     "SELECT 'person ' || n FROM generate_series(1, 500) n",
                     db='hr')

    def setUp(self):
        support.require_tools('pg_dump', 'pg_dumpall', 'psql', 'pg_restore')
        self.p = ModulePipeline(self)

    def rows(self, db, sql):
        return [tuple(line.split('|')) for line in
                self.cluster.psql(sql, db=db).splitlines()]

    def restore(self, dump, db):
        self.cluster.psql(f'CREATE DATABASE {db}')
        self.pg('pg_restore', '--exit-on-error', '--dbname', db, dump)

    def test_all_databases_and_globals_restore(self):
        p = self.p
        p.use_postgres(self.cluster, 'config')
        p.client('commit', 'postgresdb', 'all')
        p.client('send')
        self.assertEqual(p.states(), {'F': 1})
        # One sftp request per file: globals and one dump per database.
        self.assertEqual(p.states('node'), {'RQ': 4})
        p.server('run')
        self.assertEqual(p.states('node'), {'F': 4})
        # Without [server] drill_postgres the drill only reads the dumps
        # back, and says so: nothing claims they were restored.
        drill = p.server('drill')
        self.assertIn('3 dump(s) read back with pg_restore --list, not '
                      'restored', drill.stdout)
        self.assertIn('1 snapshot(s) and mirror(s) checked, 0 failed',
                      drill.stdout)
        self.assertNotIn('restored,', drill.stdout)
        files = p.stored_files('postgresdb')
        # Every dump comes with its tables' row statistics at dump time.
        self.assertEqual(sorted(files), [
            'globals.sql', 'hr.dump', 'hr.dump.stats.json', 'postgres.dump',
            'postgres.dump.stats.json', 'shop.dump', 'shop.dump.stats.json'])
        self.restore(files['shop.dump'], 'shop_restored')
        self.assertEqual(self.rows('shop_restored',
                                   'SELECT * FROM items ORDER BY id'),
                         ROWS_SHOP)
        self.restore(files['hr.dump'], 'hr_restored')
        self.assertEqual(self.rows('hr_restored', 'SELECT count(*), '
                                   'min(name), max(name) FROM staff'),
                         [('500', 'person 1', 'person 99')])
        # The globals file recreates the role (with its attributes).
        self.cluster.psql('DROP DATABASE shop_restored')
        self.cluster.psql('REVOKE ALL ON items FROM auditor', db='shop')
        self.cluster.psql('DROP ROLE auditor')
        self.assertEqual(self.cluster.psql(
            "SELECT count(*) FROM pg_roles WHERE rolname = 'auditor'"), '0')
        # 'role "postgres" already exists' is expected: no ON_ERROR_STOP.
        self.pg('psql', '-X', '-q', '-d', 'postgres', '-f',
                files['globals.sql'])
        self.assertEqual(self.rows('postgres', 'SELECT rolcanlogin, '
                                   "rolconnlimit FROM pg_roles WHERE "
                                   "rolname = 'auditor'"), [('t', '3')])
        self.cluster.psql('GRANT SELECT ON items TO auditor', db='shop')
        with open(files['globals.sql']) as f:
            self.assertIn('CREATE ROLE auditor', f.read())

    def test_missing_database_fails_that_request_only(self):
        """The libpq environment instead of config keys; a database that
        does not exist fails its own request with pg_dump's message, the
        other requests of the same send go on, nothing half-written is
        left in export_dir."""
        p = self.p
        p.use_postgres(self.cluster, 'env')
        p.client('commit', 'postgresdb', 'shop')
        p.client('commit', 'postgresdb', 'nosuchdb')
        p.client('commit', 'dummy', 'marker')
        proc = p.client('send', check=False)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn("pg_dump of database 'nosuchdb' failed", proc.stderr)
        self.assertIn('"nosuchdb" does not exist', proc.stderr)
        self.assertEqual(p.states(), {'C': 1, 'F': 2})
        exported = []
        for root, _, names in os.walk(os.path.join(p.client_dir, 'export')):
            exported += names
        self.assertEqual(sorted(exported), ['shop.dump',
                                            'shop.dump.stats.json'])
        p.server('run')
        self.assertEqual(p.states('node'), {'F': 2})
        files = p.stored_files('postgresdb')
        self.assertEqual(sorted(files), ['shop.dump', 'shop.dump.stats.json'])
        self.restore(files['shop.dump'], 'shop_again')
        self.assertEqual(self.rows('shop_again',
                                   'SELECT * FROM items ORDER BY id'),
                         ROWS_SHOP)
        self.cluster.psql('DROP DATABASE shop_again')
        # The failed request is retried by the next send, with its history
        # (the attempts beside the pool, as on the node).
        [name] = [n for n in p.pool() if n.startswith('C')]
        with open(os.path.join(p.client_dir, 'requests', 'n1', '.attempts',
                               name[1:])) as f:
            self.assertIn('does not exist', f.read())

    def test_one_broken_database_does_not_hold_up_all(self):
        """Within `all`, a database whose dump fails is requested again on
        its own (and the admins told); the other dumps are sent now."""
        p = self.p
        p.use_postgres(self.cluster, 'config')
        wrapper = os.path.join(p.root, 'pg_dump_but_not_hr')
        with open(wrapper, 'w') as f:
            f.write('#!/bin/sh\ncase "$*" in *"dbname=\'hr\'"*) '
                    'echo "pg_dump: error: simulated failure" >&2; exit 1;; '
                    f'esac\nexec {support.pg_tool("pg_dump")} "$@"\n')
        os.chmod(wrapper, 0o755)
        p.edit_config('\n[nodes]\n', f'pg_dump = {wrapper}\n\n[nodes]\n')
        p.client('commit', 'postgresdb', 'all')
        proc = p.client('send', check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("postgresdb hr failed and was requested again on its "
                      "own", proc.stderr)
        self.assertEqual(p.states(), {'F': 1, 'C': 1})
        [retry] = [n for n in p.pool() if n.startswith('C')]
        with open(os.path.join(p.client_dir, 'requests', 'n1', retry)) as f:
            self.assertEqual(f.read(), 'postgresdb\thr\n')
        self.assertIn('requested again on its own',
                      p.mails()[0].get_content())
        p.server('run')
        stored = p.stored_files('postgresdb')  # the cluster is shared
        self.assertLessEqual({'globals.sql', 'postgres.dump', 'shop.dump'},
                             set(stored))
        self.assertNotIn('hr.dump', stored)
        # Once pg_dump works again, the retry brings hr too.
        p.edit_config(f'pg_dump = {wrapper}\n', '')
        p.client('send')
        p.server('run')
        self.assertIn('hr.dump', p.stored_files('postgresdb'))

    def test_command_prefix_runs_the_tools_as_postgres(self):
        """[client] pg_dump etc. are command prefixes, as with
        `sudo -n -u postgres pg_dump` (runuser here: no sudo needed)."""
        if os.geteuid() != 0:
            self.skipTest('switching to the postgres account needs root')
        support.require_tools('runuser')
        p = self.p
        p.use_postgres(self.cluster, 'config')
        for tool in ('pg_dump', 'pg_dumpall', 'psql'):
            p.edit_config('\n[nodes]\n', f'\n{tool} = runuser -u postgres '
                          f'-- {support.pg_tool(tool)}\n\n[nodes]\n')
        p.client('commit', 'postgresdb', 'all')
        p.client('send')
        p.server('run')
        files = p.stored_files('postgresdb')
        self.assertIn('globals.sql', files)
        self.assertIn('shop.dump', files)

    def test_server_down_and_bad_names(self):
        p = self.p
        for name in ('shop;drop', 'a b', 'dbname=x', '-h', '../x'):
            proc = p.client('commit', 'postgresdb', '--', name, check=False)
            self.assertEqual(proc.returncode, 2, (name, proc.stderr))
            self.assertIn('not a database name', proc.stderr)
        self.assertEqual(p.states(), {})
        # No server at this socket: psql cannot list the databases.
        p.env.update({'PGHOST': os.path.join(p.root, 'nowhere'),
                      'PGPORT': '5432', 'PGUSER': 'postgres'})
        p.client('commit', 'postgresdb', 'all')
        proc = p.client('send', check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn('cannot list the databases', proc.stderr)
        self.assertEqual(p.states(), {'C': 1})


if __name__ == '__main__':
    unittest.main()
