"""What every command-line tool shares: one clear line and exit code 2 for bad input."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from .errors import SpvitError


class ArgumentParser(argparse.ArgumentParser):
    """argparse that exits with 2 and one line (no usage dump) on bad arguments."""

    def error(self, message: str) -> None:
        self.exit(2, f'{self.prog}: error: {message}\n')


def run(main: Callable[[Optional[Sequence[str]]], Optional[int]], argv: Optional[Sequence[str]] = None) -> None:
    """Run a tool's main; user errors become ``<tool>: error: <message>`` on stderr and exit 2."""
    try:
        code = main(argv)
    except SpvitError as e:
        prog = sys.argv[0].rsplit('/', 1)[-1]
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
