"""``parley export`` and ``parley import`` through click, against real databases."""

from __future__ import annotations

import io
import os
import stat
import threading
import uuid
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from click.testing import CliRunner, Result

from parley.cli.transfer import export_command, import_command
from parley.ops.migrate import upgrade
from parley.settings import Settings
from parley.store.schema import users

DOC: dict[str, Any] = {
    "format": "parley",
    "version": 1,
    "conversations": [
        {
            "id": "c",
            "title": "From the CLI",
            "created_at": "2024-02-02T12:00:00Z",
            "updated_at": "2024-02-02T12:00:02Z",
            "system_prompt": "Be kind.",
            "active_leaf_id": "2",
            "messages": [
                {
                    "id": "1",
                    "parent_id": None,
                    "created_at": "2024-02-02T12:00:00Z",
                    "message": {"role": "user", "content": "ping"},
                },
                {
                    "id": "2",
                    "parent_id": "1",
                    "created_at": "2024-02-02T12:00:01Z",
                    "model": "gpt-4o-mini",
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": "pong"},
                },
                {
                    "id": "3",
                    "parent_id": "1",
                    "created_at": "2024-02-02T12:00:02Z",
                    "message": {"role": "assistant", "content": "PONG"},
                },
            ],
        }
    ],
}

CHATGPT = [
    {
        "title": "Zipped",
        "create_time": 1_700_000_000.0,
        "current_node": "b",
        "mapping": {
            "a": {
                "id": "a",
                "parent": None,
                "children": ["b"],
                "message": {
                    "author": {"role": "user"},
                    "content": {"content_type": "text", "parts": ["hello"]},
                },
            },
            "b": {
                "id": "b",
                "parent": "a",
                "children": [],
                "message": {
                    "author": {"role": "assistant"},
                    "content": {"content_type": "text", "parts": ["hi"]},
                },
            },
        },
    }
]


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Settings read parley.toml from the working directory: keep the repository's out.
    monkeypatch.chdir(tmp_path)


def run(tmp_path: Path, database_url: str, command: Any, *args: str) -> Result:
    env = {"DATABASE_URL": database_url, "PARLEY_DATA_DIR": str(tmp_path / "data")}
    return CliRunner().invoke(command, list(args), env=env)


def write(path: Path, body: Any) -> str:
    path.write_bytes(orjson.dumps(body))
    return str(path)


def add_user(database_url: str, name: str) -> None:
    engine = sa.create_engine(database_url)
    now = datetime.now(UTC)
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(users).values(
                    public_id=uuid.uuid4(),
                    email=f"{name}@example.com",
                    username=name,
                    password_hash="not-a-real-hash",
                    role="user",
                    is_active=True,
                    preferences="{}",
                    created_at=now,
                    updated_at=now,
                )
            )
    finally:
        engine.dispose()


def shape(document: dict[str, Any]) -> list[Any]:
    return [
        (c["title"], c["system_prompt"], [(m["message"], m.get("model")) for m in c["messages"]])
        for c in document["conversations"]
    ]


def test_import_then_export_round_trip(
    tmp_path: Path, database_url: str, settings: Settings
) -> None:
    upgrade(settings)
    imported = run(tmp_path, database_url, import_command, write(tmp_path / "in.json", DOC))
    assert imported.exit_code == 0, imported.output
    [conv_id] = imported.stdout.split()
    assert imported.stderr == "imported 1 conversation(s)\n"

    out = tmp_path / "out.json"
    exported = run(tmp_path, database_url, export_command, "--out", str(out))
    assert exported.exit_code == 0, exported.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    document = orjson.loads(out.read_bytes())
    assert shape(document) == shape(DOC)
    [conv] = document["conversations"]
    assert conv["id"] == conv_id
    assert conv["active_leaf_id"] == conv["messages"][1]["id"]

    # To stdout, as OpenAI JSONL along the active branch, one conversation by id.
    jsonl = run(
        tmp_path, database_url, export_command, "--conversation", conv_id, "--format", "jsonl"
    )
    assert jsonl.exit_code == 0
    assert orjson.loads(jsonl.stdout_bytes) == {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "ping"},
            {"role": "assistant", "content": "pong"},
        ]
    }
    # Its own export imports back (from stdin).
    again = CliRunner().invoke(
        import_command,
        ["-"],
        input=out.read_bytes(),
        env={"DATABASE_URL": database_url, "PARLEY_DATA_DIR": str(tmp_path / "data")},
    )
    assert again.exit_code == 0, again.output
    both = run(tmp_path, database_url, export_command)
    assert shape(orjson.loads(both.stdout_bytes)) == shape(DOC) * 2


