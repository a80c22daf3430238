"""Attention heads in the search space (--search-space heads|full): the head-gated slot against
timm, gated FLOPs against the architecture they select, pinned heads against the gated eval, the
arch file's heads key, and a short search with head gates landing on its target."""
import copy
import json

import pytest
import torch
import yaml

import spvit
from spvit import Architecture, ArchitectureError, BlockArch
from spvit.checkpoint import supernet_from_record, supernet_record
from spvit.importance import gate_fisher, init_from_importance

from helpers import SMALL, args, build, load, randomize_batchnorm, random_arch, set_gates


def head_supernet(space='full', name='vit_tiny_patch16_224', **kwargs):
    model = build(name, **(kwargs or SMALL))
    original = copy.deepcopy(model)
    return spvit.attach_search_space(model, model_name=name, model_kwargs=kwargs or SMALL, search_space=space), original


@pytest.mark.parametrize('space', ['heads', 'full'])
def test_all_heads_open_matches_timm(space):
    supernet, original = head_supernet(space)
    supernet.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (supernet(x) - original(x)).abs().max().item() <= 1e-5
    assert all(b.attn == 'msa' and b.heads is None for b in supernet.architecture().blocks)


def test_swin_heads_open_matches_timm():
    kwargs = dict(img_size=64, patch_size=4, window_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)
    supernet, original = head_supernet('full', 'swin_tiny_patch4_window7_224', **kwargs)
    supernet.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (supernet(x) - original(x)).abs().max().item() <= 1e-5


def test_closed_heads_drop_out_and_flops_follow_the_heads():
    """A closed head contributes nothing; the differentiable FLOPs equal the FLOPs of the
    architecture the deterministic gates select, heads included."""
    supernet, _ = head_supernet('full')
    randomize_batchnorm(supernet)
    g = torch.Generator().manual_seed(0)
    for a in supernet.attn_slots:
        a.head_logits.data = torch.randn(a.num_heads, generator=g)
    supernet.attn_slots[1].gate_logits.data = torch.tensor([1., 1., -1.])          # conv1x1: its heads do not count
    supernet.attn_slots[2].head_logits.data = torch.tensor([-1., -2., -0.5, -3.])    # msa keeps its best head
    arch = supernet.architecture()
    assert arch.blocks[1].attn == 'conv1x1' and arch.blocks[1].heads is None
    assert arch.blocks[2].heads == [2]
    kept = [b.heads for b in arch.blocks if b.attn == 'msa']
    assert any(h is not None for h in kept)
    assert supernet.flops().item() * 1e9 == pytest.approx(supernet.arch_flops(arch), rel=1e-6)
    # a head's gate multiplies exactly that head's output: closing it equals zeroing its v rows
    slot = supernet.attn_slots[0]
    slot.head_logits.data = torch.tensor([1., -1., 1., 1.])
    slot.eval()
    x = torch.randn(2, 65, 64)
    with torch.no_grad():
        gated = slot(x)
        rows, _ = slot.head_channels(torch.tensor([1]))
        slot.qkv.weight[rows[-slot.head_dim:]] = 0
        slot.qkv.bias[rows[-slot.head_dim:]] = 0
        slot.head_logits.data = torch.ones(4)
        assert (slot(x) - gated).abs().max().item() <= 1e-6


@pytest.mark.parametrize('seed', range(2))
def test_pinned_heads_equal_gated_eval(seed):
    supernet, _ = head_supernet('full')
    randomize_batchnorm(supernet, seed)
    arch, kept = random_arch(supernet, seed, heads=True, ops=('skip', 'conv1x1', 'msa'))   # conv3x3 is left out
    set_gates(supernet, arch, kept)
    for a, b in zip(supernet.attn_slots, arch.blocks):
        a.head_logits.data = torch.full((a.num_heads,), -1.)
        a.head_logits.data[b.heads or list(range(a.num_heads))] = 1.
    supernet.eval()
    assert supernet.architecture() == arch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gated = supernet(x)
        supernet.pin_current()
        assert supernet.architecture() == arch
        assert (supernet(x) - gated).abs().max().item() <= 1e-5


