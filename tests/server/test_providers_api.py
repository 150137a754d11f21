"""Provider configurations (admin API) and users' own provider keys, end to end.

A real parley on loopback in front of a real fake OpenAI upstream, on SQLite and
PostgreSQL: configurations are managed over HTTP, clients route through them with the
official SDK, users bring their own keys; a canary key is then looked for everywhere it
must not be (logs, every table's rows, responses, error bodies).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import sqlalchemy as sa

from parley.errors import ConfigError
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, wait_for, write_config

CANARY = "sk-canary-PROVIDER-KEY-9d8e7f6a5b4c"
BYOK = "sk-canary-BYOK-KEY-1a2b3c4d5e6f"
MASTER = "parley-master-test-key"
HOUSE = {
    "name": "house",
    "kind": "openai",
    "model": "gpt-4o-mini",
    "system_prompt": "Answer in French.",
    "temperature": 0.3,
    "max_tokens": 64,
    "extra": {"seed": 7},
}


@pytest.fixture
def upstream() -> Iterator[FakeOpenAI]:
    # The canary is the only key it accepts; a wrong one is echoed in its 401.
    with FakeOpenAI(api_key=CANARY) as fake:
        yield fake


def start(tmp_path: Path, database_url: str, upstream: FakeOpenAI, **env: str) -> ParleyServer:
    write_config(
        tmp_path,
        [
            {
                "name": "up",
                "kind": "openai",
                "base_url": upstream.base_url,
                "api_key": "sk-configured-not-the-canary",
                "models": ["gpt-4o-mini"],
            }
        ],
        aliases={"fast": ["up/gpt-4o-mini"]},
        extra="[retry]\nattempts = 1\n",
    )
    return ParleyServer(settings_for(tmp_path, database_url, **env)).start()


@pytest.fixture
def server(tmp_path: Path, database_url: str, upstream: FakeOpenAI) -> Iterator[ParleyServer]:
    running = start(tmp_path, database_url, upstream)
    try:
        yield running
    finally:
        running.stop()


def api(server: ParleyServer, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.root, headers=headers, timeout=10)


def create(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    response = http.post("/api/admin/providers", json={**HOUSE, **fields})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def error_of(response: httpx.Response) -> str:
    message: str = response.json()["error"]["message"]
    return message


def dump_every_table(database_url: str) -> str:
    engine = sa.create_engine(database_url)
    try:
        names = sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()
    return "\n".join(
        repr(row) for name in names for row in rows(database_url, f'SELECT * FROM "{name}"')
    )


def test_admin_crud(server: ParleyServer, upstream: FakeOpenAI) -> None:
    with api(server) as http:
        assert http.get("/api/admin/providers").json() == {"data": [], "has_more": False}
        created = create(http, api_key=CANARY)
        assert created["has_api_key"] is True and "api_key" not in created
        assert created["base_url"] == "https://api.openai.com/v1"  # the kind's
        assert created["is_active"] is True and created["extra"] == {"seed": 7}
        assert uuid.UUID(created["id"])
        # An active configuration is a model clients may name: /v1/models lists it.
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert listed[HOUSE["name"]]["owned_by"] == "parley"
        path = f"/api/admin/providers/{created['id']}"
        assert http.get(path).json() == created
        assert http.get("/api/admin/providers").json()["data"] == [created]

        changed = http.patch(
            path, json={"base_url": upstream.base_url, "temperature": None, "top_p": 0.9}
        ).json()
        assert changed["base_url"] == upstream.base_url
        assert (changed["temperature"], changed["top_p"]) == (None, 0.9)
        assert changed["has_api_key"] is True  # untouched when absent
        cleared = http.patch(path, json={"api_key": None, "base_url": None}).json()
        assert cleared["has_api_key"] is False
        assert cleared["base_url"] == "https://api.openai.com/v1"

        assert http.delete(path).status_code == 204
        for method in ("GET", "PATCH", "DELETE"):
            assert http.request(method, path, json={}).status_code == 404
        assert http.get("/api/admin/providers/not-a-uuid").status_code == 404
        assert http.get("/api/admin/providers").json()["data"] == []


REFUSALS: list[tuple[dict[str, Any], str]] = [
    ({"kind": "cohere"}, "'kind' must be one of"),
    ({"name": "up"}, "already a provider, alias or model of the config file"),
    ({"name": "fast"}, "already a provider, alias or model of the config file"),
    ({"name": "gpt-4o-mini"}, "already a provider, alias or model of the config file"),
    ({"name": "a/b"}, "may not contain '/'"),
    ({"name": ""}, "non-empty string"),
    ({"model": None}, "required: model"),
    ({"temperature": 3}, "between 0 and 2"),
    ({"temperature": True}, "must be a number"),
    ({"max_tokens": 0}, "integer from 1 to 2147483647, or null"),
    ({"max_tokens": 2**31}, "integer from 1 to 2147483647, or null"),
    ({"base_url": "ftp://x"}, "http(s) URL"),
    ({"extra": {"model": "x"}}, "may not set model"),
    ({"extra": [1]}, "JSON object"),
    ({"is_active": "yes"}, "boolean"),
    ({"colour": "blue"}, "unknown field(s): 'colour'"),
]


def test_invalid_configurations_are_refused_clearly(server: ParleyServer) -> None:
    with api(server) as http:
        for fields, complaint in REFUSALS:
            response = http.post("/api/admin/providers", json={**HOUSE, **fields})
            assert response.status_code == 400, fields
            assert complaint in error_of(response), (fields, error_of(response))
        config = create(http)
        path = f"/api/admin/providers/{config['id']}"
        for fields, complaint in REFUSALS:
            if "model" in fields:
                complaint = "may not be null"
            response = http.patch(path, json=fields)
            assert response.status_code == 400, fields
            assert complaint in error_of(response), (fields, error_of(response))
        assert http.get(path).json() == config


def test_a_taken_name_is_refused(server: ParleyServer) -> None:
    with api(server) as http:
        create(http)
        other = create(http, name="other")
        response = http.post("/api/admin/providers", json=HOUSE)
        assert response.status_code == 400 and "already exists" in error_of(response)
        response = http.patch(f"/api/admin/providers/{other['id']}", json={"name": "house"})
        assert response.status_code == 400 and "already exists" in error_of(response)


def test_routing_through_a_configuration_with_its_key_and_defaults(
    server: ParleyServer, upstream: FakeOpenAI, database_url: str
) -> None:
    with api(server) as http:
        create(http, base_url=upstream.base_url, api_key=CANARY)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)

    reply = client.chat.completions.create(
        model="house", messages=[{"role": "user", "content": "bonjour"}]
    )
    assert reply.choices[0].message.content == "echo: bonjour"
    [(_, headers, body)] = upstream.received
    assert headers["Authorization"] == f"Bearer {CANARY}"
    assert body["model"] == "gpt-4o-mini"
    assert body["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.3, 64, 7)

    # Streaming, another model of the same configuration, the request's own settings.
    upstream.clear()
    stream = client.chat.completions.create(
        model="house/gpt-4o",
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "a"}],
        temperature=1.5,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "echo: a"
    [(_, _, body)] = upstream.received
    assert body["model"] == "gpt-4o" and body["temperature"] == 1.5
    assert [m["role"] for m in body["messages"]] == ["system", "user"]

    requests = rows(database_url, "SELECT provider, model, success FROM request_log ORDER BY id")
    assert [(r["provider"], r["model"]) for r in requests] == [
        ("house", "gpt-4o-mini"),
        ("house", "gpt-4o"),
    ]
    assert all(r["success"] for r in requests)

    # An inactive configuration is not a provider.
    with api(server) as http:
        config_id = http.get("/api/admin/providers").json()["data"][0]["id"]
        http.patch(f"/api/admin/providers/{config_id}", json={"is_active": False})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="house", messages=[{"role": "user", "content": "x"}])


def test_deleting_a_configuration_keeps_the_history_that_used_it(
    server: ParleyServer, upstream: FakeOpenAI, database_url: str
) -> None:
    with api(server) as http:
        config = create(http, base_url=upstream.base_url, api_key=CANARY)
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    client.chat.completions.create(model="house", messages=[{"role": "user", "content": "hi"}])
    [conversation] = rows(database_url, "SELECT id FROM conversations")
    [stored] = rows(database_url, "SELECT id FROM provider_configs")
    # The chat API links conversations to their configuration; do what it does.
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text("UPDATE conversations SET provider_config_id = :c WHERE id = :id"),
                {"c": stored["id"], "id": conversation["id"]},
            )
    finally:
        engine.dispose()

    with api(server) as http:
        assert http.delete(f"/api/admin/providers/{config['id']}").status_code == 204

    [kept] = rows(database_url, "SELECT id, provider_config_id FROM conversations")
    assert kept == {"id": conversation["id"], "provider_config_id": None}
    assert len(rows(database_url, "SELECT id FROM messages")) == 2
    [request] = rows(database_url, "SELECT provider FROM request_log")
    assert request["provider"] == "house"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="house", messages=[{"role": "user", "content": "x"}])


def test_another_process_picks_up_a_new_configuration(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    first = start(tmp_path, database_url, upstream)
    second = start(tmp_path, database_url, upstream)
    try:
        client = openai.OpenAI(base_url=second.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(
                model="house", messages=[{"role": "user", "content": "x"}]
            )
        with api(first) as http:
            create(http, base_url=upstream.base_url, api_key=CANARY)

        def answered() -> bool:
            try:
                client.chat.completions.create(
                    model="house", messages=[{"role": "user", "content": "y"}]
                )
            except openai.NotFoundError:
                return False
            return True

        assert wait_for(answered, timeout=10, interval=0.5)
    finally:
        second.stop()
        first.stop()


def test_users_bring_their_own_keys(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = start(tmp_path, database_url, upstream, PARLEY_MASTER_KEY=MASTER)
    try:
        with api(server, MASTER) as admin:
            keys = {}
            for name in ("ada", "bob"):
                made = admin.post(
                    "/api/admin/users",
                    json={"email": f"{name}@example.com", "username": name, "password": "pw" * 8},
                )
                assert made.status_code == 201, made.text
                key = admin.post("/api/keys", json={"name": "k", "user": name})
                assert key.status_code == 201, key.text
                keys[name] = key.json()["key"]
            # The master key is an admin without a user: no keys of its own.
            assert admin.get("/api/me/provider-keys").json()["data"] == []
            refused = admin.put("/api/me/provider-keys/up", json={"api_key": BYOK})
            assert refused.status_code == 400 and BYOK not in refused.text

        with api(server, keys["ada"]) as ada:
            # Users do not see the admin routes.
            assert ada.get("/api/admin/providers").status_code == 404
            assert ada.post("/api/admin/providers", json=HOUSE).status_code == 404
            unknown = ada.put("/api/me/provider-keys/nowhere", json={"api_key": CANARY})
            assert unknown.status_code == 404 and CANARY not in unknown.text
            put = ada.put("/api/me/provider-keys/up", json={"api_key": CANARY})
            assert put.status_code == 200, put.text
            assert set(put.json()) == {"provider", "created_at", "updated_at"}
            listed = ada.get("/api/me/provider-keys").json()["data"]
            assert [k["provider"] for k in listed] == ["up"] and CANARY not in str(listed)

        chat = {"model": "up/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        ada_client = openai.OpenAI(base_url=server.base_url, api_key=keys["ada"], max_retries=0)
        reply = ada_client.chat.completions.create(**chat)  # type: ignore[call-overload]
        assert reply.choices[0].message.content == "echo: hi"
        assert upstream.received[-1][1]["Authorization"] == f"Bearer {CANARY}"

        # Bob gets the configured key, which the upstream refuses (and echoes).
        with api(server, keys["bob"]) as bob:
            refused = bob.post("/v1/chat/completions", json=chat)
            assert refused.status_code == 502
            assert "sk-configured-not-the-canary" not in refused.text
            assert "[redacted]" in refused.text
            assert bob.get("/api/me/provider-keys").json()["data"] == []
            assert bob.delete("/api/me/provider-keys/up").status_code == 404
        assert upstream.received[-1][1]["Authorization"] == "Bearer sk-configured-not-the-canary"

        with api(server, keys["ada"]) as ada:
            # A wrong key of her own is scrubbed from her error too.
            wrong = BYOK
            assert ada.put("/api/me/provider-keys/up", json={"api_key": wrong}).status_code == 200
            refused = ada.post("/v1/chat/completions", json=chat)
            assert refused.status_code == 502 and wrong not in refused.text
            assert upstream.received[-1][1]["Authorization"] == f"Bearer {wrong}"
            assert ada.delete("/api/me/provider-keys/up").status_code == 204
            assert ada.get("/api/me/provider-keys").json()["data"] == []
            ada.post("/v1/chat/completions", json=chat)
            assert upstream.received[-1][1]["Authorization"] != f"Bearer {wrong}"
    finally:
        server.stop()
    for secret in (CANARY, BYOK):
        assert secret not in caplog.text
        assert secret not in dump_every_table(database_url)


def test_canary_key_is_never_shown(
    server: ParleyServer,
    upstream: FakeOpenAI,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    with api(server) as http:
        created = http.post(
            "/api/admin/providers",
            json={**HOUSE, "base_url": upstream.base_url, "api_key": CANARY + "-wrong"},
        )
        seen.append(created.text)
        path = f"/api/admin/providers/{created.json()['id']}"
        # Refused inputs that carry the canary: the error never repeats it.
        for bad in (
            http.patch(path, json={"api_key": CANARY + "\n"}),
            http.patch(path, json={"api_key": CANARY, "kind": "nope"}),
            http.post(
                "/api/admin/providers",
                content=b'{"name": "x", "api_key": "' + CANARY.encode() + b'"',
            ),
        ):
            assert bad.status_code == 400
            seen.append(bad.text)
        # The upstream refuses the wrong key and names it: scrubbed in the client's error.
        refused = http.post(
            "/v1/chat/completions",
            json={"model": "house", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert refused.status_code == 502 and "[redacted]" in refused.text
        seen.append(refused.text)
        streamed = http.post(
            "/v1/chat/completions",
            json={"model": "house", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        )
        seen.append(streamed.text)
        seen.append(http.patch(path, json={"api_key": CANARY}).text)
        seen.append(http.get(path).text)
        seen.append(http.get("/api/admin/providers").text)
        ok = http.post(
            "/v1/chat/completions",
            json={"model": "house", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert ok.status_code == 200
        seen.append(ok.text)
    assert upstream.received[-1][1]["Authorization"] == f"Bearer {CANARY}"
    for text in seen:
        assert CANARY not in text
    assert CANARY not in caplog.text
    assert CANARY not in dump_every_table(database_url)
    [stored] = rows(database_url, "SELECT api_key_ciphertext FROM provider_configs")
    assert stored["api_key_ciphertext"].startswith("v1.")


def test_a_key_file_others_may_read_stops_the_server(
    tmp_path: Path, database_url: str, upstream: FakeOpenAI
) -> None:
    key_file = tmp_path / "data" / "secret.key"
    start(tmp_path, database_url, upstream).stop()  # first run: made with mode 0600
    assert key_file.stat().st_mode & 0o777 == 0o600
    key_file.chmod(0o644)
    server = ParleyServer(settings_for(tmp_path, database_url))
    try:
        with pytest.raises(ConfigError, match="may be read by other users"):
            server.start()
    finally:
        server.stop()


def test_a_conversation_made_on_a_configuration_uses_it(
    server: ParleyServer, upstream: FakeOpenAI, database_url: str
) -> None:
    with api(server) as http:
        create(http, base_url=upstream.base_url, api_key=CANARY)
        refused = http.post("/api/conversations", json={"provider_configuration": "nope"})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "provider_configuration"
        made = http.post("/api/conversations", json={"provider_configuration": "house"})
        assert made.status_code == 201, made.text
        conversation = made.json()
        assert conversation["default_model"] == "house"
        sent = http.post(
            f"/api/conversations/{conversation['id']}/messages",
            json={"content": "bonjour", "stream": False},
        )
        assert sent.status_code == 200, sent.text
    # The first call is the answer (a title may be asked for after it).
    _, _, body = upstream.received[0]
    assert body["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "bonjour"},
    ]
    [row] = rows(database_url, "SELECT provider_config_id FROM conversations")
    assert row["provider_config_id"] is not None
