"""The demo's data preparation on a handful of images, its table, and a demo stopped and rerun."""
import gzip
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


def test_table():
    r = {'original': {'top1': 80.0, 'gflops': 0.05, 'params': 500000},
         'pruned': {'top1': 79.5, 'gflops': 0.03, 'params': 400000},
         'latency': {'batches': {'1': {'original': {'latency_ms': 2.0}, 'pruned': {'latency_ms': 1.5, 'ratio': 0.75}}}},
         'minutes': 9.5}
    text = table(r)
    assert '-0.50' in text and '0.600x' in text and '0.750x' in text and '9.5 min' in text


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_a_demo_stopped_by_sigterm_to_its_group_goes_on_where_it_stopped(tmp_path):
    """``make demo`` under Slurm/systemd/``kill -- -PGID``: the running step saves its state, the
    demo exits 143, and the same command again resumes that step and finishes the demo."""
    data, runs = tmp_path / 'data', tmp_path / 'runs'
    write_image_folder(str(data / 'fashion-mnist'), str(data / 'cache'), 7, 1,
                       source=fake_source(str(tmp_path / 'src'), n_train=80))   # one batch of 64
    cmd = [sys.executable, os.path.join(REPO, 'tools', 'demo.py'), '--data-root', str(data), '--runs', str(runs),
           '--train-per-class', '7', '--val-per-class', '1', '--pretrain-epochs', '12', '--search-epochs', '1',
           '--finetune-epochs', '1', '--report', '']
    env = {**os.environ, 'PYTHONPATH': REPO}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)
    log, last = runs / 'pretrain' / 'log.jsonl', runs / 'pretrain' / 'last.pth'
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:     # after the first epoch
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-800:]
    assert 'demo.py: interrupted; state saved, run the same command again' in err and 'Traceback' not in err
    assert not (runs / 'search').exists()
    assert 1 <= torch.load(last, weights_only=True)['epoch'] + 1 < 12

    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-800:]
    assert f'--resume {runs / "pretrain" / "last.pth"}' in r.stdout
    epochs = [json.loads(line)['epoch'] for line in open(log) if json.loads(line)['kind'] == 'epoch']
    assert epochs == list(range(12))        # each epoch once: resumed, not restarted
    assert (runs / 'finetune' / 'best.pth').exists() and 'val top-1 (%)' in r.stdout
    assert json.load(open(runs / 'demo-state.json'))['complete'] is True
