"""The anomaly log repository: which anomaly episodes were logged, for every process.

An episode is known by its series (provider, model, metric) and its hours. The table keeps
one row per series: the end of the last episode logged for it. ``claim`` decides which of
a run's episodes are new, and records them, in one transaction that excludes every other
run (SQLite's ``BEGIN IMMEDIATE``, a PostgreSQL advisory lock): of two processes that see
the same new episode, exactly one claims it.

Invariants:
- an episode is new when its series has no row, or it starts after the end logged (an
  hour back to normal in between makes a new episode); one that starts at or before it is
  the logged one still going on, or seen later by a window that moved past its start;
- a claimed row's end only grows (a series' episodes are seen in time order, and an old
  one seen again never moves it back);
- rows whose end is before ``forget_before`` are deleted: those episodes cannot come back.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import sqlalchemy
from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from parley.domain.times import utc
from parley.store.engine import IMMEDIATE
from parley.store.schema import anomaly_log

# pg_advisory_xact_lock key of a claim ("parley-a").
_CLAIM_LOCK = 0x7061726C65792D61


class Seen(NamedTuple):
    """One episode a run found."""

    provider: str
    model: str
    metric: str
    start: datetime
    end: datetime


def claim(
    engine: sqlalchemy.Engine, episodes: Sequence[Seen], forget_before: datetime
) -> list[bool]:
    """For each of ``episodes`` (in time order per series), whether it is new: this call
    claimed it, and no other process ever will."""
    with engine.connect().execution_options(**{IMMEDIATE: True}) as conn, conn.begin():
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_CLAIM_LOCK})")
        logged = {
            (row.provider, row.model, row.metric): utc(row.logged_end)
            for row in conn.execute(select(anomaly_log))
        }
        claimed: list[bool] = []
        changed: dict[tuple[str, str, str], datetime] = {}
        for seen in episodes:
            key = (seen.provider, seen.model, seen.metric)
            end = logged.get(key)
            claimed.append(end is None or seen.start > end)
            if end is None or seen.end > end:
                logged[key] = changed[key] = seen.end
        for (provider, model, metric), end in changed.items():
            _upsert(conn, provider, model, metric, end)
        conn.execute(delete(anomaly_log).where(anomaly_log.c.logged_end < forget_before))
    return claimed


def _upsert(
    conn: sqlalchemy.Connection, provider: str, model: str, metric: str, end: datetime
) -> None:
    insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    conn.execute(
        insert(anomaly_log)
        .values(provider=provider, model=model, metric=metric, logged_end=end)
        .on_conflict_do_update(
            index_elements=[anomaly_log.c.provider, anomaly_log.c.model, anomaly_log.c.metric],
            set_={"logged_end": end},
        )
    )
