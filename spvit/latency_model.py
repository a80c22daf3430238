"""Latency tables: what each part of a model costs on one device, and the predicted latency of an
architecture, exact for an ``Architecture`` and differentiable in the gates for a supernet.

FLOPs are a proxy that misleads: a 3x3 conv into a head-wide channel, a narrow matmul at batch 1 and
attention over 197 tokens do not run at the same FLOPs per second. A table times, on the device the
model will run on, the very modules a pruned model is made of (``hybrid.hybridize_block``): per
distinct block shape, the attention half of the block (``x + ls1(attn(norm1(x)))``) with each op
(skip, conv1x1, conv3x3, msa with 1..H heads) and the MLP half at a grid of widths, plus the fixed
part (the model without its blocks: patch and position embedding, final norm, head). Each half is
timed as a stack of every block of its shape, with weights of its own per block, so that the
weights stream through the caches as they do in the whole model; the stacks of one shape are timed
interleaved, with ``spvit.latency.benchmark`` (the method of ``tools/benchmark.py``). Blocks cost a
little more inside the whole model than as stacks; every block timing is scaled by the ratio
measured on the original (``whole_model_scale``), so the original's prediction is its measurement.

    predicted = fixed + sum over blocks (attention op + MLP at its width)

The MLP (and msa over its kept heads) is interpolated piecewise-linearly in the number of open
units, so the prediction is differentiable in the gates as ``SuperNet.flops()`` is.
"""
from __future__ import annotations

import copy
import json
import math
import platform
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .arch import ATTN_OPS, Architecture, BlockArch
from .errors import SpvitError

LATENCY_FORMAT = 'spvit-latency-table'
LATENCY_VERSION = 1
# the families whose blocks the table knows how to split into an attention and an MLP half
TABLE_FAMILIES = ('vit',)
DEFAULT_MLP_POINTS = 13


class LatencyTableError(SpvitError):
    """A latency table is malformed, or was built for another model or device."""


def device_name(device: torch.device | str) -> str:
    """What a table is measured on: the GPU's name, or the CPU's model name."""
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or 'cpu'


