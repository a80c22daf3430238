"""Head-to-offset mixing: conv kernels built from an MSA's value and output projections.

Offset k of the 3x3 window is (dy, dx) = OFFSETS[k] (row-major, centre = 4), which is kernel
position (dy + 1, dx + 1) of ``torch.nn.functional.conv2d``.
"""
from __future__ import annotations

from typing import Tuple

import torch

OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
CENTER = OFFSETS.index((0, 0))


def head_mixing(assign: torch.Tensor, alpha: float) -> torch.Tensor:
    """P = softmax(A / alpha) over heads: column k is the soft choice of a head for offset k."""
    return torch.softmax(assign / alpha, dim=0)


# The weight mixes below use broadcasting and sums rather than einsum so that fvcore, which
# counts einsum, does not charge the (batch-independent) kernel construction to the model.

def mix_value(weight: torch.Tensor, bias: torch.Tensor | None, mix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor | None]:
    """K_k = sum_h P[h,k] W_v^h and b_k = sum_h P[h,k] b_v^h: shapes (9, hd, d) and (9, hd)."""
    heads = mix.shape[0]
    w = weight.reshape(heads, 1, -1, weight.shape[-1])            # (h, 1, hd, d)
    kernels = (mix[:, :, None, None] * w).sum(0)                  # (9, hd, d)
    if bias is None:
        return kernels, None
    return kernels, (mix[:, :, None] * bias.reshape(heads, 1, -1)).sum(0)


def mix_output(weight: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """O_k = sum_h P[h,k] W_o^h: shape (9, d, hd)."""
    heads = mix.shape[0]
    w = weight.reshape(weight.shape[0], heads, -1).transpose(0, 1)  # (h, d, hd)
    return (mix[:, :, None, None] * w[:, None]).sum(0)


def conv3x3_weight(kernels: torch.Tensor) -> torch.Tensor:
    """Stack the 9 offset matrices (9, hd, d) into a conv2d weight (hd, d, 3, 3)."""
    hd, d = kernels.shape[1:]
    return kernels.permute(1, 2, 0).reshape(hd, d, 3, 3)


class _MixHeads(torch.autograd.Function):
    """V_k = sum_h P[h,k] v_h for every patch: (B, heads, P, C) x (heads, 9) -> (B, P, 9, C).

    Same as ``torch.einsum('bhpc,hk->bpkc')``, but keeps v as given for the backward pass:
    einsum saves its own rearranged copy of v, one more activation per block.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(v, mix)
        return torch.einsum('bhpc,hk->bpkc', v, mix)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, mix = ctx.saved_tensors
        grad_v = torch.einsum('bpkc,hk->bhpc', grad, mix) if ctx.needs_input_grad[0] else None
        grad_mix = torch.einsum('bhpc,bpkc->hk', v, grad) if ctx.needs_input_grad[1] else None
        return grad_v, grad_mix


def mix_heads(v: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """Per-offset head mixtures of the value projection: (B, heads, P, C) -> (B, P, 9, C)."""
    return _MixHeads.apply(v, mix)


def _valid(delta: int, size: int) -> Tuple[slice, slice]:
    """Output positions p (and source positions p + delta) that stay inside [0, size)."""
    lo, hi = max(0, -delta), size - max(0, delta)
    return slice(lo, hi), slice(lo + delta, hi + delta)


class _ShiftedSum(torch.autograd.Function):
    """out[b, y, x] = sum_k v[b, y + dy_k, x + dx_k, k] over in-range positions (zero padding).

    Written as one function because slicing a padded tensor nine times makes autograd allocate
    and zero a full-size gradient per slice, which dominated the search step.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor) -> torch.Tensor:            # v: (B, H, W, 9, C)
        H, W = v.shape[1:3]
        out = v[:, :, :, CENTER].clone()
        for k, (dy, dx) in enumerate(OFFSETS):
            if k == CENTER:
                continue
            (oy, sy), (ox, sx) = _valid(dy, H), _valid(dx, W)
            out[:, oy, ox] += v[:, sy, sx, k]
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:        # grad: (B, H, W, C)
        H, W = grad.shape[1:3]
        padded = torch.nn.functional.pad(grad, (0, 0, 1, 1, 1, 1))
        return torch.stack([padded[:, 1 - dy:1 - dy + H, 1 - dx:1 - dx + W] for dy, dx in OFFSETS], dim=3)


def shifted_sum(v: torch.Tensor) -> torch.Tensor:
    """Sum of the 9 offset planes of v (B, H, W, 9, C), each read at its offset with zero padding:
    the 3x3 convolution once every offset's kernel has been applied."""
    return _ShiftedSum.apply(v)


def border_mask(grid: Tuple[int, int]) -> torch.Tensor:
    """(H, W, 9): 1 where offset k of position (y, x) falls outside the grid."""
    H, W = grid
    outside = torch.ones(H, W, len(OFFSETS))
    for k, (dy, dx) in enumerate(OFFSETS):
        (oy, _), (ox, _) = _valid(dy, H), _valid(dx, W)
        outside[oy, ox, k] = 0
    return outside


def border_bias(bias: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """(H, W, C): the sum of the offset biases (9, C) that fall outside the grid at each position.

    A conv pads x with zeros but still adds every offset's bias, so a shifted sum of values that
    already carry their bias misses exactly this term at the border. ``outside`` is ``border_mask``.
    """
    return outside.to(bias.dtype) @ bias
