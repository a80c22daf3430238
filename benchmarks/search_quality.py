"""Search quality on real images: spvit's searched architecture against a uniform prune at equal
FLOPs and equal training, on Fashion-MNIST, through the real tools.

    python benchmarks/search_quality.py                       # ratios 0.6 0.45 0.3
    python benchmarks/search_quality.py --ratios 0.45 --methods spvit uniform --json

Data: Fashion-MNIST through the demo's folder writer, the whole 10k test split as val/. The
starting model is a ViT (vit_tiny_patch16_224 at img 32, patch 4, depth 6: embed 192, 3 heads, 65
tokens) trained with tools/finetune.py on the whole 60k training split in two stages (see
PRETRAIN_STAGES) and shipped in assets/ (--train-start trains it again, each stage cached under
--work); its last epoch is used, so no checkpoint is ever selected on the test split. Search and
fine-tunes see the first 2000 training images of each class (--samples-per-class). Then per target
ratio:

- spvit: tools/search.py 1 epoch -> tools/export.py -> tools/finetune.py 1 epoch, both with soft
  distillation from the original and the same weight lr. "1 epoch" is the searched model's top-1 at
  the end of a 1-epoch search (the search's own evaluation of its pinned supernet, which export
  reproduces exactly). "2 epochs" is a second pipeline with one 2-epoch cosine, as the uniform
  prune's 2-epoch fine-tune has: the search runs its first epoch (--sched-epochs 2), the fine-tune
  its second (--sched-epochs 2 --sched-offset 1). "restarted": the 1-epoch search's model
  fine-tuned 1 epoch with a fresh cosine.
- uniform: tools/export.py --arch with every block msa and every MLP keeping the same number of
  units (the magnitude-kept ones), at the FLOPs of the target; fine-tuned 1 and 2 epochs with the
  same recipe. Below the ratio where all-msa leaves no MLP budget there is no such baseline.
- full: spvit's runs in --search-space full (heads as well as ops).
- uniform-heads: every block msa with the same number of heads (largest by magnitude) and of MLP
  units, which reaches below the all-msa floor.

Every number is the last epoch's top-1 on the 10k test images. Every search also reports how far
it landed from its target and the largest GFLOPs move between two log steps, as a share of the
original FLOPs (a cliff is a move over 5%).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spvit.demo import (DATA, LIGHT_AUG, ORIGINAL_PER_CLASS, ORIGINAL_RECIPE, REPO, last_epoch, sh,  # noqa: E402
                        ship_trained, tool)
from spvit.fashion_mnist import write_image_folder  # noqa: E402

MODEL = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=4', 'depth=6']
# The starting model plays a user's pretrained model: trained on the whole training split (60k
# images; the search and the fine-tunes see only their first --train-per-class of each class).
PRETRAIN_PER_CLASS = ORIGINAL_PER_CLASS
# Two stages, each cached in its own folder: 8 epochs with the light augmentation (70.9 -> 85.9%,
# still rising), then 5 more from there at half the peak lr on whole images (no random crop), which
# takes the model past 88% for less than the 2x longer single run it would otherwise need.
PRETRAIN_STAGES = tuple(zip(('pretrain', 'pretrain2'), ORIGINAL_RECIPE))     # the demo's original's recipe
# That starting model, shipped (10.7 MB) because it takes about 95 minutes of a 2-core CPU:
# `--train-start` trains it again with the commands its provenance records and rewrites it.
SHIPPED_START = os.path.join(REPO, 'assets', 'search-quality-vit.pth')


def finished(run_dir: str, epochs: int) -> bool:
    """Whether a search/fine-tune run in ``run_dir`` ran all its epochs; a partial one is removed."""
    import shutil
    log = os.path.join(run_dir, 'log.jsonl')
    if os.path.exists(log) and sum(json.loads(line)['kind'] == 'epoch' for line in open(log)) >= epochs:
        return True
    shutil.rmtree(run_dir, ignore_errors=True)
    return False


def step_records(run_dir: str) -> List[Dict[str, Any]]:
    return [r for r in (json.loads(line) for line in open(os.path.join(run_dir, 'log.jsonl'))) if r['kind'] == 'step']


def start_supernet(checkpoint: str):
    import torch
    from spvit import attach_search_space
    from spvit.models import create_model
    name, kwargs = MODEL[1], {'img_size': 32, 'patch_size': 4, 'depth': 6, 'num_classes': 10}
    with torch.no_grad():
        return attach_search_space(create_model(name, kwargs, checkpoint=checkpoint), model_name=name, model_kwargs=kwargs)


def uniform_arch(checkpoint: str, ratio: float, path: str, heads: bool = False) -> Optional[Dict[str, Any]]:
    """The uniform prune at ``ratio`` (``SuperNet.uniform_prune``) saved to ``path``; None where
    all-msa alone costs more than the budget."""
    supernet = start_supernet(checkpoint)
    arch = supernet.uniform_prune(ratio, heads)
    if arch is None:
        return None
    arch.save(path)
    b = arch.blocks[0]
    return {'hidden': b.mlp_hidden, 'heads': len(b.heads) if b.heads else supernet.block_dims[0].heads,
            'gflops': supernet.arch_flops(arch) / 1e9}


# method -> search space (searched methods) or None (uniform prunes, with or without heads)
SEARCHED = {'spvit': 'spvit', 'full': 'full'}
UNIFORM = {'uniform': False, 'uniform-heads': True}
METHODS = (*SEARCHED, *UNIFORM)


def search_and_finetune(method: str, ratio: float, out: str, start: str, common: List[str], lr: str, ft: List[str],
                        suffix: str = '', search_extra: Sequence[str] = (), ft_extra: Sequence[str] = ()) -> Dict[str, Any]:
    """One search -> export -> one fine-tune epoch, each step cached under ``out`` (folder names end
    in ``suffix``); returns the search's final payload, its budget figures and both top-1s."""
    import shutil
    import torch
    prefix = '' if method == 'spvit' else f'{method}-'      # the paper's space keeps its folder names
    search = os.path.join(out, f'{prefix}search{suffix}')
    if not finished(search, 1):
        sh([*tool('search.py'), *MODEL, *common, '--checkpoint', start, '--output-dir', search, '--target-ratio',
            str(ratio), '--epochs', '1', *search_extra, '--lr', lr, '--distill', 'soft',
            '--search-space', SEARCHED[method]])
    final_path = os.path.join(search, 'search-final.pth')
    pruned = os.path.join(out, f'{method}{suffix and "-" + suffix}.pth')
    ft_dir = os.path.join(out, f'{method}-finetune{suffix}')
    if not os.path.exists(pruned) or os.path.getmtime(pruned) < os.path.getmtime(final_path):
        sh([*tool('export.py'), '--search', final_path, '--output', pruned, '--force'])
        shutil.rmtree(ft_dir, ignore_errors=True)          # a fine-tune of the previous export
    if not finished(ft_dir, 1):
        sh([*tool('finetune.py'), '--pruned', pruned, *common, '--output-dir', ft_dir, '--epochs', '1', *ft_extra, *ft])
    final = torch.load(final_path, map_location='cpu', weights_only=True)
    steps = step_records(search)
    moves = [abs(a['gflops'] - b['gflops']) for a, b in zip(steps, steps[1:])]
    return {'final': final, 'off_target': final['achieved_gflops'] / final['target_gflops'] - 1,
            'max_move': max(moves, default=0.0) / final['original_gflops'],
            'searched': last_epoch(search)['val_top1'], 'finetuned': last_epoch(ft_dir)['val_top1']}


