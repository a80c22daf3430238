"""The weight-shared search space: equivalence with timm, the conv branches against the method's
formulas, gates, weight sharing and pinning."""
import pytest
import torch

from spvit.gates import attention_gates, sample_gates
from spvit.mixing import OFFSETS

from helpers import (SMALL, conv_slot, randomize_batchnorm, random_arch, reference_conv, set_gates,
                     supernet_and_original)

EQUIVALENCE_CASES = [
    ('deit_tiny_patch16_224', {}),
    ('deit_tiny_distilled_patch16_224', {}),
    ('vit_tiny_patch16_224', dict(reg_tokens=4, img_size=96)),                       # register tokens
    ('deit_tiny_patch16_224', dict(img_size=160)),                                   # non-224
    ('vit_tiny_patch16_224', dict(SMALL, class_token=False, global_pool='avg')),     # average pooling
]


@pytest.mark.parametrize('name,kwargs', EQUIVALENCE_CASES)
def test_all_gates_open_matches_timm(name, kwargs):
    supernet, original = supernet_and_original(name, **kwargs)
    supernet.eval()
    size = original.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        diff = (supernet(x) - original(x)).abs().max().item()
    assert diff <= 1e-5
    assert all(b.attn == 'msa' for b in supernet.architecture().blocks)


def test_weights_are_shared_not_copied(small_supernet):
    supernet, original = small_supernet
    slot = supernet.attn_slots[0]
    blk = supernet.model.blocks[0]
    assert slot.qkv is blk.attn.qkv and slot.proj.weight is blk.attn.proj.weight
    # Only the head assignment, two BatchNorms and the gate logits are new.
    extra = sum(p.numel() for p in supernet.parameters()) - sum(p.numel() for p in original.parameters())
    per_block = [a.head_assign.numel() + 4 * a.head_dim + 3 + m.hidden_features
                 for a, m in zip(supernet.attn_slots, supernet.mlp_slots)]
    assert extra == sum(per_block)
    # Changing the value projection changes the conv branch output (it reads the same tensor).
    supernet.eval()
    slot.gate_logits.data = torch.tensor([5., 5., -5.])
    x = torch.randn(2, 65, 64)
    before = slot(x)
    with torch.no_grad():
        slot.qkv.weight[128:] += 0.1
    assert not torch.allclose(before, slot(x))


@pytest.mark.parametrize('op,logits', [('conv1x1', [5., -5., -5.]), ('conv3x3', [5., 5., -5.])])
def test_conv_branches_match_formulas(small_supernet, op, logits):
    slot = conv_slot(small_supernet[0], logits)
    x = torch.randn(2, 65, 64)
    with torch.no_grad():
        expected = reference_conv(slot, x, op)
        searched = slot(x)
        slot.pin(op)
        pinned = slot(x)
    assert (searched - expected).abs().max().item() <= 1e-5
    assert (pinned - expected).abs().max().item() <= 1e-5
    assert searched[:, 0].abs().max().item() == 0   # the class token gets no update


def test_skip_gives_zero(small_supernet):
    supernet, _ = small_supernet
    supernet.eval()
    slot = supernet.attn_slots[0]
    slot.gate_logits.data = torch.tensor([-1., 3., 3.])    # first cumulative gate closed
    with torch.no_grad():
        assert slot(torch.randn(2, 65, 64)).abs().max().item() == 0


