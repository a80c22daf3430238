"""What the family battery does not cover for timm ``SwinTransformerV2``: one clear refusal per
unsupported option, the post-norm (a skipped attention adds exactly nothing, in the search, pinned
and exported), the kept heads' logit scales and position-bias MLP rows, the conv ops reading only v
and the output projection (none of the cosine attention's parameters), the FLOPs of the norms and of
the position-bias MLP, and a pruned Swin V2 loading without search code."""
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F

import spvit
from spvit.errors import UnsupportedModelError
from spvit.families import FAMILIES, check_model
from spvit.flops import measure_flops

from helpers import (build, load_in_fresh_interpreter, random_arch, randomize_batchnorm, randomize_mixing, reference_conv,
                     set_gates, supernet_and_original)

EXAMPLES = FAMILIES['swinv2'].examples
NAME, SMALL = EXAMPLES[0]


def _supernet(i=0, search_space='spvit'):
    """Example ``i`` with random q/v biases, logit scales (timm starts them at zero and equal) and
    post-norms (zero in timm: see helpers.wake_post_norms), its untouched copy, and its supernet."""
    name, kwargs = EXAMPLES[i]
    model = build(name, **kwargs)
    g = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if n.endswith(('q_bias', 'v_bias')):
            p.data = torch.randn(p.shape, generator=g) * 0.1
        elif n.endswith('logit_scale'):
            p.data = torch.rand(p.shape, generator=g) * 3
    original = build(name, **kwargs)
    original.load_state_dict(model.state_dict())
    supernet = spvit.attach_search_space(model, model_name=name, model_kwargs=kwargs, search_space=search_space)
    return supernet.eval(), original


def _replace_block(make_block):
    def make():
        model = build(NAME, **SMALL)
        model.layers[0].blocks[0] = make_block()
        return model
    return make


def _v1_block():
    from timm.models.swin_transformer import SwinTransformerBlock
    return SwinTransformerBlock(32, (16, 16), num_heads=2, window_size=4)


@pytest.mark.parametrize('make,message', [
    (lambda: build(NAME, **dict(SMALL, strict_img_size=False)),
     'strict_img_size=False (dynamic_img_size: attention masks built per input size) is not supported'),
    (lambda: build(NAME, **dict(SMALL, img_size=72)), 'block 0: a 18x18 feature map is not tiled by 4x4 windows'),
    (lambda: build(NAME, **dict(SMALL, img_size=32, window_size=8, always_partition=True)),
     'block 2: a 4x4 feature map is not tiled by 8x8 windows (always_partition keeps windows larger than the map)'),
    (lambda: build(NAME, **dict(SMALL, norm_layer=timm.layers.LayerNormFp32)),
     'block 0: post-norm norm1 is a LayerNormFp32, only nn.LayerNorm is supported'),
    (_replace_block(_v1_block), 'block 0 is a SwinTransformerBlock, only timm SwinTransformerV2Block'),
])
def test_refused_with_one_line(make, message):
    model = make()
    with pytest.raises(UnsupportedModelError) as e:
        check_model(model)
    assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_always_partition_on_tiled_maps_and_timm_layer_norm_are_searched():
    """always_partition that keeps the tiling (windows as large as the map, shifted) and timm's
    LayerNorm: all gates open still equal timm."""
    kwargs = dict(SMALL, img_size=32, always_partition=True, norm_layer=timm.layers.LayerNorm)
    supernet, original = supernet_and_original(NAME, **kwargs)
    assert any(supernet.model.layers[1].blocks[1].shift_size)      # a shifted 4x4 map in one 4x4 window
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (supernet.eval()(x) - original(x)).abs().max() <= 1e-5


def test_swinv2_cr_is_not_this_family():
    with torch.device('meta'):
        model = timm.create_model('swinv2_cr_tiny_224')
    with pytest.raises(UnsupportedModelError, match='^SwinTransformerV2Cr is not supported'):
        check_model(model)


def test_supported_timm_models_pass_the_check():
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    names = [n for n in timm.list_models('swinv2_*') if not n.startswith('swinv2_cr')]
    assert len(names) >= 10
    for name in names:
        with torch.device('meta'):
            model = timm.create_model(name)
        assert isinstance(model, SwinTransformerV2) and check_model(model).name == 'swinv2', name


