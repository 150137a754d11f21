"""An answer keeps the notice it was given with.

Why: when the embedder fails or hangs, a chat-API answer in a conversation with documents
is given without them and says so in a ``notice`` (``chat.sources``). The notice was only
in the answer as it was sent (``done``, ``assistant_message``): read back later (``GET``
of the conversation) the answer showed no citations and no notice, so it looked answered
from the documents when it was not. ``responses.notice`` keeps it with the answer's other
facts (model, tokens, finish reason); NULL for an answer given as asked.

Rows written before this revision keep ``notice`` NULL: their notices were never stored,
so there is nothing to fill in. Adding a nullable column rewrites no rows on either
database. Downgrade drops the column: the notices go, which ``parley db downgrade``
refuses without ``--discard-data`` once any answer has one.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("responses", sa.Column("notice", sa.Text()))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+, PostgreSQL): no table rebuild of the responses.
    op.execute("ALTER TABLE responses DROP COLUMN notice")
