"""The one way the admin and identity routes read a JSON body (``server.api_body``): the
same refusals, word for word, from the users, providers and limits APIs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from parley.chat.fields import known_fields
from parley.errors import InvalidRequest
from parley.server.api_body import only_fields
from parley.store.limits import check_values
from tests.harness import ParleyServer, rows, settings_for

MASTER = "mk-0123456789abcdef"
LIMIT = 4096


def test_every_unknown_field_is_named_in_one_refusal() -> None:
    with pytest.raises(InvalidRequest) as refused:
        only_fields({"name": "x", "zeta": 1, "alpha": 2}, frozenset({"name", "expires_at"}))
    assert refused.value.message == (
        "unknown field(s): 'alpha', 'zeta'; expected: expires_at, name"
    )
    assert refused.value.param is None
    assert only_fields({"name": "x"}, {"name", "expires_at"}) == {"name": "x"}


def test_every_closed_field_set_refuses_a_typo_in_the_same_words() -> None:
    """The identity and admin bodies, the chat API's and the limits all name an unknown
    field, quoted, then what they expect."""
    refusals = (
        lambda: only_fields({"colour": 1}, {"name"}),
        lambda: known_fields({"colour": 1}, {"name"}),
        lambda: check_values({"colour": 1}),
    )
    for refuse in refusals:
        with pytest.raises(InvalidRequest) as refused:
            refuse()
        assert refused.value.message.startswith("unknown field(s): 'colour'; expected: ")
    with pytest.raises(InvalidRequest) as placed:
        known_fields({"colour": 1}, {"name"}, "messages[0]")
    assert placed.value.message == "unknown field(s) in messages[0]: 'colour'; expected: name"
    assert placed.value.param == "messages[0]"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ParleyServer]:
    settings = settings_for(
        tmp_path,
        f"sqlite:///{tmp_path / 'p.db'}",
        PARLEY_MASTER_KEY=MASTER,
        PARLEY_MAX_BODY_BYTES=str(LIMIT),
    )
    with ParleyServer(settings) as running:
        yield running


def test_users_and_providers_routes_refuse_bodies_alike(
    server: ParleyServer, tmp_path: Path
) -> None:
    user = {"email": "a@example.org", "username": "anna", "password": "pw-long-enough"}
    provider = {"name": "house", "kind": "openai", "model": "gpt-4o-mini"}
    with httpx.Client(
        base_url=server.root, headers={"Authorization": f"Bearer {MASTER}"}, timeout=10
    ) as http:
        for path, body in (("/api/admin/users", user), ("/api/admin/providers", provider)):
            unknown = http.post(path, json={**body, "colour": "blue"})
            assert unknown.status_code == 400, (path, unknown.text)
            message = unknown.json()["error"]["message"]
            assert message.startswith("unknown field(s): 'colour'; expected: "), path
            nul = http.post(path, json={**body, "name": "a\x00b", "full_name": "a\x00b"})
            assert nul.status_code == 400, (path, nul.text)
            assert "NUL" in nul.json()["error"]["message"]
            big = http.post(path, json={**body, "padding": "x" * LIMIT})
            assert big.status_code == 413, (path, big.text)
        # The limits API reads its body the same way (its fields are checked by the store).
        anna = http.post("/api/admin/users", json=user).json()
        big = http.put(f"/api/admin/limits/users/{anna['id']}", content=b" " * (LIMIT + 1))
        assert big.status_code == 413, big.text
    database = f"sqlite:///{tmp_path / 'p.db'}"
    assert rows(database, "SELECT username FROM users") == [{"username": "anna"}]
    assert rows(database, "SELECT id FROM provider_configs") == []
