"""The search: train gates and weights of a supernet together under a FLOPs penalty.

``run_search(cfg)`` is what ``tools/search.py`` calls; it validates everything it can before it
writes a file, keeps ``checkpoint-last.pth`` resumable to the exact step, and leaves
``search-final.pth`` for ``tools/export.py``.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import yaml
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import data as D
from .arch import Architecture
from .checkpoint import atomic_save, load_file, supernet_record
from .cli import ArgumentParser
from .config import ConfigError, add_config_arguments, field, resolve, to_dict
from .errors import SpvitError
from .models import create_model
from .options import DataOptions, ModelOptions, TrainOptions
from .runtime import (Dist, Interrupted, JsonlLog, StopSignal, TrainingError, autocast, evaluate, grad_scaler,
                      resolve_device, rng_state, seed_everything, set_rng_state, setup_distributed)
from .supernet import SuperNet, attach_search_space

SEARCH_FORMAT = 'spvit-search'
STATE_FORMAT = 'spvit-search-state'
RUN_FILES = ('checkpoint-last.pth', 'search-final.pth', 'log.jsonl', 'config.yaml', 'arch.yaml')

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


class _Run:
    """One search run: everything built and checked up front, then the loop."""

    def __init__(self, cfg: SearchConfig, state: Optional[Dict[str, Any]] = None) -> None:
        self.cfg = cfg
        self.dist = setup_distributed(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        self.device = resolve_device(cfg.device, self.dist)
        if not cfg.data_dir:
            raise ConfigError('no --data-dir given')
        if not cfg.output_dir:
            raise ConfigError('no --output-dir given')
        if cfg.batch_size < 1 or cfg.epochs < 1:
            raise ConfigError('--batch-size and --epochs must be at least 1')
        if state is None:
            _check_fresh_output_dir(cfg.output_dir)
        self.classes = D.select_classes(cfg.data_dir, cfg.subset_classes, cfg.class_list)
        num_classes = cfg.num_classes or len(self.classes)
        kwargs = dict(cfg.model_kwargs)
        if cfg.img_size and kwargs.get('img_size') != cfg.img_size:
            kwargs['img_size'] = cfg.img_size
        seed_everything(cfg.seed)
        model = create_model(cfg.model, kwargs, pretrained=cfg.pretrained and state is None,
                             checkpoint=cfg.checkpoint if state is None else None, num_classes=num_classes)
        self.data_config = D.data_config(model, cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
        self.supernet = attach_search_space(model, theta0=cfg.theta0, alpha=cfg.alpha, model_name=cfg.model,
                                            model_kwargs={**kwargs, 'num_classes': num_classes})
        self.target = resolve_target(cfg, self.supernet)

        d = self.dist
        self.train_set = D.image_folder(os.path.join(cfg.data_dir, 'train'), self.classes, cfg.samples_per_class,
                                        D.train_transform(self.data_config, cfg.auto_augment, cfg.color_jitter, cfg.reprob))
        self.val_set = D.image_folder(os.path.join(cfg.data_dir, 'val'), self.classes, None,
                                      D.eval_transform(self.data_config))
        self.sampler = D.ResumableSampler(self.train_set, d.world_size, d.rank, cfg.seed)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f'{len(self.sampler)} training images per process is less than one batch of {cfg.batch_size}')
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.settle_from = int(round((1 - cfg.settle_fraction) * self.total_steps))
        self.arch_lr = cfg.arch_lr if cfg.arch_lr is not None else max(PAPER_ARCH_LR, ARCH_LR_REACH / self.total_steps)
        self.mixup = D.mixup(cfg.mixup, cfg.cutmix, cfg.smoothing, num_classes)
        if self.mixup is not None:
            if cfg.batch_size % 2:
                raise ConfigError('mixup/cutmix need an even --batch-size')
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

        self.supernet.to(self.device)
        global_batch = cfg.batch_size * d.world_size
        self.lr = cfg.lr * global_batch / 512
        self.opt_w = create_optimizer_v2(weight_param_groups(self.supernet, cfg.weight_decay), opt='adamw',
                                         lr=self.lr, weight_decay=cfg.weight_decay)
        self.opt_a = create_optimizer_v2(self.supernet.gate_parameters(), opt='adamw', lr=self.arch_lr, weight_decay=0.0)
        self.sched, _ = create_scheduler_v2(self.opt_w, sched='cosine', num_epochs=cfg.epochs, min_lr=cfg.min_lr,
                                            warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                            step_on_epochs=False, updates_per_epoch=self.steps_per_epoch)
        self.scaler = grad_scaler(self.device, cfg.amp)
        self.net: nn.Module = self.supernet
        if d.enabled:
            self.net = DistributedDataParallel(self.supernet, device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        if state is not None:
            self._load_state(state)
        self.out = cfg.output_dir
        self.log = JsonlLog(os.path.join(self.out, 'log.jsonl'), d.main)

    # --- state ---

    def _state(self) -> Dict[str, Any]:
        return {
            'format': STATE_FORMAT, 'version': 1,
            'supernet': supernet_record(self.supernet),
            'opt_w': self.opt_w.state_dict(), 'opt_a': self.opt_a.state_dict(),
            'sched': self.sched.state_dict(), 'scaler': self.scaler.state_dict() if self.scaler else None,
            'epoch': self.epoch, 'step_in_epoch': self.step_in_epoch, 'global_step': self.global_step,
            'rng': rng_state(), 'config': self._resolved_config(), 'classes': list(self.classes),
            'data_config': self.data_config, 'target_gflops': self.target,
        }

    def _load_state(self, state: Dict[str, Any]) -> None:
        try:
            self.supernet.load_state_dict(state['supernet']['state_dict'])
        except RuntimeError as e:
            raise SpvitError(f'resume checkpoint does not fit the model: {str(e).splitlines()[0]}') from None
        if list(state['classes']) != list(self.classes):
            raise SpvitError('resume checkpoint was made on other classes than --data-dir now gives')
        self.opt_w.load_state_dict(state['opt_w'])
        self.opt_a.load_state_dict(state['opt_a'])
        self.sched.load_state_dict(state['sched'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.epoch, self.step_in_epoch, self.global_step = state['epoch'], state['step_in_epoch'], state['global_step']
        set_rng_state(state['rng'])

    def _resolved_config(self) -> Dict[str, Any]:
        c = to_dict(self.cfg)
        c.update(arch_lr=self.arch_lr, target_gflops=self.target, target_ratio=None, resume=None)
        return c

    def _save_last(self) -> None:
        if self.dist.main:
            atomic_save(self._state(), os.path.join(self.out, 'checkpoint-last.pth'))

    def _write_text(self, name: str, text: str) -> None:
        if self.dist.main:
            path = os.path.join(self.out, name)
            with open(path + '.tmp', 'w') as f:
                f.write(text)
            os.replace(path + '.tmp', path)

    # --- loop ---

    def run(self) -> SuperNet:
        cfg, d = self.cfg, self.dist
        if d.main:
            os.makedirs(self.out, exist_ok=True)
            self._write_text('config.yaml', yaml.safe_dump(self._resolved_config(), sort_keys=False))
            print(f'search: {cfg.model}, {len(self.classes)} classes, {len(self.train_set)} train / {len(self.val_set)} val '
                  f'images, {self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs; original '
                  f'{self.supernet.original_flops / 1e9:.4f} GFLOPs, target {self.target:.4f}; '
                  f'lr {self.lr:.3g}, arch lr {self.arch_lr:.3g}', file=sys.stderr)
        eval_loader = D.eval_loader(self.val_set, cfg.eval_batch_size or 2 * cfg.batch_size, cfg.workers,
                                    d.world_size, d.rank)
        with StopSignal() as stop:
            while self.epoch < cfg.epochs and not self._reached_max_steps():
                self._train_epoch(stop)
                if self.step_in_epoch >= self.steps_per_epoch:     # the epoch ran to its end
                    self._end_epoch(eval_loader)
        self._finish()
        return self.supernet

    def _reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps

    def _train_epoch(self, stop: StopSignal) -> None:
        cfg, d = self.cfg, self.dist
        self.sampler.set_epoch(self.epoch, self.step_in_epoch * cfg.batch_size)
        loader = D.train_loader(self.train_set, cfg.batch_size, cfg.workers, self.sampler, cfg.seed + self.epoch)
        self.net.train()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f'search {self.epoch + 1}/{cfg.epochs}',
                   disable=not d.main, dynamic_ncols=True, leave=True)
        for x, y in loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if self.mixup is not None:
                x, y = self.mixup(x, y)
            with autocast(self.device, cfg.amp):
                ce = self.criterion(self.net(x), y)
            gflops = self.supernet.flops()
            pen = penalty(gflops, self.target, cfg.flops_loss)
            loss = ce.float() + cfg.loss_lambda * pen
            flags = torch.tensor([float(stop.code), float(not torch.isfinite(loss))], device=self.device)
            if d.enabled:
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            if flags[1] > 0:
                bar.close()
                raise TrainingError(f'non-finite loss at epoch {self.epoch + 1}, step {self.global_step + 1}; '
                                    f'the last good state is {os.path.join(self.out, "checkpoint-last.pth")}')
            self._step(loss)
            self.step_in_epoch += 1
            self.global_step += 1
            self.sched.step_update(self.global_step)
            bar.update(1)
            if (self.global_step % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch
                    or self._reached_max_steps()):
                rec = dict(kind='step', epoch=self.epoch, step=self.global_step, loss=loss.item(), ce=ce.item(),
                           penalty=pen.item(), gflops=gflops.item(), target=self.target,
                           lr=self.opt_w.param_groups[0]['lr'], arch_lr=self.opt_a.param_groups[0]['lr'])
                self.log.write(**rec)
                bar.set_postfix(loss=f'{rec["loss"]:.3f}', ce=f'{rec["ce"]:.3f}', pen=f'{rec["penalty"]:.4f}',
                                gflops=f'{rec["gflops"]:.3f}', target=f'{self.target:.3f}')
            if flags[0] > 0:
                bar.close()
                self._save_last()
                raise Interrupted(int(flags[0].item()))
            if cfg.ckpt_every and self.global_step % cfg.ckpt_every == 0:
                self._save_last()
            if self._reached_max_steps():
                break
        bar.close()

    def _step(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt_w)
        else:
            loss.backward()
        if self.cfg.clip_grad:
            params = [p for g in self.opt_w.param_groups for p in g['params']]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        if self.global_step >= self.settle_from:
            for slot in self.supernet.attn_slots:      # AdamW skips parameters without a gradient
                slot.gate_logits.grad = None
        for opt in (self.opt_w, self.opt_a):
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()

    def _end_epoch(self, eval_loader) -> None:
        arch = self.supernet.architecture()
        self.supernet.pin_current()
        metrics = evaluate(self.supernet, eval_loader, self.device, self.dist, self.cfg.amp)
        self.supernet.unpin()
        gflops = self.supernet.arch_flops(arch) / 1e9
        self.log.write(kind='epoch', epoch=self.epoch, step=self.global_step, gflops=gflops, target=self.target,
                       val_top1=metrics['top1'], val_top5=metrics['top5'], val_loss=metrics['loss'], arch=arch.to_dict())
        if self.dist.main:
            tqdm.write(arch_table(self.supernet, arch) + f'\nval top-1 {metrics["top1"]:.2f}%  top-5 {metrics["top5"]:.2f}%',
                       file=sys.stderr)
            arch.save(os.path.join(self.out, 'arch.yaml'))
        self.epoch += 1
        self.step_in_epoch = 0
        self._save_last()

    def _finish(self) -> None:
        arch = self.supernet.architecture()
        achieved = self.supernet.arch_flops(arch) / 1e9
        if self.dist.main:
            arch.save(os.path.join(self.out, 'arch.yaml'))
            self._save_last()
            atomic_save({
                'format': SEARCH_FORMAT, 'version': 1,
                'supernet': supernet_record(self.supernet),
                'arch': arch.to_dict(), 'kept': self.supernet.kept_units(),
                'data_config': self.data_config, 'classes': list(self.classes),
                'source': {'pretrained': self.cfg.pretrained, 'checkpoint': self.cfg.checkpoint},
                'target_gflops': self.target, 'achieved_gflops': achieved,
                'original_gflops': self.supernet.original_flops / 1e9,
                'config': self._resolved_config(),
            }, os.path.join(self.out, 'search-final.pth'))
            off = (achieved - self.target) / self.target
            print(f'search: done, {achieved:.4f} GFLOPs for a target of {self.target:.4f} ({off:+.1%}); '
                  f'wrote {os.path.join(self.out, "search-final.pth")}', file=sys.stderr)
            if abs(off) > 0.05:
                print(f'search: warning: the searched architecture is {off:+.1%} off the FLOPs target; '
                      'search longer, or raise --loss-lambda or --arch-lr', file=sys.stderr)
        self.final_gflops = achieved


def _check_fresh_output_dir(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f'--output-dir {path} exists and is not a directory')
    if os.path.isdir(path):
        present = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
        if present:
            raise ConfigError(f'{path} already holds a search ({", ".join(present)}); use --resume '
                              f'{os.path.join(path, "checkpoint-last.pth")} or another --output-dir')
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f'parent of --output-dir does not exist: {parent}')


def run_search(cfg: SearchConfig) -> SuperNet:
    """Run (or resume, with ``cfg.resume``) a search; returns the searched supernet."""
    state = None
    if cfg.resume:
        state = load_file(cfg.resume, STATE_FORMAT)
        saved = SearchConfig(**{k: v for k, v in state['config'].items() if k in {f.name for f in dataclasses.fields(SearchConfig)}})
        # The run continues as it was planned; only where it runs and how far may change.
        cfg = dataclasses.replace(saved, resume=cfg.resume, output_dir=cfg.output_dir or os.path.dirname(cfg.resume),
                                  data_dir=cfg.data_dir or saved.data_dir, device=cfg.device, workers=cfg.workers,
                                  max_steps=cfg.max_steps)
    return _Run(cfg, state).run()


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog='search.py', description='Search a hybrid conv/attention architecture under a FLOPs budget.')
    p.add_argument('--config', help='YAML file of config keys (flags override it)')
    add_config_arguments(p, SearchConfig)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(SearchConfig, args, args.config)
    run_search(cfg)
    return 0