def run_searched(method: str, ratio: float, out: str, start: str, common: List[str], lr: str,
                 ft: List[str]) -> Dict[str, Any]:
    """Two pipelines, as the uniform prune's two fine-tunes are two runs: "1 epoch" is a 1-epoch
    search (its own cosine, to the floor); "2 epochs" is a search that runs the first epoch of a
    2-epoch cosine and a fine-tune that runs the second (--sched-epochs 2 --sched-offset 1), the one
    schedule the uniform prune's 2-epoch fine-tune has. The budget and move columns are the 1-epoch
    search's; ``restart`` is that search's model fine-tuned with a fresh cosine (what a fine-tune
    with its own schedule does after it)."""
    one = search_and_finetune(method, ratio, out, start, common, lr, ft)
    two = search_and_finetune(method, ratio, out, start, common, lr, ft, suffix='2', search_extra=['--sched-epochs', '2'],
                              ft_extra=['--sched-epochs', '2', '--sched-offset', '1'])
    final = one['final']
    return {
        'gflops': final['achieved_gflops'], 'target_gflops': final['target_gflops'],
        'off_target': [one['off_target'], two['off_target']], 'max_move': [one['max_move'], two['max_move']],
        'top1_1': one['searched'], 'top1_2': two['finetuned'], 'top1_restart': one['finetuned'],
        'arch': final['arch']['blocks'], 'arch_2': two['final']['arch']['blocks'],
    }


