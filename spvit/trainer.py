"""The training loop that search and fine-tuning share.

A ``Trainer`` builds and checks everything before it writes a file, locks its run directory, then
runs epochs of steps with progress bars (plain lines when stderr is not a terminal), a jsonl log,
atomic resumable checkpoints (exact to the step), SIGINT/SIGTERM handling, a non-finite-loss stop,
AMP and torchrun/DDP. Subclasses say what model they train, what the loss is, which optimisers step
and what files the run leaves behind.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, Optional, Tuple, Type, TypeVar

import torch
import torch.nn as nn
import yaml
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2
from torch.nn.parallel import DistributedDataParallel

from . import data as D
from .checkpoint import atomic_save, atomic_write_text
from .config import ConfigError, given_keys, to_dict
from .rundir import RunLock, check_fresh_output_dir, remove_leftover_temps, trim_log
from .runtime import (Interrupted, JsonlLog, StopSignal, TrainingError, evaluate, grad_scaler, progress, use_compile,
                      resolve_device, rng_state, seed_everything, set_rng_state, setup_distributed)

LAST = 'checkpoint-last.pth'
C = TypeVar('C')


# A resumed run continues as it was started: these keys say where and how far it runs now and come
# from the new command line; the data loader's workers may change too (reported: the augmentation
# draws then differ from an uninterrupted run). Any other key given with --resume must match the run.
RESUME_FROM_COMMAND = ('resume', 'output_dir', 'data_dir', 'device', 'max_steps')
RESUME_REPORTED = ('workers',)


def resume_config(cls: Type[C], cfg: C, state: Dict[str, Any]) -> C:
    """The saved run's config with the new command line's place, device and reach; a key given now
    that contradicts the run is refused (one line), rather than silently dropped."""
    names = {f.name for f in dataclasses.fields(cls)}
    saved = cls(**{k: v for k, v in state['config'].items() if k in names})
    started = [state['config'], state.get('given_config', {})]    # resolved, and as first given
    given = given_keys(cfg)
    conflicts = [k for k in sorted(given - set(RESUME_FROM_COMMAND + RESUME_REPORTED))
                 if k in names and all(getattr(cfg, k) != c.get(k, getattr(saved, k)) for c in started)]
    if conflicts:
        k = conflicts[0]
        more = f' (and {", ".join(flag(c) for c in conflicts[1:])})' if conflicts[1:] else ''
        raise ConfigError(f'{flag(k)} {getattr(cfg, k)} differs from the resumed run\'s {getattr(saved, k)}{more}; '
                          'a resumed run keeps its settings: start a new run to change them')
    changes = {k: getattr(cfg, k) for k in RESUME_FROM_COMMAND + RESUME_REPORTED if k in given}
    for k in RESUME_REPORTED:
        if k in changes and changes[k] != getattr(saved, k):
            print(f'resume: {flag(k)} {changes[k]} instead of the run\'s {getattr(saved, k)}: the data augmentation draws '
                  'differ from an uninterrupted run', file=sys.stderr)
    changes.setdefault('output_dir', os.path.dirname(os.path.abspath(cfg.resume)))
    return dataclasses.replace(saved, **{'resume': cfg.resume, 'max_steps': cfg.max_steps, 'device': cfg.device, **changes})


def flag(key: str) -> str:
    return '--' + key.replace('_', '-')


def same_dir(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def lr_for_batch(lr: float, batch_size: int, world_size: int) -> float:
    """DeiT's linear scaling: ``lr`` is for a global batch of 512."""
    return lr * batch_size * world_size / 512


