"""Time of the conv ops' head mixing alone (``spvit.mixing``), forward and backward, eager and
compiled: the formulation ``mixed_convs`` picks in each mode against the others.

    python benchmarks/mixing_ops.py                  # deit_tiny's shapes: 3 heads of 64, 14x14, batch 16

``grouped`` (a grouped conv2d, a group per channel whose kernel over the heads is P) is the
formulation the package used before; it is kept here as the reference. Each time is the mean of
--steps calls after warm-up, in ms per block.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from spvit.mixing import CENTER, depthwise_mixed_convs, shifted_mixed_convs


def grouped_mixed_convs(v: torch.Tensor, mix: torch.Tensor, grid):
    B, heads, P, C = v.shape
    x = v.permute(0, 3, 1, 2).reshape(B, C * heads, *grid)              # channel c * heads + h
    kernel = mix.reshape(1, heads, 3, 3).expand(C, heads, 3, 3)
    return F.conv2d(x, kernel, padding=1, groups=C).flatten(2), (x.reshape(B, C, heads, P) * mix[:, CENTER, None]).sum(2)


FORMULATIONS = {'depthwise': depthwise_mixed_convs, 'shifted': shifted_mixed_convs, 'grouped': grouped_mixed_convs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--heads', type=int, default=3)
    p.add_argument('--head-dim', type=int, default=64)
    p.add_argument('--grid', type=int, default=14)
    p.add_argument('--steps', type=int, default=30)
    args = p.parse_args()
    torch.manual_seed(0)
    B, heads, C, grid = args.batch_size, args.heads, args.head_dim, (args.grid, args.grid)
    qkv = torch.randn(B, 1 + args.grid ** 2, 3, heads, C)       # a class token first, as in a ViT
    print(f'batch {B}, {heads} heads of {C}, {args.grid}x{args.grid}: ms per block, forward and backward')
    for name, fn in FORMULATIONS.items():
        def step(qkv, assign, fn=fn):
            v = qkv.permute(2, 0, 3, 1, 4)[2][:, :, 1:]              # the value heads of the patch tokens
            conv3x3, conv1x1 = fn(v, torch.softmax(assign, 0), grid)
            return conv3x3.square().sum() + conv1x1.square().sum()
        times = []
        for f in (step, torch.compile(step)):
            q, assign = qkv.clone().requires_grad_(), torch.randn(heads, 9, requires_grad=True)
            for _ in range(3):
                f(q, assign).backward()
            t = time.perf_counter()
            for _ in range(args.steps):
                f(q, assign).backward()
            times.append((time.perf_counter() - t) / args.steps * 1e3)
        print(f'{name:10} eager {times[0]:7.2f}   compiled {times[1]:7.2f}')


if __name__ == '__main__':
    main()
