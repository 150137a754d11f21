"""Paging through documents (``GET /api/documents?after=``) on SQLite and PostgreSQL: a
page's last document deleted before the next page is asked for does not end the listing."""

from __future__ import annotations

import time

import sqlalchemy as sa

from parley.store import documents as repo
from parley.store.documents import Place
from parley.store.engine import writer_connection
from tests.search.test_documents import _insert


def test_the_next_page_follows_a_deleted_cursor(migrated_engine: sa.Engine) -> None:
    place = Place(user_id=None, collection="books")
    made = []
    for _ in range(5):
        made.append(_insert(migrated_engine, place, "A short one."))
        time.sleep(0.002)  # public ids a millisecond apart, as uploads are
    with migrated_engine.connect() as conn:
        first = repo.list_documents(conn, limit=2)
    assert [d.id for d in first] == [made[4].id, made[3].id]
    with writer_connection(migrated_engine) as conn, conn.begin():
        repo.delete_document(conn, first[-1].id)
    with migrated_engine.connect() as conn:
        second = repo.list_documents(conn, after=first[-1].public_id, limit=2)
        assert [d.id for d in second] == [made[2].id, made[1].id]
        third = repo.list_documents(conn, after=second[-1].public_id, limit=2)
        assert [d.id for d in third] == [made[0].id]
