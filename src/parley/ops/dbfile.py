"""Checks on the SQLite database file, made before anything opens it.

Opening a file with SQLite is not harmless: it creates a missing database, creates ``-wal``
and ``-shm`` files beside it, replays or discards a write-ahead log, and the first write
turns whatever it found into a parley database. So server start and ``parley db`` look at
the bytes first and refuse, with a ``ConfigError`` that names the file and the way out,
anything SQLite would silently "fix":

- a file that is not an SQLite database (text, an image, a zeroed header), or that is empty;
- a truncated file: shorter than the 100-byte header, not a whole number of pages, or
  shorter than the page count its header records;
- a damaged header (page size, payload fractions or format versions out of range);
- a database file that is missing while its ``-wal`` or ``-journal`` is still there;
- a hot write-ahead log gone missing: the previous server did not stop cleanly
  (``ops.presence``), the header says WAL mode, and the ``-wal`` file is not there. The
  committed transactions it held are lost to anyone who opens the file now, and the first
  open would make that permanent;
- another application's database: tables but no parley revision, or a revision that is
  not parley's (``revisions.refuse_foreign``). Opening it as parley does would switch it
  to WAL mode and take its group and other permissions away before the refusal, so its
  schema is read here with SQLite's ``immutable`` flag, which takes no lock and makes no
  file. Only when no ``-wal`` or ``-journal`` beside it holds anything: then the file
  alone may not hold the last commits, and the check after opening (``ops.migrate``)
  refuses it instead.

Invariants: nothing here writes, creates or locks a file; a missing database (a new
install) passes; PostgreSQL and in-memory databases pass untouched. The size checks are
skipped while a non-empty ``-wal`` or ``-journal`` is present, because SQLite's recovery
from it may legitimately complete a file that a crash left short.
"""

from __future__ import annotations

import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy
from sqlalchemy.exc import DatabaseError
from sqlalchemy.pool import NullPool

from parley.errors import ConfigError
from parley.ops.presence import marker_path
from parley.ops.revisions import current_on, refuse_foreign
from parley.paths import reason
from parley.settings import Settings
from parley.store.engine import sqlite_path, unusable_directory

MAGIC = b"SQLite format 3\x00"
HEADER_BYTES = 100
# File format bytes 18 (write version) and 19 (read version): 1 legacy, 2 WAL.
WAL_FORMAT = 2

RESTORE_HINT = "restore a backup with `parley restore ARCHIVE` (`parley backup list` lists them)"


@dataclass(frozen=True, slots=True)
class Header:
    """The fields of SQLite's 100-byte database header that the checks rely on."""

    page_size: int
    write_version: int
    read_version: int
    # The page count recorded in the header, or None when SQLite would not trust it
    # (written by a version that did not keep it, see "in-header database size").
    page_count: int | None

    @property
    def wal(self) -> bool:
        return self.write_version == WAL_FORMAT or self.read_version == WAL_FORMAT


def sidecar(database: Path, suffix: str) -> Path:
    """``<database>-wal``, ``<database>-shm`` or ``<database>-journal``."""
    return database.with_name(database.name + suffix)


def check_database_file(settings: Settings, *, previous_run_unclean: bool = False) -> None:
    """Refuse a SQLite database file that opening would damage further (see module doc)."""
    database = sqlite_path(settings)
    if database is not None:
        check_sqlite_file(database, previous_run_unclean=previous_run_unclean)


