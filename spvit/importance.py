"""Importance of a supernet's gates, to start the search from a ranking.

With every gate logit at theta0, the order in which gates close is set by noise until the task
gradient has had time to tell them apart, and in a short search it never does: the
straight-through gradients of sampled gates are noisy. Starting the logits from a ranking by an
importance score per FLOP makes the order meaningful from the first step; the search refines it.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn

from .supernet import SuperNet

MSA_GATE = 2      # of a block's (conv1x1, conv3x3, msa) gates, the one that decides msa against conv3x3


def gate_fisher(supernet: SuperNet, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
                ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """First-order Taylor (Fisher) scores of every gate at all gates open: the sum over minibatches of
    (dL/dg)^2. A gate whose closing would not change the loss scores 0. Returns the attention
    gates' scores (3 per block) and the MLP units' (one per hidden unit). Measured in eval mode
    with the gates given as values, so nothing is sampled."""
    was_training = supernet.training
    supernet.eval()
    slots = [s for pair in zip(supernet.attn_slots, supernet.mlp_slots) for s in pair]
    values = [torch.ones_like(s.gate_logits, requires_grad=True) for s in slots]
    scores = [torch.zeros_like(v, dtype=torch.float32) for v in values]
    try:
        for s, v in zip(slots, values):
            s.gate_values = v
        for x, y in batches:
            for sc, g in zip(scores, torch.autograd.grad(loss_fn(supernet(x), y), values)):
                sc += g.float() ** 2
    finally:
        for s in slots:
            s.gate_values = None
        supernet.train(was_training)
    return scores[0::2], scores[1::2]


def ranked_logits(scores: Sequence[torch.Tensor], theta0: float, spread: float) -> List[torch.Tensor]:
    """Gate logits spread evenly over [theta0 - spread, theta0 + spread] by the global rank of
    each score (lowest score lowest): the mean stays theta0, and ranks rather than raw scores so
    that one outlier cannot squash the rest together."""
    flat = torch.cat([s.flatten() for s in scores])
    rank = flat.argsort().argsort().to(torch.float32) / max(1, flat.numel() - 1)
    return list((theta0 + spread * (2 * rank - 1)).split([s.numel() for s in scores]))


def init_from_importance(supernet: SuperNet, attn_scores: Sequence[torch.Tensor], mlp_scores: Sequence[torch.Tensor],
                         spread: float) -> None:
    """Rank every MLP unit and every block's msa gate together by sqrt(Fisher) per FLOP (the loss
    change per FLOP its closing would cost) and set their logits by rank around theta0; the cheaper
    attention gates, which decide nothing while msa is open, keep theta0."""
    costs = supernet.gate_costs()
    per_flop = [torch.stack([a[MSA_GATE] for a in attn_scores]).sqrt() / torch.stack([c[MSA_GATE] for c in costs[0::2]])]
    per_flop += [s.sqrt() / c for s, c in zip(mlp_scores, costs[1::2])]
    logits = ranked_logits(per_flop, supernet.theta0, spread)
    with torch.no_grad():
        for a, value in zip(supernet.attn_slots, logits[0]):
            a.gate_logits[MSA_GATE] = value
        for m, value in zip(supernet.mlp_slots, logits[1:]):
            m.gate_logits.copy_(value.to(m.gate_logits))
