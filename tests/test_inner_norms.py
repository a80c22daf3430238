"""Inner norms (a LayerNorm over the MLP's hidden units before fc2, or over the attention output
before proj: Eva ``scale_mlp``/``scale_attn_inner``, BEiT ``scale_mlp``, ViT ``scale_mlp_norm``/
``scale_attn_norm``) beyond the family battery: the masked norm itself, gates that close units or
heads computing what the pruned model's norm over the kept ones computes, the exported modules'
norms, and every conv op on every block."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from spvit.export import export_supernet
from spvit.flops import measure_flops
from spvit.layers import ConvAttention, EvaHeadAttention, HeadAttention
from spvit.slots import MlpSlot, masked_layer_norm

from helpers import random_arch, randomize_batchnorm, randomize_mixing, set_gates, supernet_and_original

TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4)
# (model, kwargs) with both inner norms: EVA-02 CLIP-like (SwiGLU, unfused q/k/v, RoPE), ViT (BEiT-3-like)
NORMED = [pytest.param('eva02_base_patch14_224', dict(TINY, scale_attn_inner=True, head_init_scale=1.0), id='eva'),
          pytest.param('vit_tiny_patch16_224', dict(TINY, scale_mlp_norm=True, scale_attn_norm=True,
                                                          global_pool='avg'), id='vit')]


def _norm(width, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = nn.LayerNorm(width, eps=1e-6)
    norm.weight.data = torch.rand(width, generator=g) + 0.5
    norm.bias.data = torch.randn(width, generator=g)
    return norm


def test_masked_norm_with_every_gate_open_is_the_layer_norm():
    norm = _norm(24)
    x = torch.randn(2, 5, 24) * 3 + 1
    assert (masked_layer_norm(x, torch.ones(24), norm) - norm(x)).abs().max() <= 1e-5


def test_masked_norm_with_0_1_gates_is_the_layer_norm_of_the_kept_channels():
    norm = _norm(24)
    x = torch.randn(2, 5, 24) * 3 + 1
    kept = torch.tensor([0, 3, 4, 10, 17, 23])
    gates = torch.zeros(24)
    gates[kept] = 1
    ref = F.layer_norm(x[..., kept], (len(kept),), norm.weight[kept], norm.bias[kept], norm.eps)
    assert (masked_layer_norm(x, gates, norm)[..., kept] - ref).abs().max() <= 1e-5
    # what closed channels hold does not reach the kept ones
    y = x.clone()
    y[..., gates == 0] = 100.
    assert (masked_layer_norm(y, gates, norm)[..., kept] - ref).abs().max() <= 1e-5


def test_masked_norm_with_every_gate_closed_is_finite():
    assert torch.isfinite(masked_layer_norm(torch.randn(3, 8), torch.zeros(8), _norm(8)) * 0).all()


def test_masked_norm_runs_in_float32_under_reduced_precision():
    norm = _norm(16)
    x = torch.randn(4, 16)
    out = masked_layer_norm(x.bfloat16(), torch.ones(16), norm)
    assert out.dtype == torch.float32 and (out - norm(x.bfloat16().float())).abs().max() <= 1e-5


def test_the_gradient_reaches_every_mlp_gate_through_the_statistics():
    """A closed unit changes the other units' statistics: dL/dg is nonzero for every gate even with
    fc2's columns of all other units zero (only the norm carries it)."""
    from timm.layers import Mlp
    torch.manual_seed(0)
    slot = MlpSlot(Mlp(8, 6, norm_layer=nn.LayerNorm), theta0=1.5)
    slot.norm.bias.data.normal_()
    slot.fc2.weight.data[:, 1:] = 0
    slot.gate_values = torch.ones(6, requires_grad=True)
    slot(torch.randn(3, 8)).square().sum().backward()
    assert (slot.gate_values.grad != 0).all()


@pytest.mark.parametrize('name,kwargs', NORMED)
def test_head_gates_compute_the_norm_over_the_kept_heads(name, kwargs):
    """Full space, every block msa: closed head gates compute what the kept heads (and their
    exported attention, with a norm over their channels only) compute."""
    supernet, _ = supernet_and_original(name, search_space='full', **kwargs)
    arch, kept = random_arch(supernet, 0, heads=True, ops=('msa',))
    randomize_mixing(supernet, 0)
    set_gates(supernet, arch, kept)
    for b, a in zip(arch.blocks, supernet.attn_slots):
        a.head_logits.data = torch.tensor([1. if h in b.heads else -1. for h in range(a.num_heads)])
    supernet.eval()
    x = torch.randn(2, *supernet.input_size)
    with torch.no_grad():
        gated = supernet(x)
        supernet.pin(arch, kept)
        assert (supernet(x) - gated).abs().max() <= 1e-5
        exported = export_supernet(supernet).model
        assert (exported(x) - gated).abs().max() <= 1e-4
    kind = EvaHeadAttention if name.startswith('eva') else HeadAttention
    for blk, b, idx in zip(exported.blocks, arch.blocks, kept):
        assert isinstance(blk.attn, kind) and blk.attn.norm.normalized_shape == (len(b.heads) * 16,)
        assert blk.mlp.norm.normalized_shape == (len(idx),)


@pytest.mark.parametrize('name,kwargs', NORMED)
@pytest.mark.parametrize('op', ['conv1x1', 'conv3x3'])
def test_every_block_a_conv_op_exports_exactly(name, kwargs, op):
    """A conv op normalises its hd channels and takes each head's slice of the inner norm's affine
    with the head's slice of proj; export folds the affine into proj (its bias into proj's bias)."""
    supernet, _ = supernet_and_original(name, **kwargs)
    arch, kept = random_arch(supernet, 1, ops=(op,))
    randomize_batchnorm(supernet, 1)
    randomize_mixing(supernet, 1)
    set_gates(supernet, arch, kept)
    supernet.eval()
    x = torch.randn(2, *supernet.input_size)
    with torch.no_grad():
        gated = supernet(x)
        supernet.pin(arch, kept)
        assert (supernet(x) - gated).abs().max() <= 1e-5
        exported = export_supernet(supernet).model
        assert (exported(x) - gated).abs().max() <= 1e-4
    for blk in exported.blocks:
        assert isinstance(blk.attn, ConvAttention) and blk.attn.norm.normalized_shape == (16,)
        assert not blk.attn.norm.elementwise_affine
    measured, _ = measure_flops(exported, supernet.input_size)
    assert abs(measured - supernet.arch_flops(arch)) / measured < 0.005


def test_beit3_and_eva02_clip_pass_the_check():
    from spvit.families import check_model
    from spvit.models import create_model
    for name, family in [('beit3_base_patch16_224', 'vit'), ('eva02_base_patch16_clip_224', 'eva'),
                         ('eva02_large_patch14_224', 'eva')]:
        with torch.device('meta'):
            model = create_model(name, {})
        assert check_model(model).name == family, name
