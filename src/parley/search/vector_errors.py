"""LanceDB's errors about the vector store, as parley's: ``VectorStoreUnusable``, one line
that names the store and says what is wrong with it.

LanceDB says that a file is damaged or missing with a ``RuntimeError`` whose text is
wrapped in Rust error names and source locations ("lance error: LanceError(IO): file size
is too small, /root/.cargo/...rs:172:20"), that a table's directory is empty or gone with
``ValueError("Table 'messages' was not found")``, and what the file system refuses with an
``OSError``, or a ``RuntimeError`` or ``ValueError`` whose text holds the system's error
number ("(os error 13)", "Os { code: 13, ... }": a directory it may not list).
``unusable`` keeps the words that say what is wrong, with the paths inside the store
written relative to it, so that the error's ``cause`` may be shown to an API client (it
shows no file system layout).
Any other exception is parley's own mistake: it is not translated and keeps its traceback.
``translated`` applies this to every public method of ``VectorStore``.
"""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Concatenate, ParamSpec, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

from parley.errors import VectorStoreUnusable
from parley.paths import reason
from parley.search.vector_lock import local_path

P = ParamSpec("P")
R = TypeVar("R")

# "... (os error 13) ...", or Rust's debug form "... Os { code: 13, kind: ... } ...".
_OS_ERROR = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+),")
# ", /root/.cargo/registry/src/.../utils.rs:172:20", ", /rustc/<hash>/library/....rs:250:5"
_LOCATION = re.compile(r",\s*/\S+?\.rs:\d+:\d+")
_WRAPPER = re.compile(
    r"(?:lance error|External error|LanceError\(\w+\)|Generic [^:,]*? error|Wrapped error): "
)
_REPEATED = re.compile(r"\b([A-Z][\w ]*: )\1+")
_MISSING_TABLE = re.compile(r"Table '([^']+)' was not found")


class _Store(Protocol):
    uri: str


S = TypeVar("S", bound=_Store)


def translated(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """``method`` with LanceDB's errors about the store raised as ``VectorStoreUnusable``."""

    @functools.wraps(method)
    def call(store: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(store, *args, **kwargs)
        except (RuntimeError, OSError, ValueError) as exc:
            error = unusable(exc, store.uri)
            if error is None:
                raise
            raise error from exc

    return call


def unusable(exc: Exception, uri: str) -> VectorStoreUnusable | None:
    """``exc`` as ``VectorStoreUnusable`` when it is LanceDB's (or the system's) word on the
    store at ``uri``; None for anything else."""
    store = local_path(uri)
    if isinstance(exc, RuntimeError | ValueError):
        exc = system_refusal(exc, uri) or exc
    if isinstance(exc, OSError):
        where = Path(os.fsdecode(exc.filename)) if exc.filename else store
        cause, damaged = reason(exc, where), exc.errno in (errno.ENOENT, errno.EIO)
    elif isinstance(exc, RuntimeError):
        cause, damaged = f"its files are damaged or missing: {_words(str(exc))}", True
    elif isinstance(exc, ValueError) and (found := _MISSING_TABLE.fullmatch(str(exc))):
        return missing_table(found[1], uri)
    else:
        return None
    if store is not None:
        cause = cause.replace(os.fspath(store) + os.sep, "")
    return VectorStoreUnusable(_shown(uri), cause, damaged=damaged)


def missing_table(name: str, uri: str) -> VectorStoreUnusable:
    """The store's table ``name`` is gone while ``meta`` says it was made."""
    return VectorStoreUnusable(_shown(uri), f"its table '{name}' is missing", damaged=True)


def system_refusal(exc: Exception, uri: str) -> OSError | None:
    """LanceDB's error for what the file system refused ("... (os error 30) ..."), as
    the ``OSError`` it was, naming the store: a read-only or full disk is the operator's
    to fix, not a damaged store."""
    found = _OS_ERROR.search(str(exc))
    store = local_path(uri)
    if found is None or store is None:
        return None
    number = int(found.group(1) or found.group(2))
    return OSError(number, os.strerror(number), os.fspath(store))


def _words(text: str) -> str:
    """LanceDB's message without its Rust wrappers and source locations."""
    text = _WRAPPER.sub("", _LOCATION.sub("", text))
    return _REPEATED.sub(r"\1", text).strip() or "no reason given"


def _shown(uri: str) -> str:
    """The store as an operator knows it: a path, or a URI without any password in it."""
    store = local_path(uri)
    if store is not None:
        return os.fspath(store)
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))
