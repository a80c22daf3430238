"""``make demo``: the whole pipeline on Fashion-MNIST with the real tools, one command at a time.

A converged ViT shipped in the repository (``make original`` rebuilds it) is searched to a quarter
of its FLOPs, exported and fine-tuned with distillation from the original; a uniform prune at the
same FLOPs gets the same training; all three are evaluated on the whole test split and timed.
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
from typing import Any, Dict, List, Optional, Sequence

from .checkpoint import atomic_write_text
from .config import ConfigError
from .fashion_mnist import write_image_folder
from .finetune import LAST as FINETUNE_LAST
from .pruned import read_pruned
from .runtime import Interrupted, StopSignal, TrainingError
from .trainer import LAST as SEARCH_LAST

# A ViT on Fashion-MNIST's own 28x28 images: 7x7 patches (a 4x4 grid and the class token: 17 tokens),
# embed 128, 4 heads, depth 6. Small enough to train to convergence on the whole training split in
# well under an hour on 2 cores, and every op of the search space has something to do on its grid.
MODEL = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=28', 'patch_size=7', 'embed_dim=128',
         'depth=6', 'num_heads=4']
# Fashion-MNIST's grey levels, replicated to 3 channels.
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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo's "pretrained" model, shipped in the repository (4.9 MB) because training it to
# convergence takes about 25 minutes on 2 cores: `make original` rebuilds it with the commands its
# provenance records.
ORIGINAL = os.path.join(REPO, 'assets', 'fashion-mnist-vit.pth')
# Trained on the whole training split (60k images) in two stages: 8 epochs with the light
# augmentation, then 5 more at half the peak lr on whole images (no random crop). Its last epoch is
# shipped: no checkpoint is selected on the test split the demo reports.
# The same recipe trains the search-quality benchmark's starting model (a wider ViT on 32x32 images).
ORIGINAL_PER_CLASS = 6000
ORIGINAL_RECIPE = (
    ['--batch-size', '128', '--epochs', '8', '--lr', '4e-3', '--warmup-epochs', '1'],
    ['--batch-size', '128', '--epochs', '5', '--lr', '2e-3', '--warmup-epochs', '0', '--scale', '1', '1'],
)
ORIGINAL_STAGES = tuple(zip(('original', 'original2'), ORIGINAL_RECIPE))


def last_epoch(run_dir: str) -> Dict[str, Any]:
    """The last epoch record of a search or fine-tune run's ``log.jsonl``."""
    with open(os.path.join(run_dir, 'log.jsonl')) as f:
        return [r for r in map(json.loads, f) if r['kind'] == 'epoch'][-1]


def train_original(data_root: str = 'data', runs: str = 'runs/original', output: str = ORIGINAL) -> str:
    """``make original``: train the demo's starting model with tools/finetune.py and write its last
    epoch to ``output`` (model and data config only), the commands and its test top-1 in the
    provenance."""
    data = write_image_folder(os.path.join(data_root, 'fashion-mnist-60k'), os.path.join(data_root, 'cache'),
                              ORIGINAL_PER_CLASS, 1000)
    os.makedirs(runs, exist_ok=True)
    commands, checkpoint = [], []
    for name, args in ORIGINAL_STAGES:
        out = os.path.join(runs, name)
        shutil.rmtree(out, ignore_errors=True)
        cmd = [*tool('finetune.py'), *MODEL, '--data-dir', data, *DATA, *LIGHT_AUG, *checkpoint,
               '--output-dir', out, *args]
        sh(cmd)
        commands.append(shlex.join(['python', os.path.relpath(cmd[1], REPO), *cmd[2:]]))
        checkpoint = ['--checkpoint', os.path.join(out, FINETUNE_LAST)]
    return ship_trained(out, commands, output, 'make original')


def ship_trained(run_dir: str, commands: List[str], output: str, built_by: str) -> str:
    """Write the last epoch of the fine-tune run in ``run_dir`` (the last of ``commands``) to
    ``output`` as a shipped starting model: model and data config only, the commands that trained
    it, their epochs and its test top-1 in the provenance."""
    pm = read_pruned(os.path.join(run_dir, FINETUNE_LAST))
    epochs = sum(int(a[a.index('--epochs') + 1]) for a in map(shlex.split, commands))
    pm.provenance = {'source': {'pretrained': False, 'checkpoint': None}, 'built_by': built_by,
                     'commands': commands, 'test_top1': last_epoch(run_dir)['val_top1'], 'epochs': epochs}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    pm.save(output)
    print(f'wrote {output}: test top-1 {pm.provenance["test_top1"]:.2f}% after {epochs} epochs', flush=True)
    return output


