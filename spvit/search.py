"""The search: train gates and weights of a supernet together under a FLOPs penalty.

``run_search(cfg)`` is what ``tools/search.py`` calls; it validates everything it can before it
writes a file, keeps ``checkpoint-last.pth`` resumable to the exact step, and leaves
``search-final.pth`` for ``tools/export.py``.
"""
from __future__ import annotations

import copy
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from timm.optim import create_optimizer_v2
from tqdm import tqdm

from . import data as D
from .arch import Architecture
from .budget import MAX_RAMP, RAMP_SPEED, BudgetDrive, BudgetSchedule, PerFlopGateStep, default_ramp, penalty
from .checkpoint import SEARCH_FORMAT, atomic_save, load_file, supernet_record
from .cli import parse_config
from .config import AT_LEAST_ONE, FRACTION_BELOW_ONE, POSITIVE, ConfigError, field
from .costs import Cost, FlopsCost, LatencyCost
from .distillation import distillation_task, prepare_teacher
from .importance import gate_fisher, init_from_importance
from .latency_model import LatencyTable, build_latency_table
from .models import create_model, load_exactly
from .options import DataOptions, DistillOptions, ModelOptions, TrainOptions
from .runtime import autocast
from .supernet import SEARCH_SPACES, SuperNet, attach_search_space
from .trainer import LAST, Trainer, flag, resume_config

STATE_FORMAT = 'spvit-search-state'
LATENCY_TABLE_FILE = 'latency-table.json'
RUN_FILES = (LAST, 'search-final.pth', 'log.jsonl', 'config.yaml', 'arch.yaml', LATENCY_TABLE_FILE)

# Gate logits start at theta0 and must cross 0 to close. The paper's arch lr (5e-4..1e-3 for
# ~12k steps) lets a logit move about 6-12; short searches get the same reach by default.
ARCH_LR_REACH = 10.0
PAPER_ARCH_LR = 5e-4
# The per-flop update moves a gate by about the arch lr per step at most: a reach of 5 lets the
# highest-ranked unit (theta0 + spread = 2.5) close with room to spare, without steps so large
# that hundreds of units cross zero in one of them.
PER_FLOP_REACH = 5.0
# Final fraction of the steps in which the attention ops are frozen (the paper's space).
SETTLE_FRACTION = 0.1
GATE_MOMENTUM = 0.9


