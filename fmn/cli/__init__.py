"""The `fmn` command."""
from fmn.cli.commands import main

__all__ = ["main"]
