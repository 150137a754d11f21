"""When keys, users and sessions were last used, written off the hot path.

``Activity.seen(principal)`` runs on the event loop and costs a few dict lookups: each key,
user and session is queued at most once per ``interval`` (a minute) per process. One
daemon thread writes whatever is queued in one transaction. A failed write is logged and
forgotten: activity times are a convenience, never a reason to fail or slow a request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from datetime import UTC, datetime

from parley.domain.users import Principal
from parley.store.users import Users

log = logging.getLogger(__name__)

# Forget throttle entries beyond this many (they are only a cost saving).
_MAX_REMEMBERED = 100_000
_STOP = ("stop", 0)


class Activity:
    """Throttled, batched ``Users.touch``; see the module docstring."""

    def __init__(self, users: Users, interval: float = 60.0) -> None:
        self._users = users
        self._interval = interval
        # Event-loop side only: when each (kind, id) was last queued (monotonic seconds).
        self._queued_at: dict[tuple[str, int], float] = {}
        self._queue: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="parley-activity", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._thread = None

    def seen(self, principal: Principal) -> None:
        """Note that ``principal`` made a request now."""
        now = time.monotonic()
        self._note(("user", principal.user_id), now)
        if principal.api_key_id is not None:
            self._note(("key", principal.api_key_id), now)
        if principal.session_id is not None:
            self._note(("session", principal.session_id), now)

    def _note(self, item: tuple[str, int], now: float) -> None:
        last = self._queued_at.get(item)
        if last is not None and now - last < self._interval:
            return
        if len(self._queued_at) >= _MAX_REMEMBERED:
            self._queued_at.clear()
        self._queued_at[item] = now
        self._queue.put(item)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = _STOP in items
            ids: dict[str, list[int]] = {"key": [], "user": [], "session": []}
            for kind, item_id in items:
                if kind in ids:
                    ids[kind].append(item_id)
            try:
                self._users.touch(
                    key_ids=ids["key"],
                    user_ids=ids["user"],
                    session_ids=ids["session"],
                    at=datetime.now(UTC),
                )
            except Exception:
                log.warning("could not record last-use times", exc_info=True)