@dataclass
class SearchConfig(ModelOptions, DataOptions, TrainOptions, DistillOptions):
    search_space: str = field('spvit', 'what the gates choose: ' + '; '.join(f'{k}: {v.about}' for k, v in
                                                                           SEARCH_SPACES.items()),
                              choices=tuple(SEARCH_SPACES))
    target_gflops: Optional[float] = field(None, 'FLOPs budget in GFLOPs', bounds=POSITIVE)
    target_ratio: Optional[float] = field(None, "budget as a fraction of the original model's FLOPs", bounds=POSITIVE)
    target_latency_ms: Optional[float] = field(None, 'latency budget: ms per batch on the latency table\'s device, '
                                               'at its batch size, as the table predicts it', bounds=POSITIVE)
    target_latency_ratio: Optional[float] = field(None, 'latency budget as a fraction of the original model\'s '
                                                  'predicted latency', bounds=POSITIVE)
    latency_table: Optional[str] = field(None, 'latency budgets: the table (tools/latency_table.py) of the device the '
                                         'model will run on (default: one built at the start on --device, at '
                                         '--latency-batch-size, with the current threads)')
    latency_batch_size: int = field(1, 'batch size of the latency table built at the start when no --latency-table '
                                    'is given', bounds=AT_LEAST_ONE)
    loss_lambda: float = field(20.0, 'weight of the FLOPs penalty of --gate-update adamw (for the relative form: the '
                               'paper\'s lambda x T^2)', bounds=POSITIVE)
    flops_loss: str = field('relative', 'penalty of --gate-update adamw: relative ((F-T)/T)^2; absolute (F-T)^2 in '
                            'GFLOPs (the paper)', choices=('relative', 'absolute'))
    arch_lr: Optional[float] = field(None, f'gate learning rate (default: max({PAPER_ARCH_LR}, R / planned steps), R = '
                                     f'{PER_FLOP_REACH:g} for per-flop, {ARCH_LR_REACH:g} for adamw)', bounds=POSITIVE)
    settle_fraction: Optional[float] = field(None, 'final fraction of the planned steps in which the attention ops and '
                                             'heads are frozen and only the MLP units move, to meet the budget in fine '
                                             f'steps (0: never; default: {SETTLE_FRACTION:g}, and in a space with heads '
                                             'everything after the target ramp)', bounds=FRACTION_BELOW_ONE)
    budget_ramp: Optional[float] = field(None, 'fraction of the planned steps over which the FLOPs target falls '
                                         "linearly from the original model's FLOPs to the budget, so that a few gates "
                                         f'close at a time (default: the target falls by {RAMP_SPEED:g} of the '
                                         f'original FLOPs per search, over at most {MAX_RAMP:g} of it: 0.5 for a '
                                         'budget of 0.6; 0: the paper)', bounds=FRACTION_BELOW_ONE)
    budget_integral: float = field(0.2, 'per-flop: time constant, as a fraction of the planned steps, of the integral '
                                   'term that pushes the gates harder while the FLOPs stay above the target (0: off)',
                                   bounds=FRACTION_BELOW_ONE)
    gate_init: str = field('importance', 'importance: the logits of MLP units and msa gates start spread around theta0 '
                           'by the rank of their Fisher score per FLOP; constant: all at theta0 (the paper)',
                           choices=('importance', 'constant'))
    gate_update: str = field('per-flop', 'per-flop: momentum SGD on gate gradients divided by their FLOPs and one '
                             'running RMS, so steps follow each gate\'s gradient; adamw: AdamW per gate (the paper)',
                             choices=('per-flop', 'adamw'))
    gate_noise: str = field('auto', 'sampling noise of the gates in training: none (the forward is the thresholded '
                            'logits, the architecture export builds, from the first step; the gradient stays relaxed), '
                            'anneal (its scale falls to 0 over the target ramp, so conv ops train before a block '
                            'switches to them), sampled (the paper: relaxed Bernoulli throughout), auto (none when the '
                            'budget leaves room for msa with every head in every block, else anneal)',
                            choices=('auto', 'none', 'anneal', 'sampled'))
    ops_after_ramp: str = field('auto', 'once the target is reached, free: a block\'s attention op may move both '
                                'ways (the paper); down: it may still fall (msa > conv3x3 > conv1x1 > skip) but never '
                                'rise again, so an undershoot is refilled by MLP units instead of a whole msa; auto: '
                                'down in the paper\'s space when the budget is below msa in every block (one unit per '
                                'MLP), else free', choices=('auto', 'free', 'down'))
    land: bool = field(True, 'after the last step, open or close the MLP units nearest to their threshold until the '
                       'FLOPs are on the target (within one unit)')
    importance_batches: int = field(8, 'training batches the Fisher scores of --gate-init importance are summed over',
                                    bounds=AT_LEAST_ONE)
    theta0: float = field(1.5, 'initial gate logit (positive: every gate starts open)', bounds=POSITIVE)
    alpha: float = field(0.01, 'head-assignment softmax temperature', bounds=POSITIVE)


BUDGETS = ('target_gflops', 'target_ratio', 'target_latency_ms', 'target_latency_ratio')


def latency_budget(cfg: SearchConfig) -> bool:
    """Whether the budget is a latency (else FLOPs)."""
    return cfg.target_latency_ms is not None or cfg.target_latency_ratio is not None


def budget_key(cfg: SearchConfig) -> str:
    """The one budget option given (checked before anything is built or timed)."""
    given = [k for k in BUDGETS if getattr(cfg, k) is not None]
    if len(given) > 1:
        raise ConfigError(f'give {" or ".join(flag(k) for k in given)}, not both')
    if not given:
        raise ConfigError('no FLOPs budget: give --target-gflops or --target-ratio (or a latency budget: '
                          '--target-latency-ms or --target-latency-ratio)')
    return given[0]


def resolve_target(cfg: SearchConfig, supernet: SuperNet, cost: Optional[Cost] = None) -> float:
    """The budget in the cost's unit (GFLOPs, or ms with a ``LatencyCost``)."""
    cost = cost or FlopsCost(supernet)
    key = budget_key(cfg)
    original, smallest = cost.original, cost.smallest()
    target = getattr(cfg, key) if key in ('target_gflops', 'target_latency_ms') else getattr(cfg, key) * original
    if target >= original:
        raise ConfigError(f'target {cost.fmt(target)} is at or above the model\'s {cost.fmt(original)}')
    if target < smallest:
        cheapest = ('every attention skipped' if supernet.space.ops else 'msa with one head in every block') + \
            ', one hidden unit per MLP'
        raise ConfigError(f'target {cost.fmt(target)} is below the smallest reachable {cost.fmt(smallest)} '
                          f'in the {cfg.search_space} search space ({cheapest})')
    return target


