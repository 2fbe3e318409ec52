"""gitbackup's modules directory.

Backup modules (fs, git, postgresdb, sftp, dummy, or an executable of any
language) are loaded by name from here by client.py and server.py; this
file only makes the directory a package, so that ``modules._core`` (the
plumbing both scripts share) is found here and nowhere else on sys.path.
Names starting with '_' can never be loaded as backup modules.
"""
