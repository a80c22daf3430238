"""Analytic FLOPs against fvcore, and fvcore's count of attention."""
import pytest
import timm
import torch

import spvit
from spvit.flops import measure_flops

from helpers import SMALL, random_arch, supernet_and_original


@pytest.mark.parametrize('name,gflops', [
    ('deit_tiny_patch16_224', 1.26), ('deit_small_patch16_224', 4.6), ('deit_base_patch16_224', 17.6)])
def test_timm_models_measure_as_published(name, gflops):
    model = timm.create_model(name).eval()
    total, _ = measure_flops(model, (3, 224, 224))
    assert abs(total / 1e9 - gflops) / gflops < 0.01


def test_attention_is_counted():
    """Without a handle fvcore counts nothing for scaled_dot_product_attention: check that ours
    charges 2 N^2 d per block."""
    model = timm.create_model('vit_tiny_patch16_224', **SMALL).eval()
    with_sdpa, by_module = measure_flops(model, (3, 32, 32))
    n, d = 65, 64
    qkv_proj = 4 * n * d * d
    assert by_module['blocks.0.attn'] == qkv_proj + 2 * n * n * d


@pytest.mark.parametrize('name,kwargs', [
    ('deit_tiny_patch16_224', {}),
    ('deit_tiny_distilled_patch16_224', {}),
    ('vit_tiny_patch16_224', SMALL),
])
@pytest.mark.parametrize('seed', [0, 1])
def test_analytic_matches_fvcore_on_pinned_supernet(name, kwargs, seed):
    supernet, original = supernet_and_original(name, **kwargs)
    assert supernet.original_flops == measure_flops(original, supernet.input_size)[0]
    arch, kept = random_arch(supernet, seed)
    assert {b.attn for b in arch.blocks} == set(spvit.ATTN_OPS)
    supernet.pin(arch, kept)
    measured, _ = measure_flops(supernet, supernet.input_size)
    analytic = supernet.arch_flops(arch)
    assert abs(analytic - measured) / measured < 0.005


def test_gated_flops_are_differentiable_and_agree_with_architecture(small_supernet):
    supernet, _ = small_supernet
    torch.manual_seed(0)
    for p in supernet.gate_parameters():
        p.data.normal_()
    gflops = supernet.flops()
    assert gflops.item() * 1e9 == pytest.approx(supernet.arch_flops(supernet.architecture()), rel=1e-6)
    gflops.backward()
    for a, m in zip(supernet.attn_slots, supernet.mlp_slots):
        assert (m.gate_logits.grad > 0).all()
        assert a.gate_logits.grad.abs().sum() > 0


def test_all_open_flops_equal_original(small_supernet):
    supernet, original = small_supernet
    assert supernet.flops().item() * 1e9 == pytest.approx(supernet.original_flops, rel=1e-6)
    assert supernet.min_flops() < supernet.original_flops
