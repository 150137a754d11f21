"""Rollups of the request log, HTTP metrics, and per-key / per-user limits.

Why: issue 6 turns the request log into reports that never scan it (hourly and daily
``metric_rollups``, kept by the writer in the same transaction as the rows), records
every HTTP request parley serves (``http_metrics``), and adds limits that hold across
processes (``limits``; ``rate_windows`` counts requests per minute). The request log gets
indexes by API key and by user over time: tokens-per-minute limits and a user's own
request listing read them.

Existing request-log rows are tallied into the new rollups here, so totals cover the
whole history from the first report on. The tally uses ``parley.domain.rollup`` (pure
values, no models): rollups are derived data, and the code that keeps them is the
definition of what they hold.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22

The tables below are a snapshot written out here, not imported from ``parley.store.schema``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from parley.domain import histogram
from parley.domain.rollup import Tally, tally_rows
from parley.domain.times import utc

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
_CHUNK = 20_000


def upgrade() -> None:
    rollups = op.create_table(
        "metric_rollups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("bucket_start", TS, nullable=False),
        sa.Column("series_key", sa.String(32), nullable=False),
        sa.Column("user_id", sa.Integer()),
        sa.Column("api_key_id", sa.Integer()),
        sa.Column("provider", sa.String(128), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("origin", sa.String(255)),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("error_type", sa.String(64)),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("total_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("priced", sa.Integer(), nullable=False),
        sa.Column("latency_ms_sum", sa.Float(), nullable=False),
        sa.Column("ttft_ms_sum", sa.Float(), nullable=False),
        sa.Column("tps_sum", sa.Float(), nullable=False),
        sa.Column("latency_ms_hist", sa.Text(), nullable=False),
        sa.Column("ttft_ms_hist", sa.Text(), nullable=False),
        sa.Column("tps_hist", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_metric_rollups"),
        sa.UniqueConstraint(
            "period", "bucket_start", "series_key", name="uq_metric_rollups_bucket"
        ),
    )
    op.create_index(
        "ix_metric_rollups_key", "metric_rollups", ["api_key_id", "period", "bucket_start"]
    )
    op.create_index(
        "ix_metric_rollups_user", "metric_rollups", ["user_id", "period", "bucket_start"]
    )
    op.create_table(
        "http_metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("endpoint", sa.String(255), nullable=False),
        sa.Column("method", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response_time_ms", sa.Float(), nullable=False),
        sa.Column("user_agent", sa.String(512)),
        sa.Column("client_ip", sa.String(64)),
        sa.Column("tags", sa.Text()),
        sa.Column("error_message", sa.Text()),
        sa.Column("request_body", sa.Text()),
        sa.Column("user_id", sa.Integer()),
        sa.Column("api_key_id", sa.Integer()),
        sa.PrimaryKeyConstraint("id", name="pk_http_metrics"),
    )
    op.create_index("ix_http_metrics_created_at", "http_metrics", ["created_at"])
    op.create_table(
        "limits",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer()),
        sa.Column("api_key_id", sa.Integer()),
        sa.Column("requests_per_minute", sa.Integer()),
        sa.Column("tokens_per_minute", sa.Integer()),
        sa.Column("usd_per_day", sa.Float()),
        sa.Column("usd_per_month", sa.Float()),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_limits"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_limits_user_id_users", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["api_keys.id"],
            name="fk_limits_api_key_id_api_keys",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("user_id", name="uq_limits_user_id"),
        sa.UniqueConstraint("api_key_id", name="uq_limits_api_key_id"),
    )
    op.create_table(
        "rate_windows",
        sa.Column("subject", sa.String(32), nullable=False),
        sa.Column("window_start", TS, nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("subject", "window_start", name="pk_rate_windows"),
    )
    op.create_index("ix_request_log_key_time", "request_log", ["api_key_id", "created_at"])
    op.create_index("ix_request_log_user_time", "request_log", ["user_id", "created_at"])
    _backfill(rollups)


def downgrade() -> None:
    op.drop_index("ix_request_log_user_time", table_name="request_log")
    op.drop_index("ix_request_log_key_time", table_name="request_log")
    op.drop_table("rate_windows")
    op.drop_table("limits")
    op.drop_index("ix_http_metrics_created_at", table_name="http_metrics")
    op.drop_table("http_metrics")
    op.drop_index("ix_metric_rollups_user", table_name="metric_rollups")
    op.drop_index("ix_metric_rollups_key", table_name="metric_rollups")
    op.drop_table("metric_rollups")


_LOG_COLUMNS = (
    "id",
    "created_at",
    "user_id",
    "api_key_id",
    "provider",
    "model",
    "origin",
    "success",
    "error_type",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "response_time_ms",
    "time_to_first_token_ms",
    "tokens_per_second",
)


def _backfill(rollups: sa.Table) -> None:
    """Tally every existing request-log row, in chunks (the log may be large)."""
    bind = op.get_bind()
    types: dict[str, Any] = {"created_at": TS, "success": sa.Boolean()}
    columns: list[sa.ColumnClause[Any]] = [sa.column(n, types.get(n)) for n in _LOG_COLUMNS]
    log = sa.table("request_log", *columns)
    totals: dict[Any, Tally] = {}
    last = 0
    while True:
        chunk = [
            dict(row._mapping)
            for row in bind.execute(
                sa.select(log).where(log.c.id > last).order_by(log.c.id).limit(_CHUNK)
            )
        ]
        if not chunk:
            break
        last = chunk[-1]["id"]
        for row in chunk:
            row["created_at"] = utc(row["created_at"])
        for key, tally in tally_rows(chunk).items():
            # Tallies of one chunk may be shared between periods: added up, never changed.
            found = totals.get(key)
            totals[key] = tally if found is None else found.plus(tally)
    rows = [
        {
            "period": period,
            "bucket_start": start,
            "series_key": dims.key(),
            **dims._asdict(),
            **{name: getattr(tally, name) for name in _COUNTERS},
            "latency_ms_hist": histogram.encode(tally.latency_ms),
            "ttft_ms_hist": histogram.encode(tally.ttft_ms),
            "tps_hist": histogram.encode(tally.tps),
        }
        for (period, start, dims), tally in totals.items()
    ]
    for start in range(0, len(rows), 1000):
        bind.execute(rollups.insert(), rows[start : start + 1000])


_COUNTERS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "priced",
    "latency_ms_sum",
    "ttft_ms_sum",
    "tps_sum",
)
