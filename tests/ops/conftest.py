"""Fixtures shared by the migration tests of ``tests/ops``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from parley.ops import revisions


@pytest.fixture
def migrations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the shipped migrations that tests add revisions to."""
    location = tmp_path / "migrations"
    shutil.copytree(
        revisions.script_location(), location, ignore=shutil.ignore_patterns("__pycache__")
    )
    monkeypatch.setattr(revisions, "script_location", lambda: str(location))
    return location