def test_tiny_block_dims_and_flops():
    """swinv2_tiny_window8_256: 8x8 windows, the position-bias MLP on 15x15 coordinates; its
    analytic FLOPs (the msa of every block with its norms and position-bias MLP, the rest as fvcore
    counts it) are fvcore's."""
    supernet, original = supernet_and_original('swinv2_tiny_window8_256')
    dims = supernet.block_dims
    assert len(dims) == 12
    assert {(b.tokens, b.cpb_coords, b.cpb_hidden, b.post_norm) for b in dims} == {(64, 225, 512, True)}
    assert [(b.dim, b.heads, b.windows) for b in dims[:3]] == [(96, 3, 64), (96, 3, 64), (192, 6, 16)]
    measured, by_module = measure_flops(original, supernet.input_size)
    assert abs(measured / 1e9 - 5.96) < 0.01
    blocks = sum(by_module[f'layers.{i}.blocks.{j}'] for i, n in enumerate((2, 2, 6, 2)) for j in range(n))
    norm2 = sum(5 * b.windows * b.tokens * b.dim for b in dims)        # in the fixed FLOPs: no gate removes it
    assert blocks == norm2 + sum(spvit.flops.attn_flops(b, 'msa') + spvit.flops.mlp_flops(b, b.hidden) for b in dims)


@pytest.mark.parametrize('heads', [False, True])
def test_flops_of_norms_and_position_bias_are_exact(heads):
    """A random architecture (skip drops norm1, msa keeps the position-bias MLP and some heads'
    rows): fvcore on the pruned model is the analytic count to the MAC."""
    from spvit.export import to_pruned
    supernet, _ = _supernet()
    arch, kept = random_arch(supernet, 2, heads=heads)
    assert {b.attn for b in arch.blocks} == set(spvit.ATTN_OPS)
    supernet.pin(arch, kept)
    measured, _ = measure_flops(to_pruned(supernet), supernet.input_size)
    assert measured == supernet.arch_flops(arch)


def test_gated_flops_with_head_gates_equal_the_architecture():
    """The penalty's FLOPs (gates, head gates) equal the architecture's: the position-bias MLP's
    first layer and the post-norm do not scale with the heads msa keeps."""
    supernet, _ = _supernet(search_space='full')
    for a in supernet.attn_slots:
        a.gate_logits.data = torch.ones(3)
        a.head_logits.data = torch.tensor([1.] + [-1.] * (a.num_heads - 1))
    assert abs(supernet.flops().item() * 1e9 - supernet.arch_flops(supernet.architecture())) < 1


