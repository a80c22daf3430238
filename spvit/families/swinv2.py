"""timm ``SwinTransformerV2``: window attention as cosine attention (per-head learned logit scale,
continuous position bias from a small MLP), shifted windows, post-norm residual blocks
(``x + norm1(attn(x))``); the conv ops run on each window, padded at its border."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Tuple, Type

import torch.nn as nn

from ..errors import UnsupportedModelError
from . import check_mlp, mlp_hidden, register_family
from .swin import SwinFamily

if TYPE_CHECKING:
    from ..flops import BlockDims


@register_family
class SwinV2Family(SwinFamily):
    name = 'swinv2'
    supported = 'timm SwinTransformerV2 models (cosine window attention, shifted windows, post-norm blocks)'
    handles = ('cosine window attention with learned logit scale and continuous position bias (msa only; kept heads '
               'keep their logit scales and position-bias MLP rows), q/v biases, shifted windows, post-norm blocks '
               '(a skipped attention drops its norm), patch merging, pretrained_window_sizes')
    refuses = ('feature maps the windows do not tile (always_partition with windows larger than the map), '
               'strict_img_size=False / dynamic masks, norm layers other than LayerNorm, SwinTransformerV2Cr '
               '(swinv2_cr_*)')
    models = ('swinv2_tiny_window*_256', 'swinv2_small_window*_256', 'swinv2_base_window*', 'swinv2_large_window12*')
    # 16x16 then 8x8 feature maps in 4x4 windows; the second block of each stage is shifted
    examples = (
        ('swinv2_tiny_window8_256', dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                                         num_heads=(2, 4))),
        # position bias from coordinates scaled to a larger pretraining window, no q/v biases
        ('swinv2_tiny_window8_256', dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2),
                                         num_heads=(2, 4), pretrained_window_sizes=(8, 8), qkv_bias=False)),
    )

    def model_class(self) -> Type[nn.Module]:
        from timm.models.swin_transformer_v2 import SwinTransformerV2
        return SwinTransformerV2

    def check(self, model: nn.Module) -> None:
        from timm.layers import LayerNorm
        from timm.models.swin_transformer_v2 import SwinTransformerV2Block, WindowAttention
        if getattr(model, 'dynamic_img_size', False):
            raise UnsupportedModelError('strict_img_size=False (dynamic_img_size: attention masks built per input '
                                        'size) is not supported: the conv ops need a fixed feature map')
        for i, blk in enumerate(self.blocks(model)):
            where = f'block {i}'
            if type(blk) is not SwinTransformerV2Block or type(blk.attn) is not WindowAttention:
                raise UnsupportedModelError(f'{where} is a {type(blk).__name__}, only timm SwinTransformerV2Block '
                                            'with its WindowAttention is supported')
            if getattr(blk, 'dynamic_mask', False):
                raise UnsupportedModelError(f'{where}: dynamic_mask is not supported (a fixed input size is)')
            for norm in ('norm1', 'norm2'):
                # the search applies norm1 with F.layer_norm (each op's output on its own)
                if type(getattr(blk, norm)) not in (nn.LayerNorm, LayerNorm):
                    raise UnsupportedModelError(f'{where}: post-norm {norm} is a {type(getattr(blk, norm)).__name__}, '
                                                'only nn.LayerNorm is supported')
            (h, w), (wh, ww) = blk.input_resolution, blk.window_size
            if h % wh or w % ww:
                extra = ' (always_partition keeps windows larger than the map)' if blk.always_partition else ''
                raise UnsupportedModelError(f'{where}: a {h}x{w} feature map is not tiled by {wh}x{ww} windows{extra}')
            check_mlp(blk.mlp, where)

    def block_dims(self, model: nn.Module) -> List[BlockDims]:
        from ..flops import BlockDims
        dims = []
        for blk in self.blocks(model):
            (h, w), (wh, ww) = blk.input_resolution, blk.window_size
            cpb_in = blk.attn.cpb_mlp[0]
            dims.append(BlockDims(tokens=wh * ww, patches=wh * ww, dim=blk.attn.qkv.in_features,
                                  heads=blk.attn.num_heads, hidden=mlp_hidden(blk.mlp), windows=(h // wh) * (w // ww),
                                  cpb_coords=(2 * wh - 1) * (2 * ww - 1), cpb_hidden=cpb_in.out_features,
                                  post_norm=True, mlp_norm=isinstance(blk.mlp.norm, nn.LayerNorm)))
        return dims

    def attention_types(self) -> Tuple[Type[nn.Module], ...]:
        from timm.models.swin_transformer_v2 import WindowAttention
        return (WindowAttention,)

    def keep_heads(self, attn: nn.Module, heads: int) -> nn.Module:
        from ..layers import SwinV2HeadAttention
        w = attn.qkv.weight
        return SwinV2HeadAttention(w.shape[1], attn.window_size, heads, head_dim=w.shape[0] // (3 * attn.num_heads),
                                   qkv_bias=attn.q_bias is not None, qkv_bias_separate=attn.qkv_bias_separate,
                                   attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
                                   pretrained_window_size=attn.pretrained_window_size, device=w.device, dtype=w.dtype)

    def attach(self, model: nn.Module, theta0: float, alpha: float, head_gates: bool = False) -> None:
        from ..slots import AttentionPostNorm, MlpSlot, SwinV2AttentionSlot
        for blk in self.blocks(model):
            blk.norm1 = AttentionPostNorm(blk.norm1)
            blk.attn = SwinV2AttentionSlot(blk.attn, blk.norm1, theta0=theta0, alpha=alpha, head_gates=head_gates)
            blk.mlp = MlpSlot(blk.mlp, theta0=theta0)
