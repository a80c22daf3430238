"""The battery every registered model family gets, on each of its example models: supporting a new
family is one module in ``spvit/families`` and these tests run on it without a copied file."""
import json

import pytest
import torch

import spvit
from spvit.families import FAMILIES, family_of
from spvit.flops import measure_flops

from helpers import (SEARCH_DATA, load, randomize_batchnorm, randomize_mixing, random_arch, set_gates,
                     supernet_and_original, tool)

FAMILY_NAMES = list(FAMILIES)
# (family, example index), named for the test ids
EXAMPLES = [pytest.param((f, i), id=f'{f}{i}') for f in FAMILY_NAMES for i in range(len(FAMILIES[f].examples))]


def example(case, search_space='spvit'):
    family, i = case
    model_name, kwargs = FAMILIES[family].examples[i]
    return supernet_and_original(model_name, search_space=search_space, **kwargs)


def inputs(supernet, batch=2):
    return torch.randn(batch, *supernet.input_size, generator=torch.Generator().manual_seed(0))


def kwargs_argv(kwargs):
    """``--model-kwargs`` as a user writes them (values read as YAML: tuples as lists, None as null)."""
    return [f'{k}={json.dumps(list(v)) if isinstance(v, tuple) else json.dumps(v) if v is None else v}'
            for k, v in kwargs.items()]


def test_families_are_found_by_model_class():
    for family in FAMILY_NAMES:
        for i in range(len(FAMILIES[family].examples)):
            supernet, original = example((family, i))
            assert family_of(original) is FAMILIES[family]


@pytest.mark.parametrize('case', EXAMPLES)
@pytest.mark.parametrize('space', ['spvit', 'full'])
def test_all_gates_open_equals_timm(case, space):
    supernet, original = example(case, search_space=space)
    supernet.eval()
    x = inputs(supernet)
    with torch.no_grad():
        assert (supernet(x) - original(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize('case', EXAMPLES)
@pytest.mark.parametrize('seed,heads', [(0, False), (1, True)])
def test_pinned_equals_gated_equals_export_and_flops_equal_fvcore(case, seed, heads, tmp_path):
    """The deterministic gates of a random architecture compute what the pinned supernet computes,
    the export what the pinned supernet computes (kept heads too), the saved and reloaded model the
    same again, and the analytic FLOPs are fvcore's."""
    from spvit.export import export_supernet
    supernet, _ = example(case)
    arch, kept = random_arch(supernet, seed)
    randomize_batchnorm(supernet, seed)
    randomize_mixing(supernet, seed)
    set_gates(supernet, arch, kept)
    supernet.eval()
    x = inputs(supernet)
    with torch.no_grad():
        gated = supernet(x)
        supernet.pin(arch, kept)
        assert (supernet(x) - gated).abs().max().item() <= 1e-5
    if heads:   # narrow the msa blocks to a random subset of their heads
        arch, kept = random_arch(supernet, seed, heads=True)
        assert any(b.heads for b in arch.blocks)
        supernet.pin(arch, kept)
    with torch.no_grad():
        pinned = supernet(x)
    exported = export_supernet(supernet)
    path = str(tmp_path / 'pruned.pth')
    exported.save(path)
    loaded = spvit.load_pruned(path)
    with torch.no_grad():
        assert (exported.model(x) - pinned).abs().max().item() <= 1e-4
        assert torch.equal(loaded(x), exported.model(x))
    measured, _ = measure_flops(loaded, supernet.input_size)
    assert abs(measured - supernet.arch_flops(arch)) / measured < 0.005
    names = {n for n, _ in loaded.named_parameters()}
    assert not any(k in n for n in names for k in ('gate_logits', 'head_logits', 'head_assign', 'bn1', 'bn3'))


@pytest.mark.parametrize('case', EXAMPLES)
def test_flops_tool_reports_the_model(case):
    family, i = case
    model_name, kwargs = FAMILIES[family].examples[i]
    r = tool('flops.py', ['--model', model_name, '--model-kwargs', *kwargs_argv(kwargs), '--json'])
    assert r.returncode == 0, r.stderr[-800:]
    report = json.loads(r.stdout)
    supernet, original = example(case)
    measured, _ = measure_flops(original, supernet.input_size)
    assert report['flops'] == measured and report['analytic_flops'] == supernet.original_flops


@pytest.mark.slow
@pytest.mark.parametrize('case', EXAMPLES)
def test_a_tiny_search_lands_on_its_target(case, image_folder, tmp_path):
    from spvit.search import main as search_main
    family, i = case
    model_name, kwargs = FAMILIES[family].examples[i]
    out = tmp_path / 'run'
    search_main(['--model', model_name, '--model-kwargs', *kwargs_argv(kwargs), *SEARCH_DATA, '--data-dir',
                 image_folder, '--output-dir', str(out), '--batch-size', '16', '--target-ratio', '0.6',
                 '--epochs', '2'])
    final = load(out / 'search-final.pth')
    assert abs(final['achieved_gflops'] / final['target_gflops'] - 1) <= 0.02


def test_models_tool_table_and_check():
    r = tool('models.py', [])
    assert r.returncode == 0, r.stderr
    assert [line.split('|')[1].strip() for line in r.stdout.splitlines()[2:]] == FAMILY_NAMES
    ok = tool('models.py', ['--check', 'deit_small_patch16_224'])
    assert ok.returncode == 0 and ok.stdout.strip() == 'deit_small_patch16_224: supported, family vit', ok.stderr
    refused = tool('models.py', ['--check', 'vit_relpos_small_patch16_224'])
    assert refused.returncode == 2 and refused.stderr.startswith('models.py: error: VisionTransformerRelPos is not '
                                                                 'supported')
    assert len(refused.stderr.strip().splitlines()) == 1 and refused.stdout == ''


def test_readme_table_is_what_the_tool_prints():
    from helpers import REPO
    from spvit.families import supported_table
    assert supported_table() in open(f'{REPO}/README.md').read()
