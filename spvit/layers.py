"""The plain modules a pruned model is made of besides timm's: what a block's attention becomes
when it turns into a convolution, is skipped, or keeps only some of its heads. No search code."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention

from .errors import UnsupportedModelError


def rotate_patch_tokens(t: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int, half: bool) -> torch.Tensor:
    """RoPE on the patch tokens of q or k (B, heads, N, hd) as timm's ``EvaAttention`` applies it:
    the prefix tokens have no grid position and stay as they are."""
    rotated = apply_rot_embed_cat(t[:, :, num_prefix_tokens:], rope, half=half)
    return torch.cat([t[:, :, :num_prefix_tokens], rotated], dim=2).type_as(t)


def narrow_norm(norm: nn.Module, width: int) -> nn.Module:
    """A LayerNorm like ``norm`` (eps, affine) over ``width`` channels: an inner norm (timm's ``norm``
    before an MLP's fc2 or an attention's proj) of a pruned MLP or of kept heads, over the kept
    channels only (weights come from a state dict). Anything but a LayerNorm is returned as it is."""
    if not isinstance(norm, nn.LayerNorm):
        return norm
    w = norm.weight
    return nn.LayerNorm(width, eps=norm.eps, elementwise_affine=w is not None, bias=norm.bias is not None,
                        device=None if w is None else w.device, dtype=None if w is None else w.dtype)


class ConvAttention(nn.Module):
    """A block's attention turned into Conv2d(d -> hd, k x k) + ReLU + Linear(hd -> d) over the
    patch grid. The conv carries the mixed kernel with its BatchNorm folded in. With ``norm_eps``
    (the attention had an inner norm before its proj: Eva ``scale_attn_inner``, ViT
    ``scale_attn_norm``), a LayerNorm without affine over the hd channels runs before the Linear,
    which carries the inner norm's affine folded in.

    Prefix tokens (class, distillation, register) have no grid position: they get a zero update,
    as in the search. In a Swin block the tokens are one window (no prefix tokens) and the conv
    pads at the window border. ``attn_mask``/``is_causal`` (ViT), ``mask`` (Swin's shift mask),
    ``rope`` (Eva) and ``shared_rel_pos_bias`` (BEiT) are accepted because timm's blocks pass them;
    a conv has nothing to mask and reads its positions from the grid. In a Swin V2 block the block's
    post-norm follows (timm's ``norm1``), as it follows msa.
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
            norm_eps: Optional[float] = None,
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
        self.norm = nn.Identity() if norm_eps is None else nn.LayerNorm(head_dim, eps=norm_eps, elementwise_affine=False)
        self.proj = nn.Linear(head_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'grid={self.grid_size}, prefix_tokens={self.num_prefix_tokens}'

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                mask: Optional[torch.Tensor] = None, rope: Optional[torch.Tensor] = None,
                shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
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
        out = self.proj_drop(self.proj(self.norm(self.act(z))))
        return F.pad(out, (0, 0, self.num_prefix_tokens, 0))


class NoAttention(nn.Module):
    """A skipped attention: the branch adds zero, so the block keeps only its residual (and MLP).
    The block's attention norm is dropped with it (``hybridize``): a pre-norm would feed nothing, a
    post-norm (Swin V2) would add its bias to the zero branch."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                mask: Optional[torch.Tensor] = None, rope: Optional[torch.Tensor] = None,
                shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
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
            q_norm: Optional[nn.Module] = None,
            k_norm: Optional[nn.Module] = None,
            norm: Optional[nn.Module] = None,
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
        # timm's qk_norm: one norm over head_dim, shared by the heads (the original's modules)
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        # timm's scale_attn_norm: a norm over the (kept) heads' output channels before proj
        self.norm = norm if norm is not None else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, head_dim={self.head_dim}'

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, -1))))


class EvaHeadAttention(EvaAttention):
    """timm ``EvaAttention`` over ``num_heads`` heads of ``attn_head_dim`` each, whatever the model
    width: what it becomes when some heads are pruned (timm's forward reshapes the heads' output to
    the input width, which fewer heads do not fill). Same parameters and state-dict keys (fused qkv
    with q/v biases, or q/k/v projections), same RoPE on the patch tokens, and the inner norm
    (``scale_attn_inner``) over the kept heads' channels. Gated attention is not supported (the
    family refuses it)."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        if self.qkv is not None:
            bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias).reshape(B, N, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (p(x).reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
                       for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = rotate_patch_tokens(q, rope, self.num_prefix_tokens, self.rotate_half)
            k = rotate_patch_tokens(k, rope, self.num_prefix_tokens, self.rotate_half)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop.p if self.training else 0.)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(B, N, -1))))


