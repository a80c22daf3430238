"""Latency and throughput of a pruned model against the original, in one process.

    python tools/benchmark.py --pruned pruned.pth
    python tools/benchmark.py --arch configs/deit_small_latency_arch.yaml
    python tools/benchmark.py --arch configs/deit_small_latency_arch.yaml --runtime onnxruntime --threads 1
    python tools/benchmark.py --arch arch.yaml --latency-table table.json      # measured against predicted

A pruned checkpoint of a latency-budget search carries its latency table: the report then sets
the table's threads, times the table's batch size and adds measured against predicted latency.
"""
import json

import torch

from spvit.cli import ArgumentParser, add_model_source, device_name, int_at_least, model_source, run
from spvit.latency import compare_latency
from spvit.latency_report import format_prediction, prediction, prediction_table

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
    table, budget = prediction_table(pair, args.latency_table, args.device, args.threads, args.pruned)
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
