"""Model families: what spvit knows about one kind of timm model, one module each, in a registry.

A family says how to recognise its models and what it cannot handle, where the blocks are (and the
grid their conv ops run on), what their FLOPs depend on, how the search slots attach, and how an
exported block keeps only some heads. Supernet, export, hybrid, flops, report and compare ask
``family_of(model)``; supporting a family is one new module registered with ``@register_family``
(imported at the end of this file) plus ``examples`` that the tests run their battery on.

Nothing a family module imports at load time is search code: loading a pruned model goes through
``layout`` and ``keep_heads``; ``attach`` imports the search slots when a search calls it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Tuple, Type, TypeVar

import torch.nn as nn

from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from ..flops import BlockDims

# (block, grid the conv ops run on, number of prefix tokens) for each block
Layout = List[Tuple[nn.Module, Tuple[int, int], int]]


class Family:
    """One timm model family. Subclasses fill in every method; ``name`` keys the registry."""
    name: str = ''
    # one line for errors and the supported-models table
    supported: str = ''
    # what the family handles beyond the standard block (for the supported-models table)
    handles: str = ''
    # what it refuses with a clear error
    refuses: str = ''
    # timm names of models the family covers, for the supported-models table (* as in timm.list_models)
    models: Tuple[str, ...] = ()
    # small models of the family, one per variant it handles: (timm name, create_model kwargs); the
    # tests run their battery on each
    examples: Tuple[Tuple[str, Dict[str, Any]], ...] = ()

    def model_class(self) -> Type[nn.Module]:
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise ``UnsupportedModelError`` (one line, naming the block) for what spvit cannot search."""
        raise NotImplementedError

    def layout(self, model: nn.Module) -> Layout:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> List[nn.Module]:
        return [blk for blk, _, _ in self.layout(model)]

    def input_size(self, model: nn.Module) -> Tuple[int, int, int]:
        pe = model.patch_embed
        return (pe.proj.in_channels, *pe.img_size)

    def block_dims(self, model: nn.Module) -> List[BlockDims]:
        """What each block's FLOPs depend on."""
        raise NotImplementedError

    def attention_types(self) -> Tuple[Type[nn.Module], ...]:
        """The timm attention modules the pruned model replaces (anything else is refused)."""
        raise NotImplementedError

    def keep_heads(self, attn: nn.Module, heads: int) -> nn.Module:
        """An attention like ``attn`` with only ``heads`` heads (random init; weights come from a state dict)."""
        raise NotImplementedError

    def attach(self, model: nn.Module, theta0: float, alpha: float, head_gates: bool = False) -> None:
        """Replace every block's attention and MLP by search slots that read the same parameters."""
        raise NotImplementedError


class TokenGridFamily(Family):
    """A plain ViT layout (``model.blocks`` on one patch grid after ``num_prefix_tokens`` tokens,
    ``embed_dim`` wide, timm's ``q_norm`` on the attention if it has one): ViT, Eva and BEiT share
    where the blocks are and what their FLOPs depend on."""

    def layout(self, model: nn.Module) -> Layout:
        grid, npt = tuple(model.patch_embed.grid_size), model.num_prefix_tokens
        return [(blk, grid, npt) for blk in model.blocks]

    def block_dims(self, model: nn.Module) -> List[BlockDims]:
        from ..flops import BlockDims
        h, w = model.patch_embed.grid_size
        npt = model.num_prefix_tokens
        return [BlockDims(tokens=h * w + npt, patches=h * w, dim=model.embed_dim, heads=blk.attn.num_heads,
                          hidden=mlp_hidden(blk.mlp),
                          qk_norm=not isinstance(getattr(blk.attn, 'q_norm', nn.Identity()), nn.Identity),
                          glu=is_glu(blk.mlp), attn_norm=isinstance(getattr(blk.attn, 'norm', None), nn.LayerNorm),
                          mlp_norm=isinstance(blk.mlp.norm, nn.LayerNorm))
                for blk in model.blocks]


FAMILIES: Dict[str, Family] = {}