def interpolate(x: torch.Tensor | float, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear through the points (xs ascending), linear beyond the ends; differentiable in x."""
    x = torch.as_tensor(x, dtype=ys.dtype, device=ys.device)
    if len(xs) == 1:
        return ys[0] + 0 * x
    i = (torch.searchsorted(xs, x.detach().reshape(1), right=True) - 1).clamp(0, len(xs) - 2)[0]
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


@dataclass
class ShapeLatency:
    """Milliseconds per block of one block shape, at the table's batch size."""
    dims: Dict[str, Any]            # the BlockDims fields: what the shape is
    ops: Dict[str, float]           # skip, conv1x1, conv3x3, msa (every head): the attention half
    msa_heads: List[float]          # msa keeping 1..H heads (the last is ops['msa'])
    mlp_widths: List[int]           # ascending, 1 .. the full width
    mlp_ms: List[float]             # the MLP half at each width
    _cache: Dict[Any, Tuple[torch.Tensor, ...]] = field(default_factory=dict, repr=False, compare=False)

    def scaled(self, factor: float) -> 'ShapeLatency':
        """Every timing times ``factor`` (``whole_model_scale``)."""
        return ShapeLatency(dict(self.dims), {k: v * factor for k, v in self.ops.items()},
                            [v * factor for v in self.msa_heads], list(self.mlp_widths), [v * factor for v in self.mlp_ms])

    def _points(self, dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """(widths, mlp ms, head counts, msa ms) as tensors, made once per dtype and device."""
        key = (dtype, device)
        if key not in self._cache:
            def t(v):
                return torch.tensor(v, dtype=dtype, device=device)
            self._cache[key] = (t(self.mlp_widths), t(self.mlp_ms), t(list(range(1, len(self.msa_heads) + 1))),
                                t(self.msa_heads))
        return self._cache[key]

    def mlp_at(self, units: torch.Tensor | float) -> torch.Tensor:
        """The MLP half with ``units`` hidden units (interpolated)."""
        ref = units if isinstance(units, torch.Tensor) and units.is_floating_point() else None
        xs, ys, _, _ = self._points(torch.float64 if ref is None else ref.dtype,
                                    torch.device('cpu') if ref is None else ref.device)
        return interpolate(units, xs, ys)

    def msa_at(self, heads: torch.Tensor | float) -> torch.Tensor:
        """The attention half with msa keeping ``heads`` heads (interpolated between head counts)."""
        ref = heads if isinstance(heads, torch.Tensor) and heads.is_floating_point() else None
        _, _, xs, ys = self._points(torch.float64 if ref is None else ref.dtype,
                                    torch.device('cpu') if ref is None else ref.device)
        return interpolate(heads, xs, ys)

    def attn_ms(self, op: str, heads: Optional[int] = None) -> float:
        """The attention half with ``op`` (msa keeping ``heads`` heads; None: all)."""
        if op == 'msa' and heads is not None:
            return self.msa_heads[heads - 1]
        return self.ops[op]

    def mlp(self, hidden: int) -> float:
        return float(self.mlp_at(float(hidden)))

    def unit_ms(self) -> float:
        """What one MLP unit costs on average (the slope from one unit to the full width)."""
        w, ms = self.mlp_widths, self.mlp_ms
        return (ms[-1] - ms[0]) / (w[-1] - w[0]) if w[-1] > w[0] else 0.0


@dataclass
class LatencyTable:
    """What every part of one model costs on one device, at one batch size and thread count."""
    model: str
    model_kwargs: Dict[str, Any]
    input_size: List[int]
    device: str                     # 'cpu', 'cuda:0', ...
    device_name: str                # the CPU's model name or the GPU's name
    torch_version: str
    batch_size: int
    threads: int
    # patch embedding, position embedding, final norm, head, and what a whole model adds per block:
    # the original model's measured latency less its blocks' halves (finite; timing noise on a model
    # whose blocks are nearly all of it could make it negative)
    fixed_ms: float
    shapes: List[ShapeLatency]
    blocks: List[int]               # per block, its index in ``shapes``
    # how it was measured (warmup, runs, min_run_s) and the original model's measured latency
    timing: Dict[str, Any] = field(default_factory=dict)

    # --- prediction ---

    def shape(self, block: int) -> ShapeLatency:
        return self.shapes[self.blocks[block]]

    def block_ms(self, arch: Architecture) -> List[Tuple[float, float]]:
        """(attention half, MLP half) in ms for every block of ``arch``."""
        if len(arch.blocks) != len(self.blocks):
            raise LatencyTableError(f'architecture has {len(arch.blocks)} blocks but the latency table\'s '
                                    f'{self.model} has {len(self.blocks)}')
        return [(self.shape(i).attn_ms(b.attn, None if b.heads is None else len(b.heads)),
                 self.shape(i).mlp(b.mlp_hidden)) for i, b in enumerate(arch.blocks)]

    def predict(self, arch: Architecture) -> float:
        """Predicted latency (ms) of the pruned model of ``arch`` at the table's batch size."""
        return self.fixed_ms + sum(a + m for a, m in self.block_ms(arch))

    def original_ms(self) -> float:
        """Predicted latency of the unmodified model (every block msa with its full MLP)."""
        return self.fixed_ms + sum(self.shape(i).ops['msa'] + self.shape(i).mlp_ms[-1] for i in range(len(self.blocks)))

    # --- checks ---

    def describe(self) -> str:
        kwargs = ' '.join(f'{k}={v}' for k, v in self.model_kwargs.items())
        return (f'{self.model}{" " + kwargs if kwargs else ""} on {self.device} ({self.device_name}), batch '
                f'{self.batch_size}, {self.threads} threads, torch {self.torch_version}')

    def check_model(self, model_name: str, dims: Sequence[Any], input_size: Sequence[int], where: str = '') -> None:
        """Refuse (one line) a table built for another model: name, input size and every block's shape
        must be the table's (other kwargs, e.g. num_classes, change only the head within the fixed part)."""
        where = f' {where}' if where else ''
        shapes = [asdict(d) if not isinstance(d, dict) else dict(d) for d in dims]
        if model_name != self.model:
            raise LatencyTableError(f'the latency table{where} is for {self.model}, not {model_name}: build one '
                                    'for this model with tools/latency_table.py')
        if list(input_size) != list(self.input_size):
            raise LatencyTableError(f'the latency table{where} is for input {list(self.input_size)}, not '
                                    f'{list(input_size)}: build one for this model with tools/latency_table.py')
        if shapes != [self.shape(i).dims for i in range(len(self.blocks))]:
            raise LatencyTableError(f'the latency table{where} is for other block shapes of {self.model} (model '
                                    f'kwargs {self.model_kwargs}): build one for this model with tools/latency_table.py')

    def check_device(self, device: torch.device | str, threads: Optional[int] = None, where: str = '') -> None:
        """Refuse (one line) a table measured on another device (or CPU thread count) than ``device``."""
        where = f' {where}' if where else ''
        device = torch.device(device)
        here = device_name(device)
        if device.type != torch.device(self.device).type or here != self.device_name:
            raise LatencyTableError(f'the latency table{where} was measured on {self.device} ({self.device_name}), '
                                    f'not on {device} ({here}): build one here with tools/latency_table.py')
        if device.type == 'cpu' and threads is not None and threads != self.threads:
            raise LatencyTableError(f'the latency table{where} was measured with {self.threads} threads, not '
                                    f'{threads}: give --threads {self.threads} or build a table for {threads}')

    # --- file ---

    def to_dict(self) -> Dict[str, Any]:
        return {
            'format': LATENCY_FORMAT, 'version': LATENCY_VERSION,
            'model': self.model, 'model_kwargs': dict(self.model_kwargs), 'input_size': list(self.input_size),
            'device': self.device, 'device_name': self.device_name, 'torch_version': str(self.torch_version),
            'batch_size': self.batch_size, 'threads': self.threads, 'timing': dict(self.timing),
            'fixed_ms': self.fixed_ms,
            'shapes': [{'dims': dict(s.dims), 'ops': dict(s.ops), 'msa_heads': list(s.msa_heads),
                        'mlp_widths': list(s.mlp_widths), 'mlp_ms': list(s.mlp_ms)} for s in self.shapes],
            'blocks': list(self.blocks),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = 'latency table') -> 'LatencyTable':
        """Read and validate a table (what ``to_dict`` wrote); one-line ``LatencyTableError`` otherwise."""
        def fail(message: str) -> None:
            raise LatencyTableError(f'{source}: {message}')

        if not isinstance(data, dict) or data.get('format') != LATENCY_FORMAT:
            fail(f'not an {LATENCY_FORMAT} file')
        version = data.get('version')
        if not isinstance(version, int) or isinstance(version, bool):
            fail(f'no valid version (got {version!r})')
        if version > LATENCY_VERSION:
            fail(f'version {version} is newer than this spvit reads ({LATENCY_VERSION})')
        keys = ('model', 'model_kwargs', 'input_size', 'device', 'device_name', 'torch_version', 'batch_size',
                'threads', 'fixed_ms', 'shapes', 'blocks')
        missing = [k for k in keys if k not in data]
        if missing:
            fail(f'missing {", ".join(missing)}')

        def ms(value: Any, what: str, signed: bool = False) -> float:
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or (value < 0 and not signed)):
                fail(f'{what} must be a finite number of ms{"" if signed else " >= 0"}, got {value!r}')
            return float(value)

        def count(value: Any, what: str) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(f'{what} must be an integer >= 1, got {value!r}')
            return value

        for k in ('model', 'device', 'device_name', 'torch_version'):
            if not isinstance(data[k], str) or not data[k]:
                fail(f'{k} must be a non-empty string')
        if not isinstance(data['model_kwargs'], dict):
            fail('model_kwargs must be a mapping')
        size = data['input_size']
        if not isinstance(size, list) or len(size) != 3:
            fail(f'input_size must be [channels, height, width], got {size!r}')
        for v in size:
            count(v, 'input_size')
        shapes = []
        if not isinstance(data['shapes'], list) or not data['shapes']:
            fail('shapes must be a non-empty list')
        for j, s in enumerate(data['shapes']):
            where = f'shape {j}'
            if not isinstance(s, dict) or set(s) != {'dims', 'ops', 'msa_heads', 'mlp_widths', 'mlp_ms'}:
                fail(f'{where} must have dims, ops, msa_heads, mlp_widths and mlp_ms')
            dims = s['dims']
            if not isinstance(dims, dict) or not all(k in dims for k in ('tokens', 'patches', 'dim', 'heads', 'hidden')):
                fail(f'{where}: dims must give tokens, patches, dim, heads and hidden')
            heads, hidden = count(dims['heads'], f'{where}: heads'), count(dims['hidden'], f'{where}: hidden')
            if not isinstance(s['ops'], dict) or set(s['ops']) != set(ATTN_OPS):
                fail(f'{where}: ops must give {", ".join(ATTN_OPS)}')
            ops = {op: ms(s['ops'][op], f'{where}: {op}') for op in ATTN_OPS}
            if not isinstance(s['msa_heads'], list) or len(s['msa_heads']) != heads:
                fail(f'{where}: msa_heads must give msa with 1..{heads} heads')
            msa = [ms(v, f'{where}: msa_heads') for v in s['msa_heads']]
            if not math.isclose(msa[-1], ops['msa'], rel_tol=1e-9, abs_tol=1e-12):
                fail(f'{where}: msa with all {heads} heads ({msa[-1]}) differs from ops.msa ({ops["msa"]})')
            widths, mlp = s['mlp_widths'], s['mlp_ms']
            if not isinstance(widths, list) or not isinstance(mlp, list) or len(widths) != len(mlp) or not widths:
                fail(f'{where}: mlp_widths and mlp_ms must be lists of the same length')
            widths = [count(w, f'{where}: mlp_widths') for w in widths]
            if widths != sorted(set(widths)) or widths[0] != 1 or widths[-1] != hidden:
                fail(f'{where}: mlp_widths must ascend from 1 to the full width {hidden}')
            shapes.append(ShapeLatency(dict(dims), ops, msa, widths, [ms(v, f'{where}: mlp_ms') for v in mlp]))
        blocks = data['blocks']
        if (not isinstance(blocks, list) or not blocks
                or not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < len(shapes) for b in blocks)):
            fail(f'blocks must be a non-empty list of shape indices below {len(shapes)}')
        timing = data.get('timing') or {}
        if not isinstance(timing, dict):
            fail('timing must be a mapping')
        return cls(model=data['model'], model_kwargs=dict(data['model_kwargs']), input_size=list(size),
                   device=data['device'], device_name=data['device_name'], torch_version=data['torch_version'],
                   batch_size=count(data['batch_size'], 'batch_size'), threads=count(data['threads'], 'threads'),
                   fixed_ms=ms(data['fixed_ms'], 'fixed_ms', signed=True), shapes=shapes, blocks=list(blocks), timing=dict(timing))

    def save(self, path: str) -> None:
        from .checkpoint import atomic_write_text
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + '\n')

    @classmethod
    def load(cls, path: str) -> 'LatencyTable':
        from .checkpoint import read_text
        text = read_text(path, 'latency table', LatencyTableError)
        try:
            data = json.loads(text)
        except ValueError as e:
            raise LatencyTableError(f'{path}: not valid JSON: {str(e).splitlines()[0]}') from None
        return cls.from_dict(data, source=path)


