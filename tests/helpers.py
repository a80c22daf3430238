"""What several test modules share: small models and supernets, gate set-ups, a reference conv, and
running the tools as a user does (pytest fixtures stay in conftest.py)."""
import copy
import os
import subprocess
import sys

import timm
import torch
import torch.nn.functional as F

import spvit
from spvit.checkpoint import SEARCH_FORMAT, supernet_record
from spvit.mixing import OFFSETS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what loading and running a pruned model must not import (the search machinery, fvcore)
SEARCH_MODULES = ('spvit.supernet', 'spvit.slots', 'spvit.gates', 'spvit.mixing', 'spvit.search', 'spvit.trainer',
                  'spvit.export', 'spvit.importance', 'spvit.budget', 'fvcore')


def load_in_fresh_interpreter(path, input_size, blocks='model.blocks'):
    """``spvit.load_pruned(path)`` and a forward pass in a fresh interpreter: the sorted names of the
    attention modules of ``blocks`` (an expression over ``model``) and the search modules it loaded."""
    code = ('import sys, torch, spvit\n'
            f'model = spvit.load_pruned({path!r}).eval()\n'
            f'model(torch.randn(1, *{tuple(input_size)!r}))\n'
            f'print(sorted({{type(b.attn).__name__ for b in {blocks}}}))\n'
            f'print([m for m in {SEARCH_MODULES!r} if m in sys.modules])')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       env={**os.environ, 'PYTHONPATH': os.path.dirname(os.path.dirname(spvit.__file__))})
    assert r.returncode == 0, r.stderr[-800:]
    attn, loaded = r.stdout.strip().splitlines()
    return eval(attn), eval(loaded)


def build(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    wake_post_norms(model)
    return model.eval()


def wake_post_norms(model, seed=0):
    """timm's Swin V2 starts its residual post-norms at zero (weight and bias), which makes every
    block the identity and hides what the attention and MLP compute, skip's norm bias included:
    give them random non-trivial affine parameters. Other models are left as they are."""
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.LayerNorm) and name.endswith(('norm1', 'norm2')) and not m.weight.any():
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.5


def supernet_and_original(name, theta0=1.5, alpha=0.01, search_space='spvit', **kwargs):
    """A timm model with random but fixed weights, its untouched copy, and the supernet made from it."""
    model = build(name, **kwargs)
    original = copy.deepcopy(model)
    return spvit.attach_search_space(model, theta0=theta0, alpha=alpha, model_name=name, model_kwargs=kwargs,
                                     search_space=search_space), original


SEARCH_MODEL = ['--model', 'vit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'patch_size=4', 'embed_dim=64',
                'depth=4', 'num_heads=4']
SEARCH_DATA = ['--mean', '0.5', '0.5', '0.5', '--std', '0.5', '0.5', '0.5', '--crop-pct', '1.0', '--workers', '0']


# A small ViT that keeps tests fast: 8x8 patch grid, 4 heads, 4 blocks.
SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)


def randomize_batchnorm(supernet, seed=0):
    """Give the conv branches' BatchNorms non-trivial eval statistics and affine parameters."""
    g = torch.Generator().manual_seed(seed)
    for slot in supernet.attn_slots:
        for bn in (slot.bn1, slot.bn3):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=g) * 0.1)


def random_arch(supernet, seed, heads=False, ops=spvit.ATTN_OPS):
    """A random architecture using all ``ops``, and random kept units (and, with ``heads``, a
    random proper subset of heads in every msa block)."""
    g = torch.Generator().manual_seed(seed)
    n = len(supernet.block_dims)
    ops = [ops[i % len(ops)] for i in torch.randperm(n, generator=g).tolist()]
    blocks, kept = [], []
    for op, dims in zip(ops, supernet.block_dims):
        width = int(torch.randint(1, dims.hidden + 1, (1,), generator=g))
        kept_heads = None
        if heads and op == 'msa':
            count = int(torch.randint(1, dims.heads, (1,), generator=g))
            kept_heads = torch.randperm(dims.heads, generator=g)[:count].tolist()
        blocks.append(spvit.BlockArch(op, width, kept_heads))
        kept.append(torch.randperm(dims.hidden, generator=g)[:width].sort().values)
    arch = spvit.Architecture(model=supernet.model_name, model_kwargs=supernet.model_kwargs, blocks=blocks)
    return arch, kept


def set_gates(supernet, arch, kept):
    """Gate logits whose deterministic gates select ``arch`` and ``kept`` (what a search ends with)."""
    for b, a, m, idx in zip(arch.blocks, supernet.attn_slots, supernet.mlp_slots, kept):
        n_open = spvit.ATTN_OPS.index(b.attn)
        a.gate_logits.data = torch.tensor([1. if i < n_open else -1. for i in range(3)])
        m.gate_logits.data = -torch.ones(m.hidden_features)
        m.gate_logits.data[idx] = 1.


# the q/k/v biases of the attentions the slots read (timm Attention, Swin's, Eva's separate ones)
QKV_BIASES = ('qkv.bias', 'q_bias', 'v_bias', 'q_proj.bias', 'v_proj.bias')


