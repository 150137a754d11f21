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
- rows whose end is before ``forget_before`` are deleted: those episodes cannot come back;
- a run that does not happen for longer than the watch's window while an episode goes on
  (parley stopped for hours) sees it start later than the end logged: it is logged again.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

import sqlalchemy
from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from parley.domain.times import utc
from parley.errors import StoreBusy
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
    claimed it, and no other process ever will. ``StoreBusy``: nothing was claimed.

    A first read takes no lock: when it shows nothing new and no end that grew (most runs,
    since an episode goes on for hours), nothing is written, so a busy writer never makes
    the run wait for the write lock. Otherwise the decision is made again under it.
    """
    with engine.connect() as conn:
        claimed, changed = _decide(_logged(conn), episodes)
    if not changed:
        return claimed
    try:
        with engine.connect().execution_options(**{IMMEDIATE: True}) as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_CLAIM_LOCK})")
            claimed, changed = _decide(_logged(conn), episodes)
            for (provider, model, metric), end in changed.items():
                _upsert(conn, provider, model, metric, end)
            conn.execute(delete(anomaly_log).where(anomaly_log.c.logged_end < utc(forget_before)))
    except sqlalchemy.exc.OperationalError as exc:
        if "locked" not in str(exc.orig):
            raise
        # SQLite's writer kept the write lock past the busy timeout (a heavy load).
        raise StoreBusy("the database stayed locked past the busy timeout") from exc
    return claimed


_Series = tuple[str, str, str]


def _logged(conn: sqlalchemy.Connection) -> dict[_Series, datetime]:
    return {
        (row.provider, row.model, row.metric): utc(row.logged_end)
        for row in conn.execute(select(anomaly_log))
    }


def _decide(
    logged: dict[_Series, datetime], episodes: Sequence[Seen]
) -> tuple[list[bool], dict[_Series, datetime]]:
    """Which episodes are new, and the series whose logged end moves (to what)."""
    claimed: list[bool] = []
    changed: dict[_Series, datetime] = {}
    for seen in episodes:
        key = (seen.provider, seen.model, seen.metric)
        # In UTC: SQLite compares stored times as text.
        start, end = utc(seen.start), utc(seen.end)
        last = logged.get(key)
        claimed.append(last is None or start > last)
        if last is None or end > last:
            logged[key] = changed[key] = end
    return claimed, changed


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
