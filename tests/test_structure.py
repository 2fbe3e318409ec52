"""server.py reads as its story: chapters in the order its docstring
tells, no name used before the chapter that defines it (only the command
line calls into every chapter), and no function or class grown past what
one reader holds in mind.  Pure reading of the source: no program runs."""

import ast
import os
import re
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI_CHAPTER = 10
SOURCES = ['client.py', 'server.py', 'sendmail.py'] + [
    os.path.join('modules', f) for f in sorted(os.listdir(
        os.path.join(ROOT, 'modules'))) if f.endswith('.py')]
# Functions of about 60 lines, classes of about 400 at the most.
MAX_FUNCTION, MAX_CLASS = 62, 400


def read(path):
    with open(os.path.join(ROOT, path), encoding='utf-8') as f:
        return f.read()


def chapters(lines):
    """[(first line, number)] of the '# N. Title' banners under a '# ===' rule."""
    return [(i, int(m.group(1))) for i, line in enumerate(lines, 1)
            for m in [re.match(r'^# (\d+)\. ', line)]
            if m and lines[i - 2].startswith('# =====')]


def chapter_of(marks, line):
    number = -1
    for first, n in marks:
        if first <= line:
            number = n
    return number


def top_level_names(node):
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return [node.name]
    names = []
    if isinstance(node, ast.Assign):
        for target in node.targets:
            elts = target.elts if isinstance(target, ast.Tuple) else [target]
            names += [e.id for e in elts if isinstance(e, ast.Name)]
    return names


class StoryTest(unittest.TestCase):
    def setUp(self):
        self.text = read('server.py')
        self.lines = self.text.split('\n')
        self.tree = ast.parse(self.text)
        self.marks = chapters(self.lines)

    def test_chapters_come_in_order(self):
        self.assertEqual([n for _, n in self.marks], list(range(11)))
        docstring = ast.get_docstring(self.tree)
        for n in range(1, 11):
            self.assertRegex(docstring, rf'(?m)^ ?{n}\. ',
                             f'the docstring names chapter {n}')

    def test_no_name_is_used_before_its_chapter(self):
        defined = {}
        for node in self.tree.body:
            for name in top_level_names(node):
                defined[name] = chapter_of(self.marks, node.lineno)
        early = []
        for node in self.tree.body:
            here = chapter_of(self.marks, node.lineno)
            if here in (-1, CLI_CHAPTER):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.Name) and \
                        defined.get(sub.id, -1) > here:
                    early.append(f'line {sub.lineno}: {sub.id} (chapter '
                                 f'{defined[sub.id]}) used in chapter {here}')
        self.assertEqual(early, [])


class SizeTest(unittest.TestCase):
    def test_functions_and_classes_stay_readable(self):
        long = []
        for path in SOURCES:
            for node in ast.walk(ast.parse(read(path))):
                size = getattr(node, 'end_lineno', 0) - \
                    getattr(node, 'lineno', 0) + 1
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                        and size > MAX_FUNCTION or \
                        isinstance(node, ast.ClassDef) and size > MAX_CLASS:
                    long.append(f'{path}:{node.lineno} {node.name}: {size} '
                                'lines')
        self.assertEqual(long, [])


if __name__ == '__main__':
    unittest.main()
