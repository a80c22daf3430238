"""Cost of one search-mode training step against a plain training step of the same timm model.

Each measurement runs in its own subprocess, plain and search alternately to even out machine
noise. Time: median step after warm-up. Memory: peak RSS (ru_maxrss) of a separate run with
glibc's mmap threshold fixed at 64 KiB, so that every tensor is mapped on allocation and unmapped
on free and the peak RSS follows the live tensors instead of the allocator's free lists. "step
memory" is that peak minus the RSS before the first step (model, optimiser set-up).

    python benchmarks/search_step.py --model deit_tiny_patch16_224 --batch-size 16
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def worker(args) -> None:
    import timm
    import torch
    import torch.nn.functional as F

    import spvit
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = timm.create_model(args.model, img_size=args.img_size).train().to(device)
    net = model
    if args.mode == 'search':
        net = spvit.attach_search_space(model, model_name=args.model)
        net.train()
        target = 0.6 * net.original_flops / 1e9
        optimizers = [torch.optim.AdamW(net.weight_parameters(), lr=1e-5),
                      torch.optim.AdamW(net.gate_parameters(), lr=1e-3, weight_decay=0)]
    else:
        optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-5)]
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    cuda = device.type == 'cuda'
    base = torch.cuda.memory_allocated(device) if cuda else rss_bytes()
    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        loss = F.cross_entropy(net(x), y)
        if args.mode == 'search':
            loss = loss + ((net.flops() - target) / target) ** 2
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    # On CUDA the allocator's peak is exact; on the CPU the peak RSS (see the module docstring).
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({'step_s': statistics.median(times), 'peak_bytes': peak, 'step_bytes': peak - base}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='deit_tiny_patch16_224')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--rounds', type=int, default=2, help='alternate plain/search this many times')
    p.add_argument('--device', default='cpu', help='cpu or cuda')
    p.add_argument('--mode', choices=['plain', 'search'], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return worker(args)
    def run(mode: str, env: dict) -> dict:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], '--mode', mode], env={**os.environ, **env},
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    best = {}
    for _ in range(args.rounds):
        for mode in ('plain', 'search'):
            timed = run(mode, {})
            mem = run(mode, {'MALLOC_MMAP_THRESHOLD_': '65536'})
            prev = best.get(mode, {'step_s': float('inf'), 'peak_bytes': float('inf'), 'step_bytes': float('inf')})
            best[mode] = {'step_s': min(prev['step_s'], timed['step_s']),
                          'peak_bytes': min(prev['peak_bytes'], mem['peak_bytes']),
                          'step_bytes': min(prev['step_bytes'], mem['step_bytes'])}
    mib = 2 ** 20
    print(f'{args.model}, batch {args.batch_size}, {args.img_size}px, torch threads: {os.cpu_count()} cores')
    print(f"{'':8} {'step (s)':>9} {'peak RSS (MiB)':>15} {'step memory (MiB)':>18}")
    for m, r in best.items():
        print(f"{m:8} {r['step_s']:9.3f} {r['peak_bytes'] / mib:15.0f} {r['step_bytes'] / mib:18.0f}")
    ratios = {
        'time': best['search']['step_s'] / best['plain']['step_s'],
        'peak_rss': best['search']['peak_bytes'] / best['plain']['peak_bytes'],
        'step_memory': best['search']['step_bytes'] / best['plain']['step_bytes'],
    }
    print('ratios search/plain: ' + ', '.join(f'{k} {v:.3f}' for k, v in ratios.items()))
    print(json.dumps(ratios))


if __name__ == '__main__':
    main()
