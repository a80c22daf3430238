"""The search: train gates and weights of a supernet together under a FLOPs penalty.

``run_search(cfg)`` is what ``tools/search.py`` calls; it validates everything it can before it
writes a file, keeps ``checkpoint-last.pth`` resumable to the exact step, and leaves
``search-final.pth`` for ``tools/export.py``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from timm.optim import create_optimizer_v2
from tqdm import tqdm

from . import data as D
from .arch import Architecture
from .checkpoint import SEARCH_FORMAT, atomic_save, load_file, supernet_record
from .config import ConfigError, field, parse_config
from .errors import CheckpointError
from .models import create_model
from .options import DataOptions, ModelOptions, TrainOptions
from .runtime import autocast
from .supernet import SuperNet, attach_search_space
from .trainer import LAST, Trainer, resume_config

STATE_FORMAT = 'spvit-search-state'
RUN_FILES = (LAST, 'search-final.pth', 'log.jsonl', 'config.yaml', 'arch.yaml')

# Gate logits start at theta0 and must cross 0 to close. The paper's arch lr (5e-4..1e-3 for
# ~12k steps) lets a logit move about 6-12; short searches get the same reach by default.
ARCH_LR_REACH = 10.0
PAPER_ARCH_LR = 5e-4


@dataclass
class SearchConfig(ModelOptions, DataOptions, TrainOptions):
    target_gflops: Optional[float] = field(None, 'FLOPs budget in GFLOPs')
    target_ratio: Optional[float] = field(None, "budget as a fraction of the original model's FLOPs")
    loss_lambda: float = field(20.0, 'weight of the FLOPs penalty (for the relative form: the paper\'s lambda x T^2)')
    flops_loss: str = field('relative', 'relative: ((F-T)/T)^2; absolute: (F-T)^2 in GFLOPs (the paper)',
                            choices=('relative', 'absolute'))
    arch_lr: Optional[float] = field(None, f'gate learning rate (default: max({PAPER_ARCH_LR}, {ARCH_LR_REACH:g} / planned steps))')
    settle_fraction: float = field(0.1, 'final fraction of the planned steps in which the attention ops are frozen and '
                                   'only the MLP units move, to meet the budget in fine steps (0: never)')
    theta0: float = field(1.5, 'initial gate logit')
    alpha: float = field(0.01, 'head-assignment softmax temperature')


def penalty(gflops: torch.Tensor, target: float, form: str) -> torch.Tensor:
    """The FLOPs penalty: the paper's absolute (F - T)^2, or the scale-free ((F - T) / T)^2."""
    return ((gflops - target) / target) ** 2 if form == 'relative' else (gflops - target) ** 2


def resolve_target(cfg: SearchConfig, supernet: SuperNet) -> float:
    original, smallest = supernet.original_flops / 1e9, supernet.min_flops() / 1e9
    if cfg.target_gflops is not None and cfg.target_ratio is not None:
        raise ConfigError('give --target-gflops or --target-ratio, not both')
    if cfg.target_gflops is not None:
        target = cfg.target_gflops
    elif cfg.target_ratio is not None:
        if not 0 < cfg.target_ratio:
            raise ConfigError(f'--target-ratio must be positive, got {cfg.target_ratio}')
        target = cfg.target_ratio * original
    else:
        raise ConfigError('no FLOPs budget: give --target-gflops or --target-ratio')
    if target >= original:
        raise ConfigError(f'target {target:.4f} GFLOPs is at or above the model\'s {original:.4f} GFLOPs')
    if target < smallest:
        raise ConfigError(f'target {target:.4f} GFLOPs is below the smallest reachable {smallest:.4f} GFLOPs '
                          '(every attention skipped, one hidden unit per MLP)')
    return target