def test_users_and_chatgpt_zip(tmp_path: Path, database_url: str, settings: Settings) -> None:
    upgrade(settings)
    add_user(database_url, "alice")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("export/conversations.json", orjson.dumps(CHATGPT))
        zipped.writestr("export/chat.html", "<html></html>")
    zip_path = tmp_path / "chatgpt-export.zip"
    zip_path.write_bytes(archive.getvalue())

    imported = run(tmp_path, database_url, import_command, str(zip_path), "--user", "alice")
    assert imported.exit_code == 0, imported.output
    [conv_id] = imported.stdout.split()

    mine = run(tmp_path, database_url, export_command, "--user", "alice@example.com")
    [conv] = orjson.loads(mine.stdout_bytes)["conversations"]
    assert (conv["id"], conv["title"]) == (conv_id, "Zipped")
    assert [m["message"]["content"] for m in conv["messages"]] == ["hello", "hi"]
    nobody = run(tmp_path, database_url, export_command)
    assert orjson.loads(nobody.stdout_bytes)["conversations"] == []

    # Someone else's conversation is not found under another user.
    add_user(database_url, "bob")
    refused = run(
        tmp_path, database_url, export_command, "--user", "bob", "--conversation", conv_id
    )
    assert refused.exit_code == 1 and refused.stderr.startswith("error: no such conversation")


def test_errors_are_one_line_without_traceback(
    tmp_path: Path, database_url: str, settings: Settings
) -> None:
    doc = write(tmp_path / "in.json", DOC)
    not_migrated = run(tmp_path, database_url, import_command, doc)
    assert not_migrated.exit_code == 1
    assert not_migrated.stderr == (
        "error: the database has no parley schema yet: run `parley db upgrade` first\n"
    )
    upgrade(settings)
    cases = [
        ((import_command, str(tmp_path / "in.json"), "--user", "nobody"), "no user with"),
        ((import_command, write(tmp_path / "bad.json", {"format": "x"})), "not an export"),
        ((import_command, doc, "--format", "chatgpt"), "not a ChatGPT export"),
        ((export_command, "--conversation", "nope"), "no such conversation"),
        ((export_command, "--user", "nobody"), "no user with"),
    ]
    for (command, *args), message in cases:
        result = run(tmp_path, database_url, command, *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert "Traceback" not in result.output and result.stderr.count("\n") == 1


def test_files_that_cannot_be_read_or_written_are_one_line(
    tmp_path: Path, database_url: str, settings: Settings
) -> None:
    upgrade(settings)
    directory = tmp_path / "a-directory"
    directory.mkdir()
    missing = tmp_path / "no-such-dir" / "x.json"
    cases = [
        ((export_command, "--out", str(missing)), f"cannot write {missing}: No such file"),
        ((export_command, "--out", str(directory)), f"cannot write {directory}: Is a directory"),
        ((import_command, str(tmp_path / "gone.json")), "cannot read"),
        ((import_command, str(directory)), f"cannot read {directory}: Is a directory"),
    ]
    for (command, *args), message in cases:
        result = run(tmp_path, database_url, command, *args)
        assert (result.exit_code, result.stdout) == (1, ""), (args, result.output)
        assert result.stderr.startswith(f"error: {message}"), result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert not missing.parent.exists()


def test_export_makes_an_existing_file_private_and_leaves_a_pipe_alone(
    tmp_path: Path, database_url: str, settings: Settings
) -> None:
    upgrade(settings)
    assert (
        run(tmp_path, database_url, import_command, write(tmp_path / "in.json", DOC)).exit_code == 0
    )
    shared = tmp_path / "pub.json"
    shared.write_bytes(b"an older, longer file that was readable by everyone" * 100)
    shared.chmod(0o644)
    exported = run(tmp_path, database_url, export_command, "--out", str(shared))
    assert exported.exit_code == 0, exported.output
    assert stat.S_IMODE(shared.stat().st_mode) == 0o600
    assert shape(orjson.loads(shared.read_bytes())) == shape(DOC)  # replaced, not appended

    # A pipe is written to, its mode untouched (as /dev/stdout or /dev/null would be).
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    pipe.chmod(0o644)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_bytes()), daemon=True)
    reader.start()
    piped = run(tmp_path, database_url, export_command, "--out", str(pipe))
    reader.join(timeout=30)
    assert piped.exit_code == 0, piped.output
    assert shape(orjson.loads(received[0])) == shape(DOC)
    assert stat.S_IMODE(pipe.stat().st_mode) == 0o644
