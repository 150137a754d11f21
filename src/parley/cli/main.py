"""``parley``: the command group; each subcommand lives in its own module.

The group is ``cli.common.Commands``: whatever command fails for a reason of its
environment (an unusable data directory, an unreachable or damaged database) says so in
one line and exits 1, never with a traceback.
"""

from __future__ import annotations

import click

from parley import __version__
from parley.cli.backup import backup, restore_command
from parley.cli.common import Commands
from parley.cli.db import db
from parley.cli.maintenance import maintenance, retention
from parley.cli.search import reindex, search
from parley.cli.serve import serve
from parley.cli.stats import limits, stats
from parley.cli.transfer import export_command, import_command
from parley.cli.users import users


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="parley")
def cli() -> None:
    """parley: a multi-LLM gateway and chat server that keeps every conversation."""


cli.add_command(serve)
cli.add_command(db)
cli.add_command(backup)
cli.add_command(restore_command)
cli.add_command(maintenance)
cli.add_command(retention)
cli.add_command(users)
cli.add_command(stats)
cli.add_command(limits)
cli.add_command(export_command)
cli.add_command(import_command)
cli.add_command(search)
cli.add_command(reindex)


def main() -> None:
    cli()