# --- the differentiable predictor ---

def gated_block_latency(shape: ShapeLatency, attn_gates: torch.Tensor, mlp_gates: torch.Tensor,
                        head_gates: Optional[torch.Tensor] = None, conv3x3: bool = True) -> torch.Tensor:
    """Predicted ms of one block as a function of its gate values (``flops.gated_block_flops`` in ms).

    L_attn = L_skip + I1 (L_c1 - L_skip) + I2 (L_c3 - L_c1) + I3 (L_msa - L_c3) with I = cumprod(g);
    with head gates L_msa is interpolated at n = sum(g) + prod(1 - g) heads, and the MLP at
    n = sum(g) + prod(1 - g) units: the architecture keeps at least one of each, so closing the last
    one saves nothing. Without ``conv3x3`` (left out of the block's choices) L_c3 = L_c1.
    """
    i = torch.cumprod(attn_gates, 0)
    l0, l1 = shape.ops['skip'], shape.ops['conv1x1']
    l3 = shape.ops['conv3x3'] if conv3x3 else l1
    lm = shape.ops['msa'] if head_gates is None else shape.msa_at(head_gates.sum() + torch.prod(1 - head_gates))
    attn = l0 + i[0] * (l1 - l0) + i[1] * (l3 - l1) + i[2] * (lm - l3)
    return attn + shape.mlp_at(mlp_gates.sum() + torch.prod(1 - mlp_gates))


