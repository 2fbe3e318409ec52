"""What a file uses of the standard library that the running Python lacks.

    python3.6 tests/stdlib_names.py FILE...

Run under the oldest Python a script supports (tests/test_compat.py does),
it reads each FILE (never imports it) and prints one line per use that
this interpreter would fail on at run time, where the names say it
without running the code:

- ``module.name`` chains (``shlex.join``, ``datetime.datetime.fromisoformat``)
  and ``from module import name`` that the interpreter's module lacks;
- keyword arguments a standard-library callable does not take
  (``subprocess.run(capture_output=...)``, ``text=`` before 3.7: run()
  and its siblings pass their keywords on to Popen, so Popen decides);
- method names that exist only on newer built-in types
  (``str.removeprefix``), wherever they appear.

Calls on objects whose type the text does not show are left to the end-to-end
tests.  Exit status 0 when nothing was found, 1 otherwise.  Itself
written for Python 3.6.
"""

import ast
import builtins
import importlib
import inspect
import subprocess
import sys

OURS = ('modules', 'sendmail', 'client', 'server', 'tests')
# Methods of built-in types added after 3.6 (the known breakers).
NEWER_METHODS = {
    'removeprefix': '3.9', 'removesuffix': '3.9', 'isascii': '3.7',
    'fromisoformat': '3.7', 'fromisocalendar': '3.8', 'reconfigure': '3.7',
    'is_relative_to': '3.9', 'cached_property': '3.8',
}
# Callables that pass **kwargs on to subprocess.Popen.
POPEN_WRAPPERS = ('run', 'call', 'check_call', 'check_output')


def imported_names(tree):
    """{local name: dotted standard-library name} of the file's imports."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] not in OURS:
                    local = alias.asname or alias.name.split('.')[0]
                    names[local] = alias.asname and alias.name or local
        elif isinstance(node, ast.ImportFrom) and node.module \
                and node.level == 0 and node.module.split('.')[0] not in OURS:
            for alias in node.names:
                names[alias.asname or alias.name] = \
                    node.module + '.' + alias.name
    return names


def resolve(dotted):
    """The object a dotted name means here; AttributeError names the part
    this Python lacks."""
    parts = dotted.split('.')
    obj, done = importlib.import_module(parts[0]), parts[0]
    for part in parts[1:]:
        done += '.' + part
        try:
            obj = getattr(obj, part)
        except AttributeError:
            try:
                obj = importlib.import_module(done)
            except ImportError:
                raise AttributeError(done) from None
    return obj


def dotted_name(node, names):
    """'shlex.join' for the expression shlex.join, or None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    return '.'.join([names[node.id]] + parts[::-1])


def accepted_keywords(obj, name):
    """The keyword names obj takes, or None when it takes any."""
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_KEYWORD for p in parameters):
        if name.startswith('subprocess.') and \
                name.rpartition('.')[2] in POPEN_WRAPPERS:
            return ({p.name for p in parameters} |
                    set(inspect.signature(subprocess.Popen).parameters))
        return None
    return {p.name for p in parameters}


def version_of(text):
    return tuple(int(part) for part in text.split('.'))


def guarded_names(tree, names):
    """The names the file asks for with hasattr(module, 'name') first:
    it does without them where they are missing."""
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == 'hasattr' and len(node.args) == 2 \
                and isinstance(node.args[1], ast.Str):
            owner = dotted_name(node.args[0], names)
            if owner:
                guarded.add(owner + '.' + node.args[1].s)
    return guarded


def problems_in(path):
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    names = imported_names(tree)
    version = '%d.%d' % sys.version_info[:2]
    found = []
    for node in ast.walk(tree):
        where = '%s:%d' % (path, getattr(node, 'lineno', 0))
        if isinstance(node, ast.Attribute) and node.attr in NEWER_METHODS \
                and sys.version_info < version_of(NEWER_METHODS[node.attr]):
            found.append('%s: .%s() is Python %s+' % (
                where, node.attr, NEWER_METHODS[node.attr]))
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id not in names \
                    and hasattr(builtins, node.func.id):
                name = 'builtins.' + node.func.id
            else:
                name = dotted_name(node.func, names)
            keywords = [k.arg for k in node.keywords if k.arg]
            if not name or not keywords:
                continue
            try:
                accepted = accepted_keywords(resolve(name), name)
            except (AttributeError, ImportError):
                continue   # reported as a name below
            for keyword in keywords:
                if accepted is not None and keyword not in accepted:
                    found.append('%s: %s() takes no %s= in Python %s' % (
                        where, name, keyword, version))
    first_use = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Attribute, ast.Name)):
            name = dotted_name(node, names)
            if name:
                first_use[name] = min(node.lineno,
                                      first_use.get(name, node.lineno))
    guarded = guarded_names(tree, names)
    for name, line in sorted(first_use.items()):
        if name in guarded:
            continue
        try:
            resolve(name)
        except (AttributeError, ImportError) as e:
            found.append('%s:%d: %s is not in Python %s (%s)' % (
                path, line, name, version, e))
    return found


def main(paths):
    found = [line for path in paths for line in problems_in(path)]
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
