"""Distillation from a teacher, for the fine-tune and the search: timm's tasks, plus DeiT's
hard-label variant for students without a distillation head."""
from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task.distillation import DistillationTeacher, LogitDistillationTask
from timm.task.token_distillation import TokenDistillationTask


class HardLogitDistillationTask(LogitDistillationTask):
    """DeiT's hard-label distillation for a student without a distillation head:
    (1 - alpha) * task loss + alpha * CE(student, argmax teacher)."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        student_logits = self.trainable_module(input)
        task_loss = self.criterion(student_logits, target)
        with torch.no_grad():
            teacher_logits = self.teacher(self.teacher.normalize_input(input, self.student_mean, self.student_std))
        kd_loss = F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
        return {'loss': self.task_loss_weight * task_loss + self.distill_loss_weight * kd_loss,
                'output': student_logits, 'task_loss': task_loss, 'kd_loss': kd_loss}


def prepare_teacher(teacher: nn.Module, data_config: Dict[str, Any]) -> nn.Module:
    """A frozen teacher in eval mode that sees the student's inputs as they are (same data pipeline)."""
    if hasattr(teacher, 'set_distilled_training'):
        teacher.set_distilled_training(False)
    teacher.pretrained_cfg = {**(getattr(teacher, 'pretrained_cfg', None) or {}),
                              'mean': tuple(data_config['mean']), 'std': tuple(data_config['std'])}
    teacher.requires_grad_(False)
    return teacher.eval()


def distillation_task(student: nn.Module, teacher: nn.Module, criterion: nn.Module, kind: str, alpha: float,
                      tau: float, device: torch.device, token_student: bool) -> nn.Module:
    """(1 - alpha) * task loss + alpha * distillation loss: timm's token task for students with a
    distillation token, its logit task (soft), or DeiT's hard labels."""
    common = dict(student_model=student, teacher_model=DistillationTeacher(teacher.to(device), device=device),
                  criterion=criterion, task_loss_weight=1.0 - alpha, distill_loss_weight=alpha, device=device,
                  verbose=False)
    if token_student:
        return TokenDistillationTask(distill_type=kind, temperature=tau, **common)
    if kind == 'soft':
        return LogitDistillationTask(temperature=tau, **common)
    return HardLogitDistillationTask(**common)