def below_msa_floor(supernet: SuperNet, target: float, cost: Optional[Cost] = None) -> bool:
    """Whether the budget (in GFLOPs, or in the unit of ``cost``) is below msa with every head in
    every block and one unit per MLP: there some ops must change."""
    return target < (cost or FlopsCost(supernet)).of(supernet.uniform_arch('msa', 1))


def resolve_gate_noise(mode: str, supernet: SuperNet, target: float, cost: Optional[Cost] = None) -> str:
    """``auto`` -> ``none`` where the budget (in GFLOPs, or in the unit of ``cost``) can be met with
    every block msa (all heads, one unit per MLP), so no op has to change; ``anneal`` below that,
    where blocks must switch to conv ops and the sampling trains a conv op before its block switches to it."""
    if mode != 'auto':
        return mode
    return 'anneal' if below_msa_floor(supernet, target, cost) else 'none'


def resolve_ops_after_ramp(mode: str, supernet: SuperNet, target: float, cost: Optional[Cost] = None) -> str:
    """``auto`` -> ``down`` where ops must fall to meet the budget (below msa in every block) and
    the space has no heads: there an op that rises after the target is reached brings back a whole
    msa whose task gradient the bounded drive may not overcome again before the settle phase (on a
    17-token ViT at 0.3 such a search ended 21% over its budget); ``free`` elsewhere."""
    if mode != 'auto':
        return mode
    papers_space = supernet.space.ops and not supernet.space.heads
    return 'down' if papers_space and below_msa_floor(supernet, target, cost) else 'free'


def importance_spread(theta0: float) -> float:
    """Ranked gate logits span [0.1, 2 theta0 - 0.1]: the least important units start just above
    the threshold, so the first ones close as soon as the target starts to fall."""
    return max(0.0, theta0 - 0.1)


def check_schedule(cfg: SearchConfig, goal_ratio: float, heads: bool = False) -> Tuple[float, float]:
    """Validate the schedule options; returns the target ramp (its default follows the budget) and
    the settle fraction. Its default in a space with heads is all the steps after the ramp: a head
    costs a few percent of the FLOPs and the controller that holds the target moves them like MLP
    units, so a block's last heads could otherwise close (and reopen) after the target is reached,
    a cliff the weights get too few steps to recover from."""
    ramp = default_ramp(goal_ratio) if cfg.budget_ramp is None else cfg.budget_ramp
    settle = cfg.settle_fraction
    if settle is None:
        settle = 1.0 - ramp if heads and ramp > 0 else min(SETTLE_FRACTION, 1.0 - ramp)
    if ramp + settle > 1:
        raise ConfigError(f'--budget-ramp {ramp:g} and --settle-fraction {settle:g} add up to more '
                          'than the whole search: the attention ops would freeze before the target is reached')
    return ramp, settle


def weight_param_groups(supernet: SuperNet, weight_decay: float) -> List[Dict[str, Any]]:
    """AdamW groups for the network weights: no decay on biases, norms, tokens, position
    embeddings and head assignments (timm's convention plus ours); gate logits excluded."""
    gates = {id(p) for p in supernet.gate_parameters()}
    skip = set(getattr(supernet.model, 'no_weight_decay', lambda: set())())
    decay, no_decay = [], []
    for name, p in supernet.model.named_parameters():
        if id(p) in gates or not p.requires_grad:
            continue
        short = name.rsplit('.', 1)[-1]
        if p.ndim <= 1 or name in skip or short == 'head_assign':
            no_decay.append(p)
        else:
            decay.append(p)
    return [{'params': no_decay, 'weight_decay': 0.0}, {'params': decay, 'weight_decay': weight_decay}]


