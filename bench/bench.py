"""make bench: what users compare, kept out of the timed suite.

On this machine (private sshd on 127.0.0.1, as in make demo), with the
default configuration (zstd, incremental archives):

1. first backup of a big tree: half random, half text (1 GiB);
2. first backup of 20,000 small text files;
3. second backup of the unchanged big tree (time and bytes stored);
4. seven days of 1% churn in the small files (bytes stored after them);
5. peak RSS of the largest process of ours (Python, tar, zstd, ssh, sftp);
6. one `server.py run` on a node with 50 clients of one small file each
   (fs requests over sftp), then with 1000 clients of one dummy request;
7. what exact row counts cost a PostgreSQL dump: `pg_dump -Fc` of a
   3M-row table against the count(*) the postgresdb module adds (the
   second scan behind `[client] pg_row_counts = exact`);
8. what full metadata costs: the fs module's tar of the big and the small
   tree (zstd -T4 -3) in GNU format without xattrs and ACLs, as archives
   were made before, against POSIX format with every xattr namespace,
   ACLs (and SELinux labels where tar knows them), as they are made now:
   time and size, median of three runs.

The many-client node is set up cheaply but faithfully: one real client
makes the request (`client.py commit` + `send`, the node's real hook
ingests it), then its pushed repository and its ingested pool are copied
for every other client (each with its own `[client NAME]` section and its
own hook), as if each had pushed the same commit.  All fs clients offer
the same small file, each over its own connection.

A gitbackup backup is `client.py send` (tar, zstd, sha256, push) plus
`server.py run` (sftp pull, sha256, store); the results fetch the next
cron send does is not counted.  Where restic or borg is installed
(`make bench-deps`), the same work is done with them in the same run, over
the same loopback sshd (restic: sftp repository; borg: over ssh), and
the ratios gitbackup/restic are printed.

Each measured command starts after os.sync(), so no tool pays for the
dirty pages of the trees or of the tool before it; the many-client runs
also print CPU seconds, steadier than wall time on a shared machine.

Sizes and client counts scale with $BENCH_SCALE (default 1; 0.05 for a
quick run); $BENCH_ONLY=clients, trees, postgres or metadata runs only
that part,
=first only the first backup of the big tree.
"""

import os
import random
import shutil
import textwrap
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import support  # noqa: E402
from tests.demo import Demo  # noqa: E402
from tests.pipeline import CLIENT, NODE, Pipeline  # noqa: E402
from modules._core import Config  # noqa: E402
import server  # noqa: E402

MEASURE = '''
import resource, subprocess, sys
rc = subprocess.run(sys.argv[1:]).returncode
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(r.ru_maxrss, r.ru_utime + r.ru_stime, file=sys.stderr)
sys.exit(rc)
'''
# CPU seconds (user + system, all processes) of the last measured()
# command: steadier than wall time on a machine shared with other work.
LAST_CPU = [0.0]
WORDS = [f'w{i:x}' * (1 + i % 4) for i in range(4000)]


