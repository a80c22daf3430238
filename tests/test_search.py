"""tools/search.py: convergence to a FLOPs target, run files, exact resume, signals, errors, DDP."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from spvit.arch import Architecture
from spvit.search import main as search_main

from helpers import REPO, args, load, tool

def gate_logits(state_dict):
    return {k: v for k, v in state_dict.items() if k.endswith('gate_logits')}


@pytest.mark.slow
def test_search_reaches_target_and_writes_its_files(image_folder, pretrained, tmp_path):
    out = tmp_path / 'run'
    search_main(args(image_folder, out, '--checkpoint', pretrained, '--target-ratio', '0.3', '--epochs', '10'))
    assert {'config.yaml', 'arch.yaml', 'log.jsonl', 'checkpoint-last.pth', 'search-final.pth'} <= set(os.listdir(out))
    final = load(out / 'search-final.pth')
    assert final['format'] == 'spvit-search'
    achieved, target = final['achieved_gflops'], final['target_gflops']
    assert target == pytest.approx(0.3 * final['original_gflops'])
    assert abs(achieved - target) / target <= 0.02
    arch = Architecture.load(str(out / 'arch.yaml'))
    assert arch.to_dict() == final['arch']
    assert len({b.attn for b in arch.blocks}) > 1 or arch.blocks[0].attn != 'msa'
    assert [k.numel() for k in final['kept']] == [b.mlp_hidden for b in arch.blocks]
    state = load(out / 'checkpoint-last.pth')
    assert state['format'] == 'spvit-search-state' and state['global_step'] == 160
    records = [json.loads(line) for line in open(out / 'log.jsonl')]
    epochs = [r for r in records if r['kind'] == 'epoch']
    assert len(epochs) == 10 and all(0 <= r['val_top1'] <= 100 for r in epochs)
    steps = [r for r in records if r['kind'] == 'step']
    assert steps[0]['gflops'] > steps[-1]['gflops'] and {'loss', 'ce', 'drive', 'target', 'lr', 'arch_lr'} <= set(steps[0])
    # the search's path: every block's op and open MLP units at each log step, ending on the result
    assert steps[-1]['ops'] == [b.attn for b in arch.blocks] and steps[-1]['mlp_open'] == [b.mlp_hidden for b in arch.blocks]
    assert [s['target'] for s in steps] == sorted((s['target'] for s in steps), reverse=True)   # the ramp
    assert steps[-1]['target'] == pytest.approx(target)


@pytest.mark.slow
def test_paper_form_still_runs(image_folder, pretrained, tmp_path):
    """--gate-update adamw with the penalty in the loss, no ramp, constant init, no settle phase:
    the paper's search, which moves towards its target."""
    out = tmp_path / 'run'
    search_main(args(image_folder, out, '--checkpoint', pretrained, '--target-ratio', '0.6', '--epochs', '2',
                     '--gate-update', 'adamw', '--budget-ramp', '0', '--gate-init', 'constant', '--settle-fraction', '0',
                     '--arch-lr', '0.05'))
    steps = [json.loads(line) for line in open(out / 'log.jsonl')]
    steps = [r for r in steps if r['kind'] == 'step']
    assert 'penalty' in steps[0] and 'drive' not in steps[0]
    assert all(r['target'] == steps[0]['target'] for r in steps)
    assert steps[-1]['gflops'] < steps[0]['gflops']


@pytest.mark.slow
def test_resume_is_exact(image_folder, pretrained, tmp_path):
    common = ['--checkpoint', pretrained, '--target-ratio', '0.6', '--epochs', '2', '--arch-lr', '0.05', '--seed', '3',
              '--ops-after-ramp', 'down']       # its op ceiling is part of the state
    search_main(args(image_folder, tmp_path / 'whole', *common))
    search_main(args(image_folder, tmp_path / 'split', *common, '--max-steps', '21'))
    state = load(tmp_path / 'split' / 'checkpoint-last.pth')
    assert state['global_step'] == 21 and len(state['op_ceiling']) == 4      # split after the ramp
    search_main(['--resume', str(tmp_path / 'split' / 'checkpoint-last.pth')])     # --workers 0 from the run
    whole = load(tmp_path / 'whole' / 'search-final.pth')['supernet']['state_dict']
    split = load(tmp_path / 'split' / 'search-final.pth')['supernet']['state_dict']
    for k, v in gate_logits(whole).items():
        assert (v - split[k]).abs().max().item() <= 1e-6, k
    assert max((v.float() - split[k].float()).abs().max().item() for k, v in whole.items()) <= 1e-6


