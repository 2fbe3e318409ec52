"""The git module end to end: a push into a client repository runs its
post-update hook (client.py commit), send and run mirror it on the node
through a real git daemon, and history the client rewrites or deletes stays
on the node.  Plus the refusals: paths outside git_base at commit and send
time, hostile URLs on the node."""

import os
import unittest

from tests import support
from tests.modules_pipeline import ModulePipeline
from tests.pipeline import CLIENT

PROJECT = 'proj/a.git'


class GitModuleTest(unittest.TestCase):
    def setUp(self):
        self.p = ModulePipeline(self)

    def assert_fsck_clean(self, git_dir):
        proc = self.p.git('--git-dir', git_dir, 'fsck', '--strict',
                          '--no-progress', check=False)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn('error', proc.stderr.lower())

    def backup(self, expect_requests):
        """send and run, after the hook recorded expect_requests new
        requests."""
        self.assertEqual(self.p.states().get('C'), expect_requests)
        done = self.p.states().get('F', 0)
        self.p.client('send')
        self.assertEqual(self.p.states(), {'F': done + expect_requests})
        self.p.server('run')
        self.assertEqual(self.p.states('node'),
                         {'F': done + expect_requests})

    def test_push_hook_mirror_and_preserved_history(self):
        p = self.p
        p.start_daemon()
        bare = p.client_repository(PROJECT)
        work = p.work_clone(bare)
        first = p.commit_file(work, 'README', 'one\n')
        second = p.commit_file(work, 'README', 'two\n')
        p.git('tag', '-a', '-m', 'release one', 'v1', first, cwd=work)
        p.git('checkout', '--quiet', '-b', 'topic', first, cwd=work)
        topic = p.commit_file(work, 'topic.txt', 'topic work\n')
        p.git('checkout', '--quiet', 'master', cwd=work)
        # One push of two branches and a tag: the hook records one request.
        p.git('push', '--quiet', 'origin', 'master', 'topic', 'v1', cwd=work)
        self.backup(1)
        mirror = p.mirror(PROJECT)
        self.assertTrue(mirror.endswith('/data/c1/git/proj/a.git'))
        client_refs = p.refs(bare)
        self.assertEqual(set(client_refs), {'refs/heads/master',
                                            'refs/heads/topic',
                                            'refs/tags/v1'})
        self.assertEqual(p.refs(mirror), client_refs)
        self.assertEqual(client_refs['refs/heads/master'], second)
        self.assertEqual(p.git('--git-dir', mirror, 'symbolic-ref', 'HEAD')
                         .stdout.strip(), 'refs/heads/master')
        self.assert_fsck_clean(mirror)
        [result] = p.results()
        self.assertEqual(result['stored'], mirror)
        self.assertEqual(result['refs'], 3)
        self.assertEqual(result['preserved'], [])

        # The client rewinds master and deletes topic: two pushes, two
        # requests.
        p.git('reset', '--quiet', '--hard', first, cwd=work)
        p.git('push', '--quiet', '--force', 'origin', 'master', cwd=work)
        p.git('push', '--quiet', 'origin', ':topic', cwd=work)
        self.backup(2)
        refs = p.refs(mirror)
        self.assertEqual(refs['refs/heads/master'], first)
        self.assertNotIn('refs/heads/topic', refs)
        preserved = {ref.split('/', 3)[3]: sha for ref, sha in refs.items()
                     if ref.startswith('refs/preserved/')}
        self.assertEqual(preserved, {'refs/heads/master': second,
                                     'refs/heads/topic': topic})
        for commit in (second, topic):
            p.git('--git-dir', mirror, 'cat-file', '-e', commit + '^{commit}')
        self.assert_fsck_clean(mirror)
        results = p.results()
        self.assertEqual(sorted(name.split('/', 3)[3] for r in results
                                for name in r['preserved']),
                         ['refs/heads/master', 'refs/heads/topic'])
        # Mirrored refs are again exactly the client's.
        self.assertEqual({r: s for r, s in refs.items()
                          if not r.startswith('refs/preserved/')},
                         p.refs(bare))

        # A fast-forward preserves nothing new.
        third = p.commit_file(work, 'README', 'three\n')
        p.git('push', '--quiet', 'origin', 'master', cwd=work)
        self.backup(1)
        refs = p.refs(mirror)
        self.assertEqual(refs['refs/heads/master'], third)
        self.assertEqual(len([r for r in refs
                              if r.startswith('refs/preserved/')]), 2)
        self.assertEqual(p.results()[-1]['preserved'], [])

        # A tag moved to another commit keeps its old object, too.
        old_tag = refs['refs/tags/v1']
        p.git('tag', '-f', '-a', '-m', 'release one, again', 'v1', third,
              cwd=work)
        p.git('push', '--quiet', '--force', 'origin', 'v1', cwd=work)
        self.backup(1)  # the hook recorded the request
        refs = p.refs(mirror)
        self.assertNotEqual(refs['refs/tags/v1'], old_tag)
        self.assertIn(old_tag, [sha for ref, sha in refs.items()
                                if ref.startswith('refs/preserved/')
                                and ref.endswith('/refs/tags/v1')])

    def test_fetch_hardening_options(self):
        """Belt and braces beside GIT_ALLOW_PROTOCOL: the -c options
        forbid every protocol but the allowed ones, and fsck transfers."""
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            'gitmodule', os.path.join(support.ROOT, 'modules', 'git.py'))
        git_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(git_module)
        options = ' '.join(git_module.hardening(['git', 'https']))
        self.assertIn('protocol.allow=never', options)
        self.assertIn('protocol.git.allow=always', options)
        self.assertIn('protocol.https.allow=always', options)
        self.assertNotIn('protocol.file.allow=always', options)
        self.assertNotIn('protocol.ext.allow=always', options)
        self.assertIn('transfer.fsckObjects=true', options)

    def test_run_killed_after_fetch_loses_no_history(self):
        """A run that died between the fetch and the preserved refs left
        the refs snapshot in the mirror: the next run preserves from it.
        And a client cannot plant refs below refs/preserved/."""
        p = self.p
        p.start_daemon()
        bare = p.client_repository('a.git', hook=False)
        work = p.work_clone(bare)
        first = p.commit_file(work, 'f', '1\n')
        second = p.commit_file(work, 'f', '2\n')
        p.git('push', '--quiet', 'origin', 'master', cwd=work)
        p.git('push', '--quiet', 'origin',
              f'{first}:refs/preserved/20000101T000000Z/refs/heads/master',
              cwd=work)
        p.client('commit', 'git', bare)
        p.client('send')
        p.server('run')
        mirror = p.mirror('a.git')
        self.assertEqual(p.refs(mirror), {'refs/heads/master': second})
        # What the killed run did: record the refs, fetch the rewind.
        with open(os.path.join(mirror, 'gitbackup-refs-before-fetch'),
                  'w') as f:
            f.write(f'{second} refs/heads/master\n')
        p.git('push', '--quiet', '--force', 'origin', f'{first}:master',
              cwd=work)
        p.git('--git-dir', mirror, 'fetch', '--quiet', '--', bare,
              '+refs/heads/*:refs/heads/*')
        self.assertEqual(p.refs(mirror), {'refs/heads/master': first})
        p.client('commit', 'git', bare)
        p.client('send')
        p.server('run')
        refs = p.refs(mirror)
        self.assertEqual(refs.pop('refs/heads/master'), first)
        [(name, sha)] = refs.items()
        self.assertRegex(name, r'^refs/preserved/[0-9]{8}T[0-9]{6}Z/'
                               r'refs/heads/master$')
        self.assertEqual(sha, second)
        self.assertFalse(os.path.exists(
            os.path.join(mirror, 'gitbackup-refs-before-fetch')))

    def test_repository_outside_git_base_refused_at_commit(self):
        p = self.p
        outside = os.path.join(p.root, 'elsewhere.git')
        p.git('init', '--quiet', '--bare', outside)
        os.symlink(outside, os.path.join(p.git_base, 'link.git'))
        os.makedirs(os.path.join(p.git_base, 'plain'))
        p.client_repository('bad name.git', hook=False)
        cases = [(outside, 'not below git_base'),
                 (os.path.join(p.git_base, 'link.git'), 'not below git_base'),
                 (os.path.join(p.git_base, '..', 'elsewhere.git'),
                  'not below git_base'),
                 (p.git_base, 'not below git_base'),
                 (os.path.join(p.git_base, 'plain'), 'not a git repository'),
                 (os.path.join(p.git_base, 'missing.git'),
                  'not a git repository'),
                 (os.path.join(p.git_base, 'bad name.git'), 'not plain')]
        for path, message in cases:
            proc = p.client('commit', 'git', path, check=False)
            self.assertEqual(proc.returncode, 2, (path, proc.stderr))
            self.assertIn(message, proc.stderr)
        self.assertEqual(p.states(), {})

    def test_bad_request_at_send_does_not_stop_the_others(self):
        """A request for a repository outside git_base that reached the pool
        anyway (written by hand, or git_base changed since): that request
        fails with a clear error and exit 1; the others of the same send
        are pushed and backed up."""
        p = self.p
        p.start_daemon()
        bare = p.client_repository('good.git', hook=False)
        work = p.work_clone(bare)
        head = p.commit_file(work, 'f', 'x\n')
        p.git('push', '--quiet', 'origin', 'master', cwd=work)
        p.client('commit', 'git', bare)
        outside = os.path.join(p.root, 'outside.git')
        p.git('init', '--quiet', '--bare', outside)
        p.write_client_request('git', outside,
                               '20200101T000000.000000Z-1-0001')
        p.client('commit', 'dummy', 'marker')
        proc = p.client('send', check=False)
        self.assertEqual(proc.returncode, 1, proc.stderr)
        self.assertIn('not below git_base', proc.stderr)
        self.assertIn('20200101T000000.000000Z-1-0001', proc.stderr)
        self.assertEqual(p.states(), {'C': 1, 'F': 2})
        p.server('run')
        self.assertEqual(p.states('node'), {'F': 2})
        self.assertEqual(p.refs(p.mirror('good.git')),
                         {'refs/heads/master': head})

    def test_hostile_requests_are_refused(self):
        p = self.p
        p.start_daemon()
        bare = p.client_repository('a.git', hook=False)
        work = p.work_clone(bare)
        head = p.commit_file(work, 'f', 'x\n')
        p.git('push', '--quiet', 'origin', 'master', cwd=work)
        u = p.git_url
        hostile = [
            '-uhello',
            '--upload-pack=touch%20/tmp/pwned',
            'ext::sh%20-c%20touch%20/tmp/pwned',
            'file:///etc/a.git',
            f'{u}/../a.git',
            f'{u}/sub/../../a.git',
            f'{u}/./a.git',
            f'{u}/-oProxyCommand=x.git',
            f'{u}/.hidden.git',
            f'{u}/',
            f'{u}',
            f'{u}//a.git',
            f'{u}/a.git/../b.git',
            f'{u}/a.git/sub.git',
            f'{u}/a%2e%2e.git',
            os.path.join(p.git_base, 'a.git'),
            '127.0.0.1:a.git',
            'ssh://-oProxyCommand=touch/a.git',
            f'{u}/a.git extra',
            '',
        ]
        pool = os.path.join(p.node_dir, 'TODO', CLIENT)
        for i, url in enumerate(hostile):
            with open(os.path.join(pool, f'RQ{i:040x}-RQ{i}-git'), 'w') as f:
                f.write(f'git {url}\n')
        # Only the path counts: a request naming another host is fetched
        # from the node's own [client c1] git base.
        with open(os.path.join(pool, f'RQ{"f" * 40}-RQok-git'), 'w') as f:
            f.write('git git://203.0.113.7/a.git\n')
        proc = p.server('run', check=False)
        self.assertEqual(proc.returncode, 1)
        states = p.states('node')
        self.assertEqual(states, {'X': len(hostile), 'reason': len(hostile),
                                  'F': 1}, proc.stderr)
        for name in os.listdir(pool):
            if name.endswith('.reason'):
                with open(os.path.join(pool, name)) as f:
                    self.assertIn('refused', f.read())
        self.assertFalse(os.path.exists('/tmp/pwned'))
        self.assertEqual(p.refs(p.mirror('a.git')),
                         {'refs/heads/master': head})
        # Nothing but the one mirror was created.
        found = []
        for root, dirs, _ in os.walk(os.path.join(p.node_dir, 'data')):
            found += [os.path.join(root, d) for d in dirs
                      if d.endswith('.git')]
            dirs[:] = [d for d in dirs if not d.endswith('.git')]
        self.assertEqual(found, [p.mirror('a.git')])

    def test_protocol_not_allowed_by_the_node(self):
        """[client c1] git uses git://, but the node allows only ssh and
        https: the request is not fetched and fails with a clear reason
        (retried: it is the node's configuration that is wrong)."""
        p = self.p
        p.edit_config('[server]\n', '[server]\ngit_protocols = ssh https '
                      'file ext\n')
        p.client_repository('a.git', hook=False)
        p.client('commit', 'git', os.path.join(p.git_base, 'a.git'))
        p.client('send')
        proc = p.server('run', check=False)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("protocol 'git' is not in [server] git_protocols",
                      proc.stderr)
        self.assertIn('ignoring file ext', proc.stderr)
        self.assertEqual(p.states('node'), {'RQ': 1})
        self.assertFalse(os.path.exists(p.mirror('a.git')))

    def test_git_daemon_down_waits_without_using_attempts(self):
        """A client whose git daemon is down is unreachable, not a bad
        request: with max_attempts = 1 the request still waits, and is
        mirrored once the daemon is back."""
        p = self.p
        p.edit_config('[server]\n', '[server]\nmax_attempts = 1\n')
        bare = p.client_repository('a.git', hook=False)
        work = p.work_clone(bare)
        head = p.commit_file(work, 'f', 'one\n')
        p.git('push', '--quiet', 'origin', 'HEAD:master', cwd=work)
        p.client('commit', 'git', bare)
        p.client('send')
        for _ in range(2):  # the daemon was never started
            proc = p.server('-q', 'run', check=False)
            self.assertEqual(proc.returncode, 1)
            self.assertEqual(proc.stderr, '')
        self.assertEqual(p.states('node'), {'RQ': 1})
        p.start_daemon()
        p.server('run')
        self.assertEqual(p.states('node'), {'F': 1})
        self.assertEqual(p.refs(p.mirror('a.git'), 'refs/heads/'),
                         {'refs/heads/master': head})


if __name__ == '__main__':
    unittest.main()
