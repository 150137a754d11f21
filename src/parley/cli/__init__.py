"""The ``parley`` command line: a thin client of the library."""
