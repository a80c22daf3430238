"""timm ``Beit``: BEiT and BEiT v2. Pre-norm ``Block`` with BEiT's ``Attention``: separate q/v
biases beside a bias-free fused qkv, a relative position bias of its own in every block (over the
patch grid and the class token), layer scale; average pooling with fc_norm or the class token."""
from __future__ import annotations

from typing import Tuple, Type

import torch.nn as nn

from ..errors import UnsupportedModelError
from . import TokenGridFamily, check_mlp, register_family

# tiny sizes the test battery runs on; a head of ViT's init scale, so that the logits the battery
# compares are not shrunk a thousandfold (timm's Beit default, head_init_scale=0.001)
_TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, head_init_scale=1.0)


@register_family
class BeitFamily(TokenGridFamily):
    name = 'beit'
    supported = 'timm Beit models (BEiT, BEiT v2) with the pre-norm Block/Attention and Mlp or SwiGLU'
    handles = ('per-block relative position bias (msa only; kept heads keep their table columns), separate q/v '
               'biases, layer scale, absolute position embedding, SwiGLU MLPs (one gate per unit), average pooling '
               'with fc_norm or class-token pooling, scale_mlp (inner MLP norm over the kept units)')
    refuses = ('use_shared_rel_pos_bias (one bias shared by all blocks; no timm pretrained BEiT has it), '
               'attn_head_dim other than embed_dim / num_heads, a relative position bias over '
               'another grid than the patches')
    models = ('beit_base_patch16_*', 'beit_large_patch16_*', 'beitv2_*_patch16_224')
    examples = (
        # BEiT: per-block relative position bias, layer scale, average pooling with fc_norm, q/v biases
        ('beit_base_patch16_224', dict(_TINY)),
        # absolute position embedding instead, no layer scale, class-token pooling
        ('beitv2_base_patch16_224', dict(_TINY, use_abs_pos_emb=True, use_rel_pos_bias=False, init_values=None,
                                         global_pool='token')),
        # relative position bias with class-token pooling, SwiGLU MLPs, no q/v biases
        ('beit_base_patch16_224', dict(_TINY, global_pool='token', swiglu_mlp=True, qkv_bias=False)),
        # inner norms over the hidden units (scale_mlp), in a plain Mlp and in a SwiGLU
        ('beit_base_patch16_224', dict(_TINY, scale_mlp=True)),
        ('beitv2_base_patch16_224', dict(_TINY, swiglu_mlp=True, scale_mlp=True, use_abs_pos_emb=True,
                                         use_rel_pos_bias=False)),
    )

    def model_class(self) -> Type[nn.Module]:
        from timm.models.beit import Beit
        return Beit

    def check(self, model: nn.Module) -> None:
        from timm.models.beit import Attention, Block
        if model.rel_pos_bias is not None:
            raise UnsupportedModelError('use_shared_rel_pos_bias=True (one relative position bias shared by all '
                                        'blocks) is not supported: pass use_rel_pos_bias=True for one bias per block')
        # neither exists in timm's Beit today; a fixed grid of every patch is what the conv ops need
        if getattr(model, 'dynamic_img_size', False):
            raise UnsupportedModelError('dynamic_img_size=True is not supported: the conv ops need a fixed patch grid')
        if getattr(model, 'patch_drop', None) is not None and not isinstance(model.patch_drop, nn.Identity):
            raise UnsupportedModelError('patch dropout is not supported: the conv ops need every patch')
        grid = tuple(model.patch_embed.grid_size)
        for i, blk in enumerate(model.blocks):
            where = f'block {i}'
            if type(blk) is not Block:
                raise UnsupportedModelError(f'{where} is a {type(blk).__module__}.{type(blk).__name__}, only '
                                            'timm.models.beit.Block is supported')
            attn = blk.attn
            if type(attn) is not Attention:
                raise UnsupportedModelError(f'{where}: attention {type(attn).__module__}.{type(attn).__name__} is not '
                                            'supported, only timm.models.beit.Attention')
            if attn.proj.in_features != model.embed_dim:
                raise UnsupportedModelError(f'{where}: attention width (attn_head_dim * num_heads = '
                                            f'{attn.proj.in_features}) differs from embed_dim ({model.embed_dim})')
            if attn.relative_position_bias_table is not None and tuple(attn.window_size) != grid:
                raise UnsupportedModelError(f'{where}: relative position bias over a {tuple(attn.window_size)} window, '
                                            f'not the {grid} patch grid')
            check_mlp(blk.mlp, where, glu=True)

    def attention_types(self) -> Tuple[Type[nn.Module], ...]:
        from timm.models.beit import Attention
        return (Attention,)

    def keep_heads(self, attn: nn.Module, heads: int) -> nn.Module:
        from ..layers import BeitHeadAttention
        w = attn.proj.weight
        return BeitHeadAttention(w.shape[0], num_heads=heads, qkv_bias=attn.q_bias is not None,
                                 qkv_bias_separate=attn.qkv_bias_separate, attn_drop=attn.attn_drop.p,
                                 proj_drop=attn.proj_drop.p, window_size=attn.window_size,
                                 attn_head_dim=attn.proj.in_features // attn.num_heads, device=w.device, dtype=w.dtype)

    def attach(self, model: nn.Module, theta0: float, alpha: float, head_gates: bool = False) -> None:
        from ..slots import BeitAttentionSlot, mlp_slot
        grid, npt = tuple(model.patch_embed.grid_size), model.num_prefix_tokens
        for blk in model.blocks:
            blk.attn = BeitAttentionSlot(blk.attn, grid, npt, theta0=theta0, alpha=alpha, head_gates=head_gates)
            blk.mlp = mlp_slot(blk.mlp, theta0=theta0)
