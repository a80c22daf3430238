"""Head-to-offset mixing: conv kernels built from an MSA's value and output projections.

Offset k of the 3x3 window is (dy, dx) = OFFSETS[k] (row-major, centre = 4), which is kernel
position (dy + 1, dx + 1) of ``torch.nn.functional.conv2d``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

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


def mixed_convs(v: torch.Tensor, mix: torch.Tensor, grid: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The conv3x3 and conv1x1 ops on the value heads v (B, heads, P, C), (B, P, C) each:
    conv3x3[b, p] = sum_k sum_h P[h, k] v_h[b, p + offset_k], zero padded at the grid's border, and
    conv1x1 the centre offset's sum_h P[h, centre] v_h.

    No (B, P, 9, C) tensor of per-offset head mixtures is ever built (the mixtures and their
    shifted sum were the largest part of the search step's extra time). Two exact formulations
    (``benchmarks/mixing_ops.py`` times them), each in the memory layout ``batch_norm_tokens``
    reads in its mode: eager, one depthwise conv (``depthwise_mixed_convs``, conv3x3 channels
    first), the fastest eager by far; under torch.compile, the shifted sum written out
    (``shifted_mixed_convs``, channels last), which inductor fuses into one stencil kernel forward
    and one backward, vectorised over the channels.
    """
    if _is_compiling():
        return shifted_mixed_convs(v, mix, grid)
    return depthwise_mixed_convs(v, mix, grid)


def depthwise_mixed_convs(v: torch.Tensor, mix: torch.Tensor, grid: Tuple[int, int]
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mixed_convs`` as one depthwise conv2d over the heads' channels (channel h * C + c, as the
    value projection lays them out, so v needs no reordering), each channel's 3x3 kernel being P's
    row for its head (offset k is kernel position k in row-major order), summed over the heads.
    conv3x3 comes as a transposed view of a channels-first (B, C, P) tensor, conv1x1 channels last."""
    B, heads, P, C = v.shape
    x = v.transpose(2, 3).reshape(B, heads * C, *grid)
    kernel = mix.reshape(heads, 1, 1, 3, 3).expand(heads, C, 1, 3, 3).reshape(heads * C, 1, 3, 3)
    conv3x3 = F.conv2d(x, kernel, padding=1, groups=heads * C).reshape(B, heads, C, P).sum(1)
    return conv3x3.transpose(1, 2), (v * mix[:, CENTER, None, None]).sum(1)


def shifted_mixed_convs(v: torch.Tensor, mix: torch.Tensor, grid: Tuple[int, int]
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mixed_convs`` as the sum over offsets of the zero-padded grid read at offset k times P's
    column k: in eager mode 9 shifted copies, compiled a single pointwise kernel (and reductions
    for P's gradient) that reads v in place. Channels last."""
    B, heads, P, C = v.shape
    H, W = grid
    x = F.pad(v.reshape(B, heads, H, W, C), (0, 0, 1, 1, 1, 1))
    mixed = sum(x[:, :, 1 + dy:1 + dy + H, 1 + dx:1 + dx + W] * mix[:, k, None, None, None]
                for k, (dy, dx) in enumerate(OFFSETS))
    return mixed.sum(1).reshape(B, P, C), (v * mix[:, CENTER, None, None]).sum(1)


def batch_norm_tokens(z: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    """``bn`` over the channels of z (B, P, C). Eager on the (B, C, P) view, as the depthwise conv
    computes conv3x3; under torch.compile on (B * P, C) rows, as the shifted sum computes them, which
    inductor vectorises over the channels (on the channels-first view its BatchNorm backward
    gathered them one element at a time, and a compiled attention slot cost twice as much more
    than timm's attention: ``benchmarks/mixing_ops.py``)."""
    if _is_compiling():
        return bn(z.reshape(-1, z.shape[-1])).reshape(z.shape)
    return bn(z.transpose(1, 2)).transpose(1, 2)


def _is_compiling() -> bool:
    """True while dynamo traces (torch.compile, torch.export); ``torch.compiler.is_compiling``
    is torch >= 2.3, ``torch._dynamo.is_compiling`` the older spelling."""
    check = getattr(torch.compiler, 'is_compiling', None) if hasattr(torch, 'compiler') else None
    return bool(check()) if check is not None else torch._dynamo.is_compiling()


def border_mask(grid: Tuple[int, int]) -> torch.Tensor:
    """(H, W, 9): 1 where offset k of position (y, x) falls outside the grid."""
    H, W = grid
    outside = torch.ones(H, W, len(OFFSETS))
    for k, (dy, dx) in enumerate(OFFSETS):
        outside[max(0, -dy):H - max(0, dy), max(0, -dx):W - max(0, dx), k] = 0
    return outside


def border_bias(bias: torch.Tensor, mix: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """(H, W, C): at each position the sum of the offset biases b_k = sum_h P[h,k] b_v^h (``bias``
    is b_v, (heads, C)) of the offsets that fall outside the grid.

    A conv pads x with zeros but still adds every offset's bias, so a conv of values that already
    carry their bias (``mixed_convs``) misses exactly this term at the border. ``outside`` is
    ``border_mask``. Eager two matmuls; compiled broadcast sums, which inductor fuses with the
    conv's BatchNorm (with the matmuls a compiled deit_tiny search step at batch 16 kept 755 MiB
    of step memory instead of 688).
    """
    outside = outside.to(bias.dtype)
    if _is_compiling():
        return (outside[..., None] * (mix[:, :, None] * bias[:, None]).sum(0)).sum(-2)
    return outside @ (mix.t() @ bias)
