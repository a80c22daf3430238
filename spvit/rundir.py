"""A run's output directory: who may write there, what an earlier run left, and its log on resume.

One run writes to a directory at a time (an exclusive lock held for the run's life, which the
kernel releases however the holder ends); a new run never starts over another run's checkpoint,
but takes over a directory whose run stopped before its first one (nothing there to resume).
"""
from __future__ import annotations

import json
import os
from typing import IO, List, Optional, Tuple

from .checkpoint import atomic_write_text
from .config import ConfigError

LOCK_NAME = '.lock'
# what a run writes before its first checkpoint: without a checkpoint beside them, nothing to resume
EARLY_FILES = ('config.yaml', 'log.jsonl')


def check_fresh_output_dir(path: str, run_files: Tuple[str, ...], last: str) -> List[str]:
    """Refuse to start a new run where one left a checkpoint; returns the files of a run that
    stopped before its first one, which the new run replaces."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f'--output-dir {path} exists and is not a directory')
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f'parent of --output-dir does not exist: {parent}')
    if not os.path.isdir(path):
        return []
    present = [f for f in run_files if os.path.exists(os.path.join(path, f))]
    if any(f not in EARLY_FILES for f in present):
        hint = (f'use --resume {os.path.join(path, last)} or another --output-dir' if last in present
                else 'use another --output-dir')
        raise ConfigError(f'{path} already holds a run ({", ".join(present)}); {hint}')
    return [os.path.join(path, f) for f in present]


class RunLock:
    """An exclusive lock on a run directory, held until ``release`` or the process ends."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, LOCK_NAME)
        self.file: Optional[IO[str]] = None

    def acquire(self) -> None:
        import fcntl
        f = open(self.path, 'a+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or 'another process'
            f.close()
            raise ConfigError(f'{os.path.dirname(self.path)} is in use by another run ({holder}); '
                              'wait for it or use another --output-dir') from None
        f.seek(0)
        f.truncate()
        f.write(f'pid {os.getpid()}\n')
        f.flush()
        self.file = f

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def trim_log(path: str, last_step: int) -> None:
    """Drop the records after ``last_step`` that a stopped run logged past its last checkpoint, so
    that a resumed run does not log those steps twice."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get('step', 0) <= last_step]
    if len(kept) < len(lines):
        atomic_write_text(path, ''.join(kept))


def remove_leftover_temps(directory: str, names: Tuple[str, ...]) -> None:
    """Remove the ``<name>.tmp<PID>`` files of the run's own ``names`` that a killed run left
    half-written (their renames never came); other files are the user's."""
    for entry in os.listdir(directory):
        stem, sep, pid = entry.rpartition('.tmp')
        if sep and stem in names and (pid == '' or pid.isdigit()):
            os.remove(os.path.join(directory, entry))
