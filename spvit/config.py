"""Run configurations: a dataclass of defaults, a YAML file over it, and flags over both.

Every field is a YAML key and a flag of the same name (``loss_lambda`` <-> ``--loss-lambda``), so
a shipped config can be overridden key by key from the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Type, TypeVar

import yaml

from .errors import SpvitError


class ConfigError(SpvitError):
    """A config file or flag value is malformed."""


T = TypeVar('T')
GIVEN = '_given_keys'        # attribute on a resolved config: the keys a file or flag set


class Bounds(NamedTuple):
    """The values a number field takes (each value, for a list field; ``count``: the list's length)."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    count: Optional[int] = None

    def admits(self, v: float) -> bool:
        return ((self.low is None or (v > self.low if self.low_open else v >= self.low))
                and (self.high is None or (v < self.high if self.high_open else v <= self.high)))

    def describe(self) -> str:
        if self.high is None:
            return 'positive' if self.low == 0 and self.low_open else \
                f'at least {self.low:g}' if not self.low_open else f'above {self.low:g}'
        return f'in {"(" if self.low_open else "["}{self.low:g}, {self.high:g}{")" if self.high_open else "]"}'


POSITIVE = Bounds(0, low_open=True)
NON_NEGATIVE = Bounds(0)
AT_LEAST_ONE = Bounds(1)
FRACTION = Bounds(0, 1)                      # a probability or share, ends included
FRACTION_BELOW_ONE = Bounds(0, 1, high_open=True)


def field(default: Any = None, help: str = '', **kwargs) -> Any:
    """A config field with its help text (shown by --help); ``choices=`` and ``bounds=`` (a
    ``Bounds``) are checked wherever a config is read."""
    if isinstance(default, (dict, list)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={'help': help, **kwargs})
    return dataclasses.field(default=default, metadata={'help': help, **kwargs})


def _base_type(tp: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def kv_item(text: str) -> Tuple[str, Any]:
    """'img_size=32' -> ('img_size', 32): the value is read as YAML (ints, floats, bools, lists)."""
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise ConfigError(f'expected key=value, got {text!r}')
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise ConfigError(f'cannot read the value of {text!r}') from None


def parse_kv(items: Sequence[str]) -> Dict[str, Any]:
    """['img_size=32', 'drop_path_rate=0.1'] -> {'img_size': 32, 'drop_path_rate': 0.1}."""
    return dict(kv_item(item) for item in items)


def add_config_arguments(parser: argparse.ArgumentParser, cls: Type[Any]) -> None:
    """One flag per dataclass field; defaults are None so that only given flags override."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _base_type(hints[f.name])
        flag = '--' + f.name.replace('_', '-')
        kw: Dict[str, Any] = dict(dest=f.name, default=None, help=f.metadata.get('help', ''))
        if 'choices' in f.metadata:
            kw['choices'] = f.metadata['choices']
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) in (dict, Dict):
            parser.add_argument(flag, nargs='*', metavar='KEY=VALUE', type=str, **kw)
        elif typing.get_origin(tp) in (list, List):
            parser.add_argument(flag, nargs='+', type=typing.get_args(tp)[0], **kw)
        else:
            parser.add_argument(flag, type=tp, **kw)


def _check_value(name: str, value: Any, tp: Any) -> Any:
    if value is None:
        return None
    base = _base_type(tp)
    origin = typing.get_origin(base)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f'{name}: expected a mapping, got {value!r}')
        return dict(value)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{name}: expected a list, got {value!r}')
        item = typing.get_args(base)[0]
        return [_check_value(name, v, item) for v in value]
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{name}: expected true or false, got {value!r}')
        return value
    if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base is str and isinstance(value, str):
        return value
    if base in (int, float, str):
        raise ConfigError(f'{name}: expected {base.__name__}, got {value!r}')
    return value


def from_dict(cls: Type[T], data: Dict[str, Any], source: str = 'config') -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys and wrongly typed values."""
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f'{source}: unknown keys: {", ".join(unknown)}')
    values = {}
    for key, value in data.items():
        values[key] = _check_value(f'{source}: {key}', value, hints[key])
        choices = names[key].metadata.get('choices')
        if choices and values[key] is not None and values[key] not in choices:
            raise ConfigError(f'{source}: {key} must be one of {", ".join(map(str, choices))}, got {value!r}')
        _check_number(f'--{key.replace("_", "-")}' if source == 'command line' else f'{source}: {key}', values[key],
                      names[key].metadata.get('bounds'))
    return cls(**values)


def _check_number(name: str, value: Any, bounds: Optional[Bounds]) -> None:
    """Every number finite, and within the field's bounds."""
    items = value if isinstance(value, list) else [value]
    shown = ' '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in items)
    if bounds is not None and bounds.count is not None and len(items) != bounds.count:
        raise ConfigError(f'{name} takes {bounds.count} values, got {len(items)} ({shown})')
    for v in items:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f'{name} must be a finite number, got {shown}')
        if bounds is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and not bounds.admits(v):
            raise ConfigError(f'{name} must be {bounds.describe()}, got {shown}')


def load_yaml(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f'cannot read config {path}: {e.strerror}') from None
    except yaml.YAMLError as e:
        raise ConfigError(f'{path}: not valid YAML: {str(e).splitlines()[0]}') from None
    except UnicodeDecodeError:
        raise ConfigError(f'{path}: not a text file (not UTF-8)') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: expected a mapping of config keys')
    return data


def resolve(cls: Type[T], args: argparse.Namespace, config_path: Optional[str] = None) -> T:
    """Defaults < YAML file < flags that were given."""
    merged = dataclasses.asdict(cls())
    if config_path:
        data = load_yaml(config_path)
        from_file = from_dict(cls, data, source=config_path)
        merged.update({k: getattr(from_file, k) for k in data})
    hints = typing.get_type_hints(cls)
    flags = {}
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            is_dict = typing.get_origin(_base_type(hints[f.name])) in (dict, Dict)
            flags[f.name] = parse_kv(value) if is_dict else value
    from_flags = from_dict(cls, flags, source='command line')
    merged.update({k: getattr(from_flags, k) for k in flags})
    cfg = cls(**merged)
    object.__setattr__(cfg, GIVEN, frozenset(flags) | frozenset(data if config_path else ()))
    return cfg


def given_keys(cfg: Any) -> Set[str]:
    """The keys a config file or flag set (``resolve`` records them); for a config built in code,
    every key that differs from its default."""
    if hasattr(cfg, GIVEN):
        return set(getattr(cfg, GIVEN))
    default = type(cfg)()
    return {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(default, f.name)}


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)