def weight_param_groups(supernet: SuperNet, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups for the network weights: no decay on biases, norms, tokens, position
    embeddings and head assignments (timm's convention plus ours); gate logits excluded."""
    gates = {id(p) for p in supernet.gate_parameters()}
    skip = set(getattr(supernet.model, 'no_weight_decay', lambda: set())())
    decay, no_decay = [], []
    for name, p in supernet.model.named_parameters():
        if id(p) in gates or not p.requires_grad:
            continue
        short = name.rsplit('.', 1)[-1]
        if p.ndim <= 1 or name in skip or short == 'head_assign':
            no_decay.append(p)
        else:
            decay.append(p)
    return [{'params': no_decay, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': weight_decay}]


def arch_table(supernet: SuperNet, arch: Architecture) -> str:
    from .flops import attn_flops, mlp_flops
    lines = [f"{'block':>5}  {'op':8}  {'kept/total':>11}  {'GFLOPs':>8}"]
    for i, (b, dims) in enumerate(zip(arch.blocks, supernet.block_dims)):
        g = (attn_flops(dims, b.attn) + mlp_flops(dims, b.mlp_hidden)) / 1e9
        lines.append(f'{i:>5}  {b.attn:8}  {b.mlp_hidden:>5}/{dims.hidden:<5}  {g:8.4f}')
    lines.append(f'total {supernet.arch_flops(arch) / 1e9:.4f} GFLOPs (original {supernet.original_flops / 1e9:.4f})')
    return '\n'.join(lines)


class SearchTrainer(Trainer):
    """Trains the supernet's weights (AdamW, cosine) and gate logits (AdamW, constant lr)."""
    tool = 'search'
    state_format = STATE_FORMAT
    run_files = RUN_FILES

    def build_model(self):
        cfg = self.cfg
        kwargs = dict(cfg.model_kwargs)
        if cfg.img_size and kwargs.get('img_size') != cfg.img_size:
            kwargs['img_size'] = cfg.img_size
        model = create_model(cfg.model, kwargs, pretrained=cfg.pretrained and not self.resuming,
                             checkpoint=None if self.resuming else cfg.checkpoint, num_classes=self.num_classes)
        data_config = D.data_config(model, cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
        self.supernet = attach_search_space(model, theta0=cfg.theta0, alpha=cfg.alpha, model_name=cfg.model,
                                            model_kwargs={**kwargs, 'num_classes': self.num_classes})
        self.target = resolve_target(cfg, self.supernet)
        return self.supernet, data_config

    def build_optimizers(self):
        cfg = self.cfg
        self.settle_from = int(round((1 - cfg.settle_fraction) * self.total_steps))
        self.arch_lr = cfg.arch_lr if cfg.arch_lr is not None else max(PAPER_ARCH_LR, ARCH_LR_REACH / self.total_steps)
        return {
            'weights': create_optimizer_v2(weight_param_groups(self.supernet, cfg.weight_decay), opt='adamw',
                                           lr=self.lr, weight_decay=cfg.weight_decay),
            'arch': create_optimizer_v2(self.supernet.gate_parameters(), opt='adamw', lr=self.arch_lr, weight_decay=0.0),
        }

    def banner(self) -> str:
        return (f', arch lr {self.arch_lr:.3g}; original {self.supernet.original_flops / 1e9:.4f} GFLOPs, '
                f'target {self.target:.4f}')

    def resolved_config(self) -> Dict[str, Any]:
        return {**super().resolved_config(), 'arch_lr': self.arch_lr, 'target_gflops': self.target, 'target_ratio': None}

    def compute_loss(self, x, y):
        with autocast(self.device, self.cfg.amp):
            ce = self.criterion(self.net(x), y)
        gflops = self.supernet.flops()
        pen = penalty(gflops, self.target, self.cfg.flops_loss)
        loss = ce.float() + self.cfg.loss_lambda * pen
        return loss, {'ce': ce.detach(), 'penalty': pen.detach(), 'gflops': gflops.detach(), 'target': self.target}

    def before_optimizer_step(self) -> None:
        if self.global_step >= self.settle_from:
            for slot in self.supernet.attn_slots:      # AdamW skips parameters without a gradient
                slot.gate_logits.grad = None

    def model_state(self) -> Dict[str, Any]:
        return {'supernet': supernet_record(self.supernet), 'target_gflops': self.target}

    def load_model_state(self, state: Dict[str, Any]) -> None:
        try:
            self.supernet.load_state_dict(state['supernet']['state_dict'])
        except RuntimeError as e:
            raise CheckpointError(f'resume checkpoint does not fit the model: {str(e).splitlines()[0]}') from None

    def evaluate(self, loader) -> Dict[str, float]:
        """The supernet under its deterministic gates, pinned so that only the chosen ops run."""
        self.supernet.pin_current()
        try:
            return super().evaluate(loader)
        finally:
            self.supernet.unpin()

    def end_epoch(self, metrics: Dict[str, float], eval_loader) -> Dict[str, Any]:
        arch = self.supernet.architecture()
        if self.dist.main:
            tqdm.write(arch_table(self.supernet, arch) + f'\nval top-1 {metrics["top1"]:.2f}%  top-5 {metrics["top5"]:.2f}%',
                       file=sys.stderr)
            arch.save(os.path.join(self.out, 'arch.yaml'))
        return {'gflops': self.supernet.arch_flops(arch) / 1e9, 'target': self.target, 'arch': arch.to_dict()}

    def finish(self) -> None:
        arch = self.supernet.architecture()
        achieved = self.supernet.arch_flops(arch) / 1e9
        if not self.dist.main:
            return
        arch.save(os.path.join(self.out, 'arch.yaml'))
        atomic_save({
            'format': SEARCH_FORMAT, 'version': 1,
            'supernet': supernet_record(self.supernet),
            'arch': arch.to_dict(), 'kept': self.supernet.kept_units(),
            'data_config': self.data_config, 'classes': list(self.classes),
            'source': {'pretrained': self.cfg.pretrained, 'checkpoint': self.cfg.checkpoint},
            'target_gflops': self.target, 'achieved_gflops': achieved,
            'original_gflops': self.supernet.original_flops / 1e9,
            'config': self.resolved_config(),
        }, os.path.join(self.out, 'search-final.pth'))
        off = (achieved - self.target) / self.target
        print(f'search: done, {achieved:.4f} GFLOPs for a target of {self.target:.4f} ({off:+.1%}); '
              f'wrote {os.path.join(self.out, "search-final.pth")}', file=sys.stderr)
        if abs(off) > 0.05:
            print(f'search: warning: the searched architecture is {off:+.1%} off the FLOPs target; '
                  'search longer, or raise --loss-lambda or --arch-lr', file=sys.stderr)


def run_search(cfg: SearchConfig) -> SuperNet:
    """Run (or resume, with ``cfg.resume``) a search; returns the searched supernet."""
    state = None
    if cfg.resume:
        state = load_file(cfg.resume, STATE_FORMAT)
        cfg = resume_config(SearchConfig, cfg, state)
    trainer = SearchTrainer(cfg, state)
    trainer.run()
    return trainer.supernet


def main(argv: Optional[Sequence[str]] = None) -> int:
    run_search(parse_config(SearchConfig, 'search.py', 'Search a hybrid conv/attention architecture under a FLOPs budget.', argv))
    return 0
