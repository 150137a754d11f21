"""Graceful shutdown: let in-flight requests finish within a grace period, then interrupt
the upstream answers still open.

One ``Drain`` per application (``app[DRAIN]``). Every request is counted while it runs
(the error middleware wraps it in ``Drain.request``); an answer (``/v1``, and the chat
API's in ``chat.service``) registers its task with ``Drain.answering`` while it waits on
the upstream. On SIGTERM aiohttp first closes the listening sockets (nothing new is
accepted) and then runs ``on_shutdown``, where ``Drain.drain`` waits until nothing is in
flight or the grace period is over. It then cancels the tasks still answering and
remembers them; the relay (or the chat service) sees the cancellation, asks
``Drain.interrupted`` whether it is the shutdown's, and if so records the exchange as
interrupted by the shutdown and ends the answer with an error, so no client mistakes a
cut-off answer for a complete one. Only after that does the lifespan stop the writer.
``Drain.hurry`` (a second SIGINT or SIGTERM, see ``server.signals``) ends the grace
period early: the answers still open are interrupted at once, the same way.

Invariants:
- a task is interrupted at most once, and only while it is registered as answering: the
  relay leaves ``answering`` before it commits a record and acknowledges, so an
  acknowledgement is never cut off half-way;
- ``drain`` never waits longer than ``grace`` plus ``after``;
- other requests (uploads, the rest of the chat API) are given the same grace and are
  then cancelled by aiohttp itself (its ``shutdown_timeout``); an answer cancelled so,
  after the drain (``drained``), is recorded as cut off by the shutdown too.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Any

from aiohttp import web

from parley.errors import StopRequested

log = logging.getLogger(__name__)

# Seconds interrupted answers get to record themselves and send their error event; also
# what aiohttp gives other requests still running after the grace before cancelling them.
AFTER_GRACE = 5.0


class Drain:
    """In-flight requests and their orderly end; see the module docstring."""

    def __init__(self) -> None:
        # Set once the shutdown began (the listening sockets are closed by then).
        self.stopping = False
        self._in_flight = 0
        self._hurried = False
        # Set when the grace need not be waited for any more: nothing is in flight, or
        # ``hurry`` was called.
        self._enough: asyncio.Event | None = None
        self._answering: set[asyncio.Task[Any]] = set()
        self._interrupted: set[asyncio.Task[Any]] = set()
        # Set once ``drain`` returned: aiohttp cancels what still runs AFTER_GRACE later.
        self._over = False

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def request(self) -> AbstractContextManager[None]:
        """Count one request while it runs."""
        # Plain context managers, not generators: these run on every request.
        return _Counted(self)

    def answering(self) -> AbstractContextManager[None]:
        """Mark the current task as waiting on an upstream: the shutdown may interrupt it."""
        task = asyncio.current_task()
        return nullcontext() if task is None else _Answering(self._answering, task)

    def _left(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._enough is not None:
            self._enough.set()

    def hurry(self) -> None:
        """End the grace period now (or skip it, when ``drain`` has not begun)."""
        self._hurried = True
        if self._enough is not None:
            self._enough.set()

    def interrupted(self) -> bool:
        """Called on ``CancelledError``: whether the shutdown cancelled the current task.

        If it did, the cancellation is consumed (``Task.uncancel``), so the relay may still
        write the error event and record the exchange before it returns.
        """
        task = asyncio.current_task()
        if task is None or task not in self._interrupted:
            return False
        self._interrupted.discard(task)
        task.uncancel()
        return True

    def drained(self) -> bool:
        """Called on a ``CancelledError`` that ``interrupted`` did not claim: whether the
        drain is over, so that the cancellation is the shutdown's all the same. aiohttp
        cancels the requests still running ``AFTER_GRACE`` seconds after the drain (an
        answer whose client read too slowly to take its error event, a chat API answer
        caught writing to such a client when the grace ended): they were cut off by the
        server, not by their client. The cancellation is not consumed: the connection is
        being closed."""
        return self._over

    async def drain(self, grace: float, after: float = AFTER_GRACE) -> int:
        """Wait up to ``grace`` seconds for in-flight requests, then interrupt the upstream
        answers still open and give them ``after`` seconds to end; return how many were
        interrupted."""
        self.stopping = True
        if self._in_flight and not self._hurried:
            self._enough = asyncio.Event()
            with suppress(TimeoutError):
                await asyncio.wait_for(self._enough.wait(), timeout=grace)
        tasks = [task for task in self._answering if not task.done()]
        self._answering.clear()
        for task in tasks:
            self._interrupted.add(task)
            task.cancel()
        if tasks:
            log.warning(
                "shutdown: %d answer(s) still streaming %s were interrupted",
                len(tasks),
                "when the stop was signalled again"
                if self._hurried
                else f"after the {grace:g}s grace period",
            )
            _, late = await asyncio.wait(tasks, timeout=after)
            if late:
                log.error("shutdown: %d interrupted answer(s) did not end in time", len(late))
        self._interrupted.clear()
        self._over = True
        return len(tasks)


DRAIN = web.AppKey("drain", Drain)


class StopRequest:
    """Whether the process was asked to stop (the first SIGINT or SIGTERM, see
    ``server.signals``), for the steps of the startup and for the serving loop.

    The startup checks it between its steps (``check``), so a stop asked for while the
    database is migrated, the writer or the indexer starts, ends the startup at the next
    step, which unwinds what the earlier ones started; a step that could wait without end
    (the migration lock) reads ``asked`` from its thread. Once the server is up,
    ``server.runner`` waits for it (``wait``) and then stops the server.
    """

    def __init__(self) -> None:
        self.asked = threading.Event()
        self._asked_here = asyncio.Event()

    def ask(self) -> None:
        """On the event loop's thread (a signal handler)."""
        self.asked.set()
        self._asked_here.set()

    def check(self) -> None:
        """Raise ``StopRequested`` if a stop was asked for."""
        if self.asked.is_set():
            raise StopRequested("stopped while starting")

    async def wait(self) -> None:
        await self._asked_here.wait()


STOP = web.AppKey("stop", StopRequest)


class _Counted:
    __slots__ = ("_drain",)

    def __init__(self, drain: Drain) -> None:
        self._drain = drain

    def __enter__(self) -> None:
        self._drain._in_flight += 1

    def __exit__(self, *exc: object) -> None:
        self._drain._left()


class _Answering:
    __slots__ = ("_answering", "_task")

    def __init__(self, answering: set[asyncio.Task[Any]], task: asyncio.Task[Any]) -> None:
        self._answering = answering
        self._task = task

    def __enter__(self) -> None:
        self._answering.add(self._task)

    def __exit__(self, *exc: object) -> None:
        self._answering.discard(self._task)


def drain_of(request: web.Request) -> Drain | None:
    """The application's ``Drain`` (None in an app built without one)."""
    return request.app.get(DRAIN)
