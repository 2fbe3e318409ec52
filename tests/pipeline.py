"""A client and a node on this machine, joined by a private sshd.

``Pipeline(testcase)`` builds, in a temporary directory:

* one sshd on 127.0.0.1 that lets in two keys: the client's (pushes to its
  repository on the node) and the node's (sftp from the client's
  export_dir);
* one configuration file with [client], [nodes], [server], [client c1]
  and [mail] (method spool, so tests read mails as files);
* the node's repository for the client, with the real post-update hook.

Client and node commands run as real subprocesses (``client()``,
``server()``), with HOME isolated: the tree's client.py and server.py, or
other commands for them (``commands=``, else $GITBACKUP_CLIENT_CMD and
$GITBACKUP_SERVER_CMD, split like a shell would), e.g. the Debian package's
gitbackup-client and gitbackup-server, or the tree's scripts under other
Pythons (``tree_commands(client_python, server_python)``).
"""

import email
import email.policy
import glob
import os
import shlex
import subprocess
import textwrap

from tests import support

CLIENT = 'c1'
NODE = 'n1'
COMMAND_VARIABLES = {'client.py': 'GITBACKUP_CLIENT_CMD',
                     'server.py': 'GITBACKUP_SERVER_CMD'}


def tree_commands(client_python=None, server_python=None):
    """{'client.py': argv, 'server.py': argv} of the tree's scripts, each
    run by the given interpreter (default: the one running the tests),
    e.g. the oldest each supports (tests/test_compat.py)."""
    pythons = {'client.py': client_python, 'server.py': server_python}
    return {script: [pythons[script] or support.PYTHON,
                     os.path.join(support.ROOT, script)]
            for script in COMMAND_VARIABLES}


def script_commands():
    """The tree's scripts, unless the environment names other commands."""
    tree = tree_commands()
    return {script: shlex.split(os.environ.get(variable, '')) or tree[script]
            for script, variable in COMMAND_VARIABLES.items()}


