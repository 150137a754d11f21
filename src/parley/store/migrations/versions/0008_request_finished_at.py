"""The request log says when each attempt finished.

Why: tokens-per-minute limits sum the tokens a key or user used over the last minute.
They read ``created_at``, the time an attempt started, so a stream that ran longer than
a minute was already outside the window when its row was written, and its tokens never
counted. ``finished_at`` (start plus response time, written by the exchange writer for
every row) is what the limits read now; a stream counts when it ends.

Two partial indexes serve that read, by key and by user over finish time. They hold only
rows with a key (or a user): keyless traffic (the local admin, the master key) costs
nothing more per insert; a row with both costs an entry in each.

Rows written before this revision keep ``finished_at`` NULL, which no window matches:
they finished before the upgrade, so they would fall out of the one-minute window within
a minute of it anyway. The only cost is that minute: tokens used just before the upgrade
do not count against a limit right after it. Adding a nullable column rewrites no rows
on either database; building the indexes reads the request log once, and writes to it
wait meanwhile (SQLite's write lock; PostgreSQL's plain CREATE INDEX).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (index, subject column) of the partial indexes over finish time.
_INDEXES = (
    ("ix_request_log_key_finished", "api_key_id"),
    ("ix_request_log_user_finished", "user_id"),
)


def upgrade() -> None:
    op.add_column("request_log", sa.Column("finished_at", sa.DateTime(timezone=True)))
    for name, column in _INDEXES:
        where = sa.text(f"{column} IS NOT NULL")
        op.create_index(
            name,
            "request_log",
            [column, "finished_at"],
            sqlite_where=where,
            postgresql_where=where,
        )


def downgrade() -> None:
    for name, _column in reversed(_INDEXES):
        op.drop_index(name, table_name="request_log")
    # Plain DROP COLUMN (SQLite 3.35+, PostgreSQL): no table rebuild of the request log.
    op.execute("ALTER TABLE request_log DROP COLUMN finished_at")
