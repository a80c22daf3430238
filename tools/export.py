"""Export a searched supernet, or an architecture built from original weights, to a pruned checkpoint
(and ONNX).

    python tools/export.py --search runs/s1/search-final.pth --output runs/s1/pruned.pth
    python tools/export.py --model deit_small_patch16_224 --checkpoint deit_small.pth --arch arch.yaml --output pruned.pth
    python tools/export.py --pruned runs/ft/best.pth --onnx model.onnx --int8     # a (fine-tuned) pruned model to ONNX
"""
from spvit.arch import Architecture
from spvit.checkpoint import check_new_files
from spvit.cli import ArgumentParser, add_model_kwargs, run
from spvit.export import build_from_arch, export_search
from spvit.pruned import pruned_files, read_pruned


def parse_args(argv):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--search', help='search checkpoint (search-final.pth) to export with its trained weights')
    src.add_argument('--arch', help='architecture file to build straight from original weights')
    src.add_argument('--pruned', help='a pruned checkpoint (export.py or finetune.py output) to write as ONNX')
    p.add_argument('--model', help='timm model name for --arch (default: the one the architecture names)')
    add_model_kwargs(p)
    p.add_argument('--checkpoint', help='original weights for --arch (.pth/.safetensors); random init without')
    p.add_argument('--output', help='pruned checkpoint to write (required with --search and --arch)')
    p.add_argument('--safetensors', action='store_true', help='also write model.safetensors and arch.yaml beside --output')
    p.add_argument('--onnx', help='also write the pruned model as ONNX (dynamic batch, data config and architecture '
                   'in its metadata), checked against PyTorch with ONNX Runtime; needs the onnx extra')
    p.add_argument('--int8', action='store_true', help='with --onnx: also write a dynamically int8-quantised copy '
                   '(model.onnx -> model.int8.onnx)')
    p.add_argument('--force', action='store_true', help='overwrite existing output files (never an input)')
    args = p.parse_args(argv)
    if (args.search or args.pruned) and (args.model or args.checkpoint or args.model_kwargs):
        p.error('--model, --model-kwargs and --checkpoint go with --arch')
    if args.pruned and (args.output or args.safetensors):
        p.error('--pruned is written as ONNX only: give --onnx, not --output/--safetensors')
    if args.pruned and not args.onnx:
        p.error('--pruned needs --onnx')
    if not args.pruned and not args.output:
        p.error('--output is required with --search and --arch')
    if args.int8 and not args.onnx:
        p.error('--int8 needs --onnx')
    return args


def main(argv=None):
    from spvit.deploy import int8_path, require_onnx
    args = parse_args(argv)
    outputs = pruned_files(args.output, args.safetensors) if args.output else []
    if args.onnx:
        require_onnx()
        outputs += [args.onnx] + ([int8_path(args.onnx)] if args.int8 else [])
    check_new_files(outputs, [args.search, args.arch, args.checkpoint, args.pruned], args.force)
    if args.search:
        exported = export_search(args.search)
    elif args.arch:
        arch = Architecture.load(args.arch)
        kwargs = {**arch.model_kwargs, **dict(args.model_kwargs)}
        exported = build_from_arch(args.model or arch.model, kwargs, arch, checkpoint=args.checkpoint)
    else:
        exported = read_pruned(args.pruned)
    if args.output:
        exported.save(args.output, safetensors=args.safetensors)
        prov = exported.provenance
        print(f'wrote {args.output}: {exported.arch.model}, {prov["achieved_gflops"]:.4f} GFLOPs '
              f'(original {prov["original_gflops"]:.4f})')
    if args.onnx:
        from spvit.deploy import export_pruned_onnx
        for line in export_pruned_onnx(exported, args.onnx, int8=args.int8):
            print(line)


if __name__ == '__main__':
    run(main)
