"""Latency budgets (issue 13): how well a latency table predicts, whether a latency-budget search
meets its budget when measured, and how its architecture differs from a FLOPs-budget one.

    OMP_NUM_THREADS=1 python benchmarks/latency_budget.py            # deit_small at 224, batch 1 and 64, 1 thread
    python benchmarks/latency_budget.py --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 \\
        embed_dim=64 depth=4 num_heads=4 --batch-sizes 1 4 --archs 3 --runs 2 --search-epochs 1   # a smoke run

Per batch size B, through the real tools, everything cached under --work (delete a file to redo it):

1. ``tools/latency_table.py`` builds the table of the model on this CPU at B and --threads;
2. predictor error: --archs random architectures (every one uses all four ops, MLP widths 10-100%
   of the full width, msa in at least one block) are built with random init and timed with
   ``spvit.latency.benchmark`` (interleaved runs, medians) beside the original; the error is
   predicted / measured - 1 (goal: median |error| <= 5%, worst <= 10%);
3. ``tools/search.py --target-latency-ratio R --latency-table`` from random init on a small
   synthetic folder, ``tools/export.py``, then ``tools/benchmark.py --pruned`` measures the export
   against its budget (goal: within +-5%).

Then once: ``tools/search.py --target-ratio R`` (a FLOPs budget at the same ratio) and the comparison
table: the FLOPs-budget architecture and each latency-budget one, with their GFLOPs and measured
latency at every batch size, all timed in one process, interleaved with the original.

The CPU must be quiet (no other job on its cores): the tables and measurements are medians, but a
load that changes between the table and the measurement shifts one against the other.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from spvit.demo import LIGHT_AUG, sh, tool  # noqa: E402

DATA = ['--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5', '0.5', '--crop-pct', '1.0', '--workers', '0']


def random_archs(model: str, kwargs: Dict[str, Any], count: int, seed: int = 0) -> List[Any]:
    """``count`` architectures that each use all four ops (msa at least once: a class-token model
    needs it), MLP widths uniform in 10-100% of the full width."""
    import random

    import spvit
    from spvit.latency_model import table_model
    model_, family = table_model(model, kwargs)
    dims = family.block_dims(model_)
    rng = random.Random(seed)
    archs = []
    for _ in range(count):
        ops = [spvit.ATTN_OPS[i % 4] for i in range(len(dims))]
        rng.shuffle(ops)
        blocks = [spvit.BlockArch(op, rng.randint(max(1, round(0.1 * d.hidden)), d.hidden)) for op, d in zip(ops, dims)]
        archs.append(spvit.Architecture(model, blocks, dict(kwargs)))
    return archs


def predictor_error(model: str, kwargs: Dict[str, Any], table_path: str, archs: int, runs: int, threads: int,
                    out: str) -> Dict[str, Any]:
    """Measured against predicted latency of random architectures. The measurements are cached in
    ``out``; the predictions are made again from the table at every run."""
    import spvit
    from spvit.latency_model import LatencyTable
    table = LatencyTable.load(table_path)
    if os.path.exists(out):
        measured = {r['name']: (r['measured_ms'], r['arch']) for r in json.load(open(out))['rows']}
    else:
        import torch

        from spvit.latency import benchmark
        from spvit.latency_model import table_model
        torch.set_num_threads(threads)
        candidates = random_archs(model, kwargs, archs)
        models = {'original': table_model(model, kwargs)[0]}
        for i, arch in enumerate(candidates):
            models[f'arch{i}'] = spvit.build_from_arch(model, kwargs, arch).model
        print(f'\ntiming the original and {archs} random architectures at batch {table.batch_size}, {threads} threads',
              flush=True)
        report = benchmark(models, tuple(table.input_size), batch_sizes=(table.batch_size,), warmup=1, runs=runs)
        measured = {name: (report.timings[table.batch_size][name].latency_ms,
                           None if name == 'original' else candidates[int(name[4:])].to_dict()) for name in models}
    rows = []
    for name, (ms, arch) in measured.items():
        predicted = table.original_ms() if arch is None else table.predict(spvit.Architecture.from_dict(arch))
        rows.append({'name': name, 'predicted_ms': predicted, 'measured_ms': ms, 'error': predicted / ms - 1,
                     'arch': arch})
    errors = [abs(r['error']) for r in rows if r['name'] != 'original']
    result = {'batch': table.batch_size, 'table': table.describe(), 'rows': rows,
              'median_abs_error': statistics.median(errors), 'max_abs_error': max(errors)}
    with open(out, 'w') as f:
        json.dump(result, f, indent=1)
    return result


def search(work: str, name: str, budget: List[str], common: List[str], epochs: int) -> str:
    """A search (cached once finished) and its export; returns the pruned checkpoint."""
    run = os.path.join(work, name)
    final = os.path.join(run, 'search-final.pth')
    if not os.path.exists(final):
        import shutil
        shutil.rmtree(run, ignore_errors=True)
        sh(tool('search.py') + common + budget + ['--output-dir', run, '--epochs', str(epochs)])
    pruned = os.path.join(run, 'pruned.pth')
    if not os.path.exists(pruned):
        sh(tool('export.py') + ['--search', final, '--output', pruned])
    return pruned


def measure_against_budget(pruned: str, batch: int, runs: int, threads: int) -> Dict[str, Any]:
    out = sh(tool('benchmark.py') + ['--pruned', pruned, '--batch-sizes', str(batch), '--runs', str(runs),
                                     '--threads', str(threads), '--device', 'cpu', '--json'], capture=True)
    return json.loads(out)['latency_prediction']


def compare(work: str, pruned: Dict[str, str], batches: List[int], runs: int, threads: int) -> Dict[str, Any]:
    """GFLOPs and measured latency of each pruned model and the original, interleaved in one process."""
    import torch

    from spvit.flops import measure_flops
    from spvit.latency import benchmark
    from spvit.compare import load_pair
    from spvit.pruned import read_pruned
    torch.set_num_threads(threads)
    loaded = {name: read_pruned(path) for name, path in pruned.items()}
    first = next(iter(pruned.values()))
    pair = load_pair(pruned=first)
    models = {'original': pair.original, **{name: p.model for name, p in loaded.items()}}
    report = benchmark(models, pair.input_size, batch_sizes=batches, warmup=1, runs=runs)
    flops = {name: measure_flops(m, pair.input_size)[0] for name, m in models.items()}
    rows = []
    for name, m in models.items():
        arch = None if name == 'original' else loaded[name].arch
        rows.append({'name': name, 'gflops': flops[name] / 1e9, 'flops_ratio': flops[name] / flops['original'],
                     'latency_ms': {b: report.timings[b][name].latency_ms for b in batches},
                     'latency_ratio': {b: report.ratio(b, name, 'original') for b in batches},
                     'arch': None if arch is None else ' '.join(arch_word(blk) for blk in arch.blocks)})
    return {'threads': threads, 'rows': rows}


def arch_word(b: Any) -> str:
    op = {'msa': 'A', 'conv3x3': 'C3', 'conv1x1': 'C1', 'skip': 'S'}[b.attn]
    return f'{op}{"" if b.heads is None else len(b.heads)}/{b.mlp_hidden}'


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='deit_small_patch16_224')
    p.add_argument('--model-kwargs', nargs='*', default=[], metavar='K=V')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 64])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--ratio', type=float, default=0.6, help='the budget, as a fraction of the original')
    p.add_argument('--archs', type=int, default=20, help='random architectures for the predictor error')
    p.add_argument('--runs', type=int, default=5, help='timed runs per model (medians)')
    p.add_argument('--search-epochs', type=int, default=3)
    p.add_argument('--train-per-class', type=int, default=64, help='synthetic images per class (4 classes)')
    p.add_argument('--search-batch-size', type=int, default=16)
    p.add_argument('--work', default='runs/latency_budget')
    p.add_argument('--json', action='store_true')
    args = p.parse_args(argv)
    from spvit.config import kv_item
    kwargs = dict(kv_item(t) for t in args.model_kwargs)
    os.makedirs(args.work, exist_ok=True)
    data = os.path.join(args.work, 'data')
    if not os.path.isdir(data):
        from spvit.synthetic import make_image_folder
        make_image_folder(data, num_classes=4, train_per_class=args.train_per_class, val_per_class=16, size=64)
    model = ['--model', args.model] + (['--model-kwargs', *args.model_kwargs] if args.model_kwargs else [])
    # the tables and the searches know the model with the data's 4 classes (the head is in the fixed part)
    table_kwargs = {**kwargs, 'num_classes': 4}
    table_model_args = ['--model', args.model, '--model-kwargs', *args.model_kwargs, 'num_classes=4']
    common = model + DATA + LIGHT_AUG + ['--data-dir', data, '--batch-size', str(args.search_batch_size),
                                         '--lr', '5e-4']
    results: Dict[str, Any] = {'model': args.model, 'model_kwargs': kwargs, 'ratio': args.ratio, 'batches': {}}
    pruned = {'flops': search(args.work, 'flops', ['--target-ratio', str(args.ratio)], common, args.search_epochs)}
    for b in args.batch_sizes:
        table = os.path.join(args.work, f'table-b{b}.json')
        if not os.path.exists(table):
            sh(tool('latency_table.py') + table_model_args + ['--batch-size', str(b), '--threads', str(args.threads),
                                                              '--runs', str(args.runs), '--output', table])
        error = predictor_error(args.model, table_kwargs, table, args.archs, args.runs, args.threads,
                                os.path.join(args.work, f'error-b{b}.json'))
        pruned[f'latency b{b}'] = search(args.work, f'latency-b{b}', ['--target-latency-ratio', str(args.ratio),
                                                                       '--latency-table', table], common,
                                         args.search_epochs)
        budget = measure_against_budget(pruned[f'latency b{b}'], b, args.runs, args.threads)
        results['batches'][b] = {'predictor': error, 'search': budget}
    results['comparison'] = compare(args.work, pruned, args.batch_sizes, args.runs, args.threads)
    if args.json:
        print(json.dumps(results))
    else:
        print('\n' + format_results(results))
    return 0


def format_results(r: Dict[str, Any]) -> str:
    lines = [f'{r["model"]} {" ".join(f"{k}={v}" for k, v in r["model_kwargs"].items())}'.rstrip()
             + f', budget ratio {r["ratio"]}', '']
    lines.append('| batch | predictor: median / worst abs error | search: predicted / measured / target ms | '
                 'measured / target | measured ratio to the original |')
    lines.append('|---|---|---|---|---|')
    for b, x in r['batches'].items():
        e, s = x['predictor'], x['search']
        lines.append(f'| {b} | {e["median_abs_error"]:.1%} / {e["max_abs_error"]:.1%} | '
                     f'{s["predicted_ms"]["pruned"]:.2f} / {s["measured_ms"]["pruned"]:.2f} / {s["target_ms"]:.2f} | '
                     f'{s["measured_over_target"] - 1:+.1%} | {s["measured_ratio"]:.3f} |')
    c = r['comparison']
    batches = list(c['rows'][0]['latency_ms'])
    lines += ['', '| budget | GFLOPs (ratio) | ' + ' | '.join(f'batch {b}: ms (ratio)' for b in batches)
              + ' | architecture |', '|---|---|' + '---|' * len(batches) + '---|']
    for row in c['rows']:
        lat = ' | '.join(f'{row["latency_ms"][b]:.2f} ({row["latency_ratio"][b]:.3f})' for b in batches)
        lines.append(f'| {row["name"]} | {row["gflops"]:.3f} ({row["flops_ratio"]:.3f}) | {lat} | {row["arch"] or ""} |')
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
