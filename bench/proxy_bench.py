"""Gateway overhead benchmark: the direct upstream, the floor proxy and parley, one run.

Starts a fake OpenAI upstream, the floor passthrough proxy (``bench/floor_proxy.py``) and
``parley serve`` (SQLite, durable recording on) as separate processes, drives each with
``wrk`` at concurrency 1, 16 and 64, streaming and not, and prints requests/s, p50 and
p99 latency, the p50 each adds over the direct upstream, and parley's throughput as a
fraction of the floor's. The ``anthropic`` row drives parley's Anthropic Messages front
door (``/v1/messages``) against the same OpenAI upstream, so every event is re-encoded;
its last column is its throughput as a fraction of parley's OpenAI passthrough.

    .venv/bin/python bench/proxy_bench.py [--duration 8] [--concurrency 1,16,64]
        [--recording durable|journal|async] [--writer thread|process] [--embedder none|local]

Needs ``wrk`` (Debian package ``wrk``). Figures are only comparable within one run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
BODY = (
    '{{"model": "{model}", "stream": {stream}, '
    '"messages": [{{"role": "user", "content": "hello there"}}]}}'
)
ANTHROPIC_BODY = (
    '{{"model": "{model}", "stream": {stream}, "max_tokens": 256, '
    '"messages": [{{"role": "user", "content": "hello there"}}]}}'
)
TARGETS = ("direct", "floor", "parley", "anthropic")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"process for {url} exited with {process.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


@contextmanager
def spawn(
    args: list[str], ready_url: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[None]:
    process = subprocess.Popen(
        args,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_ready(ready_url, process)
        yield
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def wrk(url: str, body: str, connections: int, duration: float) -> tuple[float, float, float]:
    """(requests/s, p50 ms, p99 ms) from one wrk run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = [[{body}]]\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
        )
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t",
                str(min(2, connections)),
                "-c",
                str(connections),
                "-d",
                f"{max(1, round(duration))}s",
                "--latency",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out:
        raise SystemExit(f"errors from {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return rps, _percentile(out, "50%"), _percentile(out, "99%")


def _percentile(out: str, label: str) -> float:
    match = re.search(rf"^\s+{re.escape(label)}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if match is None:
        raise SystemExit(f"no {label} in wrk output:\n{out}")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--recording", default="durable", choices=["durable", "journal", "async"])
    parser.add_argument(
        "--writer",
        default="thread",
        choices=["thread", "process"],
        help="parley's store writer (PARLEY_WRITER): a thread of the server, or a child process",
    )
    parser.add_argument(
        "--embedder",
        default="none",
        choices=["none", "local"],
        help="semantic-search embedder of the parley under test (default none: the local "
        "model's indexing would share the cores with the load generator and the upstream)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    levels = [int(c) for c in args.concurrency.split(",")]
    python = sys.executable
    up_port, floor_port, parley_port = free_port(), free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    work = Path(tempfile.mkdtemp(prefix="parley-bench-"))
    (work / "parley.toml").write_text(
        f'[[providers]]\nname = "up"\nkind = "openai"\nbase_url = "{upstream}/v1"\n'
    )
    parley_env = {
        "PARLEY_DATA_DIR": str(work / "data"),
        "PARLEY_LOG_LEVEL": "WARNING",
        "PARLEY_RECORDING": args.recording,
        "PARLEY_WRITER": args.writer,
        "PARLEY_SEARCH_EMBEDDER": args.embedder,
        "DATABASE_URL": "",
    }
    results: dict[tuple[str, bool, int], tuple[float, float, float]] = {}
    with (
        spawn(
            [python, "-m", "tests.fakes.openai_upstream", "--port", str(up_port)],
            f"{upstream}/v1/models",
            cwd=REPO,
        ),
        spawn(
            [
                python,
                str(REPO / "bench" / "floor_proxy.py"),
                "--port",
                str(floor_port),
                "--upstream",
                upstream,
            ],
            f"http://127.0.0.1:{floor_port}/",
            cwd=REPO,
        ),
        spawn(
            [python, "-m", "parley", "serve", "--port", str(parley_port)],
            f"http://127.0.0.1:{parley_port}/healthz",
            env=parley_env,
            cwd=work,
        ),
    ):
        parley = f"http://127.0.0.1:{parley_port}"
        targets = {
            "direct": (f"{upstream}/v1/chat/completions", "bench", BODY),
            "floor": (f"http://127.0.0.1:{floor_port}/v1/chat/completions", "bench", BODY),
            "parley": (f"{parley}/v1/chat/completions", "up/bench", BODY),
            "anthropic": (f"{parley}/v1/messages", "up/bench", ANTHROPIC_BODY),
        }
        for stream in (False, True):
            for connections in levels:
                for name, (url, model, template) in targets.items():
                    body = template.format(model=model, stream="true" if stream else "false")
                    wrk(url, body, connections, 1.0)  # warm up
                    results[(name, stream, connections)] = wrk(
                        url, body, connections, args.duration
                    )
    shutil.rmtree(work, ignore_errors=True)
    print_table(results, levels)


def print_table(
    results: dict[tuple[str, bool, int], tuple[float, float, float]], levels: list[int]
) -> None:
    print(
        f"{'mode':<7} {'conc':>4} {'target':<9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'+p50 ms':>8} {'vs floor':>8} {'vs parley':>9}"
    )
    for stream in (False, True):
        for connections in levels:
            direct = results[("direct", stream, connections)]
            floor = results[("floor", stream, connections)]
            passthrough = results[("parley", stream, connections)]
            for name in TARGETS:
                rps, p50, p99 = results[(name, stream, connections)]
                added = f"{p50 - direct[1]:8.2f}" if name != "direct" else f"{'':>8}"
                ratio = f"{rps / floor[0]:8.0%}" if name in ("parley", "anthropic") else " " * 8
                versus = f"{rps / passthrough[0]:9.0%}" if name == "anthropic" else " " * 9
                print(
                    f"{'stream' if stream else 'json':<7} {connections:>4} {name:<9} "
                    f"{rps:9.0f} {p50:8.2f} {p99:8.2f} {added} {ratio} {versus}"
                )


if __name__ == "__main__":
    main()