def measured(args, env):
    """(seconds, peak RSS in MiB of the largest process) of one command."""
    # Dirty pages of the trees just written or of the previous tool would
    # otherwise be flushed by whoever fsyncs next (gitbackup's first
    # backup took 16.6 s straight after make_big, 7.3 s after a sync).
    os.sync()
    start = time.monotonic()
    proc = subprocess.run([sys.executable, '-c', MEASURE, *args], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    seconds = time.monotonic() - start
    if proc.returncode not in (0, 1):   # 1: tar saw files change (ok)
        raise SystemExit(f'{" ".join(args)} failed:\n{proc.stderr}')
    rss, LAST_CPU[0] = proc.stderr.strip().splitlines()[-1].split()
    LAST_CPU[0] = float(LAST_CPU[0])
    return seconds, int(rss) / 1024


def tree_size(path):
    return sum(os.lstat(os.path.join(d, f)).st_size
               for d, _, files in os.walk(path) for f in files)


def text(rng, size):
    out, n = [], 0
    while n < size:
        line = ' '.join(rng.choice(WORDS) for _ in range(10)) + '\n'
        out.append(line)
        n += len(line)
    return ''.join(out)[:size]


def make_big(root, mib):
    """Half random (64 MiB files), half text: mib MiB in all."""
    os.makedirs(root)
    rng = random.Random(1)
    for i in range(max(mib // 2 // 64, 1)):
        with open(os.path.join(root, f'random-{i}.bin'), 'wb') as f:
            for _ in range(min(64, mib // 2)):
                f.write(os.urandom(1 << 20))
    chunk = text(rng, 1 << 20)
    for i in range(max(mib // 2 // 64, 1)):
        with open(os.path.join(root, f'text-{i}.txt'), 'w') as f:
            for j in range(min(64, mib // 2)):
                f.write(chunk[j:] + chunk[:j])


def make_small(root, count, rng, names=None):
    """count text files of about 10 kB in 100 directories (or rewrite
    the given names)."""
    for i in names if names is not None else range(count):
        path = os.path.join(root, f'd{i % 100:02d}', f'f{i:05d}.txt')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            f.write(text(rng, 4000 + rng.randrange(12000)))


class Gitbackup:
    name = 'gitbackup'

    def __init__(self, p):
        self.p = p

    def backup(self, source, src):
        p = self.p
        p.client('commit', source, src)
        run = [os.path.join(support.ROOT, 'client.py'), '--config', p.config,
               '-q']
        send_s, send_rss = measured([sys.executable, *run, 'send'], p.env)
        run[0] = os.path.join(support.ROOT, 'server.py')
        run_s, run_rss = measured([sys.executable, *run, 'run'], p.env)
        p.client('send')     # the next cron send learns the result
        return send_s + run_s, max(send_rss, run_rss)

    def stored(self, source):
        return tree_size(os.path.join(self.p.node_dir, 'data', CLIENT,
                                      'files', source))


class Restic:
    name = 'restic'

    def __init__(self, p):
        self.p = p
        sshd = p.sshd
        self.env = {**p.env, 'RESTIC_PASSWORD': 'bench',
                    'RESTIC_CACHE_DIR': os.path.join(p.root, 'restic-cache')}
        self.ssh = (f'{sshd.ssh_command(p.client_key)} -p {sshd.port} '
                    f'{sshd.user}@127.0.0.1 -s sftp')

    def repo(self, source):
        return os.path.join(self.p.root, f'{self.name}-{source}')

    def command(self, source, *args):
        return ['restic', '-q', '-r', f'sftp::{self.repo(source)}',
                '-o', f'sftp.command={self.ssh}', *args]

    def backup(self, source, src):
        if not os.path.exists(self.repo(source)):
            subprocess.run(self.command(source, 'init'), env=self.env,
                           check=True, stdout=subprocess.DEVNULL)
        return measured(self.command(source, 'backup', src), self.env)

    def stored(self, source):
        return tree_size(self.repo(source))


class Borg(Restic):
    name = 'borg'

    def __init__(self, p):
        super().__init__(p)
        self.env = {**p.env, 'BORG_RSH': p.sshd.ssh_command(p.client_key),
                    'BORG_PASSPHRASE': '', 'BORG_BASE_DIR':
                    os.path.join(p.root, 'borg-base')}
        self.count = 0

    def url(self, source):
        return (f'ssh://{self.p.sshd.user}@127.0.0.1:{self.p.sshd.port}'
                f'{self.repo(source)}')

    def backup(self, source, src):
        if not os.path.exists(self.repo(source)):
            subprocess.run(['borg', 'init', '-e', 'none', self.url(source)],
                           env=self.env, check=True)
        self.count += 1
        return measured(['borg', 'create', f'{self.url(source)}::'
                         f'b{self.count}', src], self.env)


def run_scenarios(tools, root, scale, first_only=False):
    """{scenario: {tool: (value, unit)}} and the peak RSS per tool; with
    first_only, only the first backup of the big tree."""
    big, small = os.path.join(root, 'big'), os.path.join(root, 'small')
    mib, count = max(int(1024 * scale), 2), max(int(20000 * scale), 100)
    make_big(big, mib)
    rng = random.Random(2)
    if not first_only:
        make_small(small, count, rng)
    size_big = tree_size(big)
    rows, peak = {}, {t.name: 0.0 for t in tools}

    def note(scenario, tool, value, unit, rss=0.0):
        rows.setdefault(scenario, {})[tool.name] = (value, unit)
        peak[tool.name] = max(peak[tool.name], rss)

    for t in tools:
        s, rss = t.backup('big', big)
        note(f'first backup, {mib} MiB (half random, half text)', t, s, 's',
             rss)
        note('  stored by it (MB)', t, t.stored('big') / 1e6, 'MB')
    if first_only:
        return rows
    for t in tools:
        s, rss = t.backup('small', small)
        note(f'first backup, {count} small files '
             f'({tree_size(small) / 1e6:.0f} MB)', t, s, 's', rss)
        before = t.stored('big')
        s, rss = t.backup('big', big)
        note('second backup, unchanged big tree', t, s, 's', rss)
        note('  stored by it (% of the tree)', t,
             100.0 * (t.stored('big') - before) / size_big, '%')
    for day in range(7):
        names = rng.sample(range(count), max(count // 100, 1))
        make_small(small, count, rng, names)
        for t in tools:
            s, rss = t.backup('small', small)
            note('seven days of 1% churn: time of one day', t, s, 's', rss)
    for t in tools:
        note('  stored after the first backup and 7 days (MB)', t,
             t.stored('small') / 1e6, 'MB')
    for t in tools:
        note('peak RSS of the largest process', t, peak[t.name], 'MiB')
    return rows


# -- many clients on one node ------------------------------------------------

def template_request(demo, module):
    """A Pipeline whose client c1 has pushed one request of the module
    (its hook ingested it): the request every bench client will offer."""
    p = Pipeline(demo, modules={'app': 'fs', 'dummy': 'dummy'})
    demo.cleanups.callback(shutil.rmtree, p.root, ignore_errors=True)
    src = os.path.join(p.root, 'small-source')
    os.makedirs(src)
    with open(os.path.join(src, 'file.txt'), 'w') as f:
        f.write('one small file\n' * 100)
    p.client('commit', 'app' if module == 'fs' else 'dummy', src)
    p.client('send')
    return p


def many_node_config(p, root, count, jobs=None):
    """A node configuration like the pipeline's, with count clients."""
    n = os.path.join(root, 'node')
    for d in ('TODO', 'data', 'log', 'repositories'):
        os.makedirs(os.path.join(n, d))
    clients = ''.join(f'[client c{i:04d}]\nsftp = {p.sshd.user}@127.0.0.1\n'
                      f'sftp_port = {p.sshd.port}\n\n' for i in range(count))
    path = os.path.join(root, 'node.ini')
    with open(path, 'w') as f:
        f.write(textwrap.dedent(f'''\
            [server]
            name = {NODE}
            todo_dir = {n}/TODO
            data_dir = {n}/data
            log_dir = {n}/log
            repositories = {n}/repositories
            admin = node-admin@example.invalid
            sftp_root = {p.client_dir}/export
            ssh_command = {p.sshd.ssh_command(p.node_key)}
            free_space_floor = 0
            {f"jobs = {jobs}" if jobs else ""}

            ''') + clients + f'[mail]\nmethod = spool\n'
                f'spool_dir = {root}/mail\n')
    return path, n


def copy_clients(p, config, node_dir, count):
    """Every client gets c1's pushed repository (with its own hook) and c1's
    ingested pool: the state a push of the same commit leaves."""
    node = server.Node(Config(config))
    pool = os.path.join(p.node_dir, 'TODO', CLIENT)
    for i in range(count):
        client = f'c{i:04d}'
        repo = node.repository(client)
        shutil.copytree(p.repo, repo, symlinks=True)
        node.client_repositories.install_hook(repo, 'post-update',
                                              node.hook_text(client))
        shutil.copytree(pool, os.path.join(node_dir, 'TODO', client),
                        ignore=shutil.ignore_patterns('*.lock'))


def many_clients_run(p, root, count, jobs=None):
    """(setup s, run s, peak RSS MiB) of one server.py run over count
    clients with one request each; raises unless every one was stored."""
    start = time.monotonic()
    config, node_dir = many_node_config(p, root, count, jobs)
    copy_clients(p, config, node_dir, count)
    setup = time.monotonic() - start
    seconds, rss = measured([sys.executable, os.path.join(
        support.ROOT, 'server.py'), '--config', config, '-q', 'run'], p.env)
    todo = os.path.join(node_dir, 'TODO')
    done = sum(1 for c in os.listdir(todo) for name in
               os.listdir(os.path.join(todo, c)) if name.startswith('F'))
    if done != count:
        raise SystemExit(f'{count} clients: only {done} requests stored')
    return setup, seconds, rss


def run_many_clients(demo, scale):
    """{scenario: {'gitbackup': (value, unit)}} of the many-client runs,
    each phase printed as it ends."""
    rows = {}
    for module, full, goal in (('fs', 50, 6.4), ('dummy', 1000, 5.0)):
        count = max(int(full * scale), 4)
        p = template_request(demo, module)
        runs = [('', None)] + ([(', jobs = 1', 1)] if module == 'fs' else [])
        for label, jobs in runs:
            root = os.path.join(p.root, f'many{jobs or ""}')
            setup, seconds, rss = many_clients_run(p, root, count, jobs)
            print(f'{count} {module} clients{label}: setup {setup:.1f} s, '
                  f'server.py run {seconds:.2f} s, CPU {LAST_CPU[0]:.2f} s '
                  f'({1000 * seconds / count:.1f} ms per client, peak RSS '
                  f'{rss:.0f} MiB; goal at full scale < {goal} s)',
                  flush=True)
            rows[f'{count} clients x one {module} request, one run{label}'] \
                = {'gitbackup': (seconds, 's')}
        p.sshd.stop()
    return rows


def run_row_counts(root, scale):
    """7: seconds of pg_dump -Fc and of the exact counts, on one table."""
    from modules import postgresdb
    if not support.pg_bindir():
        print('PostgreSQL server programs not installed: no row-count bench')
        return
    cluster = support.PostgresCluster(os.path.join(root, 'pg'))
    cluster.start()
    try:
        rows = max(int(3_000_000 * scale), 1000)
        cluster.psql('CREATE DATABASE big')
        cluster.psql("CREATE TABLE t (id int, name text, v numeric); INSERT "
                     f"INTO t SELECT n, 'name ' || n || repeat('x', 40), "
                     f"n * 1.5 FROM generate_series(1, {rows}) n", db='big')
        cluster.psql('VACUUM ANALYZE t', db='big')
        env = {k: v for k, v in os.environ.items() if not k.startswith('PG')}
        env.update(cluster.env())
        start = time.monotonic()
        subprocess.run([support.pg_tool('pg_dump'), '-Fc', '-f',
                        os.path.join(root, 'big.dump'), 'big'], env=env,
                       check=True)
        dumped = time.monotonic()
        subprocess.run([support.pg_tool('psql'), '-X', '-A', '-t', '-q',
                        '-d', 'big', '-c', postgresdb.COUNT_ROWS], env=env,
                       check=True, stdout=subprocess.DEVNULL)
        counted = time.monotonic()
        print(f'pg_dump -Fc of {rows} rows: {dumped - start:.2f} s; exact '
              f'row counts: {counted - dumped:.2f} s '
              f'({100 * (counted - dumped) / (dumped - start):.1f}%)')
    finally:
        cluster.stop()


def run_metadata(root, scale):
    """8: seconds and bytes of one archive with and without full metadata
    (median of three), on the bench trees."""
    from modules import fs
    trees = os.path.join(root, 'meta')
    make_big(os.path.join(trees, 'big'), max(int(1024 * scale), 8))
    make_small(os.path.join(trees, 'small'), max(int(20000 * scale), 100),
               random.Random(2))
    variants = (('GNU format, no xattrs or ACLs', []),
                ('POSIX, xattrs, ACLs (now)', fs.metadata_options(['tar'])))
    archive = os.path.join(root, 'meta.tar.zst')
    results = {}
    for label, options in variants:
        times = []
        for _ in range(3):
            os.sync()
            start = time.monotonic()
            subprocess.run(
                ['sh', '-c', 'tar --create --file=- --sparse "$@" '
                 f'--directory={trees} . | zstd -q -T4 -3 -f -o {archive}',
                 'tar', *options], check=True)
            times.append(time.monotonic() - start)
        results[label] = (sorted(times)[1], os.path.getsize(archive))
    (old_s, old_b), (new_s, new_b) = results.values()
    for label, (seconds, size) in results.items():
        print(f'{label:34} {seconds:6.2f} s {size:>13,} bytes')
    print(f'full metadata costs {100 * (new_s / old_s - 1):+.1f}% time, '
          f'{100 * (new_b / old_b - 1):+.2f}% size')


def print_rows(rows, tools):
    names = [t.name for t in tools]
    print(f'{"":52} ' + ' '.join(f'{n:>12}' for n in names) +
          ('   ratio to restic' if 'restic' in names else ''))
    for scenario, values in rows.items():
        cells = [f'{values[n][0]:>9.3f} {values[n][1]:<3}'
                 if n in values else f'{"-":>13}' for n in names]
        line = f'{scenario:52} ' + ' '.join(cells)
        if 'restic' in values and values['restic'][0]:
            line += f'   {values["gitbackup"][0] / values["restic"][0]:.2f}'
        print(line)


def main():
    scale = float(os.environ.get('BENCH_SCALE', '1'))
    demo = Demo()
    with demo.cleanups:
        p = Pipeline(demo, modules={'big': 'fs', 'small': 'fs'})
        demo.cleanups.callback(shutil.rmtree, p.root, ignore_errors=True)
        tools = [Gitbackup(p)] + [cls(p) for cls in (Restic, Borg)
                                  if shutil.which(cls.name.lower())]
        missing = {'restic', 'borg'} - {t.name for t in tools}
        if missing:
            print(f'not installed, not compared: {" ".join(sorted(missing))}'
                  ' (make bench-deps)')
        print(f'BENCH_SCALE={scale}, {os.cpu_count()} cores')
        only = os.environ.get('BENCH_ONLY', '')
        rows = {}
        if only in ('', 'clients'):
            rows.update(run_many_clients(demo, scale))
        if only in ('', 'trees', 'first'):
            rows.update(run_scenarios(tools, os.path.join(p.root, 'trees'),
                                      scale, first_only=only == 'first'))
        print_rows(rows, tools)
        if only in ('', 'postgres'):
            run_row_counts(p.root, scale)
        if only in ('', 'metadata'):
            run_metadata(p.root, scale)
    return 0


if __name__ == '__main__':
    sys.exit(main())
