"""Deployment through ONNX: the pruned model (every op, ViT, Swin, Swin V2 and BEiT) runs on ONNX Runtime with the
logits of PyTorch at any batch size, carries its data config and architecture, quantises to int8,
and the tools refuse what they cannot do with one line."""
import json

import pytest
import torch

import spvit
from spvit.deploy import (META_ARCH, META_DATA_CONFIG, OnnxModel, export_onnx, export_verified, int8_path,
                          read_metadata, unverified_path)
from spvit.errors import VerificationError
from spvit.export import to_pruned
from spvit.families import FAMILIES

from helpers import SMALL, randomize_batchnorm, randomize_mixing, random_arch, start, supernet_and_original

pytestmark = pytest.mark.slow

SWIN = dict(FAMILIES['swin'].examples[0][1], num_classes=10)
BEIT = dict(FAMILIES['beit'].examples[0][1], num_classes=10)
SWINV2 = dict(FAMILIES['swinv2'].examples[0][1], num_classes=10)
DEIT_SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
CASES = {
    'vit_cls_heads': ('vit_tiny_patch16_224', SMALL, True),
    'vit_avg_pool': ('vit_tiny_patch16_224', dict(SMALL, global_pool='avg'), False),
    'deit_distilled': ('deit_tiny_distilled_patch16_224', DEIT_SMALL, False),
    'vit_registers': ('vit_tiny_patch16_224', dict(SMALL, reg_tokens=4, no_embed_class=True), True),
    'swin_heads': ('swin_tiny_patch4_window7_224', SWIN, True),
    'beit_heads': ('beit_base_patch16_224', BEIT, True),
    'swinv2_heads': ('swinv2_tiny_window8_256', SWINV2, True),
    # inner norms: over kept units and heads, and a conv op's own channels (ConvAttention.norm)
    'vit_inner_norms_heads': ('vit_tiny_patch16_224', dict(SMALL, scale_mlp_norm=True, scale_attn_norm=True), True),
}


def pruned_model(name, kwargs, heads, seed=0):
    """The pruned model of a random architecture using all four ops, with non-trivial BatchNorm
    and head mixing folded into its convs."""
    supernet, _ = supernet_and_original(name, **kwargs)
    randomize_batchnorm(supernet, seed)
    randomize_mixing(supernet, seed)
    arch, kept = random_arch(supernet, seed, heads)
    assert {b.attn for b in arch.blocks} == set(spvit.ATTN_OPS)
    supernet.pin(arch, kept)
    return to_pruned(supernet.eval()), arch, supernet.input_size


@pytest.mark.parametrize('case', CASES)
def test_parity_at_any_batch(case, tmp_path):
    model, arch, input_size = pruned_model(*CASES[case])
    path = str(tmp_path / 'model.onnx')
    data_config = {'input_size': list(input_size), 'mean': [0.1, 0.2, 0.3], 'std': [0.5] * 3,
                   'interpolation': 'bilinear', 'crop_pct': 0.9}
    diffs = export_verified(model, path, input_size, data_config=data_config, arch=arch.to_dict())
    assert set(diffs) == {1, 8} and max(diffs.values()) <= 1e-4
    ort_model = OnnxModel(path)
    x = torch.randn(5, *input_size)        # a batch size it was neither traced nor checked at
    with torch.no_grad():
        assert (ort_model(x) - model(x)).abs().max().item() <= 1e-4
    meta = read_metadata(path)
    assert meta[META_DATA_CONFIG] == data_config
    assert meta[META_ARCH] == json.loads(json.dumps(arch.to_dict()))      # JSON: tuples come back as lists
    assert spvit.Architecture.from_dict(meta[META_ARCH]).blocks == arch.blocks


def test_parity_failure_keeps_the_file_aside(tmp_path):
    model, _, input_size = pruned_model(*CASES['vit_cls_heads'])
    path = tmp_path / 'model.onnx'
    with pytest.raises(VerificationError, match='differs from PyTorch by .*; kept as .*model.onnx.unverified'):
        export_verified(model, str(path), input_size, tolerance=-1.0)     # no difference passes a negative bound
    assert not path.exists() and (tmp_path / 'model.onnx.unverified').exists()
    assert unverified_path(str(path)) == str(tmp_path / 'model.onnx.unverified')


@pytest.fixture(scope='module')
def deployed(pretrained, tmp_path_factory):
    """The test's pretrained 4-class ViT with a 4-op architecture, exported to a pruned checkpoint,
    ONNX and int8 by tools/export.py."""
    tmp = tmp_path_factory.mktemp('deploy')
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **dict(SMALL, num_classes=4))
    arch, _ = random_arch(supernet, 3)
    arch_file = tmp / 'arch.yaml'
    arch.save(str(arch_file))
    files = dict(tmp=tmp, arch=arch_file, pruned=tmp / 'pruned.pth', onnx=tmp / 'model.onnx')
    proc = start('export.py', '--arch', arch_file, '--checkpoint', pretrained, '--model-kwargs', 'num_classes=4',
                 '--output', files['pruned'], '--onnx', files['onnx'], '--int8')
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert f'wrote {files["onnx"]}: opset 18, dynamic batch; ONNX Runtime vs PyTorch max abs difference' in out
    assert f'wrote {int8_path(str(files["onnx"]))}: dynamic int8 weights' in out
    files['int8'] = tmp / 'model.int8.onnx'
    return files


