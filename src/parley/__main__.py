"""``python -m parley`` runs the CLI."""

from parley.cli.main import main

# Guarded: a spawned child process (the embedding process) may import this module.
if __name__ == "__main__":
    main()
