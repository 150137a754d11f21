"""The garbage collector's settings for a long-running parley process.

``parley serve`` and the process writer's child call ``tune_for_serving()`` once, after
start-up and before their first request or batch:

- everything imported and built by then lives as long as the process, so it is frozen
  out of the collector's sight: a full collection no longer walks it (measured with
  ``bench/chat_bench.py``: loading a 1,000-message conversation, p99 48 ms -> 8 ms);
- requests in flight and a group commit's rows keep thousands of young container
  objects alive, so with the default first generation (700 allocations) the collector
  ran several times per 10 requests, walking live objects and promoting them until a full
  collection came due: 4-11% of the event loop's CPU (perf). Objects that die young are
  freed by reference counting whatever the threshold; cycles are still collected, only in
  larger steps.
"""

from __future__ import annotations

import gc

# The collector's first-generation threshold while serving (the default is 700).
YOUNG_THRESHOLD = 10_000


def tune_for_serving() -> None:
    """Freeze what exists now and raise the first generation's threshold.

    Garbage is collected first: a cycle frozen while unreachable could never be freed
    (the benchmark calls this once per run, after the last run's engine is gone)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])
