"""Cost of one search-mode training step against a plain training step of the same timm model.

Each measurement runs in its own subprocess, plain and search alternately to even out machine
noise. Time: median step after warm-up. Memory: peak RSS (ru_maxrss) of a separate run with
glibc's mmap threshold fixed at 64 KiB, so that every tensor is mapped on allocation and unmapped
on free and the peak RSS follows the live tensors instead of the allocator's free lists. "step
memory" is that peak minus the RSS before the first step (model, optimiser set-up).

    python benchmarks/search_step.py --model deit_tiny_patch16_224 --batch-size 16
    python benchmarks/search_step.py --model deit_tiny_patch16_224 --batch-size 16 --compile

With --compile the forward and loss of both steps are also run through torch.compile (the plain
step too, so that the ratio is fair), and the table adds the compiled steps and their compile time
(the first step's time less a compiled step's, from an empty inductor cache in the first round; the
later rounds reuse that round's kernels). Steps vary by 10-15% between processes on a shared CPU: the
table keeps each mode's fastest process, so give --rounds 4 or more for ratios to 2%.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
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

    def forward_loss(x, y):
        loss = F.cross_entropy(net(x), y)
        if args.mode == 'search':
            loss = loss + ((net.flops() - target) / target) ** 2
        return loss
    if args.compiled:
        forward_loss = torch.compile(forward_loss)
    base = torch.cuda.memory_allocated(device) if cuda else rss_bytes()
    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.float16, enabled=args.amp and cuda):
            loss = forward_loss(x, y)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if i == 0:
            first = time.perf_counter() - t
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    # On CUDA the allocator's peak is exact; on the CPU the peak RSS (see the module docstring).
    peak = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step = statistics.median(times)
    print(json.dumps({'step_s': step, 'peak_bytes': peak, 'step_bytes': peak - base, 'compile_s': first - step}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='deit_tiny_patch16_224')
    p.add_argument('--img-size', type=int, default=224)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--rounds', type=int, default=2, help='alternate plain/search this many times (one process each)')
    p.add_argument('--device', default='cpu', help='cpu or cuda')
    p.add_argument('--amp', action='store_true', help='fp16 autocast (CUDA)')
    p.add_argument('--compile', action='store_true', help='also time both steps under torch.compile')
    p.add_argument('--mode', choices=['plain', 'search'], help=argparse.SUPPRESS)
    p.add_argument('--compiled', action='store_true', help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:
        return worker(args)
    modes = ['plain', 'search'] + (['plain-compiled', 'search-compiled'] if args.compile else [])
    # One inductor cache per mode, empty at its first run: that run's compile time is a cold one, and
    # the later rounds load their kernels from it, so that more rounds cost little more than their steps.
    caches = {mode: tempfile.TemporaryDirectory() for mode in modes}

    def run(mode: str, env: dict) -> dict:
        flags = ['--mode', mode.split('-')[0]] + (['--compiled'] if mode.endswith('compiled') else [])
        argv = [a for a in sys.argv[1:] if a != '--compile']
        out = subprocess.run([sys.executable, __file__, *argv, *flags],
                             env={**os.environ, 'TORCHINDUCTOR_CACHE_DIR': caches[mode].name, **env},
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])

    best = {}
    for _ in range(args.rounds):
        for mode in modes:
            timed = run(mode, {})
            mem = run(mode, {'MALLOC_MMAP_THRESHOLD_': '65536'}) if args.device == 'cpu' else timed
            prev = best.get(mode, {'step_s': float('inf'), 'peak_bytes': float('inf'), 'step_bytes': float('inf'),
                                   'compile_s': timed['compile_s']})
            best[mode] = {'step_s': min(prev['step_s'], timed['step_s']),
                          'peak_bytes': min(prev['peak_bytes'], mem['peak_bytes']),
                          'step_bytes': min(prev['step_bytes'], mem['step_bytes']),
                          'compile_s': prev['compile_s']}
    for cache in caches.values():
        cache.cleanup()
    mib = 2 ** 20
    print(f'{args.model}, batch {args.batch_size}, {args.img_size}px, {args.device}{", fp16 AMP" if args.amp else ""}, '
          f'torch {__import__("torch").__version__}, {os.cpu_count()} cores')
    print(f"{'':16} {'step (s)':>9} {'peak (MiB)':>11} {'step memory (MiB)':>18} {'compile (s)':>12}")
    for m, r in best.items():
        compile_s = f"{r['compile_s']:12.1f}" if m.endswith('compiled') else ''
        print(f"{m:16} {r['step_s']:9.4f} {r['peak_bytes'] / mib:11.0f} {r['step_bytes'] / mib:18.0f} {compile_s}")
    ratios = {
        'time': best['search']['step_s'] / best['plain']['step_s'],
        'peak_rss': best['search']['peak_bytes'] / best['plain']['peak_bytes'],
        'step_memory': best['search']['step_bytes'] / best['plain']['step_bytes'],
    }
    if args.compile:
        ratios.update(compiled_time=best['search-compiled']['step_s'] / best['plain-compiled']['step_s'],
                      compiled_over_eager_search=best['search-compiled']['step_s'] / best['search']['step_s'],
                      compile_s=best['search-compiled']['compile_s'])
    print('ratios search/plain: ' + ', '.join(f'{k} {v:.3f}' for k, v in ratios.items()))
    print(json.dumps(ratios))


if __name__ == '__main__':
    main()
