"""Evaluation config files: ``miafw eval --config exp.toml`` and the ``config.toml`` every run writes.

A file holds everything :class:`~mia_core.engine.stages.EvalConfig` holds, read with the standard
library's ``tomllib`` (``tomli`` on Python < 3.11)::

    attacks = ["lira", "lira:online=false", "loss"]
    defenses = ["prune:sparsity=0.9"]
    estimators = []
    dataset = "digits"
    model = "mlp:width=256"
    n_models = 16
    seed = 0
    targets = "all"
    device = "cpu"
    adaptive = true
    budgets = ["tpr@1%<=0.05"]
    fprs = [0.001, 0.01, 0.1]
    confidence = 0.95
    shards = 1                # models and metrics do not depend on it; finished shards are cached
    executor = "local"        # or "local:N", "dask://HOST:PORT"

    [recipe]
    epochs = 60
    batch_size = 64
    lr = 0.002
    weight_decay = 0.0
    optimizer = "adam"
    momentum = 0.9
    sampler = "fixed"
    # sampling_rate = 0.05   (absent: batch size / largest training half)

Every key is optional (absent: the default). An unknown key or a value of the wrong type is a
usage error naming the key and listing the valid ones. :func:`dump` writes a file that
:func:`load` reads back to the same :class:`EvalConfig` (floats in their shortest round-trip
form), so ``miafw eval --config runs/<id>/config.toml`` repeats the run.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Dict, Tuple, Union

from mia_core.params import ParamError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib

#: Top-level keys and their kinds; ``recipe`` is a table of :data:`RECIPE_KEYS`.
TOP_KEYS = {"attacks": "strings", "defenses": "strings", "estimators": "strings", "dataset": "string",
            "model": "string", "n_models": "integer", "seed": "integer", "targets": "string", "device": "string",
            "adaptive": "boolean", "budgets": "strings", "fprs": "numbers", "confidence": "number",
            "shards": "integer", "executor": "string", "recipe": "table"}
RECIPE_KEYS = {"epochs": "integer", "batch_size": "integer", "lr": "number", "weight_decay": "number",
               "optimizer": "string", "momentum": "number", "sampler": "string", "sampling_rate": "number"}


def _check(where: str, key: str, value: Any, kind: str) -> Any:
    ok = {
        "string": isinstance(value, str),
        "strings": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "numbers": isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                   for v in value),
        "table": isinstance(value, dict),
    }[kind]
    if not ok:
        article = "a list of " if kind in ("strings", "numbers") else "an " if kind == "integer" else "a "
        noun = {"strings": "strings", "numbers": "numbers"}.get(kind, kind)
        raise ParamError(f"{where}: {key} must be {article}{noun}, got {value!r}")
    if kind == "number":
        return float(value)
    if kind == "numbers":
        return tuple(float(v) for v in value)
    if kind == "strings":
        return tuple(value)
    return value


#: The ``[audit]`` table of ``miafw audit`` config files (:class:`~mia_core.engine.audit.AuditConfig`).
AUDIT_KEYS = {"members": "string", "weights": "string", "predictions": "string", "module": "string",
              "module_args": "table"}


def from_dict(doc: Dict[str, Any], *, where: str = "config"):
    """An :class:`EvalConfig` from a parsed document.

    Raises:
        ParamError: an unknown key (the valid ones listed) or a value of the wrong type.
    """
    from mia_core.engine.stages import EvalConfig
    from mia_core.engine.trainer import TrainingRecipe

    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise ParamError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(TOP_KEYS)} "
                         f"(recipe: {', '.join(RECIPE_KEYS)})")
    values = {k: _check(where, k, v, TOP_KEYS[k]) for k, v in doc.items()}
    recipe_doc = values.pop("recipe", {})
    unknown = sorted(set(recipe_doc) - set(RECIPE_KEYS))
    if unknown:
        raise ParamError(f"{where}: unknown key 'recipe.{unknown[0]}'; valid recipe keys: {', '.join(RECIPE_KEYS)}")
    recipe = dataclasses.replace(TrainingRecipe(), **{k: _check(where, f"recipe.{k}", v, RECIPE_KEYS[k])
                                                      for k, v in recipe_doc.items()})
    return EvalConfig(**values, recipe=recipe)


def _read(path: Union[str, Path]) -> Tuple[Dict[str, Any], str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ParamError(f"--config {path}: no such file")
    try:
        return tomllib.loads(p.read_text()), f"--config {p.name}"
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ParamError(f"--config {p.name}: not valid TOML ({exc})") from None


def load(path: Union[str, Path]):
    """Read a config file into an :class:`EvalConfig`.

    Raises:
        ParamError: a missing or malformed file, an unknown key, a value of the wrong type.
    """
    doc, where = _read(path)
    if "audit" in doc:
        raise ParamError(f"{where} holds an [audit] table: it is a `miafw audit` config (use miafw audit --config)")
    if "unlearn" in doc:
        raise ParamError(f"{where} holds an [unlearn] table: it is a `miafw unlearn` config (use miafw unlearn --config)")
    return from_dict(doc, where=where)


def load_audit(path: Union[str, Path]):
    """Read a ``miafw audit`` config file (an evaluation plus an ``[audit]`` table of
    :data:`AUDIT_KEYS`) into an :class:`~mia_core.engine.audit.AuditConfig`.

    Raises:
        ParamError: as :func:`load`.
    """
    from mia_core.engine.audit import AuditConfig

    doc, where = _read(path)
    audit = _check(where, "audit", doc.pop("audit", {}), "table")
    unknown = sorted(set(audit) - set(AUDIT_KEYS))
    if unknown:
        raise ParamError(f"{where}: unknown key 'audit.{unknown[0]}'; valid audit keys: {', '.join(AUDIT_KEYS)}")
    values = {k: _check(where, f"audit.{k}", v, AUDIT_KEYS[k]) for k, v in audit.items()}
    return AuditConfig(evaluation=from_dict(doc, where=where), **values)


#: The ``[unlearn]`` table of ``miafw unlearn`` config files (:class:`~mia_core.engine.unlearn.UnlearnConfig`;
#: the common recipe's attacks are the top-level ``attacks``).
UNLEARN_KEYS = {"unlearners": "strings", "forget": "string"}


def load_unlearn(path: Union[str, Path]):
    """Read a ``miafw unlearn`` config file (an evaluation plus an ``[unlearn]`` table of
    :data:`UNLEARN_KEYS`) into an :class:`~mia_core.engine.unlearn.UnlearnConfig`.

    Raises:
        ParamError: as :func:`load`, or defenses, estimators or budgets (unlearning takes none).
    """
    from mia_core.engine.unlearn import UnlearnConfig

    doc, where = _read(path)
    if "audit" in doc:
        raise ParamError(f"{where} holds an [audit] table: it is a `miafw audit` config (use miafw audit --config)")
    table = _check(where, "unlearn", doc.pop("unlearn", {}), "table")
    unknown = sorted(set(table) - set(UNLEARN_KEYS))
    if unknown:
        raise ParamError(f"{where}: unknown key 'unlearn.{unknown[0]}'; valid unlearn keys: {', '.join(UNLEARN_KEYS)}")
    values = {k: _check(where, f"unlearn.{k}", v, UNLEARN_KEYS[k]) for k, v in table.items()}
    evaluation = from_dict(doc, where=where)
    for key in ("defenses", "estimators", "budgets"):
        if getattr(evaluation, key):
            raise ParamError(f"{where}: {key} = {list(getattr(evaluation, key))!r}, but miafw unlearn evaluates an "
                             f"undefended population and takes no {key}")
    return UnlearnConfig(evaluation=evaluation, attacks=evaluation.attacks, **values)


def dump_unlearn(config) -> str:
    """The TOML text of an :class:`~mia_core.engine.unlearn.UnlearnConfig`: :func:`dump` of its
    evaluation (its ``attacks`` the common recipe's) plus an ``[unlearn]`` table (``miafw unlearn
    --config THIS_FILE`` repeats the run)."""
    evaluation = dataclasses.replace(config.evaluation, attacks=tuple(config.attacks), defenses=(), estimators=(),
                                     budgets=(), targets="all")
    text = dump(evaluation).replace("miafw evaluation config: miafw eval --config",
                                    "miafw unlearn config: miafw unlearn --config", 1)
    table = {"unlearners": list(config.unlearners), "forget": str(config.forget)}
    return text + "\n[unlearn]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items())


_ESCAPES = {"\\": "\\\\", '"': '\\"'}
#: Characters a TOML basic string must escape (U+0000-U+001F and U+007F).
_CONTROL = frozenset(map(chr, list(range(0x20)) + [0x7F]))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot write {value!r} to a config file")
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return '"' + "".join(_ESCAPES.get(ch, ch) if ch not in _CONTROL else f"\\u{ord(ch):04X}" for ch in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k if k.isidentifier() else _toml(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to a config file")


def dump(config) -> str:
    """The TOML text of an :class:`EvalConfig` (every field; ``sampling_rate`` only when set)."""
    c = config
    top = {"attacks": list(c.attacks), "defenses": list(c.defenses), "estimators": list(c.estimators),
           "dataset": c.dataset, "model": c.model, "n_models": c.n_models, "seed": c.seed, "targets": c.targets,
           "device": c.device, "adaptive": bool(c.adaptive), "budgets": list(c.budgets),
           "fprs": [float(f) for f in c.fprs], "confidence": float(c.confidence), "shards": c.shards,
           "executor": c.executor}
    r = c.recipe
    recipe = {"epochs": r.epochs, "batch_size": r.batch_size, "lr": float(r.lr), "weight_decay": float(r.weight_decay),
              "optimizer": r.optimizer, "momentum": float(r.momentum), "sampler": r.sampler}
    if r.sampling_rate is not None:
        recipe["sampling_rate"] = float(r.sampling_rate)
    lines = ["# miafw evaluation config: miafw eval --config THIS_FILE repeats the run (flags override it)"]
    lines += [f"{k} = {_toml(v)}" for k, v in top.items()]
    lines += ["", "[recipe]"] + [f"{k} = {_toml(v)}" for k, v in recipe.items()]
    return "\n".join(lines) + "\n"


def dump_audit(config) -> str:
    """The TOML text of an :class:`~mia_core.engine.audit.AuditConfig`: :func:`dump` of its
    evaluation plus an ``[audit]`` table (``miafw audit --config THIS_FILE`` repeats the audit)."""
    text = dump(config.evaluation).replace("miafw eval --config", "miafw audit --config", 1)
    audit = {"members": config.members}
    for key in ("weights", "predictions", "module"):
        if getattr(config, key) is not None:
            audit[key] = str(getattr(config, key))
    if config.module_args:
        audit["module_args"] = dict(config.module_args)
    return text + "\n[audit]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in audit.items())


__all__ = ["AUDIT_KEYS", "RECIPE_KEYS", "TOP_KEYS", "UNLEARN_KEYS", "dump", "dump_audit", "dump_unlearn", "from_dict",
           "load", "load_audit", "load_unlearn"]
