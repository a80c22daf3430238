"""FLOP and parameter reports of a pruned model: fvcore on the real modules, attention
included, with the method's analytic figure beside it (they agree within 0.5%)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch.nn as nn

from .compare import ModelPair
from .flops import arch_flops, block_attn_flops, measure_flops, mlp_flops, msa_block_flops
from .hybrid import layout

if TYPE_CHECKING:
    from .latency_model import LatencyTable


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class BlockReport:
    block: int
    attn: str
    attn_flops: int              # fvcore
    attn_flops_analytic: int
    mlp_hidden: int
    mlp_hidden_total: int
    mlp_flops: int               # fvcore
    mlp_flops_analytic: int
    params: int
    heads: Optional[List[int]] = None     # msa: the kept heads (None: every head)
    heads_total: int = 0
    latency_ms: Optional[float] = None     # predicted by a latency table: attention op + MLP


@dataclass
class FlopReport:
    model: str
    model_kwargs: Dict[str, Any]
    input_size: Tuple[int, int, int]
    flops: int                   # fvcore, multiply-accumulates
    analytic_flops: int
    params: int
    original_flops: int
    original_params: int
    blocks: List[BlockReport]
    # with a latency table: the predicted latency of the model and of the original, and the table
    predicted_latency_ms: Optional[float] = None
    original_predicted_latency_ms: Optional[float] = None
    latency_table: Optional[str] = None

    @property
    def flops_ratio(self) -> float:
        return self.flops / self.original_flops

    @property
    def params_ratio(self) -> float:
        return self.params / self.original_params

    def to_json(self, compare: bool = False) -> Dict[str, Any]:
        data = asdict(self)
        data['input_size'] = list(self.input_size)
        if self.latency_table is None:
            for k in ('predicted_latency_ms', 'original_predicted_latency_ms', 'latency_table'):
                del data[k]
            for b in data['blocks']:
                del b['latency_ms']
        elif compare:
            data['latency_ratio'] = self.predicted_latency_ms / self.original_predicted_latency_ms
        else:
            del data['original_predicted_latency_ms']
        if compare:
            data.update(flops_ratio=self.flops_ratio, params_ratio=self.params_ratio)
        else:
            del data['original_flops'], data['original_params']
        return data

    def format(self, compare: bool = False) -> str:
        size = 'x'.join(map(str, self.input_size))
        kwargs = ' '.join(f'{k}={v}' for k, v in self.model_kwargs.items())
        latency = self.latency_table is not None
        lines = [f'{self.model} {kwargs}'.rstrip() + f', input {size}', '',
                 f"{'block':>5}  {'attention':<9} {'attn GFLOPs':>11}  {'MLP kept/total':>14} {'MLP GFLOPs':>10}  "
                 f"{'params (M)':>10}" + (f"  {'pred. ms':>8}" if latency else '')]
        for b in self.blocks:
            op = b.attn if b.heads is None else f'msa {len(b.heads)}/{b.heads_total}'
            lines.append(f'{b.block:>5}  {op:<9} {b.attn_flops / 1e9:>11.4f}  '
                         f'{f"{b.mlp_hidden}/{b.mlp_hidden_total}":>14} {b.mlp_flops / 1e9:>10.4f}  {b.params / 1e6:>10.4f}'
                         + (f'  {b.latency_ms:>8.3f}' if latency else ''))
        gap = (self.flops - self.analytic_flops) / self.analytic_flops
        lines += ['', f'total: {self.flops / 1e9:.4f} GFLOPs (fvcore), {self.analytic_flops / 1e9:.4f} analytic '
                      f'({gap:+.2%}); {self.params / 1e6:.3f} M params']
        if compare:
            lines.append(f'original: {self.original_flops / 1e9:.4f} GFLOPs, {self.original_params / 1e6:.3f} M params; '
                         f'reduction {1 - self.flops_ratio:.1%} FLOPs, {1 - self.params_ratio:.1%} params '
                         f'(ratio {self.flops_ratio:.3f} / {self.params_ratio:.3f})')
        if latency:
            original = (f' (original {self.original_predicted_latency_ms:.3f} ms, ratio '
                        f'{self.predicted_latency_ms / self.original_predicted_latency_ms:.3f})' if compare else '')
            lines.append(f'predicted latency: {self.predicted_latency_ms:.3f} ms{original}, with the fixed part; '
                         f'table: {self.latency_table}')
        return '\n'.join(lines)


def flop_report(pair: ModelPair, original_flops: Optional[int] = None,
                latency_table: Optional['LatencyTable'] = None) -> FlopReport:
    """Measure ``pair.model`` (and the original, unless its total is given) with fvcore; with a
    latency table (checked against the model) add each block's predicted latency."""
    if latency_table is not None:
        latency_table.check_model(pair.arch.model, pair.block_dims, pair.input_size)
    ms = None if latency_table is None else latency_table.block_ms(pair.arch)
    size = pair.input_size
    dims = pair.block_dims
    total, by_module = measure_flops(pair.model, size)
    if original_flops is None:
        original_flops = total if pair.model is pair.original else measure_flops(pair.original, size)[0]
    names = {id(m): n for n, m in pair.model.named_modules()}
    blocks = []
    for i, ((blk, _, _), b, d) in enumerate(zip(layout(pair.model), pair.arch.blocks, dims)):
        blocks.append(BlockReport(
            block=i, attn=b.attn,
            attn_flops=by_module.get(names[id(blk.attn)], 0), attn_flops_analytic=block_attn_flops(d, b),
            mlp_hidden=b.mlp_hidden, mlp_hidden_total=d.hidden,
            mlp_flops=by_module.get(names[id(blk.mlp)], 0), mlp_flops_analytic=mlp_flops(d, b.mlp_hidden),
            params=count_params(blk), heads=None if b.heads is None else list(b.heads), heads_total=d.heads,
            latency_ms=None if ms is None else sum(ms[i])))
    fixed = original_flops - msa_block_flops(dims)
    return FlopReport(model=pair.arch.model, model_kwargs=dict(pair.arch.model_kwargs), input_size=tuple(size),
                      flops=total, analytic_flops=arch_flops(dims, fixed, pair.arch), params=count_params(pair.model),
                      original_flops=original_flops, original_params=count_params(pair.original), blocks=blocks,
                      predicted_latency_ms=None if latency_table is None else latency_table.predict(pair.arch),
                      original_predicted_latency_ms=None if latency_table is None else latency_table.original_ms(),
                      latency_table=None if latency_table is None else latency_table.describe())


__all__ = ['BlockReport', 'FlopReport', 'count_params', 'flop_report']
