"""Importance of a supernet's gates, to start the search from a ranking.

With every gate logit at theta0, the order in which gates close is set by noise until the task
gradient has had time to tell them apart, and in a short search it never does: the
straight-through gradients of sampled gates are noisy. Starting the logits from a ranking by an
importance score per FLOP makes the order meaningful from the first step; the search refines it.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .supernet import SuperNet

MSA_GATE = 2      # of a block's (conv1x1, conv3x3, msa) gates, the one that decides msa against conv3x3


class GateScores(NamedTuple):
    """Fisher scores per gate: each block's attention gates (3; zeros in a space without ops), its
    head gates (None in a space without heads) and its MLP units."""
    attn: List[torch.Tensor]
    heads: List[Optional[torch.Tensor]]
    mlp: List[torch.Tensor]


def gate_fisher(supernet: SuperNet, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy,
                ) -> GateScores:
    """First-order Taylor (Fisher) scores of every gate at all gates open: the sum over minibatches of
    (dL/dg)^2. A gate whose closing would not change the loss scores 0. Measured in eval mode with
    the gates given as values, so nothing is sampled."""
    was_training = supernet.training
    supernet.eval()
    # (slot, attribute the values go to, shape)
    where = []
    for a, m in zip(supernet.attn_slots, supernet.mlp_slots):
        if a.op_gates:
            where.append((a, 'gate_values', a.gate_logits.shape))
        if a.head_logits is not None:
            where.append((a, 'head_values', a.head_logits.shape))
        where.append((m, 'gate_values', m.gate_logits.shape))
    ref = supernet.mlp_slots[0].gate_logits
    values = [torch.ones(shape, device=ref.device, dtype=ref.dtype, requires_grad=True) for _, _, shape in where]
    scores = [torch.zeros(shape, device=ref.device, dtype=torch.float32) for _, _, shape in where]
    try:
        for (slot, attr, _), v in zip(where, values):
            setattr(slot, attr, v)
        for x, y in batches:
            for sc, g in zip(scores, torch.autograd.grad(loss_fn(supernet(x), y), values)):
                sc += g.float() ** 2
    finally:
        for slot, attr, _ in where:
            setattr(slot, attr, None)
        supernet.train(was_training)
    by_slot = iter(zip(where, scores))
    attn, heads, mlp = [], [], []
    for a, _ in zip(supernet.attn_slots, supernet.mlp_slots):
        attn.append(next(by_slot)[1] if a.op_gates else torch.zeros(3, device=ref.device))
        heads.append(next(by_slot)[1] if a.head_logits is not None else None)
        mlp.append(next(by_slot)[1])
    return GateScores(attn, heads, mlp)


def ranked_logits(scores: Sequence[torch.Tensor], theta0: float, spread: float) -> List[torch.Tensor]:
    """Gate logits spread evenly over [theta0 - spread, theta0 + spread] by the global rank of
    each score (lowest score lowest): the mean stays theta0, and ranks rather than raw scores so
    that one outlier cannot squash the rest together."""
    flat = torch.cat([s.flatten() for s in scores])
    rank = flat.argsort().argsort().to(torch.float32) / max(1, flat.numel() - 1)
    return list((theta0 + spread * (2 * rank - 1)).split([s.numel() for s in scores]))


def init_from_importance(supernet: SuperNet, scores: GateScores, spread: float) -> None:
    """Rank every MLP unit, every head and every block's msa gate together by Fisher score per FLOP
    and set their logits by rank around theta0; the cheaper attention gates, which decide nothing
    while msa is open, keep theta0.

    At a trained model the first-order loss change of closing a gate averages out and the change is
    second order, about half its Fisher score, so the score itself (not its square root) is the
    loss per FLOP, and it adds up over parts: a head is worth its 64 channels' scores together.
    Ranked by sqrt(Fisher) per FLOP, a head costing as much as 150 MLP units would have to score
    150^2 times one unit, not 150 times, to be kept before them, so heads closed too early
    (an untrained prune of the benchmark's ViT to 0.45 of its FLOPs: 83.6% against 87.5%)."""
    costs = iter(supernet.gate_costs())        # in gate_parameters() order: ops, heads, MLP per block
    groups: List[Tuple[torch.Tensor, torch.Tensor]] = []       # (logits to set, score per FLOP)
    msa_scores, msa_costs, msa_params = [], [], []
    for a, m, att, head, mlp in zip(supernet.attn_slots, supernet.mlp_slots, scores.attn, scores.heads, scores.mlp):
        if supernet.space.ops:
            msa_scores.append(att[MSA_GATE])
            msa_costs.append(next(costs)[MSA_GATE])
            msa_params.append(a)
        if a.head_logits is not None:
            groups.append((a.head_logits, head / next(costs)))
        groups.append((m.gate_logits, mlp / next(costs)))
    per_flop = [g for _, g in groups]
    if msa_params:
        per_flop.insert(0, torch.stack(msa_scores) / torch.stack(msa_costs))
    logits = ranked_logits(per_flop, supernet.theta0, spread)
    with torch.no_grad():
        if msa_params:
            for a, value in zip(msa_params, logits.pop(0)):
                a.gate_logits[MSA_GATE] = value
        for (param, _), value in zip(groups, logits):
            param.copy_(value.to(param))