def arch_table(supernet: SuperNet, arch: Architecture, table: Optional[LatencyTable] = None) -> str:
    """Per block: op, kept units, GFLOPs and, with a latency table, the predicted ms beside them."""
    from .flops import block_attn_flops, mlp_flops
    ms = None if table is None else table.block_ms(arch)
    lines = [f"{'block':>5}  {'op':8}  {'kept/total':>11}  {'GFLOPs':>8}" + ('' if ms is None else f"  {'ms':>8}")]
    for i, (b, dims) in enumerate(zip(arch.blocks, supernet.block_dims)):
        g = (block_attn_flops(dims, b) + mlp_flops(dims, b.mlp_hidden)) / 1e9
        op = b.attn if b.heads is None else f'msa {len(b.heads)}/{dims.heads}'
        lines.append(f'{i:>5}  {op:8}  {b.mlp_hidden:>5}/{dims.hidden:<5}  {g:8.4f}'
                     + ('' if ms is None else f'  {sum(ms[i]):8.3f}'))
    lines.append(f'total {supernet.arch_flops(arch) / 1e9:.4f} GFLOPs (original {supernet.original_flops / 1e9:.4f})')
    if table is not None:
        lines.append(f'predicted latency {table.predict(arch):.3f} ms (original {table.original_ms():.3f}) on '
                     f'{table.device} ({table.device_name}), batch {table.batch_size}, {table.threads} threads')
    return '\n'.join(lines)


