"""spvit: prune pretrained Vision Transformers into hybrid conv/attention models (SPViT).

The names below are imported on first use (PEP 562), so ``spvit.load_pruned`` for inference
loads the pruned model's modules only: no supernet, gates, search loop or fvcore.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = '0.1.0'

# public name -> the module that defines it
_EXPORTS = {
    'ATTN_OPS': 'arch', 'Architecture': 'arch', 'BlockArch': 'arch',
    'ArchitectureError': 'errors', 'CheckpointError': 'errors', 'SpvitError': 'errors',
    'UnsupportedModelError': 'errors',
    'BlockDims': 'flops', 'measure_flops': 'flops',
    'build_from_arch': 'export', 'export_search': 'export', 'export_supernet': 'export', 'to_pruned': 'export',
    'PrunedModel': 'pruned', 'load_pruned': 'pruned', 'read_pruned': 'pruned',
    'SuperNet': 'supernet', 'attach_search_space': 'supernet',
    'LatencyTable': 'latency_model', 'build_latency_table': 'latency_model',
    'FAMILIES': 'families', 'Family': 'families', 'family_of': 'families', 'register_family': 'families',
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'.{_EXPORTS[name]}', __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted([*globals(), *_EXPORTS])
