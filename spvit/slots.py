"""Search-time replacements for a transformer block's attention and MLP.

Both read the pretrained ``nn.Linear`` modules they replace (the very same parameters, so the
MSA and the conv branches never drift apart) and add only what the search needs: gate logits,
the head assignment and two BatchNorms. Either slot can be pinned to one choice, which makes its
forward compute exactly that choice (what export produces, but still weight-shared).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .arch import ATTN_OPS
from .errors import UnsupportedModelError
from .gates import attention_coefficients, attention_gates, hold_conv3x3_open, sample_gates
from .layers import cosine_window_attention, rotate_patch_tokens, swinv2_position_bias
from .mixing import (CENTER, OFFSETS, batch_norm_tokens, border_bias, border_mask, conv3x3_weight, head_mixing,
                     mix_output, mix_value, mixed_convs)


def inner_norm_of(module: nn.Module) -> Optional[nn.LayerNorm]:
    """The inner LayerNorm (timm's ``norm`` before an output projection) of an attention or MLP, or None."""
    norm = getattr(module, 'norm', None)
    return norm if isinstance(norm, nn.LayerNorm) else None


def masked_layer_norm(x: torch.Tensor, gates: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """``norm`` over the last dim of ``x`` with statistics over the open channels only, weighted
    by their ``gates``: mean = sum g x / sum g, var = sum g (x - mean)^2 / sum g. With every gate 1
    it is ``norm(x)``; with 0/1 gates it is, on the open channels, the norm of the kept channels
    alone (what export builds), so closing a channel does not move the others. The caller
    multiplies by the gates after (a closed channel must not pass its affine bias on)."""
    if x.dtype in (torch.float16, torch.bfloat16):     # statistics in float32, as autocast runs layer_norm
        x = x.float()
    p = (gates / gates.sum().clamp_min(1e-12)).to(x.dtype)
    # elementwise sums, not matmuls: autocast would run a matmul in half precision
    xc = x - (x * p).sum(-1, keepdim=True)
    y = xc * torch.rsqrt((xc * xc * p).sum(-1, keepdim=True) + norm.eps)
    if norm.weight is not None:
        y = y * norm.weight
    return y if norm.bias is None else y + norm.bias


def kept_layer_norm(x: torch.Tensor, norm: nn.LayerNorm, kept: torch.Tensor) -> torch.Tensor:
    """``norm`` over the ``kept`` channels only, ``x`` holding just those: the pruned model's norm."""
    return F.layer_norm(x, (kept.numel(),), None if norm.weight is None else norm.weight[kept],
                        None if norm.bias is None else norm.bias[kept], norm.eps)


class AttentionSlot(nn.Module):
    """skip / conv1x1 / conv3x3 / msa on the tokens of a ViT block, weight-shared with its MSA."""

    def __init__(
            self,
            attn: nn.Module,
            grid_size: Tuple[int, int],
            num_prefix_tokens: int,
            theta0: float = 1.5,
            alpha: float = 0.01,
            head_gates: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = attn.num_heads
        self.head_dim = attn.proj.in_features // attn.num_heads
        self.scale = getattr(attn, 'scale', None)          # Swin V2's cosine attention has none
        self.fused_attn = getattr(attn, 'fused_attn', False)
        self.grid_size = tuple(grid_size)
        self.num_prefix_tokens = num_prefix_tokens
        self.alpha = alpha
        self.qkv = attn.qkv
        self.attn_drop = attn.attn_drop
        self.proj = attn.proj
        # qk-norm (timm's qk_norm=True): one norm over head_dim, shared by the heads; msa only, the
        # conv ops read v
        self.q_norm = getattr(attn, 'q_norm', None) or nn.Identity()
        self.k_norm = getattr(attn, 'k_norm', None) or nn.Identity()
        # inner norm over the attention output channels before proj (Eva scale_attn_inner, ViT
        # scale_attn_norm): msa takes its statistics over the open heads' channels only; a conv op's
        # activation (hd channels, one "head") is normalised over its own channels and takes each
        # head's slice of the norm's affine as it takes the head's slice of proj (see _conv_norm)
        self.norm = inner_norm_of(attn)
        self.proj_drop = attn.proj_drop
        dd = {'device': attn.proj.weight.device, 'dtype': attn.proj.weight.dtype}
        self.head_assign = nn.Parameter(torch.ones(self.num_heads, len(OFFSETS), **dd))
        self.bn1 = nn.BatchNorm1d(self.head_dim, **dd)
        self.bn3 = nn.BatchNorm1d(self.head_dim, **dd)
        self.gate_logits = nn.Parameter(torch.full((3,), float(theta0), **dd))
        # one gate per head of msa (search space with heads); None: msa keeps all its heads
        self.head_logits = nn.Parameter(torch.full((self.num_heads,), float(theta0), **dd)) if head_gates else None
        self.head_values: Optional[torch.Tensor] = None   # used instead of the head logits' gates (importance scores)
        self.op_gates = True      # False: the op gates stay open (msa), only heads are searched
        # True (a space with heads, where conv3x3 costs more than msa with one head): conv3x3 is no
        # choice; closing msa gives conv1x1 (see hold_conv3x3_open)
        self.conv3x3_left_out = False
        self.register_buffer('border', border_mask(self.grid_size).to(**dd), persistent=False)
        self.pinned_op: Optional[str] = None
        self.pinned_heads: Optional[torch.Tensor] = None     # msa: indices of the kept heads (None: all)
        self.gate_values: Optional[torch.Tensor] = None   # used instead of the logits' gates (importance scores)
        # scale of the sampling noise in training (see sample_gates): a tensor, set in place each step
        self.register_buffer('gate_noise', torch.ones((), **dd), persistent=False)

    def extra_repr(self) -> str:
        return (f'heads={self.num_heads}, grid={self.grid_size}, alpha={self.alpha}, head_gates='
                f'{self.head_logits is not None}, pinned={self.pinned_op}')

    def kept_heads(self) -> Optional[List[int]]:
        """The heads msa keeps under the deterministic head gates (at least the one of highest
        logit); None without head gates or with every head open."""
        if self.head_logits is None:
            return None
        logits = self.head_logits.detach()
        kept = (logits > 0).nonzero().flatten().tolist() or [int(logits.argmax())]
        return None if len(kept) == self.num_heads else kept

    def pin(self, op: Optional[str], heads: Optional[Sequence[int]] = None) -> None:
        """Compute only ``op`` (None: back to the gated search); msa may keep only ``heads``."""
        if op is not None and op not in ATTN_OPS:
            raise ValueError(f'unknown attention op {op!r}')
        if heads is not None and op != 'msa':
            raise ValueError(f'only msa keeps heads, not {op}')
        self.pinned_op = op
        self.pinned_heads = None if heads is None or len(heads) == self.num_heads else \
            torch.as_tensor(sorted(heads), dtype=torch.long, device=self.proj.weight.device)

    def head_channels(self, heads: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The qkv rows (q, k and v parts) and the proj columns that belong to ``heads``."""
        hd, dim = self.head_dim, self.num_heads * self.head_dim
        cols = (heads[:, None] * hd + torch.arange(hd, device=heads.device)).flatten()
        return torch.cat([cols + part * dim for part in range(3)]), cols

    def mixing(self) -> torch.Tensor:
        return head_mixing(self.head_assign, self.alpha)

    # --- the q/k/v projection (subclasses store it differently: Eva's separate biases) ---

    def qkv_weight(self) -> torch.Tensor:
        """The (3 * width, d) weight of q, k and v stacked, whatever the attention stores."""
        return self.qkv.weight

    def qkv_bias(self) -> Optional[torch.Tensor]:
        """The stacked q, k, v bias (None without one)."""
        return self.qkv.bias

    def _project(self, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q, k and v of ``x`` (B, N, 3 * width), or only their ``rows``."""
        if rows is None:
            return self.qkv(x)
        bias = self.qkv_bias()
        return F.linear(x, self.qkv_weight()[rows], None if bias is None else bias[rows])

    def value_projection(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """W_v (width, d) and b_v: all the conv ops read of the input side."""
        width = self.num_heads * self.head_dim
        bias = self.qkv_bias()
        return self.qkv_weight()[2 * width:], None if bias is None else bias[2 * width:]

    # --- pieces shared by the search and the pinned forward ---

    def _prepare_qk(self, q: torch.Tensor, k: torch.Tensor, rope: Optional[torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """q and k as the attention scores read them: the shared q/k norms (RoPE in Eva)."""
        return self.q_norm(q), self.k_norm(k)

    def _attend(self, q, k, v, attn_mask, is_causal, heads: Optional[torch.Tensor] = None,
                rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k = self._prepare_qk(q, k, rope)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if attn_mask is not None or is_causal:
                raise NotImplementedError('attention masks need fused attention')
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        B, _, N, _ = q.shape
        return x.transpose(1, 2).reshape(B, N, -1)

    def _norm_act(self, z: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
        shape = z.shape
        return F.relu(bn(z.reshape(-1, shape[-1]))).reshape(shape)

    def _prefix_zero(self, patch_out: torch.Tensor) -> torch.Tensor:
        """Prefix tokens get no attention update under conv ops."""
        return F.pad(patch_out, (0, 0, self.num_prefix_tokens, 0))

    # --- forward ---

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.pinned_op is not None:
            return self._forward_pinned(x, attn_mask, is_causal, rope)
        B, N, _ = x.shape
        qkv = self._project(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        a = self._gate_heads(self._attend(q, k, v, attn_mask, is_causal, rope=rope))
        if not self.op_gates:                 # a space without conv ops: msa in every block
            return self.proj_drop(self.proj(a))
        c_msa, c3, c1 = self._op_coefficients()

        # O_k = sum_h P[h,k] W_o^h, so a conv output O z is the MSA projection of z placed in
        # every head slot h with weight sum_k P[h,k] (conv3x3) or P[h,centre] (conv1x1): the conv
        # branches join the attention output before the one shared projection.
        mix = self.mixing()
        z3, z1 = self._conv_branches(v[:, :, self.num_prefix_tokens:], mix)
        w3 = (mix.sum(1) * c3)[:, None]
        w1 = (mix[:, CENTER] * c1)[:, None]
        conv = z3[:, :, None] * w3 + z1[:, :, None] * w1                       # (B, P, heads, hd)
        if self.norm is not None:   # head h's slice of the norm's affine, as head h's slice of proj
            weight, bias = self._norm_affine()
            conv = conv * weight
            if bias is not None:
                conv = conv + bias * (w3 + w1)
        conv = conv.flatten(2)                                                 # (B, P, d)
        out = F.linear(a * c_msa + self._prefix_zero(conv), self.proj.weight)
        b = self.proj.bias
        if b is not None:   # prefix tokens get the bias only from msa
            out = out + torch.cat([(b * c_msa).expand(self.num_prefix_tokens, -1),
                                   (b * (c_msa + c3 + c1)).expand(N - self.num_prefix_tokens, -1)])
        return self.proj_drop(out)

    def _gate_heads(self, a: torch.Tensor) -> torch.Tensor:
        """msa's output (B, N, width) with each head times its gate (as it is without head gates),
        through the inner norm if there is one (statistics over the open heads' channels only)."""
        if self.head_logits is None:
            return a if self.norm is None else self.norm(a)
        hg = self.head_values if self.head_values is not None else sample_gates(self.head_logits, self.training,
                                                                              self.gate_noise)
        hg = hg.repeat_interleave(self.head_dim)
        return (a if self.norm is None else masked_layer_norm(a, hg, self.norm)) * hg

    def _op_coefficients(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The weights of msa, conv3x3 and conv1x1 in the gated mixture (skip: all zero)."""
        gates = self.gate_values if self.gate_values is not None else attention_gates(self.gate_logits, self.training,
                                                                                      self.gate_noise)
        if self.conv3x3_left_out:
            gates = hold_conv3x3_open(gates)
        c_msa, c3, c1 = attention_coefficients(gates).unbind(0)
        if self.conv3x3_left_out:           # the conv3x3 state computes conv1x1
            c1, c3 = c1 + c3, torch.zeros_like(c3)
        return c_msa, c3, c1

    def _conv_branches(self, v: torch.Tensor, mix: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """conv3x3 and conv1x1 activations (B, P, hd) from the value projection that MSA already
        computed.

        v: (B, heads, P, hd), value of the patch tokens, bias included. Mixing the heads per offset
        gives V_k = K_k x + b_k; the 3x3 conv is their zero-padded sum over the offsets plus the
        biases of the offsets that fall off the grid.
        """
        mix = mix.to(v.dtype)
        z3, z1 = mixed_convs(v, mix, self.grid_size)                    # (B, P, hd)
        _, b_v = self.value_projection()
        if b_v is not None:
            z3 = z3 + border_bias(b_v.reshape(self.num_heads, -1), mix, self.border).flatten(0, 1)
        z3, z1 = (F.relu(batch_norm_tokens(z, bn)) for z, bn in ((z3, self.bn3), (z1, self.bn1)))
        return self._conv_norm(z3), self._conv_norm(z1)

    def _conv_norm(self, z: torch.Tensor) -> torch.Tensor:
        """With an inner norm, a conv op's activation (B, P, hd) normalised over its hd channels, as
        msa's output is over its heads' channels; without affine, which comes per head with the
        output projection (``_norm_affine``), so that export folds it into the conv's proj."""
        return z if self.norm is None else F.layer_norm(z, (z.shape[-1],), None, None, self.norm.eps)

    def _norm_affine(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The inner norm's weight (ones if it has none) and bias (None if none), (heads, hd) each."""
        n, shape = self.norm, (self.num_heads, self.head_dim)
        weight = torch.ones(shape, device=self.proj.weight.device, dtype=self.proj.weight.dtype) if n.weight is None \
            else n.weight.reshape(shape)
        return weight, None if n.bias is None else n.bias.reshape(shape)

    def conv_weights(self, op: str, dtype: Optional[torch.dtype] = None
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[torch.Tensor], nn.BatchNorm1d]:
        """A conv op as a plain conv: its conv2d weight (hd, d, k, k) and bias from the mixed value
        heads, its output projection (d, hd) and bias from the mixed output heads, and the BatchNorm
        after the conv. With an inner norm, the norm's per-head affine is folded into the output
        projection (columns scaled by the weight, sum_h P[h,k] W_o^h beta_h added to the bias). The
        pinned forward runs these and export folds the BatchNorm into them (in ``dtype``), so the
        two cannot differ."""
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t if dtype is None else t.to(dtype)
        mix = head_mixing(cast(self.head_assign), self.alpha)
        w_v, b_v = self.value_projection()
        kernels, biases = mix_value(cast(w_v), None if b_v is None else cast(b_v), mix)
        w_o, b_o = cast(self.proj.weight), None if self.proj.bias is None else cast(self.proj.bias)
        out_b = None
        if self.norm is not None:
            weight, bias = (None if t is None else cast(t.flatten()) for t in self._norm_affine())
            if bias is not None:
                out_b = mix_output(w_o * bias, mix).sum(-1)          # (9, d)
            w_o = w_o * weight
        out_w = mix_output(w_o, mix)
        if op == 'conv1x1':
            kernel, bias, bn = kernels[CENTER][:, :, None, None], None if biases is None else biases[CENTER], self.bn1
            out_w, out_b = out_w[CENTER], None if out_b is None else out_b[CENTER]
        else:
            kernel, bias, bn = conv3x3_weight(kernels), None if biases is None else biases.sum(0), self.bn3
            out_w, out_b = out_w.sum(0), None if out_b is None else out_b.sum(0)
        if b_o is not None:
            out_b = b_o if out_b is None else out_b + b_o
        return kernel, bias, out_w, out_b, bn

    def _forward_pinned(self, x, attn_mask, is_causal, rope=None) -> torch.Tensor:
        op = self.pinned_op
        B, N, C = x.shape
        if op == 'skip':
            return x.new_zeros(B, N, self.proj.out_features)
        if op == 'msa' and self.pinned_heads is None:
            qkv = self._project(x).reshape(B, N, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            a = self._attend(q, k, v, attn_mask, is_causal, rope=rope)
            return self.proj_drop(self.proj(a if self.norm is None else self.norm(a)))
        if op == 'msa':
            heads = self.pinned_heads
            rows, cols = self.head_channels(heads)
            qkv = self._project(x, rows)
            q, k, v = qkv.reshape(B, N, 3, len(heads), self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            a = self._attend(q, k, v, attn_mask, is_causal, heads, rope=rope)
            if self.norm is not None:    # the norm over the kept heads' channels
                a = kept_layer_norm(a, self.norm, cols)
            return self.proj_drop(F.linear(a, self.proj.weight[:, cols], self.proj.bias))
        weight, bias, w_o, b_o, bn = self.conv_weights(op)
        xp = x[:, self.num_prefix_tokens:]
        if op == 'conv1x1':
            z = F.linear(xp, weight[:, :, 0, 0], bias)
        else:
            H, W = self.grid_size
            img = xp.transpose(1, 2).reshape(B, C, H, W)
            z = F.conv2d(img, weight, bias, padding=1).flatten(2).transpose(1, 2)
        z = self._conv_norm(self._norm_act(z, bn))
        return self.proj_drop(self._prefix_zero(F.linear(z, w_o, b_o)))


class WindowAttentionSlot(AttentionSlot):
    """The same four ops on the windows of a Swin block.

    The block rolls (shifted blocks) and partitions the feature map before calling its attention,
    so this slot sees (windows * B, w*w, C) and runs the conv ops on each window as a tiny image
    with zero padding at the window border; MSA keeps the relative position bias and the shift
    mask. There are no prefix tokens.
    """

    def __init__(self, attn: nn.Module, theta0: float = 1.5, alpha: float = 0.01, head_gates: bool = False) -> None:
        super().__init__(attn, attn.window_size, 0, theta0=theta0, alpha=alpha, head_gates=head_gates)
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer('relative_position_index', attn.relative_position_index, persistent=False)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().forward(x, attn_mask=mask)

    def _attend(self, q, k, v, mask, is_causal, kept: Optional[torch.Tensor] = None,
                rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        from timm.models.swin_transformer import WindowAttention
        B_, heads, N, _ = q.shape
        bias = WindowAttention._get_rel_pos_bias(self)                    # (1, all heads, N, N)
        if kept is not None:
            bias = bias[:, kept]
        if mask is not None:
            num_win = mask.shape[0]
            mask = mask.view(1, num_win, 1, N, N).expand(B_ // num_win, -1, heads, -1, -1)
            bias = bias + mask.reshape(-1, heads, N, N)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return x.transpose(1, 2).reshape(B_, N, -1)


class EvaAttentionSlot(AttentionSlot):
    """The same four ops on the tokens of a timm ``EvaBlock``.

    ``EvaAttention`` keeps q and v biases apart from a bias-free fused qkv (k has a zero bias), or
    has q/k/v projections of its own (``qkv_fused=False``); this slot reads them where they are,
    so its state dict has the attention's keys. msa applies the block's RoPE to q and k of the patch
    tokens (prefix tokens get none), as timm does; the conv ops read only v (bias ``v_bias``) and
    the output projection, so RoPE never reaches them.
    """

    def __init__(
            self,
            attn: nn.Module,
            grid_size: Tuple[int, int],
            num_prefix_tokens: int,
            theta0: float = 1.5,
            alpha: float = 0.01,
            head_gates: bool = False,
    ) -> None:
        super().__init__(attn, grid_size, num_prefix_tokens, theta0=theta0, alpha=alpha, head_gates=head_gates)
        self.rotate_half = attn.rotate_half
        self.rope_prefix_tokens = attn.num_prefix_tokens      # tokens RoPE leaves alone (timm's own count)
        self.qkv_bias_separate = attn.qkv_bias_separate
        self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.q_bias, self.v_bias = attn.q_bias, attn.v_bias
        if attn.k_bias is not None:
            self.register_buffer('k_bias', attn.k_bias, persistent=False)
        else:
            self.k_bias = None

    def qkv_weight(self) -> torch.Tensor:
        if self.qkv is not None:
            return self.qkv.weight
        return torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    def qkv_bias(self) -> Optional[torch.Tensor]:
        if self.qkv is not None:
            return None if self.q_bias is None else torch.cat([self.q_bias, self.k_bias, self.v_bias])
        if self.q_proj.bias is None:
            return None
        return torch.cat([self.q_proj.bias, torch.zeros_like(self.q_proj.bias), self.v_proj.bias])

    def _project(self, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        if rows is not None:
            return super()._project(x, rows)
        if self.qkv is None:
            return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        bias = self.qkv_bias()
        if bias is not None and self.qkv_bias_separate:
            return self.qkv(x) + bias
        return F.linear(x, self.qkv.weight, bias)

    def value_projection(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.qkv is None:
            return self.v_proj.weight, self.v_proj.bias
        return self.qkv.weight[2 * self.num_heads * self.head_dim:], self.v_bias

    def _prepare_qk(self, q: torch.Tensor, k: torch.Tensor, rope: Optional[torch.Tensor]
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is None:
            return q, k
        return (rotate_patch_tokens(q, rope, self.rope_prefix_tokens, self.rotate_half),
                rotate_patch_tokens(k, rope, self.rope_prefix_tokens, self.rotate_half))


class QVBiasAttentionSlot(AttentionSlot):
    """An attention slot for timm attentions that keep q and v biases beside a bias-free fused qkv
    (k has none: a zero buffer): BEiT and Swin V2. The biases stay under the attention's keys."""

    def _read_qv_biases(self, attn: nn.Module) -> None:
        self.qkv_bias_separate = attn.qkv_bias_separate
        self.q_bias, self.v_bias = attn.q_bias, attn.v_bias
        if attn.k_bias is not None:
            self.register_buffer('k_bias', attn.k_bias, persistent=False)
        else:
            self.k_bias = None

    def qkv_bias(self) -> Optional[torch.Tensor]:
        return None if self.q_bias is None else torch.cat([self.q_bias, self.k_bias, self.v_bias])

    def _project(self, x: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        if rows is not None:
            return super()._project(x, rows)
        bias = self.qkv_bias()
        if bias is not None and self.qkv_bias_separate:
            return self.qkv(x) + bias
        return F.linear(x, self.qkv.weight, bias)


class BeitAttentionSlot(QVBiasAttentionSlot):
    """The same four ops on the tokens of a timm ``Beit`` block.

    BEiT's ``Attention`` keeps q and v biases apart from a bias-free fused qkv (k has none) and may
    own a relative position bias over the patch grid and the class token (one table column per
    head). This slot reads them where they are, so its state dict has the attention's keys. msa adds
    the bias (of the kept heads only, when it keeps some), as timm does; the conv ops read only v
    (bias ``v_bias``) and the output projection, so the bias never reaches them. A bias shared by
    all blocks (``use_shared_rel_pos_bias``) is refused by the family.
    """

    def __init__(
            self,
            attn: nn.Module,
            grid_size: Tuple[int, int],
            num_prefix_tokens: int,
            theta0: float = 1.5,
            alpha: float = 0.01,
            head_gates: bool = False,
    ) -> None:
        super().__init__(attn, grid_size, num_prefix_tokens, theta0=theta0, alpha=alpha, head_gates=head_gates)
        self._read_qv_biases(attn)
        self.window_size = attn.window_size
        self.relative_position_bias_table = attn.relative_position_bias_table
        if attn.relative_position_index is not None:
            self.register_buffer('relative_position_index', attn.relative_position_index, persistent=False)
        else:
            self.relative_position_index = None

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if shared_rel_pos_bias is not None:
            raise UnsupportedModelError('a shared relative position bias (use_shared_rel_pos_bias) is not supported')
        return super().forward(x)

    def _attend(self, q, k, v, attn_mask, is_causal, heads: Optional[torch.Tensor] = None,
                rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        from timm.models.beit import Attention
        B, _, N, _ = q.shape
        bias = None
        if self.relative_position_bias_table is not None:
            bias = Attention._get_rel_pos_bias(self)                  # (1, all heads, N, N)
            if heads is not None:
                bias = bias[:, heads]
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                               dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        return x.transpose(1, 2).reshape(B, N, -1)


class AttentionPostNorm(nn.Module):
    """A post-norm block's attention norm (Swin V2: ``x + norm1(attn(x))``) while the block's
    attention slot applies it: the slot normalises each op's output before the gates mix them, so a
    skipped attention adds exactly zero (the norm of a zero branch is the norm's bias). The block's
    own call passes its input through. Holds the LayerNorm's parameters under its keys
    (``norm1.weight``, ``norm1.bias``), so the supernet's state dict is the model's."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        self.weight = norm.weight
        self.bias = norm.bias

    def extra_repr(self) -> str:
        return f'{self.normalized_shape}, eps={self.eps}, applied by the attention slot'

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class SwinV2AttentionSlot(QVBiasAttentionSlot):
    """The same four ops on the windows of a timm Swin V2 block, with the block's post-norm.

    msa is V2's cosine attention: normalised q and k, a learned per-head ``logit_scale`` and the
    continuous position bias of ``cpb_mlp`` (one output row of its last layer per head); a msa that
    keeps some heads keeps their entries of both. q and v have biases beside a bias-free fused qkv (k
    has none). The conv ops read only v (bias ``v_bias``) and the output projection, so none of the
    cosine attention's parameters reach them; they run on each window, zero-padded at its border.

    The block adds ``norm1(attn(x))``: the slot applies that norm to each op's output and the gates
    mix the normalised outputs, skip adding exactly zero, as the pruned model (which drops the norm
    with a skipped attention) does; the block's ``norm1`` is an ``AttentionPostNorm`` meanwhile.
    """

    def __init__(
            self,
            attn: nn.Module,
            post_norm: AttentionPostNorm,
            theta0: float = 1.5,
            alpha: float = 0.01,
            head_gates: bool = False,
    ) -> None:
        super().__init__(attn, attn.window_size, 0, theta0=theta0, alpha=alpha, head_gates=head_gates)
        self.window_size = tuple(attn.window_size)
        self._read_qv_biases(attn)
        self.logit_scale = attn.logit_scale
        self.cpb_mlp = attn.cpb_mlp
        self.register_buffer('relative_coords_table', attn.relative_coords_table, persistent=False)
        self.register_buffer('relative_position_index', attn.relative_position_index, persistent=False)
        # not a submodule: its parameters are the block's norm1 (one copy, the model's state-dict keys)
        object.__setattr__(self, 'post_norm', post_norm)

    def _attend(self, q, k, v, mask, is_causal, heads: Optional[torch.Tensor] = None,
                rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, _, N, _ = q.shape
        bias, scale = swinv2_position_bias(self), self.logit_scale        # every head's
        if heads is not None:
            bias, scale = bias[heads], scale[heads]
        x = cosine_window_attention(q, k, v, scale, bias, mask, self.attn_drop)
        return x.transpose(1, 2).reshape(B_, N, -1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        norm = self.post_norm.normalize
        if self.pinned_op is not None:
            out = self._forward_pinned(x, mask, False)
            return out if self.pinned_op == 'skip' else norm(out)
        B, N, _ = x.shape
        qkv = self._project(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        msa = norm(self.proj_drop(self.proj(self._gate_heads(self._attend(q, k, v, mask, False)))))
        if not self.op_gates:                 # a space without conv ops: msa in every block
            return msa
        c_msa, c3, c1 = self._op_coefficients()
        # each op's output normalised on its own: the norm is not linear, so the ops cannot share
        # one projection and one norm as in a pre-norm block; skip contributes no term at all
        mix = self.mixing()
        z3, z1 = self._conv_branches(v, mix)
        out_w = mix_output(self.proj.weight, mix)
        conv3 = norm(self.proj_drop(F.linear(z3, out_w.sum(0), self.proj.bias)))
        conv1 = norm(self.proj_drop(F.linear(z1, out_w[CENTER], self.proj.bias)))
        return msa * c_msa + conv3 * c3 + conv1 * c1


class MlpSlot(nn.Module):
    """A timm ``Mlp`` with one gate per hidden unit.

    The gate multiplies the hidden activation; it is applied to fc2's input columns instead,
    which is the same product but keeps no extra activation for the backward pass. An inner norm
    over the hidden units (timm's ``norm_layer``: Eva/BEiT ``scale_mlp``, ViT ``scale_mlp_norm``)
    takes its statistics over the open units only (``masked_layer_norm``), so the pruned MLP's
    norm over its kept units computes the same.
    """

    def __init__(self, mlp: nn.Module, theta0: float = 1.5) -> None:
        super().__init__()
        self.fc1 = mlp.fc1
        self.act = mlp.act
        self.drop1 = mlp.drop1
        self.fc2 = mlp.fc2
        self.drop2 = mlp.drop2
        self._init_gates(mlp, theta0)

    def _init_gates(self, mlp: nn.Module, theta0: float) -> None:
        """The inner norm (None without one) and one gate logit per hidden unit, i.e. per input column of fc2."""
        fc2 = mlp.fc2
        self.norm = inner_norm_of(mlp)
        self.hidden_features = fc2.in_features
        w = fc2.weight
        self.gate_logits = nn.Parameter(torch.full((self.hidden_features,), float(theta0), device=w.device, dtype=w.dtype))
        self.register_buffer('kept', None, persistent=False)
        self.gate_values: Optional[torch.Tensor] = None   # used instead of the logits' gates (importance scores)
        # scale of the sampling noise in training (see sample_gates): a tensor, set in place each step
        self.register_buffer('gate_noise', torch.ones((), device=w.device, dtype=w.dtype), persistent=False)

    def extra_repr(self) -> str:
        pinned = None if self.kept is None else self.kept.numel()
        return f'hidden={self.hidden_features}, pinned={pinned}'

    def pin(self, kept: Optional[torch.Tensor]) -> None:
        """Keep only the hidden units with these indices (None: back to gated search)."""
        self.kept = None if kept is None else kept.to(device=self.fc2.weight.device, dtype=torch.long)

    def importance(self) -> torch.Tensor:
        """|fc1 row|_1 * |fc2 column|_1 per hidden unit (times |norm weight| with an inner norm): which
        units to keep when only a count is given."""
        return self.fc1.weight.detach().abs().sum(1) * self._out_magnitude()

    def _out_magnitude(self) -> torch.Tensor:
        """|fc2 column|_1 per unit, times |norm weight| with an inner norm (the unit's effective fc2 column)."""
        out = self.fc2.weight.detach().abs().sum(0)
        if self.norm is not None and self.norm.weight is not None:
            out = out * self.norm.weight.detach().abs()
        return out

    def kept_state(self, kept: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The exported MLP's state: fc1 rows and fc2 columns of the ``kept`` hidden units."""
        kept = kept.to(self.fc2.weight.device)
        state = {'fc1.weight': self.fc1.weight.detach()[kept]}
        if self.fc1.bias is not None:
            state['fc1.bias'] = self.fc1.bias.detach()[kept]
        return {**state, **self._fc2_state(kept)}

    def _fc2_state(self, kept: torch.Tensor) -> Dict[str, torch.Tensor]:
        """fc2 columns of the kept units, and the inner norm's weight and bias of the kept units."""
        state = {'fc2.weight': self.fc2.weight.detach()[:, kept]}
        if self.norm is not None:
            state.update({f'norm.{k}': v.detach()[kept] for k, v in self.norm.named_parameters()})
        if self.fc2.bias is not None:
            state['fc2.bias'] = self.fc2.bias.detach()
        return state

    def _hidden(self, x: torch.Tensor, kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The hidden activation (before drop1) of all units, or of the ``kept`` ones."""
        if kept is None:
            return self.act(self.fc1(x))
        return self.act(F.linear(x, self.fc1.weight[kept], None if self.fc1.bias is None else self.fc1.bias[kept]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kept is not None:
            h = self.drop1(self._hidden(x, self.kept))
            if self.norm is not None:
                h = kept_layer_norm(h, self.norm, self.kept)
            return self.drop2(F.linear(h, self.fc2.weight[:, self.kept], self.fc2.bias))
        gates = self.gate_values if self.gate_values is not None else sample_gates(self.gate_logits, self.training, self.gate_noise)
        h = self.drop1(self._hidden(x))
        if self.norm is not None:
            h = masked_layer_norm(h, gates, self.norm)
        return self.drop2(F.linear(h, self.fc2.weight * gates, self.fc2.bias))


class GluMlpSlot(MlpSlot):
    """A gated-linear-unit MLP (timm ``GluMlp``, fc1 packing both halves, or ``SwiGLU``, fc1_g and
    fc1_x) with one gate per hidden unit: unit j is act(gate row j . x) * (value row j . x), so a
    closed unit drops its row in both input projections and its fc2 column."""

    def __init__(self, mlp: nn.Module, theta0: float = 1.5) -> None:
        nn.Module.__init__(self)
        # GluMlp: fc1 holds the two halves stacked (rows j and hidden + j are unit j)
        self.packed = not hasattr(mlp, 'fc1_g')
        if self.packed:
            self.fc1 = mlp.fc1
            self.gate_first = not mlp.gate_last     # which half goes through the activation
        else:
            self.fc1_g = mlp.fc1_g
            self.fc1_x = mlp.fc1_x
        self.act = mlp.act
        self.drop1 = mlp.drop1
        self.fc2 = mlp.fc2
        self.drop2 = mlp.drop2
        self._init_gates(mlp, theta0)

    def _packed_rows(self, kept: torch.Tensor) -> torch.Tensor:
        return torch.cat([kept, kept + self.hidden_features])

    def _halves(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(gate rows, value rows) of the input projection, one row per unit each."""
        if not self.packed:
            return self.fc1_g.weight, self.fc1_x.weight
        first, second = self.fc1.weight.chunk(2, 0)
        return (first, second) if self.gate_first else (second, first)

    def importance(self) -> torch.Tensor:
        """|gate row|_1 * |value row|_1 * |fc2 column|_1 per unit: the magnitude score of a plain
        MLP with the unit's two input rows both counted (its output is their product)."""
        gate, value = (w.detach().abs().sum(1) for w in self._halves())
        return gate * value * self._out_magnitude()

    def kept_state(self, kept: torch.Tensor) -> Dict[str, torch.Tensor]:
        kept = kept.to(self.fc2.weight.device)
        if self.packed:
            rows = self._packed_rows(kept)
            state = {'fc1.weight': self.fc1.weight.detach()[rows]}
            if self.fc1.bias is not None:
                state['fc1.bias'] = self.fc1.bias.detach()[rows]
        else:
            state = {}
            for name in ('fc1_g', 'fc1_x'):
                fc = getattr(self, name)
                state[f'{name}.weight'] = fc.weight.detach()[kept]
                if fc.bias is not None:
                    state[f'{name}.bias'] = fc.bias.detach()[kept]
        return {**state, **self._fc2_state(kept)}

    def _hidden(self, x: torch.Tensor, kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        def linear(fc: nn.Linear, rows: Optional[torch.Tensor]) -> torch.Tensor:
            if rows is None:
                return fc(x)
            return F.linear(x, fc.weight[rows], None if fc.bias is None else fc.bias[rows])
        if self.packed:
            a, b = linear(self.fc1, None if kept is None else self._packed_rows(kept)).chunk(2, -1)
            return self.act(a) * b if self.gate_first else a * self.act(b)
        return self.act(linear(self.fc1_g, kept)) * linear(self.fc1_x, kept)


def mlp_slot(mlp: nn.Module, theta0: float = 1.5) -> MlpSlot:
    """The slot for a block's MLP: ``GluMlpSlot`` for timm ``GluMlp``/``SwiGLU``, else ``MlpSlot``."""
    from timm.layers import GluMlp, SwiGLU
    return GluMlpSlot(mlp, theta0) if isinstance(mlp, (GluMlp, SwiGLU)) else MlpSlot(mlp, theta0)