def run_json(*args):
    proc = start(*args, '--json')
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return json.loads(out)


def test_eval_onnx_and_int8(deployed, image_folder):
    data = ('--data-dir', image_folder, '--workers', '0')
    torch_eval = run_json('eval.py', '--pruned', deployed['pruned'], *data)
    onnx_eval = run_json('eval.py', '--onnx', deployed['onnx'], *data)
    int8_eval = run_json('eval.py', '--onnx', deployed['int8'], *data)
    assert onnx_eval['images'] == torch_eval['images'] == 64
    # the recorded data config and the same logits (within 1e-4): at most one image may flip on a near tie
    assert abs(onnx_eval['top1'] - torch_eval['top1']) <= 100 / 64 + 1e-9
    assert onnx_eval['loss'] == pytest.approx(torch_eval['loss'], abs=1e-3)
    assert onnx_eval['gflops'] == pytest.approx(torch_eval['gflops'], rel=5e-3)   # analytic (recorded) vs fvcore
    assert int8_eval['fp32'] == str(deployed['onnx']) and int8_eval['fp32_top1'] == onnx_eval['top1']
    assert int8_eval['top1_change'] == pytest.approx(int8_eval['top1'] - onnx_eval['top1'])
    # the pruned checkpoint written beside ONNX is the one ONNX came from
    assert deployed['pruned'].exists()


def test_pruned_checkpoint_to_onnx(deployed):
    """A fine-tuned pruned checkpoint goes to ONNX on its own (--pruned), with the same metadata."""
    out = deployed['tmp'] / 'again.onnx'
    proc = start('export.py', '--pruned', deployed['pruned'], '--onnx', out)
    stdout, err = proc.communicate()
    assert proc.returncode == 0, err
    assert read_metadata(str(out)) == read_metadata(str(deployed['onnx']))


def test_bad_input(deployed, image_folder, tmp_path, monkeypatch):
    """One line on stderr, exit code 2, nothing written or overwritten."""
    existing = tmp_path / 'existing.onnx'
    existing.write_bytes(b'keep me')
    garbage = tmp_path / 'garbage.onnx'
    garbage.write_bytes(b'not onnx')
    foreign = tmp_path / 'foreign.onnx'         # an ONNX file without spvit's metadata
    torch.onnx.export(torch.nn.Linear(3, 4), (torch.randn(1, 3),), str(foreign), dynamo=True, external_data=False)
    data = ('--data-dir', image_folder, '--workers', '0')
    cases = [
        (('export.py', '--arch', deployed['arch'], '--output', tmp_path / 'p.pth', '--int8'), '--int8 needs --onnx'),
        (('export.py', '--pruned', deployed['pruned']), '--pruned needs --onnx'),
        (('export.py', '--pruned', deployed['pruned'], '--onnx', tmp_path / 'm.onnx', '--output', tmp_path / 'p.pth'),
         'give --onnx, not --output'),
        (('export.py', '--pruned', deployed['pruned'], '--onnx', existing), f'output exists: {existing}'),
        (('export.py', '--pruned', deployed['pruned'], '--onnx', deployed['pruned'], '--force'), 'is also an input'),
        (('eval.py', '--onnx', garbage, *data), f'cannot read {garbage} as ONNX'),
        (('eval.py', '--onnx', foreign, *data), 'records no data config'),
        (('eval.py', '--onnx', tmp_path / 'none.onnx', *data), 'file not found'),
        (('eval.py', '--onnx', deployed['onnx'], '--pruned', deployed['pruned'], *data), 'evaluates the ONNX file alone'),
    ]
    procs = [start(*args) for args, _ in cases]
    for proc, (args, message) in zip(procs, cases):
        out, err = proc.communicate()
        assert proc.returncode == 2, (args, err)
        assert out == '' and err.count('\n') == 1, (args, err)
        assert err.startswith(f'{args[0]}: error: ') and message in err, (args, err)
    assert existing.read_bytes() == b'keep me'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['existing.onnx', 'foreign.onnx', 'garbage.onnx']

    # without the extra: every ONNX flag names it, before anything is written
    blocker = tmp_path / 'no_extra'
    (blocker / 'onnxruntime').mkdir(parents=True)
    (blocker / 'onnxruntime' / '__init__.py').write_text('raise ImportError("not installed")\n')
    monkeypatch.setenv('PYTHONPATH', str(blocker))
    for args in [('export.py', '--arch', deployed['arch'], '--output', tmp_path / 'p.pth', '--onnx', tmp_path / 'm.onnx'),
                 ('eval.py', '--onnx', deployed['onnx'], *data),
                 ('benchmark.py', '--pruned', deployed['pruned'], '--runtime', 'onnxruntime')]:
        proc = start(*args)
        out, err = proc.communicate()
        assert proc.returncode == 2 and err.count('\n') == 1, (args, err)
        assert "needs the onnx extra (onnxruntime not installed): pip install -e '.[onnx]'" in err, (args, err)
    assert not (tmp_path / 'p.pth').exists() and not (tmp_path / 'm.onnx').exists()


def test_export_onnx_metadata_is_optional(tmp_path):
    model, _, input_size = pruned_model(*CASES['vit_avg_pool'])
    path = str(tmp_path / 'plain.onnx')
    export_onnx(model, path, input_size)
    assert read_metadata(path) == {'spvit.format': 'spvit-onnx', META_DATA_CONFIG: {}}
