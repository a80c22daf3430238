"""timm ``Eva``: EVA, EVA-02 (tiny, small), the timm SBB RoPE ViTs, DINOv3 and LingBot-Vision towers
(at a fixed image size). Pre-norm ``EvaBlock`` with ``EvaAttention``: RoPE on q and k, separate q/v
biases or unfused q/k/v projections, SwiGLU MLPs, layer scale."""
from __future__ import annotations

import copy
from typing import Tuple, Type

import torch.nn as nn

from ..errors import UnsupportedModelError
from ..layers import narrow_norm
from . import TokenGridFamily, check_inner_norm, check_mlp, register_family

# tiny sizes the test battery runs on; a head of ViT's init scale, so that the logits the battery
# compares are not shrunk a thousandfold (timm's Eva default)
_TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, head_init_scale=1.0)


@register_family
class EvaFamily(TokenGridFamily):
    name = 'eva'
    supported = ('timm Eva models (EVA, EVA-02 tiny/small, RoPE ViTs, DINOv3) with the pre-norm EvaBlock/EvaAttention '
                 'and Mlp, GluMlp or SwiGLU')
    handles = ('RoPE on q/k (msa only; the conv ops read v), separate q/v biases or unfused q/k/v, SwiGLU MLPs '
               '(GluMlp, SwiGLU: one gate per unit), layer scale, prefix tokens, qk_norm, class-token, average or '
               'attention pooling, inner norms (scale_mlp, scale_attn_inner: EVA-02 base/large, EVA-02 CLIP; over the '
               'kept units/heads, a conv op normalises its own channels)')
    refuses = ('post-norm blocks, '
               "AttentionRope (attn_type='rope': RoPE-ViT, PE, Sapiens2), mixed RoPE, gated attention, "
               'dynamic_img_size (DINOv3, LingBot: pass dynamic_img_size=False), patch dropout')
    models = ('eva02_tiny_patch14_*', 'eva02_small_patch14_*', 'eva02_base_patch14_*', 'eva02_large_patch14_*',
              'eva02_base_patch16_clip_224', 'eva_giant_patch14_*', 'vit_*_patch16_rope_reg*_gap_256',
              'vit_*_dinov3*', 'vit_*_lingbot')
    examples = (
        # EVA-02: RoPE, fused qkv with q/v biases, packed SwiGLU (GluMlp)
        ('eva02_tiny_patch14_224', dict(_TINY)),
        # unfused q/k/v, SwiGLU with fc1_g/fc1_x, layer scale, register tokens, DINOv3's half-rotation RoPE
        ('eva02_tiny_patch14_224', dict(_TINY, qkv_fused=False, swiglu_align_to=8, init_values=0.1, num_reg_tokens=2,
                                        rope_type='dinov3', rope_rotate_half=True)),
        # EVA: no RoPE, plain Mlp, class-token pooling, qk_norm
        ('eva_giant_patch14_224', dict(_TINY, mlp_ratio=4.0, global_pool='token', qk_norm=True)),
        # EVA-02 CLIP: unfused q/k/v, inner norms in the SwiGLU (scale_mlp, as EVA-02 base/large) and
        # before the attention's proj (scale_attn_inner)
        ('eva02_base_patch14_224', dict(_TINY, scale_attn_inner=True)),
        # both inner norms with a fused qkv (q/v biases), a plain Mlp, no RoPE, class-token pooling
        ('eva_giant_patch14_224', dict(_TINY, mlp_ratio=4.0, global_pool='token', scale_mlp=True,
                                       scale_attn_inner=True)),
    )

    def model_class(self) -> Type[nn.Module]:
        from timm.models.eva import Eva
        return Eva

    def check(self, model: nn.Module) -> None:
        from timm.models.eva import EvaAttention, EvaBlock
        if getattr(model, 'dynamic_img_size', False):
            raise UnsupportedModelError('dynamic_img_size=True is not supported: the conv ops need a fixed patch grid '
                                        '(pass dynamic_img_size=False)')
        if model.patch_drop is not None:
            raise UnsupportedModelError('patch dropout (patch_drop_rate > 0) is not supported: the conv ops need every patch')
        if getattr(model, 'rope_mixed', False):
            raise UnsupportedModelError("mixed RoPE (rope_type='mixed': learned per-block, per-head frequencies) is not "
                                        'supported')
        for i, blk in enumerate(model.blocks):
            where = f'block {i}'
            if type(blk) is not EvaBlock:
                raise UnsupportedModelError(f'{where} is a {type(blk).__name__}, only the pre-norm timm EvaBlock is supported')
            attn = blk.attn
            if type(attn) is not EvaAttention:
                raise UnsupportedModelError(f"{where}: attention {type(attn).__name__} is not supported, only timm "
                                            "EvaAttention (attn_type='eva')")
            check_inner_norm(attn.norm, f'{where}: attention (scale_attn_inner)')
            if attn.gate is not None:
                raise UnsupportedModelError(f'{where}: gated attention is not supported')
            if not isinstance(attn.q_norm, nn.Identity) and not (
                    isinstance(attn.q_norm, nn.LayerNorm) and attn.q_norm.elementwise_affine):
                raise UnsupportedModelError(f'{where}: qk_norm with {type(attn.q_norm).__name__} is not supported, '
                                            'only with an affine LayerNorm')
            if attn.num_heads * attn.head_dim != model.embed_dim:
                raise UnsupportedModelError(f'{where}: attention width (attn_head_dim) differs from embed_dim')
            check_mlp(blk.mlp, where, glu=True)

    def attention_types(self) -> Tuple[Type[nn.Module], ...]:
        from timm.models.eva import EvaAttention
        return (EvaAttention,)

    def keep_heads(self, attn: nn.Module, heads: int) -> nn.Module:
        from ..layers import EvaHeadAttention
        w = attn.proj.weight
        fused = attn.qkv is not None
        qkv_bias = attn.q_bias is not None if fused else attn.q_proj.bias is not None
        kept = EvaHeadAttention(w.shape[0], num_heads=heads, qkv_bias=qkv_bias, qkv_fused=fused,
                                qkv_bias_separate=attn.qkv_bias_separate, num_prefix_tokens=attn.num_prefix_tokens,
                                attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p, attn_head_dim=attn.head_dim,
                                scale_norm=False, rotate_half=attn.rotate_half, device=w.device, dtype=w.dtype)
        # timm's qk_norm: one norm over head_dim, shared by the heads (the original's modules)
        kept.q_norm, kept.k_norm = copy.deepcopy(attn.q_norm), copy.deepcopy(attn.k_norm)
        # scale_attn_inner: the inner norm over the kept heads' channels
        kept.norm = narrow_norm(attn.norm, heads * attn.head_dim)
        return kept

    def attach(self, model: nn.Module, theta0: float, alpha: float, head_gates: bool = False) -> None:
        from ..slots import EvaAttentionSlot, mlp_slot
        grid, npt = tuple(model.patch_embed.grid_size), model.num_prefix_tokens
        for blk in model.blocks:
            blk.attn = EvaAttentionSlot(blk.attn, grid, npt, theta0=theta0, alpha=alpha, head_gates=head_gates)
            blk.mlp = mlp_slot(blk.mlp, theta0=theta0)
