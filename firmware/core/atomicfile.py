"""Atomic small-file persistence (C5).

A write goes to ``<path>.tmp``, the file is closed, then renamed onto ``<path>``.
Renaming onto the target is atomic on littlefs and POSIX; removing the target
first is not, so we never do. A power cut at any step leaves either the old or
the new content at ``<path>``.

The filesystem is a parameter so that tests can cut the power at each step.
"""
import os


class OsFs:
    """The real filesystem: ``open``, ``rename``, ``remove`` of the ``os`` module."""

    def open(self, path, mode):
        return open(path, mode)

    def rename(self, src, dst):
        os.rename(src, dst)

    def remove(self, path):
        os.remove(path)

    def mkdir(self, path):
        os.mkdir(path)

    def rmdir(self, path):
        os.rmdir(path)

    def listdir(self, path):
        return os.listdir(path)

    def isdir(self, path):
        try:
            return os.stat(path)[0] & 0x4000 != 0
        except OSError:
            return False

    def sync(self):
        # os.sync exists on some MicroPython ports and on CPython/Linux.
        fn = getattr(os, "sync", None)
        if fn:
            fn()


FS = OsFs()


def write_atomic(path, text, fs=FS):
    """Replace the content of ``path`` with ``text`` (str) atomically.

    Raises OSError when the filesystem refuses; ``path`` is then unchanged.
    """
    tmp = path + ".tmp"
    f = fs.open(tmp, "w")
    try:
        f.write(text)
    finally:
        f.close()
    fs.sync()
    fs.rename(tmp, path)


def read_text(path, fs=FS, limit=None):
    """Return the text of ``path`` (at most ``limit`` characters when given),
    or None when it is missing or unreadable."""
    try:
        f = fs.open(path, "r")
    except OSError:
        return None
    try:
        return f.read() if limit is None else f.read(limit)
    except (OSError, UnicodeError, MemoryError):
        return None
    finally:
        f.close()
