"""The pruned checkpoint: one file that rebuilds the pruned model without search code.

Format (``torch.load(weights_only=True)``)::

    {'format': 'spvit-pruned', 'version': 1,
     'model_name': str, 'model_kwargs': dict,      # what timm.create_model gets
     'arch': Architecture.to_dict(),               # per block attention op and MLP width
     'kept': [LongTensor per block],               # which original hidden units were kept
     'state_dict': {...},                          # the pruned model's weights
     'data_config': {'input_size', 'mean', 'std', 'interpolation', 'crop_pct', ...},
     'classes': [str, ...] or None,                # class names of the search's data, index = label
     'provenance': {'exported_from', 'source', 'target_gflops', 'achieved_gflops', 'original_gflops', ...}}

With ``safetensors=True`` the weights also go to ``model.safetensors`` (the rest as JSON in its
metadata) beside an ``arch.yaml``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn

from .arch import Architecture
from .checkpoint import atomic_save, atomic_write, load_file
from .errors import ArchitectureError, CheckpointError
from .hybrid import hybridize
from .models import create_model

PRUNED_FORMAT = 'spvit-pruned'
PRUNED_VERSION = 1
SAFETENSORS_NAME = 'model.safetensors'
ARCH_NAME = 'arch.yaml'
_META_KEYS = ('arch', 'data_config', 'provenance', 'classes')


def plain_data_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """timm's data config with tuples as lists, so it survives YAML/JSON and weights_only loading."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items()}


@dataclass
class PrunedModel:
    """An pruned model and what its checkpoint records about it."""
    model: nn.Module
    arch: Architecture
    kept: Optional[List[torch.Tensor]] = None
    data_config: Dict[str, Any] = field(default_factory=dict)
    provenance: Dict[str, Any] = field(default_factory=dict)
    classes: Optional[List[str]] = None

    def payload(self) -> Dict[str, Any]:
        return {
            'format': PRUNED_FORMAT,
            'version': PRUNED_VERSION,
            'model_name': self.arch.model,
            'model_kwargs': dict(self.arch.model_kwargs),
            'arch': self.arch.to_dict(),
            'kept': None if self.kept is None else [k.cpu() for k in self.kept],
            'state_dict': {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            'data_config': dict(self.data_config),
            'provenance': dict(self.provenance),
            'classes': None if self.classes is None else list(self.classes),
        }

    def save(self, path: str, safetensors: bool = False) -> None:
        """Write the checkpoint atomically; with ``safetensors`` also ``model.safetensors`` and
        ``arch.yaml`` in the same directory (each written atomically too)."""
        payload = self.payload()
        atomic_save(payload, path)
        if safetensors:
            _, weights, arch = pruned_files(path, safetensors)
            _save_safetensors(payload, weights)
            self.arch.save(arch)


def pruned_files(path: str, safetensors: bool = False) -> List[str]:
    """The files ``PrunedModel.save(path, safetensors)`` writes."""
    directory = os.path.dirname(os.path.abspath(path))
    return [path] + ([os.path.join(directory, SAFETENSORS_NAME), os.path.join(directory, ARCH_NAME)] if safetensors else [])


def _save_safetensors(payload: Dict[str, Any], path: str) -> None:
    from safetensors.torch import save_file
    metadata = {'format': PRUNED_FORMAT, 'version': str(PRUNED_VERSION)}
    metadata.update({k: json.dumps(payload[k]) for k in _META_KEYS})
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in payload['state_dict'].items()}, tmp,
                                            metadata=metadata))


def _read_safetensors(path: str) -> Dict[str, Any]:
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise CheckpointError(f'file not found: {path}')
    try:
        with safe_open(path, framework='pt') as f:
            metadata = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f'cannot read {path} (truncated, corrupted or not safetensors): {type(e).__name__}') from None
    if metadata.get('format') != PRUNED_FORMAT:
        raise CheckpointError(f'{path} is not an {PRUNED_FORMAT} safetensors file (no spvit metadata)')
    try:
        data = {k: json.loads(metadata.get(k, 'null')) for k in _META_KEYS}
        version = int(metadata['version'])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f'{path}: broken spvit metadata ({type(e).__name__}: {e})') from None
    arch = data['arch']
    return {'format': PRUNED_FORMAT, 'version': version, 'model_name': arch.get('model'),
            'model_kwargs': arch.get('model_kwargs') or {}, 'kept': None, 'state_dict': state_dict, **data}


REQUIRED_KEYS = ('model_name', 'model_kwargs', 'arch', 'state_dict')


def read_pruned(path: str, device: Optional[torch.device | str] = None) -> PrunedModel:
    """Rebuild the pruned model of a pruned checkpoint (``.pth`` or the ``.safetensors`` export)
    with what the file records about it."""
    ckpt = _read_safetensors(path) if path.endswith('.safetensors') else load_file(path, PRUNED_FORMAT)
    version = ckpt.get('version')
    if not isinstance(version, int):
        raise CheckpointError(f'{path}: pruned checkpoint without a valid version (got {version!r})')
    if version > PRUNED_VERSION:
        raise CheckpointError(f'{path}: pruned checkpoint version {version} is newer than this spvit reads ({PRUNED_VERSION})')
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f'{path} is an incomplete pruned checkpoint: missing {", ".join(missing)}')
    arch = Architecture.from_dict(ckpt['arch'], source=f'{path} (arch)')
    if arch.model != ckpt['model_name']:
        raise CheckpointError(f'{path}: architecture is for {arch.model!r} but the model is {ckpt["model_name"]!r}')
    model = create_model(ckpt['model_name'], ckpt['model_kwargs'])
    try:
        hybridize(model, arch)
    except ArchitectureError as e:
        raise CheckpointError(f'{path}: {e}') from None
    try:
        model.load_state_dict(ckpt['state_dict'])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f'{path}: weights do not fit the architecture: {str(e).strip().splitlines()[0]}') from None
    data_config = dict(ckpt.get('data_config') or {})
    # timm.data.resolve_model_data_config(model) then gives the recorded preprocessing.
    model.pretrained_cfg = {**(getattr(model, 'pretrained_cfg', None) or {}),
                            **{k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}}
    if device is not None:
        model.to(device)
    return PrunedModel(model.eval(), arch, ckpt.get('kept'), data_config, dict(ckpt.get('provenance') or {}),
                       ckpt.get('classes'))


def load_pruned(path: str, device: Optional[torch.device | str] = None) -> nn.Module:
    """The eval-ready pruned model of a pruned checkpoint, in one call."""
    return read_pruned(path, device).model


__all__ = ['PRUNED_FORMAT', 'PRUNED_VERSION', 'PrunedModel', 'plain_data_config', 'read_pruned', 'load_pruned']
