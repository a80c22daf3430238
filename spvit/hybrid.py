"""How an unmodified timm model takes the structure of an architecture: its attention modules
replaced by the plain modules of ``layers`` per op, heads and MLPs narrowed.

Nothing here imports search-time code (gates, slots, supernet, head mixing): a pruned model is a
timm model plus these modules, so loading one needs only timm, torch and the architecture spec.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch.nn as nn

from .arch import Architecture, BlockArch
from .errors import ArchitectureError, UnsupportedModelError
from .families import Family, Layout, family_of, mlp_hidden
from .layers import ConvAttention, EvaHeadAttention, HeadAttention, NoAttention, narrow_norm


def _conv_builder(kernel_size: int) -> Callable[..., nn.Module]:
    def build(attn: nn.Module, grid_size: Tuple[int, int], num_prefix_tokens: int) -> nn.Module:
        w = attn.proj.weight
        head_dim = attn.proj.in_features // attn.num_heads
        # an inner norm before proj (a LayerNorm; the families refuse others) normalises the conv's hd
        # channels, its affine folded into proj (its bias makes a bias of proj's)
        norm = getattr(attn, 'norm', None)
        norm = norm if isinstance(norm, nn.LayerNorm) else None
        return ConvAttention(attn.proj.out_features, head_dim, kernel_size, grid_size, num_prefix_tokens,
                             proj_bias=attn.proj.bias is not None or (norm is not None and norm.bias is not None),
                             proj_drop=attn.proj_drop.p, norm_eps=None if norm is None else norm.eps,
                             device=w.device, dtype=w.dtype)
    return build


# attention op -> what replaces a timm Attention (random init; weights come from a state dict).
ATTENTION_BUILDERS: Dict[str, Callable[[nn.Module, Tuple[int, int], int], nn.Module]] = {
    'skip': lambda attn, grid, npt: NoAttention(),
    'conv1x1': _conv_builder(1),
    'conv3x3': _conv_builder(3),
    'msa': lambda attn, grid, npt: attn,
}


def prune_mlp(mlp: nn.Module, hidden: int) -> nn.Module:
    """Shrink a timm ``Mlp``, ``GluMlp`` (its fc1 packs a gate and a value row per unit) or ``SwiGLU``
    (fc1_g, fc1_x) to ``hidden`` units, in place (new input projections, inner norm and fc2 of that
    width, random init)."""
    fc2 = mlp.fc2
    dd = {'device': fc2.weight.device, 'dtype': fc2.weight.dtype}
    for name in ('fc1', 'fc1_g', 'fc1_x'):
        fc = getattr(mlp, name, None)
        if fc is not None:
            rows_per_unit = fc.out_features // fc2.in_features
            setattr(mlp, name, nn.Linear(fc.in_features, rows_per_unit * hidden, bias=fc.bias is not None, **dd))
    mlp.fc2 = nn.Linear(hidden, fc2.out_features, bias=fc2.bias is not None, **dd)
    mlp.norm = narrow_norm(mlp.norm, hidden)
    return mlp


def layout(model: nn.Module) -> Layout:
    """(block, grid the conv ops run on, number of prefix tokens) for each block of a supported
    timm model: the patch grid for ViTs, the window for Swin."""
    return family_of(model).layout(model)


def mlp_widths(model: nn.Module) -> List[int]:
    """Each block's MLP hidden width (the full widths of an unmodified model)."""
    return [mlp_hidden(blk.mlp) for blk, _, _ in layout(model)]


def classifies_from_prefix_tokens(model: nn.Module) -> bool:
    """Whether the head reads only prefix tokens (class-token pooling, DeiT's distillation token).
    Conv ops and skip leave prefix tokens unchanged, so such a model sees the image only through
    the blocks that keep msa."""
    return getattr(model, 'global_pool', None) == 'token' and getattr(model, 'num_prefix_tokens', 0) > 0


def check_token_path(model: nn.Module, arch: Architecture) -> None:
    """Refuse an architecture that gives a class-token model no path from the patches to its head."""
    if classifies_from_prefix_tokens(model) and not any(b.attn == 'msa' for b in arch.blocks):
        raise ArchitectureError(f'no block of the architecture keeps msa, but {arch.model} classifies from its class '
                                'token, which conv ops and skip never update: the head would not see the image. '
                                'Keep msa in at least one block (or use a model with global_pool=avg)')


def hybridize(model: nn.Module, arch: Architecture) -> nn.Module:
    """Give an unmodified timm model the structure of ``arch``, in place: attention modules
    replaced per op (a skipped block loses its attention norm as well: a pre-norm that nothing would
    read, or a post-norm that would add its bias to the zero branch), msa with kept heads narrowed
    to them, MLPs shrunk to their kept width. Weights of replaced parts are random; the exporter and ``load_pruned`` fill them from a state dict."""
    family = family_of(model)
    blocks = family.layout(model)
    arch.validate([mlp_hidden(blk.mlp) for blk, _, _ in blocks],
                  max_heads=[blk.attn.num_heads for blk, _, _ in blocks])
    check_token_path(model, arch)
    for i, ((blk, grid, npt), b) in enumerate(zip(blocks, arch.blocks)):
        if type(blk.attn) not in family.attention_types():
            raise UnsupportedModelError(f'block {i}: {type(blk.attn).__name__} is not a timm attention (already hybrid?)')
        hybridize_block(family, blk, grid, npt, b)
    return model


def hybridize_block(family: Family, blk: nn.Module, grid: Tuple[int, int], npt: int, b: BlockArch) -> nn.Module:
    """One block of ``hybridize``, in place: what the pruned model holds for ``b`` (the latency
    tables time these very modules)."""
    blk.attn = ATTENTION_BUILDERS[b.attn](blk.attn, grid, npt)
    if b.heads is not None and len(b.heads) < blk.attn.num_heads:
        blk.attn = family.keep_heads(blk.attn, len(b.heads))
    if b.attn == 'skip':        # the whole attention branch goes, its norm too (pre- or post-norm)
        blk.norm1 = nn.Identity()
    if b.mlp_hidden != mlp_hidden(blk.mlp):
        prune_mlp(blk.mlp, b.mlp_hidden)
    return blk


__all__ = ['ConvAttention', 'NoAttention', 'HeadAttention', 'EvaHeadAttention', 'ATTENTION_BUILDERS', 'prune_mlp',
           'mlp_widths', 'layout', 'hybridize', 'hybridize_block', 'classifies_from_prefix_tokens', 'check_token_path']
