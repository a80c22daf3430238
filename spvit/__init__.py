"""spvit: prune pretrained Vision Transformers into hybrid conv/attention models (SPViT)."""
from .arch import ATTN_OPS, Architecture, BlockArch
from .errors import ArchitectureError, CheckpointError, SpvitError, UnsupportedModelError
from .flops import BlockDims, measure_flops
from .supernet import SuperNet, attach_search_space

__version__ = '0.1.0'

__all__ = [
    'ATTN_OPS', 'Architecture', 'BlockArch', 'ArchitectureError', 'CheckpointError', 'SpvitError',
    'UnsupportedModelError', 'BlockDims', 'measure_flops', 'SuperNet', 'attach_search_space',
]
