"""Anomaly episodes logged, shared by every process on the database.

Why: issue 6 asks that an anomaly be logged once per episode. The watch that logs them
(``parley.metrics.watch``) kept what it had logged in its own memory, so two servers on one
database logged each episode twice, and a restart logged an episode still going on again.
One row per (provider, model, metric) now holds the end of the last episode logged for
that series; a run reads and updates it in one transaction that excludes the other
processes' runs, and logs only what it claimed.

A new, empty table: no existing row changes. After the upgrade an episode already logged
by the old code is logged once more (its memory was the process's), then never again.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-24

The table below is a snapshot written out here, not derived from ``parley.store.schema``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "anomaly_log",
        sa.Column("provider", sa.String(128), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("metric", sa.String(32), nullable=False),
        sa.Column("logged_end", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("provider", "model", "metric", name="pk_anomaly_log"),
    )


def downgrade() -> None:
    op.drop_table("anomaly_log")
