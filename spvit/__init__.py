"""spvit: prune pretrained Vision Transformers into hybrid conv/attention models (SPViT)."""
from .arch import ATTN_OPS, Architecture, BlockArch
from .errors import ArchitectureError, CheckpointError, SpvitError, UnsupportedModelError
from .flops import BlockDims, measure_flops
from .export import build_from_arch, export_search, export_supernet, to_hybrid
from .pruned import PrunedModel, load_pruned, read_pruned
from .supernet import SuperNet, attach_search_space

__version__ = '0.1.0'

__all__ = [
    'ATTN_OPS', 'Architecture', 'BlockArch', 'ArchitectureError', 'CheckpointError', 'SpvitError',
    'UnsupportedModelError', 'BlockDims', 'measure_flops', 'SuperNet', 'attach_search_space',
    'to_hybrid', 'export_supernet', 'export_search', 'build_from_arch', 'PrunedModel', 'load_pruned', 'read_pruned',
]
