"""Latency and throughput of models measured side by side in one process.

Runs of the compared models are interleaved (original, exported, original, ...) so that a load
change on a shared machine hits both, and each figure is the median of several runs after warm-up.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn


@dataclass
class Timing:
    """Seconds per forward pass of one batch: each run's mean over ``iters`` passes."""
    batch: int
    iters: int
    runs: List[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return statistics.median(self.runs)

    @property
    def latency_ms(self) -> float:
        return self.seconds * 1e3

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _run(model: nn.Module, x: torch.Tensor, iters: int) -> float:
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(iters):
        model(x)
    _sync(x.device)
    return (time.perf_counter() - start) / iters


@dataclass
class LatencyReport:
    device: str
    threads: int
    input_size: Tuple[int, int, int]
    timings: Dict[int, Dict[str, Timing]]     # batch -> model name -> timing
    flops: Dict[str, int] = field(default_factory=dict)

    def ratio(self, batch: int, name: str, base: str) -> float:
        """Latency of ``name`` over that of ``base`` at this batch size."""
        return self.timings[batch][name].seconds / self.timings[batch][base].seconds

    def to_dict(self, base: str = 'original') -> Dict[str, Any]:
        return {
            'device': self.device, 'threads': self.threads, 'input_size': list(self.input_size), 'flops': dict(self.flops),
            'batches': {str(b): {name: {'latency_ms': t.latency_ms, 'images_per_s': t.images_per_s,
                                        **({} if name == base else {'ratio': self.ratio(b, name, base)})}
                                 for name, t in row.items()} for b, row in self.timings.items()},
        }

    def format(self, base: str = 'original') -> str:
        size = 'x'.join(map(str, self.input_size))
        lines = [f'device {self.device}, {self.threads} threads, torch {torch.__version__}, input {size}', '',
                 f"{'batch':>5}  {'model':<10} {'latency ms':>10} {'images/s':>9} {'runs':>4}  ratio to {base}"]
        for batch, row in self.timings.items():
            for name, t in row.items():
                ratio = '' if name == base else f'{self.ratio(batch, name, base):.3f}'
                lines.append(f'{batch:>5}  {name:<10} {t.latency_ms:>10.2f} {t.images_per_s:>9.1f} {len(t.runs):>4}  {ratio}')
        if base in self.flops:
            for name, f in self.flops.items():
                if name != base:
                    lines.append(f'\nFLOPs ratio {name}/{base}: {f / self.flops[base]:.3f} '
                                 f'({f / 1e9:.3f} / {self.flops[base] / 1e9:.3f} GFLOPs)')
        return '\n'.join(lines)


def benchmark(
        models: Dict[str, nn.Module],
        input_size: Tuple[int, int, int],
        batch_sizes: Sequence[int] = (1, 64),
        warmup: int = 3,
        runs: int = 7,
        min_run_s: float = 0.2,
        device: Optional[torch.device | str] = None,
) -> LatencyReport:
    """Time every model at every batch size in eval mode under ``torch.inference_mode``.

    A run repeats the forward pass until it lasts about ``min_run_s`` (so batch 1 is not timer
    noise); the runs of all models are interleaved.
    """
    device = torch.device(device or 'cpu')
    timings: Dict[int, Dict[str, Timing]] = {}
    for m in models.values():
        m.eval().to(device)
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, *input_size, device=device)
            row = {}
            for name, m in models.items():
                one = min(_run(m, x, 1) for _ in range(max(1, warmup)))
                row[name] = Timing(batch, iters=max(1, round(min_run_s / one)))
            for _ in range(runs):
                for name, m in models.items():
                    row[name].runs.append(_run(m, x, row[name].iters))
            timings[batch] = row
    return LatencyReport(str(device), torch.get_num_threads(), tuple(input_size), timings)


__all__ = ['Timing', 'LatencyReport', 'benchmark']
