"""What every training run needs around its loop: devices and torchrun, RNG state for exact
resume, signals, AMP, the jsonl log and evaluation."""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from .data import readable
from .errors import SpvitError


class TrainingError(Exception):
    """The run cannot go on (e.g. the loss became non-finite). Exit code 1."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the run saved its state. Carries the exit code (130/143) and how
    to go on."""

    def __init__(self, code: int, hint: str = 'resume with --resume') -> None:
        super().__init__(f'interrupted (exit {code})')
        self.code, self.hint = code, hint


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: then gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', '0')))


def resolve_device(name: Optional[str], d: Dist) -> torch.device:
    if not name:
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise SpvitError(f'device {name} requested but CUDA is not available')
        if name == 'cuda':       # one GPU per process: torchrun's local rank, else the current device
            name = f'cuda:{d.local_rank if d.enabled else torch.cuda.current_device()}'
        torch.cuda.set_device(torch.device(name))
    elif name != 'cpu':
        raise SpvitError(f'unknown device {name!r} (cpu, cuda, cuda:N)')
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """All RNG states, in a form torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'gauss': float(np_state[4])},
        'python': [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}

    def __init__(self) -> None:
        self.code = 0
        self._previous: Dict[int, Any] = {}

    def __enter__(self) -> 'StopSignal':
        for sig in self.CODES:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.code = self.CODES[signum]


class PlainProgress:
    """tqdm's interface for a stderr that is not a terminal (a log file, a scheduler): tqdm's
    carriage returns would turn each epoch into one huge line, so this writes a plain line every
    tenth of the total (and at the end)."""

    def __init__(self, total: int, initial: int, desc: str) -> None:
        self.total, self.n, self.desc = total, initial, desc
        self.every = max(1, total // 10)
        self.postfix: Dict[str, Any] = {}
        self.start, self.start_n = time.time(), initial

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 and self.n < self.total:
            self._line()

    def set_postfix(self, values: Dict[str, Any]) -> None:
        self.postfix = values

    def close(self) -> None:
        if self.n > self.start_n:
            self._line()

    def _line(self) -> None:
        rate = (time.time() - self.start) / max(1, self.n - self.start_n)
        extra = ''.join(f', {k}={v}' for k, v in self.postfix.items())
        print(f'{self.desc}: {self.n}/{self.total} steps ({self.n / self.total:.0%}), {rate:.2f} s/step{extra}',
              file=sys.stderr, flush=True)


def progress(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar on a terminal, plain periodic lines elsewhere, nothing when not ``enabled``."""
    from tqdm import tqdm
    if enabled and not sys.stderr.isatty():
        return PlainProgress(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def use_compile(flag: Optional[bool], device: torch.device) -> bool:
    """--compile / --no-compile, else where it was measured to pay: CUDA (a launch-bound step)."""
    return device.type == 'cuda' if flag is None else bool(flag)


def autocast(device: torch.device, enabled: bool):
    """bf16 on CPU, fp16 on CUDA."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, amp: bool) -> Optional[torch.amp.GradScaler]:
    return torch.amp.GradScaler('cuda') if amp and device.type == 'cuda' else None


class JsonlLog:
    """Append-only log.jsonl; only the main rank writes."""

    def __init__(self, path: str, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, device: torch.device, d: Dist, amp: bool = False) -> Dict[str, float]:
    """Top-1, top-5 and mean cross-entropy over the loader (summed across ranks)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)   # correct1, correct5, loss, count
    for x, y in readable(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        sums[0] += (top[:, 0] == y).sum()
        sums[1] += (top == y[:, None]).any(1).sum()
        sums[2] += torch.nn.functional.cross_entropy(logits, y, reduction='sum')
        sums[3] += y.numel()
    all_reduce_sum(sums, d)
    model.train(was_training)
    n = max(sums[3].item(), 1)
    return {'top1': 100 * sums[0].item() / n, 'top5': 100 * sums[1].item() / n, 'loss': sums[2].item() / n,
            'count': int(sums[3].item())}
