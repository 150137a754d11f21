"""Placeholder: routes arrive with issue 4 (see the module that replaces this)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register this module's routes on ``app``."""
