"""The ``forkd`` command line."""

from forkd.cli.main import main

__all__ = ["main"]
