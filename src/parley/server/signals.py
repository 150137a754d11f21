"""SIGINT and SIGTERM while ``parley serve`` runs: one orderly stop, however many arrive.

aiohttp's own handling (``run_app``'s ``handle_signals``) raised ``GracefulExit`` out of
the event loop on every SIGINT or SIGTERM. The first one started the stop; another one
during it (Ctrl-C pressed again while the stop waited for an open answer or the search
indexer's batch) was raised in the middle of the stop, which was then cancelled half way
(``RuntimeError: athrow(): asynchronous generator is already running``): the writer was
not stopped, the run was left marked as running (the next start took it for a crash) and
the exit status was 1. Once aiohttp had removed its handlers, one more Ctrl-C was a
``KeyboardInterrupt`` wherever the main thread was.

Raised during the startup, ``GracefulExit`` cancelled it wherever it was: a migration
waiting for its lock went on in its thread (for up to an hour) after the process had
"stopped", a writer being started was never stopped, and a startup step other than the
lifespan's left the lifespan's writer running and the run marked as running.

``StopSignals`` handles both signals the same way for the whole life of the process:

- the first asks for the stop (``shutdown.StopRequest``): while the server starts, the
  startup ends at its next step and unwinds what it had started (see ``server.app``);
  once it serves, the listening sockets close and the stop of ``server.shutdown`` and the
  lifespan runs (``server.runner``). Either way the exit status is 0;
- another during the stop cuts the grace of open answers short (``Drain.hurry``): they
  are interrupted now and recorded as such, and the stop still commits everything and
  marks the run clean;
- once the server has stopped (``ignore_stop_signals``) they are ignored: the store is
  closed and the process only has to exit.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from parley.server.shutdown import Drain, StopRequest

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    def __init__(self, drain: Drain, stop: StopRequest) -> None:
        self._drain = drain
        self._stop = stop
        self._received = 0

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Handle both signals on ``loop`` (the main thread's, before it runs the app)."""
        for number in SIGNALS:
            loop.add_signal_handler(number, self._on_signal, number)

    def _on_signal(self, number: int) -> None:
        self._received += 1
        name = signal.Signals(number).name
        if self._received == 1:
            log.info("%s: stopping (open answers get the shutdown grace)", name)
            self._stop.ask()
            return
        if self._received == 2:
            log.warning("%s again: open answers are interrupted now; the stop goes on", name)
        self._drain.hurry()


def exit_on_stop_signals() -> None:
    """Before the server is built (settings, configuration): nothing is held yet, so a
    signal ends the process at once, quietly and with status 0 (``StopSignals`` takes
    over once the event loop exists)."""
    for number in SIGNALS:
        signal.signal(number, _exit)


def _exit(number: int, _frame: object) -> None:
    raise SystemExit(0)


def ignore_stop_signals() -> None:
    """The server has stopped: later signals are ignored while the process exits."""
    for number in SIGNALS:
        signal.signal(number, signal.SIG_IGN)
