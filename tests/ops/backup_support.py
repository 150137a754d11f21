"""Helpers for the backup and restore tests: settings with private backup directories,
real seeded data (exchanges through the real writer, blobs through the real blob store,
vector-store files), and an independent read of every table to compare databases."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import zlib
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from parley.ops.migrate import upgrade
from parley.settings import Settings
from parley.store.blobs import BlobStore
from parley.store.engine import create_engine
from parley.store.writer import Writer
from tests.harness import settings_for
from tests.store.test_writer import exchange

CANARY = "canary-8f1d2c-do-not-leak"


def backup_settings(tmp_path: Path, database_url: str, **env: str) -> Settings:
    """Settings whose backup and fallback directories are under ``tmp_path``."""
    base = {
        "PARLEY_BACKUP_DIR": str(tmp_path / "backups"),
        "PARLEY_BACKUP_FALLBACK_DIR": str(tmp_path / "fallback"),
        "PARLEY_ENV": "development",
        **env,
    }
    return settings_for(tmp_path, database_url, **base)


def record(settings: Settings, start: int, count: int) -> None:
    """Commit ``count`` exchanges through the real group-commit writer."""
    engine = create_engine(settings)
    writer = Writer(engine)
    writer.start()
    try:

        async def submit() -> None:
            await asyncio.gather(*(writer.submit(exchange(i)) for i in range(start, start + count)))

        asyncio.run(submit())
    finally:
        writer.stop(timeout=30)
        engine.dispose()


def seed(settings: Settings, count: int = 20, tag: str = "a") -> None:
    """A database at head with exchanges, two blobs and a vector-store file."""
    upgrade(settings)
    record(settings, 0, count)
    blobs = BlobStore(settings.blob_dir)
    for data in (f"blob one {tag}".encode(), f"blob two {tag}".encode() * 1000):
        with blobs.begin() as pending:
            pending.write(data)
            pending.finish()
            pending.settle()
    vectors = settings.data_dir / "vectors" / "chunks.lance"
    vectors.mkdir(parents=True, exist_ok=True)
    (vectors / "data.bin").write_bytes(f"vectors {tag}".encode() * 100)


def contents(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows, ordered by primary key, read with plain SQLAlchemy reflection
    (independent of ``store.snapshot``, which the code under test uses)."""
    engine = create_engine(settings)
    try:
        meta = sa.MetaData()
        meta.reflect(engine)
        out: dict[str, list[tuple[Any, ...]]] = {}
        with engine.connect() as conn:
            for name, table in sorted(meta.tables.items()):
                order = list(table.primary_key.columns) or list(table.columns)
                out[name] = [tuple(r) for r in conn.execute(sa.select(table).order_by(*order))]
        return out
    finally:
        engine.dispose()


def counts(settings: Settings) -> dict[str, int]:
    return {table: len(rows) for table, rows in contents(settings).items()}


def files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file under ``root`` (empty if missing)."""
    if not root.is_dir():
        return {}
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def data_files(settings: Settings) -> dict[str, dict[str, str]]:
    blobs = {k: v for k, v in files(settings.blob_dir).items() if not k.startswith("tmp/")}
    return {"blobs": blobs, "vectors": files(settings.data_dir / "vectors")}


def flip_byte(path: Path, offset: int | None = None) -> None:
    """Damage one byte: at ``offset``, or the first from the middle on that changes content.

    Deflate has bits that change nothing (a flipped bit in an unused Huffman code length
    decodes to the same bytes, under the same CRC): such an archive is not damaged, so a
    plain gzip archive is flipped where its decompressed bytes change (or stop decoding).
    """
    data = bytearray(path.read_bytes())
    if offset is None:
        offset = len(data) // 2
        if data[:2] == b"\x1f\x8b":
            plain = gzip.decompress(bytes(data))
            while _decodes_to(data, offset, plain):
                offset += 1
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def _decodes_to(data: bytearray, offset: int, plain: bytes) -> bool:
    damaged = bytearray(data)
    damaged[offset] ^= 0x40
    try:
        return gzip.decompress(bytes(damaged)) == plain
    except (OSError, EOFError, zlib.error):
        return False
