"""PostgreSQL's own tools for backups and restores: ``pg_dump``, ``pg_restore``, ``psql``.

Invariants:
- the password never appears on a command line (where ``ps`` shows it), in a log line or
  in an error: the tools get a libpq URL without it and read it from ``PGPASSWORD`` in
  their environment, and anything they print is scrubbed of it before it is shown;
- a dump reads an exported snapshot (``--snapshot``), the one the manifest's digests were
  computed in;
- a restore runs in one ``psql`` transaction (``--single-transaction`` with
  ``ON_ERROR_STOP``) that first empties the ``public`` schema, then replays the dump: the
  database ends with exactly the archive's contents, or, on any error (in ``pg_restore``
  too), as it was. The dump's SQL is relayed from ``pg_restore`` to ``psql`` in memory, so
  its rows are never written out as text.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import IO

from sqlalchemy.engine import make_url

from parley.errors import BackupError
from parley.store.snapshot import RESET_SCHEMA_SQL

_BIN_DIRS = ("/usr/bin", "/usr/local/bin")
_RELAY_CHUNK = 1 << 20


def _tool(name: str) -> str:
    found = shutil.which(name) or next(
        (str(Path(d) / name) for d in _BIN_DIRS if (Path(d) / name).exists()), None
    )
    if found is None:
        raise BackupError(f"{name} was not found: install the PostgreSQL client tools")
    return found


def _connection(database_url: str) -> tuple[str, dict[str, str], str | None]:
    """(libpq URL without password, environment for the tool, the password to scrub)."""
    url = make_url(database_url)
    password = url.password if isinstance(url.password, str) else None
    libpq = url.set(drivername="postgresql", password=None)
    env = dict(os.environ)
    if password:
        env["PGPASSWORD"] = password
    return libpq.render_as_string(hide_password=False), env, password or None


def _scrub(text: str, secret: str | None) -> str:
    text = text.strip()
    if secret:
        text = text.replace(secret, "**********")
    lines = text.splitlines()
    return " / ".join(lines[-3:]) if lines else "(no output)"


def dump(database_url: str, snapshot: str, target: Path) -> None:
    """``pg_dump -Fc`` of the database, as of ``snapshot``, into the new file ``target``."""
    url, env, password = _connection(database_url)
    command = [
        _tool("pg_dump"),
        "--format=custom",
        "--no-owner",
        "--no-privileges",
        f"--snapshot={snapshot}",
        f"--file={target}",
        f"--dbname={url}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        message = _scrub(result.stderr, password)
        if "No space left on device" in result.stderr:
            # The archive's directory is full: the caller tries the fallback directory.
            raise OSError(errno.ENOSPC, f"pg_dump failed: {message}")
        raise BackupError(f"pg_dump failed: {message}")
    target.chmod(0o600)


def check_dump(path: Path) -> None:
    """Refuse a file ``pg_restore`` cannot read as a custom-format dump."""
    result = subprocess.run(
        [_tool("pg_restore"), "--list", str(path)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BackupError(f"the database dump is unreadable: {_scrub(result.stderr, None)}")


def restore(database_url: str, dump_file: Path) -> None:
    """Replace the ``public`` schema's contents with ``dump_file``, in one transaction.

    ``pg_restore``'s SQL is relayed to ``psql`` here, not piped straight: at the end of a
    pipe ``psql`` commits whatever it got, so a ``pg_restore`` that died midway (killed,
    out of memory, a read error) would commit an emptied schema. The relay closes
    ``psql``'s input only once ``pg_restore`` exited 0; otherwise it kills ``psql``, whose
    dropped connection rolls the transaction back."""
    url, env, password = _connection(database_url)
    with tempfile.TemporaryFile() as producer_err, tempfile.TemporaryFile() as consumer_err:
        producer = subprocess.Popen(
            [_tool("pg_restore"), "--no-owner", "--no-privileges", "--file=-", str(dump_file)],
            stdout=subprocess.PIPE,
            stderr=producer_err,
            env=env,
        )
        consumer = subprocess.Popen(
            [
                _tool("psql"),
                "--no-psqlrc",
                "--quiet",
                "--single-transaction",
                "--set=ON_ERROR_STOP=1",
                f"--command={RESET_SCHEMA_SQL}",
                "--file=-",
                f"--dbname={url}",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=consumer_err,
            env=env,
        )
        relayed = _relay(producer, consumer)
        assert consumer.stdin is not None
        if relayed and producer.returncode == 0:
            with contextlib.suppress(BrokenPipeError):
                consumer.stdin.close()  # the end of its input: psql commits
        else:
            consumer.kill()  # no end of input: the dropped connection rolls back
        consumer.wait()
        with contextlib.suppress(OSError):
            consumer.stdin.close()
        if relayed and producer.returncode != 0:
            raise BackupError(
                "pg_restore failed, the database was left as it was: "
                + _scrub(_read(producer_err), password)
            )
        if consumer.returncode != 0:
            raise BackupError(
                "psql failed, the database was left as it was: "
                + _scrub(_read(consumer_err), password)
            )


def _relay(producer: subprocess.Popen[bytes], consumer: subprocess.Popen[bytes]) -> bool:
    """Copy ``producer``'s output into ``consumer`` (whose input stays open) and wait for
    ``producer``. False when ``consumer`` stopped reading first (its error says why)."""
    assert producer.stdout is not None and consumer.stdin is not None
    relayed = True
    try:
        while chunk := producer.stdout.read(_RELAY_CHUNK):
            consumer.stdin.write(chunk)
    except BrokenPipeError:
        relayed = False
        producer.kill()
    producer.stdout.close()
    producer.wait()
    return relayed


def _read(file: IO[bytes]) -> str:
    file.seek(0)
    return file.read().decode(errors="replace")
