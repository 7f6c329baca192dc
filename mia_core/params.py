"""Parse ``name:key=value,...`` plugin specifications against a plugin's ``__init__`` signature.

``prune:sparsity=0.9,scope=layer`` becomes ``PluginSpec("prune", {"sparsity": 0.9, "scope": "layer"})``.
Each value is converted to the parameter's annotated type (``int``, ``float``, ``bool``,
``str``, ``Optional[...]``, ``Literal[...]``), or to the type of its default when there is no
usable annotation. Every failure raises :class:`ParamError` with a one-line message naming the
plugin, the parameter, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import inspect
import math
import typing
from typing import List, Any, Dict, Tuple

from mia_core.base import PluginSpec

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


class ParamError(ValueError):
    """A plugin specification or parameter value that cannot be used."""


#: Longest user text echoed back whole in an error message; longer text is cut with an ellipsis.
ECHO_LIMIT = 80


def shown(text, limit: int = ECHO_LIMIT) -> str:
    """``repr(text)`` for an error message, cut to about ``limit`` characters (a 10,000-character
    name is not echoed back whole)."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 1] + "…"


def _split_items(rest: str, text: str) -> List[str]:
    """Split ``k=v,k2=v2`` on the commas outside quotes (``'...'`` or ``"..."``)."""
    items, current, quote = [], [], None
    for ch in rest:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch == ",":
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    if quote:
        raise ParamError(f"unclosed {quote} quote in {shown(text)}")
    items.append("".join(current))
    return items


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def split_spec(text: str) -> Tuple[str, Dict[str, str]]:
    """Split ``"name:k=v,k2=v2"`` into the name and raw string values (no type conversion).

    A value holding a comma is quoted: ``file:path="my,data.csv"`` (single or double quotes,
    removed from the value)."""
    if not isinstance(text, str):
        raise ParamError(f"plugin specification must be a string, got {type(text).__name__}")
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ParamError(f"empty plugin name in {shown(text)}; expected NAME or NAME:key=value,...")
    raw: Dict[str, str] = {}
    if sep and not rest.strip():
        raise ParamError(f"{shown(text)} has a ':' but no parameters; expected NAME:key=value,...")
    if rest.strip():
        for item in _split_items(rest, text):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ParamError(
                    f"malformed parameter {shown(item.strip())} in {shown(text)}; expected key=value"
                )
            if key in raw:
                raise ParamError(f"parameter {shown(key)} given twice in {shown(text)}")
            raw[key] = _unquote(value.strip())
    return name, raw


def _type_hints(cls) -> Dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # unresolved forward references: fall back to defaults' types
        return {}


def _convert(value: str, hint: Any, default: Any) -> Any:
    """Convert ``value`` to ``hint`` (or the default's type). Raises ValueError with the reason."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        non_none = [a for a in args if a is not type(None)]
        if type(None) in args and value.lower() in _NONE:
            return None
        errors = []
        for a in non_none:
            try:
                return _convert(value, a, None)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors) or f"cannot convert {value!r}")
    if origin is typing.Literal:
        choices = list(args)
        for c in choices:
            if str(c) == value or (isinstance(c, str) and c.lower() == value.lower()):
                return c
        raise ValueError(f"must be one of {', '.join(map(str, choices))}")
    if hint is None or hint is inspect.Parameter.empty or hint is Any:
        if default is None or default is inspect.Parameter.empty:
            return value
        hint = type(default)
    if hint is bool:
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("must be a boolean (true/false, yes/no, on/off, 1/0)")
    if hint is int:
        try:
            return int(value, 10)
        except ValueError:
            raise ValueError("must be an integer") from None
    if hint is float:
        try:
            out = float(value)
        except ValueError:
            raise ValueError("must be a number") from None
        if not math.isfinite(out):
            raise ValueError("must be a finite number")
        return out
    if hint is str:
        if value == "":
            raise ValueError("must not be empty")
        return value
    raise ValueError(f"parameters of type {getattr(hint, '__name__', hint)} cannot be set from the CLI")


def check_n_references(value: Any, *, even: bool, online_option: bool = False) -> None:
    """The one rule for an attack's reference budget ``n_references`` (see
    :func:`mia_core.engine.trainer.select_references`): unset (``None``: every reference model)
    or a positive integer, and an even one when the attack needs as many IN as OUT references
    per record (``even``). ``online_option``: the attack has an ``online`` switch, so an odd
    budget is allowed offline and the message says so.

    Raises:
        ValueError: one line naming the value and what is allowed.
    """
    if value is None:
        return
    import numpy as np

    bad = isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1
    if even and not online_option and (bad or value % 2):
        raise ValueError(f"n_references must be a positive even integer (as many IN as OUT reference models per "
                         f"record) or unset for all, got {value!r}")
    if bad:
        raise ValueError(f"n_references must be a positive integer (or unset for all), got {value!r}")
    if even and value % 2:
        raise ValueError(f"n_references={value}: an online attack needs as many IN as OUT references, so an even "
                         f"number (or online=false)")


def parse_params(cls, raw: Dict[str, str], *, label: str) -> Dict[str, Any]:
    """Convert raw string values against ``cls.__init__``'s signature.

    Args:
        cls: the plugin class.
        raw: ``{key: string value}`` from :func:`split_spec`.
        label: how to name the plugin in errors, e.g. ``"defense 'prune'"``.
    """
    sig = cls.param_signature()
    hints = _type_hints(cls)
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        if key not in sig:
            valid = list(sig)
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            allowed = ", ".join(valid) if valid else "none (this plugin takes no parameters)"
            raise ParamError(f"{label}: unknown parameter {shown(key)}{hint}; valid parameters: {allowed}")
        p = sig[key]
        try:
            out[key] = _convert(value, hints.get(key, p.annotation), p.default)
        except ValueError as exc:
            raise ParamError(f"{label}: parameter {key}={shown(value)} {exc}") from None
    return out


def instantiate(cls, spec: PluginSpec, *, label: str):
    """Build the plugin from a spec and run its :meth:`~mia_core.base.Plugin.validate`.

    A ``ValueError``/``TypeError`` from construction or validation becomes a :class:`ParamError`
    prefixed with ``label``.
    """
    try:
        obj = cls(**dict(spec.params))
        obj.validate()
    except ParamError:
        raise
    except (ValueError, TypeError) as exc:
        raise ParamError(f"{label}: {exc}") from None
    return obj


def parse_spec(text: str, cls, *, label: str) -> PluginSpec:
    """Parse ``text`` (``NAME[:k=v,...]``) into a :class:`PluginSpec` typed against ``cls``."""
    name, raw = split_spec(text)
    return PluginSpec(name, parse_params(cls, raw, label=label))


__all__ = ["ParamError", "instantiate", "parse_params", "parse_spec", "split_spec"]
