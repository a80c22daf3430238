"""tools/finetune.py and tools/eval.py: improvement, distillation, resume, DDP, errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from spvit.config import from_dict
from spvit.evaluation import EvalConfig, run_eval
from spvit.finetune import FinetuneConfig, FinetuneTrainer, main as finetune_main
from spvit.search import main as search_main

from helpers import REPO, SEARCH_DATA, SEARCH_MODEL, load, tool

DATA_KW = dict(mean=[.5] * 3, std=[.5] * 3, crop_pct=1.0, workers=0)


@pytest.fixture(scope='session')
def pruned(image_folder, pretrained, tmp_path_factory):
    """A searched and exported hybrid of the pretrained small ViT."""
    from spvit.export import export_search
    out = tmp_path_factory.mktemp('search')
    search_main([*SEARCH_MODEL, *SEARCH_DATA, '--data-dir', image_folder, '--output-dir', str(out / 'run'),
                 '--checkpoint', pretrained, '--target-ratio', '0.6', '--epochs', '4', '--batch-size', '16'])
    path = str(out / 'pruned.pth')
    export_search(str(out / 'run' / 'search-final.pth')).save(path)
    return path


def ft_args(pruned, data, out, *extra):
    return ['--pruned', pruned, *SEARCH_DATA, '--data-dir', data, '--output-dir', str(out), '--batch-size', '16',
            '--warmup-epochs', '0', *extra]


def top1(path, data):
    return run_eval(from_dict(EvalConfig, dict(pruned=str(path), data_dir=data, batch_size=64, **DATA_KW)))['top1']


@pytest.mark.slow
def test_finetune_does_not_lower_top1(pruned, image_folder, tmp_path):
    before = top1(pruned, image_folder)
    finetune_main(ft_args(pruned, image_folder, tmp_path / 'ft', '--epochs', '2', '--distill', 'soft'))
    after = top1(tmp_path / 'ft' / 'best.pth', image_folder)
    assert after >= before
    records = [json.loads(line) for line in open(tmp_path / 'ft' / 'log.jsonl')]
    assert any('kd_loss' in r for r in records if r['kind'] == 'step')
    assert {'last.pth', 'best.pth', 'config.yaml', 'log.jsonl'} <= set(os.listdir(tmp_path / 'ft'))
    # best.pth and last.pth are pruned checkpoints: flops.py reads them
    r = tool('flops.py', ['--pruned', str(tmp_path / 'ft' / 'last.pth'), '--json'])
    assert r.returncode == 0 and json.loads(r.stdout)['flops'] > 0


@pytest.mark.slow
def test_soft_distillation_term_and_gradients(pruned, image_folder, pretrained, tmp_path):
    cfg = from_dict(FinetuneConfig, dict(pruned=pruned, data_dir=image_folder, output_dir=str(tmp_path / 'ft'),
                                         batch_size=8, distill='soft', distill_alpha=0.3, distill_tau=2.0, mixup=0.0,
                                         cutmix=0.0, smoothing=0.0, **DATA_KW))
    trainer = FinetuneTrainer(cfg)
    original = load(pretrained)['model']
    teacher = trainer.teacher
    assert all(torch.equal(v, original[k]) for k, v in teacher.state_dict().items())
    x, y = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=8)))
    trainer.net.train()
    loss, parts = trainer.compute_loss(x, y)
    with torch.no_grad():
        s, t = trainer.model(x), teacher(x)
    kl = F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction='batchmean', log_target=True) * 4
    assert loss.item() == pytest.approx(0.7 * F.cross_entropy(s, y).item() + 0.3 * kl.item(), rel=1e-4)
    assert float(parts['kd_loss']) == pytest.approx(kl.item(), rel=1e-4)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(p.grad is not None for p in trainer.model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_hard_distillation_and_unpruned_baseline(pretrained, image_folder, tmp_path):
    out = tmp_path / 'base'
    finetune_main([*SEARCH_MODEL, *SEARCH_DATA, '--checkpoint', pretrained, '--data-dir', image_folder,
                   '--output-dir', str(out), '--batch-size', '16', '--distill', 'hard', '--max-steps', '3'])
    records = [json.loads(line) for line in open(out / 'log.jsonl')]
    assert 'kd_loss' in records[-1]
    from spvit import load_pruned
    model = load_pruned(str(out / 'last.pth'))
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for k, v in load(pretrained)['model'].items())


@pytest.mark.slow
def test_resume_is_exact(pruned, image_folder, tmp_path):
    common = ['--epochs', '2', '--distill', 'soft', '--model-ema', '--seed', '5']
    finetune_main(ft_args(pruned, image_folder, tmp_path / 'whole', *common))
    finetune_main(ft_args(pruned, image_folder, tmp_path / 'split', *common, '--max-steps', '19'))
    finetune_main(['--resume', str(tmp_path / 'split' / 'last.pth')])     # --workers 0 from the run
    whole, split = load(tmp_path / 'whole' / 'last.pth'), load(tmp_path / 'split' / 'last.pth')
    assert whole['global_step'] == split['global_step'] == 32
    for key in ('state_dict', 'ema'):
        for k, v in whole[key].items():
            assert (v.float() - split[key][k].float()).abs().max().item() <= 1e-6, k


@pytest.mark.slow
def test_eval_tool_json_and_baseline(pruned, pretrained, image_folder):
    r = tool('eval.py', ['--pruned', pruned, '--data-dir', image_folder, *SEARCH_DATA, '--json'])
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {'top1', 'top5', 'loss', 'images_per_s', 'gflops', 'flops', 'params'} <= set(out) and out['images'] == 64
    r = tool('eval.py', [*SEARCH_MODEL, '--checkpoint', pretrained, '--num-classes', '4', '--data-dir', image_folder,
                         *SEARCH_DATA, '--json'])
    base = json.loads(r.stdout)
    assert base['flops'] > out['flops'] and base['params'] > out['params']


@pytest.mark.slow
def test_fine_tune_continues_a_longer_schedule(pruned, image_folder, tmp_path):
    """--sched-offset 1 of --sched-epochs 2: the one epoch runs the second half of the 2-epoch cosine, step for step."""
    def lrs(out, *extra):
        finetune_main(ft_args(pruned, image_folder, tmp_path / out, '--log-every', '1', '--min-lr', '0', *extra))
        return [r['lr'] for r in map(json.loads, open(tmp_path / out / 'log.jsonl')) if r['kind'] == 'step']
    whole = lrs('whole', '--epochs', '2')
    second = lrs('second', '--epochs', '1', '--sched-epochs', '2', '--sched-offset', '1')
    assert len(whole) == 2 * len(second) == 32
    assert second == pytest.approx(whole[16:], rel=1e-9, abs=1e-12)
    assert whole[15] == pytest.approx(whole[0] / 2, rel=0.02)      # mid-schedule: half the peak


@pytest.mark.parametrize('argv,message', [
    (lambda p, d, t: ft_args(str(t / 'missing.pth'), d, t / 'o'), 'file not found'),
    (lambda p, d, t: ft_args(p, d, t / 'o', '--epochs', '2', '--sched-offset', '1', '--sched-epochs', '2'),
     'past the end of --sched-epochs 2'),
    (lambda p, d, t: ['--resume', p, '--workers', '0'], 'holds no training state'),
    (lambda p, d, t: ft_args(p, d, t / 'o', '--distill', 'soft', '--teacher', str(t / 'nope.pth')), 'teacher checkpoint not found'),
    (lambda p, d, t: ft_args(p, d + '/nope', t / 'o'), 'data dir not found'),
])
@pytest.mark.slow
def test_bad_input(pruned, image_folder, tmp_path, argv, message):
    r = tool('finetune.py', argv(pruned, image_folder, tmp_path))
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


DDP_WORKER = '''
import os, sys, torch
from spvit.finetune import FinetuneConfig, run_finetune
from spvit.config import from_dict
cfg = from_dict(FinetuneConfig, dict(pruned=sys.argv[1], data_dir=sys.argv[2], output_dir=sys.argv[3], epochs=1,
          max_steps=3, batch_size=8, workers=0, mean=[.5, .5, .5], std=[.5, .5, .5], device='cpu', distill='soft',
          warmup_epochs=0))
model = run_finetune(cfg)
torch.save(model.state_dict(), os.path.join(sys.argv[3], f'rank{os.environ["RANK"]}.pt'))
'''


@pytest.mark.slow
def test_ddp_two_cpu_processes_stay_identical(pruned, image_folder, tmp_path):
    script = tmp_path / 'worker.py'
    script.write_text(DDP_WORKER)
    out = tmp_path / 'run'
    env = {**os.environ, 'PYTHONPATH': REPO, 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29534',
                        str(script), pruned, image_folder, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    s0, s1 = load(out / 'rank0.pt'), load(out / 'rank1.pt')
    start = load(pruned)['state_dict']
    assert any(not torch.equal(s0[k], start[k]) for k in s0)
    for k in s0:
        if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked')):
            assert torch.equal(s0[k], s1[k]), k


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_finetune_configs(size):
    from spvit.config import load_yaml
    cfg = from_dict(FinetuneConfig, load_yaml(os.path.join(REPO, 'configs', f'finetune_deit_{size}.yaml')))
    assert cfg.epochs == 130 and cfg.lr == 5e-4 and cfg.warmup_epochs == 5 and cfg.distill == 'soft'
