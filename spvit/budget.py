"""The budget of a search: where it points at each step, and how the gates are moved to meet it.

Written for FLOPs, but nothing here knows the unit: every class takes a scalar cost and its goal
(``spvit.costs``: GFLOPs, or the latency a table predicts, in ms).

The paper adds one quadratic penalty on the distance to the final target to the loss from the
first step, and AdamW moves the gate logits. At a deep budget that penalty is many times any task
gradient, and AdamW normalises each gate's step by its own gradient history, so every logit falls
at about the learning rate per step: the gates close in lockstep, the architecture is set by
noise, and the FLOPs overshoot. ``gate_update='adamw'`` keeps that form (``penalty`` below).

The default, ``per-flop``, keeps the task gradient for ranking and meets the budget with a
controller instead:

- ``BudgetSchedule``: the target falls linearly from the original FLOPs to the goal over the first
  ``ramp`` fraction of the steps, so that a few gates close at a time;
- ``BudgetDrive``: a Lagrange multiplier on the FLOPs constraint, updated as a bounded PI
  controller on the distance to the scheduled target (in the spirit of L0/CoFi structured
  pruning). It is expressed in logit steps, so it needs no tuning to the model's loss scale;
- ``PerFlopGateStep``: each gate's task gradient is divided by the share of the FLOPs it controls
  and all of them by one running RMS (not per gate, as Adam does), then the multiplier pushes every
  gate towards closing by the same amount per FLOP. A gate closes first when its task gradient
  per FLOP is smallest.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch


def penalty(gflops: torch.Tensor, target: float, form: str, scale: float) -> torch.Tensor:
    """The paper's absolute (F - T)^2, or the scale-free ((F - T) / scale)^2 (scale: the final target)."""
    return ((gflops - target) / scale) ** 2 if form == 'relative' else (gflops - target) ** 2


# The default target falls by RAMP_SPEED of the original FLOPs over a search, over at most MAX_RAMP
# of it: a shallow budget is reached early and the weights train longer on the architecture they
# will keep, a deep one still closes a few gates at a time.
RAMP_SPEED = 0.8
MAX_RAMP = 0.75


def default_ramp(goal_ratio: float) -> float:
    """Fraction of the steps the target takes to fall from the original FLOPs to ``goal_ratio`` of them."""
    return min(MAX_RAMP, (1.0 - goal_ratio) / RAMP_SPEED)


class BudgetSchedule:
    """The FLOPs target at each step: linear from the original FLOPs to the goal over ``ramp`` of the steps."""

    def __init__(self, original: float, goal: float, total_steps: int, ramp: float = 0.0) -> None:
        self.original, self.goal = float(original), float(goal)
        self.ramp_steps = ramp * total_steps

    def target(self, step: int) -> float:
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return self.goal
        return self.original + (self.goal - self.original) * step / self.ramp_steps


class BudgetDrive:
    """How hard to push every gate towards closing, in units of the gate learning rate per step.

    u = clip(gain * e + I, -limit, limit), I <- clip(I + gain * e / integral_steps, -limit, limit),
    with e = (F - target) / goal: 5% off the goal pushes at full speed without the integral. The
    bounds keep the closing speed finite (no cliff); the integral stands still while the P term
    alone saturates, so it does not wind up while the gates travel towards zero.
    """

    def __init__(self, goal: float, integral_steps: float, gain: float = 20.0, limit: float = 2.0) -> None:
        self.goal = float(goal)
        self.integral_steps = float(integral_steps)
        self.gain, self.limit = gain, limit
        self.integral = torch.zeros(())      # on the device once used: read without a host sync

    def __call__(self, gflops: torch.Tensor, target: float) -> torch.Tensor:
        e = (gflops.detach() - target) / self.goal
        p = self.gain * e
        if self.integral_steps > 0:     # integrate only while the P term alone does not saturate
            grown = (self.integral.to(e) + p / self.integral_steps).clamp(-self.limit, self.limit)
            self.integral = torch.where(p.abs() < self.limit, grown, self.integral.to(e))
        return (p + self.integral).clamp(-self.limit, self.limit)

    def state_dict(self) -> Dict[str, float]:
        return {'integral': float(self.integral)}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.integral = torch.tensor(float(state['integral']))


FlopsDrive = BudgetDrive        # its name from when FLOPs were the only budget


# The task gradient's running RMS in gate steps: half the drive's full speed, so that in a short search
# the task gradient's noise (straight-through gradients of sampled gates are noisy) moves a logit by
# less than the spread of the importance ranking it started from, while a consistent gradient still
# overtakes the drive.
TASK_RMS = 0.5


class PerFlopGateStep:
    """The per-flop gate update, around the optimiser's step (momentum SGD on the logits).

    ``normalise`` (between backward and the step) turns each gate's task gradient into
    ``task / cost / RMS``: ``costs`` are, per gate tensor, the share of the original FLOPs each gate
    controls, and the RMS is one running value over all gates. ``drive`` (after the step) moves
    every gate whose FLOPs count by ``-lr * u``: straight, not through the momentum, so the
    controller acts without lag. Which gates count and by how much comes from the differentiable
    FLOPs model (its logit gradient over the surrogate's slope sigma'(logit), i.e. dF/dg per FLOP):
    the cumulative attention gates and the detach rule hold as in the paper's loss.
    """

    def __init__(self, costs: Sequence[torch.Tensor], beta: float = 0.99, eps: float = 1e-12) -> None:
        self.costs = [c.clamp(min=eps) for c in costs]
        self.beta, self.eps = beta, eps
        self.steps = 0
        self.mean_square = torch.zeros(())
        self._directions: List[Tuple[torch.nn.Parameter, torch.Tensor]] = []

    def normalise(self, params: Sequence[torch.nn.Parameter], flops_share: torch.Tensor) -> None:
        """``flops_share``: F / F_original, differentiable in ``params``. Gates without a gradient
        (frozen this step) are left alone."""
        if self.costs and self.costs[0].device != params[0].device:      # once, not a copy every step
            self.costs = [c.to(params[0].device) for c in self.costs]
        live = [(p, c) for p, c in zip(params, self.costs) if p.grad is not None]
        self._directions = []
        if not live:
            return
        dfdp = torch.autograd.grad(flops_share, [p for p, _ in live], allow_unused=True)
        for (p, c), d in zip(live, dfdp):
            p.grad.div_(c)
            if d is not None:
                slope = torch.sigmoid(p.detach()) * torch.sigmoid(-p.detach())
                self._directions.append((p, d / (c * slope.clamp(min=1e-12))))
        flat = torch.cat([p.grad.flatten() for p, _ in live])
        self.mean_square = self.mean_square.to(flat) * self.beta + (1 - self.beta) * flat.square().mean()
        self.steps += 1
        rms = ((self.mean_square / (1 - self.beta ** self.steps)).sqrt() + self.eps) / TASK_RMS
        for p, _ in live:
            p.grad.div_(rms)

    @torch.no_grad()
    def drive(self, u: torch.Tensor, lr: float) -> None:
        """Push the gates that ``normalise`` saw by ``lr * u`` towards closing (u < 0: opening)."""
        for p, d in self._directions:
            p.sub_(d * (lr * u))
        self._directions = []

    def state_dict(self) -> Dict[str, float]:
        return {'steps': self.steps, 'mean_square': float(self.mean_square)}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.steps, self.mean_square = int(state['steps']), torch.tensor(float(state['mean_square']))