class Trainer:
    tool = 'train'
    state_format = 'spvit-train-state'
    last_name = LAST
    run_files: Tuple[str, ...] = (LAST, 'log.jsonl', 'config.yaml')

    def __init__(self, cfg: Any, state: Optional[Dict[str, Any]] = None) -> None:
        self.cfg = cfg
        self.dist = setup_distributed(cfg.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        self.device = resolve_device(cfg.device, self.dist)
        for key in ('data_dir', 'output_dir'):
            if not getattr(cfg, key):
                raise ConfigError(f'no --{key.replace("_", "-")} given')
        if cfg.batch_size < 1 or cfg.epochs < 1:
            raise ConfigError('--batch-size and --epochs must be at least 1')
        self.sched_epochs = cfg.sched_epochs or cfg.sched_offset + cfg.epochs
        if cfg.sched_offset + cfg.epochs > self.sched_epochs:
            raise ConfigError(f'--sched-offset {cfg.sched_offset} plus --epochs {cfg.epochs} is past the end of '
                              f'--sched-epochs {self.sched_epochs}')
        # a new run, or a resumed one continued in another directory: never over another run's files
        self.fresh_dir = state is None or not same_dir(cfg.output_dir, os.path.dirname(os.path.abspath(cfg.resume)))
        if self.fresh_dir:
            check_fresh_output_dir(cfg.output_dir, self.run_files, self.last_name)
        self.given_config = to_dict(cfg) if state is None else state.get('given_config', state['config'])
        self.resuming = state is not None
        self.classes = D.select_classes(cfg.data_dir, cfg.subset_classes, cfg.class_list)
        self.num_classes = cfg.num_classes or len(self.classes)
        if self.num_classes < len(self.classes):
            raise ConfigError(f'--num-classes {self.num_classes} is fewer than the {len(self.classes)} classes of the data')
        seed_everything(cfg.seed)
        self.model, self.data_config = self.build_model()

        d = self.dist
        self.train_set = D.image_folder(os.path.join(cfg.data_dir, 'train'), self.classes, cfg.samples_per_class,
                                        D.train_transform(self.data_config, cfg.auto_augment, cfg.color_jitter, cfg.reprob,
                                                          scale=cfg.scale))
        self.val_set = D.image_folder(os.path.join(cfg.data_dir, 'val'), self.classes, None,
                                      D.eval_transform(self.data_config))
        self.sampler = D.ResumableSampler(self.train_set, d.world_size, d.rank, cfg.seed)
        self.steps_per_epoch = len(self.sampler) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ConfigError(f'{len(self.sampler)} training images per process is less than one batch of {cfg.batch_size}')
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.mixup = D.mixup(cfg.mixup, cfg.cutmix, cfg.smoothing, self.num_classes)
        if self.mixup is not None:
            if cfg.batch_size % 2:
                raise ConfigError('mixup/cutmix need an even --batch-size')
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

        self.model.to(self.device)
        self.lr = lr_for_batch(cfg.lr, cfg.batch_size, d.world_size)
        self.optimizers = self.build_optimizers()
        self.sched, _ = create_scheduler_v2(self.optimizers['weights'], sched='cosine', num_epochs=self.sched_epochs,
                                            min_lr=cfg.min_lr, warmup_epochs=cfg.warmup_epochs,
                                            warmup_lr=cfg.warmup_lr, step_on_epochs=False,
                                            updates_per_epoch=self.steps_per_epoch)
        # where in the schedule step 0 sits: past the epochs a search already ran
        self.sched_start = cfg.sched_offset * self.steps_per_epoch
        self.sched.step_update(self.sched_start)
        self.scaler = grad_scaler(self.device, cfg.amp)
        self.net: nn.Module = self.model
        if d.enabled:
            self.net = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == 'cuda' else None)
        # the training forward only: evaluation runs self.model eagerly (pinned supernets, EMA)
        self.compiled = use_compile(cfg.compile, self.device)
        if self.compiled:
            self.net = torch.compile(self.net, mode=cfg.compile_mode)
        self.after_setup()
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        if state is not None:
            self._load_state(state)
        self.out = cfg.output_dir
        self.log = JsonlLog(os.path.join(self.out, 'log.jsonl'), d.main)

    # --- what subclasses provide ---

    def build_model(self) -> Tuple[nn.Module, Dict[str, Any]]:
        """The module to train (on CPU) and its data config."""
        raise NotImplementedError

    def build_optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        """Named optimisers; 'weights' gets the cosine schedule."""
        raise NotImplementedError

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Total loss and the parts to log (numbers or 0-d tensors, read only at log steps)."""
        raise NotImplementedError

    def model_state(self) -> Dict[str, Any]:
        raise NotImplementedError

    def load_model_state(self, state: Dict[str, Any]) -> None:
        raise NotImplementedError

    def after_setup(self) -> None:
        """Called once the model is on its device and wrapped for DDP (``self.net``)."""

    def before_optimizer_step(self) -> None:
        """Called after backward (and gradient clipping), before the optimisers step."""

    def after_optimizer_step(self) -> None:
        """Called after every optimiser step."""

    def log_fields(self) -> Dict[str, Any]:
        """Extra fields of each step record in log.jsonl (read only at log steps)."""
        return {}

    def end_epoch(self, metrics: Dict[str, float], eval_loader) -> Dict[str, Any]:
        """Epoch-end work after evaluation; returns extra fields for the epoch log record."""
        return {}

    def evaluate(self, loader) -> Dict[str, float]:
        return evaluate(self.model, loader, self.device, self.dist, self.cfg.amp)

    def finish(self) -> None:
        """Write the run's final files."""

    def banner(self) -> str:
        return ''

    def resolved_config(self) -> Dict[str, Any]:
        return {**to_dict(self.cfg), 'resume': None}

    # --- state ---

    def _state(self) -> Dict[str, Any]:
        return {
            'format': self.state_format, 'version': 1, **self.model_state(),
            'optimizers': {k: o.state_dict() for k, o in self.optimizers.items()},
            'sched': self.sched.state_dict(), 'scaler': self.scaler.state_dict() if self.scaler else None,
            'epoch': self.epoch, 'step_in_epoch': self.step_in_epoch, 'global_step': self.global_step,
            'rng': rng_state(), 'config': self.resolved_config(), 'given_config': self.given_config,
            'classes': list(self.classes),
            'data_config': self.data_config,
        }

    def _load_state(self, state: Dict[str, Any]) -> None:
        if list(state['classes']) != list(self.classes):
            raise ConfigError('the resumed run was made on other classes than --data-dir now gives')
        self.load_model_state(state)
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state['optimizers'][k])
        self.sched.load_state_dict(state['sched'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.epoch, self.step_in_epoch, self.global_step = state['epoch'], state['step_in_epoch'], state['global_step']
        set_rng_state(state['rng'])

    def save_last(self) -> None:
        if self.dist.main:
            atomic_save(self._state(), os.path.join(self.out, self.last_name))

    def write_text(self, name: str, text: str) -> None:
        if self.dist.main:
            atomic_write_text(os.path.join(self.out, name), text)

    # --- loop ---

    def run(self) -> nn.Module:
        self.lock = RunLock(self.out)
        try:
            self._run()
        finally:
            self.lock.release()
        return self.model

    def _run(self) -> None:
        cfg, d = self.cfg, self.dist
        if d.main:
            self._claim_output_dir()
            self.write_text('config.yaml', yaml.safe_dump(self.resolved_config(), sort_keys=False))
            print(f'{self.tool}: {getattr(self, "model_name", cfg.model)}, {len(self.classes)} classes, {len(self.train_set)} train / '
                  f'{len(self.val_set)} val images, {self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs; '
                  f'lr {self.lr:.3g}{self.banner()}', file=sys.stderr)
        eval_loader = D.eval_loader(self.val_set, cfg.eval_batch_size or 2 * cfg.batch_size, cfg.workers,
                                    d.world_size, d.rank)
        with StopSignal() as stop:
            try:
                while self.epoch < cfg.epochs and not self.reached_max_steps():
                    self._train_epoch(stop)
                    if self.step_in_epoch >= self.steps_per_epoch:     # the epoch ran to its end
                        self._end_epoch(eval_loader)
            except (D.DataError, RuntimeError):
                # A signal to the whole process group (Slurm, systemd, kill -- -PGID) also kills the
                # data workers, and the loader fails before the loop sees the signal: the state is
                # that of the last finished step, so save it and stop as the signal asks.
                if not stop.code:
                    raise
                self.save_last()
                raise Interrupted(stop.code) from None
        self.save_last()
        self.finish()

    def _claim_output_dir(self) -> None:
        """Lock the run directory for this run's life, then (under the lock, so that no live run is
        touched) clear what a killed run left: half-written temp files, the early files of a run
        that never saved, or log records past the checkpoint being resumed."""
        os.makedirs(self.out, exist_ok=True)
        self.lock.acquire()
        remove_leftover_temps(self.out, self.run_files)
        if self.fresh_dir:
            for path in check_fresh_output_dir(self.out, self.run_files, self.last_name):
                os.remove(path)
        else:
            trim_log(self.log.path, self.global_step)

    def reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.global_step >= self.cfg.max_steps

    def _train_epoch(self, stop: StopSignal) -> None:
        cfg, d = self.cfg, self.dist
        self.sampler.set_epoch(self.epoch, self.step_in_epoch * cfg.batch_size)
        loader = D.train_loader(self.train_set, cfg.batch_size, cfg.workers, self.sampler, cfg.seed + self.epoch)
        self.net.train()
        bar = progress(self.steps_per_epoch, self.step_in_epoch, f'{self.tool} {self.epoch + 1}/{cfg.epochs}', d.main)
        try:
            for x, y in D.readable(loader):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                if self.mixup is not None:
                    x, y = self.mixup(x, y)
                loss, parts = self.compute_loss(x, y)
                flags = torch.tensor([float(stop.code), float(not torch.isfinite(loss))], device=self.device)
                if d.enabled:
                    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                if flags[1] > 0:
                    last = os.path.join(self.out, self.last_name)
                    saved = (f'the last good state is {last}' if os.path.exists(last) else
                             'no state was saved yet (lower --lr, or add --clip-grad)')
                    raise TrainingError(f'non-finite loss at epoch {self.epoch + 1}, step {self.global_step + 1}; {saved}')
                self._step(loss)
                self.step_in_epoch += 1
                self.global_step += 1
                self.sched.step_update(self.sched_start + self.global_step)
                bar.update(1)
                if (self.global_step % cfg.log_every == 0 or self.step_in_epoch == self.steps_per_epoch
                        or self.reached_max_steps()):
                    rec = {'loss': loss.item(), **{k: float(v) for k, v in parts.items()}}
                    bar.set_postfix({k: f'{v:.4g}' for k, v in rec.items()})
                    lrs = {('lr' if k == 'weights' else f'{k}_lr'): o.param_groups[0]['lr'] for k, o in self.optimizers.items()}
                    self.log.write(kind='step', epoch=self.epoch, step=self.global_step, **rec, **lrs, **self.log_fields())
                if flags[0] > 0:
                    self.save_last()
                    raise Interrupted(int(flags[0].item()))
                if cfg.ckpt_every and self.global_step % cfg.ckpt_every == 0:
                    self.save_last()
                if self.reached_max_steps():
                    break
        finally:
            bar.close()

    def _step(self, loss: torch.Tensor) -> None:
        opts = list(self.optimizers.values())
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizers['weights'])
        else:
            loss.backward()
        if self.cfg.clip_grad:
            params = [p for g in self.optimizers['weights'].param_groups for p in g['params']]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad)
        self.before_optimizer_step()
        for opt in opts:
            if self.scaler is not None:
                self.scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.update()
        self.after_optimizer_step()

    def _end_epoch(self, eval_loader) -> None:
        metrics = self.evaluate(eval_loader)
        extra = self.end_epoch(metrics, eval_loader)
        self.log.write(kind='epoch', epoch=self.epoch, step=self.global_step, val_top1=metrics['top1'],
                       val_top5=metrics['top5'], val_loss=metrics['loss'], **extra)
        self.epoch += 1
        self.step_in_epoch = 0
        self.save_last()
