"""Export and import formats: conversation trees to and from bytes, without I/O.

Formats:
- parley JSON (``{"format": "parley", "version": 1, "conversations": [...]}``): every
  conversation with every branch; each message carries its id, its parent's id and the
  OpenAI wire message. Importing it back rebuilds the same trees.
- OpenAI-messages JSONL: one line per conversation, ``{"messages": [...]}`` along the
  active branch (the chat fine-tuning format); the conversation's system prompt, if any,
  comes first. Export only.
- ChatGPT's data export (``conversations.json``): a list of conversations whose
  ``mapping`` is a tree of nodes (``parent``, ``children``, ``message``). Branches are
  kept; nodes without visible text are skipped (the empty root and system nodes, hidden
  context, tool traffic and the assistant's calls to tools) and their children hang on
  the nearest kept ancestor.

Invariants: every ``ConversationTree`` returned lists parents before children; bad input
raises ``InvalidRequest`` naming where in the document it is, never a traceback. A
conversation's own fields (title, default model, system prompt, flags) pass the checks
that creating one through the chat API applies (``chat.fields``), with the same messages
and the field's place as ``param`` (``conversations[2].title``); a parley conversation
with a field it does not know is refused, as a create body is; no text that is kept may
hold a NUL character.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson

from parley.chat import fields
from parley.chat.fields import NUL_REFUSED, holds_nul
from parley.domain.times import utc
from parley.domain.transfer import ConversationTree, TreeMessage, message_from_wire
from parley.errors import InvalidRequest

FORMAT = "parley"
VERSION = 1
_CHATGPT_ROLES = frozenset({"user", "assistant", "system"})
_CHATGPT_FINISH = {"stop": "stop", "max_tokens": "length"}
# The fields of a conversation in a parley export (``_tree_json`` writes exactly these).
_PARLEY_FIELDS = frozenset(
    {
        "id",
        "title",
        "source",
        "default_model",
        "system_prompt",
        "archived",
        "pinned",
        "created_at",
        "updated_at",
        "active_leaf_id",
        "messages",
    }
)


def detect_format(data: Any) -> str:
    """``"parley"`` or ``"chatgpt"`` for a parsed document; ``InvalidRequest`` otherwise."""
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return "parley"
    if isinstance(data, list) and all(isinstance(c, dict) and "mapping" in c for c in data):
        return "chatgpt"
    if isinstance(data, dict) and "mapping" in data:
        return "chatgpt"
    raise InvalidRequest(
        "not an export parley can import: expected a parley export "
        '({"format": "parley", ...}) or a ChatGPT conversations.json'
    )


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise InvalidRequest("the import is empty: expected a JSON document")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the import is not valid JSON: {exc}") from None


def import_trees(data: Any, fmt: str | None = None) -> list[ConversationTree]:
    """Conversation trees from a parsed document in ``fmt`` (None: detected)."""
    fmt = fmt or detect_format(data)
    if fmt == "parley":
        return from_parley(data)
    if fmt == "chatgpt":
        return from_chatgpt(data)
    raise InvalidRequest(f"unknown import format {fmt!r}: use parley or chatgpt")


# --- parley JSON ---------------------------------------------------------------------


def to_parley(trees: Iterable[ConversationTree], exported_at: datetime) -> bytes:
    body = {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": _iso(exported_at),
        "conversations": [_tree_json(tree) for tree in trees],
    }
    return orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n"


def _tree_json(tree: ConversationTree) -> dict[str, Any]:
    return {
        "id": tree.key,
        "title": tree.title,
        "source": tree.source,
        "default_model": tree.default_model,
        "system_prompt": tree.system_prompt,
        "archived": tree.archived,
        "pinned": tree.pinned,
        "created_at": _iso(tree.created_at),
        "updated_at": _iso(tree.updated_at),
        "active_leaf_id": tree.active_leaf,
        "messages": [_message_json(m) for m in tree.messages],
    }


def _message_json(node: TreeMessage) -> dict[str, Any]:
    wire = node.message.canonical()
    if node.reasoning:
        wire["reasoning_content"] = node.reasoning
    entry = {
        "id": node.key,
        "parent_id": node.parent,
        "created_at": _iso(node.created_at),
        "model": node.model,
        "finish_reason": node.finish_reason,
        "message": wire,
    }
    if node.notice is not None:
        # Only when set: an export without notices stays what older versions import.
        entry["notice"] = node.notice
    return entry


def from_parley(data: Any) -> list[ConversationTree]:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidRequest('not a parley export: expected {"format": "parley", ...}')
    if data.get("version") != VERSION:
        raise InvalidRequest(f"unsupported parley export version {data.get('version')!r}")
    conversations = data.get("conversations")
    if not isinstance(conversations, list):
        raise InvalidRequest("conversations must be an array")
    return [_parley_tree(c, f"conversations[{i}]") for i, c in enumerate(conversations)]


# A parley export's message entries, and the messages in them (``Message.canonical`` and
# the reasoning): anything else in a parley document is refused, as at its top level.
_PARLEY_ENTRY_FIELDS = frozenset(
    {"id", "parent_id", "created_at", "model", "finish_reason", "notice", "message"}
)
_PARLEY_MESSAGE_FIELDS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}
)


def _parley_tree(raw: Any, where: str) -> ConversationTree:
    if not isinstance(raw, dict):
        raise InvalidRequest(f"{where} must be an object")
    fields.known_fields(raw, _PARLEY_FIELDS, where)
    _refuse_nul(raw, where)
    raw_messages = raw.get("messages")
    if not isinstance(raw_messages, list):
        raise InvalidRequest(f"{where}.messages must be an array")
    seen: set[str] = set()
    nodes = []
    for i, entry in enumerate(raw_messages):
        at = f"{where}.messages[{i}]"
        if not isinstance(entry, dict):
            raise InvalidRequest(f"{at} must be an object")
        fields.known_fields(entry, _PARLEY_ENTRY_FIELDS, at)
        if isinstance(entry.get("message"), dict):
            fields.known_fields(entry["message"], _PARLEY_MESSAGE_FIELDS, f"{at}.message")
        key = entry.get("id")
        if not isinstance(key, str) or not key or key in seen:
            raise InvalidRequest(f"{at}.id must be a string unique in its conversation")
        parent = entry.get("parent_id")
        if parent is not None and parent not in seen:
            raise InvalidRequest(
                f"{at}.parent_id must be null or the id of an earlier message of its conversation"
            )
        message, reasoning = message_from_wire(entry.get("message"), f"{at}.message")
        seen.add(key)
        nodes.append(
            TreeMessage(
                key=key,
                parent=parent,
                message=message,
                created_at=_time(entry.get("created_at"), f"{at}.created_at"),
                model=_opt_str(entry, "model", at),
                finish_reason=_opt_str(entry, "finish_reason", at),
                reasoning=reasoning,
                notice=_opt_str(entry, "notice", at),
            )
        )
    leaf = raw.get("active_leaf_id")
    if leaf is not None and leaf not in seen:
        raise InvalidRequest(f"{where}.active_leaf_id must be null or one of its message ids")
    created = _time(raw.get("created_at"), f"{where}.created_at")
    return ConversationTree(
        key=_opt_str(raw, "id", where),
        title=fields.title(raw.get("title"), f"{where}.title"),
        created_at=created,
        updated_at=_time(raw.get("updated_at", raw.get("created_at")), f"{where}.updated_at"),
        messages=tuple(nodes),
        source=_opt_str(raw, "source", where) or "import",
        default_model=fields.model_id(raw.get("default_model"), f"{where}.default_model"),
        system_prompt=fields.text(
            raw.get("system_prompt"), f"{where}.system_prompt", empty_ok=True
        ),
        archived=fields.flag(raw.get("archived", False), f"{where}.archived"),
        pinned=fields.flag(raw.get("pinned", False), f"{where}.pinned"),
        active_leaf=leaf,
    )


# --- OpenAI-messages JSONL -----------------------------------------------------------


def to_openai_jsonl(trees: Iterable[ConversationTree]) -> bytes:
    """One ``{"messages": [...]}`` line per conversation that has messages."""
    lines = []
    for tree in trees:
        messages = [node.message.canonical() for node in tree.active_branch()]
        if not messages:
            continue
        if tree.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": tree.system_prompt})
        lines.append(orjson.dumps({"messages": messages}) + b"\n")
    return b"".join(lines)


# --- ChatGPT conversations.json ------------------------------------------------------


def from_chatgpt(data: Any) -> list[ConversationTree]:
    """Trees from ChatGPT's ``conversations.json`` (a list, or one conversation object).

    Conversations left without any message are dropped.
    """
    conversations = [data] if isinstance(data, dict) and "mapping" in data else data
    if not isinstance(conversations, list):
        raise InvalidRequest(
            "not a ChatGPT export: expected the array of conversations in conversations.json"
        )
    trees = []
    for i, raw in enumerate(conversations):
        tree = _chatgpt_tree(raw, f"ChatGPT conversation [{i}]")
        if tree.messages:
            trees.append(tree)
    return trees


def _chatgpt_tree(raw: Any, where: str) -> ConversationTree:
    if not isinstance(raw, dict) or not isinstance(raw.get("mapping"), dict):
        raise InvalidRequest(f"{where} must be a conversation object with a mapping")
    mapping: Mapping[str, Any] = raw["mapping"]
    for node_id, node in mapping.items():
        if not isinstance(node, dict):
            raise InvalidRequest(f"{where}.mapping[{node_id!r}] must be an object")
    created = _epoch(raw.get("create_time")) or datetime.now(UTC)
    updated = _epoch(raw.get("update_time")) or created
    kept: dict[str, TreeMessage] = {}
    order: dict[str, int] = {}
    for index, (node_id, node) in enumerate(mapping.items()):
        message = _chatgpt_message(node_id, node, mapping, created, f"{where}.mapping")
        if message is not None:
            kept[node_id] = message
            order[node_id] = index
    leaf = _kept_ancestor(raw.get("current_node"), mapping, kept)
    title = fields.title(raw.get("title"), f"{where}.title")
    _refuse_nul(title, f"{where}.title")
    return ConversationTree(
        key=str(raw.get("conversation_id") or raw.get("id") or "") or None,
        title=title,
        created_at=created,
        updated_at=updated,
        messages=tuple(_parents_first(kept, mapping, order)),
        source="chatgpt",
        active_leaf=leaf,
    )


def _chatgpt_message(
    node_id: str,
    node: Mapping[str, Any],
    mapping: Mapping[str, Any],
    created: datetime,
    where: str,
) -> TreeMessage | None:
    message = node.get("message")
    if not isinstance(message, dict):
        return None
    author = message.get("author")
    role = author.get("role") if isinstance(author, dict) else None
    if not isinstance(role, str):
        return None
    metadata = message.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    if role not in _CHATGPT_ROLES or metadata.get("is_visually_hidden_from_conversation"):
        return None
    if message.get("recipient", "all") != "all":
        return None  # the assistant calling one of ChatGPT's tools
    text = _chatgpt_text(message.get("content"))
    if not text.strip():
        return None
    finish = metadata.get("finish_details")
    finish_type = finish.get("type") if isinstance(finish, dict) else None
    model = metadata.get("model_slug") if role == "assistant" else None
    model = model if isinstance(model, str) else None
    at = f"{where}[{node_id!r}]"
    # Only what is kept: a NUL in a node left out (tool output, say) refuses nothing.
    _refuse_nul([text, model], at)
    parsed, _ = message_from_wire({"role": role, "content": text}, at)
    return TreeMessage(
        key=node_id,
        parent=None,  # set by _parents_first, once every kept node is known
        message=parsed,
        created_at=_epoch(message.get("create_time")) or created,
        model=model,
        finish_reason=_CHATGPT_FINISH.get(str(finish_type)) if role == "assistant" else None,
    )


def _chatgpt_text(content: Any) -> str:
    """The visible text of a ChatGPT message: its string parts (images are dropped)."""
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts")
    if isinstance(parts, list):
        return "\n".join(p for p in parts if isinstance(p, str))
    text = content.get("text")
    return text if isinstance(text, str) else ""


def _kept_ancestor(
    node_id: Any, mapping: Mapping[str, Any], kept: Mapping[str, TreeMessage]
) -> str | None:
    """``node_id`` itself or its nearest ancestor that was kept (None: none was)."""
    seen: set[str] = set()
    while isinstance(node_id, str) and node_id not in seen:
        if node_id in kept:
            return node_id
        seen.add(node_id)
        node = mapping.get(node_id)
        node_id = node.get("parent") if isinstance(node, dict) else None
    return None


def _parents_first(
    kept: Mapping[str, TreeMessage], mapping: Mapping[str, Any], order: Mapping[str, int]
) -> list[TreeMessage]:
    """Kept messages re-parented onto their nearest kept ancestor, listed oldest first
    with every parent before its children (ties: position in the mapping)."""
    parents: dict[str, str | None] = {}
    children: dict[str | None, list[str]] = {}
    for node_id in kept:
        parent = _kept_ancestor(mapping[node_id].get("parent"), mapping, kept)
        parents[node_id] = parent
        children.setdefault(parent, []).append(node_id)
    out: list[TreeMessage] = []
    ready = [(kept[n].created_at, order[n], n) for n in children.get(None, [])]
    heapq.heapify(ready)
    while ready:
        _, _, node_id = heapq.heappop(ready)
        out.append(replace(kept[node_id], parent=parents[node_id]))
        for child in children.get(node_id, []):
            heapq.heappush(ready, (kept[child].created_at, order[child], child))
    if len(out) != len(kept):
        raise InvalidRequest("a ChatGPT conversation's parent links form a cycle")
    return out


def _time(value: Any, where: str) -> datetime:
    if not isinstance(value, str):
        raise InvalidRequest(f"{where} must be an ISO 8601 time")
    try:
        # Out of range once in UTC (0001-01-01T00:00:00+14:00): OverflowError.
        return utc(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        raise InvalidRequest(f"{where} must be an ISO 8601 time, got {value!r}") from None


def _epoch(value: Any) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def _iso(moment: datetime) -> str:
    return utc(moment).isoformat().replace("+00:00", "Z")


def _opt_str(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise InvalidRequest(f"{where}.{key} must be a string or null")
    return value


def _refuse_nul(value: Any, where: str) -> None:
    if holds_nul(value):
        raise InvalidRequest(f"{where}: {NUL_REFUSED}", where)
