"""How a search query becomes words, on SQLite and PostgreSQL: text typed decomposed (NFD,
as some keyboards and copies send it) and scripts whose words hold combining marks
(Devanagari, Thai) find the words they spell, and only those, on both databases."""

from __future__ import annotations

import unicodedata

import pytest
import sqlalchemy as sa

from parley.store.conversations import Conversations
from parley.store.search import MARK_END, MARK_START, Scope, Search, words
from tests.store.test_conversations import ALICE, new, say

A = Scope(ALICE.user_id)


def _plain(snippet: str) -> str:
    return snippet.replace(MARK_START, "").replace(MARK_END, "")


def test_a_word_keeps_its_marks_and_is_composed() -> None:
    assert words(unicodedata.normalize("NFD", "crème brûlée")) == ["crème", "brûlée"]
    assert words("हिन्दी भाषा") == ["हिन्दी", "भाषा"]
    assert words("สวัสดีครับ") == ["สวัสดีครับ"]
    # Marks never start a word; punctuation and underscore still separate words.
    assert words("\u0301 x*y tomato_blight") == ["x", "y", "tomato", "blight"]


@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("Café crème brûlée tonight", unicodedata.normalize("NFD", "brûlée")),
        ("नमस्ते दुनिया हिन्दी भाषा", "हिन्दी"),
        ("Thai greeting: สวัสดีครับ", "สวัสดีครับ"),
    ],
)
def test_words_with_marks_find_their_message(
    migrated_engine: sa.Engine, text: str, query: str
) -> None:
    store = Conversations(migrated_engine)
    conv = new(store)
    say(store, conv, text)
    say(store, conv, "an unrelated message")
    hits = Search(migrated_engine).keyword(query, A)
    assert [_plain(hit.snippet) for hit in hits] == [text]


def test_a_devanagari_word_does_not_match_its_letters_scattered(
    migrated_engine: sa.Engine,
) -> None:
    # The letters of हिन्दी (ह, न, द) are all here, in other words.
    store = Conversations(migrated_engine)
    say(store, new(store), "दुनिया नमस्ते है")
    assert Search(migrated_engine).keyword("हिन्दी", A) == []
