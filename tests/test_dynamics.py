"""Search dynamics: the budget ramp and its integral price, the per-FLOP gate step, importance
initialisation, and the rule that a class-token model keeps one msa block."""
import pytest
import torch
import torch.nn.functional as F

import spvit
from spvit.budget import MAX_RAMP, BudgetSchedule, FlopsDrive, PerFlopGateStep, default_ramp, penalty
from spvit.errors import ArchitectureError
from spvit.export import build_from_arch
from spvit.importance import gate_fisher, init_from_importance, ranked_logits
from spvit.search import importance_spread

from helpers import SMALL, supernet_and_original


def test_ramp_and_paper_penalty():
    b = BudgetSchedule(original=1.0, goal=0.4, total_steps=100, ramp=0.5)
    assert [b.target(s) for s in (0, 25, 50, 99)] == pytest.approx([1.0, 0.7, 0.4, 0.4])
    assert BudgetSchedule(1.0, 0.4, 100).target(0) == 0.4                    # ramp 0: the paper
    # default ramp: the same closing speed at every budget, reached early for a shallow one
    assert default_ramp(0.6) == pytest.approx(0.5) and default_ramp(0.3) == MAX_RAMP
    speed = [(1 - r) / default_ramp(r) for r in (0.8, 0.6, 0.45)]
    assert speed == pytest.approx([speed[0]] * 3)
    f = torch.tensor(0.9)
    assert penalty(f, 0.4, 'absolute', 0.4).item() == pytest.approx(0.25)
    assert penalty(f, 0.4, 'relative', 0.4).item() == pytest.approx((0.5 / 0.4) ** 2)


def test_drive_is_a_bounded_pi_controller_and_round_trips():
    d = FlopsDrive(goal=0.5, integral_steps=10, gain=10.0, limit=2.0)
    u = d(torch.tensor(0.505), 0.5)             # e = 0.01: P 0.1, I 0.01
    assert u.item() == pytest.approx(0.11)
    u = d(torch.tensor(0.9), 0.5)               # far above: P saturates, the integral stands still
    assert u.item() == 2.0 and float(d.integral) == pytest.approx(0.01)
    for _ in range(100):
        u = d(torch.tensor(0.55), 0.5)          # e = 0.1, P = 1: the integral grows to its bound
    assert u.item() == 2.0 and float(d.integral) == pytest.approx(2.0)
    e = FlopsDrive(goal=0.5, integral_steps=10, gain=10.0)
    e.load_state_dict(d.state_dict())
    assert e(torch.tensor(0.3), 0.5).item() == pytest.approx(-2.0) and float(e.integral) == pytest.approx(2.0)   # P -4: I stays
    assert FlopsDrive(0.5, integral_steps=0)(torch.tensor(0.51), 0.5).item() == pytest.approx(0.4)   # default gain 20


def test_per_flop_step_normalises_the_task_and_drives_every_gate_alike():
    """Task gradients: divided by each gate's FLOPs share, then by one RMS (so scaling the loss
    changes nothing). Drive: every gate moves by lr * u after the step, however far from zero."""
    results = []
    for scale in (1.0, 1000.0):
        a = torch.nn.Parameter(torch.tensor([0.0, 2.0, -3.0]))
        m = torch.nn.Parameter(torch.tensor([0.0, 1.0, 4.0, -1.0]))
        costs = [torch.tensor([0.1, 0.2, 0.4]), torch.full((4,), 0.01)]
        flops = sum((((p > 0).float() + torch.sigmoid(p) - torch.sigmoid(p).detach()) * c).sum() for p, c in zip((a, m), costs))
        a.grad, m.grad = costs[0] * 2 * scale, costs[1] * 2 * scale
        m.grad[3] = 0
        step = PerFlopGateStep(costs)
        step.normalise([a, m], flops.sum())
        grads = torch.cat([a.grad, m.grad])
        before = torch.cat([a, m]).detach().clone()
        step.drive(torch.tensor(0.5), lr=0.1)
        results.append((grads, torch.cat([a, m]).detach() - before))
    (g1, moved1), (g2, moved2) = results
    assert torch.allclose(g1, g2, rtol=1e-5)
    assert g1[6] == 0 and torch.allclose(g1[[0, 1, 2, 3, 4, 5]], g1[0].expand(6))
    assert torch.allclose(moved1, torch.full((7,), -0.05), atol=1e-6)


