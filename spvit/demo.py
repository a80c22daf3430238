"""``make demo``: the whole pipeline on Fashion-MNIST with the real tools, one command at a time.

A small ViT is trained from scratch as the "pretrained" model (cached), then searched to about
60% of its FLOPs, exported, fine-tuned with distillation from the original, evaluated and timed.
Every step is a command printed before it runs, the same as the README shows.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

from .checkpoint import atomic_write_text
from .fashion_mnist import write_image_folder
from .finetune import LAST as FINETUNE_LAST
from .runtime import Interrupted, StopSignal, TrainingError
from .trainer import LAST as SEARCH_LAST

MODEL = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=4', 'embed_dim=96',
         'depth=6', 'num_heads=3']
# Fashion-MNIST's grey levels, replicated to 3 channels; 28x28 images resized to 32x32.
DATA = ['--mean', '0.286', '0.286', '0.286', '--std', '0.353', '0.353', '0.353', '--crop-pct', '1.0',
        '--workers', '2']
# Short runs on small images: light augmentation (no RandAugment, mixup/cutmix or erasing).
LIGHT_AUG = ['--auto-augment', '', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--color-jitter', '0',
             '--smoothing', '0', '--scale', '0.6', '1.0']


def tool(name: str) -> List[str]:
    return [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tools', name)]


def sh(cmd: List[str], capture: bool = False) -> str:
    """Run one step. A SIGINT/SIGTERM to the demo alone is passed on to the step (one to the whole
    process group reaches it anyway); the demo waits for the step to save its state, then stops
    with the signal's exit code."""
    shown = ['python' if c == sys.executable else os.path.relpath(c) if c.startswith('/') and '/tools/' in c else c
             for c in cmd]
    print('\n$ ' + shlex.join(shown), flush=True)
    proc = subprocess.Popen(cmd, text=True, stdout=subprocess.PIPE if capture else None)
    received: List[int] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in StopSignal.CODES}
    try:
        out, _ = proc.communicate()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise Interrupted(StopSignal.CODES[received[0]], 'run the same command again to go on from the saved state')
    if proc.returncode:
        raise TrainingError(f'demo step failed with exit code {proc.returncode}: {shlex.join(shown)}')
    return out if capture else ''


class StepState:
    """Which training runs a demo reuses or resumes, kept in ``<runs>/demo-state.json``.

    The pretrained model is reused whenever its command is unchanged. After a demo that stopped
    before its end (a signal, a failed step), the next one reuses its finished search and fine-tune
    and resumes the one it stopped in from its last checkpoint; after a finished demo they run
    again. A run is reused or resumed only while every run before it was reused: the search
    of an earlier pretrained model is not this one's.
    """

    def __init__(self, runs: str) -> None:
        self.path = os.path.join(runs, 'demo-state.json')
        try:
            with open(self.path) as f:
                self.state: Dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            self.state = {}
        self.stopped = self.state.get('complete') is False
        self.upstream_ran = False
        self.state['complete'] = False
        self.state.setdefault('steps', {})
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps(self.state, indent=1))

    def _mark(self, name: str, command: str, done: bool) -> None:
        self.state['steps'][name] = {'command': command, 'done': done}
        self._write()

    def train(self, name: str, cmd: List[str], out_dir: str, last: str, keep_finished: bool = False) -> None:
        """Run ``cmd`` (a training tool writing ``out_dir``), or reuse an earlier run of it, or
        resume one from its ``last`` file."""
        key = shlex.join(cmd[2:])
        saved = self.state['steps'].get(name, {})
        same = saved.get('command') == key and not self.upstream_ran
        last = os.path.join(out_dir, last)
        if same and saved.get('done') and (keep_finished or self.stopped):
            print(f'\n{name}: reusing the finished run in {out_dir} (delete it to run again)', flush=True)
            return
        self.upstream_ran = True
        if same and self.stopped and os.path.exists(last):
            sh([*cmd[:2], '--resume', last])
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            self._mark(name, key, False)
            sh(cmd)
        self._mark(name, key, True)

    def finish(self) -> None:
        self.state['complete'] = True
        self._write()


def steps(data: str, runs: str, pretrain_epochs: int, search_epochs: int, finetune_epochs: int) -> Dict[str, List[str]]:
    pre, srch, pruned, ft = (os.path.join(runs, n) for n in ('pretrain', 'search', 'pruned.pth', 'finetune'))
    common = ['--data-dir', data, *DATA, *LIGHT_AUG, '--batch-size', '64']
    return {
        'pretrain': [*tool('finetune.py'), *MODEL, *common, '--output-dir', pre, '--epochs', str(pretrain_epochs),
                     '--lr', '8e-3', '--warmup-epochs', '1'],
        'search': [*tool('search.py'), *MODEL, *common, '--checkpoint', os.path.join(pre, 'best.pth'),
                   '--output-dir', srch, '--target-ratio', '0.6', '--epochs', str(search_epochs), '--lr', '2e-3'],
        'export': [*tool('export.py'), '--search', os.path.join(srch, 'search-final.pth'), '--output', pruned, '--force'],
        'finetune': [*tool('finetune.py'), '--pruned', pruned, *common, '--output-dir', ft,
                     '--epochs', str(finetune_epochs), '--lr', '4e-3', '--warmup-epochs', '0',
                     '--distill', 'soft', '--teacher', 'original'],
        'eval_original': [*tool('eval.py'), '--pruned', os.path.join(pre, 'best.pth'), '--data-dir', data, *DATA, '--json'],
        'eval_pruned': [*tool('eval.py'), '--pruned', os.path.join(ft, 'best.pth'), '--data-dir', data, *DATA, '--json'],
        'flops': [*tool('flops.py'), '--pruned', os.path.join(ft, 'best.pth'), '--compare'],
        'benchmark': [*tool('benchmark.py'), '--pruned', os.path.join(ft, 'best.pth'), '--json'],
    }