def check_sqlite_file(database: Path, *, previous_run_unclean: bool = False) -> None:
    """The checks of ``check_database_file`` on one file; raises ``ConfigError``."""
    wal = _size(sidecar(database, "-wal"))
    journal = _size(sidecar(database, "-journal"))
    try:
        info = database.stat()
    except FileNotFoundError:
        if wal or journal:
            found = sidecar(database, "-wal" if wal else "-journal")
            raise ConfigError(
                f"the database file {database} is missing but its log {found} is still "
                "there: the database was moved or deleted. Refusing to create a new one "
                f"beside that log; put the database file back, or {RESTORE_HINT}"
            ) from None
        return  # a new install: SQLite creates the file on first use
    except OSError as exc:
        raise ConfigError(f"cannot read the database file {database}: {reason(exc)}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"the database path {database} is not a regular file")
    head = _read_header(database)
    if not head:
        raise ConfigError(
            f"the database file {database} is empty (0 bytes): refusing to turn it into a "
            f"new database. If it held data, {RESTORE_HINT}; if it is a new install, "
            "delete the empty file"
        )
    if not any(head):
        raise ConfigError(
            f"the database file {database} is damaged: its header is all zero bytes. "
            f"Refusing to open or overwrite it; {RESTORE_HINT}"
        )
    if not head.startswith(MAGIC[: len(head)]):
        raise ConfigError(
            f"the database file {database} is not an SQLite database (it does not start "
            "with SQLite's header): refusing to open or overwrite it. Check DATABASE_URL "
            f"and PARLEY_DATA_DIR, or {RESTORE_HINT}"
        )
    if len(head) < HEADER_BYTES:
        raise ConfigError(
            f"the database file {database} is truncated: {len(head)} bytes, shorter than "
            f"SQLite's {HEADER_BYTES}-byte header. Refusing to open it; {RESTORE_HINT}"
        )
    header = parse_header(head)
    if header is None:
        raise ConfigError(
            f"the database file {database} has a damaged SQLite header: refusing to open "
            f"it; {RESTORE_HINT}"
        )
    if not (wal or journal):
        _check_size(database, info.st_size, header)
        refuse_foreign_file(database)
    # A crash leaves -wal and -shm behind. Whoever opens the database next and closes it
    # cleanly (sqlite3, a script) checkpoints the log into the file and removes both:
    # nothing is lost then. A -shm without its -wal is a log deleted by hand.
    if (
        previous_run_unclean
        and header.wal
        and not sidecar(database, "-wal").exists()
        and sidecar(database, "-shm").exists()
    ):
        raise ConfigError(
            f"the previous parley run did not stop cleanly and the database's write-ahead "
            f"log {sidecar(database, '-wal')} is missing: the transactions it held would be "
            f"lost for good once the database is opened. Put the -wal file back beside "
            f"{database.name}, or {RESTORE_HINT}. If you know the log held nothing, remove "
            f"{marker_path(database)} to start anyway"
        )


def refuse_foreign_file(database: Path) -> None:
    """``revisions.refuse_foreign`` on the file as it is, read without a lock or a new
    file (see the module docstring); a file SQLite cannot read is left to the checks that
    open it (or to a restore, which replaces it)."""
    uri = database.absolute().as_uri() + "?mode=ro&immutable=1"
    engine = sqlalchemy.create_engine(
        "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True), poolclass=NullPool
    )
    try:
        with engine.connect() as conn:
            refuse_foreign(conn, current_on(conn))
    except DatabaseError:
        return
    finally:
        engine.dispose()


def parse_header(head: bytes) -> Header | None:
    """The header's fields, or None when any is out of the range SQLite accepts."""
    if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
        return None
    raw_page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if raw_page_size == 1 else raw_page_size
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        return None
    write_version, read_version = head[18], head[19]
    if write_version not in (1, 2) or read_version not in (1, 2):
        return None
    # Maximum and minimum embedded payload fractions, and leaf payload fraction: fixed.
    if head[21:24] != bytes((64, 32, 32)):
        return None
    change_counter = head[24:28]
    page_count = int.from_bytes(head[28:32], "big")
    trusted = page_count > 0 and change_counter == head[92:96]
    return Header(page_size, write_version, read_version, page_count if trusted else None)


def _check_size(database: Path, size: int, header: Header) -> None:
    if size % header.page_size:
        raise ConfigError(
            f"the database file {database} is truncated: {size} bytes is not a whole "
            f"number of {header.page_size}-byte pages. Refusing to open it; {RESTORE_HINT}"
        )
    if header.page_count is not None and size < header.page_count * header.page_size:
        raise ConfigError(
            f"the database file {database} is truncated: its header records "
            f"{header.page_count} pages ({header.page_count * header.page_size} bytes) "
            f"but the file has {size} bytes. Refusing to open it; {RESTORE_HINT}"
        )


def _read_header(database: Path) -> bytes:
    try:
        with database.open("rb") as file:
            return file.read(HEADER_BYTES)
    except OSError as exc:
        raise ConfigError(f"cannot read the database file {database}: {reason(exc)}") from exc


def _size(path: Path) -> int:
    """The size of ``path``, 0 when it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
    except OSError as exc:  # the directory is a file, or may not be searched
        raise unusable_directory(path.parent, exc) from None
