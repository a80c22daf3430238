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
    """Run a tool's main: bad input exits 2 with ``<tool>: error: <message>``, a failed run 1,
    an interrupted one 130/143 (SIGINT/SIGTERM), all without a traceback."""
    from .runtime import Interrupted, TrainingError
    prog = sys.argv[0].rsplit('/', 1)[-1]
    try:
        code = main(argv)
    except SpvitError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
    except TrainingError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f'{prog}: interrupted; state saved, resume with --resume', file=sys.stderr)
        sys.exit(e.code)
    sys.exit(code or 0)
