"""Latency and throughput of a pruned model against the original, in one process.

    python tools/benchmark.py --pruned pruned.pth
    python tools/benchmark.py --arch configs/deit_small_latency_arch.yaml
"""
import json

import torch

from spvit.cli import ArgumentParser, add_model_source, device_name, int_at_least, model_source, run
from spvit.flops import measure_flops
from spvit.latency import benchmark


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_model_source(p)
    p.add_argument('--batch-sizes', type=int_at_least(1), nargs='+', default=[1, 64])
    p.add_argument('--warmup', type=int_at_least(0), default=3, help='untimed forward passes per model and batch size')
    p.add_argument('--runs', type=int_at_least(1), default=7, help='timed runs per model and batch size (the median is reported)')
    p.add_argument('--device', type=device_name, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int_at_least(1), help='CPU threads (torch.set_num_threads); default: torch\'s choice')
    p.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = model_source(args)
    report = benchmark({'original': pair.original, 'exported': pair.model}, pair.input_size,
                       batch_sizes=args.batch_sizes, warmup=args.warmup, runs=args.runs, device=args.device)
    report.flops = {name: measure_flops(m, pair.input_size)[0] for name, m in
                    (('original', pair.original), ('exported', pair.model))}
    print(json.dumps(report.to_dict()) if args.json else report.format())


if __name__ == '__main__':
    run(main)