def randomize_mixing(supernet, seed=0, std=0.02):
    """Non-uniform head mixing at alpha=0.01, value biases that exercise the conv padding, and
    relative position bias tables and Swin V2's logit scales (BEiT's tables start at zero, V2's
    scales equal, which would hide a kept head reading another head's entries), and inner norms'
    affine (ones and zeros would hide a kept unit or head reading another's slice)."""
    g = torch.Generator().manual_seed(seed)
    for slot in supernet.attn_slots:
        slot.head_assign.data = torch.randn(slot.head_assign.shape, generator=g) * std
        for name, p in slot.named_parameters():
            if name in QKV_BIASES:
                p.data = torch.randn(p.shape, generator=g) * 0.1
            elif name == 'relative_position_bias_table':
                p.data = torch.randn(p.shape, generator=g)
            elif name == 'logit_scale':     # Swin V2's start equal (log 10), which would hide a swapped head
                p.data = torch.rand(p.shape, generator=g) * 3
    for slot in supernet.attn_slots + supernet.mlp_slots:
        if slot.norm is not None:
            slot.norm.weight.data = torch.rand(slot.norm.weight.shape, generator=g) + 0.5
            slot.norm.bias.data = torch.randn(slot.norm.bias.shape, generator=g) * 0.1


def search_payload(supernet, data_config=None):
    """A search checkpoint of a supernet at the end of its search (as tools/search.py writes it)."""
    return {'format': SEARCH_FORMAT, 'version': 1, 'supernet': supernet_record(supernet),
            'arch': supernet.architecture().to_dict(), 'kept': supernet.kept_units(),
            'data_config': data_config or {'input_size': [3, 32, 32], 'mean': [0.5] * 3, 'std': [0.5] * 3,
                                           'interpolation': 'bicubic', 'crop_pct': 0.875},
            'source': {'pretrained': True, 'checkpoint': None}, 'target_gflops': 0.01,
            'achieved_gflops': supernet.arch_flops(supernet.architecture()) / 1e9,
            'original_gflops': supernet.original_flops / 1e9, 'optimizer': {},
            'classes': [f'n0{i:07d}' for i in range(supernet.model.num_classes)]}


def conv_slot(supernet, logits, seed=1):
    """Block 1's attention slot in eval mode with non-trivial BatchNorm, non-uniform head mixing at
    alpha=0.01, random value biases (they exercise the conv padding) and the given gate logits."""
    randomize_batchnorm(supernet)
    supernet.eval()
    slot = supernet.attn_slots[1]
    g = torch.Generator().manual_seed(seed)
    slot.head_assign.data = torch.randn(slot.head_assign.shape, generator=g) * 0.02
    slot.qkv.bias.data = torch.randn(slot.qkv.bias.shape, generator=g)
    slot.gate_logits.data = torch.tensor(logits)
    return slot


def reference_conv(slot, x, op):
    """The conv ops written straight from the method doc, with conv2d on the mixed kernels."""
    heads, hd = slot.num_heads, slot.head_dim
    d = x.shape[-1]
    H, W = slot.grid_size
    npt = slot.num_prefix_tokens
    P = torch.softmax(slot.head_assign / slot.alpha, dim=0)
    Wv, bv = slot.qkv.weight[2 * d:], slot.qkv.bias[2 * d:]
    Wo, bo = slot.proj.weight, slot.proj.bias
    K = [sum(P[h, k] * Wv[h * hd:(h + 1) * hd] for h in range(heads)) for k in range(9)]
    b = [sum(P[h, k] * bv[h * hd:(h + 1) * hd] for h in range(heads)) for k in range(9)]
    O = [sum(P[h, k] * Wo[:, h * hd:(h + 1) * hd] for h in range(heads)) for k in range(9)]
    img = x[:, npt:].transpose(1, 2).reshape(x.shape[0], d, H, W)
    if op == 'conv1x1':
        weight, bias, out_w, bn = K[4][:, :, None, None], b[4], O[4], slot.bn1
        z = F.conv2d(img, weight, bias)
    else:
        weight = torch.zeros(hd, d, 3, 3)
        for k, (dy, dx) in enumerate(OFFSETS):
            weight[:, :, dy + 1, dx + 1] = K[k]
        bias, out_w, bn = sum(b), sum(O), slot.bn3
        z = F.conv2d(img, weight, bias, padding=1)
    z = (z - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
    z = torch.relu(z * bn.weight[:, None, None] + bn.bias[:, None, None])
    out = torch.einsum('bchw,dc->bhwd', z, out_w).reshape(x.shape[0], H * W, d) + bo
    return torch.cat([torch.zeros(x.shape[0], npt, d), out], dim=1)


def args(data, out, *extra):
    return [*SEARCH_MODEL, *SEARCH_DATA, '--data-dir', data, '--output-dir', str(out), '--batch-size', '16', *extra]


def tool(name, argv, **kw):
    env = {**os.environ, 'PYTHONPATH': REPO}
    return subprocess.run([sys.executable, os.path.join(REPO, 'tools', name), *argv], capture_output=True, text=True,
                          env=env, cwd=REPO, **kw)


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def start(tool, *args):
    # one thread each: several tools run at once here, and oversubscribed OpenMP threads crawl
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    return subprocess.Popen([sys.executable, os.path.join('tools', tool), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
