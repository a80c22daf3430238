"""Time of the conv ops' head mixing (``spvit.mixing``), forward and backward, eager and compiled:
the formulation ``mixed_convs`` picks in each mode against the others; then a whole attention slot
(msa and both conv ops with their BatchNorms, one shared output projection) against the timm
attention it wraps.

    python benchmarks/mixing_ops.py                  # deit_tiny's shapes: 3 heads of 64, 14x14, batch 16

``grouped`` (a grouped conv2d, a group per channel whose kernel over the heads is P) is the
formulation the package used before; it is kept here as the reference. All the timed calls of a
table alternate in rounds of --steps calls after warm-up (machine noise then hits them alike);
each time is the median round's, in ms per call (one block).
"""
import argparse
import copy
import statistics
import time
from typing import Callable, Dict

import torch
import torch.nn.functional as F

from spvit.mixing import CENTER, depthwise_mixed_convs, shifted_mixed_convs


def grouped_mixed_convs(v: torch.Tensor, mix: torch.Tensor, grid):
    B, heads, P, C = v.shape
    x = v.permute(0, 3, 1, 2).reshape(B, C * heads, *grid)              # channel c * heads + h
    kernel = mix.reshape(1, heads, 3, 3).expand(C, heads, 3, 3)
    return F.conv2d(x, kernel, padding=1, groups=C).flatten(2), (x.reshape(B, C, heads, P) * mix[:, CENTER, None]).sum(2)


FORMULATIONS = {'depthwise': depthwise_mixed_convs, 'shifted': shifted_mixed_convs, 'grouped': grouped_mixed_convs}


def time_calls(calls: Dict[str, Callable[[], None]], steps: int, rounds: int) -> Dict[str, float]:
    """ms per call of each (forward and backward), the median of ``rounds`` alternating rounds."""
    for call in calls.values():
        for _ in range(3):
            call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            t = time.perf_counter()
            for _ in range(steps):
                call()
            times[name].append((time.perf_counter() - t) / steps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def mixing_table(args) -> None:
    B, heads, C, grid = args.batch_size, args.heads, args.head_dim, (args.grid, args.grid)
    qkv = torch.randn(B, 1 + args.grid ** 2, 3, heads, C)       # a class token first, as in a ViT
    calls = {}
    for name, fn in FORMULATIONS.items():
        def step(qkv, assign, fn=fn):
            v = qkv.permute(2, 0, 3, 1, 4)[2][:, :, 1:]              # the value heads of the patch tokens
            conv3x3, conv1x1 = fn(v, torch.softmax(assign, 0), grid)
            return conv3x3.square().sum() + conv1x1.square().sum()
        for mode, f in (('eager', step), ('compiled', torch.compile(step))):
            q, assign = qkv.clone().requires_grad_(), torch.randn(heads, 9, requires_grad=True)
            calls[name, mode] = lambda f=f, q=q, assign=assign: f(q, assign).backward()
    times = time_calls(calls, args.steps, args.rounds)
    print(f'conv3x3 + conv1x1 alone: batch {B}, {heads} heads of {C}, {args.grid}x{args.grid}, ms per block')
    for name in FORMULATIONS:
        print(f'{name:10} eager {times[name, "eager"]:7.2f}   compiled {times[name, "compiled"]:7.2f}')


def slot_table(args) -> None:
    import timm

    from spvit.slots import AttentionSlot
    model = timm.create_model('vit_tiny_patch16_224', img_size=16 * args.grid, depth=1,
                              embed_dim=args.heads * args.head_dim, num_heads=args.heads)
    attn = model.blocks[0].attn
    slot = AttentionSlot(copy.deepcopy(attn), (args.grid, args.grid), model.num_prefix_tokens).train()
    x = torch.randn(args.batch_size, model.num_prefix_tokens + args.grid ** 2, model.embed_dim, requires_grad=True)
    calls = {}
    for name, module in (('timm attention', attn), ('attention slot', slot)):
        step = lambda x, module=module: module(x).square().sum()      # noqa: E731
        for mode, f in (('eager', step), ('compiled', torch.compile(step))):
            calls[name, mode] = lambda f=f: f(x).backward()
    times = time_calls(calls, args.steps, args.rounds)
    print('whole attention, gates sampled: ms per block')
    for name in ('timm attention', 'attention slot'):
        print(f'{name:15} eager {times[name, "eager"]:7.2f}   compiled {times[name, "compiled"]:7.2f}')
    for mode in ('eager', 'compiled'):
        extra = times['attention slot', mode] - times['timm attention', mode]
        print(f'slot - timm, {mode}: {extra:.2f} ms')


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--heads', type=int, default=3)
    p.add_argument('--head-dim', type=int, default=64)
    p.add_argument('--grid', type=int, default=14)
    p.add_argument('--steps', type=int, default=15, help='calls per round')
    p.add_argument('--rounds', type=int, default=7, help='alternating rounds; the median is reported')
    args = p.parse_args()
    torch.manual_seed(0)
    mixing_table(args)
    slot_table(args)


if __name__ == '__main__':
    main()
