"""``parley``: the command group; each subcommand lives in its own module."""

from __future__ import annotations

import click

from parley import __version__
from parley.cli.db import db
from parley.cli.serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="parley")
def cli() -> None:
    """parley: a multi-LLM gateway and chat server that keeps every conversation."""


cli.add_command(serve)
cli.add_command(db)


def main() -> None:
    cli()
