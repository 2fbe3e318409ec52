"""State that must survive what happens to disks and machines: a lost
ingest marker, a power loss (git's fsync), a corrupt client queue, a node
restored from an older copy (issue 11, items 7, 9, 11 and the results
offset), with the real programs."""

import json
import os
import time
import unittest

from tests.pipeline import CLIENT, Pipeline
from tests.test_reliability import write_tree


def journal_lines(pipeline):
    path = os.path.join(pipeline.node_dir, 'data', CLIENT, 'results.jsonl')
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def age_node_pool(pipeline, days):
    pool = os.path.join(pipeline.node_dir, 'TODO', CLIENT)
    then = time.time() - days * 86400
    for name in os.listdir(pool):
        if name[0] in 'FX':
            os.utime(os.path.join(pool, name), (then, then))


class LostIngestMarkerTest(unittest.TestCase):
    """Item 9: ingest's "already seen" survives prune and a lost marker."""

    def test_lost_marker_after_prune_ingests_nothing_again(self):
        p = Pipeline(self)
        src = os.path.join(p.root, 'src')
        write_tree(src, 1 << 16)
        p.client('commit', 'app', src)
        p.client('commit', 'dummy', src)
        p.client('send')
        p.server('run')
        p.client('send')                # the results: exports removed
        self.assertEqual(os.listdir(os.path.join(p.client_dir, 'export')),
                         [])
        self.assertEqual(p.states('node'), {'F': 2})
        age_node_pool(p, 100)           # older than keep_requests (90d)
        p.server('prune')
        self.assertEqual(p.states('node'), {})
        marker = os.path.join(p.node_dir, 'TODO', CLIENT, '.ingested')
        os.unlink(marker)
        before = journal_lines(p)
        p.server('run')
        # Nothing ran again: no new outcome, one stored backup, no mail
        # about a backup that was stored.
        self.assertEqual(p.states('node'), {})
        self.assertEqual(journal_lines(p), before, p.node_log())
        self.assertEqual(len(p.stored('app')), 1)
        self.assertEqual(p.mails(), [])
        # The push hook's ingest without a marker: only the new request.
        os.unlink(marker)
        p.client('commit', 'dummy', src)
        p.client('send')
        self.assertEqual(p.states('node'), {'RQ': 1}, p.node_log())
        p.server('run')
        self.assertEqual(len(journal_lines(p)), len(before) + 1)
        self.assertEqual(p.mails(), [])


if __name__ == '__main__':
    unittest.main()