def test_fisher_scores_are_zero_for_unused_units_and_ranked_logits_keep_theta0(small_supernet):
    supernet, _ = small_supernet
    dead = [torch.arange(0, 256, 4) + i for i in range(4)]
    with torch.no_grad():
        for m, d in zip(supernet.mlp_slots, dead):
            m.fc2.weight[:, d] = 0
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    fisher = gate_fisher(supernet, batches)
    attn, scores = fisher.attn, fisher.mlp
    assert fisher.heads == [None] * 4                              # the paper's space has no head gates
    for s, d in zip(scores, dead):
        assert (s[d] == 0).all() and (s.sum() > 0)
    assert all(a[2] > 0 for a in attn)                            # every msa matters at first
    assert supernet.training and all(s.gate_values is None for s in supernet.attn_slots + supernet.mlp_slots)
    logits = ranked_logits(scores, 1.5, 1.0)
    flat = torch.cat(logits)
    assert flat.mean().item() == pytest.approx(1.5, abs=1e-4)
    assert flat.min().item() == pytest.approx(0.5) and flat.max().item() == pytest.approx(2.5)
    init_from_importance(supernet, fisher, 1.0)
    assert all(a.gate_logits[:2].tolist() == [1.5, 1.5] for a in supernet.attn_slots)
    live = [torch.ones(256, dtype=torch.bool).index_fill_(0, d, False) for d in dead]
    dead_logits = torch.cat([m.gate_logits[d] for m, d in zip(supernet.mlp_slots, dead)])
    live_logits = torch.cat([m.gate_logits[k] for m, k in zip(supernet.mlp_slots, live)])
    assert dead_logits.max() < live_logits.min()                   # unused units rank lowest, in every block


@pytest.mark.slow
def test_useful_units_stay_open_while_unused_ones_close_first():
    """Fisher-ranked start, per-FLOP steps, the ramp and the drive together (weights frozen, MLP
    gates only): units that serve nothing close first, the FLOPs follow the ramp without a jump
    and land on the target."""
    supernet, original = supernet_and_original('vit_tiny_patch16_224', **SMALL)
    unused = [torch.randperm(256, generator=torch.Generator().manual_seed(i))[:128] for i in range(4)]
    with torch.no_grad():
        for m, u, t in zip(supernet.mlp_slots, unused, original.blocks):
            m.fc2.weight[:, u] = 0
            t.mlp.fc2.weight[:, u] = 0
    teacher = original.eval()
    g = torch.Generator().manual_seed(0)

    def batch():                            # the task: the original's class for random images
        x = torch.randn(16, 3, 32, 32, generator=g)
        with torch.no_grad():
            return x, teacher(x).argmax(1)

    init_from_importance(supernet, gate_fisher(supernet, [batch() for _ in range(4)]), spread=importance_spread(1.5))
    supernet.train()
    for a in supernet.attn_slots:           # msa throughout: only the MLP units are searched here
        a.gate_logits.data.fill_(20.0)
    gates = [m.gate_logits for m in supernet.mlp_slots]
    original_gflops = supernet.original_flops / 1e9
    unit = spvit.flops.mlp_flops(supernet.block_dims[0], 1) / 1e9
    target = original_gflops - 0.8 * 512 * unit          # 80% of the unused units' FLOPs
    steps, lr = 120, 5.0 / 120
    schedule = BudgetSchedule(original_gflops, target, steps, ramp=0.6)
    drive = FlopsDrive(target, integral_steps=0.2 * steps)
    gate_step = PerFlopGateStep(supernet.gate_costs()[1::2])
    opt = torch.optim.SGD(gates, lr=lr, momentum=0.9, dampening=0.9)
    path, order = [], []               # FLOPs, and (unused, used) units closed, after each step
    for step in range(steps):
        x, y = batch()
        flops = supernet.flops()
        path.append(flops.item())
        u = drive(flops, schedule.target(step))
        for p in supernet.parameters():
            p.grad = None
        F.cross_entropy(supernet(x), y).backward()
        gate_step.normalise(gates, flops / original_gflops)
        opt.step()
        gate_step.drive(u, lr)
        closed = [m.gate_logits <= 0 for m in supernet.mlp_slots]
        closed_unused = sum(int(c[i].sum()) for c, i in zip(closed, unused))
        order.append((closed_unused, sum(int(c.sum()) for c in closed) - closed_unused))
    achieved = supernet.flops().item()
    assert abs(achieved - target) / target <= 0.02
    assert max(abs(a - b) for a, b in zip(path, path[10:])) <= 0.05 * original_gflops      # no cliff
    first = next(o for o in order if sum(o) >= 100)          # the first hundred units to close
    assert first[0] >= 0.9 * sum(first)
    assert order[-1][0] >= 2 * order[-1][1]


