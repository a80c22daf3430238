"""tools/export.py, tools/flops.py and tools/benchmark.py as a user runs them (subprocesses)."""
import json
import re

import pytest
import timm
import torch

import spvit
from spvit.checkpoint import atomic_save
from spvit.flops import measure_flops

from helpers import (SMALL, randomize_batchnorm, randomize_mixing, random_arch, search_payload, set_gates, start,
                     supernet_and_original)

def tool(name, *args):
    proc = start(name, *args)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return out


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """A search checkpoint of the small ViT with all four ops, its exported pruned file, and an
    architecture file."""
    tmp = tmp_path_factory.mktemp('tools')
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **SMALL)
    randomize_batchnorm(supernet, 7)
    randomize_mixing(supernet, 7)
    arch, kept = random_arch(supernet, 7)
    set_gates(supernet, arch, kept)
    search = tmp / 'search-final.pth'
    atomic_save(search_payload(supernet), str(search))
    arch_file = tmp / 'arch.yaml'
    arch.save(str(arch_file))
    out = tmp / 'run'
    out.mkdir()
    pruned = out / 'pruned.pth'
    stdout = tool('export.py', '--search', search, '--output', pruned, '--safetensors')
    assert f'wrote {pruned}' in stdout
    return dict(tmp=tmp, supernet=supernet.eval(), arch=arch, search=search, arch_file=arch_file, pruned=pruned)


@pytest.mark.slow
def test_export_from_search(files):
    model = spvit.load_pruned(str(files['pruned']))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - files['supernet'](x)).abs().max().item() <= 1e-4
        safetensors = spvit.load_pruned(str(files['pruned'].parent / 'model.safetensors'))
        assert torch.equal(safetensors(x), model(x))
    assert spvit.Architecture.load(str(files['pruned'].parent / 'arch.yaml')) == files['arch']
    for path in (files['pruned'], files['pruned'].parent / 'model.safetensors'):
        assert spvit.read_pruned(str(path)).classes == [f'n0{i:07d}' for i in range(10)]


@pytest.mark.slow
def test_flops_json(files):
    report = json.loads(tool('flops.py', '--pruned', files['pruned'], '--compare', '--json'))
    model = spvit.load_pruned(str(files['pruned']))
    measured, by_module = measure_flops(model, (3, 32, 32))
    original = timm.create_model('vit_tiny_patch16_224', **SMALL)
    assert report['flops'] == measured
    assert report['params'] == sum(p.numel() for p in model.parameters())
    assert report['original_flops'] == measure_flops(original, (3, 32, 32))[0]
    assert report['flops_ratio'] == pytest.approx(measured / report['original_flops'])
    assert abs(report['analytic_flops'] - measured) / measured < 0.005
    assert [(b['attn'], b['mlp_hidden']) for b in report['blocks']] == [(b.attn, b.mlp_hidden) for b in files['arch'].blocks]
    assert [b['attn_flops'] for b in report['blocks']] == [by_module[f'blocks.{i}.attn'] for i in range(4)]


@pytest.mark.slow
def test_flops_table(files):
    out = tool('flops.py', '--arch', files['arch_file'], '--compare')
    rows = [line.split() for line in out.splitlines() if re.match(r'\s+\d+\s', line)]
    assert [(r[1], r[3]) for r in rows] == [(b.attn, f'{b.mlp_hidden}/256') for b in files['arch'].blocks]
    model = spvit.build_from_arch('vit_tiny_patch16_224', SMALL, files['arch']).model
    total = measure_flops(model, (3, 32, 32))[0]
    assert f'total: {total / 1e9:.4f} GFLOPs (fvcore)' in out
    assert re.search(r'original: [\d.]+ GFLOPs, [\d.]+ M params; reduction [\d.]+% FLOPs', out)


@pytest.mark.slow
@pytest.mark.parametrize('runtime', ['torch', 'onnxruntime'])
def test_benchmark(files, runtime):
    ort = ['--runtime', 'onnxruntime', '--int8'] if runtime == 'onnxruntime' else []
    out = tool('benchmark.py', '--pruned', files['pruned'], '--batch-sizes', 1, 2, '--runs', 2, '--warmup', 1,
               '--threads', 1, '--device', 'cpu', *ort)
    rows = re.findall(r'^\s+(\d+)\s+([a-z0-9-]+)\s+([\d.]+)\s+([\d.]+)\s+2\s*(?:([\d.]+) to ([a-z-]+))?$', out, re.M)
    names = ['original', 'pruned'] + (['original-ort', 'pruned-ort', 'pruned-int8'] if ort else [])
    assert [(r[0], r[1]) for r in rows] == [(b, n) for b in ('1', '2') for n in names]
    references = {'pruned': 'original', 'pruned-ort': 'original-ort', 'pruned-int8': 'pruned-ort'}
    for batch, name, ms, ips, ratio, reference in rows:
        # images/s agrees with the latency, which is printed to 0.01 ms (sub-ms on ONNX Runtime)
        assert int(batch) / float(ips) * 1e3 == pytest.approx(float(ms), rel=0.01, abs=0.005)
        assert reference == references.get(name, '') and (ratio != '') == (name in references)
    measured = measure_flops(spvit.load_pruned(str(files['pruned'])), (3, 32, 32))[0]
    original = measure_flops(timm.create_model('vit_tiny_patch16_224', **SMALL), (3, 32, 32))[0]
    assert f'FLOPs ratio pruned/original: {measured / original:.3f}' in out