def test_arch_heads_key_round_trips_and_is_validated(tmp_path, small_supernet):
    supernet, _ = small_supernet
    arch = supernet.architecture()
    arch.blocks[0] = BlockArch('msa', 17, [3, 1])
    path = str(tmp_path / 'arch.yaml')
    arch.save(path)
    blocks = yaml.safe_load(open(path))['blocks']
    assert blocks[0]['heads'] == [1, 3] and 'heads' not in blocks[1]              # old files stay valid
    loaded = Architecture.load(path)
    assert loaded == arch and loaded.blocks[0].heads == [1, 3] and loaded.blocks[1].heads is None
    supernet.validate(loaded)
    with pytest.raises(ArchitectureError, match='head index 4 is out of range for 4 heads'):
        supernet.validate(Architecture(arch.model, [BlockArch('msa', 1, [4])] + arch.blocks[1:], arch.model_kwargs))
    for bad, message in (([], 'non-empty list'), ([1, 1], 'distinct'), ([-1], 'distinct head indices'),
                         ([0.5], 'head indices')):
        with pytest.raises(ArchitectureError, match=message):
            BlockArch('msa', 1, bad)
    with pytest.raises(ArchitectureError, match='only by msa blocks'):
        BlockArch('conv3x3', 1, [0])


def test_record_keeps_the_search_space(tmp_path):
    supernet, _ = head_supernet('full')
    supernet.attn_slots[2].head_logits.data[0] = -1.
    rebuilt = supernet_from_record(supernet_record(supernet))
    assert rebuilt.search_space == 'full' and rebuilt.architecture() == supernet.architecture()
    old = supernet_record(head_supernet('spvit')[0])
    del old['search_space']                                       # a record from before search spaces
    assert supernet_from_record(old).search_space == 'spvit'


def test_heads_space_keeps_msa_and_ranks_heads_with_units():
    supernet, _ = head_supernet('heads')
    assert len(supernet.gate_parameters()) == 8 and all(not a.gate_logits.requires_grad for a in supernet.attn_slots)
    assert [c.numel() for c in supernet.gate_costs()] == [4, 256] * 4
    with torch.no_grad():                                          # head 2 of block 0 is never read
        supernet.attn_slots[0].proj.weight[:, 32:48] = 0
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    scores = gate_fisher(supernet, batches)
    assert scores.heads[0][2] == 0 and (scores.heads[0][[0, 1, 3]] > 0).all()
    init_from_importance(supernet, scores, spread=1.4)
    lowest = min(p.detach().min().item() for p in supernet.gate_parameters())
    assert supernet.attn_slots[0].head_logits[2].detach().item() == lowest
    assert supernet.min_flops() == supernet.arch_flops(supernet.uniform_arch('msa', 1, heads=1))


def test_importance_ranks_a_head_against_units_by_loss_per_flop():
    """A head ranks above the units when its Fisher score per FLOP is higher: scores add up over
    parts (a head scoring twice what its FLOPs' worth of units score is worth more than they are),
    not their square roots, which would rank it below them."""
    from spvit.importance import GateScores
    supernet, _ = head_supernet('heads')
    head_cost, unit_cost = (c[0].item() for c in supernet.gate_costs()[:2])
    assert head_cost > 4 * unit_cost
    units = [torch.ones(m.hidden_features) for m in supernet.mlp_slots]
    heads = [torch.full((a.num_heads,), head_cost / unit_cost) for a in supernet.attn_slots]
    heads[0][0], heads[0][1] = 2 * head_cost / unit_cost, 0.5 * head_cost / unit_cost
    init_from_importance(supernet, GateScores([torch.zeros(3)] * len(units), heads, units), spread=1.4)
    unit_logits = torch.cat([m.gate_logits.detach() for m in supernet.mlp_slots])
    head0 = supernet.attn_slots[0].head_logits.detach()
    assert head0[0] > unit_logits.max() and head0[1] < unit_logits.min()


