"""Issue 11's operator traps, with the real programs: ssh refusing a login,
`check --connect`, a command run as the wrong user, gc next to gitosis,
unwritable client repositories, and a client git hook that never ran.
"""

import json
import os
import re
import unittest

from tests import support
from tests.pipeline import CLIENT, Pipeline
from tests.test_reliability import write_tree


def subjects(pipeline):
    return [m['Subject'] for m in pipeline.mails()]


def remove_key(sshd, key_path):
    """Take one key out of the test sshd's authorized_keys; returns a
    function that puts it back."""
    with open(key_path + '.pub') as f:
        blob = f.read().split()[1]
    with open(sshd.authorized_keys) as f:
        lines = f.readlines()
    with open(sshd.authorized_keys, 'w') as f:
        f.writelines(line for line in lines if blob not in line)

    def restore():
        with open(sshd.authorized_keys, 'w') as f:
            f.writelines(lines)
    return restore


class AccessDeniedTest(unittest.TestCase):
    """Item 16: ssh refusing the node's login is a misconfiguration:
    alerted at once, the request waits without costing an attempt, and
    every report format shows it."""

    def test_node_key_not_authorized_alerts_at_once_and_shows_in_report(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        write_tree(src, 1 << 14)
        p.client('commit', 'app', src)
        p.client('send', '-q')
        restore = remove_key(p.sshd, p.node_key)
        p.server('run', '-q', check=False)
        p.server('run', '-q', check=False)
        # One mail at once (not after alert_after), not one per run.
        self.assertEqual(len(p.mails()), 1, subjects(p))
        mail = p.mails()[0]
        self.assertIn('failing', mail['Subject'])
        self.assertIn('Permission denied', mail.get_content())
        self.assertIn('authorized_keys', mail.get_content())
        self.assertEqual(p.states('node'), {'RQ': 1})
        attempts = os.path.join(p.node_dir, 'TODO', CLIENT, '.attempts')
        self.assertEqual(os.listdir(attempts) if os.path.isdir(attempts)
                         else [], [])
        text = p.server('report', check=False)
        self.assertEqual(text.returncode, 2, text.stdout)
        self.assertRegex(text.stdout, r'c1: critical: misconfigured.*'
                         r'Permission denied')
        report = json.loads(p.server('report', '--format', 'json',
                                     check=False).stdout)
        [client] = report['clients']
        self.assertTrue(client['misconfigured'])
        self.assertEqual(client['status'], 'critical')
        prom = p.server('report', '--format', 'prometheus',
                        check=False).stdout
        self.assertIn('gitbackup_client_misconfigured{client="c1"} 1', prom)
        self.assertIn('gitbackup_client_status{client="c1"} 2', prom)
        nagios = p.server('report', '--format', 'nagios', check=False)
        self.assertTrue(nagios.stdout.startswith('GITBACKUP CRITICAL'),
                        nagios.stdout)
        html = p.server('report', '--format', 'html', check=False).stdout
        self.assertIn('Permission denied', html)
        self.assertIn('class="banner critical"', html)
        # The key back: stored, one recovery mail, the report clean.
        restore()
        p.server('run', '-q')
        self.assertEqual(len(p.stored('app')), 1, p.node_log())
        self.assertEqual(len(p.mails()), 2, subjects(p))
        self.assertIn('recovered', p.mails()[-1]['Subject'])
        self.assertIn('gitbackup_client_misconfigured{client="c1"} 0',
                      p.server('report', '--format', 'prometheus').stdout)

    def test_client_push_refused_alerts_at_once(self):
        p = Pipeline(self)
        p.client('commit', 'dummy', p.root)
        restore = remove_key(p.sshd, p.client_key)
        p.client('send', '-q', check=False)
        p.client('send', '-q', check=False)
        self.assertEqual(len(p.mails()), 1, subjects(p))
        self.assertIn('pushing to node n1 failing', p.mails()[0]['Subject'])
        self.assertIn('authorized_keys', p.mails()[0].get_content())
        restore()
        p.client('send', '-q')
        self.assertEqual(p.states(), {'F': 1})
        self.assertIn('recovered', p.mails()[-1]['Subject'])


if __name__ == '__main__':
    unittest.main()
