"""Latency and throughput of a pruned model against the original, in one process.

    python tools/benchmark.py --pruned pruned.pth
    python tools/benchmark.py --arch configs/deit_small_latency_arch.yaml
    python tools/benchmark.py --arch configs/deit_small_latency_arch.yaml --runtime onnxruntime --threads 1
    python tools/benchmark.py --arch arch.yaml --latency-table table.json      # measured against predicted

A pruned checkpoint of a latency-budget search carries its latency table: the report then sets
the table's threads, times the table's batch size and adds measured against predicted latency.
"""
import json
import sys

import torch

from spvit.cli import ArgumentParser, add_model_source, device_name, int_at_least, model_source, run
from spvit.latency import compare_latency
from spvit.latency_model import LatencyTable, LatencyTableError


def latency_table(args, pair):
    """The table to predict with: --latency-table (refused, one line, if it is for another model or
    device), else the one a latency-budget checkpoint carries (skipped with a note on another device)."""
    budget = pair.provenance.get('latency_budget') if args.pruned else None
    if args.latency_table is None and not budget:
        return None, None
    explicit = args.latency_table is not None
    table = (LatencyTable.load(args.latency_table) if explicit
             else LatencyTable.from_dict(budget['table'], source=f'{args.pruned} (latency budget)'))
    where = args.latency_table if explicit else f'of {args.pruned}'
    table.check_model(pair.arch.model, pair.block_dims, pair.input_size, where=where)
    try:
        table.check_device(args.device, threads=args.threads, where=where)
    except LatencyTableError as e:
        if explicit:
            raise
        print(f'benchmark.py: note: no measured-against-predicted latency: {e}', file=sys.stderr)
        return None, None
    return table, budget


def prediction(report, table, budget, pair):
    """Predicted against measured at the table's batch size, and against the budget's target."""
    b = table.batch_size
    measured = {name: report.timings[b][name].latency_ms for name in ('original', 'pruned')}
    predicted = {'original': table.original_ms(), 'pruned': table.predict(pair.arch)}
    out = {'table': table.describe(), 'batch': b, 'predicted_ms': predicted, 'measured_ms': measured,
           'measured_over_predicted': {k: measured[k] / predicted[k] for k in measured}}
    if budget:
        out.update(target_ms=budget['target_ms'], ratio=budget.get('ratio'),
                   measured_over_target=measured['pruned'] / budget['target_ms'],
                   measured_ratio=measured['pruned'] / measured['original'])
    return out


def format_prediction(p):
    lines = [f'\npredicted latency (table: {p["table"]}), batch {p["batch"]}:']
    for name in ('original', 'pruned'):
        r = p['measured_over_predicted'][name]
        lines.append(f'  {name:<8} predicted {p["predicted_ms"][name]:.2f} ms, measured {p["measured_ms"][name]:.2f} ms '
                     f'(measured/predicted {r:.3f}, {r - 1:+.1%})')
    if 'target_ms' in p:
        ratio = '' if p['ratio'] is None else f' ({p["ratio"]:g} of the original\'s predicted)'
        lines.append(f'  budget {p["target_ms"]:.2f} ms{ratio}: pruned measured/target {p["measured_over_target"]:.3f} '
                     f'({p["measured_over_target"] - 1:+.1%}); measured latency ratio {p["measured_ratio"]:.3f}')
    return '\n'.join(lines)

RUNTIMES = ('torch', 'onnxruntime')


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_model_source(p)
    p.add_argument('--batch-sizes', type=int_at_least(1), nargs='+', default=[1, 64])
    p.add_argument('--warmup', type=int_at_least(0), default=3, help='untimed forward passes per model and batch size')
    p.add_argument('--runs', type=int_at_least(1), default=7, help='timed runs per model and batch size (the median is reported)')
    p.add_argument('--device', type=device_name, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int_at_least(1), help='CPU threads (torch.set_num_threads, and ONNX Runtime\'s '
                   'intra-op threads); default: the runtime\'s choice')
    p.add_argument('--runtime', choices=RUNTIMES, default='torch', help='onnxruntime: both models are also exported '
                   'to ONNX (in a temporary folder) and timed on ONNX Runtime\'s CPU provider beside eager PyTorch; '
                   'needs the onnx extra')
    p.add_argument('--int8', action='store_true', help='with --runtime onnxruntime: also time the pruned model\'s '
                   'dynamic int8 copy (tools/export.py --int8)')
    p.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    p.add_argument('--latency-table', help='also report measured against predicted latency with this table '
                   '(tools/latency_table.py; it must be for this model, device and --threads)')
    args = p.parse_args(argv)
    if args.int8 and args.runtime != 'onnxruntime':
        p.error('--int8 needs --runtime onnxruntime')
    if args.runtime == 'onnxruntime':
        from spvit.deploy import require_onnx
        require_onnx()
        if args.device != 'cpu':
            p.error('--runtime onnxruntime runs on the CPU: give --device cpu')
    pair = model_source(args)
    table, budget = latency_table(args, pair)
    if table is not None:
        if args.threads is None and torch.device(args.device).type == 'cpu':
            args.threads = table.threads        # what the prediction is for
        if table.batch_size not in args.batch_sizes:
            args.batch_sizes = [*args.batch_sizes, table.batch_size]
    if args.threads:
        torch.set_num_threads(args.threads)
    report = compare_latency(pair.original, pair.model, pair.input_size, runtime=args.runtime, threads=args.threads, int8=args.int8,
                             batch_sizes=args.batch_sizes, warmup=args.warmup, runs=args.runs, device=args.device)
    predicted = None if table is None else prediction(report, table, budget, pair)
    if args.json:
        print(json.dumps({**report.to_dict(), **({} if predicted is None else {'latency_prediction': predicted})}))
    else:
        print(report.format() + ('' if predicted is None else format_prediction(predicted)))


if __name__ == '__main__':
    run(main)
