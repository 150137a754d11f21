"""The server's local embedder runs the model in a child process (``IsolatedEmbedder``).

It must give the vectors the in-process model gives, keep working for several callers,
outlive the stop signals meant for the server, come back when the child dies, and go away
when closed or when the server is killed.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time

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

        # Ctrl-C and systemd's stop reach every process of the server: the server stops
        # the child itself, so they leave it running (it used to die of SIGTERM).
        for number in (signal.SIGINT, signal.SIGTERM):
            os.kill(process.pid, number)
        process.join(timeout=1)
        assert process.is_alive() and asyncio.run(isolated.embed(TEXTS[:1]))
        assert list(isolated._executor._processes.values()) == [process]

        process.kill()  # as the kernel's OOM killer would
        process.join(timeout=10)
        again = asyncio.run(isolated.embed(TEXTS[:1]))
        cosine = sum(a * b for a, b in zip(again[0], expected[0], strict=True))
        assert math.isclose(cosine, 1.0, abs_tol=1e-4)
        (replacement,) = isolated._executor._processes.values()
        assert replacement.pid != process.pid and replacement.is_alive()
        assert replacement.pid is not None
        os.kill(replacement.pid, signal.SIGSTOP)  # a child that cannot exit on its own
    finally:
        isolated.close()
    assert not replacement.is_alive()  # close returns once the child is gone: killed here


SERVER = """
import time
from parley.search.embedders import IsolatedEmbedder
if __name__ == "__main__":
    embedder = IsolatedEmbedder.start()
    (process,) = embedder._executor._processes.values()
    print(process.pid, flush=True)
    time.sleep(120)
"""


def test_the_child_goes_when_its_server_is_killed(tmp_path: object) -> None:
    script = os.path.join(str(tmp_path), "server.py")
    with open(script, "w") as handle:
        handle.write(SERVER)
    with subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE, text=True) as server:
        try:
            assert server.stdout is not None
            child = int(server.stdout.readline())
            os.kill(child, 0)  # running
        finally:
            server.kill()  # -9: nothing closes the child
            server.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the embedding process outlived its server")