F = TypeVar('F', bound=Type[Family])


def register_family(cls: F) -> F:
    FAMILIES[cls.name] = cls()
    return cls


def family_of(model: nn.Module) -> Family:
    """The family of ``model`` (subclasses, e.g. distilled DeiT, match their base class)."""
    for family in FAMILIES.values():
        if isinstance(model, family.model_class()):
            return family
    supported = '; '.join(f.supported for f in FAMILIES.values())
    raise UnsupportedModelError(f'{type(model).__name__} is not supported; spvit supports {supported}')


def check_model(model: nn.Module) -> Family:
    """The family of ``model`` once it has checked that spvit can search it (else one-line
    ``UnsupportedModelError``)."""
    family = family_of(model)
    family.check(model)
    return family


def supported_table() -> str:
    """The supported-models table of the README (markdown), from the registry."""
    rows = ['| family | timm models | handled | refused with a clear error |', '|---|---|---|---|']
    for f in FAMILIES.values():
        rows.append(f'| {f.name} | {", ".join(f"`{m}`" for m in f.models)} | {f.handles} | {f.refuses} |')
    return '\n'.join(rows)


def check_mlp(mlp: nn.Module, where: str, glu: bool = False) -> None:
    """The MLP slots gate the hidden units of a plain timm ``Mlp`` (fc1 -> act -> fc2) and, with
    ``glu``, of timm's ``GluMlp`` and ``SwiGLU``, with or without an inner LayerNorm over the hidden
    units (``scale_mlp``), whose statistics the slots take over the open units only. Another inner
    norm (RMSNorm, ...) is refused: the slots have no masked form of it."""
    from timm.layers import GluMlp, Mlp, SwiGLU
    kinds = (Mlp, GluMlp, SwiGLU) if glu else (Mlp,)
    names = 'timm Mlp, GluMlp or SwiGLU' if glu else 'timm Mlp'
    if type(mlp) not in kinds or not all(isinstance(getattr(mlp, n), nn.Linear) for n in ('fc1', 'fc1_g', 'fc1_x', 'fc2')
                                         if hasattr(mlp, n)):
        raise UnsupportedModelError(f'{where}: MLP {type(mlp).__name__} is not supported, only {names}')
    check_inner_norm(mlp.norm, f'{where}: MLP {type(mlp).__name__}')


def check_inner_norm(norm: nn.Module, what: str) -> None:
    """An inner norm (before an MLP's fc2 or an attention's proj) must be absent or an affine
    LayerNorm over the last dimension (timm's): the search slots take its statistics over the open
    channels only, and the FLOPs model counts an affine norm."""
    if isinstance(norm, nn.Identity) or (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine
                                         and len(norm.normalized_shape) == 1):
        return
    raise UnsupportedModelError(f'{what} with an inner {type(norm).__name__} is not supported, only an inner affine '
                                'LayerNorm')


def mlp_hidden(mlp: nn.Module) -> int:
    """Hidden units of a timm ``Mlp``, ``GluMlp`` or ``SwiGLU``: fc2's inputs (GluMlp's fc1 has two
    rows per unit)."""
    return mlp.fc2.in_features


def is_glu(mlp: nn.Module) -> bool:
    """Whether a unit of ``mlp`` has two input rows (timm ``GluMlp``, ``SwiGLU``)."""
    from timm.layers import GluMlp, SwiGLU
    return isinstance(mlp, (GluMlp, SwiGLU))


# each registers its family; the order is the order of the supported-models list
from . import vit  # noqa: E402,I001
from . import swin  # noqa: E402,I001
from . import swinv2  # noqa: E402,I001
from . import eva  # noqa: E402,I001
from . import beit  # noqa: E402,I001

__all__ = ['Family', 'TokenGridFamily', 'FAMILIES', 'Layout', 'register_family', 'family_of', 'check_model', 'supported_table',
           'check_mlp', 'check_inner_norm', 'mlp_hidden', 'is_glu', 'beit', 'eva', 'swin', 'swinv2', 'vit']
