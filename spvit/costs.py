"""What a search budget limits: FLOPs, or the latency a table predicts on one device.

The budget machinery (``budget.BudgetSchedule``, ``BudgetDrive``, ``PerFlopGateStep``) works on any
scalar cost with a goal; a ``Cost`` gives it that scalar, differentiable in the gates, the exact
value of an architecture, the original model's, and each gate's share of it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List

import torch

from .arch import Architecture
from .flops import mlp_flops

if TYPE_CHECKING:
    from .latency_model import LatencyTable
    from .supernet import SuperNet


class Cost:
    """A cost of the supernet's architecture in one unit (``unit``; ``key`` names it in logs)."""
    kind = ''
    unit = ''
    key = ''

    def __init__(self, supernet: SuperNet) -> None:
        self.supernet = supernet

    def __call__(self) -> torch.Tensor:
        """The cost under the deterministic gates, differentiable in the gate logits."""
        raise NotImplementedError

    def of(self, arch: Architecture) -> float:
        """The exact cost of an architecture of the supernet's model."""
        raise NotImplementedError

    @property
    def original(self) -> float:
        """The unmodified model's cost."""
        return self.of(self.supernet.uniform_arch('msa'))

    def smallest(self) -> float:
        """The cost of the cheapest architecture the search space reaches (``SuperNet.min_arch``)."""
        return self.of(self.supernet.min_arch())

    def gate_costs(self) -> List[torch.Tensor]:
        """Per tensor of ``gate_parameters()``: the share of the original cost each gate controls."""
        raise NotImplementedError

    def unit_step(self, block: int, width: int, opening: bool) -> float:
        """What opening one more MLP unit of ``block`` at ``width`` units adds (closing one: saves)."""
        raise NotImplementedError

    def fmt(self, value: float) -> str:
        return f'{value:.4f} {self.unit}'


class FlopsCost(Cost):
    """GFLOPs, the analytic model of ``spvit.flops`` (the paper's budget)."""
    kind, unit, key = 'flops', 'GFLOPs', 'gflops'

    def __call__(self) -> torch.Tensor:
        return self.supernet.flops()

    def of(self, arch: Architecture) -> float:
        return self.supernet.arch_flops(arch) / 1e9

    @property
    def original(self) -> float:
        return self.supernet.original_flops / 1e9

    def gate_costs(self) -> List[torch.Tensor]:
        return self.supernet.gate_costs()

    def unit_step(self, block: int, width: int, opening: bool) -> float:
        return mlp_flops(self.supernet.block_dims[block], 1) / 1e9


class LatencyCost(Cost):
    """Milliseconds on the table's device at its batch size, as the table predicts them."""
    kind, unit, key = 'latency', 'ms', 'latency_ms'

    def __init__(self, supernet: SuperNet, table: LatencyTable) -> None:
        super().__init__(supernet)
        self.table = table

    def __call__(self) -> torch.Tensor:
        return self.supernet.latency(self.table)

    def of(self, arch: Architecture) -> float:
        return self.table.predict(arch)

    @property
    def original(self) -> float:
        return self.table.original_ms()

    def gate_costs(self) -> List[torch.Tensor]:
        return self.supernet.latency_gate_costs(self.table)

    def unit_step(self, block: int, width: int, opening: bool) -> float:
        shape = self.table.shape(block)
        other = width + 1 if opening else max(1, width - 1)
        return abs(shape.mlp(other) - shape.mlp(width))

    def fmt(self, value: float) -> str:
        return f'{value:.3f} ms'


__all__ = ['Cost', 'FlopsCost', 'LatencyCost']