def test_training_gates_are_binary_and_get_gradients():
    # Average pooling: with class-token pooling the last block's conv ops (which leave the class
    # token alone) cannot change the logits, so their gates would rightly get no gradient.
    supernet, _ = supernet_and_original('vit_tiny_patch16_224', **dict(SMALL, class_token=False, global_pool='avg'))
    supernet.train()
    for p in supernet.gate_parameters():
        p.data.zero_()          # p = 0.5: every op gets sampled over a few steps
    torch.manual_seed(0)
    for _ in range(30):
        g = sample_gates(torch.zeros(1000), training=True)
        assert set(g.unique().tolist()) <= {0.0, 1.0}
        supernet(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    for a, m in zip(supernet.attn_slots, supernet.mlp_slots):
        assert (a.gate_logits.grad != 0).all()
        assert a.head_assign.grad.abs().sum() > 0
        assert (m.gate_logits.grad != 0).float().mean() > 0.9


def test_detach_rule():
    """A cheaper gate's sample is detached exactly when a more expensive op is selected
    (cumulatively: g1 while g1 g2 is on, g2 while g1 g2 g3 is on)."""
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        logits = torch.zeros(3, requires_grad=True)
        g = attention_gates(logits, training=True)
        g.sum().backward()
        on = g.detach().bool().tolist()
        seen.add(tuple(on))
        assert (logits.grad[0] == 0) == (on[0] and on[1])
        assert (logits.grad[1] == 0) == (on[0] and on[1] and on[2])
        assert logits.grad[2] != 0
    assert len(seen) == 8


def test_eval_is_deterministic(small_supernet):
    supernet, _ = small_supernet
    for p in supernet.gate_parameters():
        p.data.normal_()
    supernet.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(supernet(x), supernet(x))


@pytest.mark.parametrize('seed', range(3))
def test_pinned_equals_gated_eval(small_supernet, seed):
    """Pinning an architecture computes what the deterministic gates of that architecture compute."""
    supernet, _ = small_supernet
    randomize_batchnorm(supernet, seed)
    arch, kept = random_arch(supernet, seed)
    set_gates(supernet, arch, kept)
    supernet.eval()
    assert supernet.architecture() == arch
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        gated = supernet(x)
        supernet.pin_current()
        pinned = supernet(x)
        assert supernet.architecture() == arch
        supernet.unpin()
        assert torch.equal(supernet(x), gated)
    assert (gated - pinned).abs().max().item() <= 1e-5


def test_pin_by_importance_keeps_largest_units(small_supernet):
    supernet, _ = small_supernet
    arch = supernet.architecture()
    for b in arch.blocks:
        b.mlp_hidden = 100
    supernet.pin(arch)
    m = supernet.mlp_slots[0]
    score = m.fc1.weight.abs().sum(1) * m.fc2.weight.abs().sum(0)
    assert set(m.kept.tolist()) == set(score.topk(100).indices.tolist())


def test_all_gates_closed_keeps_one_unit(small_supernet):
    supernet, _ = small_supernet
    for p in supernet.gate_parameters():
        p.data.fill_(-3.)
    arch = supernet.architecture()
    assert all(b.attn == 'skip' and b.mlp_hidden == 1 for b in arch.blocks)
    assert [k.numel() for k in supernet.kept_units()] == [1] * 4


@pytest.mark.parametrize('formulation', ['mixed_convs', 'depthwise_mixed_convs', 'shifted_mixed_convs'])
def test_mixed_convs_are_the_per_offset_head_mixtures(formulation):
    """conv3x3 is sum_k sum_h P[h,k] v_h read at offset k with zero padding, conv1x1 the centre
    offset's mixture, (B, P, C) each; both differentiable in v and in P. The eager (depthwise) and
    the compiled (shifted sum) formulations alike."""
    from spvit import mixing
    CENTER, mixed_convs = mixing.CENTER, getattr(mixing, formulation)
    torch.manual_seed(0)
    B, heads, (H, W), C = 2, 3, (4, 5), 2
    v = torch.randn(B, heads, H * W, C, dtype=torch.double, requires_grad=True)
    mix = torch.rand(heads, 9, dtype=torch.double, requires_grad=True)
    grid = v.detach().reshape(B, heads, H, W, C)
    expected = torch.zeros(B, H, W, C, dtype=torch.double)
    for k, (dy, dx) in enumerate(OFFSETS):
        for y in range(H):
            for x in range(W):
                if 0 <= y + dy < H and 0 <= x + dx < W:
                    expected[:, y, x] += (mix[:, k, None].detach() * grid[:, :, y + dy, x + dx]).sum(1)
    conv3x3, conv1x1 = mixed_convs(v.detach(), mix.detach(), (H, W))
    assert torch.allclose(conv3x3, expected.reshape(B, H * W, C))
    assert torch.allclose(conv1x1, (mix[:, CENTER, None, None].detach() * v.detach()).sum(1))
    assert torch.autograd.gradcheck(lambda v, m: torch.cat(mixed_convs(v, m, (H, W))), (v, mix))


@pytest.mark.parametrize('compiling', [False, True])
def test_border_bias_is_the_offset_biases_off_the_grid(monkeypatch, compiling):
    """At (y, x) the sum over the offsets k that leave the grid of b_k = sum_h P[h,k] b_v^h: the
    eager (matmul) and compiled (broadcast) formulations alike."""
    from spvit import mixing
    monkeypatch.setattr(mixing, '_is_compiling', lambda: compiling)
    torch.manual_seed(0)
    heads, (H, W), C = 3, (4, 5), 2
    bias, mix = torch.randn(heads, C, dtype=torch.double), torch.rand(heads, 9, dtype=torch.double)
    expected = torch.zeros(H, W, C, dtype=torch.double)
    for k, (dy, dx) in enumerate(OFFSETS):
        for y in range(H):
            for x in range(W):
                if not (0 <= y + dy < H and 0 <= x + dx < W):
                    expected[y, x] += (mix[:, k, None] * bias).sum(0)
    assert torch.allclose(mixing.border_bias(bias, mix, mixing.border_mask((H, W))), expected)


@pytest.mark.parametrize('compiling', [False, True])
def test_batch_norm_tokens_normalises_the_channels(monkeypatch, compiling):
    """The conv ops' BatchNorm over the channels of (B, P, C), read as the (B, C, P) view eager and
    as (B * P, C) rows compiled, each on the layout its mixing formulation gives: the output,
    gradient and running statistics of BatchNorm1d over the B * P rows."""
    from spvit import mixing
    monkeypatch.setattr(mixing, '_is_compiling', lambda: compiling)
    torch.manual_seed(0)
    B, P, C = 3, 7, 5
    ref_bn, bn = torch.nn.BatchNorm1d(C).double(), torch.nn.BatchNorm1d(C).double()
    data = torch.randn(B, P, C, dtype=torch.double) * 3 + 1
    z = (data.clone() if compiling else data.transpose(1, 2).contiguous().transpose(1, 2)).requires_grad_()
    ref = data.clone().requires_grad_()
    out, expected = mixing.batch_norm_tokens(z, bn), ref_bn(ref.reshape(-1, C)).reshape(B, P, C)
    assert torch.allclose(out, expected)
    grad = torch.randn(B, P, C, dtype=torch.double)
    out.backward(grad)
    expected.backward(grad)
    assert torch.allclose(z.grad, ref.grad)
    assert torch.allclose(bn.running_mean, ref_bn.running_mean) and torch.allclose(bn.running_var, ref_bn.running_var)


def test_supernet_record_round_trip(tmp_path, small_supernet):
    from spvit.checkpoint import atomic_save, load_file, supernet_from_record, supernet_record
    supernet, _ = small_supernet
    randomize_batchnorm(supernet)
    for p in supernet.gate_parameters():
        p.data.normal_()
    path = str(tmp_path / 's.pth')
    atomic_save({'format': 'spvit-search', 'supernet': supernet_record(supernet)}, path)
    rebuilt = supernet_from_record(load_file(path, 'spvit-search')['supernet'])
    supernet.eval(), rebuilt.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(supernet(x), rebuilt(x))
    assert rebuilt.architecture() == supernet.architecture()
