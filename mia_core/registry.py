"""Plugin discovery through entry points (stevedore).

Five entry-point groups, one per plugin kind: ``miafw.attacks``, ``miafw.defenses``,
``miafw.estimators``, ``miafw.datasets`` and ``miafw.models``. miafw's built-ins are registered
in its own ``pyproject.toml`` exactly as a third party's plugins are in theirs.

* :func:`names` lists a group from package metadata alone: no plugin module is imported, so the
  CLI's help and choices stay fast and a broken plugin cannot break them.
* :func:`load` imports one plugin by name. An unknown name raises :class:`UnknownPluginError`
  listing the valid names and the closest match; a plugin whose import raises gives
  :class:`BrokenPluginError` carrying the original error.
* :func:`inspect_group` imports every plugin of a group, each in isolation, and reports each as
  ``ok``, ``broken`` (its import raised) or ``incompatible`` (wrong base class or plugin API
  version) — what ``miafw list`` shows. One bad plugin never hides the others.

stevedore caches entry-point scans on disk (keyed by ``sys.path`` and the mtimes of its
entries) and in memory per process; :func:`refresh` drops the in-memory copy after a plugin
was installed into a running interpreter.
"""

from __future__ import annotations

import difflib
import traceback
from dataclasses import dataclass
from typing import Dict, List, Optional

from stevedore import ExtensionManager, NamedExtensionManager

from mia_core.base import KIND_BASES, KINDS, check_api_version
from mia_core.params import shown

GROUP_PREFIX = "miafw."


class PluginError(Exception):
    """Base class of registry errors."""


class UnknownPluginError(PluginError, LookupError):
    """No plugin of that name is registered in the group."""


class BrokenPluginError(PluginError):
    """The plugin is registered but importing it failed, or it does not fit its contract."""


@dataclass
class PluginInfo:
    """What ``miafw list`` knows about one registered plugin."""

    kind: str
    name: str
    target: str  # "module:attr" from the entry point, known without importing
    distribution: Optional[str]
    version: Optional[str]
    status: str = "unknown"  # ok | broken | incompatible
    error: Optional[str] = None
    api_version: Optional[str] = None
    obj: Optional[type] = None
    traceback: Optional[str] = None

    def to_dict(self) -> Dict[str, Optional[str]]:
        return {
            "kind": self.kind,
            "name": self.name,
            "target": self.target,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "api_version": self.api_version,
        }


def _group(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}; expected one of {', '.join(KINDS)}")
    return GROUP_PREFIX + kind


def _entry_points(kind: str):
    # names=[] loads nothing; list_entry_points() reads metadata through stevedore's cache.
    mgr = NamedExtensionManager(_group(kind), names=[], invoke_on_load=False)
    return list(mgr.list_entry_points())


def refresh() -> None:
    """Forget stevedore's in-process entry-point caches (after installing a plugin at run time).

    stevedore keeps two: one per group on ``ExtensionManager`` and one per ``sys.path`` in its
    cache module (private; cleared when present). Its on-disk cache is keyed by the ``sys.path``
    entries and the modification times of their ``entry_points.txt`` files, so a newly installed
    distribution is seen by a new process without any of this.
    """
    import importlib

    ExtensionManager.ENTRY_POINT_CACHE.clear()
    try:
        from stevedore import _cache

        internal = getattr(getattr(_cache, "_c", None), "_internal", None)
        if isinstance(internal, dict):
            internal.clear()
    except ImportError:  # a stevedore without that module caches nothing more
        pass
    importlib.invalidate_caches()


def names(kind: str) -> List[str]:
    """Registered plugin names of ``kind`` (sorted), read from metadata without importing."""
    return sorted({ep.name for ep in _entry_points(kind)})


def _distributions(kind: str) -> Dict[tuple, tuple]:
    """``{(name, value): (distribution, version)}`` for a group, from package metadata only.

    stevedore's cached entry points do not carry their distribution, so it is looked up here.
    """
    import importlib.metadata as md

    group = _group(kind)
    out: Dict[tuple, tuple] = {}
    for dist in md.distributions():
        try:
            eps = dist.entry_points
            name = dist.metadata["Name"]
        except Exception:  # a damaged installation must not hide the others
            continue
        for ep in eps:
            if ep.group == group:
                out.setdefault((ep.name, ep.value), (name, dist.version))
    return out


def suggest(name: str, valid: List[str]) -> Optional[str]:
    """The closest valid name to ``name``, if any is close enough."""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return close[0] if close else None


def unknown_message(kind: str, name: str, valid: List[str]) -> str:
    singular = kind[:-1]
    msg = f"unknown {singular} {shown(name)}."
    hint = suggest(name, valid)
    if hint:
        msg += f" Did you mean {hint!r}?"
    msg += f" Valid {kind}: {', '.join(valid) if valid else '(none registered)'}."
    return msg


def _check_plugin(kind: str, obj) -> Optional[tuple]:
    """``None`` when ``obj`` fits the kind's contract, else ``(status, reason)``."""
    bases = KIND_BASES[kind]
    if not (isinstance(obj, type) and issubclass(obj, bases)):
        allowed = " or ".join(f"mia_core.base.{b.__name__}" for b in bases)
        return "incompatible", f"{obj!r} is not a subclass of {allowed}"
    reason = check_api_version(getattr(obj, "api_version", None))
    if reason:
        return "incompatible", reason
    return None


def load(kind: str, name: str) -> type:
    """Import and return the plugin class registered as ``name`` in ``kind``.

    Raises:
        UnknownPluginError: no such name (the message lists valid names and a suggestion).
        BrokenPluginError: the plugin's import raised, or it does not fit its contract.
    """
    eps = [ep for ep in _entry_points(kind) if ep.name == name]
    if not eps:
        raise UnknownPluginError(unknown_message(kind, name, names(kind)))
    ep = eps[0]
    try:
        obj = ep.load()
    except Exception as exc:  # any import-time failure of third-party code
        raise BrokenPluginError(
            f"{kind[:-1]} {name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    bad = _check_plugin(kind, obj)
    if bad:
        raise BrokenPluginError(f"{kind[:-1]} {name!r} ({ep.value}) is {bad[0]}: {bad[1]}")
    return obj


def inspect_group(kind: str) -> List[PluginInfo]:
    """Import every plugin of ``kind`` in isolation and report its status."""
    infos = []
    dists = _distributions(kind)
    for ep in sorted(_entry_points(kind), key=lambda e: e.name):
        dist, version = dists.get((ep.name, ep.value), (None, None))
        info = PluginInfo(kind=kind, name=ep.name, target=ep.value, distribution=dist, version=version)
        try:
            obj = ep.load()
        except Exception as exc:
            info.status = "broken"
            info.error = f"{type(exc).__name__}: {exc}"
            info.traceback = traceback.format_exc()
            infos.append(info)
            continue
        info.obj = obj
        info.api_version = getattr(obj, "api_version", None)
        bad = _check_plugin(kind, obj)
        if bad:
            info.status, info.error = bad
        else:
            info.status = "ok"
        infos.append(info)
    return infos


def find(name: str) -> List[str]:
    """The kinds in which ``name`` is registered (metadata only)."""
    return [kind for kind in KINDS if name in names(kind)]


__all__ = [
    "BrokenPluginError",
    "PluginError",
    "PluginInfo",
    "UnknownPluginError",
    "find",
    "inspect_group",
    "load",
    "names",
    "refresh",
    "suggest",
    "unknown_message",
]
