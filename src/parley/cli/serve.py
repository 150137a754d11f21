"""``parley serve``: run the HTTP server on the settings from the environment and config."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import sys
from typing import Any

import click

from parley.collector import tune_for_serving
from parley.errors import ConfigError
from parley.settings import Settings, in_memory, load_settings

# Errors of binding the listening socket that come from the operator's choice of address.
_LISTEN_ERRORS = frozenset({errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Without a master key parley serves only on a loopback address."""
    if settings.master_key is None and not is_loopback(settings.host):
        raise ConfigError(
            f"refusing to serve on {settings.host} without authentication: set "
            "PARLEY_MASTER_KEY, or listen on 127.0.0.1"
        )


@click.command()
@click.option("--host", default=None, help="Address to listen on (default 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port to listen on (default 8000).")
def serve(host: str | None, port: int | None) -> None:
    """Run the parley server (brings the database schema up to date first).

    SIGTERM or Ctrl-C stops it gracefully: no new connections, open requests get
    shutdown_grace seconds (PARLEY_SHUTDOWN_GRACE, default 30) to finish, answers still
    streaming are then recorded as interrupted, everything is committed and the exit
    status is 0. A second SIGTERM or Ctrl-C interrupts the open answers at once; the
    stop still commits everything. Either one while the server starts (migrating the
    database, starting the writer or the indexer) ends the startup at its next step,
    with what it had started stopped, and the exit status is 0 too.
    """
    from parley.server.signals import StopSignals, exit_on_stop_signals, ignore_stop_signals

    exit_on_stop_signals()
    from parley.server.app import create_app
    from parley.server.runner import serve_until_stopped
    from parley.server.shutdown import DRAIN, STOP

    try:
        overrides: dict[str, Any] = {}
        if host is not None:
            overrides["host"] = host
        if port is not None:
            overrides["port"] = port
        settings = load_settings(**overrides)
        check_exposure(settings)
        if in_memory(settings):
            raise ConfigError(
                "DATABASE_URL: an SQLite database in memory keeps nothing (and each "
                "connection would see its own); give a file: sqlite:///<path>"
            )
    except ConfigError as exc:
        click.echo(f"parley: {exc.message}", err=True)
        sys.exit(1)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Alembic narrates its plugin set-up at INFO on every start; migrations still log.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    tune_for_serving()
    loop = asyncio.new_event_loop()
    try:
        app = create_app(settings)
        # Ours, not aiohttp's handle_signals: a signal must not break off the startup or
        # the stop (see server.signals).
        StopSignals(app[DRAIN], app[STOP]).install(loop)
        loop.run_until_complete(
            serve_until_stopped(
                app,
                settings.host,
                settings.port,
                lambda line: click.echo(f"parley: {line}", err=True),
            )
        )
    except ConfigError as exc:
        click.echo(f"parley: {exc.message}", err=True)
        sys.exit(1)
    except OSError as exc:
        # The address is taken (another parley, say) or not this machine's: say so
        # plainly; anything else is not the operator's input and keeps its traceback.
        if exc.errno not in _LISTEN_ERRORS:
            raise
        click.echo(
            f"parley: cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}",
            err=True,
        )
        sys.exit(1)
    finally:
        ignore_stop_signals()
        _close(loop)


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """End what is left on ``loop`` (as ``asyncio.run`` does) and close it."""
    left = asyncio.all_tasks(loop)
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
