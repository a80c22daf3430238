"""The demo's data preparation on a handful of images, its table, and a demo stopped and rerun."""
import gzip
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from spvit.demo import table
from spvit.fashion_mnist import CLASS_DIRS, write_image_folder


def write_idx(path, array):
    magic = 0x0803 if array.ndim == 3 else 0x0801
    with gzip.open(path, 'wb') as f:
        f.write(struct.pack('>I', magic) + b''.join(struct.pack('>I', n) for n in array.shape) + array.tobytes())


def fake_source(root, n_train=30, n_test=20):
    """Fashion-MNIST's four .gz files (as Debian ships them) with a few random images."""
    rng = np.random.default_rng(0)
    os.makedirs(root)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        write_idx(os.path.join(root, f'{prefix}-images-idx3-ubyte.gz'), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(os.path.join(root, f'{prefix}-labels-idx1-ubyte.gz'), (np.arange(n) % 10).astype(np.uint8))
    return root


def test_writes_an_imagenet_style_folder(tmp_path):
    src = fake_source(str(tmp_path / 'debian'))
    out = write_image_folder(str(tmp_path / 'fm'), str(tmp_path / 'cache'), 2, 1, source=src)
    for split, per_class in (('train', 2), ('val', 1)):
        assert sorted(os.listdir(os.path.join(out, split))) == sorted(CLASS_DIRS)
        for c in CLASS_DIRS:
            files = os.listdir(os.path.join(out, split, c))
            assert len(files) == per_class
            assert Image.open(os.path.join(out, split, c, files[0])).size == (28, 28)
    # the first train image of class 0 is source image 0, pixel for pixel
    with gzip.open(os.path.join(src, 'train-images-idx3-ubyte.gz')) as f:
        first = np.frombuffer(f.read()[16:16 + 784], dtype=np.uint8).reshape(28, 28)
    assert np.array_equal(np.array(Image.open(os.path.join(out, 'train', CLASS_DIRS[0], '00000.png'))), first)
    # a second call with the same sizes does nothing; other sizes rewrite
    stamp = os.path.getmtime(os.path.join(out, '.complete'))
    write_image_folder(out, str(tmp_path / 'cache'), 2, 1, source=src)
    assert os.path.getmtime(os.path.join(out, '.complete')) == stamp
    write_image_folder(out, str(tmp_path / 'cache'), 1, 1, source=src)     # smaller: no image of the larger left
    assert all(len(os.listdir(os.path.join(out, 'train', c))) == 1 for c in CLASS_DIRS)


def demo_result(top1=(89.0, 85.0, 86.5)):
    blocks = [{'attn': 'msa', 'mlp_hidden': 100, 'heads': [0]}, {'attn': 'conv1x1', 'mlp_hidden': 40, 'heads': None}]
    lat = {'1': {'original': {'latency_ms': 2.0}, 'pruned': {'latency_ms': 1.5, 'ratio': 0.75}},
           '64': {'original': {'latency_ms': 80.0}, 'pruned': {'latency_ms': 40.0, 'ratio': 0.5}}}
    ev = {'original': {'top1': top1[0], 'gflops': 0.05, 'params': 500000},
          'uniform': {'top1': top1[1], 'gflops': 0.015, 'params': 200000,
                      'arch': {'blocks': [{'attn': 'msa', 'mlp_hidden': 70, 'heads': [1]}] * 2}},
          'spvit': {'top1': top1[2], 'gflops': 0.015, 'params': 250000, 'arch': {'blocks': blocks}}}
    return {'eval': ev, 'latency': {'uniform': lat, 'spvit': lat}, 'ratio': 0.3, 'minutes': 9.5,
            'original_dims': {'mlp_hidden': [384, 384], 'heads': [3, 3]}}


def test_table():
    text = table(demo_result())
    rows = {line.split('|')[1].strip(): line for line in text.splitlines() if line.startswith('| ')}
    assert set(rows) == {'model', 'original', 'uniform', 'spvit'}
    assert '89.00%' in rows['original'] and '2.00' in rows['original'] and '80.00' in rows['original']
    assert '85.00% (-4.00)' in rows['uniform'] and '0.015' in rows['uniform'] and '(0.30x)' in rows['uniform']
    assert '86.50% (-2.50)' in rows['spvit'] and '1.50 (0.75x)' in rows['spvit'] and '40.00 (0.50x)' in rows['spvit']
    assert 'A1/100 C1/40' in rows['spvit'] and 'A1/70 A1/70' in rows['uniform']
    assert '9.5 min' in text


def test_report_is_drawn(tmp_path):
    pytest.importorskip('matplotlib')
    from spvit.demo import write_report
    os.makedirs(tmp_path / 'search')
    with open(tmp_path / 'search' / 'log.jsonl', 'w') as f:
        for step in range(0, 50, 10):
            f.write(json.dumps({'kind': 'step', 'step': step, 'gflops': 0.05 - step * 1e-4, 'target': 0.05 - step * 2e-4,
                                'ops': ['msa', 'msa' if step < 30 else 'conv1x1'], 'mlp_open': [384 - step, 384 - 2 * step],
                                'heads_open': [3, 3 if step < 30 else 0]}) + '\n')
        f.write(json.dumps({'kind': 'epoch', 'epoch': 0, 'val_top1': 80.0}) + '\n')
    write_report(str(tmp_path / 'r.png'), str(tmp_path), demo_result())
    assert Image.open(tmp_path / 'r.png').size[0] > 1000


def test_uniform_prune_meets_the_budget_alike_in_every_block():
    """The uniform baseline: every block msa with the same MLP width (and head count below the
    all-msa floor), the magnitude-kept heads, at the FLOPs of the target within one unit per block."""
    from spvit import attach_search_space
    from spvit.flops import mlp_flops
    from tests.helpers import build
    kwargs = dict(img_size=32, patch_size=4, depth=4, embed_dim=96, num_heads=3, num_classes=10)
    supernet = attach_search_space(build('vit_tiny_patch16_224', **kwargs), model_name='vit_tiny_patch16_224',
                                   model_kwargs=kwargs)
    floor = supernet.arch_flops(supernet.uniform_arch('msa', 1)) / supernet.original_flops
    unit = sum(mlp_flops(b, 1) for b in supernet.block_dims)
    for ratio, heads in ((0.6, False), (0.6, True), (floor - 0.05, True)):
        arch = supernet.uniform_prune(ratio, heads)
        assert len({(b.attn, b.mlp_hidden, len(b.heads or [0] * 3)) for b in arch.blocks}) == 1
        assert abs(supernet.arch_flops(arch) - ratio * supernet.original_flops) <= unit / 2 + 1
    assert supernet.uniform_prune(0.6).blocks[0].heads is None
    assert supernet.uniform_prune(floor - 0.05) is None
    one = supernet.uniform_prune(floor - 0.05, heads=True)
    assert [b.heads for b in one.blocks] == supernet.magnitude_heads(len(one.blocks[0].heads))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_original(path):
    """A random-init model of the demo's shape, saved as the demo's shipped original is."""
    from spvit.compare import full_architecture
    from spvit.demo import MODEL
    from spvit.pruned import PrunedModel
    from tests.helpers import build
    kwargs = dict(model_kwarg.split('=') for model_kwarg in MODEL[3:])
    kwargs = {k: int(v) for k, v in kwargs.items()}
    kwargs['num_classes'] = 10
    model = build(MODEL[1], **kwargs)
    data_config = {'input_size': [3, 32, 32], 'interpolation': 'bicubic', 'mean': [0.286] * 3, 'std': [0.353] * 3,
                   'crop_pct': 1.0, 'crop_mode': 'center'}
    PrunedModel(model, full_architecture(MODEL[1], kwargs, model), None, data_config,
                {'source': {'pretrained': False, 'checkpoint': None}}).save(str(path))
    return path


def test_demo_refuses_bad_input_before_writing(tmp_path):
    runs = tmp_path / 'runs'
    for extra, message in ((['--original', str(tmp_path / 'missing.pth')], 'no original model at'),
                           (['--epochs', '3', '--original', str(tiny_original(tmp_path / 'o.pth'))], '--epochs must be even'),
                           (['--ratio', '1.5'], '--ratio: must lie in (0, 1)')):
        r = subprocess.run([sys.executable, os.path.join(REPO, 'tools', 'demo.py'), '--runs', str(runs),
                            '--data-root', str(tmp_path / 'data'), *extra], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, 'PYTHONPATH': REPO})
        assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr
        assert not runs.exists() and not (tmp_path / 'data').exists()