@pytest.mark.slow
def test_bad_input(files):
    """One line on stderr, exit code 2, no traceback, nothing written or overwritten."""
    tmp = files['tmp']
    existing = tmp / 'existing.pth'
    existing.write_bytes(b'keep me')
    plain = tmp / 'plain.pth'
    torch.save(timm.create_model('vit_tiny_patch16_224', **SMALL).state_dict(), plain)
    truncated = tmp / 'truncated.pth'
    truncated.write_bytes(files['search'].read_bytes()[:5000])
    corrupted = tmp / 'corrupted.pth'
    corrupted.write_bytes(b'\x80\x02not a checkpoint at all')
    other_model = tmp / 'other.yaml'
    spvit.Architecture('deit_tiny_patch16_224', files['arch'].blocks).save(str(other_model))
    no_msa = tmp / 'no_msa.yaml'
    spvit.Architecture('vit_tiny_patch16_224', [spvit.BlockArch('conv1x1', 100)] * 4, SMALL).save(str(no_msa))
    cases = [
        (('export.py', '--search', plain, '--output', existing, '--force'), 'is not an spvit-search checkpoint'),
        (('export.py', '--search', truncated, '--output', existing, '--force'), 'truncated, corrupted or not a checkpoint'),
        (('export.py', '--search', corrupted, '--output', existing, '--force'), 'truncated, corrupted or not a checkpoint'),
        (('export.py', '--model', 'vit_tiny_patch16_224', '--arch', other_model, '--output', existing, '--force'),
         "architecture is for model 'deit_tiny_patch16_224', not 'vit_tiny_patch16_224'"),
        (('export.py', '--arch', other_model, '--output', existing, '--force'), 'architecture has 4 blocks but deit_tiny_patch16_224 has 12'),
        (('export.py', '--search', files['search'], '--output', tmp / 'missing' / 'p.pth'), 'output directory does not exist'),
        (('flops.py', '--pruned', files['search']), 'is not an spvit-pruned checkpoint (it is spvit-search)'),
        (('export.py', '--arch', no_msa, '--output', existing, '--force'), 'no block of the architecture keeps msa'),
        (('flops.py', '--arch', no_msa), 'no block of the architecture keeps msa'),
        (('benchmark.py', '--pruned', tmp / 'nothing.pth'), 'file not found'),
        (('export.py', '--search', files['search'], '--output', existing), f'output exists: {existing} (pass --force'),
        (('export.py', '--search', files['search'], '--output', files['pruned'].parent / 'p.pth', '--safetensors'),
         f"output exists: {files['pruned'].parent / 'model.safetensors'}"),
        (('export.py', '--search', plain, '--output', tmp / '.' / 'plain.pth', '--force'), 'is also an input'),
        (('export.py', '--arch', tmp / 'arch.yaml', '--checkpoint', plain, '--output', tmp / 'p.pth', '--safetensors',
          '--force'), f'output {tmp / "arch.yaml"} is also an input'),
    ]
    procs = [start(*args) for args, _ in cases]     # concurrently: each pays the interpreter start
    for proc, (args, message) in zip(procs, cases):
        out, err = proc.communicate()
        assert proc.returncode == 2, (args, err)
        assert out == '' and err.count('\n') == 1, (args, err)
        assert err.startswith(f'{args[0]}: error: ') and message in err, (args, err)
    assert existing.read_bytes() == b'keep me'
    assert not (tmp / 'missing').exists() and not (tmp / 'p.pth').exists() and not (tmp / 'run' / 'p.pth').exists()
    assert spvit.Architecture.load(str(files['arch_file'])) == files['arch']
    assert sorted(p.name for p in tmp.iterdir() if '.tmp' in p.name) == []


def test_model_kwargs_are_read_as_yaml():
    import argparse
    from spvit.cli import model_kwarg
    assert [model_kwarg(t) for t in ('img_size=160', 'drop_rate=0.1', 'class_token=false', 'global_pool=avg',
                                     'img_size=[96,128]')] == [
        ('img_size', 160), ('drop_rate', 0.1), ('class_token', False), ('global_pool', 'avg'), ('img_size', [96, 128])]
    for bad in ('img_size', '=3', 'x=[1'):
        with pytest.raises(argparse.ArgumentTypeError):
            model_kwarg(bad)


def test_a_closed_stdout_ends_a_tool_quietly():
    """`tools/flops.py ... | head -1`: the reader goes away; no BrokenPipeError traceback."""
    proc = start('flops.py', '--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=4')
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 141 and 'Traceback' not in err, err