def steps(data: str, runs: str, original: str, ratio: float, space: str, epochs: int = 2) -> Dict[str, List[str]]:
    """Every command of the demo. The searched model and the uniform prune get the same training,
    ``epochs`` (even) in all: the search runs the first half of one cosine over them (--sched-epochs)
    and its fine-tune the second half (--sched-offset), the uniform prune is fine-tuned ``epochs``,
    all with soft distillation from the original and the same lr."""
    half = str(epochs // 2)
    srch, pruned, ft = (os.path.join(runs, n) for n in ('search', 'pruned.pth', 'finetune'))
    uni_arch, uni, uni_ft = (os.path.join(runs, n) for n in ('uniform-arch.yaml', 'uniform.pth', 'uniform-finetune'))
    common = ['--data-dir', data, *DATA, *LIGHT_AUG, '--batch-size', '64']
    train = ['--lr', '2e-3', '--distill', 'soft']
    tune = ['--warmup-epochs', '0', '--teacher', 'original', *train]
    evaluate = ['--data-dir', data, *DATA, '--json']
    return {
        'search': [*tool('search.py'), *MODEL, *common, '--checkpoint', original, '--output-dir', srch,
                   '--target-ratio', f'{ratio:g}', '--search-space', space, '--epochs', half, '--sched-epochs', str(epochs),
                   *train],
        'export': [*tool('export.py'), '--search', os.path.join(srch, 'search-final.pth'), '--output', pruned, '--force'],
        'finetune': [*tool('finetune.py'), '--pruned', pruned, *common, '--output-dir', ft, '--epochs', half,
                     '--sched-epochs', str(epochs), '--sched-offset', half, *tune],
        'uniform_export': [*tool('export.py'), '--arch', uni_arch, '--checkpoint', original, '--output', uni, '--force'],
        'uniform_finetune': [*tool('finetune.py'), '--pruned', uni, *common, '--output-dir', uni_ft, '--epochs', str(epochs),
                             *tune],
        'eval_original': [*tool('eval.py'), '--pruned', original, *evaluate],
        'eval_spvit': [*tool('eval.py'), '--pruned', os.path.join(ft, FINETUNE_LAST), *evaluate],
        'eval_uniform': [*tool('eval.py'), '--pruned', os.path.join(uni_ft, FINETUNE_LAST), *evaluate],
        'flops': [*tool('flops.py'), '--pruned', os.path.join(ft, FINETUNE_LAST), '--compare'],
        'latency_spvit': [*tool('benchmark.py'), '--pruned', os.path.join(ft, FINETUNE_LAST), '--json'],
        'latency_uniform': [*tool('benchmark.py'), '--pruned', os.path.join(uni_ft, FINETUNE_LAST), '--json'],
    }


def uniform_baseline(original: str, ratio: float, path: str) -> Dict[str, List[int]]:
    """Write the uniform prune at the search's budget (``SuperNet.uniform_prune``): every block msa
    with the same MLP width, and the same number of heads where all heads do not fit. Returns the
    original's MLP width and heads per block (for the report)."""
    import torch
    from .supernet import attach_search_space
    pm = read_pruned(original)
    with torch.no_grad():
        supernet = attach_search_space(pm.model, model_name=pm.arch.model, model_kwargs=pm.arch.model_kwargs)
    arch = supernet.uniform_prune(ratio) or supernet.uniform_prune(ratio, heads=True)
    if arch is None:
        raise ConfigError(f'no uniform prune reaches {ratio:g} of the FLOPs with one head and one MLP unit per block')
    arch.save(path)
    return {'mlp_hidden': [b.hidden for b in supernet.block_dims], 'heads': [b.heads for b in supernet.block_dims]}


def run_demo(data_root: str = 'data', runs: str = 'runs/demo', train_per_class: int = 2000,
             val_per_class: int = 1000, ratio: float = 0.25, search_space: str = 'full',
             original: str = ORIGINAL, epochs: int = 4, report: Optional[str] = 'demo-report.png') -> Dict[str, Any]:
    start = time.time()
    if epochs < 2 or epochs % 2:
        raise ConfigError(f'--epochs must be even and at least 2 (half search, half fine-tune), got {epochs}')
    if not os.path.exists(original):
        raise ConfigError(f'no original model at {original}: run `make original` (about 40 minutes) or give --original')
    data = os.path.join(data_root, 'fashion-mnist')
    names = ('data', 'search', 'export', 'finetune', 'uniform prune', 'uniform fine-tune', 'evaluation', 'latency')
    step = Progress(names, start)
    step(f'Fashion-MNIST -> {data} ({train_per_class}/class train, {val_per_class}/class test)')
    write_image_folder(data, os.path.join(data_root, 'cache'), train_per_class, val_per_class)
    os.makedirs(runs, exist_ok=True)
    cmds = steps(data, runs, original, ratio, search_space, epochs)
    state = StepState(runs)
    step(f'search to {ratio:g} of the FLOPs in the {search_space!r} space, {epochs // 2} epoch(s)')
    state.train('search', cmds['search'], os.path.join(runs, 'search'), SEARCH_LAST)
    step('export the searched architecture')
    sh(cmds['export'])
    step(f'fine-tune the searched model, {epochs // 2} epoch(s) (the second half of the search\'s cosine)')
    state.train('finetune', cmds['finetune'], os.path.join(runs, 'finetune'), FINETUNE_LAST)
    step('uniform prune at the same FLOPs, from the original weights')
    dims = uniform_baseline(original, ratio, os.path.join(runs, 'uniform-arch.yaml'))
    sh(cmds['uniform_export'])
    step(f'fine-tune the uniform prune, {epochs} epochs (the same training)')
    state.train('uniform_finetune', cmds['uniform_finetune'], os.path.join(runs, 'uniform-finetune'), FINETUNE_LAST)
    step('evaluate on the Fashion-MNIST test images')
    evals = {k: json.loads(sh(cmds[f'eval_{k}'], capture=True)) for k in ('original', 'uniform', 'spvit')}
    for k, run in (('uniform', 'uniform-finetune'), ('spvit', 'finetune')):
        evals[k]['arch'] = read_pruned(os.path.join(runs, run, FINETUNE_LAST)).arch.to_dict()
    sh(cmds['flops'])
    step('CPU latency at batch 1 and 64')
    latency = {k: json.loads(sh(cmds[f'latency_{k}'], capture=True))['batches'] for k in ('uniform', 'spvit')}
    result = {'eval': evals, 'latency': latency, 'ratio': ratio, 'original_dims': dims, 'minutes': (time.time() - start) / 60}
    atomic_write_text(os.path.join(runs, 'demo-result.json'), json.dumps(result, indent=1))
    print('\n' + table(result))
    if report:
        write_report(report, runs, result)
    state.finish()
    print(f'\ndemo done in {(time.time() - start) / 60:.1f} min', flush=True)
    return result


class Progress:
    """One line per demo step: its number, what it does, and the minutes since the start."""

    def __init__(self, names: Sequence[str], start: float) -> None:
        self.count, self.done, self.start = len(names), 0, start

    def __call__(self, what: str) -> None:
        self.done += 1
        print(f'\n[{self.done}/{self.count}, {(time.time() - self.start) / 60:.1f} min] {what}', flush=True)


SHORT_OPS = {'msa': 'A', 'conv3x3': 'C3', 'conv1x1': 'C1', 'skip': 'S'}


def arch_text(arch: Dict[str, Any]) -> str:
    """``A/126 A2/80 C1/40``: op per block (A2: msa with 2 heads), '/' the MLP units kept."""
    return ' '.join(SHORT_OPS[b['attn']] + (str(len(b['heads'])) if b.get('heads') else '') + f"/{b['mlp_hidden']}"
                    for b in arch['blocks'])


def table(r: Dict[str, Any]) -> str:
    """Original, uniform prune and searched model side by side, as a Markdown table."""
    ev, lat = r['eval'], r['latency']
    o = ev['original']
    base = {b: t['original']['latency_ms'] for b, t in lat['spvit'].items()}
    lines = ['| model | test top-1 | GFLOPs | params (M) | '
             + ' | '.join(f'CPU ms, batch {b}' for b in sorted(base, key=int)) + ' | architecture |',
             '|---|---|---|---|' + '---|' * len(base) + '---|',
             f"| original | {o['top1']:.2f}% | {o['gflops']:.4f} | {o['params'] / 1e6:.3f} | "
             + ' | '.join(f'{base[b]:.2f}' for b in sorted(base, key=int)) + ' | msa everywhere |']
    for name in ('uniform', 'spvit'):
        e = ev[name]
        times = ' | '.join(f"{t['pruned']['latency_ms']:.2f} ({t['pruned']['ratio']:.2f}x)"
                           for _, t in sorted(lat[name].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {name} | {e['top1']:.2f}% ({e['top1'] - o['top1']:+.2f}) | {e['gflops']:.4f} "
                     f"({e['gflops'] / o['gflops']:.2f}x) | {e['params'] / 1e6:.3f} ({e['params'] / o['params']:.2f}x) | "
                     f"{times} | {arch_text(e['arch']) if 'arch' in e else ''} |")
    lines.append(f"(FLOPs budget {r['ratio']:g} of the original; A = msa, A2 = msa keeping 2 heads, C3/C1 = "
                 "conv3x3/conv1x1, S = skip, /N = MLP units kept; latency ratios against the original timed in "
                 f"the same run; demo took {r['minutes']:.1f} min)")
    return '\n'.join(lines)


OP_COLORS = {'skip': '#d9d9d9', 'conv1x1': '#9ecae1', 'conv3x3': '#3182bd', 'msa': '#e6550d'}


def write_report(path: str, runs: str, result: Dict[str, Any]) -> None:
    """demo-report.png: the searched architecture against the uniform prune, the search's path
    (GFLOPs against the falling target, units and heads closed), and top-1 against GFLOPs."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print(f'\nmatplotlib is not installed (pip install -e .[plot]); skipping {path}')
        return
    ev = result['eval']
    with open(os.path.join(runs, 'search', 'log.jsonl')) as f:
        records = [r for r in map(json.loads, f) if r['kind'] == 'step']
    spvit, uniform = ev['spvit']['arch']['blocks'], ev['uniform']['arch']['blocks']
    width, heads_total = result['original_dims']['mlp_hidden'], result['original_dims']['heads']
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.3))

    x = range(len(spvit))
    ax1.bar([i - 0.2 for i in x], [b['mlp_hidden'] / w for b, w in zip(spvit, width)], 0.4,
            color=[OP_COLORS[b['attn']] for b in spvit], edgecolor='k', linewidth=0.5)
    ax1.bar([i + 0.2 for i in x], [b['mlp_hidden'] / w for b, w in zip(uniform, width)], 0.4,
            color=OP_COLORS['msa'], alpha=0.35, edgecolor='k', linewidth=0.5, hatch='//')
    for i, (s, u) in enumerate(zip(spvit, uniform)):
        for dx, b in ((-0.2, s), (0.2, u)):
            label = SHORT_OPS[b['attn']] + (str(len(b['heads'])) if b.get('heads') else '')
            ax1.text(i + dx, b['mlp_hidden'] / width[i] + 0.02, label, ha='center', fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c, label=k) for k, c in OP_COLORS.items()]
    handles.append(plt.Rectangle((0, 0), 1, 1, facecolor=OP_COLORS['msa'], alpha=0.35, hatch='//', label='uniform'))
    ax1.legend(handles=handles, fontsize=7, ncol=3, loc='upper right')
    ax1.set(xlabel='block (left: spvit, right: uniform prune)', ylabel='MLP width kept', ylim=(0, 1.3),
            xticks=list(x), title=f'architecture (An: msa keeping n of {max(heads_total)} heads)')

    steps = [r['step'] for r in records]
    ax2.plot(steps, [r['gflops'] for r in records], color='black', label='GFLOPs (deterministic gates)')
    ax2.plot(steps, [r['target'] for r in records], '--', color='grey', label='target')
    ax2.set(xlabel='search step', ylabel='GFLOPs', title='search: FLOPs against the falling target')
    if records and 'mlp_open' in records[0]:
        share = ax2.twinx()
        share.plot(steps, [1 - sum(r['mlp_open']) / sum(width) for r in records], color='tab:green', alpha=0.8,
                   label='MLP units closed')
        if 'heads_open' in records[0]:
            share.plot(steps, [sum(t - h for t, h, o in zip(heads_total, r['heads_open'], r['ops']) if o == 'msa')
                               / sum(heads_total) for r in records], color='tab:purple', alpha=0.8,
                       label='heads closed (in msa blocks)')
        share.plot(steps, [sum(o != 'msa' for o in r['ops']) / len(r['ops']) for r in records], color='tab:blue',
                   alpha=0.8, label='blocks turned into conv/skip')
        share.set(ylabel='share closed', ylim=(0, 1.05))
        mine, theirs = ax2.get_legend_handles_labels(), share.get_legend_handles_labels()
        ax2.legend(mine[0] + theirs[0], mine[1] + theirs[1], fontsize=7, loc='upper center', ncol=2,
                   bbox_to_anchor=(0.5, -0.14))
    else:
        ax2.legend(fontsize=7)

    for name, marker in (('original', 'o'), ('uniform', 's'), ('spvit', '*')):
        e = ev[name]
        ax3.scatter(e['gflops'], e['top1'], s=120 if marker == '*' else 60, marker=marker, label=name, zorder=3)
        ax3.annotate(f"{e['top1']:.2f}%", (e['gflops'], e['top1']), textcoords='offset points', xytext=(6, -12),
                     fontsize=8)
    ax3.margins(x=0.12, y=0.2)
    ax3.set(xlabel='GFLOPs', ylabel='test top-1 (%)', title='Fashion-MNIST test set, same training')
    ax3.legend(fontsize=8)
    ax3.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches='tight')
    plt.close(fig)
    print(f'\nwrote {path}')
