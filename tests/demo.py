"""make demo: a real end-to-end backup between a client and a node on this
one machine.

Starts a private sshd on 127.0.0.1 (the client pushes its requests through
it; the node fetches with sftp through it), a git daemon on a loopback port
exporting the client's git_base, and - where PostgreSQL is installed - a
private PostgreSQL cluster.  Then it backs up a sample tree, a git
repository (through the repository's own post-update hook) and the
databases, and prints what the node stored, the node's report and the
client's status.  Everything lives in one temporary directory, kept
afterwards so you can look around (its path is printed).
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tests import support  # noqa: E402
from tests.modules_pipeline import ModulePipeline  # noqa: E402


class Demo:
    """Just enough of a TestCase for the pipeline helpers."""

    temp_prefix = 'gitbackup-demo-'

    def __init__(self):
        self.cleanups = contextlib.ExitStack()

    def addCleanup(self, function, *args, **kwargs):
        # Keep the files: the person running the demo wants to look.
        if function is shutil.rmtree:
            return
        self.cleanups.callback(function, *args, **kwargs)

    def fail(self, message):
        raise SystemExit(f'demo failed: {message}')


def step(text):
    print(f'\n== {text}')
    sys.stdout.flush()


def show(proc):
    for stream in (proc.stdout, proc.stderr):
        for line in stream.strip().splitlines():
            print('   ' + line)


def main():
    demo = Demo()
    with demo.cleanups:
        p = ModulePipeline(demo)
        print(f'demo directory: {p.root}')
        print(f'configuration:  {p.config}')
        print(f'sshd on 127.0.0.1:{p.sshd.port}, git daemon on '
              f'127.0.0.1:{p.daemon.port}')
        p.start_daemon()

        step('a sample tree and a git repository on the client')
        tree = os.path.join(p.root, 'sample')
        os.makedirs(os.path.join(tree, 'etc', 'app'))
        with open(os.path.join(tree, 'etc', 'app', 'app.conf'), 'w') as f:
            f.write('listen = 127.0.0.1\n')
        with open(os.path.join(tree, 'README ü.txt'), 'w') as f:
            f.write('a file with a space and non-ASCII in its name\n')
        os.symlink('etc/app/app.conf', os.path.join(tree, 'current.conf'))
        repo = p.client_repository('project.git')
        work = p.work_clone(repo)
        p.commit_file(work, 'hello.txt', 'hello from the demo\n')
        print(f'   tree {tree}; repository {repo}')

        step('client.py commit app <tree>')
        p.client('commit', 'app', tree)
        step('git push into the repository (its post-update hook runs '
             'client.py commit git "$PWD")')
        p.git('push', '--quiet', 'origin', 'HEAD:master', cwd=work)

        have_pg = bool(support.pg_bindir())
        if have_pg:
            step('a private PostgreSQL cluster with a database')
            cluster = support.PostgresCluster(os.path.join(p.root,
                                                           'postgres'))
            cluster.start()
            demo.cleanups.callback(cluster.stop)
            cluster.psql('CREATE DATABASE shop')
            cluster.psql('CREATE TABLE orders (id int, item text); '
                         "INSERT INTO orders VALUES (1, 'tea'), (2, 'cups')",
                         db='shop')
            p.use_postgres(cluster)
            p.client('commit', 'postgresdb', 'all')
        else:
            step('PostgreSQL is not installed: skipping the database '
                 '(make deps installs it)')

        step('client.py send   (prepare, commit RQ files, push over ssh; '
             "the node's post-update hook runs server.py ingest)")
        show(p.client('send'))
        step('server.py run   (the node pulls: sftp for files, git for '
             'repositories)')
        show(p.server('run'))
        step('client.py send   (fetches the results the node reported back)')
        show(p.client('send'))

        step('what the node stored')
        data = os.path.join(p.node_dir, 'data')
        for source in ('app', 'postgresdb'):
            for directory in p.stored(source):
                with open(os.path.join(directory, 'manifest.json')) as f:
                    manifest = json.load(f)
                for entry in manifest['files']:
                    print(f'   {os.path.relpath(directory, data)}/'
                          f'{entry["name"]}')
                    print(f'      sha256 {entry["sha256"]}  '
                          f'{entry["size"]} bytes')
        mirror = p.mirror('project.git')
        if os.path.isdir(mirror):
            refs = p.refs(mirror, 'refs/heads/')
            print(f'   {os.path.relpath(mirror, data)}  '
                  + ', '.join(f'{r} {s[:12]}' for r, s in refs.items()))

        step('server.py list')
        show(p.server('list'))
        step('server.py restore c1 app --to <dir>: the tree equals the '
             'original')
        restored = os.path.join(p.root, 'restored')
        show(p.server('restore', 'c1', 'app', '--to', restored))
        same = subprocess.run(['diff', '-r', '--no-dereference', tree,
                               restored]).returncode == 0
        print('   identical' if same else '   DIFFERENT')

        step('server.py report')
        show(p.server('report', check=False))
        step('client.py status')
        show(p.client('status'))
        print(f'\nEverything is in {p.root} (servers stopped; remove it when '
              'done).')
        return 0 if same else 1


def run_demo():
    try:
        return main()
    except (unittest.SkipTest, support.MissingToolError) as e:
        print(f'demo: {e}\nInstall what is missing with `make deps` (as '
              'root), then run `make demo` again.', file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(run_demo())
