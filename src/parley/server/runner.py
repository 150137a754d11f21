"""Running the application until it is asked to stop: parley's ``web.run_app``.

aiohttp's ``run_app`` stops on ``GracefulExit`` raised out of the event loop, which
cancels whatever the startup was doing (see ``server.signals``), and it does not end the
cleanup contexts already entered when a later one fails. ``serve_until_stopped`` instead
waits on the application's ``StopRequest``:

- asked for during the startup, the startup raises ``StopRequested`` at its next step
  (unwinding what that step's context had started) and the contexts already entered are
  ended by ``runner.cleanup``; the port is never bound;
- asked for once serving, the listening sockets close, ``on_shutdown`` drains the
  requests in flight (``server.shutdown``) and every context is ended.

A startup that fails (a ``ConfigError``, a port in use) is cleaned up the same way and its
error is raised to the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiohttp import web

from parley.errors import StopRequested
from parley.server.shutdown import AFTER_GRACE, STOP

log = logging.getLogger(__name__)


async def serve_until_stopped(
    app: web.Application, host: str, port: int, say: Callable[[str], None]
) -> None:
    stop = app[STOP]
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        # In-flight requests already had settings.shutdown_grace in on_shutdown (see
        # server.shutdown); what is still running then gets this long to end before
        # aiohttp cancels it.
        shutdown_timeout=AFTER_GRACE,
        # A client that hangs up cancels its handler, and so its upstream call.
        handler_cancellation=True,
    )
    try:
        await runner.setup()
        stop.check()
        site = web.TCPSite(runner, host, port)
        await site.start()
        say(f"serving on {site.name} (Ctrl-C or SIGTERM stops)")
        await stop.wait()
    except StopRequested:
        log.warning("stopped while starting: nothing was served")
    finally:
        await runner.cleanup()
