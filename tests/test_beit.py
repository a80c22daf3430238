"""What the family battery does not cover for timm ``Beit``: one clear refusal per unsupported option,
the per-block relative position bias reaching msa (the kept heads' own columns) but not the conv ops,
exactness on the features with non-trivial biases, tables and layer scale, timm's unfused attention,
and a pruned BEiT loading without search code."""

import pytest
import timm
import torch
from timm.layers import RmsNorm

import spvit
from spvit.errors import UnsupportedModelError
from spvit.families import FAMILIES, check_model
from spvit.models import create_model
from spvit.slots import BeitAttentionSlot

from helpers import (QKV_BIASES, build, load_in_fresh_interpreter, random_arch, randomize_batchnorm, randomize_mixing,
                     set_gates)

EXAMPLES = FAMILIES['beit'].examples
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, use_abs_pos_emb=False,
            use_rel_pos_bias=True)


def _meta_model(**kwargs):
    with torch.device('meta'):
        return create_model('beit_base_patch16_224', dict(TINY, **kwargs))


def _replace_block(i, **kwargs):
    """A BEiT whose block ``i`` is a timm Beit Block built with ``kwargs`` (Beit passes them no other way)."""
    from timm.models.beit import Block

    def make():
        model = _meta_model()
        with torch.device('meta'):
            model.blocks[i] = Block(64, 4, qkv_bias=True, **kwargs)
        return model
    return make


def _set(**attrs):
    """A BEiT with attributes timm's Beit does not have today (dynamic_img_size, patch_drop): the
    family's guards for a timm that adds them."""
    def make():
        model = _meta_model()
        for k, v in attrs.items():
            setattr(model, k, v)
        return model
    return make


def _vit_attention():
    from timm.layers import Attention
    model = _meta_model()
    with torch.device('meta'):
        model.blocks[1].attn = Attention(64, 4)
    return model


@pytest.mark.parametrize('make,message', [
    (lambda: _meta_model(use_shared_rel_pos_bias=True),
     'use_shared_rel_pos_bias=True (one relative position bias shared by all blocks) is not supported: '
     'pass use_rel_pos_bias=True for one bias per block'),
    # scale_mlp with a LayerNorm is searched (the family's examples); another inner norm is not
    (_replace_block(1, scale_mlp=True, norm_layer=RmsNorm),
     'block 1: MLP Mlp with an inner RmsNorm is not supported, only an inner affine LayerNorm'),
    (_replace_block(1, attn_head_dim=8, window_size=(8, 8)),
     'block 1: attention width (attn_head_dim * num_heads = 32) differs from embed_dim (64)'),
    (_replace_block(1, window_size=(4, 4)),
     'block 1: relative position bias over a (4, 4) window, not the (8, 8) patch grid'),
    (_vit_attention, 'block 1: attention timm.layers.attention.Attention is not supported, only '
                     'timm.models.beit.Attention'),
    (_set(dynamic_img_size=True), 'dynamic_img_size=True is not supported'),
    (_set(patch_drop=torch.nn.Dropout(0.1)), 'patch dropout is not supported'),
])
def test_refused_with_one_line(make, message):
    model = make()
    with pytest.raises(UnsupportedModelError) as e:
        check_model(model)
    assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_a_block_of_another_model_is_refused():
    from timm.models.vision_transformer import Block
    model = _meta_model()
    with torch.device('meta'):
        model.blocks[0] = Block(64, 4)
    with pytest.raises(UnsupportedModelError, match=r'^block 0 is a timm\.models\.vision_transformer\.Block, only '
                                                    r'timm\.models\.beit\.Block is supported$'):
        check_model(model)


def test_supported_timm_models_pass_the_check():
    """Every timm BEiT and BEiT v2 at its own size: per-block relative position bias, layer scale,
    average pooling with fc_norm."""
    from timm.models.beit import Beit
    names = timm.list_models(['beit_*', 'beitv2_*'])
    assert len(names) >= 7
    for name in names:
        with torch.device('meta'):
            model = create_model(name)
        assert isinstance(model, Beit) and check_model(model).name == 'beit', name
        assert model.pos_embed is None and model.global_pool == 'avg' and model.blocks[0].gamma_1 is not None
        assert all(tuple(b.attn.window_size) == model.patch_embed.grid_size for b in model.blocks)


