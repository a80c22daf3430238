"""Time every part of a model on this device: the latency table that latency budgets predict with.

    python tools/latency_table.py --model deit_small_patch16_224 --batch-size 1 --threads 1 --output t.json
    python tools/latency_table.py --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 \\
        --device cuda --batch-size 64 --output t.json
"""
import torch

from spvit.checkpoint import check_new_files
from spvit.cli import ArgumentParser, add_model_kwargs, device_name, int_at_least, number_between, run
from spvit.latency_model import DEFAULT_MLP_POINTS, build_latency_table


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', required=True, help='timm model name')
    add_model_kwargs(p)
    p.add_argument('--img-size', type=int_at_least(1), help='input resolution (shortcut for --model-kwargs img_size=N)')
    p.add_argument('--device', type=device_name, default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--batch-size', type=int_at_least(1), default=1, help='the batch size the latency is for')
    p.add_argument('--threads', type=int_at_least(1), help='CPU threads (torch.set_num_threads); default: torch\'s '
                   'choice. On a machine shared with other busy processes use 1')
    p.add_argument('--mlp-points', type=int_at_least(2), default=DEFAULT_MLP_POINTS,
                   help='MLP widths timed (1 and even steps up to the full width); between them it is interpolated')
    p.add_argument('--warmup', type=int_at_least(0), default=2, help='untimed passes per part')
    p.add_argument('--runs', type=int_at_least(1), default=5, help='timed runs per part (the median is kept)')
    p.add_argument('--min-run-s', type=number_between(0), default=0.2, help='a run repeats a part for at least this long')
    p.add_argument('--output', required=True, help='the table (JSON)')
    p.add_argument('--force', action='store_true', help='replace an existing output')
    args = p.parse_args(argv)
    check_new_files([args.output], [], force=args.force)
    kwargs = dict(args.model_kwargs)
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    table = build_latency_table(args.model, kwargs, device=args.device, batch_size=args.batch_size,
                                threads=args.threads, mlp_points=args.mlp_points, warmup=args.warmup, runs=args.runs,
                                min_run_s=args.min_run_s)
    table.save(args.output)
    print(f'{table.describe()}\nfixed part {table.fixed_ms:.3f} ms; predicted original {table.original_ms():.3f} ms '
          f'(measured {table.timing["original_ms"]:.3f})')
    for j, s in enumerate(table.shapes):
        count = table.blocks.count(j)
        ops = ', '.join(f'{op} {ms:.3f}' for op, ms in s.ops.items())
        print(f'shape {j} ({count} blocks, {s.dims["tokens"]} tokens, dim {s.dims["dim"]}, {s.dims["heads"]} heads): '
              f'{ops} ms; MLP {s.mlp_ms[0]:.3f} (1 unit) .. {s.mlp_ms[-1]:.3f} ms ({s.dims["hidden"]} units)')
    print(f'wrote {args.output}')


if __name__ == '__main__':
    run(main)
