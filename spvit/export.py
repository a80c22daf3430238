"""Export: a pinned supernet becomes the pruned model, a plain timm model, with the same eval logits.

The pruned model is built the way ``load_pruned`` builds it (a fresh timm model given the
architecture's structure by ``hybridize``) and filled by a strict ``load_state_dict`` of weights
computed from the supernet, so an export and a reload can never differ in structure.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .arch import Architecture
from .checkpoint import SEARCH_FORMAT, load_file, supernet_from_record
from .errors import ArchitectureError, CheckpointError
from .families import family_of
from .hybrid import check_token_path, hybridize, mlp_widths
from .models import create_model
from .pruned import PrunedModel, plain_data_config
from .slots import AttentionSlot
from .supernet import SuperNet, attach_search_space

Tensor = torch.Tensor

SEARCH_ONLY = ('head_assign', 'gate_logits', 'head_logits', 'bn1.', 'bn3.')


# how the kept heads of msa slice each key of an attention's state: the rows of the stacked q/k/v
# projection, the channels of one of q/k/v or of the output projection's input (and of the inner
# norm before it), or the heads
_ROWS = ('qkv.weight', 'qkv.bias')
_CHANNELS = {'proj.weight': 1, 'norm.weight': 0, 'norm.bias': 0, 'q_bias': 0, 'v_bias': 0, 'q_proj.weight': 0,
             'q_proj.bias': 0, 'k_proj.weight': 0, 'v_proj.weight': 0, 'v_proj.bias': 0}
# (Swin V2: a logit scale per head, a row of the position-bias MLP's last layer per head)
_HEADS = {'relative_position_bias_table': 1, 'logit_scale': 0, 'cpb_mlp.2.weight': 0}


def _msa_state(slot: AttentionSlot) -> Dict[str, Tensor]:
    """The original attention's weights (Swin's relative position bias table, Eva's q/v biases or
    separate projections, Swin V2's logit scales and position-bias MLP), without what the search
    added; of the kept heads only, if the slot keeps some."""
    state = {k: v.detach() for k, v in slot.state_dict().items() if not k.startswith(SEARCH_ONLY)}
    if slot.pinned_heads is not None:
        rows, cols = slot.head_channels(slot.pinned_heads)
        for k in state:
            if k in _ROWS:
                state[k] = state[k][rows]
            elif k in _CHANNELS:
                state[k] = state[k].index_select(_CHANNELS[k], cols)
            elif k in _HEADS:
                state[k] = state[k].index_select(_HEADS[k], slot.pinned_heads)
    return state


def _conv_state(op: str, slot: AttentionSlot) -> Dict[str, Tensor]:
    """Conv weight/bias with the BatchNorm folded in, and the output projection (an inner norm's
    affine folded in), of a conv op: the pinned forward's own weights (``AttentionSlot.conv_weights``),
    in float64 so the folds add no rounding of their own."""
    f64 = {'dtype': torch.float64}
    with torch.no_grad():
        weight, bias, out_w, out_b, bn = slot.conv_weights(op, torch.float64)
        weight, bias = fuse_conv_bn_weights(weight, bias, bn.running_mean.to(**f64), bn.running_var.to(**f64), bn.eps,
                                            bn.weight.to(**f64), bn.bias.to(**f64))
    dtype = slot.proj.weight.dtype
    state = {'conv.weight': weight.detach().to(dtype), 'conv.bias': bias.detach().to(dtype), 'proj.weight': out_w.to(dtype)}
    if out_b is not None:
        state['proj.bias'] = out_b.detach().to(dtype)
    return state


# attention op -> the exported attention module's state, from the pinned slot
ATTENTION_EXPORTERS: Dict[str, Callable[[AttentionSlot], Dict[str, Tensor]]] = {
    'skip': lambda slot: {},
    'conv1x1': lambda slot: _conv_state('conv1x1', slot),
    'conv3x3': lambda slot: _conv_state('conv3x3', slot),
    'msa': _msa_state,
}


def pruned_state_dict(supernet: SuperNet, arch: Architecture, kept: Sequence[Tensor]) -> Dict[str, Tensor]:
    """The pruned model's state dict: the supernet's own weights outside the slots (less the
    attention pre-norm of skipped blocks, which the pruned model drops), and each slot's exported weights
    under the slot's name."""
    names = {id(m): n for n, m in supernet.model.named_modules()}
    dropped = [names[id(s)] + '.' for pair in zip(supernet.attn_slots, supernet.mlp_slots) for s in pair]
    dropped += [names[id(a)].rsplit('.', 1)[0] + '.norm1.' for a, b in zip(supernet.attn_slots, arch.blocks)
                if b.attn == 'skip']
    state = {k: v.detach() for k, v in supernet.model.state_dict().items() if not k.startswith(tuple(dropped))}
    for b, a, m, idx in zip(arch.blocks, supernet.attn_slots, supernet.mlp_slots, kept):
        state.update({f'{names[id(a)]}.{k}': v for k, v in ATTENTION_EXPORTERS[b.attn](a).items()})
        state.update({f'{names[id(m)]}.{k}': v for k, v in m.kept_state(idx).items()})
    return state


def to_pruned(supernet: SuperNet) -> nn.Module:
    """The pinned supernet as the pruned model (a plain timm model, eval mode) computing the same eval logits."""
    if not supernet.pinned:
        raise ArchitectureError('the supernet has no pinned architecture: call supernet.pin(...) before exporting')
    arch, kept = supernet.architecture(), supernet.kept_units()
    model = hybridize(create_model(supernet.model_name, supernet.model_kwargs), arch)
    model.load_state_dict(pruned_state_dict(supernet, arch, kept))
    param = next(supernet.parameters())
    return model.to(device=param.device, dtype=param.dtype).eval()