def _block_input(block, seed=0):
    return torch.randn(2, *block.input_resolution, block.dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('mode', ['gated', 'training', 'pinned'])
def test_skip_adds_exactly_nothing_after_the_post_norm(mode):
    """The norm of a zero branch is its bias, not zero: a skipped attention must bypass norm1, in
    the gated mixture (eval and training samples), pinned, and in the exported model."""
    supernet, original = _supernet()
    blk, slot = supernet.model.layers[0].blocks[1], supernet.attn_slots[1]       # a shifted block
    assert blk.attn is slot
    zero = torch.zeros(1, 32)
    assert original.layers[0].blocks[1].norm1(zero).abs().max() > 0.1
    x = _block_input(blk)
    if mode == 'pinned':
        slot.pin('skip')
    else:
        slot.gate_logits.data = torch.full((3,), -30.)
    if mode == 'training':
        torch.manual_seed(0)
        supernet.train()
    with torch.no_grad():
        assert torch.equal(blk.norm1(blk._attn(x)), torch.zeros_like(x))
        if mode != 'training':      # (training samples the MLP's gates and drops paths)
            tokens = x.reshape(2, -1, 32)
            assert torch.equal(blk(x), (tokens + blk.norm2(blk.mlp(tokens))).reshape(x.shape))


def test_exported_skip_drops_the_post_norm():
    from spvit.export import export_supernet
    supernet, _ = _supernet()
    arch = supernet.uniform_arch('msa')
    arch.blocks[1] = spvit.BlockArch('skip', arch.blocks[1].mlp_hidden)
    supernet.pin(arch)
    exported = export_supernet(supernet).model
    blk = exported.layers[0].blocks[1]
    assert isinstance(blk.norm1, torch.nn.Identity) and type(blk.attn).__name__ == 'NoAttention'
    assert not any(k.startswith('layers.0.blocks.1.norm1') for k in exported.state_dict())
    x = _block_input(blk)
    with torch.no_grad():
        assert torch.equal(blk.norm1(blk._attn(x)), torch.zeros_like(x))
        images = torch.randn(2, 3, 64, 64)
        assert (exported(images) - supernet(images)).abs().max() <= 1e-5


def test_the_other_ops_go_through_the_post_norm():
    """Gated conv and msa blocks add norm1 of their op's output, as their pinned and exported forms do."""
    supernet, original = _supernet()
    randomize_batchnorm(supernet)
    slot, blk = supernet.attn_slots[1], original.layers[0].blocks[1]
    windows = torch.randn(32, 16, 32)
    mask = blk.attn_mask
    with torch.no_grad():
        assert (slot(windows, mask=mask) - blk.norm1(blk.attn(windows, mask=mask))).abs().max() <= 1e-5
        for logits, op in [([5., -5., -5.], 'conv1x1'), ([5., 5., -5.], 'conv3x3')]:
            slot.gate_logits.data = torch.tensor(logits)
            gated = slot(windows, mask=mask)
            slot.pin(op)
            pinned = slot(windows, mask=mask)
            branch = slot._forward_pinned(windows, mask, False)       # the op before the norm
            slot.pin(None)
            assert (gated - pinned).abs().max() <= 1e-5 and torch.equal(pinned, blk.norm1(branch))
            assert (pinned - branch).abs().max() > 0.1


def _reference_view(slot):
    """The slot as helpers.reference_conv reads a timm Attention: one stacked qkv bias (k's is zero)."""
    d = slot.proj.out_features
    bias = torch.cat([slot.q_bias, torch.zeros(d), slot.v_bias]).detach()
    return SimpleNamespace(num_heads=slot.num_heads, head_dim=slot.head_dim, grid_size=slot.grid_size,
                           num_prefix_tokens=0, head_assign=slot.head_assign, alpha=slot.alpha,
                           qkv=SimpleNamespace(weight=slot.qkv.weight, bias=bias), proj=slot.proj,
                           bn1=slot.bn1, bn3=slot.bn3)


@pytest.mark.parametrize('op,logits', [('conv1x1', [5., -5., -5.]), ('conv3x3', [5., 5., -5.])])
def test_conv_ops_read_only_v_and_the_output_projection(op, logits):
    """The conv ops are the method's kernels from W_v, v_bias and W_o (then norm1), and none of the
    cosine attention's parameters (q, k, q_bias, logit_scale, cpb_mlp) reach them; v_bias does."""
    supernet, _ = _supernet()
    randomize_batchnorm(supernet)
    randomize_mixing(supernet, 1)
    slot = supernet.attn_slots[1]
    windows = torch.randn(2 * 16, 16, 32)
    norm = supernet.model.layers[0].blocks[1].norm1.normalize
    slot.gate_logits.data = torch.tensor(logits)

    def both():
        gated = slot(windows, mask=None)
        slot.pin(op)
        pinned = slot(windows, mask=None)
        slot.pin(None)
        return gated, pinned

    with torch.no_grad():
        expected = norm(reference_conv(_reference_view(slot), windows, op))
        gated, pinned = both()
        assert (gated - expected).abs().max() <= 1e-5 and (pinned - expected).abs().max() <= 1e-5
        slot.logit_scale.add_(1.)
        slot.q_bias.add_(1.)
        slot.qkv.weight[:64].mul_(-2.)              # q and k rows
        for p in slot.cpb_mlp.parameters():
            p.mul_(3.)
        assert all(torch.equal(a, b) for a, b in zip(both(), (gated, pinned)))
        slot.v_bias.add_(1.)
        assert all((a - b).abs().max() > 1e-2 for a, b in zip(both(), (gated, pinned)))


def test_kept_heads_keep_their_logit_scales_and_position_bias_rows():
    """msa keeping heads 1 and 3 of a shifted 4-head block exports as ``SwinV2HeadAttention`` with
    those heads' q/v bias channels, logit scales and rows of the position-bias MLP's last layer,
    and computes what timm's full attention computes with the other heads' output projection
    columns zeroed (heads are independent until proj)."""
    from spvit.export import export_supernet
    from spvit.layers import SwinV2HeadAttention
    supernet, original = _supernet()
    slot = supernet.attn_slots[3]
    arch = supernet.uniform_arch('msa')
    arch.blocks[3] = spvit.BlockArch('msa', arch.blocks[3].mlp_hidden, [1, 3])
    supernet.pin(arch)
    exported = export_supernet(supernet).model
    attn, blk = exported.layers[1].blocks[1].attn, original.layers[1].blocks[1]
    full = blk.attn
    assert type(attn) is SwinV2HeadAttention and attn.num_heads == 2 and any(blk.shift_size)
    channels = torch.cat([torch.arange(16, 32), torch.arange(48, 64)])
    assert torch.equal(attn.logit_scale, full.logit_scale[[1, 3]])
    assert torch.equal(attn.cpb_mlp[2].weight, full.cpb_mlp[2].weight[[1, 3]])
    assert torch.equal(attn.cpb_mlp[0].weight, full.cpb_mlp[0].weight)
    assert torch.equal(attn.q_bias, full.q_bias[channels]) and torch.equal(attn.v_bias, full.v_bias[channels])
    windows = torch.randn(2 * 4, 16, 64)
    with torch.no_grad():
        kept = attn(windows, mask=blk.attn_mask)
        full.proj.weight[:, torch.cat([torch.arange(0, 16), torch.arange(32, 48)])] = 0
        assert (kept - full(windows, mask=blk.attn_mask)).abs().max() <= 1e-5
        # the pinned slot reads only the kept heads' entries: changing the others' changes nothing
        pinned = slot(windows, mask=blk.attn_mask)
        slot.logit_scale[[0, 2]] += 1.
        slot.cpb_mlp[2].weight[[0, 2]] *= 3.
        assert torch.equal(slot(windows, mask=blk.attn_mask), pinned)
        slot.logit_scale[1] += 1.
        assert (slot(windows, mask=blk.attn_mask) - pinned).abs().max() > 1e-3


@pytest.mark.slow
def test_loading_a_pruned_swinv2_imports_no_search_code(tmp_path):
    """The inference boundary for Swin V2, kept heads and a skipped post-norm included: ``load_pruned``
    and a forward pass in a fresh interpreter load neither the search machinery nor fvcore."""
    from spvit.export import export_supernet
    supernet, _ = _supernet()
    arch, kept = random_arch(supernet, 1, heads=True)
    assert any(b.heads for b in arch.blocks) and {b.attn for b in arch.blocks} == set(spvit.ATTN_OPS)
    randomize_mixing(supernet, 1)
    randomize_batchnorm(supernet, 1)
    set_gates(supernet, arch, kept)
    supernet.pin(arch, kept)
    path = str(tmp_path / 'pruned.pth')
    export_supernet(supernet).save(path)
    attn, loaded = load_in_fresh_interpreter(path, (3, 64, 64), blocks='(b for s in model.layers for b in s.blocks)')
    assert attn == ['ConvAttention', 'NoAttention', 'SwinV2HeadAttention'] and loaded == []


def test_position_bias_helper_is_timms():
    """``swinv2_position_bias`` (the slot's and the kept heads' bias) is what timm's forward adds:
    timm's attention equals the cosine attention written out with it."""
    from spvit.layers import cosine_window_attention, swinv2_position_bias
    _, original = _supernet()
    blk = original.layers[0].blocks[1]
    attn = blk.attn
    x = torch.randn(32, 16, 32)
    with torch.no_grad():
        qkv = F.linear(x, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
        q, k, v = qkv.reshape(32, 16, 3, 2, 16).permute(2, 0, 3, 1, 4).unbind(0)
        out = cosine_window_attention(q, k, v, attn.logit_scale, swinv2_position_bias(attn), blk.attn_mask,
                                      attn.attn_drop)
        assert (attn.proj(out.transpose(1, 2).reshape(32, 16, 32)) - attn(x, mask=blk.attn_mask)).abs().max() <= 1e-6
