"""The `fmn` command."""
from fmn.cli.main import main

__all__ = ["main"]
