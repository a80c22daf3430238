"""Binary gates: relaxed-Bernoulli samples with straight-through gradients in training,
thresholded logits in eval, and a straight-through surrogate for the FLOPs penalty."""
from __future__ import annotations

import torch

_TEMPERATURE = 1.0


def _straight_through(soft: torch.Tensor) -> torch.Tensor:
    """Forward the hard 0/1 value, backward the gradient of ``soft``."""
    hard = (soft > 0.5).to(soft.dtype)
    return hard + (soft - soft.detach())   # exactly 0/1 in value


def sample_gates(logits: torch.Tensor, training: bool, noise: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Gate values for the forward pass: sampled in training, deterministic (sigmoid > 0.5) in eval.

    A training sample is relaxed Bernoulli, sigmoid((logits + noise * L) / T) with L logistic,
    forwarded as 0/1: a gate is on with probability sigmoid(logits / noise) (noise 1: the paper).
    With noise 0 the forward is the eval gate and only the gradient is relaxed. The logistic
    sample is drawn whatever the noise, so that ``noise`` can be a tensor that changes every step
    without a branch on its value (a compiled step then needs no recompilation and no host sync).
    """
    if not training:
        return (logits > 0).to(logits.dtype)
    u = torch.rand_like(logits).clamp(torch.finfo(logits.dtype).tiny, 1 - torch.finfo(logits.dtype).eps)
    logits = logits + noise * (u.log() - (-u).log1p())
    return _straight_through(torch.sigmoid(logits / _TEMPERATURE))


def deterministic_gates(logits: torch.Tensor) -> torch.Tensor:
    """Gate values for the FLOPs penalty: hard threshold forward, sigmoid gradient backward."""
    return _straight_through(torch.sigmoid(logits))


def detach_cheaper(gates: torch.Tensor) -> torch.Tensor:
    """Detach each cheaper attention gate while a more expensive op is selected.

    g1 is detached while I2 = g1 g2 is on (conv3x3 or msa), g2 while I3 = g1 g2 g3 is on (msa).
    The cheap gates then learn only while they decide the op: with MSA open, neither the task
    loss nor the FLOPs penalty moves the conv gates, and a block is pruned one step at a time
    (msa -> conv3x3 -> conv1x1 -> skip) instead of all gates racing to zero together.
    """
    on = torch.cumprod(gates.detach(), 0) > 0.5
    later_on = torch.stack([on[1], on[2], torch.zeros_like(on[2])])
    return torch.where(later_on, gates.detach(), gates)


def attention_gates(logits: torch.Tensor, training: bool, noise: float = 1.0) -> torch.Tensor:
    """The three cumulative attention gates (conv1x1, conv3x3, msa) of one block: sampled with
    the detach rule in training, thresholded in eval."""
    g = sample_gates(logits, training, noise)
    return detach_cheaper(g) if training else g


def penalty_attention_gates(logits: torch.Tensor) -> torch.Tensor:
    """The attention gates as the FLOPs penalty sees them: deterministic, straight-through,
    with the same detach rule as in training."""
    return detach_cheaper(deterministic_gates(logits))


def hold_conv3x3_open(gates: torch.Tensor) -> torch.Tensor:
    """The gates of a block whose conv3x3 is left out: its gate is held open (1, no gradient), so
    closing msa lands on the conv3x3 state, which such a block computes and counts as conv1x1."""
    return torch.stack([gates[0], torch.ones_like(gates[1]), gates[2]])


def attention_coefficients(gates: torch.Tensor) -> torch.Tensor:
    """Branch weights (msa, conv3x3, conv1x1) from the three gates: I = cumprod(g),
    msa = I3, conv3x3 = I2 (1 - I3), conv1x1 = I1 (1 - I2) (1 - I3)."""
    i1, i2, i3 = torch.cumprod(gates, 0).unbind(0)
    return torch.stack([i3, i2 * (1 - i3), i1 * (1 - i2) * (1 - i3)])