def test_base_block_dims():
    """beit_base_patch16_224: 196 patches and the class token, 12 heads of 64, 3072 hidden units."""
    with torch.device('meta'):
        model = create_model('beit_base_patch16_224')
    dims = FAMILIES['beit'].block_dims(model)
    assert len(dims) == 12
    assert {(b.tokens, b.patches, b.dim, b.heads, b.head_dim, b.hidden, b.qk_norm, b.glu) for b in dims} == {
        (197, 196, 768, 12, 64, 3072, False, False)}


def _randomize(model, seed=0):
    """Non-zero q/v biases and relative position bias tables (timm starts both at zero) and layer
    scales away from init_values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(QKV_BIASES):
            p.data = torch.randn(p.shape, generator=g) * 0.1
        elif name.endswith('relative_position_bias_table'):
            p.data = torch.randn(p.shape, generator=g)
        elif name.endswith(('gamma_1', 'gamma_2')):
            p.data = torch.randn(p.shape, generator=g) * 0.1 + 1


def _supernet(i, fused=True, search_space='spvit', separate=False):
    """Example ``i`` with random biases, tables and layer scale, its untouched copy, and its supernet;
    timm's unfused attention unless ``fused``, the q/k/v bias added after the projection with
    ``separate``."""
    name, kwargs = EXAMPLES[i]
    model = build(name, **kwargs)
    _randomize(model)
    original = build(name, **kwargs)
    original.load_state_dict(model.state_dict())
    for blk in (*model.blocks, *original.blocks):
        blk.attn.fused_attn, blk.attn.qkv_bias_separate = fused, separate
    supernet = spvit.attach_search_space(model, model_name=name, model_kwargs=kwargs, search_space=search_space)
    return supernet.eval(), original


@pytest.mark.parametrize('fused', [True, False])
@pytest.mark.parametrize('i', range(len(EXAMPLES)))
def test_all_gates_open_features_equal_timm(i, fused):
    """On the features (the battery compares logits, with zero tables): the relative position bias,
    q/v biases and layer scale go through the slots exactly as timm computes them, with timm's
    fused and unfused attention alike."""
    supernet, original = _supernet(i, fused, search_space='full')
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (supernet.model.forward_features(x) - original.forward_features(x)).abs().max() <= 1e-5


def _block_input(supernet, x):
    """Block 0's attention input."""
    model = supernet.model
    tokens = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), model.patch_embed(x)), dim=1)
    if model.pos_embed is not None:
        tokens = tokens + model.pos_embed
    return model.blocks[0].norm1(tokens)


@pytest.mark.parametrize('i', [0, 2])
def test_rel_pos_bias_reaches_msa_and_its_kept_heads_but_not_the_conv_ops(i):
    supernet, _ = _supernet(i)
    randomize_batchnorm(supernet)
    slot = supernet.attn_slots[0]
    assert isinstance(slot, BeitAttentionSlot) and slot.relative_position_bias_table is not None
    x = _block_input(supernet, torch.randn(2, 3, 32, 32))
    table = slot.relative_position_bias_table.detach().clone()
    outputs = {}
    with torch.no_grad():
        for op, heads in [('msa', None), ('msa', (1, 3)), ('conv1x1', None), ('conv3x3', None)]:
            slot.pin(op, heads)
            with_bias = slot(x)
            slot.relative_position_bias_table.zero_()
            outputs[op, heads] = with_bias, slot(x)
            slot.relative_position_bias_table.copy_(table)
    for key in [('msa', None), ('msa', (1, 3))]:
        out, without = outputs[key]
        assert (out - without).abs().max() > 1e-2 * out.abs().max(), key
    for key in [('conv1x1', None), ('conv3x3', None)]:
        assert torch.equal(*outputs[key]), key
    # the kept heads read only their own columns: zeroing the other heads' changes nothing
    with torch.no_grad():
        slot.pin('msa', [1, 3])
        kept = slot(x)
        slot.relative_position_bias_table[:, [0, 2]] = 0
        assert torch.equal(slot(x), kept)


