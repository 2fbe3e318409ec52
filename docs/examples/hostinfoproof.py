"""hostinfoproof: node-side proofs for the hostinfo example's file (a
worked example of docs/modules.md, "Proving what a module stored").

The node stores `hostinfo.txt` as a plain file; without a module that
claims it, `verify` and `drill` can only re-hash it ("hashes only").  Copy
this file into the node's modules_dir: it claims files ending in
`hostinfo.txt`, reads one back for `verify`, and for `drill` proves that
what came back is a whole report of the host it names.
"""

import os

STORED_SUFFIXES = ('hostinfo.txt',)
COMPANION_SUFFIXES = ()


def verify_stored(path, timeout):
    """The report reads back as text with its header line.  Raises
    ValueError when it does not."""
    with open(path, encoding='utf-8', errors='strict') as f:
        header = f.readline()
        lines = 1 + sum(1 for _ in f)
    if not header.startswith('# hostinfo of '):
        raise ValueError(f'no hostinfo header: {header[:60]!r}')
    if lines < 2:
        raise ValueError('a header and nothing else')


def drill_stored(ctx, names, scratch):
    """Copy each report out of the snapshot as a restore would (into
    scratch), then check what came back: read back as verify does, naming
    the client it was stored for, and with the kernel line a rebuild
    needs.  Returns (problems, what was proven)."""
    problems = []
    for name in names:
        restored = os.path.join(scratch, name)
        with open(os.path.join(ctx.snapshot, name), 'rb') as src, \
                open(restored, 'wb') as out:
            out.write(src.read())
        try:
            verify_stored(restored, ctx.timeout)
        except (OSError, ValueError) as e:
            problems.append(f'{name}: {e}')
            continue
        with open(restored, encoding='utf-8') as f:
            header, kernel = f.readline(), f.readline()
        if not header.startswith(f'# hostinfo of {ctx.client} '):
            problems.append(f'{name}: the report of another host: '
                            f'{header.strip()[:80]!r}')
        if not kernel.split(' ', 1)[0] in ('Linux', 'FreeBSD', 'Darwin'):
            problems.append(f'{name}: no kernel line (uname -a)')
    return problems, f'{len(names)} host report(s) restored and read'
