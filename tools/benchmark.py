"""Latency and throughput of a pruned model against the original, in one process.

    python tools/benchmark.py --pruned pruned.pth
    python tools/benchmark.py --arch configs/deit_small_latency_arch.yaml
    python tools/benchmark.py --arch configs/deit_small_latency_arch.yaml --runtime onnxruntime --threads 1
"""
import json

import torch

from spvit.cli import ArgumentParser, add_model_source, device_name, int_at_least, model_source, run
from spvit.latency import compare_latency

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
    args = p.parse_args(argv)
    if args.int8 and args.runtime != 'onnxruntime':
        p.error('--int8 needs --runtime onnxruntime')
    if args.runtime == 'onnxruntime':
        from spvit.deploy import require_onnx
        require_onnx()
        if args.device != 'cpu':
            p.error('--runtime onnxruntime runs on the CPU: give --device cpu')
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = model_source(args)
    report = compare_latency(pair.original, pair.model, pair.input_size, runtime=args.runtime, threads=args.threads, int8=args.int8,
                             batch_sizes=args.batch_sizes, warmup=args.warmup, runs=args.runs, device=args.device)
    print(json.dumps(report.to_dict()) if args.json else report.format())


if __name__ == '__main__':
    run(main)