@pytest.mark.parametrize('fused', [True, False])
def test_kept_heads_export_their_table_columns_and_compute_timms_attention(fused):
    """msa keeping heads 1 and 3 exports as ``BeitHeadAttention`` with those heads' q/v bias
    channels and relative position bias columns, and computes what timm's full attention computes
    with the other heads' output projection columns zeroed (heads are independent until proj)."""
    from spvit.export import export_supernet
    from spvit.layers import BeitHeadAttention
    supernet, original = _supernet(0, fused)
    arch = supernet.uniform_arch('msa')
    arch.blocks[0] = spvit.BlockArch('msa', arch.blocks[0].mlp_hidden, [1, 3])
    supernet.pin(arch)
    exported = export_supernet(supernet).model
    attn, full = exported.blocks[0].attn, original.blocks[0].attn
    assert type(attn) is BeitHeadAttention and attn.num_heads == 2
    for blk in exported.blocks:
        blk.attn.fused_attn = fused
    channels = torch.cat([torch.arange(16, 32), torch.arange(48, 64)])
    assert torch.equal(attn.relative_position_bias_table, full.relative_position_bias_table[:, [1, 3]])
    assert torch.equal(attn.q_bias, full.q_bias[channels]) and torch.equal(attn.v_bias, full.v_bias[channels])
    x = _block_input(supernet, torch.randn(2, 3, 32, 32))
    with torch.no_grad():
        full.proj.weight[:, torch.cat([torch.arange(0, 16), torch.arange(32, 48)])] = 0
        assert (attn(x) - full(x)).abs().max() <= 1e-5
        images = torch.randn(2, 3, 32, 32)
        assert (supernet.model.forward_features(images) - exported.forward_features(images)).abs().max() <= 1e-5


def test_qkv_bias_added_separately(tmp_path):
    """timm's ``qkv_bias_separate`` (the bias added after a bias-free projection; Beit's constructor
    does not pass it, so a rebuilt model adds it inside the projection, the same sum): all gates
    open equal timm, and kept heads export and reload as the pinned supernet computes."""
    from spvit.export import export_supernet
    supernet, original = _supernet(0, search_space='full', separate=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (supernet.model.forward_features(x) - original.forward_features(x)).abs().max() <= 1e-5
    arch = supernet.uniform_arch('msa', heads=2)
    supernet.pin(arch)
    path = str(tmp_path / 'pruned.pth')
    export_supernet(supernet).save(path)
    loaded = spvit.load_pruned(path)
    with torch.no_grad():
        assert (loaded.forward_features(x) - supernet.model.forward_features(x)).abs().max() <= 1e-5


def test_kept_heads_refuse_a_shared_bias():
    from spvit.layers import BeitHeadAttention
    attn = BeitHeadAttention(64, num_heads=2, qkv_bias=True, window_size=(8, 8), attn_head_dim=16)
    with pytest.raises(UnsupportedModelError, match='shared relative position bias'):
        attn(torch.randn(1, 65, 64), shared_rel_pos_bias=torch.zeros(1, 4, 65, 65))


@pytest.mark.slow
def test_loading_a_pruned_beit_imports_no_search_code(tmp_path):
    """The inference boundary for BEiT, kept heads included: ``load_pruned`` and a forward pass in
    a fresh interpreter load neither the search machinery nor fvcore."""
    from spvit.export import export_supernet
    name, kwargs = EXAMPLES[0]
    supernet, _ = _supernet(0)
    arch, kept = random_arch(supernet, 1, heads=True)
    assert any(b.heads for b in arch.blocks) and {b.attn for b in arch.blocks} == set(spvit.ATTN_OPS)
    randomize_mixing(supernet, 1)
    randomize_batchnorm(supernet, 1)
    set_gates(supernet, arch, kept)
    supernet.pin(arch, kept)
    path = str(tmp_path / 'pruned.pth')
    export_supernet(supernet).save(path)
    assert load_in_fresh_interpreter(path, (3, 32, 32)) == (['BeitHeadAttention', 'ConvAttention', 'NoAttention'], [])
