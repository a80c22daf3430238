"""Latency and throughput of models measured side by side in one process.

Runs of the compared models are interleaved (original, pruned, original, ...) so that a load
change on a shared machine hits both, and each figure is the median of several runs after warm-up.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

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
    # model name -> the model its latency ratio is taken against (models not named here have none)
    references: Dict[str, str] = field(default_factory=dict)
    runtime: str = 'torch'

    def ratio(self, batch: int, name: str, base: str) -> float:
        """Latency of ``name`` over that of ``base`` at this batch size."""
        return self.timings[batch][name].seconds / self.timings[batch][base].seconds

    def to_dict(self) -> Dict[str, Any]:
        return {
            'device': self.device, 'threads': self.threads, 'runtime': self.runtime, 'input_size': list(self.input_size),
            'flops': dict(self.flops),
            'batches': {str(b): {name: {'latency_ms': t.latency_ms, 'images_per_s': t.images_per_s,
                                        **({'ratio': self.ratio(b, name, self.references[name])}
                                           if name in self.references else {})}
                                 for name, t in row.items()} for b, row in self.timings.items()},
        }

    def format(self) -> str:
        size = 'x'.join(map(str, self.input_size))
        width = max(10, *(len(n) for row in self.timings.values() for n in row))
        lines = [f'device {self.device}, {self.threads} threads, torch {torch.__version__}, input {size}', '',
                 f"{'batch':>5}  {'model':<{width}} {'latency ms':>10} {'images/s':>9} {'runs':>4}  ratio"]
        for batch, row in self.timings.items():
            for name, t in row.items():
                ref = self.references.get(name)
                ratio = '' if ref is None else f'{self.ratio(batch, name, ref):.3f} to {ref}'
                lines.append(f'{batch:>5}  {name:<{width}} {t.latency_ms:>10.2f} {t.images_per_s:>9.1f} '
                             f'{len(t.runs):>4}  {ratio}'.rstrip())
        for name, ref in self.references.items():
            if name in self.flops and ref in self.flops:
                f, f0 = self.flops[name], self.flops[ref]
                lines.append(f'\nFLOPs ratio {name}/{ref}: {f / f0:.3f} ({f / 1e9:.3f} / {f0 / 1e9:.3f} GFLOPs)')
        return '\n'.join(lines)


def benchmark(
        models: Dict[str, nn.Module],
        input_size: Tuple[int, ...],
        batch_sizes: Sequence[int] = (1, 64),
        warmup: int = 3,
        runs: int = 7,
        min_run_s: float = 0.2,
        device: Optional[torch.device | str] = None,
        references: Optional[Dict[str, str]] = None,
        on_run: Optional[Callable[[], None]] = None,
) -> LatencyReport:
    """Time every model at every batch size in eval mode under ``torch.inference_mode``; the input
    is ``(batch, *input_size)`` (an image, or the tokens of a block).

    A run repeats the forward pass until it lasts about ``min_run_s`` (so batch 1 is not timer
    noise); the runs of all models are interleaved. ``references``: model -> the model its latency
    ratio is taken against (default: every model against the first). ``on_run`` is called after
    each model's warm-up and each timed run (a progress bar).
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
                if on_run is not None:
                    on_run()
            for _ in range(runs):
                for name, m in models.items():
                    row[name].runs.append(_run(m, x, row[name].iters))
                    if on_run is not None:
                        on_run()
            timings[batch] = row
    if references is None:
        first = next(iter(models))
        references = {name: first for name in models if name != first}
    return LatencyReport(str(device), torch.get_num_threads(), tuple(input_size), timings, references=dict(references))


def compare_latency(
        original: nn.Module,
        pruned: nn.Module,
        input_size: Tuple[int, int, int],
        runtime: str = 'torch',
        threads: Optional[int] = None,
        int8: bool = False,
        **kwargs: Any,
) -> LatencyReport:
    """The pruned model against the original, with their fvcore FLOPs; ``runtime='onnxruntime'``
    also exports both to ONNX (a temporary folder) and times them on ONNX Runtime beside eager
    PyTorch, each runtime's pruned model against its own original (and with ``int8`` the pruned
    model's dynamic int8 copy against its fp32 ONNX file)."""
    from .flops import measure_flops
    models: Dict[str, nn.Module] = {'original': original, 'pruned': pruned}
    references = {'pruned': 'original'}
    with tempfile.TemporaryDirectory() as tmp:
        if runtime == 'onnxruntime':
            from .deploy import OnnxModel, export_onnx
            for name in ('original', 'pruned'):
                path = os.path.join(tmp, f'{name}.onnx')
                export_onnx(models[name], path, input_size)
                models[f'{name}-ort'] = OnnxModel(path, threads)
            references['pruned-ort'] = 'original-ort'
            if int8:
                from .deploy import quantize_int8
                quantize_int8(os.path.join(tmp, 'pruned.onnx'), os.path.join(tmp, 'pruned-int8.onnx'))
                models['pruned-int8'] = OnnxModel(os.path.join(tmp, 'pruned-int8.onnx'), threads)
                references['pruned-int8'] = 'pruned-ort'
        report = benchmark(models, input_size, references=references, **kwargs)
    report.runtime = runtime
    report.flops = {name: measure_flops(models[name], input_size)[0] for name in ('original', 'pruned')}
    return report


__all__ = ['Timing', 'LatencyReport', 'benchmark', 'compare_latency']
