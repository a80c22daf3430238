"""Importance of the hidden units of a supernet's MLPs, to start the search from a ranking.

With every gate logit at theta0, the order in which units close is set by noise until the task
gradient has had time to tell them apart. Starting the logits from a ranking by an importance
score makes the order meaningful from the first step; the search then refines it.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn

from .supernet import SuperNet


def unit_fisher(supernet: SuperNet, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
                ) -> List[torch.Tensor]:
    """First-order Taylor (Fisher) score of every hidden unit: the sum over minibatches of
    (dL/dg_j)^2, the squared gradient of the loss in the unit's gate at g = 1. A unit whose
    removal would not change the loss scores 0; scores are comparable across blocks.

    The gradient in a gate that scales fc2's column j is sum_i W2[i, j] dL/dW2[i, j], so one
    backward through the unpruned network (eval mode, every op msa) gives all of them.
    """
    was_training = supernet.training
    supernet.pin(supernet.uniform_arch('msa'), [torch.arange(b.hidden) for b in supernet.block_dims])
    supernet.eval()
    fc2 = [m.fc2.weight for m in supernet.mlp_slots]
    scores = [torch.zeros(w.shape[1], device=w.device) for w in fc2]
    try:
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(supernet(x), y), fc2)
            for s, w, g in zip(scores, fc2, grads):
                s += (w.detach() * g).sum(0).float() ** 2
    finally:
        supernet.unpin()
        supernet.train(was_training)
    return scores


def ranked_logits(scores: Sequence[torch.Tensor], theta0: float, spread: float) -> List[torch.Tensor]:
    """Gate logits spread evenly over [theta0 - spread, theta0 + spread] by the global rank of
    each unit's score (lowest score lowest): the mean stays theta0, ranks rather than raw scores
    so one outlier cannot squash the rest together."""
    flat = torch.cat([s.flatten() for s in scores])
    rank = flat.argsort().argsort().to(torch.float32) / max(1, flat.numel() - 1)
    return list((theta0 + spread * (2 * rank - 1)).split([s.numel() for s in scores]))


def init_from_importance(supernet: SuperNet, scores: Sequence[torch.Tensor], spread: float) -> None:
    """Set every MLP gate logit from ``scores`` (see ``ranked_logits``) around the supernet's theta0."""
    with torch.no_grad():
        for m, logits in zip(supernet.mlp_slots, ranked_logits(scores, supernet.theta0, spread)):
            m.gate_logits.copy_(logits.to(m.gate_logits))
