"""A Pipeline with the data modules: git daemon, PostgreSQL, [sources].

``ModulePipeline(testcase)`` is ``pipeline.Pipeline`` with every module in
[modules] (app = fs, dummy, git, postgresdb), plus:

* ``daemon``: a ``git daemon`` on a loopback port exporting the client's
  git_base (started by ``start_daemon()``); the client's ``git_export`` and
  the node's ``[client c1] git`` both name it;
* ``use_postgres(cluster, how)``: point the client at a
  ``support.PostgresCluster`` through [client] pg_host/pg_port/pg_user
  (``how='config'``) or the libpq environment (``how='env'``);
* helpers to make repositories under git_base and read the node's mirrors.
"""

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import textwrap

from tests import support
from tests.pipeline import CLIENT, NODE, Pipeline

MODULES = {'app': 'fs', 'dummy': 'dummy', 'git': 'git',
           'postgresdb': 'postgresdb'}


class ModulePipeline(Pipeline):
    def __init__(self, testcase, extra_config='', commands=None):
        super().__init__(testcase, extra_config=extra_config, modules=MODULES,
                         commands=commands)
        self.git_base = os.path.join(self.client_dir, 'git')
        self.daemon = support.GitDaemon(self.git_base,
                                        os.path.join(self.root, 'daemon'))
        self.git_url = f'git://127.0.0.1:{self.daemon.port}'
        self.edit_config('git_export = git://127.0.0.1\n',
                         f'git_export = {self.git_url}\n')
        self.edit_config(f'[client {CLIENT}]\n',
                         f'[client {CLIENT}]\ngit = {self.git_url}\n')

    def edit_config(self, old, new):
        with open(self.config) as f:
            text = f.read()
        if old not in text:
            raise AssertionError(f'{old!r} not in {self.config}')
        with open(self.config, 'w') as f:
            f.write(text.replace(old, new, 1))

    def add_config(self, text):
        with open(self.config, 'a') as f:
            f.write('\n' + textwrap.dedent(text))

    def start_daemon(self):
        self.daemon.start()
        self.testcase.addCleanup(self.daemon.stop)

    def use_postgres(self, cluster, how='config'):
        pg = cluster.env()
        if how == 'config':
            self.edit_config('\n[nodes]\n', (
                f'pg_host = {pg["PGHOST"]}\npg_port = {pg["PGPORT"]}\n'
                f'pg_user = {pg["PGUSER"]}\n\n[nodes]\n'))
        else:
            self.env.update(pg)

    # -- git ----------------------------------------------------------------

    def git(self, *args, cwd=None, check=True):
        proc = subprocess.run(['git', *args], cwd=cwd, env=self.env,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)
        if check and proc.returncode != 0:
            self.testcase.fail(f'git {" ".join(args)} exited '
                               f'{proc.returncode}:\n{proc.stderr}')
        return proc

    def client_repository(self, rel, hook=True):
        """A bare repository git_base/rel whose post-update hook records a
        backup request, as README tells admins to set it up."""
        path = os.path.join(self.git_base, rel)
        self.git('init', '--quiet', '--bare', path)
        if hook:
            with open(os.path.join(path, 'hooks', 'post-update'), 'w') as f:
                # The client command the tests run (its Python included).
                f.write('#!/bin/sh\n'
                        f'exec {shlex.join(self.commands["client.py"])} '
                        f'--config {self.config} commit git "$PWD"\n')
            os.chmod(os.path.join(path, 'hooks', 'post-update'), 0o755)
        return path

    def work_clone(self, bare, name='work'):
        work = os.path.join(self.root, name)
        self.git('clone', '--quiet', bare, work)
        return work

    def commit_file(self, work, name, text):
        with open(os.path.join(work, name), 'w') as f:
            f.write(text)
        self.git('add', name, cwd=work)
        self.git('commit', '--quiet', '-m', f'{name}: {text[:20]}', cwd=work)
        return self.git('rev-parse', 'HEAD', cwd=work).stdout.strip()

    def refs(self, git_dir, prefix='refs/'):
        out = self.git('--git-dir', git_dir, 'for-each-ref',
                       '--format=%(objectname) %(refname)', prefix).stdout
        return {ref: sha for sha, ref in
                (line.split(' ', 1) for line in out.splitlines())}

    def mirror(self, rel):
        name = rel[:-4] if rel.endswith('.git') else rel
        return os.path.join(self.node_dir, 'data', CLIENT, 'git',
                            name + '.git')

    def results(self):
        path = os.path.join(self.node_dir, 'data', CLIENT, 'results.jsonl')
        with open(path) as f:
            return [json.loads(line) for line in f]

    def stored_files(self, source):
        """{file name: path} of everything stored for a source."""
        found = {}
        for directory in self.stored(source):
            with open(os.path.join(directory, 'manifest.json')) as f:
                for entry in json.load(f)['files']:
                    found[entry['name']] = os.path.join(directory,
                                                        entry['name'])
        return found

    def write_client_request(self, module, path, request_id):
        """A request file put into the pool behind commit's back (an old
        request, or one edited by hand), for send-time validation."""
        pool = os.path.join(self.client_dir, 'requests', NODE)
        os.makedirs(pool, exist_ok=True)
        with open(os.path.join(pool, 'C' + request_id), 'w') as f:
            f.write(f'{module}\t{path}\n')


class PostgresMixin:
    """One private PostgreSQL cluster per test class (initdb is slow)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        workdir = tempfile.mkdtemp(prefix='gb-pg-')
        cls.addClassCleanup(shutil.rmtree, workdir,
                            ignore_errors=True)
        cls.cluster = support.PostgresCluster(workdir)
        cls.cluster.start()
        cls.addClassCleanup(cls.cluster.stop)
        cls.create_data(cls.cluster)

    @classmethod
    def create_data(cls, cluster):
        pass

    def pg(self, program, *args, check=True, input=None):
        env = {k: v for k, v in os.environ.items() if not k.startswith('PG')}
        env.update(self.cluster.env())
        proc = subprocess.run([support.pg_tool(program), *args], env=env,
                              input=input, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)
        if check and proc.returncode != 0:
            self.fail(f'{program} {" ".join(args)} exited {proc.returncode}:'
                      f'\n{proc.stderr}')
        return proc

