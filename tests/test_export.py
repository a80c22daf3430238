"""Export: the pruned model computes what the pinned supernet computes, with plain modules only,
and survives tracing, torch.export, timm's feature API and a round trip through its file."""
import ast
import os
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn as nn

import spvit
from spvit.arch import Architecture, BlockArch
from spvit.checkpoint import atomic_save
from spvit.errors import ArchitectureError, CheckpointError
from spvit.export import build_from_arch, export_search, export_supernet, to_pruned
from spvit.flops import measure_flops
from spvit.hybrid import ConvAttention, HeadAttention, NoAttention
from spvit.pruned import PRUNED_FORMAT, load_pruned, read_pruned

from helpers import (SMALL, load_in_fresh_interpreter, randomize_batchnorm, randomize_mixing, random_arch, search_payload,
                     set_gates, supernet_and_original)

# (model, kwargs, seed, msa blocks keep a subset of their heads)
CASES = [('vit_tiny_patch16_224', SMALL, 0, False), ('deit_tiny_patch16_224', {}, 1, False),
         ('deit_tiny_distilled_patch16_224', {}, 2, False), ('vit_tiny_patch16_224', SMALL, 3, True)]


@pytest.fixture(scope='module', params=CASES,
                ids=[(c[0] if not c[1] else 'small_vit') + ('_heads' if c[3] else '') for c in CASES])
def case(request):
    """A supernet with non-trivial BatchNorm and head mixing, pinned to a random architecture
    using all four ops, and its export."""
    name, kwargs, seed, heads = request.param
    supernet, original = supernet_and_original(name, **kwargs)
    randomize_batchnorm(supernet, seed)
    randomize_mixing(supernet, seed)
    arch, kept = random_arch(supernet, seed, heads)
    assert not heads or any(b.heads for b in arch.blocks)
    assert {b.attn for b in arch.blocks} == set(spvit.ATTN_OPS)
    supernet.pin(arch, kept)
    supernet.eval()
    x = torch.randn(2, *supernet.input_size, generator=torch.Generator().manual_seed(seed))
    return SimpleNamespace(name=name, kwargs=kwargs, supernet=supernet, original=original, arch=arch, kept=kept,
                           model=to_pruned(supernet), x=x)


def test_logits_equal_pinned_supernet(case):
    with torch.no_grad():
        expected, got = case.supernet(case.x), case.model(case.x)
    assert (got - expected).abs().max().item() <= 1e-4
    # and block by block, where a wrong kernel or fold could not hide behind later blocks
    tokens = torch.randn(2, case.supernet.block_dims[0].tokens, case.original.embed_dim)
    with torch.no_grad():
        for blk, slot in zip(case.model.blocks, case.supernet.attn_slots):
            assert (blk.attn(tokens) - slot(tokens)).abs().max().item() <= 1e-5


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_plain_modules_and_parameter_count(case):
    model, original = case.model, case.original
    assert type(model) is type(original)
    kinds = {'skip': NoAttention, 'conv1x1': ConvAttention, 'conv3x3': ConvAttention, 'msa': timm.layers.Attention}
    assert [type(blk.attn) for blk in model.blocks] == [HeadAttention if b.heads else kinds[b.attn]
                                                        for b in case.arch.blocks]
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any('gate' in n or 'head_assign' in n for n, _ in model.named_parameters())
    assert not any(n.startswith('spvit.slots') or n.startswith('spvit.supernet') for n in
                   {type(m).__module__ for m in model.modules()})
    # exactly what the pruned modules need: the original minus the blocks' attention and MLPs, plus
    # Conv2d(d->hd, k x k) + Linear(hd->d) per conv block and d->m->d per MLP; a skipped block also
    # loses its attention pre-norm
    d, hd = original.embed_dim, original.blocks[0].attn.head_dim
    need = _params(original) - sum(_params(blk.attn) + _params(blk.mlp) for blk in original.blocks)
    for b, blk in zip(case.arch.blocks, original.blocks):
        k = {'conv1x1': 1, 'conv3x3': 3}.get(b.attn)
        share = 1 if b.heads is None else len(b.heads) / blk.attn.num_heads     # qkv, proj: one share per head
        msa = share * (_params(blk.attn) - d) + d                                 # proj bias: whole
        need += {'skip': -_params(blk.norm1), 'msa': msa}.get(b.attn, 0) if k is None \
            else d * hd * k * k + hd + hd * d + d
        need += d * b.mlp_hidden + b.mlp_hidden + b.mlp_hidden * d + d
    assert _params(model) == need


