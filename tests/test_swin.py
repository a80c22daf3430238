"""Swin beyond the family battery (test_families): conv ops per window, shifted windows, refusals."""
import pytest
import timm
import torch

import spvit
from spvit.flops import measure_flops

from helpers import conv_slot, reference_conv, supernet_and_original

NAME = 'swin_tiny_patch4_window7_224'
# 16x16 then 8x8 feature maps in 4x4 windows; the second block of each stage is shifted.
SMALL_SWIN = dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


@pytest.fixture
def swin():
    return supernet_and_original(NAME, **SMALL_SWIN)


def test_swin_tiny_measures_4_5_gflops():
    total, _ = measure_flops(timm.create_model(NAME).eval(), (3, 224, 224))
    assert abs(total / 1e9 - 4.5) < 0.05


def test_three_stages_all_gates_open_match_timm():
    """Three stages, 6x6 windows (test_families runs the two-stage example)."""
    kwargs = dict(SMALL_SWIN, img_size=96, window_size=6, depths=(2, 2, 2), num_heads=(2, 4, 4))
    supernet, original = supernet_and_original(NAME, **kwargs)
    assert any(any(b.shift_size) for b in supernet.model.layers[0].blocks)
    supernet.eval()
    x = torch.randn(2, 3, kwargs['img_size'], kwargs['img_size'])
    with torch.no_grad():
        assert (supernet(x) - original(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize('op,logits', [('conv1x1', [5., -5., -5.]), ('conv3x3', [5., 5., -5.])])
def test_conv_ops_run_per_window(swin, op, logits):
    slot = conv_slot(swin[0], logits)
    windows = torch.randn(2 * 16, 16, 32)          # (windows x batch, 4x4 tokens, C)
    with torch.no_grad():
        expected = reference_conv(slot, windows, op)
        assert (slot(windows, mask=None) - expected).abs().max().item() <= 1e-5
        slot.pin(op)
        assert (slot(windows) - expected).abs().max().item() <= 1e-5


def test_untiled_feature_map_is_refused():
    model = timm.create_model(NAME, **dict(SMALL_SWIN, img_size=72, window_size=4, strict_img_size=False))
    with pytest.raises(spvit.UnsupportedModelError, match='not tiled by'):
        spvit.attach_search_space(model)