@pytest.mark.slow
def test_a_demo_stopped_by_sigterm_to_its_group_goes_on_where_it_stopped(tmp_path):
    """``make demo`` under Slurm/systemd/``kill -- -PGID``: the running step saves its state, the
    demo exits 143, and the same command again reuses the finished runs, resumes the stopped one,
    and finishes the demo with its table and report."""
    data, runs = tmp_path / 'data', tmp_path / 'runs'
    write_image_folder(str(data / 'fashion-mnist'), str(data / 'cache'), 7, 1,
                       source=fake_source(str(tmp_path / 'src'), n_train=80))   # two batches of 64
    cmd = [sys.executable, os.path.join(REPO, 'tools', 'demo.py'), '--data-root', str(data), '--runs', str(runs),
           '--train-per-class', '7', '--val-per-class', '1', '--epochs', '12', '--ratio', '0.3',
           '--original', str(tiny_original(tmp_path / 'original.pth')), '--report', str(tmp_path / 'report.png')]
    env = {**os.environ, 'PYTHONPATH': REPO}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    stopped = runs / 'uniform-finetune'
    log, last = stopped / 'log.jsonl', stopped / 'last.pth'
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:     # after its first epoch
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-800:]
    assert 'demo.py: interrupted; state saved, run the same command again' in err and 'Traceback' not in err
    assert '[5/8' in out and '[6/8' in out and '[7/8' not in out
    assert 1 <= torch.load(last, weights_only=True)['epoch'] + 1 < 12

    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-800:]
    assert f'--resume {last}' in r.stdout
    assert 'search: reusing the finished run' in r.stdout and 'finetune: reusing the finished run' in r.stdout
    epochs = [json.loads(line)['epoch'] for line in open(log) if json.loads(line)['kind'] == 'epoch']
    assert epochs == list(range(12))        # each epoch once: resumed, not restarted
    assert '| spvit |' in r.stdout and '| uniform |' in r.stdout and 'demo done in' in r.stdout
    if importlib.util.find_spec('matplotlib'):     # the picture needs the plot extra (make test has no plot)
        assert (tmp_path / 'report.png').exists()
    else:
        assert 'matplotlib is not installed' in r.stdout and not (tmp_path / 'report.png').exists()
    result = json.load(open(runs / 'demo-result.json'))
    assert abs(result['eval']['spvit']['gflops'] / result['eval']['original']['gflops'] - 0.3) < 0.02
    assert json.load(open(runs / 'demo-state.json'))['complete'] is True


