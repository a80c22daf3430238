"""Every out-of-range value is one line and exit 2 before the run writes anything (issue 11, item 7).

Config flags are checked where a config is read (one rule per field: finite numbers, bounds,
list lengths), so most cases run in-process; the argparse tools run as subprocesses, together."""
import os

import pytest

from spvit.errors import SpvitError
from spvit.finetune import main as finetune_main
from spvit.search import main as search_main

from helpers import args, start, tool

BAD_FLAGS = [
    (['--log-every', '0'], '--log-every must be at least 1, got 0'),
    (['--lr', 'nan'], '--lr must be a finite number, got nan'),
    (['--lr', '-1'], '--lr must be at least 0, got -1'),
    (['--arch-lr', 'nan'], '--arch-lr must be a finite number'),
    (['--arch-lr', '-1'], '--arch-lr must be positive, got -1'),
    (['--weight-decay', 'nan'], '--weight-decay must be a finite number'),
    (['--theta0', 'nan'], '--theta0 must be a finite number'),
    (['--alpha', '0'], '--alpha must be positive, got 0'),
    (['--loss-lambda', 'nan'], '--loss-lambda must be a finite number'),
    (['--loss-lambda', '-5'], '--loss-lambda must be positive, got -5'),
    (['--target-gflops', 'nan'], '--target-gflops must be a finite number'),
    (['--mean', '0.5', '0.5'], '--mean takes 3 values, got 2'),
    (['--std', '0', '0', '0'], '--std must be positive, got 0 0 0'),
    (['--scale', '0.5'], '--scale takes 2 values, got 1'),
    (['--scale', '0.9', '0.5'], 'the smallest crop area comes first'),
    (['--interpolation', 'bogus'], "invalid choice: 'bogus'"),
    (['--auto-augment', 'bogus'], "--auto-augment 'bogus'"),
    (['--workers', '-1'], '--workers must be at least 0, got -1'),
    (['--img-size', '0'], '--img-size must be at least 1, got 0'),
    (['--img-size', '-32'], '--img-size must be at least 1, got -32'),
    (['--seed', '-1'], '--seed must be at least 0, got -1'),
    (['--num-classes', '2'], '--num-classes 2 is fewer than the 4 classes of the data'),
    (['--model-kwargs', 'num_heads=5'], 'cannot create vit_tiny_patch16_224'),
    (['--subset-classes', '-1'], '--subset-classes must be at least 1, got -1'),
    (['--max-steps', '0'], '--max-steps must be at least 1, got 0'),
    (['--settle-fraction', '2'], '--settle-fraction must be in [0, 1), got 2'),
    (['--clip-grad', '-1'], '--clip-grad must be positive, got -1'),
    (['--smoothing', '2'], '--smoothing must be in [0, 1), got 2'),
    (['--ckpt-every', '-1'], '--ckpt-every must be at least 0, got -1'),
    (['--crop-pct', '-1'], '--crop-pct must be in (0, 1], got -1'),
]


@pytest.mark.parametrize('flags,message', BAD_FLAGS, ids=[' '.join(f) for f, _ in BAD_FLAGS])
def test_search_refuses_bad_values_before_writing(image_folder, tmp_path, flags, message):
    out = tmp_path / 'out'
    argv = args(image_folder, out, '--target-ratio', '0.6', '--epochs', '1', *flags)
    if message.startswith('invalid choice'):      # argparse's own one-line error (ArgumentParser.error)
        with pytest.raises(SystemExit) as e:
            search_main(argv)
        assert e.value.code == 2
    else:
        with pytest.raises(SpvitError) as e:
            search_main(argv)
        assert message in str(e.value) and '\n' not in str(e.value), str(e.value)
    assert not out.exists()


