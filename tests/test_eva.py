"""What the family battery does not cover for timm ``Eva``: one clear refusal per unsupported feature,
RoPE reaching msa (kept heads too) but not the conv ops, exactness on the features (not only the
logits), and the SwiGLU MLPs' unit scores and widths."""
import pytest
import torch

import spvit
from spvit.errors import UnsupportedModelError
from spvit.families import FAMILIES, check_model
from spvit.models import create_model
from spvit.slots import EvaAttentionSlot, GluMlpSlot

from helpers import (QKV_BIASES, build, random_arch, randomize_batchnorm, randomize_mixing, set_gates,
                     supernet_and_original)

EXAMPLES = FAMILIES['eva'].examples
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4)


@pytest.mark.parametrize('kwargs,message', [
    # inner norms are searched when they are LayerNorms (test_inner_norms), not otherwise
    (dict(scale_attn_inner=True, norm_layer='rmsnorm'),
     'block 0: attention (scale_attn_inner) with an inner RmsNorm is not supported, only an inner affine LayerNorm'),
    (dict(scale_mlp=True, norm_layer='rmsnorm'), 'block 0: MLP SwiGLU with an inner RmsNorm is not supported'),
    (dict(swiglu_mlp=False, scale_mlp=True, norm_layer='rmsnorm'),
     'block 0: MLP Mlp with an inner RmsNorm is not supported'),
    (dict(use_post_norm=True), 'block 0 is a EvaBlockPostNorm, only the pre-norm timm EvaBlock is supported'),
    (dict(attn_type='rope'), 'block 0: attention AttentionRope is not supported'),
    (dict(rope_type='mixed'), "mixed RoPE (rope_type='mixed'"),
    (dict(dynamic_img_size=True), 'dynamic_img_size=True is not supported'),
    (dict(patch_drop_rate=0.1), 'patch dropout (patch_drop_rate > 0) is not supported'),
    (dict(qk_norm=True, norm_layer='rmsnorm'), 'block 0: qk_norm with RmsNorm is not supported'),
])
def test_refused_with_one_line(kwargs, message):
    if kwargs.get('norm_layer') == 'rmsnorm':
        from timm.layers import RmsNorm
        kwargs = dict(kwargs, norm_layer=RmsNorm)
    with torch.device('meta'):
        model = create_model('eva02_tiny_patch14_224', dict(TINY, **kwargs))
    with pytest.raises(UnsupportedModelError) as e:
        check_model(model)
    assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_gated_attention_is_refused():
    """Eva takes no gated_attn (EvaBlock does): a block built with it."""
    from timm.models.eva import EvaBlock
    with torch.device('meta'):
        model = create_model('eva02_tiny_patch14_224', TINY)
        model.blocks[1] = EvaBlock(64, 4, gated_attn=True, swiglu_mlp=True)
    with pytest.raises(UnsupportedModelError, match=r'^block 1: gated attention is not supported$'):
        check_model(model)


def test_supported_timm_models_pass_the_check():
    for name, kwargs in [('eva02_tiny_patch14_224', {}), ('eva02_small_patch14_336', {}), ('eva_giant_patch14_224', {}),
                         ('eva02_base_patch14_224', {}), ('eva02_large_patch14_clip_224', {}),
                         ('vit_medium_patch16_rope_reg1_gap_256', {}),
                         ('vit_small_plus_patch16_dinov3', dict(dynamic_img_size=False))]:
        with torch.device('meta'):
            model = create_model(name, kwargs)
        assert check_model(model).name == 'eva', name


