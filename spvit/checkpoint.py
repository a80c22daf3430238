"""Writing files atomically and the search checkpoint format (loadable with weights_only=True)."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence, Type

import torch

from .errors import CheckpointError

SEARCH_FORMAT = 'spvit-search'


def check_output_path(path: str) -> None:
    """Fail early (before minutes of work) on an output whose directory does not exist."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f'output directory does not exist: {directory}')
    if os.path.isdir(path):
        raise CheckpointError(f'output is a directory, not a file: {path}')
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CheckpointError(f'cannot write to the output directory: {directory}')


def check_new_files(outputs: Sequence[str], inputs: Sequence[Optional[str]], force: bool = False) -> None:
    """Refuse, before any work, to write over one of the inputs (never allowed) or over an
    existing file (only with ``force``): a typo must not cost a search result or a run."""
    sources = [os.path.realpath(p) for p in inputs if p]
    for path in outputs:
        check_output_path(path)
        if os.path.realpath(path) in sources or any(os.path.exists(path) and os.path.samefile(path, s)
                                                    for s in sources if os.path.exists(s)):
            raise CheckpointError(f'output {path} is also an input: write the result to another file')
        if os.path.exists(path) and not force:
            raise CheckpointError(f'output exists: {path} (pass --force to overwrite it)')


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temp file beside ``path``, then rename: a crash never leaves half a file."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:            # a full disk, a read-only mount, no permission
        raise CheckpointError(f'cannot write {path}: {e.strerror or e}') from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            f.write(text)
    atomic_write(path, write)


def read_text(path: str, what: str, error: Type[Exception]) -> str:
    """The text of ``path``; a file that cannot be read raises ``error`` with one line naming ``what``."""
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise error(f'cannot read {what} {path}: {e.strerror}') from None


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    check_output_path(path)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_file(path: str, expect_format: Optional[str] = None) -> Dict[str, Any]:
    """torch.load with weights_only=True and clear errors; checks the spvit format tag if asked."""
    if not os.path.isfile(path):
        raise CheckpointError(f'file not found: {path}')
    try:
        data = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise CheckpointError(f'cannot read {path} (truncated, corrupted or not a checkpoint): {type(e).__name__} {first}') from None
    if expect_format is not None:
        found = data.get('format') if isinstance(data, dict) else None
        if found != expect_format:
            raise CheckpointError(f'{path} is not an {expect_format} checkpoint' + (f' (it is {found})' if found else ''))
    return data


def supernet_record(supernet) -> Dict[str, Any]:
    """What rebuilds a supernet: timm name and kwargs, gate settings and the full state dict."""
    return {
        'model_name': supernet.model_name,
        'model_kwargs': dict(supernet.model_kwargs),
        'theta0': supernet.theta0,
        'alpha': supernet.alpha,
        'search_space': supernet.search_space,
        'state_dict': supernet.state_dict(),
    }


def supernet_from_record(record: Dict[str, Any]):
    """Rebuild the supernet of ``supernet_record`` (random init, then the saved state)."""
    from .models import create_model
    from .supernet import SEARCH_SPACES, attach_search_space
    model = create_model(record['model_name'], record['model_kwargs'])
    space = record.get('search_space', 'spvit')       # records before search spaces had the paper's
    if space not in SEARCH_SPACES:
        raise CheckpointError(f'unknown search space {space!r} in the search state')
    supernet = attach_search_space(model, theta0=record['theta0'], alpha=record['alpha'],
                                   model_name=record['model_name'], model_kwargs=record['model_kwargs'],
                                   search_space=space)
    try:
        supernet.load_state_dict(record['state_dict'])
    except RuntimeError as e:
        raise CheckpointError(f'search state does not fit {record["model_name"]}: {str(e).splitlines()[0]}') from None
    return supernet