@pytest.mark.slow
def test_bad_values_of_the_other_tools(image_folder, tmp_path, pretrained):
    """Fine-tune and eval read the same fields; benchmark and flops check their own flags."""
    with pytest.raises(SpvitError, match='--distill-alpha must be in'):
        finetune_main(['--model', 'vit_tiny_patch16_224', '--data-dir', image_folder, '--output-dir', str(tmp_path / 'o'),
                       '--distill-alpha', '1.5'])
    non_utf8 = tmp_path / 'bad.yaml'
    non_utf8.write_bytes(b'lr: \xff\xfe\n')
    cases = [
        (('search.py', '--config', non_utf8, '--data-dir', image_folder, '--output-dir', tmp_path / 'o'), 'not a text file'),
        (('eval.py', '--model', 'vit_tiny_patch16_224', '--data-dir', image_folder, '--batch-size', '0'),
         '--batch-size must be at least 1, got 0'),
        (('benchmark.py', '--model', 'vit_tiny_patch16_224', '--runs', '0'), 'argument --runs: must be at least 1, got 0'),
        (('benchmark.py', '--model', 'vit_tiny_patch16_224', '--batch-sizes', '0'), 'argument --batch-sizes: must be at least 1'),
        (('benchmark.py', '--model', 'vit_tiny_patch16_224', '--threads', '-1'), 'argument --threads: must be at least 1'),
        (('benchmark.py', '--model', 'vit_tiny_patch16_224', '--device', 'bogus'), "unknown device 'bogus'"),
        (('flops.py', '--model', 'vit_tiny_patch16_224', '--img-size', '0'), 'argument --img-size: must be at least 1, got 0'),
        (('demo.py', '--epochs', '0'), 'argument --epochs: must be at least 2, got 0'),
        (('demo.py', '--ratio', '1'), 'argument --ratio: must lie in (0, 1), got 1'),
    ]
    procs = [start(*a) for a, _ in cases]
    for proc, (a, message) in zip(procs, cases):
        out, err = proc.communicate()
        assert proc.returncode == 2 and err.count('\n') == 1 and message in err, (a, err)
    assert not (tmp_path / 'o').exists()


def test_a_failed_write_is_one_line(tmp_path, monkeypatch):
    """A write that fails (no permission, a full disk, a read-only mount: root can write anywhere
    here, so the failure is injected) is a CheckpointError, and leaves no temp file."""
    import torch
    from spvit.checkpoint import atomic_save
    from spvit.errors import CheckpointError

    def refuse(src, dst):
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(os, 'replace', refuse)
    with pytest.raises(CheckpointError, match=f'cannot write {tmp_path / "x.pth"}: Permission denied'):
        atomic_save({'a': torch.zeros(1)}, str(tmp_path / 'x.pth'))
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_class_of_unreadable_images_is_one_error_line(image_folder, tmp_path):
    """timm skips a few unreadable files (a warning each), then gives up: the run ends with one
    error line and exit 2, not a data worker's traceback."""
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(image_folder, data)
    for f in (data / 'train' / 'class_03').iterdir():
        f.write_bytes(b'not an image')
    r = tool('search.py', args(str(data), tmp_path / 'out', '--target-ratio', '0.6', '--epochs', '1', '--workers', '2'))
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-800:]
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if 'error' in line.lower()]
    assert len(errors) == 1 and errors[0].startswith('search.py: error: cannot read the images'), lines[-5:]
    assert lines[-1] == errors[0], lines[-5:]
    assert any(line.startswith('Skipped sample') and '/class_03/' in line for line in lines), lines[:5]
    worker_trace = [line for line in lines if line.lstrip().startswith(('File "', 'Caught ', 'Original Traceback'))]
    assert not worker_trace, worker_trace


def png_header(width, height):
    """A PNG that claims width x height pixels (PIL reads the size, and refuses a bomb, on open)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)) + chunk(b'IEND', b'')


@pytest.mark.slow
def test_a_decompression_bomb_is_one_error_line(image_folder, tmp_path):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(image_folder, data)
    (data / 'train' / 'class_00' / '0000.png').write_bytes(png_header(20000, 20000))
    r = tool('search.py', args(str(data), tmp_path / 'out', '--target-ratio', '0.6', '--epochs', '1'))
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-800:]
    assert r.stderr.strip().splitlines()[-1].startswith('search.py: error: cannot read the images: Image size '
                                                        '(400000000 pixels) exceeds limit')
