"""What the file system refuses, in words that name the path and the reason.

The system's own words can mislead: ``mkdir`` of a path that is a file says "File exists",
and every path under a file fails with "Not a directory" without naming the file in the
way. ``make_directory`` raises ``NotADirectoryError`` naming that file, and ``reason``
words any ``OSError`` so: the system's reason ("Permission denied", "No space left on
device"...), or which file stands where a directory must be. Nothing here writes but
``make_directory``.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def file_in_the_way(path: Path) -> Path | None:
    """``path`` or the nearest of its parents that exists and is not a directory."""
    return next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)


def not_a_directory(path: Path) -> str | None:
    """Why ``path`` cannot be a directory, when a file is in the way (None: it can)."""
    culprit = file_in_the_way(path)
    if culprit is None:
        return None
    return (
        "it is a file, not a directory"
        if culprit == path
        else f"{culprit} is a file, not a directory"
    )


def reason(exc: OSError, path: Path | None = None) -> str:
    """Why the system refused ``path`` (default: the error's own file name)."""
    if path is None and exc.filename is not None:
        path = Path(os.fsdecode(exc.filename))
    if path is not None and exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return not_a_directory(path) or exc.strerror or str(exc)
    return exc.strerror or str(exc)


def make_directory(directory: Path, mode: int = 0o700) -> None:
    """``directory`` and its missing parents (``mode``); a directory already there is
    left as it is. A file where a directory must be is ``NotADirectoryError``, naming it."""
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise NotADirectoryError(
            errno.ENOTDIR, reason(exc, directory), os.fspath(directory)
        ) from None


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file (None: it can)."""
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # a FIFO: no wait for a writer
    except OSError as exc:
        return reason(exc, path)
    return None if path.is_file() else "not a regular file"