def export_supernet(
        supernet: SuperNet,
        data_config: Optional[Dict[str, Any]] = None,
        source: Optional[Dict[str, Any]] = None,
        target_gflops: Optional[float] = None,
        exported_from: str = 'supernet',
) -> PrunedModel:
    """Export a pinned supernet together with what its checkpoint records (data config, provenance)."""
    model = to_pruned(supernet)
    arch = supernet.architecture()
    provenance = {
        'exported_from': exported_from,
        'source': dict(source or {}),
        'target_gflops': target_gflops,
        'achieved_gflops': supernet.arch_flops(arch) / 1e9,
        'original_gflops': supernet.original_flops / 1e9,
    }
    if data_config is None:         # timm's pretrained config, at the input size the model was built for
        from timm.data import resolve_model_data_config
        data_config = {**resolve_model_data_config(model), 'input_size': family_of(model).input_size(model)}
    return PrunedModel(model, arch, [k.cpu() for k in supernet.kept_units()], plain_data_config(data_config), provenance)


def build_from_arch(
        model_name: str,
        model_kwargs: Optional[Dict[str, Any]],
        arch: Architecture,
        checkpoint: Optional[str] = None,
) -> PrunedModel:
    """An architecture built straight from original weights (random init without ``checkpoint``):
    conv ops start from uniform head mixing and fresh BatchNorm, and each MLP keeps the units with
    the largest |fc1 row| * |fc2 column| (a GLU's two input rows both counted)."""
    if arch.model != model_name:
        raise ArchitectureError(f'architecture is for model {arch.model!r}, not {model_name!r}')
    model_kwargs = dict(model_kwargs or {})
    model = create_model(model_name, model_kwargs, checkpoint=checkpoint)
    arch.validate(mlp_widths(model))                 # before the (slower) attach
    check_token_path(model, arch)
    arch = Architecture(model=model_name, model_kwargs=model_kwargs, blocks=list(arch.blocks))
    supernet = attach_search_space(model, model_name=model_name, model_kwargs=model_kwargs)
    supernet.pin(arch)
    return export_supernet(supernet, source={'pretrained': False, 'checkpoint': checkpoint},
                           exported_from='architecture')


def latency_provenance(budget: Dict[str, Any], arch: Architecture) -> Dict[str, Any]:
    """What a pruned checkpoint records of a latency budget: the target, the prediction for its
    architecture and the original's, and the table (with its device) they come from."""
    from .latency_model import LatencyTable
    table = LatencyTable.from_dict(budget['table'], source='the search checkpoint\'s latency table')
    return {'target_ms': budget['target'], 'ratio': budget.get('ratio'), 'predicted_ms': table.predict(arch),
            'original_predicted_ms': table.original_ms(), 'device': table.device, 'device_name': table.device_name,
            'batch_size': table.batch_size, 'threads': table.threads, 'torch_version': table.torch_version,
            'table': table.to_dict()}


SEARCH_KEYS = ('supernet', 'arch', 'kept')
RECORD_KEYS = ('model_name', 'model_kwargs', 'theta0', 'alpha', 'state_dict')


def export_search(path: str) -> PrunedModel:
    """Export a search checkpoint (``search-final.pth``): its supernet, pinned to its architecture
    and kept units, with its data config and provenance."""
    ckpt = load_file(path, SEARCH_FORMAT)
    record = ckpt.get('supernet')
    missing = [k for k in SEARCH_KEYS if k not in ckpt]
    missing += [f'supernet.{k}' for k in RECORD_KEYS if isinstance(record, dict) and k not in record]
    if missing or not isinstance(record, dict):
        raise CheckpointError(f'{path} is an incomplete search checkpoint: missing {", ".join(missing) or "supernet"}')
    arch = Architecture.from_dict(ckpt['arch'], source=f'{path} (arch)')
    if arch.model != record['model_name']:
        raise CheckpointError(f'{path}: architecture is for {arch.model!r} but the supernet is {record["model_name"]!r}')
    kept = ckpt['kept']
    if not isinstance(kept, (list, tuple)) or not all(isinstance(k, torch.Tensor) for k in kept):
        raise CheckpointError(f'{path}: kept units must be a list of index tensors')
    supernet = supernet_from_record(record)
    for i, (k, b) in enumerate(zip(kept, supernet.block_dims)):
        if k.numel() and (int(k.min()) < 0 or int(k.max()) >= b.hidden or k.unique().numel() != k.numel()):
            raise CheckpointError(f'{path}: block {i}: kept units are not distinct indices below {b.hidden}')
    supernet.pin(arch, [k.long() for k in kept])
    exported = export_supernet(supernet, data_config=ckpt.get('data_config'), source=ckpt.get('source'),
                               target_gflops=ckpt.get('target_gflops'), exported_from='search')
    exported.provenance['search_checkpoint'] = os.path.abspath(path)
    budget = ckpt.get('budget')
    if isinstance(budget, dict) and budget.get('kind') == 'latency':
        exported.provenance['latency_budget'] = latency_provenance(budget, arch)
    exported.classes = ckpt.get('classes')
    return exported


__all__ = ['ATTENTION_EXPORTERS', 'pruned_state_dict', 'to_pruned', 'export_supernet', 'build_from_arch',
           'export_search']
