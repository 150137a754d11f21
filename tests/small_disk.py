"""A real small file system for disk-full tests: a tmpfs mounted for the test.

``small_filesystem(path, size)`` mounts a tmpfs of ``size`` at ``path`` (root only; the
test is skipped, saying why, where mounting is not allowed) and always unmounts it.
``fill(directory)`` writes a filler file until the file system refuses, and deleting the
returned file frees the space again. ``postgres_in_small_tablespace`` creates a
PostgreSQL database whose tables live on such a file system (a tablespace), so that
PostgreSQL's own "could not extend file" (SQLSTATE 53100) is what the test meets.

Why not a file-size limit (RLIMIT_FSIZE) as a fallback: SQLite reports a write refused
with EFBIG as an I/O error, not as SQLITE_FULL, so it would not exercise the disk-full
path at all.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def small_filesystem(path: Path, size: str, options: str = "") -> Iterator[Path]:
    """A tmpfs of ``size`` (e.g. ``"16m"``) mounted at ``path`` for the block."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (f",{options}" if options else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a small tmpfs for the disk-full test ({mounted.stderr.strip()}); "
            "it needs root (or CAP_SYS_ADMIN)"
        )
    try:
        yield path
    finally:
        result = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if result.returncode != 0:
            # Still in use by a process that is going away: detach it now.
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write ``directory/filler`` until the file system is full; return its path."""
    filler = directory / "filler"
    block = b"\0" * 65536
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        # Down to the last bytes: a short write takes what a whole block could not.
        for size in (4096, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, block[:size]):
                    pass
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def postgres_in_small_tablespace(size: str) -> Iterator[tuple[str, Path]]:
    """(URL, directory) of a new PostgreSQL database whose tables live on a small tmpfs.

    The mount is under the system temporary directory rather than the test's: the
    PostgreSQL server runs as its own user and must reach the directory, and the test's
    ``tmp_path`` sits under a directory only root may enter.
    """
    if os.environ.get("PARLEY_TEST_SKIP_PG") == "1":
        pytest.skip("PARLEY_TEST_SKIP_PG=1")
    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("no local postgres user to own a tablespace directory")
    directory = Path(tempfile.mkdtemp(prefix="parley-pgspace-"))
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    name = f"parley_full_{uuid.uuid4().hex[:10]}"
    try:
        with small_filesystem(directory, size, f"uid={owner.pw_uid},gid={owner.pw_gid},mode=0700"):
            space = directory / "space"
            space.mkdir()
            os.chown(space, owner.pw_uid, owner.pw_gid)
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE TABLESPACE {name} LOCATION '{space}'")
                try:
                    conn.exec_driver_sql(f'CREATE DATABASE "{name}" TABLESPACE {name}')
                    try:
                        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", directory
                    finally:
                        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                finally:
                    conn.exec_driver_sql(f"DROP TABLESPACE IF EXISTS {name}")
    finally:
        admin.dispose()
        shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def small_database(kind: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(database URL, directory to ``fill``) of an empty ``kind`` database ("sqlite" or
    "postgresql") on a small file system."""
    if kind == "sqlite":
        with small_filesystem(tmp_path / "small", "16m") as small:
            yield f"sqlite:///{small / 'data' / 'parley.db'}", small
        return
    with postgres_in_small_tablespace("24m") as store:
        yield store
