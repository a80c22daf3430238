"""Creating timm models and loading the weights users give us (timm names, .pth/.pt/.safetensors)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn

from .errors import CheckpointError, UnsupportedModelError

_logger = logging.getLogger(__name__)


def create_model(
        name: str,
        model_kwargs: Optional[Dict[str, Any]] = None,
        pretrained: bool = False,
        checkpoint: Optional[str] = None,
        num_classes: Optional[int] = None,
) -> nn.Module:
    """``timm.create_model`` with clear errors, plus weights from ``checkpoint`` if given.

    ``num_classes`` that differs from the weights' re-initialises the classifier (as timm does
    for pretrained weights); any other mismatch between checkpoint and model is an error.
    """
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if not timm.is_model(name):
        raise UnsupportedModelError(f'unknown timm model {name!r}')
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise CheckpointError(f'checkpoint not found: {checkpoint}')
    try:
        model = timm.create_model(name, pretrained=pretrained and checkpoint is None, **kwargs)
    except (TypeError, AssertionError, ValueError) as e:      # unknown arguments, or values timm asserts on
        raise UnsupportedModelError(f'cannot create {name} with {kwargs}: {e or type(e).__name__}') from None
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A bare state dict, or one under 'model'/'state_dict' (DeiT's and timm's files), or .safetensors."""
    try:
        return timm.models.load_state_dict(path, use_ema=False, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'checkpoint not found: {path}') from None
    except Exception as e:   # truncated files, pickles that need code, not a checkpoint at all
        raise CheckpointError(f'cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from None


def _classifier_keys(model: nn.Module):
    names = (getattr(model, 'pretrained_cfg', None) or {}).get('classifier') or ()
    return (names,) if isinstance(names, str) else tuple(names)


def load_weights(model: nn.Module, path: str) -> None:
    """Load a checkpoint into a freshly created timm model, adapting it the way timm does for
    pretrained weights (the model family's ``checkpoint_filter_fn``, e.g. position-embedding
    resampling for another img_size) and re-initialising a classifier of another size."""
    state_dict = read_state_dict(path)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f'{path} does not hold a state dict')
    filter_fn = getattr(sys.modules.get(type(model).__module__), 'checkpoint_filter_fn', None)
    if filter_fn is not None:
        try:
            state_dict = filter_fn(state_dict, model)
        except Exception as e:
            raise CheckpointError(f'checkpoint {path} does not fit {type(model).__name__}: {e}') from None
    own = model.state_dict()
    for prefix in _classifier_keys(model):
        for suffix in ('.weight', '.bias'):
            key = prefix + suffix
            if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
                _logger.info('classifier %s re-initialised: checkpoint %s, model %s',
                             key, tuple(state_dict[key].shape), tuple(own[key].shape))
                state_dict[key] = own[key]
    load_exactly(model, state_dict, f'checkpoint {path}')


def load_exactly(module: nn.Module, state_dict: Dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that, when the keys or shapes do not fit, names the first missing,
    unexpected and wrongly shaped keys in one line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})")
        raise CheckpointError(f'{what} does not fit the model: ' + '; '.join(parts))
    module.load_state_dict(state_dict)