def _random_biases(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(QKV_BIASES) or name.endswith(('gamma_1', 'gamma_2')):
            p.data = torch.randn(p.shape, generator=g) * 0.1 + (1 if 'gamma' in name else 0)


@pytest.mark.parametrize('i', range(len(EXAMPLES)))
def test_all_gates_open_features_equal_timm(i):
    """On the features (the battery compares logits): RoPE, separate q/v biases, SwiGLU and layer
    scale go through the slots exactly as timm computes them."""
    name, kwargs = EXAMPLES[i]
    model = build(name, **kwargs)
    _random_biases(model)
    original = build(name, **kwargs)
    original.load_state_dict(model.state_dict())
    supernet = spvit.attach_search_space(model, model_name=name, model_kwargs=kwargs, search_space='full').eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (supernet.model.forward_features(x) - original.forward_features(x)).abs().max() <= 1e-5


def _block_input(supernet, x):
    """Block 0's attention input and the RoPE the model passes to it."""
    model = supernet.model
    tokens, rope = model._pos_embed(model.patch_embed(x))
    return model.blocks[0].norm1(model.norm_pre(tokens)), rope


@pytest.mark.parametrize('i', [0, 1])
def test_rope_reaches_msa_and_its_kept_heads_but_not_the_conv_ops(i):
    name, kwargs = EXAMPLES[i]
    supernet, _ = supernet_and_original(name, **kwargs)
    randomize_batchnorm(supernet)
    randomize_mixing(supernet)
    supernet.eval()
    slot = supernet.attn_slots[0]
    assert isinstance(slot, EvaAttentionSlot)
    x, rope = _block_input(supernet, torch.randn(2, 3, 32, 32))
    assert rope is not None
    with torch.no_grad():
        for op, heads in [('msa', None), ('msa', [1, 3])]:
            slot.pin(op, heads)
            out = slot(x, rope=rope)
            assert (out - slot(x)).abs().max() > 1e-2 * out.abs().max()
        for op in ('conv1x1', 'conv3x3'):
            slot.pin(op)
            assert torch.equal(slot(x, rope=rope), slot(x))


@pytest.mark.parametrize('i', [0, 1])
def test_glu_units_score_both_input_rows_and_export_keeps_the_top_ones(i):
    """A unit with a zero gate row or a zero value row scores 0, so ``pin`` without kept units (and
    ``build_from_arch``) drops it; the exported MLP keeps only the kept units in every projection."""
    from spvit.export import export_supernet
    name, kwargs = EXAMPLES[i]
    supernet, _ = supernet_and_original(name, **kwargs)
    mlp = supernet.mlp_slots[0]
    assert isinstance(mlp, GluMlpSlot) and mlp.packed == (i == 0)
    hidden = mlp.hidden_features
    with torch.no_grad():
        if mlp.packed:        # GluMlp with gate_last=False: the first half goes through SiLU
            mlp.fc1.weight[3] = 0
            mlp.fc1.weight[hidden + 5] = 0
        else:
            mlp.fc1_g.weight[3] = 0
            mlp.fc1_x.weight[5] = 0
    scores = mlp.importance()
    assert scores.shape == (hidden,) and scores[3] == 0 and scores[5] == 0 and (scores > 0).sum() == hidden - 2
    arch = supernet.uniform_arch('msa', hidden - 2)
    supernet.pin(arch)
    assert 3 not in mlp.kept.tolist() and 5 not in mlp.kept.tolist()
    exported = export_supernet(supernet).model
    out = exported.blocks[0].mlp
    if mlp.packed:
        assert out.fc1.weight.shape == (2 * (hidden - 2), 64) and out.fc2.weight.shape == (64, hidden - 2)
    else:
        assert out.fc1_g.weight.shape == out.fc1_x.weight.shape == (hidden - 2, 64)
    x = torch.randn(2, 3, 32, 32)
    supernet.eval()
    with torch.no_grad():
        assert (exported.forward_features(x) - supernet.model.forward_features(x)).abs().max() <= 1e-5


def test_glu_mlp_flops_are_three_projections():
    """fvcore counts fc1 (both halves) and fc2 of a GLU, not its elementwise product: 3 N d hidden."""
    from spvit.flops import measure_flops, mlp_flops
    name, kwargs = EXAMPLES[0]
    supernet, original = supernet_and_original(name, **kwargs)
    _, by_module = measure_flops(original, supernet.input_size)
    b = supernet.block_dims[0]
    assert b.glu and by_module['blocks.0.mlp'] == mlp_flops(b, b.hidden) == 3 * b.tokens * b.dim * b.hidden


@pytest.mark.parametrize('fused', [True, False])
def test_without_qkv_bias_kept_heads_export_exactly(fused, tmp_path):
    """qkv_bias=False (DINOv3): no q/v biases, so the conv ops have no value bias; kept heads of
    the fused and the unfused projections export and reload as the pinned supernet computes."""
    from spvit.export import export_supernet
    from spvit.flops import measure_flops
    kwargs = dict(TINY, depth=4, head_init_scale=1.0, qkv_bias=False, qkv_fused=fused)
    supernet, _ = supernet_and_original('eva02_tiny_patch14_224', **kwargs)
    assert supernet.attn_slots[0].value_projection()[1] is None
    arch, kept = random_arch(supernet, 1, heads=True)
    assert any(b.heads for b in arch.blocks)
    randomize_batchnorm(supernet, 1)
    set_gates(supernet, arch, kept)
    supernet.eval()
    supernet.pin(arch, kept)
    x = torch.randn(2, 3, 32, 32)
    exported = export_supernet(supernet)
    path = str(tmp_path / 'pruned.pth')
    exported.save(path)
    loaded = spvit.load_pruned(path)
    with torch.no_grad():
        assert (loaded.forward_features(x) - supernet.model.forward_features(x)).abs().max() <= 1e-5
    measured, _ = measure_flops(loaded, supernet.input_size)
    assert abs(measured - supernet.arch_flops(arch)) / measured < 0.005
