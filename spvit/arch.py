"""The architecture spec: per block an attention op and a kept MLP width, with a YAML/JSON form.

Which hidden units are kept travels with checkpoints, not in this file: the spec is what a person
reads, edits and hands to ``tools/export.py`` or ``tools/flops.py``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .errors import ArchitectureError

# Cheapest first; the index of an op is the number of open cumulative gates.
ATTN_OPS = ('skip', 'conv1x1', 'conv3x3', 'msa')


@dataclass
class BlockArch:
    attn: str
    mlp_hidden: int

    def __post_init__(self) -> None:
        if self.attn not in ATTN_OPS:
            raise ArchitectureError(f"unknown attention op {self.attn!r}; expected one of {', '.join(ATTN_OPS)}")
        if isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int):
            raise ArchitectureError(f"mlp_hidden must be an integer, got {self.mlp_hidden!r}")
        if self.mlp_hidden < 1:
            raise ArchitectureError(f"mlp_hidden must be at least 1, got {self.mlp_hidden}")


@dataclass
class Architecture:
    """A hybrid architecture of a timm model: ``blocks[i]`` describes transformer block i."""
    model: str
    blocks: List[BlockArch]
    model_kwargs: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {
            'model': self.model,
            'model_kwargs': dict(self.model_kwargs),
            'blocks': [{'attn': b.attn, 'mlp_hidden': b.mlp_hidden} for b in self.blocks],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = 'architecture') -> 'Architecture':
        if not isinstance(data, dict):
            raise ArchitectureError(f"{source}: expected a mapping with 'model' and 'blocks'")
        unknown = set(data) - {'model', 'model_kwargs', 'blocks'}
        if unknown:
            raise ArchitectureError(f"{source}: unknown keys {sorted(unknown)}")
        model = data.get('model')
        if not isinstance(model, str) or not model:
            raise ArchitectureError(f"{source}: 'model' must be a timm model name")
        kwargs = data.get('model_kwargs') or {}
        if not isinstance(kwargs, dict):
            raise ArchitectureError(f"{source}: 'model_kwargs' must be a mapping")
        blocks = data.get('blocks')
        if not isinstance(blocks, list) or not blocks:
            raise ArchitectureError(f"{source}: 'blocks' must be a non-empty list")
        parsed = []
        for i, b in enumerate(blocks):
            if not isinstance(b, dict) or set(b) != {'attn', 'mlp_hidden'}:
                raise ArchitectureError(f"{source}: block {i} must be {{attn: <op>, mlp_hidden: <int>}}, got {b!r}")
            try:
                parsed.append(BlockArch(b['attn'], b['mlp_hidden']))
            except ArchitectureError as e:
                raise ArchitectureError(f"{source}: block {i}: {e}") from None
        return cls(model=model, blocks=parsed, model_kwargs=dict(kwargs))

    def save(self, path: str) -> None:
        """Write YAML (or JSON for a ``.json`` path) atomically."""
        data = self.to_dict()
        text = json.dumps(data, indent=2) if path.endswith('.json') else yaml.safe_dump(data, sort_keys=False)
        tmp = f'{path}.tmp{os.getpid()}'
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> 'Architecture':
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise ArchitectureError(f"cannot read architecture file {path}: {e.strerror}") from None
        try:
            data = json.loads(text) if path.endswith('.json') else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArchitectureError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {first}") from None
        return cls.from_dict(data, source=path)

    def validate(self, max_hidden: Sequence[int], model: Optional[str] = None) -> None:
        """Check the spec against a model with ``len(max_hidden)`` blocks of those MLP widths."""
        if model is not None and model != self.model:
            raise ArchitectureError(f"architecture is for model {self.model!r}, not {model!r}")
        if len(self.blocks) != len(max_hidden):
            raise ArchitectureError(
                f"architecture has {len(self.blocks)} blocks but {self.model} has {len(max_hidden)}")
        for i, (b, m) in enumerate(zip(self.blocks, max_hidden)):
            if b.mlp_hidden > m:
                raise ArchitectureError(f"block {i}: mlp_hidden {b.mlp_hidden} exceeds the model's {m} hidden units")
