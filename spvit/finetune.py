"""Fine-tuning a pruned model (or an unpruned timm baseline), optionally distilled.

DeiT's recipe through timm (AdamW, cosine with warm-up, mixup/cutmix, label smoothing, EMA, AMP,
clipping) on the shared ``Trainer`` loop. Distillation uses timm's tasks: ``LogitDistillationTask``
(soft) and ``TokenDistillationTask`` (soft or hard, for students with a distillation head); only
DeiT's hard-label variant for students without one is added here. ``last.pth`` and ``best.pth``
are pruned checkpoints, so ``spvit.load_pruned`` and ``tools/flops.py --pruned`` read them;
``last.pth`` also carries the training state that ``--resume`` needs.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

from . import data as D
from .arch import Architecture
from .checkpoint import load_file
from .cli import parse_config
from .config import AT_LEAST_ONE, FRACTION, NON_NEGATIVE, ConfigError, field
from .distillation import distillation_task, prepare_teacher
from .errors import CheckpointError
from .compare import full_architecture
from .models import create_model, load_exactly
from .options import DataOptions, DistillOptions, ModelOptions, TrainOptions
from .pruned import PRUNED_FORMAT, PrunedModel, plain_data_config, read_pruned
from .runtime import autocast, evaluate
from .trainer import Trainer, resume_config

LAST, BEST = 'last.pth', 'best.pth'


@dataclass
class FinetuneConfig(ModelOptions, DataOptions, TrainOptions, DistillOptions):
    pruned: Optional[str] = field(None, 'exported spvit checkpoint to fine-tune (without it: the unpruned --model)')
    teacher: str = field('original', "'original' (the weights the search started from) or a checkpoint path")
    teacher_model: Optional[str] = field(None, 'timm model of a --teacher checkpoint (default: the student\'s)')
    model_ema: bool = field(False, 'keep an EMA of the weights (timm ModelEmaV3) and evaluate it too')
    model_ema_decay: float = field(0.99996, 'EMA decay', bounds=FRACTION)
    # DeiT fine-tuning defaults
    lr: float = field(5e-4, 'learning rate for a global batch of 512 (scaled linearly)', bounds=NON_NEGATIVE)
    min_lr: float = field(1e-5, 'cosine schedule floor', bounds=NON_NEGATIVE)
    warmup_epochs: int = field(5, 'linear warm-up epochs', bounds=NON_NEGATIVE)
    epochs: int = field(30, 'fine-tuning epochs (the paper: about 130 on ImageNet)', bounds=AT_LEAST_ONE)


class FinetuneTrainer(Trainer):
    tool = 'finetune'
    state_format = PRUNED_FORMAT
    last_name = LAST
    run_files = (LAST, BEST, 'log.jsonl', 'config.yaml')

    def build_model(self):
        cfg = self.cfg
        if cfg.pruned:
            pm = read_pruned(cfg.pruned)
            model, self.arch, self.kept = pm.model, pm.arch, pm.kept
            self.provenance = dict(pm.provenance)
            recorded = pm.data_config
            if model.num_classes != self.num_classes:
                if cfg.num_classes is None:
                    raise ConfigError(f'{cfg.pruned} has {model.num_classes} classes but the data has {self.num_classes}; '
                                      'pass --num-classes to re-initialise the classifier')
                model.reset_classifier(self.num_classes)
            self.model_name, self.model_kwargs = pm.arch.model, {**pm.arch.model_kwargs, 'num_classes': self.num_classes}
            self.arch = Architecture(self.model_name, pm.arch.blocks, self.model_kwargs)
        else:
            kwargs = dict(cfg.model_kwargs)
            if cfg.img_size and kwargs.get('img_size') != cfg.img_size:
                kwargs['img_size'] = cfg.img_size
            model = create_model(cfg.model, kwargs, pretrained=cfg.pretrained and not self.resuming,
                                 checkpoint=None if self.resuming else cfg.checkpoint, num_classes=self.num_classes)
            self.model_name, self.model_kwargs = cfg.model, {**kwargs, 'num_classes': self.num_classes}
            self.arch, self.kept = full_architecture(self.model_name, self.model_kwargs, model), None
            self.provenance = {'source': {'pretrained': cfg.pretrained, 'checkpoint': cfg.checkpoint}}
            recorded = None
        data_config = D.data_config(model, None, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
        if recorded:   # the pruned model's own preprocessing, unless flags say otherwise
            for key in ('interpolation', 'mean', 'std', 'crop_pct'):
                if getattr(cfg, key) is None and key in recorded:
                    data_config[key] = recorded[key]
        model.pretrained_cfg = {**(getattr(model, 'pretrained_cfg', None) or {}), **data_config}
        self.teacher = self._build_teacher(model, data_config) if cfg.distill != 'none' else None
        self.best_top1 = -1.0
        return model, data_config

    def _build_teacher(self, student: nn.Module, data_config: Dict[str, Any]) -> nn.Module:
        cfg = self.cfg
        if cfg.teacher == 'original':
            src = self.provenance.get('source') or {}
            if not src.get('pretrained') and not src.get('checkpoint'):
                raise ConfigError('--teacher original: the model did not start from pretrained weights; '
                                  'give --teacher PATH or --distill none')
            base = {k: v for k, v in self.model_kwargs.items() if k != 'num_classes'}
            teacher = create_model(self.model_name, base, pretrained=bool(src.get('pretrained')),
                                   checkpoint=src.get('checkpoint'), num_classes=self.num_classes)
        elif not os.path.isfile(cfg.teacher):
            raise CheckpointError(f'teacher checkpoint not found: {cfg.teacher}')
        elif _is_pruned(cfg.teacher):
            teacher = read_pruned(cfg.teacher).model
        else:
            name = cfg.teacher_model or self.model_name
            base = {} if cfg.teacher_model else {k: v for k, v in self.model_kwargs.items() if k != 'num_classes'}
            teacher = create_model(name, base, checkpoint=cfg.teacher, num_classes=self.num_classes)
        if getattr(teacher, 'num_classes', self.num_classes) != self.num_classes:
            raise ConfigError(f'the teacher has {teacher.num_classes} classes, the student {self.num_classes}')
        return prepare_teacher(teacher, data_config)

    def build_optimizers(self):
        return {'weights': create_optimizer_v2(self.model, opt='adamw', lr=self.lr, weight_decay=self.cfg.weight_decay)}

    def after_setup(self) -> None:
        # the model is on its device now: the EMA copy and the teacher follow it there
        self.ema = ModelEmaV3(self.model, decay=self.cfg.model_ema_decay) if self.cfg.model_ema else None
        self.task = self._distillation_task() if self.teacher is not None else None

    def _distillation_task(self) -> nn.Module:
        cfg = self.cfg
        return distillation_task(self.net, self.teacher, self.criterion, cfg.distill, cfg.distill_alpha, cfg.distill_tau,
                                 self.device, token_student=hasattr(self.model, 'set_distilled_training'))

    def compute_loss(self, x, y):
        with autocast(self.device, self.cfg.amp):
            if self.teacher is None:
                loss = self.criterion(self.net(x), y)
                return loss.float(), {}
            out = self.task(x, y)
        parts = {k: v.detach() for k, v in out.items() if k.endswith('_loss')}
        return out['loss'].float(), parts

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)

    def banner(self) -> str:
        what = f'pruned {self.cfg.pruned}' if self.cfg.pruned else 'unpruned baseline'
        return f'; {what}; distill {self.cfg.distill}'

    # --- files ---

    def pruned(self, model: nn.Module, **provenance: Any) -> PrunedModel:
        return PrunedModel(model, self.arch, self.kept, plain_data_config(self.data_config),
                           {**self.provenance, **provenance})

    def model_state(self) -> Dict[str, Any]:
        state = self.pruned(self.model).payload()
        state['ema'] = self.ema.module.state_dict() if self.ema is not None else None
        state['best_top1'] = self.best_top1
        return state

    def load_model_state(self, state: Dict[str, Any]) -> None:
        load_exactly(self.model, state['state_dict'], 'resume checkpoint')
        if self.ema is not None and state.get('ema') is not None:
            load_exactly(self.ema.module, state['ema'], 'resume checkpoint (EMA)')
        self.best_top1 = state.get('best_top1', -1.0)

    def end_epoch(self, metrics: Dict[str, float], eval_loader) -> Dict[str, Any]:
        extra: Dict[str, Any] = {}
        candidates = [(metrics['top1'], self.model, 'model')]
        if self.ema is not None:
            ema = evaluate(self.ema.module, eval_loader, self.device, self.dist, self.cfg.amp)
            extra.update(ema_top1=ema['top1'], ema_top5=ema['top5'])
            candidates.append((ema['top1'], self.ema.module, 'ema'))
        top1, module, which = max(candidates, key=lambda c: c[0])
        if top1 > self.best_top1:
            self.best_top1 = top1
            if self.dist.main:
                self.pruned(module, val_top1=top1, epoch=self.epoch + 1, weights=which).save(os.path.join(self.out, BEST))
        if self.dist.main:
            print(f'finetune: epoch {self.epoch + 1} val top-1 {metrics["top1"]:.2f}% top-5 {metrics["top5"]:.2f}%'
                  + (f' (ema {extra["ema_top1"]:.2f}%)' if self.ema is not None else '')
                  + f', best {self.best_top1:.2f}%', file=sys.stderr)
        return {**extra, 'best_top1': self.best_top1}

    def finish(self) -> None:
        if not self.dist.main:
            return
        if self.best_top1 < 0:
            print(f'finetune: stopped before the first epoch ended; {os.path.join(self.out, LAST)} holds the model',
                  file=sys.stderr)
        else:
            print(f'finetune: done, best val top-1 {self.best_top1:.2f}%; wrote {os.path.join(self.out, BEST)}',
                  file=sys.stderr)


def _is_pruned(path: str) -> bool:
    try:
        return load_file(path).get('format') == PRUNED_FORMAT
    except Exception:
        return False


def run_finetune(cfg: FinetuneConfig) -> nn.Module:
    """Run (or resume) a fine-tune; returns the fine-tuned model."""
    state = None
    if cfg.resume:
        state = load_file(cfg.resume, PRUNED_FORMAT)
        if 'optimizers' not in state:
            raise CheckpointError(f'{cfg.resume} holds no training state (resume from last.pth)')
        cfg = resume_config(FinetuneConfig, cfg, state)
    trainer = FinetuneTrainer(cfg, state)
    return trainer.run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    run_finetune(parse_config(FinetuneConfig, 'finetune.py', 'Fine-tune an exported spvit model (or an unpruned timm baseline).', argv))
    return 0
