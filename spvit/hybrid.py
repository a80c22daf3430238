"""The exported model's plain modules, and how they replace a timm model's attention and MLPs.

Nothing here imports search-time code (gates, slots, supernet, head mixing): a pruned model is a
timm model plus these modules, so loading one needs only timm, torch and the architecture spec.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch import Architecture
from .errors import ArchitectureError, UnsupportedModelError


class ConvAttention(nn.Module):
    """A block's attention turned into Conv2d(d -> hd, k x k) + ReLU + Linear(hd -> d) over the
    patch grid. The conv carries the mixed kernel with its BatchNorm folded in.

    Prefix tokens (class, distillation, register) have no grid position: they get a zero update,
    as in the search. In a Swin block the tokens are one window (no prefix tokens) and the conv
    pads at the window border. ``attn_mask``/``is_causal`` (ViT) and ``mask`` (Swin's shift mask)
    are accepted because timm's blocks pass them; a conv has nothing to mask.
    """

    def __init__(
            self,
            dim: int,
            head_dim: int,
            kernel_size: int,
            grid_size: Tuple[int, int],
            num_prefix_tokens: int,
            proj_bias: bool = True,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(dim, head_dim, kernel_size, padding=kernel_size // 2, **dd)
        self.act = nn.ReLU()
        self.proj = nn.Linear(head_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'grid={self.grid_size}, prefix_tokens={self.num_prefix_tokens}'

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        H, W = self.grid_size
        patches = x[:, self.num_prefix_tokens:]
        if self.kernel_size == 1:
            # A 1x1 conv is a matmul on the tokens: no layout change at all (a free view of the weight).
            z = F.linear(patches, self.conv.weight.flatten(1), self.conv.bias)
        else:
            # Tokens are (B, H*W, C), i.e. an NHWC image: the permuted view is channels-last, which
            # the CPU/GPU conv kernels take without a transposing copy, and their output permutes back.
            img = patches.reshape(B, H, W, C).permute(0, 3, 1, 2)
            z = self.conv(img).permute(0, 2, 3, 1).reshape(B, H * W, -1)
        out = self.proj_drop(self.proj(self.act(z)))
        return F.pad(out, (0, 0, self.num_prefix_tokens, 0))


class NoAttention(nn.Module):
    """A skipped attention: the branch adds zero, so the block keeps only its residual (and MLP)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.zeros_like(x)


class HeadAttention(nn.Module):
    """Multi-head self-attention over ``num_heads`` heads of ``head_dim`` each, whatever the model
    width: what a timm ``Attention`` becomes when some of its heads are pruned. Its state dict
    has timm's keys (qkv, proj), holding the kept heads' rows and columns."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: int,
            qkv_bias: bool = True,
            proj_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias, **dd)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, head_dim={self.head_dim}'

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def _vit_heads(attn: nn.Module, heads: int) -> nn.Module:
    w = attn.qkv.weight
    return HeadAttention(w.shape[1], heads, attn.head_dim, qkv_bias=attn.qkv.bias is not None,
                         proj_bias=attn.proj.bias is not None, attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
                         device=w.device, dtype=w.dtype)


def _swin_heads(attn: nn.Module, heads: int) -> nn.Module:
    from timm.models.swin_transformer import WindowAttention
    w = attn.qkv.weight
    head_dim = attn.qkv.out_features // (3 * attn.num_heads)
    return WindowAttention(w.shape[1], heads, head_dim=head_dim, window_size=attn.window_size,
                           qkv_bias=attn.qkv.bias is not None, attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
                           device=w.device, dtype=w.dtype)


def keep_heads(attn: nn.Module, heads: int) -> nn.Module:
    """A timm attention with only ``heads`` of its heads (random init; weights come from a state dict)."""
    from timm.layers import Attention
    from timm.models.swin_transformer import WindowAttention
    pruners = {Attention: _vit_heads, WindowAttention: _swin_heads}     # attention type -> its head-pruned form
    for cls, prune in pruners.items():
        if type(attn) is cls:
            return prune(attn, heads)
    raise UnsupportedModelError(f'{type(attn).__name__}: cannot prune its heads')


def _conv_builder(kernel_size: int) -> Callable[..., nn.Module]:
    def build(attn: nn.Module, grid_size: Tuple[int, int], num_prefix_tokens: int) -> nn.Module:
        w = attn.proj.weight
        head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        return ConvAttention(attn.proj.out_features, head_dim, kernel_size, grid_size, num_prefix_tokens,
                             proj_bias=attn.proj.bias is not None, proj_drop=attn.proj_drop.p,
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
    """Shrink a timm ``Mlp`` to ``hidden`` units, in place (new fc1/fc2 of that width, random init)."""
    fc1, fc2 = mlp.fc1, mlp.fc2
    dd = {'device': fc1.weight.device, 'dtype': fc1.weight.dtype}
    mlp.fc1 = nn.Linear(fc1.in_features, hidden, bias=fc1.bias is not None, **dd)
    mlp.fc2 = nn.Linear(hidden, fc2.out_features, bias=fc2.bias is not None, **dd)
    return mlp


Layout = List[Tuple[nn.Module, Tuple[int, int], int]]


def _vit_layout(model: nn.Module) -> Layout:
    grid, npt = tuple(model.patch_embed.grid_size), model.num_prefix_tokens
    return [(blk, grid, npt) for blk in model.blocks]


def _swin_layout(model: nn.Module) -> Layout:
    return [(blk, tuple(blk.window_size), 0) for stage in model.layers for blk in stage.blocks]


def layout(model: nn.Module) -> Layout:
    """(block, grid the conv ops run on, number of prefix tokens) for each block of a supported
    timm model: the patch grid for ViTs, the window for Swin."""
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer
    layouts = {VisionTransformer: _vit_layout, SwinTransformer: _swin_layout}   # model family -> its blocks
    for cls, family_layout in layouts.items():
        if isinstance(model, cls):
            return family_layout(model)
    raise UnsupportedModelError(f'{type(model).__name__} cannot be made hybrid; only timm VisionTransformer '
                                'and SwinTransformer models')


def mlp_widths(model: nn.Module) -> List[int]:
    """Each block's MLP hidden width (the full widths of an unmodified model)."""
    return [blk.mlp.fc1.out_features for blk, _, _ in layout(model)]


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
    replaced per op (a skipped block loses its attention pre-norm as well, which nothing would
    read), msa with kept heads narrowed to them, MLPs shrunk to their kept width. Weights of
    replaced parts are random; the exporter and ``load_pruned`` fill them from a state dict."""
    from timm.layers import Attention
    from timm.models.swin_transformer import WindowAttention
    blocks = layout(model)
    arch.validate([blk.mlp.fc1.out_features for blk, _, _ in blocks],
                  max_heads=[blk.attn.num_heads for blk, _, _ in blocks])
    check_token_path(model, arch)
    for i, ((blk, grid, npt), b) in enumerate(zip(blocks, arch.blocks)):
        if type(blk.attn) not in (Attention, WindowAttention):
            raise UnsupportedModelError(f'block {i}: {type(blk.attn).__name__} is not a timm attention (already hybrid?)')
        blk.attn = ATTENTION_BUILDERS[b.attn](blk.attn, grid, npt)
        if b.heads is not None and len(b.heads) < blk.attn.num_heads:
            blk.attn = keep_heads(blk.attn, len(b.heads))
        if b.attn == 'skip':        # the whole attention branch goes, its pre-norm too
            blk.norm1 = nn.Identity()
        if b.mlp_hidden != blk.mlp.fc1.out_features:
            prune_mlp(blk.mlp, b.mlp_hidden)
    return model


__all__ = ['ConvAttention', 'NoAttention', 'HeadAttention', 'keep_heads', 'ATTENTION_BUILDERS', 'prune_mlp',
           'mlp_widths', 'layout', 'hybridize', 'classifies_from_prefix_tokens', 'check_token_path']
