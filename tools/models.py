"""Which timm models spvit can search: the supported-models table, or whether one model attaches.

    python tools/models.py                                  # the table (markdown), from the registry
    python tools/models.py --check eva02_tiny_patch14_224   # its family, or why it is refused (exit 2)
"""
from spvit.cli import ArgumentParser, add_model_kwargs, run
from spvit.families import check_model, supported_table


def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--check', metavar='MODEL', help='a timm model name: is it supported, and as which family')
    add_model_kwargs(p)
    args = p.parse_args(argv)
    if args.check is None:
        print(supported_table())
        return
    import torch
    from spvit.models import create_model
    with torch.device('meta'):      # the structure is all a check reads: no weights, no memory
        model = create_model(args.check, dict(args.model_kwargs))
    print(f'{args.check}: supported, family {check_model(model).name}')


if __name__ == '__main__':
    run(main)