def test_fvcore_count_equals_analytic(case):
    measured, by_module = measure_flops(case.model, case.supernet.input_size)
    analytic = case.supernet.arch_flops(case.arch)
    assert abs(measured - analytic) / analytic < 0.005
    for i, b in enumerate(case.arch.blocks):
        if b.attn == 'skip':
            assert by_module.get(f'blocks.{i}.attn', 0) == 0


@pytest.mark.filterwarnings('ignore::FutureWarning', 'ignore::torch.jit.TracerWarning')
def test_timm_feature_api_and_jit_trace(case):
    model, x = case.model, case.x
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(model.forward_head(model.forward_features(x)), logits)
        traced = torch.jit.trace(model, x[:1], check_trace=False)
        assert (traced(x) - logits).abs().max().item() <= 1e-5


def test_torch_export(case):
    program = torch.export.export(case.model, (case.x,))
    with torch.no_grad():
        assert (program.module()(case.x) - case.model(case.x)).abs().max().item() <= 1e-5


def test_round_trip_through_file(case, tmp_path):
    path = str(tmp_path / 'pruned.pth')
    exported = export_supernet(case.supernet, source={'pretrained': False, 'checkpoint': None}, target_gflops=1.0)
    exported.save(path, safetensors=True)
    raw = torch.load(path, weights_only=True)
    assert raw['format'] == PRUNED_FORMAT and raw['arch'] == case.arch.to_dict()
    assert raw['provenance']['achieved_gflops'] * 1e9 == pytest.approx(case.supernet.arch_flops(case.arch))
    assert raw['provenance']['target_gflops'] == 1.0
    assert [k.tolist() for k in raw['kept']] == [k.tolist() for k in case.kept]
    assert raw['data_config']['mean'] == list(case.original.pretrained_cfg['mean'])
    loaded = load_pruned(path)
    from_safetensors = read_pruned(str(tmp_path / 'model.safetensors'))
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(case.x), case.model(case.x))
        assert torch.equal(from_safetensors.model(case.x), case.model(case.x))
    assert from_safetensors.arch == spvit.Architecture.load(str(tmp_path / 'arch.yaml')) == case.arch


def test_export_search_checkpoint(tmp_path):
    """search-final.pth as the search tool writes it: the export computes what the searched
    supernet computes under its deterministic gates."""
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **SMALL)
    randomize_batchnorm(supernet, 5)
    randomize_mixing(supernet, 5)
    arch, kept = random_arch(supernet, 5)
    set_gates(supernet, arch, kept)
    path = str(tmp_path / 'search-final.pth')
    data_config = {'input_size': [3, 32, 32], 'mean': [0.5] * 3, 'std': [0.25] * 3, 'interpolation': 'bicubic', 'crop_pct': 0.875}
    atomic_save(search_payload(supernet, data_config), path)
    exported = export_search(path)
    x = torch.randn(3, 3, 32, 32)
    supernet.eval()
    with torch.no_grad():
        assert (exported.model(x) - supernet(x)).abs().max().item() <= 1e-4
    assert exported.arch == arch
    assert exported.data_config == data_config
    assert exported.provenance['source'] == {'pretrained': True, 'checkpoint': None}
    assert exported.provenance['target_gflops'] == 0.01
    assert exported.provenance['original_gflops'] * 1e9 == supernet.original_flops
    # the recorded preprocessing is what timm resolves for the loaded model
    exported.save(str(tmp_path / 'pruned.pth'))
    loaded = load_pruned(str(tmp_path / 'pruned.pth'))
    assert timm.data.resolve_model_data_config(loaded)['std'] == (0.25,) * 3


