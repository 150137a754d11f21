"""The request log says when its tokens are parley's estimate.

Why: issue 6 counts streaming usage against limits and budgets, partial streams
included. A stream cut off before the upstream reported its usage (a client that
left, an upstream that broke) now records estimated tokens (``gateway.recording``),
and this column marks them, so reports and audits can tell them from reported ones.

Adding a column with a constant default rewrites no rows on either database.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "request_log",
        sa.Column("usage_estimated", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+, PostgreSQL): no table rebuild of the request log.
    op.execute("ALTER TABLE request_log DROP COLUMN usage_estimated")
