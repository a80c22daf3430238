"""What every command-line tool shares: one clear line and exit code 2 for bad input."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Optional, Sequence, Tuple, Type, TypeVar

from .config import add_config_arguments, kv_item, resolve
from .errors import SpvitError, VerificationError

T = TypeVar('T')


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
    except (TrainingError, VerificationError) as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f'{prog}: interrupted; state saved, {e.hint}', file=sys.stderr)
        sys.exit(e.code)
    except BrokenPipeError:     # the reader of stdout (head, less) is gone: stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(code or 0)


def model_kwarg(text: str) -> Tuple[str, Any]:
    """argparse type for ``--model-kwargs k=v``: the value is read as YAML (ints, floats, bools, lists)."""
    try:
        return kv_item(text)
    except SpvitError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer of at least ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'must be at least {low}, got {value}')
        return value
    return parse


def number_between(low: float, high: float = float('inf')) -> Callable[[str], float]:
    """argparse type: a number strictly between ``low`` and ``high``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
        if not low < value < high:
            raise argparse.ArgumentTypeError(f'must be above {low:g}, got {text}' if high == float('inf')
                                             else f'must lie in ({low:g}, {high:g}), got {text}')
        return value
    return parse


def device_name(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N, where this machine has it."""
    import torch
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f'unknown device {text!r} (cpu, cuda, cuda:N)')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f'device {text} requested but CUDA is not available')
    return text


def add_model_kwargs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model-kwargs', nargs='+', type=model_kwarg, default=[], metavar='K=V',
                        help='keyword arguments for timm.create_model, e.g. img_size=160 num_classes=100')


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--model / --arch / --pruned: what flops.py and benchmark.py study, with its model kwargs."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument('--model', help='an unmodified timm model (random init)')
    group.add_argument('--arch', help='an architecture file (YAML/JSON), built with random init')
    group.add_argument('--pruned', help='a pruned checkpoint written by tools/export.py')
    add_model_kwargs(parser)
    parser.add_argument('--img-size', type=int_at_least(1), help='input resolution (shortcut for --model-kwargs img_size=N)')


def model_source(args: argparse.Namespace):
    """The ``ModelPair`` that ``add_model_source``'s arguments name."""
    from .compare import load_pair
    kwargs = dict(args.model_kwargs)
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    return load_pair(model=args.model, arch=args.arch, pruned=args.pruned, model_kwargs=kwargs)


def parse_config(cls: Type[T], prog: str, description: str, argv: Optional[Sequence[str]] = None) -> T:
    """A tool's command line: ``--config FILE`` plus one flag per field of ``cls``."""
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument('--config', help='YAML file of config keys (flags override it)')
    add_config_arguments(parser, cls)
    args = parser.parse_args(argv)
    return resolve(cls, args, args.config)
