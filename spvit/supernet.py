"""The supernet: a timm model whose blocks carry weight-shared, gated search slots.

Data flows one way: pretrained timm model -> ``attach_search_space`` -> ``SuperNet`` (search) ->
``Architecture`` + kept units -> pruned model. What differs between model families (where
the blocks are, what their FLOPs depend on, which slots attach) is in ``spvit.families``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .arch import ATTN_OPS, Architecture, BlockArch
from .errors import ArchitectureError, UnsupportedModelError
from .families import check_model
from .flops import BlockDims, arch_flops, attn_flops, gated_block_flops, measure_flops, mlp_flops, msa_block_flops
from .gates import deterministic_gates, hold_conv3x3_open, penalty_attention_gates
from .hybrid import classifies_from_prefix_tokens
from .slots import AttentionSlot, MlpSlot

if TYPE_CHECKING:
    from .costs import Cost
    from .latency_model import LatencyTable


@dataclass(frozen=True)
class SearchSpace:
    """What the gates of a block choose: the attention op (skip / conv1x1 / conv3x3 / msa), the heads
    msa keeps, or both; MLP units always."""
    ops: bool
    heads: bool
    about: str


SEARCH_SPACES: Dict[str, SearchSpace] = {
    'spvit': SearchSpace(ops=True, heads=False, about='the paper: msa, conv3x3, conv1x1 or skip per block'),
    'heads': SearchSpace(ops=False, heads=True, about='width only: every block keeps msa with 1..H of its heads'),
    'full': SearchSpace(ops=True, heads=True, about='both: the op of each block, and the heads msa keeps (conv3x3 '
                        'only in blocks where it costs less than msa with one head)'),
}


def mlp_importance(slot: MlpSlot) -> torch.Tensor:
    """|fc1 row|_1 * |fc2 column|_1 per hidden unit (a GLU's unit counts both its input rows): which
    units to keep when only a count is given."""
    return slot.importance()


def head_importance(slot: AttentionSlot) -> torch.Tensor:
    """Per head: |its qkv rows|_1 * |its proj columns|_1, the MLP units' magnitude score for heads."""
    hd = slot.head_dim
    qkv = slot.qkv_weight().detach().abs().reshape(3, slot.num_heads, hd, -1).sum((0, 2, 3))
    proj = slot.proj.weight.detach().abs().reshape(-1, slot.num_heads, hd).sum((0, 2))
    return qkv * proj


def top_units(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` highest scores, in ascending index order."""
    return torch.topk(scores, count).indices.sort().values


class SuperNet(nn.Module):
    """A timm model with search slots in every block, plus what the search needs around it."""

    def __init__(
            self,
            model: nn.Module,
            model_name: str,
            model_kwargs: Dict[str, Any],
            block_dims: Sequence[BlockDims],
            fixed_flops: int,
            input_size: Tuple[int, int, int],
            slots: Sequence[Tuple[AttentionSlot, MlpSlot]],
            theta0: float = 1.5,
            alpha: float = 0.01,
            needs_msa: bool = False,
            search_space: str = 'spvit',
    ) -> None:
        super().__init__()
        self.model = model
        self.search_space = search_space
        self.space = SEARCH_SPACES[search_space]
        self.needs_msa = needs_msa     # the head reads only prefix tokens: some block must keep msa
        self.theta0 = theta0
        self.alpha = alpha
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs)
        self.block_dims = tuple(block_dims)
        self.fixed_flops = int(fixed_flops)
        self.input_size = tuple(input_size)
        self._slots = tuple(slots)
        # the blocks that leave conv3x3 out, on the gates' device, so the op projections need no copy
        self.register_buffer('conv3x3_held', torch.tensor([a.conv3x3_left_out for a, _ in self._slots]),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @property
    def attn_slots(self) -> List[AttentionSlot]:
        return [a for a, _ in self._slots]

    @property
    def mlp_slots(self) -> List[MlpSlot]:
        return [m for _, m in self._slots]

    @property
    def original_flops(self) -> int:
        """FLOPs of the untouched model (every block msa with its full MLP)."""
        return self.fixed_flops + msa_block_flops(self.block_dims)

    def gate_parameters(self) -> List[nn.Parameter]:
        """Per block: the attention op gates (if the space has ops), the head gates (if it has heads),
        the MLP unit gates."""
        params = []
        for a, m in self._slots:
            params += [a.gate_logits] if self.space.ops else []
            params += [a.head_logits] if a.head_logits is not None else []
            params.append(m.gate_logits)
        return params

    def set_gate_noise(self, scale: float) -> None:
        """Scale of the gates' sampling noise in training (1: the paper's relaxed Bernoulli, 0: none)."""
        for pair in self._slots:
            for s in pair:
                s.gate_noise.fill_(float(scale))

    def gate_costs(self) -> List[torch.Tensor]:
        """For each tensor of ``gate_parameters()``: the share of the original FLOPs each of its gates
        controls (attention: conv1x1, conv3x3 - conv1x1, msa - conv3x3, where conv3x3 costs conv1x1's
        in a block that leaves it out; MLP: one hidden unit)."""
        costs = []
        for b, (a, m) in zip(self.block_dims, self._slots):
            f1, f3, fm = (attn_flops(b, op) for op in ATTN_OPS[1:])
            f3 = f1 if a.conv3x3_left_out else f3
            if self.space.ops:
                costs.append(torch.tensor([f1, f3 - f1, fm - f3], dtype=torch.float64) / self.original_flops)
            if a.head_logits is not None:
                per_head = attn_flops(b, 'msa', 2) - attn_flops(b, 'msa', 1)     # less what msa shares (Swin V2)
                costs.append(torch.full((a.num_heads,), per_head / self.original_flops, dtype=torch.float64))
            costs.append(torch.full((m.hidden_features,), mlp_flops(b, 1) / self.original_flops, dtype=torch.float64))
        return [c.float() for c in costs]

    def weight_parameters(self) -> List[nn.Parameter]:
        gates = {id(p) for p in self.gate_parameters()}
        return [p for p in self.parameters() if id(p) not in gates]

    # --- FLOPs ---

    def flops(self) -> torch.Tensor:
        """Analytic GFLOPs under the deterministic gates, differentiable in the gate logits."""
        total = sum(gated_block_flops(b, self._penalty_gates(a), deterministic_gates(m.gate_logits),
                                      None if a.head_logits is None else deterministic_gates(a.head_logits),
                                      conv3x3=not a.conv3x3_left_out)
                    for b, (a, m) in zip(self.block_dims, self._slots))
        return (total + self.fixed_flops) / 1e9

    def latency(self, table: 'LatencyTable') -> torch.Tensor:
        """Predicted ms of the pruned model under the deterministic gates on the table's device,
        differentiable in the gate logits (``flops()`` with a latency table's costs)."""
        from .latency_model import gated_block_latency
        total = sum(gated_block_latency(table.shape(i), self._penalty_gates(a), deterministic_gates(m.gate_logits),
                                        None if a.head_logits is None else deterministic_gates(a.head_logits),
                                        conv3x3=not a.conv3x3_left_out)
                    for i, (a, m) in enumerate(self._slots))
        return total + table.fixed_ms

    def latency_gate_costs(self, table: 'LatencyTable') -> List[torch.Tensor]:
        """``gate_costs()`` in predicted latency: for each tensor of ``gate_parameters()``, the share
        of the original's predicted latency each of its gates controls. A gate whose step costs no
        time, or saves time by opening (an op slower than the next one up), counts as one MLP unit
        of its block, so that the per-flop update never divides by zero."""
        original = table.original_ms()
        costs = []
        for i, (a, m) in enumerate(self._slots):
            s = table.shape(i)
            floor = max(s.unit_ms(), 1e-9)
            l0, l1, l3, lm = (s.ops[op] for op in ATTN_OPS)
            l3 = l1 if a.conv3x3_left_out else l3
            if self.space.ops:
                costs.append(torch.tensor([max(l1 - l0, floor), max(l3 - l1, floor), max(lm - l3, floor)],
                                          dtype=torch.float64) / original)
            if a.head_logits is not None:
                per_head = (s.msa_heads[-1] - s.msa_heads[0]) / max(1, a.num_heads - 1)
                costs.append(torch.full((a.num_heads,), max(per_head, floor) / original, dtype=torch.float64))
            costs.append(torch.full((m.hidden_features,), floor / original, dtype=torch.float64))
        return [c.float() for c in costs]

    @staticmethod
    def _penalty_gates(a: AttentionSlot) -> torch.Tensor:
        gates = penalty_attention_gates(a.gate_logits)
        return hold_conv3x3_open(gates) if a.conv3x3_left_out else gates

    def arch_flops(self, arch: Architecture) -> int:
        """Analytic FLOPs (MACs) of an architecture of this model."""
        return arch_flops(self.block_dims, self.fixed_flops, arch)

    def min_arch(self) -> Architecture:
        """The cheapest reachable architecture: every block skip with one hidden unit (one block
        msa if the head reads the class token)."""
        heads = 1 if self.space.heads else None
        arch = self.uniform_arch('skip' if self.space.ops else 'msa', 1, heads)
        if self.needs_msa and self.space.ops:
            cheapest = min(range(len(self.block_dims)), key=lambda i: attn_flops(self.block_dims[i], 'msa', heads))
            arch.blocks[cheapest] = BlockArch('msa', 1, None if heads is None else [0])
        return arch

    def min_flops(self) -> int:
        """FLOPs of ``min_arch()``."""
        return arch_flops(self.block_dims, self.fixed_flops, self.min_arch())

    def land_on(self, target_flops: float, cost: Optional['Cost'] = None) -> int:
        """Open or close the MLP units nearest to their threshold (smallest |logit|) until the
        architecture's FLOPs (or, with ``cost``, its cost in that cost's unit: ``target_flops`` is
        then in it too) are as close to ``target_flops`` as single units allow. Returns the number
        of units flipped (negative: closed). The search's last step: what the gates leave within a
        few units of the target lands on it."""
        arch = self.architecture()
        if cost is None:
            gap = target_flops - self.arch_flops(arch)

            def step(i: int, width: int, opening: bool) -> float:
                return mlp_flops(self.block_dims[i], 1)
        else:
            gap, step = target_flops - cost.of(arch), cost.unit_step
        opening = gap > 0
        candidates = []
        for i, m in enumerate(self.mlp_slots):
            logits = m.gate_logits.detach()
            side = (logits <= 0) if opening else (logits > 0)
            idx = side.nonzero().flatten()
            candidates += [(abs(float(logits[j])), i, int(j)) for j in idx]
        kept = [b.mlp_hidden for b in arch.blocks]
        flipped = 0
        for _, i, j in sorted(candidates):
            unit = step(i, kept[i], opening)
            if abs(gap) <= unit / 2 or (not opening and kept[i] <= 1):   # a unit here would overshoot
                continue
            with torch.no_grad():
                self.mlp_slots[i].gate_logits[j] = 1e-3 if opening else -1e-3
            gap += -unit if opening else unit
            kept[i] += 1 if opening else -1
            flipped += 1 if opening else -1
        return flipped

    def keep_token_path(self) -> None:
        """If the head reads the class token and no block's gates keep msa, reopen the msa of the
        block nearest to keeping it (a projection onto the architectures that can classify).
        Runs on the device without a host sync."""
        if not self.needs_msa:
            return
        logits = self._op_logits()
        nearest = logits.min(1).values
        reopen = (nearest <= 0).all() & (torch.arange(len(logits), device=logits.device) == nearest.argmax())
        fixed = torch.where(reopen[:, None], logits.clamp(min=1e-3), logits)
        with torch.no_grad():
            for a, row in zip(self.attn_slots, fixed):
                a.gate_logits.copy_(row)

    def _op_logits(self) -> torch.Tensor:
        """(blocks, 3); the conv3x3 gate of a block that leaves conv3x3 out reads as open."""
        logits = torch.stack([a.gate_logits.detach() for a in self.attn_slots])
        held = self.conv3x3_held
        return torch.where(held[:, None] & (torch.arange(3, device=logits.device) == 1), logits.abs() + 1, logits)

    def _levels(self, logits: torch.Tensor) -> torch.Tensor:
        """Op index per block; the conv3x3 state of a block that leaves conv3x3 out is conv1x1."""
        levels = torch.cumprod((logits > 0).long(), 1).sum(1)
        return torch.where(self.conv3x3_held & (levels == 2), 1, levels)

    def op_levels(self) -> torch.Tensor:
        """Each block's op under the deterministic gates, as its index in ATTN_OPS (on the device)."""
        return self._levels(self._op_logits())

    def cap_ops(self, ceiling: torch.Tensor) -> None:
        """Close the gate just above ``ceiling`` (op indices, as from ``op_levels``) in every block
        whose op rose over it: a projection that lets ops only move down. No host sync."""
        logits = self._op_logits()
        over = self._levels(logits) > ceiling
        gate = torch.where(self.conv3x3_held & (ceiling == 1), 2, ceiling)    # the held gate cannot close
        close = over[:, None] & (torch.arange(logits.shape[1], device=logits.device) == gate[:, None])
        fixed = torch.where(close, logits.clamp(max=-1e-3), logits)
        with torch.no_grad():
            for a, row in zip(self.attn_slots, fixed):
                a.gate_logits.copy_(row)

    # --- reading and pinning architectures ---

    def mlp_masks(self) -> List[torch.Tensor]:
        """Kept hidden units under the deterministic gates (at least the unit of highest logit)."""
        masks = []
        for m in self.mlp_slots:
            mask = m.gate_logits.detach() > 0
            if not mask.any():
                mask[m.gate_logits.detach().argmax()] = True
            masks.append(mask)
        return masks

    def architecture(self) -> Architecture:
        """The architecture the deterministic gates select (the pinned one, if pinned)."""
        blocks = []
        levels = self.op_levels().tolist()
        for (a, m), level in zip(self._slots, levels):
            if a.pinned_op is not None and m.kept is not None:
                heads = None if a.pinned_heads is None else a.pinned_heads.tolist()
                blocks.append(BlockArch(a.pinned_op, int(m.kept.numel()), heads))
                continue
            mask = m.gate_logits.detach() > 0
            op = ATTN_OPS[level]
            blocks.append(BlockArch(op, max(1, int(mask.sum())), a.kept_heads() if op == 'msa' else None))
        return Architecture(model=self.model_name, model_kwargs=dict(self.model_kwargs), blocks=blocks)

    def kept_units(self) -> List[torch.Tensor]:
        """Indices of the kept hidden units per block, as export and checkpoints store them."""
        if all(m.kept is not None for m in self.mlp_slots):
            return [m.kept.clone() for m in self.mlp_slots]
        return [mask.nonzero().flatten() for mask in self.mlp_masks()]

    def validate(self, arch: Architecture) -> None:
        arch.validate([b.hidden for b in self.block_dims], max_heads=[b.heads for b in self.block_dims])

    def pin(self, arch: Architecture, kept: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Make the forward compute exactly ``arch``. ``kept`` gives each block's hidden-unit indices;
        without it the units with the largest |fc1 row| * |fc2 column| are kept."""
        self.validate(arch)
        if kept is not None:
            if len(kept) != len(arch.blocks):
                raise ArchitectureError(f'kept units given for {len(kept)} blocks, architecture has {len(arch.blocks)}')
            for i, (idx, b) in enumerate(zip(kept, arch.blocks)):
                if idx.numel() != b.mlp_hidden:
                    raise ArchitectureError(f'block {i}: {idx.numel()} kept units but mlp_hidden is {b.mlp_hidden}')
        for i, (b, (a, m)) in enumerate(zip(arch.blocks, self._slots)):
            a.pin(b.attn, b.heads)
            m.pin(kept[i] if kept is not None else top_units(mlp_importance(m), b.mlp_hidden))

    def pin_current(self) -> None:
        """Pin the architecture and units that the deterministic gates select."""
        self.pin(self.architecture(), self.kept_units())

    def unpin(self) -> None:
        for a, m in self._slots:
            a.pin(None)
            m.pin(None)

    @property
    def pinned(self) -> bool:
        return all(a.pinned_op is not None for a in self.attn_slots)

    def magnitude_heads(self, count: int) -> List[Optional[List[int]]]:
        """Per block, the ``count`` heads of largest magnitude (None where that is every head)."""
        return [None if count >= a.num_heads else top_units(head_importance(a), count).tolist() for a in self.attn_slots]

    def uniform_arch(self, op: str, hidden: Optional[int] = None, heads: Optional[int] = None) -> Architecture:
        """Every block ``op`` with ``hidden`` MLP units (None: all) and, for msa, its first ``heads``
        heads (None: all)."""
        blocks = [BlockArch(op, hidden or b.hidden,
                            None if op != 'msa' or heads is None or heads >= b.heads else list(range(heads)))
                  for b in self.block_dims]
        return Architecture(model=self.model_name, model_kwargs=dict(self.model_kwargs), blocks=blocks)


    def uniform_prune(self, ratio: float, heads: bool = False) -> Optional[Architecture]:
        """The uniform baseline at ``ratio`` of the original FLOPs: every block msa, every MLP the
        same number of units, the magnitude-kept ones. Without ``heads`` every head is kept (None
        where all-msa alone costs more than that); with ``heads`` every block keeps the same number
        of heads too (the largest by magnitude), the count whose share of the heads is nearest to
        the MLPs' share of their units."""
        dims = self.block_dims
        target = ratio * self.original_flops
        unit = sum(mlp_flops(b, 1) for b in dims)
        options = []
        for h in (range(1, dims[0].heads + 1) if heads else [dims[0].heads]):
            attn_only = self.arch_flops(self.uniform_arch('msa', 1, h)) - unit
            hidden = round((target - attn_only) / unit)
            if hidden >= 1:
                options.append((abs(h / dims[0].heads - hidden / dims[0].hidden), h, min(hidden, dims[0].hidden)))
        if not options:
            return None
        _, h, hidden = min(options)
        return Architecture(self.model_name, [BlockArch('msa', hidden, k) for k in self.magnitude_heads(h)],
                            dict(self.model_kwargs))

def attach_search_space(
        model: nn.Module,
        theta0: float = 1.5,
        alpha: float = 0.01,
        model_name: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        search_space: str = 'spvit',
) -> SuperNet:
    """Turn a pretrained timm model into a supernet, in place: its blocks' attention and MLP are
    replaced by search slots that read the same parameters. ``copy.deepcopy`` the model first to
    keep the original. ``model_name``/``model_kwargs`` (what ``timm.create_model`` was given) are
    recorded in architectures; the name defaults to the model's pretrained config.
    """
    if search_space not in SEARCH_SPACES:
        raise ValueError(f'unknown search space {search_space!r}; expected one of {", ".join(SEARCH_SPACES)}')
    space = SEARCH_SPACES[search_space]
    family = check_model(model)
    if model_name is None:
        model_name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
        if not model_name:
            raise UnsupportedModelError('cannot tell the timm model name; pass model_name=')
    dims = family.block_dims(model)
    input_size = family.input_size(model)
    total, _ = measure_flops(model, input_size)
    family.attach(model, theta0, alpha, head_gates=space.heads)
    slots = [(blk.attn, blk.mlp) for blk in family.blocks(model)]
    if space.ops and space.heads:   # conv3x3 is no choice where msa with one head costs less
        for (a, _), b in zip(slots, dims):
            a.conv3x3_left_out = attn_flops(b, 'conv3x3') >= attn_flops(b, 'msa', 1)
    if not space.ops:           # msa in every block: the op gates stay open and untrained
        for a, _ in slots:
            a.gate_logits.requires_grad_(False)
            a.op_gates = False
    return SuperNet(model, model_name, model_kwargs or {}, dims, total - msa_block_flops(dims), input_size, slots,
                    theta0=theta0, alpha=alpha, needs_msa=classifies_from_prefix_tokens(model), search_space=search_space)
