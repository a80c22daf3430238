"""Export a searched supernet, or an architecture built from original weights, to a pruned checkpoint.

    python tools/export.py --search runs/s1/search-final.pth --output runs/s1/pruned.pth
    python tools/export.py --model deit_small_patch16_224 --checkpoint deit_small.pth --arch arch.yaml --output pruned.pth
"""
from spvit.arch import Architecture
from spvit.checkpoint import check_new_files
from spvit.cli import ArgumentParser, add_model_kwargs, run
from spvit.export import build_from_arch, export_search
from spvit.pruned import pruned_files


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--search', help='search checkpoint (search-final.pth) to export with its trained weights')
    src.add_argument('--arch', help='architecture file to build straight from original weights')
    p.add_argument('--model', help='timm model name for --arch (default: the one the architecture names)')
    add_model_kwargs(p)
    p.add_argument('--checkpoint', help='original weights for --arch (.pth/.safetensors); random init without')
    p.add_argument('--output', required=True, help='pruned checkpoint to write')
    p.add_argument('--safetensors', action='store_true', help='also write model.safetensors and arch.yaml beside --output')
    p.add_argument('--force', action='store_true', help='overwrite existing output files (never an input)')
    args = p.parse_args(argv)
    if args.search and (args.model or args.checkpoint or args.model_kwargs):
        p.error('--model, --model-kwargs and --checkpoint go with --arch, not --search')
    return args


def main(argv=None):
    args = parse_args(argv)
    check_new_files(pruned_files(args.output, args.safetensors), [args.search, args.arch, args.checkpoint], args.force)
    if args.search:
        exported = export_search(args.search)
    else:
        arch = Architecture.load(args.arch)
        kwargs = {**arch.model_kwargs, **dict(args.model_kwargs)}
        exported = build_from_arch(args.model or arch.model, kwargs, arch, checkpoint=args.checkpoint)
    exported.save(args.output, safetensors=args.safetensors)
    prov = exported.provenance
    print(f'wrote {args.output}: {exported.arch.model}, {prov["achieved_gflops"]:.4f} GFLOPs '
          f'(original {prov["original_gflops"]:.4f})')


if __name__ == '__main__':
    run(main)