@pytest.mark.slow
@pytest.mark.parametrize('space', ['heads', 'full'])
def test_search_with_head_gates_lands_and_exports(image_folder, pretrained, tmp_path, space):
    """A short search in a space with heads lands on its target; the export keeps the searched heads
    and computes what the pinned supernet computes."""
    from spvit.export import export_search
    from spvit.flops import measure_flops
    from spvit.search import main as search_main
    out = tmp_path / space
    search_main(args(image_folder, out, '--checkpoint', pretrained, '--target-ratio', '0.3', '--epochs', '4',
                     '--search-space', space))
    final = load(out / 'search-final.pth')
    assert abs(final['achieved_gflops'] / final['target_gflops'] - 1) <= 0.02
    arch = Architecture.from_dict(final['arch'])
    if space == 'heads':        # all-msa costs 0.42 of the FLOPs: heads must go
        assert all(b.attn == 'msa' for b in arch.blocks) and any(b.heads for b in arch.blocks)
    steps = [r for r in map(json.loads, open(out / 'log.jsonl')) if r['kind'] == 'step']
    assert steps[-1]['heads_open'] == [0 if b.attn != 'msa' else len(b.heads or range(4)) for b in arch.blocks]
    assert all(len(r['heads_open']) == 4 for r in steps)          # the path, with heads
    # ops and heads are frozen once the target ramp ends (the default settle phase with heads)
    ramp_end = min(i for i, r in enumerate(steps) if r['target'] == pytest.approx(final['target_gflops']))
    assert len({(tuple(r['ops']), tuple(r['heads_open'])) for r in steps[ramp_end + 1:]}) == 1
    pm = export_search(str(out / 'search-final.pth'))
    assert pm.arch == arch
    measured, _ = measure_flops(pm.model, (3, 32, 32))
    assert abs(measured / (final['achieved_gflops'] * 1e9) - 1) < 0.005
    supernet = supernet_from_record(final['supernet'])
    supernet.pin(arch, [k.long() for k in final['kept']])
    supernet.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (pm.model(x) - supernet(x)).abs().max().item() <= 1e-4


def test_full_space_leaves_out_conv3x3_where_one_head_costs_less():
    """With heads in the space, conv3x3 (9 taps into a head-wide channel) costs more than msa with
    one head on these 65 tokens: it is no choice. Closing msa gives conv1x1 in the forward, the
    architecture and the FLOPs; the conv3x3 gate is held open and learns nothing."""
    from spvit.flops import attn_flops
    supernet, _ = head_supernet('full')
    dims = supernet.block_dims[0]
    assert attn_flops(dims, 'conv3x3') > attn_flops(dims, 'msa', 1)
    assert all(a.conv3x3_left_out for a in supernet.attn_slots)
    assert not any(a.conv3x3_left_out for a in head_supernet('spvit')[0].attn_slots)
    f1, fm = attn_flops(dims, 'conv1x1'), attn_flops(dims, 'msa')
    costs = supernet.gate_costs()[0] * supernet.original_flops
    assert costs.tolist() == pytest.approx([f1, 0, fm - f1], rel=1e-6)
    randomize_batchnorm(supernet)
    for a, logits in zip(supernet.attn_slots, ([1., 1., -1.], [1., -1., -1.], [1., -1., 1.], [-1., 1., 1.])):
        a.gate_logits.data = torch.tensor(logits)
    arch = supernet.architecture()
    assert [b.attn for b in arch.blocks] == ['conv1x1', 'conv1x1', 'msa', 'skip']
    assert supernet.flops().item() * 1e9 == pytest.approx(supernet.arch_flops(arch), rel=1e-6)
    supernet.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gated = supernet(x)
        supernet.pin_current()
        assert (supernet(x) - gated).abs().max().item() <= 1e-5
    supernet.unpin()
    supernet.train()
    supernet.set_gate_noise(0.)
    supernet(x).sum().backward()
    assert all(a.gate_logits.grad[1] == 0 for a in supernet.attn_slots)


@pytest.mark.parametrize('space,ramp,given,expected', [
    ('spvit', None, None, (0.6875, 0.1)),       # the paper's space: ops freeze for the last tenth
    ('full', None, None, (0.6875, 0.3125)),     # with heads: everything after the target ramp
    ('heads', 0.5, None, (0.5, 0.5)),
    ('full', 0.0, None, (0.0, 0.1)),            # no ramp (the paper's schedule): not frozen from step 0
    ('full', None, 0.2, (0.6875, 0.2)),         # given: as given
    ('spvit', 0.95, None, (0.95, 0.05)),        # a long ramp leaves the settle phase what remains
])
def test_settle_phase_defaults(space, ramp, given, expected):
    from spvit.search import SearchConfig, check_schedule
    cfg = SearchConfig(search_space=space, budget_ramp=ramp, settle_fraction=given)
    assert check_schedule(cfg, 0.45, heads=space != 'spvit') == pytest.approx(expected)