@pytest.mark.slow
def test_distilled_search_resumes_exactly(image_folder, pretrained, tmp_path):
    """--distill soft: the frozen teacher is the starting model, also after a resume (which has to
    load it again), so an interrupted distilled search ends where an uninterrupted one does."""
    common = ['--checkpoint', pretrained, '--target-ratio', '0.6', '--epochs', '2', '--distill', 'soft', '--seed', '4']
    search_main(args(image_folder, tmp_path / 'whole', *common))
    search_main(args(image_folder, tmp_path / 'split', *common, '--max-steps', '9'))
    search_main(['--resume', str(tmp_path / 'split' / 'checkpoint-last.pth')])     # --workers 0 from the run
    whole = load(tmp_path / 'whole' / 'search-final.pth')['supernet']['state_dict']
    split = load(tmp_path / 'split' / 'search-final.pth')['supernet']['state_dict']
    assert max((v.float() - split[k].float()).abs().max().item() for k, v in whole.items()) <= 1e-6
    steps = [json.loads(line) for line in open(tmp_path / 'whole' / 'log.jsonl')]
    assert all(r['kd_loss'] >= 0 and r['task_loss'] > 0 for r in steps if r['kind'] == 'step')


@pytest.mark.slow
@pytest.mark.parametrize('sig,code', [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_state_and_exits(image_folder, tmp_path, sig, code):
    out = tmp_path / 'run'
    env = {**os.environ, 'PYTHONPATH': REPO}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'tools', 'search.py'),
                             *args(image_folder, out, '--target-ratio', '0.6', '--epochs', '100', '--log-every', '1')],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO)
    deadline = time.time() + 60
    while not (out / 'log.jsonl').exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err.decode()[-500:]
    state = load(out / 'checkpoint-last.pth')
    assert state['global_step'] >= 1
    assert 'Traceback' not in err.decode()


@pytest.mark.slow
def test_nonfinite_loss_stops_and_keeps_last_good_state(image_folder, tmp_path):
    out = tmp_path / 'run'
    r = tool('search.py', args(image_folder, out, '--target-ratio', '0.6', '--epochs', '2', '--lr', '1e9',
                               '--ckpt-every', '1'))
    assert r.returncode == 1
    assert 'non-finite loss' in r.stderr and 'Traceback' not in r.stderr
    state = load(out / 'checkpoint-last.pth')
    assert all(torch.isfinite(v).all() for v in state['supernet']['state_dict'].values() if v.is_floating_point())


@pytest.mark.parametrize('change,message', [
    (lambda a, d, t: a(d + '/missing', t), 'data dir not found'),
    (lambda a, d, t: a(str(t), t / 'out'), 'has no train/ folder'),
    (lambda a, d, t: a(d, t / 'out', '--model', 'resnet_nope'), "unknown timm model 'resnet_nope'"),
    (lambda a, d, t: a(d, t / 'out', '--target-ratio', '1.0'), 'at or above the model'),
    (lambda a, d, t: a(d, t / 'out', '--target-gflops', '0.0001'), 'below the smallest reachable'),
    (lambda a, d, t: a(d, t / 'out', '--target-ratio', '0.5', '--target-gflops', '0.01'), 'not both'),
    (lambda a, d, t: a(d, t / 'out'), 'no FLOPs budget'),
    (lambda a, d, t: a(d, t / 'out', '--target-ratio', '0.6', '--checkpoint', str(t / 'bad.pth')), 'does not fit the model'),
    (lambda a, d, t: a(d, t / 'out', '--target-ratio', '0.6', '--flops-loss', 'cubic'), 'invalid choice'),
    (lambda a, d, t: a(d, t / 'out', '--target-ratio', '0.6', '--budget-ramp', '1.5'), '--budget-ramp must be in [0, 1)'),
    (lambda a, d, t: a(d, t / 'out', '--target-ratio', '0.6', '--budget-ramp', '0.8', '--settle-fraction', '0.3'),
     'add up to more than the whole search'),
    (lambda a, d, t: a(d, t / 'out', '--target-ratio', '0.6', '--arch-lr', '-1'), '--arch-lr must be positive'),
    (lambda a, d, t: a(d, t / 'out', '--target-ratio', '0.6', '--gate-init', 'random'), 'invalid choice'),
])
@pytest.mark.slow
def test_bad_input_one_line_exit_2(image_folder, tmp_path, change, message):
    torch.save({'model': {'foo': torch.zeros(1)}}, tmp_path / 'bad.pth')
    r = tool('search.py', change(args, image_folder, tmp_path))
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_class_mismatch_and_existing_run_are_refused(image_folder, tmp_path):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(image_folder, data)
    os.rename(data / 'val' / 'class_03', data / 'val' / 'class_99')
    r = tool('search.py', args(str(data), tmp_path / 'out', '--target-ratio', '0.6'))
    assert r.returncode == 2 and 'train/ and val/ classes differ' in r.stderr
    out = tmp_path / 'run'
    search_main(args(image_folder, out, '--target-ratio', '0.6', '--max-steps', '1'))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    r = tool('search.py', args(image_folder, out, '--target-ratio', '0.6'))
    assert r.returncode == 2 and 'already holds a run (checkpoint-last.pth' in r.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