class SearchTrainer(Trainer):
    """Trains the supernet's weights (AdamW, cosine) and gate logits (AdamW, constant lr)."""
    tool = 'search'
    state_format = STATE_FORMAT
    run_files = RUN_FILES

    def __init__(self, cfg: SearchConfig, state: Optional[Dict[str, Any]] = None) -> None:
        self.latency_table: Optional[LatencyTable] = None
        self._resume_table = None if state is None else state.get('latency_table')
        super().__init__(cfg, state)

    def build_model(self):
        cfg = self.cfg
        kwargs = dict(cfg.model_kwargs)
        if cfg.img_size and kwargs.get('img_size') != cfg.img_size:
            kwargs['img_size'] = cfg.img_size
        model = create_model(cfg.model, kwargs, pretrained=cfg.pretrained and not self.resuming,
                             checkpoint=None if self.resuming else cfg.checkpoint, num_classes=self.num_classes)
        budget_key(cfg)         # one budget, checked before a latency table is timed
        data_config = D.data_config(model, cfg.img_size, cfg.crop_pct, cfg.interpolation, cfg.mean, cfg.std)
        # the teacher of --distill: the model the search starts from, frozen (on resume: loaded again)
        self.teacher = None
        if cfg.distill != 'none':
            teacher = (create_model(cfg.model, kwargs, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                                    num_classes=self.num_classes) if self.resuming else copy.deepcopy(model))
            self.teacher = prepare_teacher(teacher, data_config)
        self.supernet = attach_search_space(model, theta0=cfg.theta0, alpha=cfg.alpha, model_name=cfg.model,
                                            model_kwargs={**kwargs, 'num_classes': self.num_classes},
                                            search_space=cfg.search_space)
        self.supernet.pretrained_cfg = {**(getattr(model, 'pretrained_cfg', None) or {}), **data_config}   # for distillation
        self.cost: Cost = FlopsCost(self.supernet)
        if latency_budget(cfg):
            self.latency_table = self._latency_table(kwargs)
            self.cost = LatencyCost(self.supernet, self.latency_table)
        self.target = resolve_target(cfg, self.supernet, self.cost)
        return self.supernet, data_config

    def _latency_table(self, kwargs: Dict[str, Any]) -> LatencyTable:
        """The given table (checked against the model), the resumed run's, or one built here now."""
        cfg, sn = self.cfg, self.supernet
        if self._resume_table is not None:          # the run's own table, whatever the disk holds now
            return LatencyTable.from_dict(self._resume_table, source='resumed search state')
        if cfg.latency_table is not None:
            table = LatencyTable.load(cfg.latency_table)
        else:
            if self.dist.enabled:
                raise ConfigError('a latency budget under torchrun needs --latency-table (every process must '
                                  'predict with the same table): build one with tools/latency_table.py')
            print(f'search: no --latency-table: timing {cfg.model} on {self.device} at batch '
                  f'{cfg.latency_batch_size}, {torch.get_num_threads()} threads', file=sys.stderr)
            table = build_latency_table(cfg.model, {**kwargs, 'num_classes': self.num_classes}, device=self.device,
                                        batch_size=cfg.latency_batch_size, progress=self.dist.main)
        table.check_model(cfg.model, sn.block_dims, sn.input_size, where=cfg.latency_table or '')
        return table

    def build_optimizers(self):
        cfg = self.cfg
        original = self.cost.original
        ramp, settle = check_schedule(cfg, self.target / original, self.supernet.space.heads)
        self.schedule = BudgetSchedule(original, self.target, self.total_steps, ramp=ramp)
        self.drive = self.gate_step = None
        if cfg.gate_update == 'per-flop':
            self.drive = BudgetDrive(self.target, max(1.0, cfg.budget_integral * self.total_steps)
                                     if cfg.budget_integral > 0 else 0.0)
            self.gate_step = PerFlopGateStep(self.cost.gate_costs())
        self.settle_from = int(round((1 - settle) * self.total_steps))
        self.noise_mode = resolve_gate_noise(cfg.gate_noise, self.supernet, self.target, self.cost)
        self.ops_mode = resolve_ops_after_ramp(cfg.ops_after_ramp, self.supernet, self.target, self.cost)
        self.landed = 0
        self.op_ceiling: Optional[torch.Tensor] = None     # highest op per block once the target is reached
        reach = PER_FLOP_REACH if cfg.gate_update == 'per-flop' else ARCH_LR_REACH
        self.arch_lr = cfg.arch_lr if cfg.arch_lr is not None else max(PAPER_ARCH_LR, reach / self.total_steps)
        gates = self.supernet.gate_parameters()
        # per-flop: momentum as a running mean (dampening = momentum), so a step is lr x the normalised gradient
        arch = (create_optimizer_v2(gates, opt='adamw', lr=self.arch_lr, weight_decay=0.0) if self.gate_step is None
                else torch.optim.SGD(gates, lr=self.arch_lr, momentum=GATE_MOMENTUM, dampening=GATE_MOMENTUM))
        return {
            'weights': create_optimizer_v2(weight_param_groups(self.supernet, cfg.weight_decay), opt='adamw',
                                           lr=self.lr, weight_decay=cfg.weight_decay),
            'arch': arch,
        }

    def after_setup(self) -> None:
        cfg = self.cfg
        self.cost_fn = torch.compile(self.cost.__call__, mode=cfg.compile_mode) if self.compiled else self.cost
        self.task = None if self.teacher is None else distillation_task(
            self.net, self.teacher, self.criterion, cfg.distill, cfg.distill_alpha, cfg.distill_tau, self.device,
            token_student=hasattr(self.supernet.model, 'set_distilled_training'))
        if self.cfg.gate_init == 'importance' and not self.resuming:
            init_from_importance(self.supernet, self._fisher_scores(), spread=importance_spread(self.cfg.theta0))

    def _fisher_scores(self):
        """Fisher scores of the gates over a few training batches (summed over processes)."""
        cfg, d = self.cfg, self.dist
        gen = torch.Generator().manual_seed(cfg.seed + 7919 * d.rank)
        loader = torch.utils.data.DataLoader(self.train_set, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                             num_workers=min(cfg.workers, 2))
        batches = []
        for x, y in D.readable(loader):
            batches.append((x.to(self.device), y.to(self.device)))
            if len(batches) == cfg.importance_batches:
                break
        scores = gate_fisher(self.supernet, batches)
        if d.enabled:
            for s in scores.attn + scores.mlp + [h for h in scores.heads if h is not None]:
                torch.distributed.all_reduce(s)
        return scores

    def banner(self) -> str:
        ramp = f', target ramp over {self.schedule.ramp_steps:.0f} steps' if self.schedule.ramp_steps else ''
        frozen = 'ops and heads' if self.supernet.space.heads and self.supernet.space.ops else \
            'heads' if self.supernet.space.heads else 'ops'
        if self.settle_from < self.total_steps:
            ramp += f', {frozen} frozen from step {self.settle_from}'
        device = '' if self.latency_table is None else f' on {self.latency_table.describe()}'
        return (f', arch lr {self.arch_lr:.3g}; original {self.cost.fmt(self.cost.original)}{device}, '
                f'target {self.cost.fmt(self.target)}{ramp}; gates start {self.cfg.gate_init}, update {self.cfg.gate_update}, '
                f'noise {self.noise_mode}{" (auto)" if self.cfg.gate_noise == "auto" else ""}, '
                f'ops after the ramp {self.ops_mode}{" (auto)" if self.cfg.ops_after_ramp == "auto" else ""}'
                f'{"; compiled" if self.compiled else ""}')

    def resolved_config(self) -> Dict[str, Any]:
        budget = ({'target_latency_ms': self.target, 'target_latency_ratio': None} if self.latency_table is not None
                  else {'target_gflops': self.target, 'target_ratio': None})
        return {**super().resolved_config(), 'arch_lr': self.arch_lr, **budget}

    def gate_noise(self, step: int) -> float:
        mode = self.noise_mode
        if mode == 'anneal':
            span = self.schedule.ramp_steps or self.total_steps
            return max(0.0, 1.0 - step / span)
        return 1.0 if mode == 'sampled' else 0.0

    def compute_loss(self, x, y):
        self.supernet.set_gate_noise(self.gate_noise(self.global_step))
        with autocast(self.device, self.cfg.amp):
            if self.task is None:
                task = self.criterion(self.net(x), y)
                parts = {'ce': task.detach()}
            else:           # (1 - alpha) task loss + alpha distillation loss
                out = self.task(x, y)
                task, parts = out['loss'], {'task_loss': out['task_loss'].detach(), 'kd_loss': out['kd_loss'].detach()}
        cost = self.cost_fn()
        target = self.schedule.target(self.global_step)
        parts.update({self.cost.key: cost.detach(), 'target': target})
        if self.latency_table is not None:      # GFLOPs beside the predicted latency
            with torch.no_grad():
                parts['gflops'] = self.supernet.flops().detach()
        if self.drive is None:      # the paper: the penalty is part of the loss
            pen = self.cfg.loss_lambda * penalty(cost, target, self.cfg.flops_loss, self.target)
            return task.float() + pen, {**parts, 'penalty': pen.detach()}
        self._cost, self._drive = cost, self.drive(cost, target)
        return task.float(), {**parts, 'drive': self._drive}

    def log_fields(self) -> Dict[str, Any]:
        """The search's path: every block's op, open MLP units and (in a space with heads) the heads
        its msa keeps (0 for a conv or skip block), under the deterministic gates."""
        arch = self.supernet.architecture()
        fields = {'ops': [b.attn for b in arch.blocks], 'mlp_open': [b.mlp_hidden for b in arch.blocks]}
        if self.supernet.space.heads:
            fields['heads_open'] = [0 if b.attn != 'msa' else len(b.heads) if b.heads else d.heads
                                    for b, d in zip(arch.blocks, self.supernet.block_dims)]
        return fields

    def before_optimizer_step(self) -> None:
        if self.global_step >= self.settle_from:
            for slot in self.supernet.attn_slots:      # the optimisers skip parameters without a gradient
                slot.gate_logits.grad = None
                if slot.head_logits is not None:
                    slot.head_logits.grad = None
        if self.gate_step is not None:
            if self.scaler is not None:         # the drive is added to unscaled gradients
                self.scaler.unscale_(self.optimizers['arch'])
            self.gate_step.normalise(self.supernet.gate_parameters(), self._cost / self.cost.original)

    def after_optimizer_step(self) -> None:
        if self.gate_step is not None:
            self.gate_step.drive(self._drive, self.optimizers['arch'].param_groups[0]['lr'])
        ratchet = (self.supernet.space.ops and self.ops_mode == 'down'
                   and self.global_step + 1 >= self.schedule.ramp_steps)
        if ratchet and self.op_ceiling is not None:
            self.supernet.cap_ops(self.op_ceiling)
        self.supernet.keep_token_path()
        if ratchet:
            self.op_ceiling = self.supernet.op_levels()
        if self.cfg.land and self.global_step + 1 == self.total_steps:     # the last planned step
            self.landed = (self.supernet.land_on(self.target * 1e9) if self.latency_table is None
                           else self.supernet.land_on(self.target, self.cost))

    def model_state(self) -> Dict[str, Any]:
        return {'supernet': supernet_record(self.supernet), 'target_gflops': self.target,
                'latency_table': None if self.latency_table is None else self.latency_table.to_dict(),
                'drive': self.drive.state_dict() if self.drive is not None else None,
                'gate_step': self.gate_step.state_dict() if self.gate_step is not None else None,
                'op_ceiling': None if self.op_ceiling is None else self.op_ceiling.tolist()}

    def load_model_state(self, state: Dict[str, Any]) -> None:
        load_exactly(self.supernet, state['supernet']['state_dict'], 'resume checkpoint')
        if self.drive is not None and state.get('drive'):
            self.drive.load_state_dict(state['drive'])
            self.gate_step.load_state_dict(state['gate_step'])
        if state.get('op_ceiling') is not None:
            self.op_ceiling = torch.tensor(state['op_ceiling'], device=self.supernet.attn_slots[0].gate_logits.device)

    def evaluate(self, loader) -> Dict[str, float]:
        """The supernet under its deterministic gates, pinned so that only the chosen ops run."""
        self.supernet.pin_current()
        try:
            return super().evaluate(loader)
        finally:
            self.supernet.unpin()

    def end_epoch(self, metrics: Dict[str, float], eval_loader) -> Dict[str, Any]:
        arch = self.supernet.architecture()
        if self.dist.main:
            tqdm.write(arch_table(self.supernet, arch, self.latency_table) + f'\nval top-1 {metrics["top1"]:.2f}%  '
                       f'top-5 {metrics["top5"]:.2f}%', file=sys.stderr)
            arch.save(os.path.join(self.out, 'arch.yaml'))
        extra = {} if self.latency_table is None else {'latency_ms': self.latency_table.predict(arch)}
        return {'gflops': self.supernet.arch_flops(arch) / 1e9, **extra, 'target': self.target, 'arch': arch.to_dict()}

    def budget_record(self, arch: Architecture) -> Dict[str, Any]:
        """What search-final.pth (and the pruned checkpoint's provenance) records about the budget."""
        cost = self.cost
        record = {'kind': cost.kind, 'unit': cost.unit, 'target': self.target, 'achieved': cost.of(arch),
                  'original': cost.original}
        if self.latency_table is not None:
            record.update(ratio=self.cfg.target_latency_ratio, table=self.latency_table.to_dict())
        else:
            record.update(ratio=self.cfg.target_ratio)
        return record

    def finish(self) -> None:
        arch = self.supernet.architecture()
        gflops = self.supernet.arch_flops(arch) / 1e9
        achieved = self.cost.of(arch)
        if not self.dist.main:
            return
        arch.save(os.path.join(self.out, 'arch.yaml'))
        if self.latency_table is not None:
            self.latency_table.save(os.path.join(self.out, LATENCY_TABLE_FILE))
        atomic_save({
            'format': SEARCH_FORMAT, 'version': 1,
            'supernet': supernet_record(self.supernet),
            'arch': arch.to_dict(), 'kept': self.supernet.kept_units(),
            'data_config': self.data_config, 'classes': list(self.classes),
            'source': {'pretrained': self.cfg.pretrained, 'checkpoint': self.cfg.checkpoint},
            'target_gflops': None if self.latency_table is not None else self.target, 'achieved_gflops': gflops,
            'original_gflops': self.supernet.original_flops / 1e9,
            'budget': self.budget_record(arch),
            'config': self.resolved_config(),
        }, os.path.join(self.out, 'search-final.pth'))
        off = (achieved - self.target) / self.target
        if self.landed:
            print(f'search: landing {"opened" if self.landed > 0 else "closed"} {abs(self.landed)} MLP units '
                  'nearest to their threshold', file=sys.stderr)
        beside = '' if self.latency_table is None else f' predicted ({gflops:.4f} GFLOPs)'
        print(f'search: done, {self.cost.fmt(achieved)}{beside} for a target of {self.cost.fmt(self.target)} '
              f'({off:+.1%}); wrote {os.path.join(self.out, "search-final.pth")}', file=sys.stderr)
        if abs(off) > 0.02:
            print(f'search: warning: the searched architecture is {off:+.1%} off the {self.cost.kind} target; '
                  'search longer, or raise --loss-lambda or --arch-lr', file=sys.stderr)


def run_search(cfg: SearchConfig) -> SuperNet:
    """Run (or resume, with ``cfg.resume``) a search; returns the searched supernet."""
    state = None
    if cfg.resume:
        state = load_file(cfg.resume, STATE_FORMAT)
        cfg = resume_config(SearchConfig, cfg, state)
    trainer = SearchTrainer(cfg, state)
    trainer.run()
    return trainer.supernet


def main(argv: Optional[Sequence[str]] = None) -> int:
    run_search(parse_config(SearchConfig, 'search.py', 'Search a hybrid conv/attention architecture under a FLOPs budget.', argv))
    return 0