class Pipeline:
    def __init__(self, testcase, start=True, extra_config='', modules=None,
                 commands=None):
        support.require_tools('git', 'ssh', 'sftp', 'sshd', 'tar')
        self.testcase = testcase
        self.commands = {**script_commands(), **(commands or {})}
        self.root = support.temp_dir(
            testcase, getattr(testcase, 'temp_prefix', 'gitbackup-test-'))
        self.env = support.isolated_env(os.path.join(self.root, 'home'))
        self.sshd = support.SSHD(os.path.join(self.root, 'sshd'))
        keys = os.path.join(self.root, 'keys')
        os.makedirs(keys)
        self.client_key, client_pub = support.make_identity(keys, 'client')
        self.node_key, node_pub = support.make_identity(keys, 'node')
        self.sshd.add_key(client_pub)
        self.sshd.add_key(node_pub)
        c = self.client_dir = os.path.join(self.root, 'client')
        n = self.node_dir = os.path.join(self.root, 'node')
        for d in ('requests', 'queues', 'export', 'log', 'git'):
            os.makedirs(os.path.join(c, d))
        for d in ('TODO', 'data', 'log', 'repositories'):
            os.makedirs(os.path.join(n, d))
        self.repo = os.path.join(n, 'repositories', CLIENT + '.git')
        self.config = os.path.join(self.root, 'backup.ini')
        modules = modules or {'app': 'fs', 'dummy': 'dummy'}
        module_lines = '\n'.join(f'{k} = {v}' for k, v in modules.items())
        with open(self.config, 'w') as f:
            f.write(textwrap.dedent(f'''\
                [client]
                name = {CLIENT}
                default_node = {NODE}
                request_dir = {c}/requests
                queue_dir = {c}/queues
                export_dir = {c}/export
                sftp_export = {self.sshd.user}@127.0.0.1
                git_export = git://127.0.0.1
                git_base = {c}/git
                log_dir = {c}/log
                admin = client-admin@example.invalid
                ssh_command = {self.sshd.ssh_command(self.client_key)}

                [nodes]
                {NODE} = {self.sshd.url(self.repo)}

                [modules]
                ''') + module_lines + '\n' + textwrap.dedent(f'''
                [server]
                name = {NODE}
                todo_dir = {n}/TODO
                data_dir = {n}/data
                log_dir = {n}/log
                repositories = {n}/repositories
                admin = node-admin@example.invalid
                sftp_root = {c}/export
                ssh_command = {self.sshd.ssh_command(self.node_key)}
                free_space_floor = 0

                [client {CLIENT}]
                sftp = {self.sshd.user}@127.0.0.1
                sftp_port = {self.sshd.port}

                [mail]
                method = spool
                spool_dir = {self.root}/mail
                ''') + extra_config)
        # The node's configuration is valid before anything exists yet.
        check = self.server('check', check=False)
        if 'looks ready' not in check.stdout:
            raise AssertionError(f'server.py check: {check.stdout}'
                                 f'{check.stderr}')
        self.make_repository()
        if start:
            self.sshd.start()
            testcase.addCleanup(self.sshd.stop)

    def make_repository(self):
        if self.commands['server.py'] != tree_commands()['server.py']:
            # Another server command: its own provision writes the hook, so
            # that the hook runs that command's server.py.
            conf = os.path.join(self.root, 'gitosis.conf')
            with open(conf, 'w') as f:
                f.write(f'[group {CLIENT}]\nwritable = {CLIENT}\n'
                        f'members = host-{CLIENT}\n')
            self.server('provision', conf)
            return
        code = ('import sys; sys.path.insert(0, sys.argv[1]); import server; '
                'from modules._core import Config; '
                'server.Node(Config(sys.argv[2])).ensure_repository(sys.argv[3])')
        subprocess.run([support.PYTHON, '-c', code, support.ROOT,
                        self.config, CLIENT], check=True, env=self.env)

    def _run(self, script, args, check, timeout=300):
        proc = subprocess.run(
            [*self.commands[script], '--config', self.config, *args],
            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
        if check and proc.returncode != 0:
            self.testcase.fail(f'{script} {" ".join(args)} exited '
                               f'{proc.returncode}:\n{proc.stdout}\n'
                               f'{proc.stderr}')
        return proc

    def client(self, *args, check=True):
        return self._run('client.py', args, check)

    def server(self, *args, check=True):
        return self._run('server.py', args, check)

    # -- what landed --------------------------------------------------------

    def pool(self, side='client'):
        path = os.path.join(self.client_dir, 'requests', NODE) \
            if side == 'client' else os.path.join(self.node_dir, 'TODO', CLIENT)
        try:
            return sorted(n for n in os.listdir(path) if not n.startswith('.'))
        except FileNotFoundError:
            return []

    def states(self, side='client'):
        counts = {}
        for name in self.pool(side):
            state = 'RQ' if name.startswith('RQ') else name[0]
            if name.endswith('.reason'):
                state = 'reason'
            counts[state] = counts.get(state, 0) + 1
        return counts

    def stored(self, source):
        """Directories stored for a source, oldest first."""
        return sorted(glob.glob(os.path.join(
            self.node_dir, 'data', CLIENT, 'files', source, '*')))

    def node_log(self, tail=4000):
        """The end of the node's logs: what a failed assertion shows."""
        text = ''
        for path in sorted(glob.glob(os.path.join(self.node_dir, 'log',
                                                  '*.log'))):
            with open(path, errors='replace') as f:
                text += f'--- {path}\n' + f.read()[-tail:]
        return text

    def mails(self):
        out = []
        for path in sorted(glob.glob(os.path.join(self.root, 'mail', '*'))):
            with open(path, 'rb') as f:
                out.append(email.message_from_binary_file(
                    f, policy=email.policy.default))
        return out