@pytest.mark.slow
def test_yaml_config_and_flag_override(image_folder, tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('target_ratio: 0.7\nepochs: 3\nloss_lambda: 7.5\nmodel_kwargs: {img_size: 32}\n')
    out = tmp_path / 'run'
    search_main(['--config', str(cfg), *args(image_folder, out, '--epochs', '1', '--max-steps', '1')])
    import yaml
    resolved = yaml.safe_load(open(out / 'config.yaml'))
    assert resolved['epochs'] == 1 and resolved['loss_lambda'] == 7.5
    assert resolved['model_kwargs']['embed_dim'] == 64          # flags replace the whole mapping
    assert resolved['target_gflops'] == pytest.approx(0.7 * load(out / 'search-final.pth')['original_gflops'])
    bad = tmp_path / 'bad.yaml'
    bad.write_text('epochs: [\n')
    r = tool('search.py', ['--config', str(bad)])
    assert r.returncode == 2 and 'not valid YAML' in r.stderr
    bad.write_text('epoch: 3\n')
    r = tool('search.py', ['--config', str(bad)])
    assert r.returncode == 2 and 'unknown keys: epoch' in r.stderr


def test_amp_bf16_on_cpu(image_folder, tmp_path):
    out = tmp_path / 'run'
    search_main(args(image_folder, out, '--target-ratio', '0.6', '--amp', '--max-steps', '2'))
    assert load(out / 'checkpoint-last.pth')['global_step'] == 2


DDP_WORKER = '''
import os, sys, torch
from spvit.search import SearchConfig, run_search
from spvit.config import from_dict
cfg = from_dict(SearchConfig, dict(model='vit_tiny_patch16_224', model_kwargs=dict(img_size=32, patch_size=4, embed_dim=64,
          depth=4, num_heads=4), data_dir=sys.argv[1], output_dir=sys.argv[2], target_ratio=0.6, epochs=1,
          batch_size=8, workers=0, mean=[.5, .5, .5], std=[.5, .5, .5], device='cpu'))
supernet = run_search(cfg)
torch.save(supernet.state_dict(), os.path.join(sys.argv[2], f'rank{os.environ["RANK"]}.pt'))
'''


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_identical(image_folder, tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(DDP_WORKER)
    out = tmp_path / 'run'
    env = {**os.environ, 'PYTHONPATH': REPO, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29533',
                        str(script), image_folder, str(out)], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s0, s1 = load(out / 'rank0.pt'), load(out / 'rank1.pt')
    initial = 1.5
    moved = [v for k, v in gate_logits(s0).items() if (v != initial).any()]
    assert moved, 'gates did not move'
    # Parameters are identical; BatchNorm running stats are per rank (DDP re-broadcasts rank 0's
    # buffers at every forward, so they differ only after the last step).
    params = [k for k in s0 if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    assert any(k.endswith('qkv.weight') for k in params)
    for k in params:
        assert torch.equal(s0[k], s1[k]), k
    # only rank 0 wrote the run's files; a 16-step search under two processes lands on its target
    final = load(out / 'search-final.pth')
    assert abs(final['achieved_gflops'] / final['target_gflops'] - 1) <= 0.02
    assert sum(1 for line in open(out / 'log.jsonl')) >= 1


PAPER = {('deit', 'tiny'): (20, 1.0), ('deit', 'small'): (3, 3.2), ('deit', 'base'): (0.08, 6.0),
         ('swin', 'tiny'): (2.8, 3.2), ('swin', 'small'): (0.4, 5.5), ('swin', 'base'): (0.1, 10.0)}


@pytest.mark.parametrize('family,size', sorted(PAPER))
def test_shipped_configs_load_with_paper_penalty(family, size):
    import timm
    from spvit.config import from_dict, load_yaml
    from spvit.budget import penalty
    from spvit.search import SearchConfig
    cfg = from_dict(SearchConfig, load_yaml(os.path.join(REPO, 'configs', f'{family}_{size}_search.yaml')))
    paper_lambda, target = PAPER[family, size]
    assert cfg.target_gflops == target and cfg.pretrained and timm.is_model(cfg.model) and size in cfg.model
    f = torch.tensor(cfg.target_gflops * 1.3)
    relative = cfg.loss_lambda * penalty(f, cfg.target_gflops, 'relative', cfg.target_gflops)
    assert relative.item() == pytest.approx(paper_lambda * penalty(f, cfg.target_gflops, 'absolute', 1.0).item(), rel=1e-5)
    assert cfg.alpha == (100.0 if family == 'swin' else 0.01)
