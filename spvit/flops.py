"""FLOPs (multiply-accumulates, counted the way fvcore counts them): the analytic model of the
method and an fvcore measurement that also counts fused attention."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

with warnings.catch_warnings():
    # fvcore scripts a loss function at import and torch deprecates jit.script: noise on every
    # tool's stderr that no user can act on.
    warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

from .arch import ATTN_OPS, Architecture, BlockArch


@dataclass(frozen=True)
class BlockDims:
    """What the FLOPs of one block depend on. For windowed attention, ``tokens`` and ``patches``
    are per window and ``windows`` counts them."""
    tokens: int       # N: patches + prefix tokens
    patches: int      # P
    dim: int          # d
    heads: int
    hidden: int       # full MLP width
    windows: int = 1
    qk_norm: bool = False     # msa normalises q and k (timm's qk_norm=True)
    glu: bool = False         # gated-linear-unit MLP: a hidden unit has two input rows (gate and value)
    # msa's position-bias MLP (Swin V2's cpb_mlp: 2 -> cpb_hidden -> heads), run once per block on
    # cpb_coords relative coordinates, whatever the batch
    cpb_coords: int = 0
    cpb_hidden: int = 0
    # the attention branch's own norm sits after the op (post-norm, Swin V2) and goes with a skipped
    # attention: counted in every op but skip (5 per element, as fvcore counts an affine norm)
    post_norm: bool = False
    attn_norm: bool = False   # an affine LayerNorm over the attention output before proj (scale_attn_inner)
    mlp_norm: bool = False    # an affine LayerNorm over the MLP hidden units before fc2 (scale_mlp)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def _post_norm(b: BlockDims) -> int:
    return b.windows * 5 * b.tokens * b.dim if b.post_norm else 0


def _msa(b: BlockDims, heads: Optional[int] = None) -> int:
    """qkv, q k^T, attn v and the projection; each is linear in the kept heads' width h * hd. With
    qk-norm, the two affine norms over q and k (5 per element, as fvcore counts a norm), with an
    inner norm, the one over the kept heads' output channels; with a position-bias MLP, its two
    layers (the last one has a row per kept head)."""
    n, d = b.tokens, b.dim
    width = d if heads is None else heads * b.head_dim
    norms = (2 if b.qk_norm else 0) + (1 if b.attn_norm else 0)
    return (b.windows * (4 * n * d * width + 2 * n * n * width + norms * 5 * n * width)
            + b.cpb_coords * b.cpb_hidden * (b.heads if heads is None else heads) + _msa_shared(b))


def _msa_shared(b: BlockDims) -> int:
    """What msa costs whatever heads it keeps: the position-bias MLP's first layer, the post-norm."""
    return b.cpb_coords * 2 * b.cpb_hidden + _post_norm(b)


def _conv_norm(b: BlockDims) -> int:
    """A conv op's norm over its hd channels where the attention has an inner norm (no affine: 4
    per element, as fvcore counts it; the affine is folded into proj)."""
    return b.windows * b.patches * 4 * b.head_dim if b.attn_norm else 0


def _conv3x3(b: BlockDims) -> int:
    return b.windows * b.patches * (9 * b.dim * b.head_dim + b.head_dim * b.dim) + _conv_norm(b) + _post_norm(b)


def _conv1x1(b: BlockDims) -> int:
    return b.windows * b.patches * 2 * b.dim * b.head_dim + _conv_norm(b) + _post_norm(b)


ATTN_FLOPS: Dict[str, Callable[[BlockDims], int]] = {
    'skip': lambda b: 0,
    'conv1x1': _conv1x1,
    'conv3x3': _conv3x3,
    'msa': _msa,
}


def attn_flops(b: BlockDims, op: str, heads: Optional[int] = None) -> int:
    """FLOPs of a block's attention op; ``heads``: how many heads msa keeps (None: all)."""
    if op == 'msa' and heads is not None:
        return _msa(b, heads)
    return ATTN_FLOPS[op](b)


def block_attn_flops(b: BlockDims, block: BlockArch) -> int:
    return attn_flops(b, block.attn, None if block.heads is None else len(block.heads))


def mlp_flops(b: BlockDims, hidden: int) -> int:
    """fc1 and fc2 (and a GLU's second input projection), and an inner norm over the kept units (5
    per element, as fvcore counts an affine norm); fvcore counts no elementwise product."""
    return b.windows * ((3 if b.glu else 2) * b.dim + (5 if b.mlp_norm else 0)) * b.tokens * hidden


def arch_flops(dims: Sequence[BlockDims], fixed: int, arch: Architecture) -> int:
    """Total FLOPs of an architecture (exact integer)."""
    return fixed + sum(block_attn_flops(b, a) + mlp_flops(b, a.mlp_hidden) for b, a in zip(dims, arch.blocks))


def gated_block_flops(b: BlockDims, attn_gates: torch.Tensor, mlp_gates: torch.Tensor,
                      head_gates: Optional[torch.Tensor] = None, conv3x3: bool = True) -> torch.Tensor:
    """F_attn + F_mlp of one block as a function of its gate values (differentiable).

    F_attn = I1 F_c1 + I2 (F_c3 - F_c1) + I3 (F_msa - F_c3) with I = cumprod(g); with head gates
    F_msa = F_shared + (F_msa(one head) - F_shared) * (sum(head gates) + prod(1 - head gates)), with
    F_shared what msa costs whatever heads it keeps (Swin V2's position-bias MLP input layer and
    post-norm; else nothing): msa keeps at least one head (the architecture keeps the one of highest
    logit), so closing the last one saves nothing.
    Without ``conv3x3`` (left out of the block's choices, its state computes conv1x1) F_c3 = F_c1.
    """
    i = torch.cumprod(attn_gates, 0)
    f1 = _conv1x1(b)
    f3 = _conv3x3(b) if conv3x3 else f1
    shared = _msa_shared(b)
    heads = None if head_gates is None else head_gates.sum() + torch.prod(1 - head_gates)
    fm = _msa(b) if heads is None else shared + (_msa(b, 1) - shared) * heads
    f_attn = i[0] * f1 + i[1] * (f3 - f1) + i[2] * (fm - f3)
    return f_attn + mlp_flops(b, 1) * mlp_gates.sum()


def _sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """q @ k^T and attn @ v of ``aten::scaled_dot_product_attention``: B*h*Nq*Nk*(d_qk + d_v)."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = 1
    for s in q[:-2]:
        batch *= s
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def measure_flops(model: nn.Module, input_size: Tuple[int, int, int]) -> Tuple[int, Dict[str, int]]:
    """fvcore count of one image through ``model`` (in eval mode): total and per-module totals."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
        analysis = FlopCountAnalysis(model, x)
        analysis.set_op_handle('aten::scaled_dot_product_attention', _sdpa_flop_jit)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings('none')
        with torch.no_grad():
            return int(analysis.total()), {k: int(v) for k, v in analysis.by_module().items()}
    finally:
        model.train(was_training)


def msa_block_flops(dims: Sequence[BlockDims]) -> int:
    """What the untouched blocks' attention and MLPs cost, analytically."""
    return sum(_msa(b) + mlp_flops(b, b.hidden) for b in dims)


__all__ = ['ATTN_OPS', 'BlockDims', 'attn_flops', 'block_attn_flops', 'mlp_flops', 'arch_flops', 'gated_block_flops',
           'measure_flops', 'msa_block_flops']
