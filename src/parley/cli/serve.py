"""``parley serve`` (placeholder until the server lands)."""

from __future__ import annotations

import click


@click.command()
def serve() -> None:
    """Run the parley server."""
