"""Retention benchmark: /v1 latency while a million-row request log is pruned under it.

Builds a SQLite database with ``--rows`` request-log rows (``--old`` of them older than
the retention age), starts a fake OpenAI upstream and ``parley serve`` on it as separate
processes, and drives ``/v1/chat/completions`` with ``wrk``: first idle, then while
``run_retention`` (the real one, in its own process, as ``parley retention`` runs it)
deletes the old rows in batches. Prints requests/s, p50 and p99 for both, the p99
ratio (the goal: under 2x idle), and what retention did.

    .venv/bin/python bench/retention_bench.py [--rows 1000000] [--connections 16]
        [--duration 15] [--batch-size 1000] [--pause 0.05] [--pause-ratio 2]

Needs ``wrk`` (Debian package ``wrk``). Reuses ``bench/proxy_bench.py``'s process and
``wrk`` helpers. The measurement during retention only counts if retention was still
running when it ended (the table says so); use ``--duration`` shorter than retention.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from proxy_bench import BODY, REPO, free_port, spawn, wrk

DAYS = 30
# run_retention in a process of its own, exactly as ``parley retention`` calls it, with
# the pause parameters exposed for tuning.
RUNNER = """
import json, sys
from parley.ops.retention import run_retention
from parley.settings import load_settings
report = run_retention(load_settings(), pause=float(sys.argv[1]),
                       pause_ratio=float(sys.argv[2]), checkpoint=sys.argv[3] == "1")
print(json.dumps(report.to_dict()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--old", type=float, default=0.9, help="fraction past the cutoff")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--pause", type=float, default=0.05)
    parser.add_argument("--pause-ratio", type=float, default=2.0)
    parser.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="leave SQLite's log to the writer's auto-checkpoint",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    python = sys.executable
    work = Path(tempfile.mkdtemp(prefix="parley-retention-bench-"))
    up_port, parley_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}"
    (work / "parley.toml").write_text(
        f'[[providers]]\nname = "up"\nkind = "openai"\nbase_url = "{upstream}/v1"\n'
        f"[retention]\nrequest_log_days = {DAYS}\nbatch_size = {args.batch_size}\n"
    )
    env = {
        "PARLEY_DATA_DIR": str(work / "data"),
        "PARLEY_LOG_LEVEL": "WARNING",
        "PARLEY_ENV": "development",
        "PARLEY_BACKUP_DIR": str(work / "backups"),
        "PARLEY_BACKUP_FALLBACK_DIR": str(work / "backups-fallback"),
        "DATABASE_URL": "",
    }
    full_env = {**os.environ, **env}
    subprocess.run([python, "-m", "parley", "db", "upgrade"], cwd=work, env=full_env,
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    clock = time.monotonic()
    old = fill(work / "data" / "parley.db", args.rows, args.old)
    filled = time.monotonic() - clock
    size = (work / "data" / "parley.db").stat().st_size
    url = f"http://127.0.0.1:{parley_port}/v1/chat/completions"
    body = BODY.format(model="up/bench", stream="false")
    with (
        spawn([python, "-m", "tests.fakes.openai_upstream", "--port", str(up_port)],
              f"{upstream}/v1/models", cwd=REPO),
        spawn([python, "-m", "parley", "serve", "--port", str(parley_port)],
              f"http://127.0.0.1:{parley_port}/healthz", env=env, cwd=work),
    ):  # fmt: skip
        wrk(url, body, args.connections, 2.0)  # warm up
        idle = wrk(url, body, args.connections, args.duration)
        pruner = subprocess.Popen(
            [python, "-c", RUNNER, str(args.pause), str(args.pause_ratio),
             "0" if args.no_checkpoint else "1"],
            cwd=work, env=full_env, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(0.5)  # let it open its connection and start its first batch
        during = wrk(url, body, args.connections, args.duration)
        covered = pruner.poll() is None
        out, _ = pruner.communicate(timeout=3600)
        if pruner.returncode != 0:
            raise SystemExit(f"retention failed with exit status {pruner.returncode}")
        after = wrk(url, body, args.connections, args.duration)
    report = json.loads(out)
    shutil.rmtree(work, ignore_errors=True)
    log = next(t for t in report["tables"] if t["table"] == "request_log")
    if log["deleted"] != old:
        raise SystemExit(f"retention deleted {log['deleted']} rows, expected {old}")
    print(
        f"request_log: {args.rows:,} rows ({size / 2**20:.0f} MiB, built in {filled:.0f} s), "
        f"{old:,} older than {DAYS} days; wrk -c {args.connections}, {args.duration:g} s each"
    )
    print(f"{'phase':<18} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (rps, p50, p99) in (("idle", idle), ("during retention", during),
                                  ("after retention", after)):  # fmt: skip
        print(f"{name:<18} {rps:8.0f} {p50:8.2f} {p99:8.2f}")
    ratio = during[2] / idle[2]
    print(f"p99 during / idle: {ratio:.2f}x (goal < 2x){'' if ratio < 2 else '  MISSED'}")
    rate = log["deleted"] / max(log["seconds"], 1e-9)
    print(f"retention: {log['deleted']:,} rows in {log['batches']} batches of "
          f"{args.batch_size}, {log['seconds']:.1f} s ({rate:,.0f} rows/s), "
          f"write lock held {log['held_seconds'] / max(log['batches'], 1) * 1000:.0f} ms "
          f"a batch on average, {log['longest_batch'] * 1000:.0f} ms at most, "
          f"pause max({args.pause:g} s, {args.pause_ratio:g} x batch)"
          + ("" if covered else "; NOTE: it ended before the measurement did"))  # fmt: skip


def fill(database: Path, rows: int, old_fraction: float) -> int:
    """Insert ``rows`` request-log rows, oldest first, ``old_fraction`` of them spread over
    the 90 days before the cutoff and the rest over the 30 days after it; how many are old.
    Raw ``executemany`` in one transaction: the fastest way to a big log."""
    now = datetime.now(UTC)
    old = int(rows * old_fraction)
    start_old, start_new = now - timedelta(days=DAYS + 90), now - timedelta(days=DAYS - 1)
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("BEGIN")
        for chunk in range(0, rows, 50_000):
            batch = []
            for i in range(chunk, min(rows, chunk + 50_000)):
                if i < old:
                    at = start_old + timedelta(days=90) * (i / old)
                else:
                    at = start_new + timedelta(days=DAYS - 2) * ((i - old) / (rows - old))
                prompt, completion = 12 + i % 50, 7 + i % 90
                batch.append((f"{i:032x}", f"{i // 2:032x}", 1 + i % 2,
                              at.strftime("%Y-%m-%d %H:%M:%S.%f"), i % 17 != 0, 200, 412.5,
                              i % 7 == 0, 1 + i % 9, prompt, completion, prompt + completion,
                              38.5, 405.0, 52.1, 0.00042))  # fmt: skip
            conn.executemany(
                "INSERT INTO request_log (public_id, chain_id, attempt, created_at, success, "
                "status_code, response_time_ms, endpoint, client_protocol, provider, model, "
                "model_requested, is_streaming, message_count, prompt_tokens, "
                "completion_tokens, total_tokens, time_to_first_token_ms, "
                "time_to_last_token_ms, tokens_per_second, cost_usd, finish_reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'chat', 'openai', 'up', 'gpt-4o-mini-2024-07-18', "
                "'gpt-4o-mini', ?, ?, ?, ?, ?, ?, ?, ?, ?, 'stop')",
                batch,
            )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return old


if __name__ == "__main__":
    main()
