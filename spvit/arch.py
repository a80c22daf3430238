"""The architecture spec: per block an attention op and a kept MLP width, with a YAML/JSON form.

Which hidden units are kept travels with checkpoints, not in this file: the spec is what a person
reads, edits and hands to ``tools/export.py`` or ``tools/flops.py``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from .checkpoint import atomic_write_text, read_text
from .errors import ArchitectureError

# Cheapest first; the index of an op is the number of open cumulative gates.
ATTN_OPS = ('skip', 'conv1x1', 'conv3x3', 'msa')


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class BlockArch:
    """One block: its attention op, its kept MLP width and, for msa, the indices of the kept heads
    (None: every head)."""
    attn: str
    mlp_hidden: int
    heads: Optional[List[int]] = None

    def __post_init__(self) -> None:
        if self.attn not in ATTN_OPS:
            raise ArchitectureError(f"unknown attention op {self.attn!r}; expected one of {', '.join(ATTN_OPS)}")
        if not _is_int(self.mlp_hidden):
            raise ArchitectureError(f"mlp_hidden must be an integer, got {self.mlp_hidden!r}")
        if self.mlp_hidden < 1:
            raise ArchitectureError(f"mlp_hidden must be at least 1, got {self.mlp_hidden}")
        if self.heads is not None:
            if self.attn != 'msa':
                raise ArchitectureError(f"heads are kept only by msa blocks, not {self.attn}")
            if (not isinstance(self.heads, (list, tuple)) or not self.heads or not all(_is_int(h) for h in self.heads)
                    or min(self.heads) < 0 or len(set(self.heads)) != len(self.heads)):
                raise ArchitectureError(f"heads must be a non-empty list of distinct head indices, got {self.heads!r}")
            self.heads = sorted(self.heads)


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
            'blocks': [{'attn': b.attn, 'mlp_hidden': b.mlp_hidden, **({} if b.heads is None else {'heads': list(b.heads)})}
                       for b in self.blocks],
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
            if not isinstance(b, dict) or not {'attn', 'mlp_hidden'} <= set(b) <= {'attn', 'mlp_hidden', 'heads'}:
                raise ArchitectureError(f"{source}: block {i} must be {{attn: <op>, mlp_hidden: <int>}} (msa: optionally "
                                        f"heads: [<kept head indices>]), got {b!r}")
            try:
                parsed.append(BlockArch(b['attn'], b['mlp_hidden'], b.get('heads')))
            except ArchitectureError as e:
                raise ArchitectureError(f"{source}: block {i}: {e}") from None
        return cls(model=model, blocks=parsed, model_kwargs=dict(kwargs))

    def save(self, path: str) -> None:
        """Write YAML (or JSON for a ``.json`` path) atomically."""
        data = self.to_dict()
        text = json.dumps(data, indent=2) if path.endswith('.json') else yaml.safe_dump(data, sort_keys=False)
        atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str) -> 'Architecture':
        text = read_text(path, 'architecture file', ArchitectureError)
        try:
            data = json.loads(text) if path.endswith('.json') else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArchitectureError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: {first}") from None
        return cls.from_dict(data, source=path)

    def validate(self, max_hidden: Sequence[int], model: Optional[str] = None,
                 max_heads: Optional[Sequence[int]] = None) -> None:
        """Check the spec against a model with ``len(max_hidden)`` blocks of those MLP widths (and,
        given, of ``max_heads`` attention heads)."""
        if model is not None and model != self.model:
            raise ArchitectureError(f"architecture is for model {self.model!r}, not {model!r}")
        if len(self.blocks) != len(max_hidden):
            raise ArchitectureError(
                f"architecture has {len(self.blocks)} blocks but {self.model} has {len(max_hidden)}")
        for i, (b, m) in enumerate(zip(self.blocks, max_hidden)):
            if b.mlp_hidden > m:
                raise ArchitectureError(f"block {i}: mlp_hidden {b.mlp_hidden} exceeds the model's {m} hidden units")
        if max_heads is not None:
            for i, (b, h) in enumerate(zip(self.blocks, max_heads)):
                if b.heads is not None and max(b.heads) >= h:
                    raise ArchitectureError(f"block {i}: head index {max(b.heads)} is out of range for {h} heads")
