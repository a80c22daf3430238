"""An architecture's pruned model beside the unmodified timm model it came from: what the FLOP
report and the latency benchmark compare."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch.nn as nn

from .arch import Architecture, BlockArch
from .errors import SpvitError
from .flops import BlockDims
from .hybrid import mlp_widths
from .models import create_model
from .families import check_model, family_of


@dataclass
class ModelPair:
    arch: Architecture
    original: nn.Module     # the unmodified timm model (random init unless it came with weights)
    model: nn.Module        # the pruned model of ``arch`` (``original`` itself for an all-msa arch)
    provenance: Dict[str, Any] = field(default_factory=dict)     # a pruned checkpoint's

    @property
    def input_size(self) -> Tuple[int, int, int]:
        return family_of(self.original).input_size(self.original)

    @property
    def block_dims(self) -> List[BlockDims]:
        return family_of(self.original).block_dims(self.original)


def full_architecture(model_name: str, model_kwargs: Dict[str, Any], model: nn.Module) -> Architecture:
    """The unmodified model as an architecture: every block msa with its full MLP."""
    return Architecture(model=model_name, model_kwargs=dict(model_kwargs),
                        blocks=[BlockArch('msa', w) for w in mlp_widths(model)])


def _original(model_name: str, model_kwargs: Dict[str, Any]) -> nn.Module:
    model = create_model(model_name, model_kwargs).eval()
    check_model(model)
    return model


def load_pair(
        model: Optional[str] = None,
        arch: Optional[str] = None,
        pruned: Optional[str] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> ModelPair:
    """Exactly one of: a timm model name, an architecture file (built with random init) or a
    pruned checkpoint. ``model_kwargs`` go to ``timm.create_model`` (over the architecture's own)."""
    from .export import build_from_arch
    from .pruned import read_pruned
    model_kwargs = dict(model_kwargs or {})
    if sum(x is not None for x in (model, arch, pruned)) != 1:
        raise SpvitError('give exactly one of a model name, an architecture file or a pruned checkpoint')
    if pruned is not None:
        if model_kwargs:
            raise SpvitError('model kwargs and img size cannot change a pruned checkpoint')
        loaded = read_pruned(pruned)
        return ModelPair(loaded.arch, _original(loaded.arch.model, loaded.arch.model_kwargs), loaded.model,
                         loaded.provenance)
    if arch is not None:
        spec = Architecture.load(arch)
        kwargs = {**spec.model_kwargs, **model_kwargs}
        built = build_from_arch(spec.model, kwargs, spec)
        return ModelPair(built.arch, _original(spec.model, kwargs), built.model)
    original = _original(model, model_kwargs)
    return ModelPair(full_architecture(model, model_kwargs, original), original, original)


__all__ = ['ModelPair', 'full_architecture', 'load_pair']