def run_uniform(method: str, ratio: float, out: str, start: str, common: List[str], ft: List[str]) -> Optional[Dict[str, Any]]:
    arch_file = os.path.join(out, f'{method}-arch.yaml')
    uni = uniform_arch(start, ratio, arch_file, heads=UNIFORM[method])
    if uni is None:
        return None
    base = os.path.join(out, f'{method}.pth')
    if not os.path.exists(base):
        sh([*tool('export.py'), '--arch', arch_file, '--checkpoint', start, '--output', base, '--force'])
    top1 = {}
    for epochs in (1, 2):
        d = os.path.join(out, f'{method}-finetune{epochs}')
        if not finished(d, epochs):
            sh([*tool('finetune.py'), '--pruned', base, *common, '--output-dir', d, '--epochs', str(epochs), *ft])
        top1[epochs] = last_epoch(d)['val_top1']
    return {**uni, 'top1_1': top1[1], 'top1_2': top1[2]}


def run_ratio(ratio: float, work: str, start: str, common: List[str], lr: str, methods: List[str]) -> Dict[str, Any]:
    out = os.path.join(work, f'ratio{ratio:g}')
    stamp, key = os.path.join(out, 'start.txt'), file_digest(start)
    if not (os.path.exists(stamp) and open(stamp).read() == key):
        import shutil
        shutil.rmtree(out, ignore_errors=True)  # runs from another starting model
    os.makedirs(out, exist_ok=True)
    with open(stamp, 'w') as f:
        f.write(key)
    ft = ['--lr', lr, '--warmup-epochs', '0', '--distill', 'soft', '--teacher', 'original']
    result: Dict[str, Any] = {'ratio': ratio}
    for method in methods:
        result[method] = (run_searched(method, ratio, out, start, common, lr, ft) if method in SEARCHED
                          else run_uniform(method, ratio, out, start, common, ft))
    return result


def arch_text(blocks: List[Dict[str, Any]]) -> str:
    short = {'msa': 'A', 'conv3x3': 'C3', 'conv1x1': 'C1', 'skip': 'S'}
    return ' '.join(short[b['attn']] + (f"{len(b['heads'])}" if b.get('heads') else '') + f"/{b['mlp_hidden']}"
                    for b in blocks)


def table(start: Dict[str, Any], results: List[Dict[str, Any]], methods: List[str]) -> str:
    lines = [f"original: {start['gflops']:.4f} GFLOPs, top-1 {start['top1']:.2f}% on the Fashion-MNIST test images",
             '',
             '| ratio | method | GFLOPs | off target | max move | top-1, 1 epoch | top-1, 2 epochs | 2 epochs, restarted '
             '| architecture |',
             '|---|---|---|---|---|---|---|---|---|']
    for r in results:
        for method in methods:
            m = r.get(method)
            if m is None and method in UNIFORM:
                lines.append(f"| {r['ratio']:g} | {method} | - | - | - | - | - | | all-msa costs more than the budget |")
            elif method in SEARCHED:
                off, move = (' / '.join(f'{v:{f}}' for v in m[k]) for k, f in (('off_target', '+.1%'), ('max_move', '.1%')))
                lines.append(f"| {r['ratio']:g} | {method} | {m['gflops']:.4f} | {off} | {move} | {m['top1_1']:.2f} | "
                             f"{m['top1_2']:.2f} | {m['top1_restart']:.2f} | {arch_text(m['arch'])} |")
            else:
                heads = f" with {m['heads']} heads" if UNIFORM[method] else ''
                lines.append(f"| {r['ratio']:g} | {method} | {m['gflops']:.4f} | | | {m['top1_1']:.2f} | "
                             f"{m['top1_2']:.2f} | | A/{m['hidden']}{heads} in every block |")
    lines.append('')
    lines.append('A = msa (A2: keeps 2 heads), C3 = conv3x3, C1 = conv1x1, S = skip, /N: MLP units kept (the 1-epoch '
                 "search's architecture); off target and max move (the largest GFLOPs change between two log steps, "
                 "as a share of the original FLOPs): the 1-epoch search / the 2-epoch schedule's search; 2 epochs: "
                 "searched methods run one 2-epoch cosine over search and fine-tune, as the uniform prune's 2-epoch "
                 "fine-tune does; restarted: the 1-epoch search's model fine-tuned with a fresh 1-epoch cosine.")
    return '\n'.join(lines)