def run_demo(data_root: str = 'data', runs: str = 'runs/demo', train_per_class: int = 1000, val_per_class: int = 200,
             pretrain_epochs: int = 8, search_epochs: int = 6, finetune_epochs: int = 6,
             report: Optional[str] = 'demo-report.png') -> Dict[str, Any]:
    start = time.time()
    data = os.path.join(data_root, 'fashion-mnist')
    print(f'Fashion-MNIST -> {data} ({train_per_class}/class train, {val_per_class}/class val)', flush=True)
    write_image_folder(data, os.path.join(data_root, 'cache'), train_per_class, val_per_class)
    os.makedirs(runs, exist_ok=True)
    cmds = steps(data, runs, pretrain_epochs, search_epochs, finetune_epochs)
    state = StepState(runs)
    state.train('pretrain', cmds['pretrain'], os.path.join(runs, 'pretrain'), FINETUNE_LAST, keep_finished=True)
    state.train('search', cmds['search'], os.path.join(runs, 'search'), SEARCH_LAST)
    sh(cmds['export'])
    state.train('finetune', cmds['finetune'], os.path.join(runs, 'finetune'), FINETUNE_LAST)
    original = json.loads(sh(cmds['eval_original'], capture=True))
    pruned = json.loads(sh(cmds['eval_pruned'], capture=True))
    sh(cmds['flops'])
    latency = json.loads(sh(cmds['benchmark'], capture=True))
    result = {'original': original, 'pruned': pruned, 'latency': latency, 'minutes': (time.time() - start) / 60}
    print('\n' + table(result))
    if report:
        write_report(report, os.path.join(runs, 'search'), os.path.join(runs, 'finetune', 'best.pth'))
    state.finish()
    return result


def table(r: Dict[str, Any]) -> str:
    o, p, lat = r['original'], r['pruned'], r['latency']['batches']
    rows = [('val top-1 (%)', f"{o['top1']:.2f}", f"{p['top1']:.2f}", f"{p['top1'] - o['top1']:+.2f}"),
            ('GFLOPs', f"{o['gflops']:.4f}", f"{p['gflops']:.4f}", f"{p['gflops'] / o['gflops']:.3f}x"),
            ('params (M)', f"{o['params'] / 1e6:.3f}", f"{p['params'] / 1e6:.3f}", f"{p['params'] / o['params']:.3f}x")]
    for b in sorted(lat, key=int):
        t = lat[b]
        rows.append((f'CPU latency, batch {b} (ms)', f"{t['original']['latency_ms']:.2f}",
                     f"{t['pruned']['latency_ms']:.2f}", f"{t['pruned']['ratio']:.3f}x"))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'original':>10}  {'pruned':>10}  {'change':>8}"]
    lines += [f'{a:{width}}  {b:>10}  {c:>10}  {d:>8}' for a, b, c, d in rows]
    lines.append(f"(demo took {r['minutes']:.1f} min)")
    return '\n'.join(lines)


def write_report(path: str, search_dir: str, pruned_path: str) -> None:
    """The per-block architecture and the search's GFLOPs curve against its target."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'\nmatplotlib is not installed (pip install -e .[plot]); skipping {path}')
        return
    from .pruned import read_pruned
    pm = read_pruned(pruned_path)
    steps = [json.loads(line) for line in open(os.path.join(search_dir, 'log.jsonl'))]
    steps = [s for s in steps if s['kind'] == 'step']
    from .hybrid import mlp_widths
    import timm
    full = mlp_widths(timm.create_model(pm.arch.model, **pm.arch.model_kwargs))
    colors = {'skip': '#dddddd', 'conv1x1': '#9ecae1', 'conv3x3': '#3182bd', 'msa': '#e6550d'}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (b, m) in enumerate(zip(pm.arch.blocks, full)):
        ax1.bar(i, b.mlp_hidden / m, color=colors[b.attn])
        ax1.text(i, b.mlp_hidden / m + 0.02, b.attn, ha='center', fontsize=8, rotation=90)
    ax1.set(xlabel='block', ylabel='MLP width kept', ylim=(0, 1.35), title='searched architecture')
    ax1.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, label=k) for k, c in colors.items()], fontsize=8, ncol=4)
    ax2.plot([s['step'] for s in steps], [s['gflops'] for s in steps], label='supernet GFLOPs')
    ax2.axhline(steps[0]['target'], color='k', ls='--', label='target')
    ax2.set(xlabel='search step', ylabel='GFLOPs', title='search: FLOPs against the target')
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f'\nwrote {path}')