def test_keep_token_path_reopens_one_msa(small_supernet):
    supernet, _ = small_supernet
    assert supernet.needs_msa
    for i, a in enumerate(supernet.attn_slots):
        a.gate_logits.data = torch.tensor([1.0, 1.0, -0.5 - i])    # every block conv3x3
    supernet.keep_token_path()
    assert [b.attn for b in supernet.architecture().blocks] == ['msa', 'conv3x3', 'conv3x3', 'conv3x3']
    supernet.keep_token_path()                                     # a no-op once one block keeps msa
    assert supernet.attn_slots[0].gate_logits.min().item() == pytest.approx(1e-3)
    avg, _ = supernet_and_original('vit_tiny_patch16_224', **dict(SMALL, class_token=False, global_pool='avg'))
    assert not avg.needs_msa
    for a in avg.attn_slots:
        a.gate_logits.data = torch.tensor([1.0, -1.0, -1.0])
    avg.keep_token_path()
    assert {b.attn for b in avg.architecture().blocks} == {'conv1x1'}


def test_cap_ops_lets_ops_only_move_down(small_supernet):
    supernet, _ = small_supernet
    rows = ([1.0, 1.0, 0.5], [1.0, 1.0, -0.5], [1.0, -0.2, 0.3], [-1.0, 2.0, 2.0])   # msa, conv3x3, conv1x1, skip
    for a, row in zip(supernet.attn_slots, rows):
        a.gate_logits.data = torch.tensor(row)
    ceiling = supernet.op_levels()
    assert ceiling.tolist() == [3, 2, 1, 0]
    for a in supernet.attn_slots:                        # every op tries to rise to msa
        a.gate_logits.data = a.gate_logits.data.abs()
    supernet.attn_slots[1].gate_logits.data[1] = -0.1     # block 1 falls to conv1x1: allowed
    supernet.cap_ops(ceiling)
    assert [b.attn for b in supernet.architecture().blocks] == ['msa', 'conv1x1', 'conv1x1', 'skip']
    # only the gate just above the ceiling moved, to just below its threshold
    assert supernet.attn_slots[2].gate_logits.tolist() == pytest.approx([1.0, -1e-3, 0.3])
    assert supernet.attn_slots[0].gate_logits.tolist() == pytest.approx([1.0, 1.0, 0.5])


def test_no_token_path_is_refused_for_class_token_models_only():
    conv = [spvit.BlockArch('conv1x1', 100)] * 4
    with pytest.raises(ArchitectureError, match='no block of the architecture keeps msa'):
        build_from_arch('vit_tiny_patch16_224', SMALL, spvit.Architecture('vit_tiny_patch16_224', conv, SMALL))
    avg = dict(SMALL, class_token=False, global_pool='avg')
    pm = build_from_arch('vit_tiny_patch16_224', avg, spvit.Architecture('vit_tiny_patch16_224', conv, avg))
    assert pm.model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_landing_flips_the_units_nearest_their_threshold(small_supernet):
    supernet, _ = small_supernet
    g = torch.Generator().manual_seed(0)
    for m in supernet.mlp_slots:
        m.gate_logits.data = torch.randn(256, generator=g)
    before = [m.gate_logits.detach().clone() for m in supernet.mlp_slots]
    unit = spvit.flops.mlp_flops(supernet.block_dims[0], 1)
    now = supernet.arch_flops(supernet.architecture())
    for target, flipped in ((now - 40.2 * unit, -40), (now + 7.4 * unit, 7)):
        for m, b in zip(supernet.mlp_slots, before):
            m.gate_logits.data = b.clone()
        assert supernet.land_on(target) == flipped
        assert abs(supernet.arch_flops(supernet.architecture()) - target) <= unit / 2
        changed = torch.cat([(m.gate_logits != b) for m, b in zip(supernet.mlp_slots, before)])
        margin = torch.cat([b.abs() for b in before])
        side = torch.cat([(b > 0) if flipped < 0 else (b <= 0) for b in before])
        # the flipped units are the ones of that side nearest to zero
        assert margin[changed].max() <= margin[side & ~changed].min()


