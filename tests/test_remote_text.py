"""Text from another host is data: a compromised client's ssh (or a
compromised node's) writes escape sequences to stderr; they reach neither
the terminal, nor the log files, nor the mail raw (one cleaner,
modules/_core.py clean_text, on every log line and mail)."""

import glob
import os
import unittest

from tests.pipeline import Pipeline

HOSTILE = r"EVIL\t\033]0;owned\007\033[2J\033[31mred\r\n"
RAW = ('\x1b', '\x07', '\r')


class RemoteTextTest(unittest.TestCase):
    def setUp(self):
        self.p = Pipeline(self)
        # Named ssh: git passes it OpenSSH's options (-p PORT).
        os.mkdir(os.path.join(self.p.root, 'evil'))
        self.evil_ssh = os.path.join(self.p.root, 'evil', 'ssh')
        with open(self.evil_ssh, 'w') as f:
            f.write(f"#!/bin/sh\nprintf '{HOSTILE}' >&2\nexit 255\n")
        os.chmod(self.evil_ssh, 0o755)

    def texts(self, side, proc):
        """stderr, stdout, every log file and every mail of a side."""
        texts = [proc.stderr, proc.stdout]
        for path in glob.glob(os.path.join(self.p.root, side, 'log', '*.log')):
            with open(path, encoding='utf-8', errors='surrogateescape') as f:
                texts.append(f.read())
        texts += [m.get_content() + str(m['Subject']) for m in self.p.mails()]
        return texts

    def assert_clean(self, texts):
        joined = '\n'.join(texts)
        self.assertIn('EVIL', joined)     # the text did arrive ...
        for char in RAW:                  # ... cleaned
            self.assertNotIn(char, joined)
        self.assertIn('EVIL ?]0;owned??[2J?[31mred', joined)

    def test_hostile_client_ssh_stderr_is_cleaned_on_the_node(self):
        p = self.p
        tree = os.path.join(p.root, 'tree')
        os.mkdir(tree)
        with open(os.path.join(tree, 'f'), 'w') as f:
            f.write('data\n')
        p.client('commit', 'app', tree)
        p.client('send')
        with open(p.config) as f:
            text = f.read()
        start = text.index('[server]')
        head, tail = text[:start], text[start:]
        tail = tail.replace('ssh_command = ', f'ssh_command = {self.evil_ssh}'
                            ' #', 1).replace('free_space_floor = 0\n',
                                             'free_space_floor = 0\n'
                                             'alert_after = 0s\n', 1)
        with open(p.config, 'w') as f:
            f.write(head + tail)
        proc = p.server('run', check=False)
        self.assert_clean(self.texts('node', proc))

    def test_hostile_node_ssh_stderr_is_cleaned_on_the_client(self):
        p = self.p
        with open(p.config) as f:
            text = f.read()
        text = text.replace('ssh_command = ', f'ssh_command = {self.evil_ssh}'
                            ' #', 1).replace(
            'admin = client-admin@example.invalid\n',
            'admin = client-admin@example.invalid\nalert_after = 0s\n', 1)
        with open(p.config, 'w') as f:
            f.write(text)
        p.client('commit', 'dummy', 'x')
        proc = p.client('send', check=False)
        self.assert_clean(self.texts('client', proc))


if __name__ == '__main__':
    unittest.main()
