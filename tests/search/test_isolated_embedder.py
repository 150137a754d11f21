"""The server's local embedder runs the model in a child process (``IsolatedEmbedder``).

It must give the vectors the in-process model gives, keep working for several callers,
and go away when closed.
"""

from __future__ import annotations

import asyncio
import math

from parley.search.embedders import IsolatedEmbedder, LocalEmbedder

TEXTS = ["The cat sat on the mat.", "Quarterly revenue grew by eight percent."]


def test_the_child_gives_the_in_process_vectors_and_stops_when_closed(
    local_embedder: LocalEmbedder,
) -> None:
    isolated = IsolatedEmbedder.start()
    try:
        (process,) = isolated._executor._processes.values()
        assert process.pid is not None and process.is_alive()
        assert isolated.model == local_embedder.model
        assert isolated.dimension == local_embedder.dimension == 384

        async def both() -> tuple[list[list[float]], list[float]]:
            return await asyncio.gather(isolated.embed(TEXTS), isolated.embed_query(TEXTS[0]))

        vectors, query = asyncio.run(both())
        expected = local_embedder.embed_sync(TEXTS)
        for got, want in zip([*vectors, query], [*expected, expected[0]], strict=True):
            assert len(got) == 384
            cosine = sum(g * w for g, w in zip(got, want, strict=True))
            assert math.isclose(cosine, 1.0, abs_tol=1e-4)
        assert isolated.embed_sync([]) == []
    finally:
        isolated.close()
    process.join(timeout=10)
    assert not process.is_alive()