def test_build_from_arch_uses_original_weights(tmp_path):
    """Conv ops from uniform head mixing and fresh BatchNorm, units by |fc1 row| * |fc2 column|."""
    torch.manual_seed(0)
    original = timm.create_model('vit_tiny_patch16_224', **SMALL).eval()
    path = str(tmp_path / 'weights.pth')
    torch.save(original.state_dict(), path)
    blocks = [spvit.BlockArch('conv1x1', 100), spvit.BlockArch('conv3x3', 256), spvit.BlockArch('msa', 7),
              spvit.BlockArch('skip', 30)]
    arch = spvit.Architecture(model='vit_tiny_patch16_224', model_kwargs=SMALL, blocks=blocks)
    model = build_from_arch('vit_tiny_patch16_224', SMALL, arch, checkpoint=path).model
    heads, hd, d = 4, 16, 64
    bn_scale = 1 / (1 + 1e-5) ** 0.5
    for i in (0, 1):
        attn, ref = model.blocks[i].attn, original.blocks[i].attn
        w_v = ref.qkv.weight[2 * d:].reshape(heads, hd, d).mean(0)
        b_v = ref.qkv.bias[2 * d:].reshape(heads, hd).mean(0)
        w_o = ref.proj.weight.reshape(d, heads, hd).mean(1)
        k = attn.conv.kernel_size[0]
        for dy in range(k):
            for dx in range(k):
                assert torch.allclose(attn.conv.weight[:, :, dy, dx], w_v * bn_scale, atol=1e-6)
        assert torch.allclose(attn.conv.bias, b_v * k * k * bn_scale, atol=1e-6)
        assert torch.allclose(attn.proj.weight, w_o * k * k, atol=1e-6)
        assert torch.equal(attn.proj.bias, ref.proj.bias)
    assert torch.equal(model.blocks[2].attn.qkv.weight, original.blocks[2].attn.qkv.weight)
    for blk, ref, b in zip(model.blocks, original.blocks, blocks):
        score = ref.mlp.fc1.weight.abs().sum(1) * ref.mlp.fc2.weight.abs().sum(0)
        top = score.topk(b.mlp_hidden).indices.sort().values
        assert torch.equal(blk.mlp.fc1.weight, ref.mlp.fc1.weight[top])
        assert torch.equal(blk.mlp.fc2.weight, ref.mlp.fc2.weight[:, top])
    assert torch.equal(model.head.weight, original.head.weight)
    assert torch.equal(model.patch_embed.proj.weight, original.patch_embed.proj.weight)

    with pytest.raises(ArchitectureError, match="is for model 'vit_tiny_patch16_224', not 'deit_tiny_patch16_224'"):
        build_from_arch('deit_tiny_patch16_224', {}, arch)
    with pytest.raises(ArchitectureError, match='5 blocks'):
        build_from_arch('vit_tiny_patch16_224', SMALL, spvit.Architecture('vit_tiny_patch16_224', blocks + blocks[:1]))


def test_unpinned_supernet_is_refused(small_supernet):
    supernet, _ = small_supernet
    with pytest.raises(ArchitectureError, match='no pinned architecture'):
        to_pruned(supernet)


def test_pruned_file_that_does_not_fit(tmp_path, small_supernet):
    supernet, _ = small_supernet
    arch, kept = random_arch(supernet, 0)
    supernet.pin(arch, kept)
    payload = export_supernet(supernet).payload()
    path = str(tmp_path / 'p.pth')
    other = dict(payload, arch=dict(payload['arch'], blocks=payload['arch']['blocks'][::-1]))
    atomic_save(other, path)
    with pytest.raises(CheckpointError, match='weights do not fit the architecture'):
        load_pruned(path)
    atomic_save(dict(payload, version=2), path)
    with pytest.raises(CheckpointError, match='version 2 is newer'):
        load_pruned(path)
    atomic_save({k: v for k, v in payload.items() if k != 'version'}, path)
    with pytest.raises(CheckpointError, match=r'pruned checkpoint without a valid version \(got None\)'):
        load_pruned(path)


@pytest.mark.parametrize('module', ['hybrid.py', 'pruned.py'])
def test_runtime_modules_import_no_search_code(module):
    """A pruned model needs timm, torch and the arch spec, never the search machinery."""
    path = os.path.join(os.path.dirname(spvit.__file__), module)
    tree = ast.parse(open(path).read())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1}
    assert not imported & {'gates', 'slots', 'supernet', 'mixing', 'export'}


def test_every_exported_parameter_is_used():
    """What DDP needs of a fine-tuned hybrid (and what 'the parameter count is what inference uses'
    means): every parameter gets a gradient, also in skipped blocks (their pre-norm is gone)."""
    from helpers import supernet_and_original
    from spvit.export import to_pruned
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **SMALL)
    arch, kept = random_arch(supernet, 0)
    assert 'skip' in {b.attn for b in arch.blocks}
    supernet.pin(arch, kept)
    model = to_pruned(supernet).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []


@pytest.mark.slow
def test_loading_a_pruned_model_imports_no_search_code(tmp_path):
    """The inference boundary, in a fresh interpreter: ``spvit.load_pruned`` and a forward pass load
    neither the search machinery nor fvcore."""
    arch = Architecture('vit_tiny_patch16_224', [BlockArch('conv3x3', 96), BlockArch('msa', 192)],
                        dict(img_size=32, patch_size=8, depth=2, num_classes=5))
    path = str(tmp_path / 'pruned.pth')
    build_from_arch(arch.model, arch.model_kwargs, arch).save(path)
    assert load_in_fresh_interpreter(path, (3, 32, 32)) == (['Attention', 'ConvAttention'], [])