class BeitHeadAttention(BeitAttention):
    """timm BEiT ``Attention`` over ``num_heads`` heads of ``attn_head_dim`` each, whatever the model
    width: what it becomes when some heads are pruned (timm's forward reshapes the heads' output to
    the input width, which fewer heads do not fill). Same parameters and state-dict keys: the fused
    qkv with q/v biases and the relative position bias table, one column per kept head. A bias
    shared by all blocks (``use_shared_rel_pos_bias``) has a column for every original head, so it
    is not accepted (the family refuses such models)."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if shared_rel_pos_bias is not None:
            raise UnsupportedModelError('kept heads with a shared relative position bias (use_shared_rel_pos_bias) '
                                        'are not supported')
        B, N, _ = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rel_pos_bias = None if self.relative_position_bias_table is None else self._get_rel_pos_bias()
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=rel_pos_bias,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if rel_pos_bias is not None:
                attn = attn + rel_pos_bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, -1)))


def swinv2_position_bias(attn: nn.Module) -> torch.Tensor:
    """Swin V2's continuous relative position bias of every head of ``attn`` (heads, N, N): the
    ``cpb_mlp`` of the log-spaced coordinates, gathered per token pair, through 16 * sigmoid, as
    timm's ``WindowAttention`` computes it. One output column of the MLP per head."""
    n = attn.window_size[0] * attn.window_size[1]
    table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
    bias = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
    return 16 * torch.sigmoid(bias)


def cosine_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logit_scale: torch.Tensor,
                            position_bias: torch.Tensor, mask: Optional[torch.Tensor], attn_drop: nn.Module
                            ) -> torch.Tensor:
    """Swin V2's attention of q, k, v (windows * B, heads, N, hd) as timm computes it: cosine
    similarity times the per-head learned scale (clamped at log 100, exp), the position bias
    (heads, N, N) and the shift mask (windows, N, N) added. Returns (windows * B, heads, N, hd)."""
    _, heads, n, _ = q.shape
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * torch.clamp(logit_scale, max=math.log(1. / 0.01)).exp()
    attn = attn + position_bias.unsqueeze(0)
    if mask is not None:
        num_win = mask.shape[0]
        attn = (attn.view(-1, num_win, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, n, n)
    return attn_drop(attn.softmax(dim=-1)) @ v


class SwinV2HeadAttention(SwinV2WindowAttention):
    """timm Swin V2 ``WindowAttention`` over ``num_heads`` heads of ``head_dim`` each, whatever the
    block width: what it becomes when some heads are pruned (timm's forward reshapes the heads'
    output to the input width, which fewer heads do not fill). Same parameters and state-dict keys:
    the fused qkv with q/v biases, one ``logit_scale`` entry per kept head and one output row of the
    position-bias MLP's last layer per kept head (its first layer is shared by the heads)."""

    def __init__(
            self,
            dim: int,
            window_size: Tuple[int, int],
            num_heads: int,
            head_dim: int,
            qkv_bias: bool = True,
            qkv_bias_separate: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            pretrained_window_size: Tuple[int, int] = (0, 0),
            device=None,
            dtype=None,
    ) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__(dim, window_size, num_heads, qkv_bias=qkv_bias, qkv_bias_separate=qkv_bias_separate,
                         attn_drop=attn_drop, proj_drop=proj_drop, pretrained_window_size=pretrained_window_size, **dd)
        width = num_heads * head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, 3 * width, bias=False, **dd)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(width, **dd))
            self.k_bias = torch.zeros(width, **dd)      # timm's non-persistent zero buffer
            self.v_bias = nn.Parameter(torch.zeros(width, **dd))
        self.proj = nn.Linear(width, dim, **dd)

    def extra_repr(self) -> str:
        return f'heads={self.num_heads}, head_dim={self.head_dim}'

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            qkv = self.qkv(x) + bias if self.qkv_bias_separate else F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = cosine_window_attention(q, k, v, self.logit_scale, swinv2_position_bias(self), mask, self.attn_drop)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B_, N, -1)))