def test_gate_noise_scales_the_sampling_and_zero_forwards_the_eval_gates():
    """Noise 1 is the paper's relaxed Bernoulli (a gate is on with probability sigmoid(logit));
    noise 0 forwards exactly the eval gates and keeps the sigmoid's gradient; anneal falls to 0
    over the target ramp."""
    from spvit.gates import sample_gates
    from spvit.search import SearchTrainer
    logits = torch.tensor([-2.0, -0.5, 0.5, 2.0]).repeat(20000, 1)
    torch.manual_seed(0)
    on = sample_gates(logits, training=True).mean(0)
    assert torch.allclose(on, torch.sigmoid(logits[0]), atol=0.01)
    torch.manual_seed(0)
    assert float(sample_gates(logits, True, noise=0.5).mean(0)[3]) == pytest.approx(float(torch.sigmoid(torch.tensor(4.0))), abs=0.01)
    x = torch.tensor([-1.0, -0.1, 0.2, 3.0], requires_grad=True)
    g = sample_gates(x, training=True, noise=0.0)
    assert torch.equal(g.detach(), sample_gates(x, training=False))
    g.sum().backward()
    assert torch.allclose(x.grad, torch.sigmoid(x) * (1 - torch.sigmoid(x)))

    class Ramp:                  # the attributes gate_noise reads
        schedule = BudgetSchedule(1.0, 0.5, total_steps=100, ramp=0.5)
        total_steps = 100
    for mode, expected in (('sampled', [1, 1, 1]), ('none', [0, 0, 0]), ('anneal', [1, 0.5, 0])):
        Ramp.noise_mode = mode
        assert [SearchTrainer.gate_noise(Ramp, s) for s in (0, 25, 60)] == pytest.approx(expected)


def test_auto_gate_noise_samples_only_where_ops_must_change():
    """auto: no noise while msa in every block (one unit per MLP) fits the budget, anneal below it."""
    from spvit.search import resolve_gate_noise
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **SMALL)
    floor = supernet.arch_flops(supernet.uniform_arch('msa', 1)) / 1e9
    assert resolve_gate_noise('auto', supernet, floor) == 'none'
    assert resolve_gate_noise('auto', supernet, floor * 0.99) == 'anneal'
    assert resolve_gate_noise('sampled', supernet, floor) == 'sampled'


def test_auto_ops_after_ramp_holds_ops_down_only_where_they_must_fall_in_the_papers_space():
    """auto: ``down`` in the paper's space below msa in every block, ``free`` above it and in a space
    with heads; an explicit mode is kept."""
    from spvit.search import resolve_ops_after_ramp
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **SMALL)
    full, _ = supernet_and_original('vit_tiny_patch16_224', search_space='full', **SMALL)
    floor = supernet.arch_flops(supernet.uniform_arch('msa', 1)) / 1e9
    assert resolve_ops_after_ramp('auto', supernet, floor) == 'free'
    assert resolve_ops_after_ramp('auto', supernet, floor * 0.99) == 'down'
    assert resolve_ops_after_ramp('auto', full, floor * 0.99) == 'free'
    assert resolve_ops_after_ramp('free', supernet, floor * 0.99) == 'free'
    assert resolve_ops_after_ramp('down', supernet, floor) == 'down'
