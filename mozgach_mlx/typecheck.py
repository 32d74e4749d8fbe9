"""Type checks for the configuration dataclasses, from their annotations.

Every config dataclass (``RunConfig``, ``TrainConfig``, ``LoRAConfig``,
``GenerationConfig``) calls :func:`check_fields` first thing in ``__post_init__``, so a
value of the wrong type -- from Python, a YAML file or a manifest -- is one
:class:`~mozgach_mlx.errors.ConfigError` naming the field, the value and the expected
type, before any range check or arithmetic sees it.

Accepted, and normalised in place: an ``int`` for a ``float`` field (``2`` -> ``2.0``);
a whole ``float`` for an ``int`` field (``1e3`` -> ``1000``, how YAML and JSON users
write big counts); a list for a ``tuple[str, ...]`` field; a dict for a nested config
dataclass. Never accepted: ``bool`` as a number (``True`` is an ``int`` in Python),
numeric strings (``"1e-4"``: :func:`load_yaml` reads such numbers as numbers, so a
string there is a real mistake).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any

from .errors import ConfigError

_NONE = type(None)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _options(tp: Any) -> tuple[Any, ...]:
    """The members of a union annotation (``int | None`` -> (int, NoneType)), else (tp,)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def _describe(tp: Any) -> str:
    names = []
    for t in _options(tp):
        origin = typing.get_origin(t)
        if t is _NONE:
            names.append("null")
        elif origin in (tuple, list):
            names.append("a list of " + "/".join(_describe(a) for a in typing.get_args(t) if a is not Ellipsis))
        elif origin is dict:
            names.append("a mapping")
        elif t is float:
            names.append("a number")
        elif t is int:
            names.append("an integer")
        elif t is bool:
            names.append("true/false")
        elif t is str:
            names.append("a string")
        else:
            names.append(getattr(t, "__name__", str(t)))
    return " or ".join(names)


def _convert(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value normalised to ``tp``) for one non-union annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if tp is _NONE:
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        return isinstance(value, int), value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, value
        return True, float(value)
    if tp is str:
        return isinstance(value, str), value
    if origin in (tuple, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            return False, value
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis} or {Any}
        out = []
        for v in value:
            ok, v = _convert(v, item)
            if not ok:
                return False, value
            out.append(v)
        return True, tuple(out) if origin is tuple else out
    if origin is dict:
        return isinstance(value, dict), value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return True, value
        if isinstance(value, dict):
            from_dict = getattr(tp, "from_dict", None)
            return True, from_dict(value) if from_dict is not None else tp(**value)
        return False, value
    return isinstance(value, tp) if isinstance(tp, type) else True, value


def check_fields(obj: Any) -> None:
    """Check (and normalise in place) every field of dataclass ``obj`` against its annotation.

    Raises:
        ConfigError: ``"TrainConfig.max_steps='many' has the wrong type: expected an
            integer or null"`` for the first field that does not fit.
    """
    cls = type(obj)
    hints = _hints(cls)
    for f in dataclasses.fields(obj):
        tp = hints.get(f.name, Any)
        value = getattr(obj, f.name)
        for option in _options(tp):
            ok, converted = _convert(value, option)
            if ok:
                if converted is not value:
                    object.__setattr__(obj, f.name, converted)
                break
        else:
            raise ConfigError(f"{cls.__name__}.{f.name}={value!r} has the wrong type: expected {_describe(tp)}")


# YAML 1.1 (PyYAML) reads 1e-4 and 2E5 as strings: its float pattern needs a dot. This
# resolver reads every number the way Python (and YAML 1.2 / JSON) writes it.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)


@cache
def _yaml_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        """SafeLoader whose floats include ``1e-4`` (no dot needed)."""

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    for first in list("-+0123456789."):
        Loader.yaml_implicit_resolvers[first] = [
            (tag, rx) for tag, rx in Loader.yaml_implicit_resolvers.get(first, []) if tag != "tag:yaml.org,2002:float"]
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def load_yaml(path: str | Path, what: str = "--config") -> dict:
    """A YAML mapping from ``path`` (numbers such as ``1e-4`` read as numbers).

    Raises:
        ConfigError: one line for a missing/unreadable file, invalid YAML (with its line
            and column) or a top level that is not a mapping.
    """
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: cannot read it ({e})") from None
    try:
        data = yaml.load(text, Loader=_yaml_loader()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{what} {path}: invalid YAML{where}: {problem}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path}: expected a mapping of keys to values at the top level, "
                          f"got {type(data).__name__}")
    return data
