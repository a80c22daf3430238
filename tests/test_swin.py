"""Swin: window attention slots, shifted windows, FLOPs per window."""
import pytest
import timm
import torch

import spvit
from spvit.flops import measure_flops

from helpers import conv_slot, reference_conv, randomize_batchnorm, random_arch, supernet_and_original

NAME = 'swin_tiny_patch4_window7_224'
# 16x16 then 8x8 feature maps in 4x4 windows; the second block of each stage is shifted.
SMALL_SWIN = dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)


@pytest.fixture
def swin():
    return supernet_and_original(NAME, **SMALL_SWIN)


def test_swin_tiny_measures_4_5_gflops():
    total, _ = measure_flops(timm.create_model(NAME).eval(), (3, 224, 224))
    assert abs(total / 1e9 - 4.5) < 0.05


@pytest.mark.parametrize('kwargs', [SMALL_SWIN, dict(SMALL_SWIN, img_size=96, window_size=6, depths=(2, 2, 2),
                                                     num_heads=(2, 4, 4))])
def test_all_gates_open_matches_timm(kwargs):
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


@pytest.mark.parametrize('seed', [0, 1])
def test_analytic_flops_and_pinning(swin, seed):
    supernet, _ = swin
    arch, kept = random_arch(supernet, seed)
    assert {b.attn for b in arch.blocks} == set(spvit.ATTN_OPS)
    randomize_batchnorm(supernet, seed)
    for b, a, m, idx in zip(arch.blocks, supernet.attn_slots, supernet.mlp_slots, kept):
        n_open = spvit.ATTN_OPS.index(b.attn)
        a.gate_logits.data = torch.tensor([1. if i < n_open else -1. for i in range(3)])
        m.gate_logits.data = -torch.ones(m.hidden_features)
        m.gate_logits.data[idx] = 1.
    supernet.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        gated = supernet(x)
        supernet.pin(arch, kept)
        assert (supernet(x) - gated).abs().max().item() <= 1e-5
    measured, _ = measure_flops(supernet, supernet.input_size)
    assert abs(supernet.arch_flops(arch) - measured) / measured < 0.005
    assert supernet.architecture() == arch


def test_untiled_feature_map_is_refused():
    model = timm.create_model(NAME, **dict(SMALL_SWIN, img_size=72, window_size=4, strict_img_size=False))
    with pytest.raises(spvit.UnsupportedModelError, match='not tiled by'):
        spvit.attach_search_space(model)


@pytest.mark.parametrize('seed,heads', [(0, False), (1, False), (2, True)])
def test_export_matches_pinned_supernet(swin, seed, heads, tmp_path):
    """Exact export, also of msa blocks that keep some of their heads (and those heads' relative
    position bias)."""
    from helpers import randomize_mixing
    from spvit.export import export_supernet
    supernet, _ = swin
    arch, kept = random_arch(supernet, seed, heads)
    assert not heads or any(b.heads for b in arch.blocks)
    randomize_batchnorm(supernet, seed)
    randomize_mixing(supernet, seed)
    supernet.pin(arch, kept)
    supernet.eval()
    exported = export_supernet(supernet)
    path = str(tmp_path / 'swin.pth')
    exported.save(path)
    loaded = spvit.load_pruned(path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pinned = supernet(x)
        assert (exported.model(x) - pinned).abs().max().item() <= 1e-4
        assert torch.equal(loaded(x), exported.model(x))
    measured, _ = measure_flops(loaded, (3, 64, 64))
    assert abs(measured - supernet.arch_flops(arch)) / measured < 0.005
    names = {n for n, _ in loaded.named_parameters()}
    assert not any(k in n for n in names for k in ('gate_logits', 'head_assign', 'bn1', 'bn3'))


@pytest.mark.slow
def test_swin_search_moves_toward_target_and_exports(image_folder, tmp_path):
    import json
    from spvit.search import main as search_main
    from helpers import SEARCH_DATA
    out = tmp_path / 'run'
    search_main(['--model', NAME, '--model-kwargs', 'img_size=32', 'patch_size=2', 'window_size=4', 'embed_dim=32',
                 'depths=[2,2]', 'num_heads=[2,4]', *SEARCH_DATA, '--data-dir', image_folder, '--output-dir', str(out),
                 '--batch-size', '16', '--target-ratio', '0.6', '--epochs', '2', '--alpha', '100'])
    steps = [json.loads(line) for line in open(out / 'log.jsonl') if '"step"' in line]
    first, last = steps[0], steps[-1]
    assert abs(last['gflops'] - last['target']) < abs(first['gflops'] - first['target'])
    from spvit.export import export_search
    path = str(tmp_path / 'pruned.pth')
    export_search(str(out / 'search-final.pth')).save(path)
    model = spvit.load_pruned(path)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
