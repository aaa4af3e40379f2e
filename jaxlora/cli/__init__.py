"""Command line: argument parsing and dispatch only (`app`), plus the inference commands' glue.

The console script `jaxlora` is `jaxlora.cli:main`; `python -m jaxlora.cli` runs the same.
This is the top layer: it may import anything, nothing imports it.
"""

from jaxlora.cli.app import main

__all__ = ["main"]
