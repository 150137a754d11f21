"""``python -m parley`` runs the CLI."""

from parley.cli.main import main

main()
