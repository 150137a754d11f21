"""The world of the authorization matrix (``test_authorization_matrix.py``).

``build_world`` starts a real parley with ``PARLEY_MASTER_KEY`` in front of a fake OpenAI
upstream (provider ``up``), makes users through the master key's admin API (admin A0,
users A and B, user C who is then disabled), their API keys and web sessions, and gives
A things to own: a conversation made through the chat API (with an answer), one made by
``/v1`` traffic, an attachment, a BYOK provider key, request rows; plus a revoked key, an
expired key and an expired session of A. An admin provider configuration (``house``)
holds a key too; its own upstream takes only that key and names any other it gets, as
OpenAI does, so that the paths that scrub keys from errors (and log) are taken. Every
secret is a canary looked for afterwards in logs, rows and bodies.

``World.call`` is the only way the matrix talks to parley: one ``Caller`` (a channel with
its credentials), one request; every answer is kept for the canary search.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from parley.security import tokens
from parley.store.schema import api_keys, web_sessions
from tests.fakes.openai_upstream import FakeOpenAI
from tests.harness import ParleyServer, rows, settings_for, wait_for, write_config

MODEL = "up/gpt-4o-mini"
# Canaries: none may show up in plain text outside the request that carries it.
MASTER_KEY = "mk-canary-MASTER-3f9a1c7e5b2d4f60a8"
A_PASSWORD = "pw-canary-ALPHA-8c1e2f3a4b5d6e7f"
BYOK_KEY = "sk-canary-BYOK-ALPHA-6a5b4c3d2e1f0a9b"
CONFIG_KEY = "sk-canary-CONFIG-HOUSE-9e8d7c6b5a4f3e2d"
OTHER_PASSWORD = "an ordinary long password"
# What A's things say: none of it may reach B.
A_TITLE = "alpha-private-title-51f0"
A_TEXT = "alpha private chat text 7d2c"
A_API_TEXT = "alpha api question 0b9e"
A_FILE_NAME = "alpha-private-notes-33aa.txt"
A_FILE_BYTES = b"alpha private file bytes c4e1\n"
A_DOC_NAME = "alpha-private-handbook-7e21.md"
A_DOC_TEXT = "alpha private document text 9b3f"

DENIED, OTHER, OWNER, ADMIN, MASTER = "denied", "other", "owner", "admin", "master"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True)
class Caller:
    """One way of calling: a channel and its credentials."""

    name: str
    group: str  # DENIED (401), OTHER (user B), OWNER (user A), ADMIN (user A0), MASTER
    channel: str  # none | bearer | x-api-key | session
    secret: str = ""
    csrf: str = ""
    login: str = ""  # the username, to open a fresh session of the same user

    def headers(self, method: str) -> dict[str, str]:
        if self.channel == "bearer":
            return {"Authorization": f"Bearer {self.secret}"}
        if self.channel == "x-api-key":
            return {"x-api-key": self.secret}
        if self.channel == "session":
            headers = {"Cookie": f"parley_session={self.secret}"}
            if method in WRITES:
                headers["X-CSRF-Token"] = self.csrf
            return headers
        return {}


# Every caller of the matrix, by name and group (the credentials come with the world).
CALLERS: dict[str, str] = {
    "anonymous": DENIED,
    "unknown_key": DENIED,
    "A_revoked_bearer": DENIED,
    "A_revoked_xkey": DENIED,
    "A_expired_bearer": DENIED,
    "A_expired_xkey": DENIED,
    "A_expired_session": DENIED,
    "C_disabled_bearer": DENIED,
    "C_disabled_xkey": DENIED,
    "C_ended_session": DENIED,
    "B_bearer": OTHER,
    "B_xkey": OTHER,
    "B_session": OTHER,
    "A_bearer": OWNER,
    "A_session": OWNER,
    "A0_bearer": ADMIN,
    "A0_session": ADMIN,
    "master_bearer": MASTER,
    "master_xkey": MASTER,
}


class LogCapture(logging.Handler):
    """Every record of the parley and aiohttp loggers, at DEBUG, for the whole module (a
    ``caplog`` lives for one test only; the world outlives many)."""

    LOGGERS = ("parley", "aiohttp")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.lines: list[str] = []
        self._levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def __enter__(self) -> LogCapture:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            logger.setLevel(self._levels[name])

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class World:
    server: ParleyServer
    upstream: FakeOpenAI
    # The configuration's upstream: it takes only CONFIG_KEY and names a wrong key it gets.
    house_upstream: FakeOpenAI
    database_url: str
    logs: LogCapture
    http: httpx.Client
    callers: dict[str, Caller] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)  # target name -> public id
    plain_keys: dict[str, str] = field(default_factory=dict)  # every API key made
    session_tokens: list[str] = field(default_factory=list)
    # Every answer parley gave (bodies and headers but Set-Cookie), for the canary search.
    seen: list[str] = field(default_factory=list)
    creations: list[str] = field(default_factory=list)  # the answers that made the keys
    baseline: dict[str, Any] = field(default_factory=dict)
    requests: int = 0
    ran: set[str] = field(default_factory=set)  # the matrix cases done so far

    def call(self, caller: Caller | str, method: str, path: str, **kwargs: Any) -> httpx.Response:
        who = self.callers[caller] if isinstance(caller, str) else caller
        headers = {**who.headers(method), **kwargs.pop("headers", {})}
        # No cookie jar: a caller sends only its own credentials.
        self.http.cookies.clear()
        response = self.http.request(method, path, headers=headers, **kwargs)
        self.http.cookies.clear()
        self.requests += 1
        shown = {k: v for k, v in response.headers.items() if k.lower() != "set-cookie"}
        self.seen.append(f"{method} {path} -> {response.status_code}\n{shown}\n{response.text}")
        return response

    def ok(self, caller: str, method: str, path: str, status: int = 200, **kw: Any) -> Any:
        response = self.call(caller, method, path, **kw)
        assert response.status_code == status, (method, path, response.text)
        return response.json() if response.content else None

    # -- fresh things of A, for the calls that succeed and would spend A's own ----------

    def fresh_conversation(self, *, answered: bool = False) -> tuple[str, str | None]:
        """A new conversation of A (and the id of its answer, when ``answered``)."""
        made = self.ok(
            "A_bearer",
            "POST",
            "/api/conversations",
            201,
            json={"default_model": MODEL, "title": "fresh"},
        )
        if not answered:
            return made["id"], None
        sent = self.ok(
            "A_bearer",
            "POST",
            f"/api/conversations/{made['id']}/messages",
            json={"content": f"fresh question {uuid.uuid4().hex[:8]}", "stream": False},
        )
        return made["id"], sent["assistant_message"]["id"]

    def fresh_attachment(self) -> str:
        made = self.ok(
            "A_bearer",
            "POST",
            "/api/attachments",
            201,
            files={"file": ("fresh.txt", b"fresh bytes", "text/plain")},
        )
        return str(made["id"])

    def fresh_document(self) -> str:
        made = self.ok(
            "A_bearer",
            "POST",
            "/api/documents",
            201,
            files={"file": ("fresh.md", b"# fresh document", "text/markdown")},
            data={"collection": "fresh"},
        )
        return str(made["id"])

    def fresh_key(self) -> str:
        return str(self.ok("A_bearer", "POST", "/api/keys", 201, json={"name": "fresh"})["id"])

    def fresh_config(self) -> str:
        made = self.ok(
            "master_bearer",
            "POST",
            "/api/admin/providers",
            201,
            json={"name": f"cfg-{uuid.uuid4().hex[:10]}", "kind": "openai", "model": "m"},
        )
        return str(made["id"])

    def fresh_session(self, caller: Caller) -> Caller:
        """The same user in a new web session (for a logout that must not end the world's)."""
        password = A_PASSWORD if caller.login == "alpha" else OTHER_PASSWORD
        reply = self.http.post(
            "/api/auth/login", json={"login": caller.login, "password": password}
        )
        assert reply.status_code == 200, reply.text
        token = reply.cookies["parley_session"]
        self.http.cookies.clear()
        self.session_tokens.append(token)
        self.seen.append(reply.text)
        return replace(caller, secret=token, csrf=reply.json()["csrf_token"])

    # -- A's things, as the master key sees them -----------------------------------------

    def snapshot(self, family: str) -> Any:
        """What a denied write must leave exactly as it was."""
        ids = self.ids
        if family == "conversation":
            chat = self.ok("master_bearer", "GET", f"/api/conversations/{ids['chat']}")
            api = self.ok("master_bearer", "GET", f"/api/conversations/{ids['api']}")
            return [_tree(chat), _tree(api)]
        if family == "attachment":
            meta = self.ok("master_bearer", "GET", f"/api/attachments/{ids['attachment']}")
            content = self.call("master_bearer", "GET", f"/api/attachments/{meta['id']}/content")
            return meta, content.status_code, content.content
        if family == "document":
            document = self.ok("master_bearer", "GET", f"/api/documents/{ids['document']}")
            return {k: document[k] for k in ("id", "filename", "sha256", "conversation_id")}
        if family == "keys":
            listed = self.ok("master_bearer", "GET", "/api/admin/keys", params={"user": "alpha"})
            mine = {k["id"]: k["status"] for k in listed["data"] if k["id"] in self.baseline_keys}
            works = self.call("A_bearer", "GET", "/api/me").status_code
            return mine, works
        if family == "user":
            user = self.ok("master_bearer", "GET", f"/api/admin/users/{ids['user']}")
            return {k: user[k] for k in ("email", "username", "full_name", "role", "is_active")}
        if family == "provider_keys":
            listed = self.ok("A_bearer", "GET", "/api/me/provider-keys")["data"]
            return [k for k in listed if k["provider"] == "up"]
        if family == "config":
            return self.ok("master_bearer", "GET", f"/api/admin/providers/{ids['config']}")
        if family == "session":
            return self.call("A_session", "GET", "/api/me").status_code
        raise AssertionError(f"unknown snapshot family {family}")

    @property
    def baseline_keys(self) -> set[str]:
        return {self.ids[k] for k in ("key", "revoked_key", "expired_key", "late_key")}

    def assert_intact(self, family: str) -> None:
        assert self.snapshot(family) == self.baseline[family], f"A's {family} changed"

    def a_markers(self) -> list[str]:
        """Things of A that no answer to B may contain."""
        names = (
            "user",
            "chat",
            "api",
            "user_message",
            "answer",
            "attachment",
            "document",
            "key",
            "late_key",
        )
        return [
            *(self.ids[n] for n in names),
            self.ids["key_prefix"],
            A_TITLE,
            A_TEXT,
            A_FILE_NAME,
            A_FILE_BYTES.decode().strip(),
            A_DOC_NAME,
            A_DOC_TEXT,
            "alpha@example.org",
            "alpha",
        ]


def _tree(conversation: dict[str, Any]) -> dict[str, Any]:
    keep = ("title", "archived", "pinned", "is_active", "system_prompt", "default_model")
    return {
        **{k: conversation[k] for k in keep},
        "messages": [(m["id"], m["role"], m["content"]) for m in conversation["messages"]],
        "active_leaf_id": conversation["active_leaf_id"],
    }


# -- building the world ------------------------------------------------------------------


@dataclass
class _Maker:
    world: World

    def user(self, username: str, password: str, role: str = "user") -> dict[str, Any]:
        body = {
            "email": f"{username}@example.org",
            "username": username,
            "password": password,
            "full_name": f"{username.title()} Person",
            "role": role,
        }
        made: dict[str, Any] = self.world.ok(
            "master_bearer", "POST", "/api/admin/users", 201, json=body
        )
        return made

    def key(self, username: str, name: str, **extra: Any) -> dict[str, Any]:
        body = {"name": name, "user": username, **extra}
        made: dict[str, Any] = self.world.ok("master_bearer", "POST", "/api/keys", 201, json=body)
        self.world.plain_keys[f"{username}/{name}"] = made["key"]
        # The one answer that shows the key, by design: kept apart from the others.
        self.world.creations.append(self.world.seen.pop())
        return made

    def login(self, username: str, password: str) -> tuple[str, str]:
        reply = self.world.http.post(
            "/api/auth/login", json={"login": username, "password": password}
        )
        assert reply.status_code == 200, reply.text
        token = reply.cookies["parley_session"]
        self.world.http.cookies.clear()
        self.world.session_tokens.append(token)
        self.world.seen.append(reply.text)
        return token, str(reply.json()["csrf_token"])


@contextmanager
def build_world(tmp_path: Path, database_url: str) -> Iterator[World]:
    """The running server with everything in place; stopped on exit."""
    with LogCapture() as logs, FakeOpenAI() as upstream, FakeOpenAI(api_key=CONFIG_KEY) as house:
        write_config(
            tmp_path,
            [
                {
                    "name": "up",
                    "kind": "openai",
                    "base_url": upstream.base_url,
                    "models": ["gpt-4o-mini"],
                    "list_models": False,
                }
            ],
            extra="[retry]\nattempts = 1\n",
        )
        settings = settings_for(tmp_path, database_url, PARLEY_MASTER_KEY=MASTER_KEY)
        server = ParleyServer(settings).start()
        try:
            with httpx.Client(base_url=server.root, timeout=30) as http:
                world = World(server, upstream, house, database_url, logs, http)
                _populate(world)
                yield world
        finally:
            server.stop()


def _populate(w: World) -> None:
    w.callers["master_bearer"] = Caller("master_bearer", MASTER, "bearer", MASTER_KEY)
    w.callers["master_xkey"] = Caller("master_xkey", MASTER, "x-api-key", MASTER_KEY)
    w.callers["anonymous"] = Caller("anonymous", DENIED, "none")
    make = _Maker(w)
    make.user("a0admin", OTHER_PASSWORD, role="admin")
    alpha = make.user("alpha", A_PASSWORD)
    make.user("bravo", OTHER_PASSWORD)
    charlie = make.user("charlie", OTHER_PASSWORD)
    keys = {
        "A": make.key("alpha", "main"),
        "A_revoked": make.key("alpha", "revoked"),
        "A_expired": make.key("alpha", "expired", expires_in_days=1),
        "B": make.key("bravo", "main"),
        "A0": make.key("a0admin", "main"),
        "C": make.key("charlie", "main"),
        # Newer than B's key: B's keys come before it in the order of keys.
        "A_late": make.key("alpha", "late"),
    }
    w.ok("master_bearer", "DELETE", f"/api/keys/{keys['A_revoked']['id']}")
    past = datetime.now(UTC) - timedelta(minutes=1)
    _set_expiry(
        w.database_url, api_keys, api_keys.c.public_id == uuid.UUID(keys["A_expired"]["id"]), past
    )
    sessions = {
        "A": make.login("alpha", A_PASSWORD),
        "A_old": make.login("alpha", A_PASSWORD),
        "B": make.login("bravo", OTHER_PASSWORD),
        "A0": make.login("a0admin", OTHER_PASSWORD),
        "C": make.login("charlie", OTHER_PASSWORD),
    }
    old = web_sessions.c.token_hash == tokens.digest(sessions["A_old"][0])
    _set_expiry(w.database_url, web_sessions, old, past)
    # Disabling C ends C's sessions and refuses C's keys.
    w.ok("master_bearer", "PATCH", f"/api/admin/users/{charlie['id']}", json={"is_active": False})

    a_key = keys["A"]["key"]
    # Well formed, and nearly A's key: an echo of it would show.
    unknown = a_key[:-4] + ("AAAA" if not a_key.endswith("AAAA") else "BBBB")
    for name, channel, secret, csrf, login in (
        ("unknown_key", "bearer", unknown, "", ""),
        ("A_revoked_bearer", "bearer", keys["A_revoked"]["key"], "", ""),
        ("A_revoked_xkey", "x-api-key", keys["A_revoked"]["key"], "", ""),
        ("A_expired_bearer", "bearer", keys["A_expired"]["key"], "", ""),
        ("A_expired_xkey", "x-api-key", keys["A_expired"]["key"], "", ""),
        ("A_expired_session", "session", *sessions["A_old"], "alpha"),
        ("C_disabled_bearer", "bearer", keys["C"]["key"], "", ""),
        ("C_disabled_xkey", "x-api-key", keys["C"]["key"], "", ""),
        ("C_ended_session", "session", *sessions["C"], "charlie"),
        ("B_bearer", "bearer", keys["B"]["key"], "", ""),
        ("B_xkey", "x-api-key", keys["B"]["key"], "", ""),
        ("B_session", "session", *sessions["B"], "bravo"),
        ("A_bearer", "bearer", a_key, "", ""),
        ("A_session", "session", *sessions["A"], "alpha"),
        ("A0_bearer", "bearer", keys["A0"]["key"], "", ""),
        ("A0_session", "session", *sessions["A0"], "a0admin"),
    ):
        w.callers[name] = Caller(name, CALLERS[name], channel, secret, csrf, login)
    assert set(w.callers) == set(CALLERS)

    _give_a_things(w)
    _provoke_logs(w)
    w.ids.update(
        user=alpha["id"],
        key=keys["A"]["id"],
        key_prefix=keys["A"]["prefix"],
        revoked_key=keys["A_revoked"]["id"],
        expired_key=keys["A_expired"]["id"],
        late_key=keys["A_late"]["id"],
        missing=str(uuid.uuid4()),
    )
    families = (
        "conversation",
        "attachment",
        "document",
        "keys",
        "user",
        "provider_keys",
        "config",
        "session",
    )
    w.baseline = {family: w.snapshot(family) for family in families}
    assert w.baseline["keys"][0] == {
        keys["A"]["id"]: "active",
        keys["A_revoked"]["id"]: "revoked",
        keys["A_expired"]["id"]: "expired",
        keys["A_late"]["id"]: "active",
    }


def _give_a_things(w: World) -> None:
    """A's conversations (chat API and /v1), attachment, BYOK key; the admin's
    configuration with its key."""
    w.ok("A_bearer", "PUT", "/api/me/provider-keys/up", json={"api_key": BYOK_KEY})
    chat = w.ok(
        "A_bearer",
        "POST",
        "/api/conversations",
        201,
        json={"default_model": MODEL, "title": A_TITLE, "system_prompt": "Be brief."},
    )
    attachment = w.ok(
        "A_bearer",
        "POST",
        "/api/attachments",
        201,
        files={"file": (A_FILE_NAME, A_FILE_BYTES, "text/plain")},
        data={"conversation_id": chat["id"]},
    )
    sent = w.ok(
        "A_bearer",
        "POST",
        f"/api/conversations/{chat['id']}/messages",
        json={"content": A_TEXT, "attachments": [attachment["id"]], "stream": False},
    )
    assert [a["id"] for a in sent["user_message"]["attachments"]] == [attachment["id"]]
    document = w.ok(
        "A_bearer",
        "POST",
        "/api/documents",
        201,
        files={"file": (A_DOC_NAME, f"# Handbook\n\n{A_DOC_TEXT}\n".encode(), "text/markdown")},
        data={"conversation_id": chat["id"]},
    )
    body = {"model": MODEL, "messages": [{"role": "user", "content": A_API_TEXT}]}
    answer = w.ok("A_bearer", "POST", "/v1/chat/completions", json=body)
    listed = w.ok("A_bearer", "GET", "/api/conversations")["data"]
    [api] = [c["id"] for c in listed if c["source"] == "api"]
    # A's requests go out with A's own key.
    assert upstream_key(w, A_API_TEXT) == BYOK_KEY
    house = w.ok(
        "master_bearer",
        "POST",
        "/api/admin/providers",
        201,
        json={
            "name": "house",
            "kind": "openai",
            "model": "gpt-4o-mini",
            "base_url": w.house_upstream.base_url,
            # Wrong at first: the upstream names it in its refusal.
            "api_key": CONFIG_KEY + "-first",
        },
    )
    question = "through the house configuration"
    used = {"model": "house", "messages": [{"role": "user", "content": question}]}
    refused = w.call("master_bearer", "POST", "/v1/chat/completions", json=used)
    assert refused.status_code == 502 and "[redacted]" in refused.text, refused.text
    path = f"/api/admin/providers/{house['id']}"
    w.ok("master_bearer", "PATCH", path, json={"api_key": CONFIG_KEY})
    w.ok("master_bearer", "POST", "/v1/chat/completions", json=used)
    assert upstream_key(w, question) == CONFIG_KEY
    w.ids.update(
        chat=chat["id"],
        user_message=sent["user_message"]["id"],
        answer=sent["assistant_message"]["id"],
        attachment=attachment["id"],
        document=document["id"],
        api=api,
        api_answer=answer["choices"][0]["message"]["content"],
        config=house["id"],
    )
    request_rows = rows(w.database_url, "SELECT count(*) AS n FROM request_log")
    assert request_rows[0]["n"] >= 3


def _provoke_logs(w: World) -> None:
    """Upstream failures with A's BYOK key and the configuration's key in use, and a
    client that leaves mid-stream: the paths that log, for the canary search."""
    for caller, model in (
        ("A_bearer", "up/error-mid"),
        ("A_bearer", "up/reset-mid"),
        ("A_bearer", "up/malformed"),
        ("A_bearer", "up/fail-401"),
        ("master_bearer", "house/error-mid"),
        ("master_bearer", "house/fail-500"),
    ):
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "x"}]}
        w.call(caller, "POST", "/v1/chat/completions", json=body)
    conversation, _ = w.fresh_conversation()
    path = f"/api/conversations/{conversation}/messages"
    w.call("A_bearer", "POST", path, json={"content": "x", "model": "up/reset-mid"})
    # A's own key for the configuration is one its upstream refuses, and names.
    w.ok("A_bearer", "PUT", "/api/me/provider-keys/house", json={"api_key": BYOK_KEY})
    body = {"model": "house", "messages": [{"role": "user", "content": "x"}]}
    refused = w.call("A_bearer", "POST", "/v1/chat/completions", json=body)
    assert refused.status_code == 502 and "[redacted]" in refused.text, refused.text
    # A conversation whose title is asked of that model fails in the background (logged).
    made = w.ok("A_bearer", "POST", "/api/conversations", 201, json={"default_model": "house"})
    sent = {"content": "untitled", "model": MODEL, "stream": False}
    w.ok("A_bearer", "POST", f"/api/conversations/{made['id']}/messages", json=sent)
    wait_for(lambda: "no title" in w.logs.text)
    w.ok("A_bearer", "DELETE", "/api/me/provider-keys/house", 204)
    headers = w.callers["A_bearer"].headers("POST")
    body = {
        "model": "up/slow-stream",
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    with w.http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as stream:
        next(stream.iter_bytes())  # then gone


def upstream_key(w: World, text: str) -> str | None:
    """The key parley sent upstream with the (last) request whose messages hold ``text``."""
    for _, headers, body in reversed(w.upstream.received + w.house_upstream.received):
        if text in str(body):
            auth = headers.get("Authorization", "")
            return auth.removeprefix("Bearer ") or None
    raise AssertionError(f"the upstream never got {text!r}")


def _set_expiry(database_url: str, table: sa.Table, where: Any, moment: datetime) -> None:
    engine = sa.create_engine(database_url)
    try:
        with engine.begin() as conn:
            done = conn.execute(sa.update(table).where(where).values(expires_at=moment))
            assert done.rowcount == 1
    finally:
        engine.dispose()


def dump_tables(database_url: str) -> str:
    """Every row of every table of the database, as text."""
    engine = sa.create_engine(database_url)
    try:
        names = sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            return "\n".join(
                f"{name}: {row!r}"
                for name in names
                for row in conn.execute(sa.text(f'SELECT * FROM "{name}"'))
            )
    finally:
        engine.dispose()