def pretrain(work: str, common: List[str]) -> str:
    """Train (or reuse) the starting model stage by stage and write it to ``SHIPPED_START``; a stage
    is reused only when it and every stage before it ran the same command to the end."""
    import shutil
    key, checkpoint, commands = shlex.join([*MODEL, *DATA, *LIGHT_AUG, '--train-per-class', str(PRETRAIN_PER_CLASS)]), [], []
    for name, args in PRETRAIN_STAGES:
        out = os.path.join(work, name)
        key += '\n' + shlex.join(args)
        stamp = os.path.join(out, 'command.txt')
        epochs = int(args[args.index('--epochs') + 1])
        cmd = [*tool('finetune.py'), *MODEL, *common, *checkpoint, '--output-dir', out, *args]
        if not (os.path.exists(stamp) and open(stamp).read() == key and finished(out, epochs)):
            shutil.rmtree(out, ignore_errors=True)
            sh(cmd)
            with open(stamp, 'w') as f:
                f.write(key)
        commands.append(shlex.join(['python', os.path.relpath(cmd[1], REPO), *cmd[2:]]))
        checkpoint = ['--checkpoint', os.path.join(out, 'last.pth')]
    return ship_trained(out, commands, SHIPPED_START, 'benchmarks/search_quality.py --train-start')


def file_digest(path: str) -> str:
    import hashlib
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--ratios', type=float, nargs='+', default=[0.6, 0.45, 0.3], help='FLOPs target ratios')
    p.add_argument('--work', default='runs/search_quality', help='where data, the starting model and the runs go '
                   '(finished steps are reused; delete a folder to run it again)')
    p.add_argument('--train-per-class', type=int, default=2000, help='Fashion-MNIST training images per class')
    p.add_argument('--val-per-class', type=int, default=1000, help='test images per class (1000: all 10k; less only '
                   'for smoke runs)')
    p.add_argument('--batch-size', type=int, default=64, help='of search and fine-tunes: 312 steps an epoch, so the '
                   'target ramp falls by less than 5%% of the FLOPs per 10 steps even at ratio 0.3')
    p.add_argument('--lr', default='2e-3', help='weight learning rate of search and fine-tunes (per 512 images)')
    p.add_argument('--start', help='a starting model of this shape (a finetune.py last.pth or a pruned checkpoint) '
                   f'instead of the shipped one, {os.path.relpath(SHIPPED_START, REPO)}')
    p.add_argument('--train-start', action='store_true', help='train the starting model again (about 95 minutes on 2 '
                   'cores, each stage cached under --work) and rewrite the shipped one with it')
    p.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS,
                   help='spvit: search in the paper\'s space; full: with heads as well (--search-space full); '
                   'uniform: every block msa, MLPs cut alike; uniform-heads: heads and MLPs cut alike')
    p.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    args = p.parse_args(argv)
    if any(not 0 < r < 1 for r in args.ratios):
        p.error('--ratios must lie in (0, 1)')
    if min(args.train_per_class, args.val_per_class, args.batch_size) < 1:
        p.error('--train-per-class, --val-per-class and --batch-size must be at least 1')
    if args.start and args.train_start:
        p.error('give --start or --train-start, not both')
    if args.start and not os.path.isfile(args.start):
        p.error(f'--start: {args.start} not found')
    if not (args.start or args.train_start or os.path.isfile(SHIPPED_START)):
        p.error(f'{os.path.relpath(SHIPPED_START, REPO)} is missing: give --start, or --train-start to train it')
    data = os.path.join(args.work, 'data')
    write_image_folder(data, os.path.join(args.work, 'cache'), max(PRETRAIN_PER_CLASS, args.train_per_class),
                       args.val_per_class)
    common = ['--data-dir', data, *DATA, *LIGHT_AUG]

    start = pretrain(args.work, common) if args.train_start else args.start or SHIPPED_START
    from spvit.flops import measure_flops
    from spvit.pruned import read_pruned
    top1 = json.loads(sh([*tool('eval.py'), '--pruned', start, '--data-dir', data, *DATA, '--json'], capture=True))['top1']
    info = {'top1': top1, 'gflops': measure_flops(read_pruned(start).model, (3, 32, 32))[0] / 1e9, 'checkpoint': start}
    if info['top1'] < 88:
        print(f'warning: the starting model reached {info["top1"]:.2f}% (< 88%)', file=sys.stderr)

    common += ['--batch-size', str(args.batch_size), '--samples-per-class', str(args.train_per_class)]
    results = [run_ratio(r, args.work, start, common, args.lr, args.methods) for r in args.ratios]
    report = {'original': info, 'results': results}
    with open(os.path.join(args.work, 'results.json'), 'w') as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report) if args.json else '\n' + table(info, results, args.methods))
    return 0


if __name__ == '__main__':
    sys.exit(main())
