"""`python -m fmn ...`: the fmn command line (see fmn.cli)."""
import sys

from fmn.cli.commands import main

if __name__ == "__main__":
    sys.exit(main())
