"""timm ``SwinTransformer`` (V1): window attention with a relative position bias, shifted windows;
the conv ops run on each window, padded at its border."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Tuple, Type

import torch.nn as nn

from ..errors import UnsupportedModelError
from . import Family, Layout, check_mlp, mlp_hidden, register_family

if TYPE_CHECKING:
    from ..flops import BlockDims


@register_family
class SwinFamily(Family):
    name = 'swin'
    supported = 'timm SwinTransformer models (window attention, shifted windows)'
    handles = 'window attention with relative position bias (kept heads keep theirs), shifted windows, patch merging'
    refuses = 'feature maps the windows do not tile, dynamic_mask'
    models = ('swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224', 'swin_base_patch4_window7_224',
              'swin_*_patch4_window12_384')
    # 16x16 then 8x8 feature maps in 4x4 windows; the second block of each stage is shifted
    examples = (('swin_tiny_patch4_window7_224', dict(img_size=64, patch_size=4, window_size=4, embed_dim=32,
                                                      depths=(2, 2), num_heads=(2, 4))),)

    def model_class(self) -> Type[nn.Module]:
        from timm.models.swin_transformer import SwinTransformer
        return SwinTransformer

    def check(self, model: nn.Module) -> None:
        from timm.models.swin_transformer import SwinTransformerBlock, WindowAttention
        for i, blk in enumerate(self.blocks(model)):
            where = f'block {i}'
            if type(blk) is not SwinTransformerBlock or type(blk.attn) is not WindowAttention:
                raise UnsupportedModelError(f'{where} is a {type(blk).__name__}, only timm SwinTransformerBlock is supported')
            if blk.attn.qkv.out_features != 3 * blk.attn.qkv.in_features:
                raise UnsupportedModelError(f'{where}: attention width differs from the block width')
            (h, w), (wh, ww) = blk.input_resolution, blk.window_size
            if h % wh or w % ww:
                raise UnsupportedModelError(f'{where}: a {h}x{w} feature map is not tiled by {wh}x{ww} windows')
            if getattr(blk, 'dynamic_mask', False):
                raise UnsupportedModelError(f'{where}: dynamic_mask is not supported (a fixed input size is)')
            check_mlp(blk.mlp, where)

    def layout(self, model: nn.Module) -> Layout:
        return [(blk, tuple(blk.window_size), 0) for stage in model.layers for blk in stage.blocks]

    def block_dims(self, model: nn.Module) -> List[BlockDims]:
        from ..flops import BlockDims
        dims = []
        for blk in self.blocks(model):
            (h, w), (wh, ww) = blk.input_resolution, blk.window_size
            dims.append(BlockDims(tokens=wh * ww, patches=wh * ww, dim=blk.attn.qkv.in_features, heads=blk.attn.num_heads,
                                  hidden=mlp_hidden(blk.mlp), windows=(h // wh) * (w // ww),
                                  mlp_norm=isinstance(blk.mlp.norm, nn.LayerNorm)))
        return dims

    def attention_types(self) -> Tuple[Type[nn.Module], ...]:
        from timm.models.swin_transformer import WindowAttention
        return (WindowAttention,)

    def keep_heads(self, attn: nn.Module, heads: int) -> nn.Module:
        from timm.models.swin_transformer import WindowAttention
        w = attn.qkv.weight
        head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        return WindowAttention(w.shape[1], heads, head_dim=head_dim, window_size=attn.window_size,
                               qkv_bias=attn.qkv.bias is not None, attn_drop=attn.attn_drop.p,
                               proj_drop=attn.proj_drop.p, device=w.device, dtype=w.dtype)

    def attach(self, model: nn.Module, theta0: float, alpha: float, head_gates: bool = False) -> None:
        from ..slots import MlpSlot, WindowAttentionSlot
        for blk in self.blocks(model):
            blk.attn = WindowAttentionSlot(blk.attn, theta0=theta0, alpha=alpha, head_gates=head_gates)
            blk.mlp = MlpSlot(blk.mlp, theta0=theta0)
