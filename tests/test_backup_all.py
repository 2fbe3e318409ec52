"""backup-all (the monthly cron job): every [sources] entry becomes a
request -- a directory, a glob of repositories, postgresdb = all -- and all
of them land on the node; a bad entry does not stop the others."""

import os
import unittest

from tests import support
from tests.modules_pipeline import ModulePipeline, PostgresMixin


class BackupAllTest(PostgresMixin, unittest.TestCase):
    @classmethod
    def create_data(cls, cluster):
        cluster.psql('CREATE DATABASE inventory')
        cluster.psql('CREATE TABLE parts (id int, name text); INSERT INTO '
                     "parts VALUES (1, 'bolt'), (2, 'nut')", db='inventory')

    def setUp(self):
        support.require_tools('pg_dump', 'pg_dumpall', 'psql', 'pg_restore')
        self.p = ModulePipeline(self)
        self.p.use_postgres(self.cluster, 'config')
        self.app = os.path.join(self.p.root, 'app data')
        os.makedirs(os.path.join(self.app, 'sub'))
        with open(os.path.join(self.app, 'sub', 'settings.txt'), 'w') as f:
            f.write('x = 1\n')

    def make_repositories(self, *names):
        heads = {}
        for name in names:
            bare = self.p.client_repository(name, hook=False)
            work = self.p.work_clone(bare, name='work-' + name)
            heads[name] = self.p.commit_file(work, 'f', name + '\n')
            self.p.git('push', '--quiet', 'origin', 'master', cwd=work)
        return heads

    def test_backup_all_stores_everything(self):
        p = self.p
        p.start_daemon()
        heads = self.make_repositories('one.git', 'two.git')
        os.makedirs(os.path.join(p.git_base, 'not-matched'))
        p.add_config(f'''\
            [sources]
            app        = "{self.app}"
            git        = {p.git_base}/*.git
            postgresdb = all
            ''')
        proc = p.client('backup-all', '--node', 'n1')
        self.assertIn('4 request(s) recorded', proc.stderr)
        self.assertEqual(p.states(), {'C': 4})
        p.client('send')
        self.assertEqual(p.states(), {'F': 4})
        p.server('run')
        # app + 2 repositories + globals and 3 databases (postgres,
        # inventory and whatever else the shared cluster holds).
        self.assertNotIn('X', p.states('node'))
        self.assertEqual(len(p.stored('app')), 1)
        for name, head in heads.items():
            self.assertEqual(p.refs(p.mirror(name)),
                             {'refs/heads/master': head})
        files = p.stored_files('postgresdb')
        self.assertIn('globals.sql', files)
        self.assertIn('inventory.dump', files)
        self.assertIn('postgres.dump', files)
        self.cluster.psql('CREATE DATABASE inventory_restored')
        self.pg('pg_restore', '--exit-on-error', '--dbname',
                'inventory_restored', files['inventory.dump'])
        self.assertEqual(self.cluster.psql(
            'SELECT name FROM parts ORDER BY id', db='inventory_restored'),
            'bolt\nnut')
        self.cluster.psql('DROP DATABASE inventory_restored')

    def test_bad_entry_does_not_stop_the_others(self):
        p = self.p
        self.make_repositories('good.git')
        os.makedirs(os.path.join(p.git_base, 'junk.git'))
        p.add_config(f'''\
            [sources]
            app        = {p.root}/missing "{self.app}"
            git        = {p.git_base}/*.git {p.root}/nothing/*.git
            dummy      = monthly
            ''')
        proc = p.client('backup-all', check=False)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn(f'{p.root}/missing', proc.stderr)
        self.assertIn('junk.git: not a git repository', proc.stderr)
        self.assertIn('matches nothing', proc.stderr)
        # app data, good.git and dummy were recorded all the same.
        self.assertEqual(p.states(), {'C': 3})
        [mail] = p.mails()
        self.assertIn('backup-all', mail['subject'])
        self.assertIn('junk.git', mail.get_content())
        proc = p.client('backup-all', '--node', 'nosuchnode', check=False)
        self.assertEqual(proc.returncode, 2)
        self.assertIn("unknown node 'nosuchnode'", proc.stderr)
        self.assertEqual(p.states(), {'C': 3})


if __name__ == '__main__':
    unittest.main()
