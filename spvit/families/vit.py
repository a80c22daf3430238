"""timm ``VisionTransformer``: ViT, DeiT (distilled too), DeiT III, DINOv2, CLIP/SigLIP towers,
register tokens, class-token or average pooling, any patch grid."""
from __future__ import annotations

import copy
from typing import Tuple, Type

import torch.nn as nn

from ..errors import UnsupportedModelError
from ..layers import HeadAttention, narrow_norm
from . import TokenGridFamily, check_inner_norm, check_mlp, register_family


@register_family
class VitFamily(TokenGridFamily):
    name = 'vit'
    supported = ('timm VisionTransformer models (ViT, DeiT incl. _distilled, register tokens, '
                 'class-token or average pooling) with the standard Block/Attention/Mlp')
    handles = ('prefix tokens (class, distillation, registers), layer scale, class-token or average pooling, '
               'qk_norm (msa and its kept heads keep the shared q/k norms), inner norms (scale_mlp_norm, '
               'scale_attn_norm: over the kept units/heads, a conv op normalises its own channels)')
    refuses = 'gated attention, dynamic_img_size, patch dropout, SwiGLU MLPs'
    models = ('vit_*_patch*_224', 'deit_*', 'deit3_*', 'vit_*_dinov2', 'vit_*_reg4_dinov2', 'vit_*_clip_*',
              'vit_*_siglip_*', 'vit_medium_patch16_gap_256', 'flexivit_*', 'beit3_*')
    examples = (('vit_tiny_patch16_224', dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)),
                ('vit_tiny_patch16_224', dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                              qk_norm=True)),
                # inner norms in the MLP and before the attention's proj (as BEiT-3)
                ('vit_tiny_patch16_224', dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4,
                                              scale_mlp_norm=True, scale_attn_norm=True)))

    def model_class(self) -> Type[nn.Module]:
        from timm.models.vision_transformer import VisionTransformer
        return VisionTransformer

    def check(self, model: nn.Module) -> None:
        from timm.models.vision_transformer import Attention, Block
        if getattr(model, 'dynamic_img_size', False):
            raise UnsupportedModelError('dynamic_img_size=True is not supported: the conv ops need a fixed patch grid')
        if not isinstance(model.patch_drop, nn.Identity):
            raise UnsupportedModelError('patch dropout (patch_drop_rate > 0) is not supported: the conv ops need every patch')
        for i, blk in enumerate(model.blocks):
            where = f'block {i}'
            if type(blk) is not Block:
                raise UnsupportedModelError(f'{where} is a {type(blk).__name__}, only timm Block is supported')
            attn = blk.attn
            if type(attn) is not Attention:
                raise UnsupportedModelError(f'{where}: attention {type(attn).__name__} is not supported, only timm Attention')
            if not isinstance(attn.q_norm, nn.Identity) and not (
                    isinstance(attn.q_norm, nn.LayerNorm) and attn.q_norm.elementwise_affine):
                raise UnsupportedModelError(f'{where}: qk_norm with {type(attn.q_norm).__name__} is not supported, '
                                            'only with an affine LayerNorm')
            if getattr(attn, 'gate', None) is not None:
                raise UnsupportedModelError(f'{where}: gated attention is not supported')
            check_inner_norm(attn.norm, f'{where}: attention (scale_attn_norm)')
            if attn.num_heads * attn.head_dim != model.embed_dim:
                raise UnsupportedModelError(f'{where}: attention width differs from embed_dim')
            check_mlp(blk.mlp, where)

    def attention_types(self) -> Tuple[Type[nn.Module], ...]:
        from timm.layers import Attention
        return (Attention,)

    def keep_heads(self, attn: nn.Module, heads: int) -> nn.Module:
        w = attn.qkv.weight
        return HeadAttention(w.shape[1], heads, attn.head_dim, qkv_bias=attn.qkv.bias is not None,
                             proj_bias=attn.proj.bias is not None, q_norm=copy.deepcopy(attn.q_norm),
                             k_norm=copy.deepcopy(attn.k_norm), norm=narrow_norm(attn.norm, heads * attn.head_dim),
                             attn_drop=attn.attn_drop.p,
                             proj_drop=attn.proj_drop.p, device=w.device, dtype=w.dtype)

    def attach(self, model: nn.Module, theta0: float, alpha: float, head_gates: bool = False) -> None:
        from ..slots import AttentionSlot, MlpSlot
        grid, npt = tuple(model.patch_embed.grid_size), model.num_prefix_tokens
        for blk in model.blocks:
            blk.attn = AttentionSlot(blk.attn, grid, npt, theta0=theta0, alpha=alpha, head_gates=head_gates)
            blk.mlp = MlpSlot(blk.mlp, theta0=theta0)
