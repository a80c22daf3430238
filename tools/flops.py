"""Per-block FLOPs (fvcore, with the analytic figure beside it) and parameters of a model,
an architecture or a pruned checkpoint.

    python tools/flops.py --model deit_small_patch16_224 [--model-kwargs ...] [--img-size ...]
    python tools/flops.py --arch arch.yaml
    python tools/flops.py --pruned runs/s1/pruned.pth [--compare] [--json] [--latency-table table.json]
"""
import json

from spvit.cli import ArgumentParser, add_model_source, model_source, run
from spvit.latency_model import LatencyTable
from spvit.report import flop_report


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    add_model_source(p)
    p.add_argument('--compare', action='store_true', help='also report the reduction against the original model')
    p.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    p.add_argument('--latency-table', help='a latency table of the model (tools/latency_table.py): adds each '
                   'block\'s predicted latency on the table\'s device')
    args = p.parse_args(argv)
    table = None if args.latency_table is None else LatencyTable.load(args.latency_table)
    report = flop_report(model_source(args), latency_table=table)
    print(json.dumps(report.to_json(args.compare)) if args.json else report.format(args.compare))


if __name__ == '__main__':
    run(main)
