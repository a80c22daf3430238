"""Top-1 right after pruning, with no training at all: which units a prune keeps, and where.

    python benchmarks/prune_at_once.py runs/search_quality/pretrain2/last.pth --ratios 0.6 0.45 0.3 --heads

On the Fashion-MNIST folder of benchmarks/search_quality.py (run that first), for the ViT it
trains. At each FLOPs ratio, every block msa, MLPs pruned four ways:
- uniform magnitude: the same width in every block, units by |fc1 row| * |fc2 column| (the
  uniform baseline of search_quality.py);
- uniform fisher: the same widths, units by Fisher score (8 training batches of 64);
- global fisher: units ranked across blocks by sqrt(Fisher) per FLOP, as the search's importance
  start ranks them, closed from the bottom until the FLOPs are on the target;
- global magnitude: the same across blocks, by magnitude divided by its block's mean.
With --heads, also every block msa with heads and MLP units ranked together (the start of
--search-space heads), closed from the bottom until the FLOPs are on the target: once by Fisher
per FLOP (the search's start) and once by sqrt(Fisher) per FLOP (its start before, which closed
heads too early: a head costs as much as 150 units, and sqrt squares that ratio).
"""
from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spvit import Architecture, BlockArch, attach_search_space  # noqa: E402
from spvit import data as D  # noqa: E402
from spvit.flops import mlp_flops  # noqa: E402
from spvit.importance import GateScores, gate_fisher, init_from_importance  # noqa: E402
from spvit.models import create_model  # noqa: E402
from spvit.runtime import evaluate  # noqa: E402
from spvit.supernet import mlp_importance, top_units  # noqa: E402

NAME, KWARGS = 'vit_tiny_patch16_224', {'img_size': 32, 'patch_size': 4, 'depth': 6, 'num_classes': 10}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('checkpoint')
    p.add_argument('--ratios', type=float, nargs='+', default=[0.6, 0.45])
    p.add_argument('--data', default='runs/search_quality/data')
    p.add_argument('--heads', action='store_true', help='also prune heads and units together (Fisher and sqrt(Fisher))')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = create_model(NAME, KWARGS, checkpoint=args.checkpoint)
    sn = attach_search_space(model, model_name=NAME, model_kwargs=KWARGS)
    cfg = D.data_config(model, None, 1.0, None, [0.286] * 3, [0.353] * 3)
    classes = sorted(os.listdir(os.path.join(args.data, 'train')))
    val = D.eval_loader(D.image_folder(os.path.join(args.data, 'val'), classes, None, D.eval_transform(cfg)), 256, 2)
    train = D.image_folder(os.path.join(args.data, 'train'), classes, 2000, D.eval_transform(cfg))
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    batches = [b for _, b in zip(range(8), loader)]
    single = SimpleNamespace(enabled=False, world_size=1, rank=0, main=True)

    def top1(arch=None, kept=None) -> float:
        if arch is None:
            sn.pin_current()
        else:
            sn.pin(arch, kept)
        try:
            return evaluate(sn, val, torch.device('cpu'), single)['top1']
        finally:
            sn.unpin()

    print(f'original: {top1(sn.uniform_arch("msa")):.2f}%')
    scores = gate_fisher(sn, batches)
    dims, unit = sn.block_dims, sum(mlp_flops(b, 1) for b in sn.block_dims)
    for r in args.ratios:
        target = r * sn.original_flops
        hidden = round((target - sn.arch_flops(sn.uniform_arch('msa', 1)) + unit) / unit)
        if hidden < 1:
            print(f'{r:g}: every block msa costs more than that; MLP-only prunes skipped')
            continue
        arch = Architecture(NAME, [BlockArch('msa', hidden) for _ in dims], KWARGS)
        print(f'{r:g} uniform magnitude, {hidden} units per block: {top1(arch):.2f}%')
        print(f'{r:g} uniform fisher: {top1(arch, [top_units(s, hidden) for s in scores.mlp]):.2f}%')
        init_from_importance(sn, scores, spread=1.4)
        for a in sn.attn_slots:                     # msa everywhere: only the MLPs are pruned
            with torch.no_grad():
                a.gate_logits.fill_(1.5)
        sn.land_on(target)
        print(f'{r:g} global fisher {[b.mlp_hidden for b in sn.architecture().blocks]}: {top1():.2f}%')
        for m in sn.mlp_slots:
            s = mlp_importance(m)
            with torch.no_grad():
                m.gate_logits.copy_(s / s.mean())
        sn.land_on(target)
        print(f'{r:g} global magnitude {[b.mlp_hidden for b in sn.architecture().blocks]}: {top1():.2f}%')
    if args.heads:
        heads_space(args.checkpoint, batches, val, single, args.ratios)
    return 0


def close_lowest(sn, target: float) -> None:
    """Close heads and MLP units in the order of their logits until the FLOPs are on ``target``
    (one head or unit of each block stays)."""
    gates = sorted((float(v), i, kind, j) for i, (a, m) in enumerate(zip(sn.attn_slots, sn.mlp_slots))
                   for kind, logits in (('head', a.head_logits), ('unit', m.gate_logits))
                   for j, v in enumerate(logits.detach().tolist()))
    for _, i, kind, j in gates:
        if sn.arch_flops(sn.architecture()) <= target:
            return
        logits = sn.attn_slots[i].head_logits if kind == 'head' else sn.mlp_slots[i].gate_logits
        if int((logits > 0).sum()) > 1:
            with torch.no_grad():
                logits[j] = -1.0


def heads_space(checkpoint: str, batches, val, single, ratios) -> None:
    sn = attach_search_space(create_model(NAME, KWARGS, checkpoint=checkpoint), model_name=NAME, model_kwargs=KWARGS,
                             search_space='heads')
    scores = gate_fisher(sn, batches)
    rooted = GateScores(scores.attn, [h.sqrt() for h in scores.heads], [m.sqrt() for m in scores.mlp])
    for r in ratios:
        for name, s in (('fisher', scores), ('sqrt(fisher)', rooted)):
            init_from_importance(sn, s, spread=1.4)
            close_lowest(sn, r * sn.original_flops)
            arch = sn.architecture()
            sn.pin_current()
            try:
                t1 = evaluate(sn, val, torch.device('cpu'), single)['top1']
            finally:
                sn.unpin()
            text = ' '.join(f'A{len(b.heads) if b.heads else d.heads}/{b.mlp_hidden}' for b, d in zip(arch.blocks, sn.block_dims))
            print(f'{r:g} heads and units by {name} per FLOP ({sn.arch_flops(arch) / sn.original_flops:.3f} of the FLOPs, '
                  f'{text}): {t1:.2f}%', flush=True)


if __name__ == '__main__':
    sys.exit(main())