@pytest.mark.slow
def test_ship_trained_writes_the_last_epoch_with_its_provenance(image_folder, pretrained, tmp_path):
    """``make original`` and ``search_quality.py --train-start`` ship a fine-tune run's last epoch:
    the model, and in the provenance the commands, their epochs and the test top-1."""
    import shlex
    from spvit.demo import ship_trained
    from spvit.finetune import main as finetune_main
    from spvit.pruned import read_pruned
    from tests.helpers import SEARCH_DATA, SEARCH_MODEL
    run = tmp_path / 'stage'
    argv = [*SEARCH_MODEL, *SEARCH_DATA, '--checkpoint', pretrained, '--data-dir', image_folder, '--output-dir',
            str(run), '--batch-size', '32', '--epochs', '1', '--warmup-epochs', '0']
    finetune_main(argv)
    out = tmp_path / 'assets' / 'start.pth'
    commands = [shlex.join(['python', 'tools/finetune.py', *argv])] * 2
    assert ship_trained(str(run), commands, str(out), 'a test') == str(out)
    shipped = read_pruned(str(out))
    assert shipped.provenance['built_by'] == 'a test' and shipped.provenance['commands'] == commands
    assert shipped.provenance['epochs'] == 2
    last = [json.loads(line) for line in open(run / 'log.jsonl') if json.loads(line)['kind'] == 'epoch'][-1]
    assert shipped.provenance['test_top1'] == last['val_top1']
    trained = read_pruned(str(run / 'last.pth')).model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in shipped.model.state_dict().items())