# --- building a table ---

class AttentionHalf(nn.Module):
    """The first residual branch of timm's ViT ``Block``: x + ls1(attn(norm1(x))) (what an attention
    op costs in the whole model, residual add included)."""

    def __init__(self, blk: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = blk.norm1, blk.attn, blk.ls1, blk.drop_path1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))


class MlpHalf(nn.Module):
    """The second residual branch of timm's ViT ``Block``: x + ls2(mlp(norm2(x)))."""

    def __init__(self, blk: nn.Module) -> None:
        super().__init__()
        self.norm2, self.mlp, self.ls2, self.drop_path2 = blk.norm2, blk.mlp, blk.ls2, blk.drop_path2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def non_decreasing(values: Sequence[float]) -> List[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators): a wider MLP
    or one more head never predicts less time, so timing noise cannot make the search open units
    to save time."""
    blocks: List[List[float]] = []          # [mean, count]
    for v in values:
        blocks.append([float(v), 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2]
    return [m for m, n in blocks for _ in range(int(n))]


def mlp_grid(hidden: int, points: int = DEFAULT_MLP_POINTS) -> List[int]:
    """The widths an MLP is timed at: 1 and ``points - 1`` even steps up to ``hidden``."""
    steps = max(1, points - 1)
    return sorted({1, hidden, *(max(1, round(hidden * k / steps)) for k in range(1, steps))})


def table_model(model_name: str, model_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Any]:
    """The timm model (random init) and its family, refused (one line) outside ``TABLE_FAMILIES``."""
    from .families import check_model
    from .models import create_model
    model = create_model(model_name, dict(model_kwargs or {})).eval()
    family = check_model(model)
    if family.name not in TABLE_FAMILIES:
        raise LatencyTableError(f'latency tables support the {", ".join(TABLE_FAMILIES)} family for now; '
                                f'{model_name} is of the {family.name} family')
    return model, family


def build_latency_table(
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        device: torch.device | str = 'cpu',
        batch_size: int = 1,
        threads: Optional[int] = None,
        mlp_points: int = DEFAULT_MLP_POINTS,
        warmup: int = 2,
        runs: int = 5,
        min_run_s: float = 0.2,
        progress: bool = True,
) -> LatencyTable:
    """Time every part of ``model_name`` on ``device`` (see the module's docstring). ``threads``
    sets ``torch.set_num_threads`` first; the table records the count it ran with."""
    from .hybrid import hybridize_block
    from .latency import benchmark
    from .runtime import progress as progress_bar
    if threads is not None:
        torch.set_num_threads(threads)
    model, family = table_model(model_name, model_kwargs)
    dims = family.block_dims(model)
    layout = family.layout(model)
    keys: List[Any] = []
    blocks = []
    for d in dims:
        if d not in keys:
            keys.append(d)
        blocks.append(keys.index(d))
    configs = {j: [('attn', op, None) for op in ATTN_OPS[:3]]
               + [('attn', 'msa', h) for h in range(1, d.heads + 1)]
               + [('mlp', 'msa', w) for w in mlp_grid(d.hidden, mlp_points)] for j, d in enumerate(keys)}
    total = (2 + sum(len(c) for c in configs.values())) * (1 + runs)
    bar = progress_bar(total, 0, f'latency table {model_name} b{batch_size}', progress)
    try:
        fixed = copy.deepcopy(model)
        fixed.blocks = nn.Identity()      # what the model costs besides its blocks
        report = benchmark({'original': model, 'fixed': fixed}, tuple(family.input_size(model)),
                           batch_sizes=(batch_size,), warmup=warmup, runs=runs, min_run_s=min_run_s, device=device,
                           on_run=bar.update)
        original_ms = report.timings[batch_size]['original'].latency_ms
        fixed_alone_ms = report.timings[batch_size]['fixed'].latency_ms
        del fixed
        shapes = []
        for j, d in enumerate(keys):
            members = [layout[i] for i in range(len(dims)) if blocks[i] == j]
            stacks = {}
            for kind, op, n in configs[j]:
                halves = []
                for blk, grid, npt in members:
                    if kind == 'attn':
                        b = BlockArch(op, d.hidden, None if n is None or n == d.heads else list(range(n)))
                        halves.append(AttentionHalf(hybridize_block(family, _without_mlp(blk), grid, npt, b)))
                    else:
                        b = BlockArch('msa', n)
                        halves.append(MlpHalf(hybridize_block(family, _without_attn(blk), grid, npt, b)))
                stacks[(kind, op, n)] = nn.Sequential(*halves)
            names = {k: f'{k[0]}:{k[1]}:{k[2]}' for k in stacks}
            report = benchmark({names[k]: m for k, m in stacks.items()}, (d.tokens * d.windows, d.dim),
                               batch_sizes=(batch_size,), warmup=warmup, runs=runs, min_run_s=min_run_s,
                               device=device, on_run=bar.update)
            ms = {k: report.timings[batch_size][names[k]].latency_ms / len(members) for k in stacks}
            del stacks, report
            ops = {op: ms[('attn', op, None)] for op in ATTN_OPS[:3]}
            msa = non_decreasing([ms[('attn', 'msa', h)] for h in range(1, d.heads + 1)])
            widths = mlp_grid(d.hidden, mlp_points)
            shapes.append(ShapeLatency(asdict(d), {**ops, 'msa': msa[-1]}, msa, widths,
                                       non_decreasing([ms[('mlp', 'msa', w)] for w in widths])))
    finally:
        bar.close()
    scale = whole_model_scale(shapes, blocks, original_ms, fixed_alone_ms)
    dev = torch.device(device)
    return LatencyTable(model=model_name, model_kwargs=dict(model_kwargs or {}),
                        input_size=list(family.input_size(model)), device=str(dev), device_name=device_name(dev),
                        torch_version=str(torch.__version__), batch_size=batch_size, threads=torch.get_num_threads(),
                        fixed_ms=fixed_alone_ms, shapes=[shape.scaled(scale) for shape in shapes], blocks=blocks,
                        timing={'warmup': warmup, 'runs': runs, 'min_run_s': min_run_s, 'original_ms': original_ms,
                                'fixed_alone_ms': fixed_alone_ms, 'block_scale': scale})


def whole_model_scale(shapes: Sequence[ShapeLatency], blocks: Sequence[int], original_ms: float,
                      fixed_ms: float) -> float:
    """How much more the blocks cost inside the whole model than their halves timed as stacks:
    (original - fixed part) / the original's halves. The block timings are scaled by it, so the
    original's prediction is its measurement; what a whole model adds to its blocks (caches, the
    Block call) grows with the blocks' work, not with their count: a fixed offset per original
    block over-predicted pruned models by 7-17% at batch 64 (deit_small, 1 thread), the scale by
    -2 to +7%."""
    halves_ms = sum(shapes[j].ops['msa'] + shapes[j].mlp_ms[-1] for j in blocks)
    return (original_ms - fixed_ms) / halves_ms


def _without_mlp(blk: nn.Module) -> nn.Module:
    """A copy of ``blk`` with weights of its own for its attention half (it shares the MLP, which
    ``hybridize_block`` leaves alone at the full width)."""
    return _copy_except(blk, 'mlp')


def _without_attn(blk: nn.Module) -> nn.Module:
    """A copy of ``blk`` with an MLP of its own (``hybridize_block`` narrows it in place); it shares
    the msa, which ``hybridize_block`` keeps as it is."""
    return _copy_except(blk, 'attn')


def _copy_except(blk: nn.Module, name: str) -> nn.Module:
    part = getattr(blk, name)
    setattr(blk, name, nn.Identity())
    try:
        out = copy.deepcopy(blk)
    finally:
        setattr(blk, name, part)
    setattr(out, name, part)
    return out


__all__ = ['LATENCY_FORMAT', 'LATENCY_VERSION', 'TABLE_FAMILIES', 'LatencyTableError', 'ShapeLatency', 'LatencyTable',
           'AttentionHalf', 'MlpHalf', 'build_latency_table', 'device_name', 'gated_block_latency', 'interpolate',
           'mlp_grid', 'non_decreasing', 'table_model', 'whole_model_scale']
