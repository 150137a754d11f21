"""The vector store's lock: a ``flock`` on ``<store>.lock``, beside a local store's
directory (beside, not in it: LanceDB owns the directory, and a backup copies it whole).

Every write of ``VectorStore`` holds it shared; ``frozen`` (a backup copying the store)
and ``VectorStore.optimize`` while it rewrites a table or removes files hold it
exclusive. A remote store (``s3://``...) has no lock: nothing here can hold it still.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from parley.paths import make_directory


def local_path(uri: str) -> Path | None:
    """The directory of a store on this machine's disk (a path, or a ``file://`` URI);
    None for a remote one (``s3://``...)."""
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    return None if "://" in uri else Path(uri)


@contextlib.contextmanager
def frozen(uri: str) -> Iterator[Path | None]:
    """No vector written, in any process, while the block runs: the store's files are one
    version (a backup copies them so). Waits for the writes under way. Yields the local
    directory (None for a remote store, which nothing here can hold still)."""
    with store_lock(uri, exclusive=True):
        yield local_path(uri)


@contextlib.contextmanager
def store_lock(uri: str, *, exclusive: bool) -> Iterator[None]:
    """The lock of the store at ``uri``, shared or ``exclusive``; nothing for a remote
    store."""
    store = local_path(uri)
    if store is None:
        yield
        return
    kind = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    lock = store.with_name(store.name + ".lock")
    make_directory(lock.parent, 0o777)  # the umask's mode, as before
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, kind)
        yield
    finally:
        os.close(fd)  # releases the lock
