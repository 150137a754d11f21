"""A generated title knows the message it was made from.

Why: a conversation's title is made by its model from the first message answered
(``chat.titles``). Deleting that message (``DELETE .../messages/{id}``) left the title,
which still carried the deleted text and matched it in keyword search. A user who deletes
text pasted by mistake expects it gone. ``conversations.title_message_id`` names the
message a generated title was made from; deleting that message resets the title to NULL,
as a new conversation has. NULL for a title a user set (create, rename, import), which
nothing resets.

Rows written before this revision keep ``title_message_id`` NULL: whether their titles
were generated or set by a user was never stored, so they are treated as set by a user
and never reset (the safe reading). Adding a nullable column rewrites no rows on either
database. Downgrade drops the column: the links go, which ``parley db downgrade`` refuses
without ``--discard-data`` once any conversation has one.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("conversations", sa.Column("title_message_id", sa.Integer()))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+, PostgreSQL): no table rebuild of the conversations.
    op.execute("ALTER TABLE conversations DROP COLUMN title_message_id")
