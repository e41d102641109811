"""The two errors a user of promot can cause, each carrying a message that names the file, line,
key or flag and what was expected. Every command catches these two, in one place, and prints
the message as one line; anything else is a bug and keeps its traceback.

A leaf of promot (standard library only), and the one module the other leaves may import.
"""


class BadInput(ValueError):
    """Something the user chose is wrong: a flag, a path, a value in a config or task file."""


class DamagedFile(ValueError):
    """A file exists but cannot be read as its format says: truncated, corrupt, checksum mismatch."""
