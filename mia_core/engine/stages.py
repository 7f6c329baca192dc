"""The evaluation engine behind ``miafw eval``.

One evaluation:

1. resolves every plugin by name and validates its parameters (before any work, so a bad value
   fails in a second);
2. loads the dataset and trains (or loads from the cache) a population of ``n_models`` models;
3. applies the post-training defenses, in order, to every model (an adaptive attacker knows the
   recipe, so reference models are defended like the target);
4. computes the signals once; fits each attack once and scores every record against each target
   model; the scores of all targets are pooled, members being the positive class;
5. computes the metrics and writes the run directory (:mod:`mia_core.results`).
"""

from __future__ import annotations

import json
import platform
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import mia_core
from mia_core import metrics, registry
from mia_core.base import PluginSpec
from mia_core.engine.cache import PopulationCache, cache_key
from mia_core.data import DataError, Records
from mia_core.params import ParamError, instantiate, parse_spec, split_spec
from mia_core.engine import AttackContext, DefenseContext, ModelPopulation
from mia_core.engine.trainer import TrainingRecipe

DEFAULT_FPRS = (0.001, 0.01, 0.1)


class PluginRuntimeError(RuntimeError):
    """A plugin raised while running, or returned unusable output."""

    def __init__(self, label: str, message: str, tb: str = ""):
        super().__init__(f"{label} failed: {message}")
        self.label = label
        self.traceback = tb


@dataclass
class EvalConfig:
    """Everything that defines an evaluation (the CLI fills it from its options)."""

    attacks: Sequence[str] = ("lira",)
    defenses: Sequence[str] = ()
    dataset: str = "digits"
    model: str = "mlp"
    n_models: int = 16
    seed: int = 0
    targets: str = "all"
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    fprs: Sequence[float] = DEFAULT_FPRS
    confidence: float = 0.95


@dataclass
class Resolved:
    """Plugins instantiated and validated from an :class:`EvalConfig`."""

    dataset: Tuple[PluginSpec, Any]
    model: Tuple[PluginSpec, Any]
    attacks: List[Tuple[str, PluginSpec, Any]]  # (label, spec, instance)
    defenses: List[Tuple[str, PluginSpec, Any]]


def _resolve_one(kind: str, text: str):
    name, _ = split_spec(text)
    cls = registry.load(kind, name)
    label = f"{kind[:-1]} {name!r}"
    spec = parse_spec(text, cls, label=label)
    obj = instantiate(cls, spec, label=label)
    full = PluginSpec(name, obj.get_params())  # every parameter, defaults included
    return full, obj


def resolve(config: EvalConfig) -> Resolved:
    """Load and validate every plugin and setting of ``config``.

    Raises:
        ParamError, registry.UnknownPluginError, registry.BrokenPluginError: with a one-line message.
    """
    if not isinstance(config.n_models, int) or config.n_models < 2 or config.n_models % 2:
        raise ParamError(f"--n-models must be an even integer >= 2, got {config.n_models}")
    try:
        config.recipe.validate()
    except ValueError as exc:
        raise ParamError(f"training recipe: {exc}") from None
    for f in config.fprs:
        if not 0 < f < 1:
            raise ParamError(f"FPR levels must be in (0, 1), got {f}")
    if not config.attacks:
        raise ParamError("no attack given; use --attack NAME (see `miafw list`)")
    dataset = _resolve_one("datasets", config.dataset)
    model = _resolve_one("models", config.model)
    attacks, labels = [], set()
    for text in config.attacks:
        spec, obj = _resolve_one("attacks", text)
        label = text.strip()
        if label in labels:
            raise ParamError(f"attack {label!r} given twice")
        labels.add(label)
        needed = getattr(obj, "min_reference_models", 0)
        if config.n_models - 1 < needed:
            raise ParamError(
                f"attack {label!r} needs at least {needed} reference models besides the target: "
                f"use --n-models {needed + 1 + (needed + 1) % 2} or more (got {config.n_models})"
            )
        attacks.append((label, spec, obj))
    defenses = []
    for i, text in enumerate(config.defenses):
        spec, obj = _resolve_one("defenses", text)
        if getattr(obj, "stage", "post") != "post":
            raise ParamError(
                f"defense {spec.name!r} declares stage {obj.stage!r}; this miafw version runs "
                f"post-training defenses only"
            )
        defenses.append((f"{i}:{text.strip()}", spec, obj))
    return Resolved(dataset=dataset, model=model, attacks=attacks, defenses=defenses)


def parse_targets(text: str, n_models: int) -> List[int]:
    """``"all"``, ``"first:K"`` or a comma-separated list of model indices."""
    text = str(text).strip().lower()
    if text == "all":
        return list(range(n_models))
    if text.startswith("first:"):
        try:
            k = int(text[6:])
        except ValueError:
            raise ParamError(f"--targets first:K needs an integer K, got {text!r}") from None
        if not 1 <= k <= n_models:
            raise ParamError(f"--targets first:{k} must be between 1 and --n-models ({n_models})")
        return list(range(k))
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ParamError(f"--targets must be 'all', 'first:K' or indices like 0,3; got {text!r}") from None
    bad = [t for t in out if not 0 <= t < n_models]
    if not out or bad:
        raise ParamError(f"--targets indices must be in [0, {n_models}); got {text!r}")
    if len(set(out)) != len(out):
        raise ParamError(f"--targets lists a model twice: {text!r}")
    return out


def population_key(config: EvalConfig, res: Resolved, records: Records) -> str:
    return cache_key(
        {
            "kind": "population",
            "dataset": res.dataset[0].to_dict(),
            "records": records.fingerprint(),
            "model": res.model[0].to_dict(),
            "recipe": config.recipe.to_dict(),
            "n_models": config.n_models,
            "seed": config.seed,
            "miafw": mia_core.__version__,
            "torch": torch.__version__,
        }
    )


def _check_scores(label: str, scores, n: int) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.shape != (n,):
        raise PluginRuntimeError(label, f"score() returned shape {arr.shape}, expected ({n},)")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise PluginRuntimeError(label, f"score() returned dtype {arr.dtype}, expected real numbers")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise PluginRuntimeError(
            label, f"score() returned {int(bad.sum())} NaN/inf values (first at record {int(np.argmax(bad))})"
        )
    return arr


#: Errors that mean "the user's input is unusable" (exit status 2), even when a plugin raises them.
USAGE_ERRORS = (ParamError, registry.PluginError, DataError)


def _guarded(label: str, fn: Callable, *args):
    """Run plugin code; anything but a usage error becomes a PluginRuntimeError naming the plugin."""
    try:
        return fn(*args)
    except (PluginRuntimeError, KeyboardInterrupt) + USAGE_ERRORS:
        raise
    except Exception as exc:
        raise PluginRuntimeError(label, f"{type(exc).__name__}: {exc}", traceback.format_exc()) from exc


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    import scipy
    import sklearn

    from mia_core import kernels

    return {
        "miafw": mia_core.__version__,
        "plugin_api": mia_core.API_VERSION,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "click": md.version("click"),
        "native_kernels": str(kernels.native_available()),
    }


@dataclass
class EvalResult:
    config: Dict[str, Any]
    metrics: Dict[str, Any]
    scores: Dict[str, np.ndarray]  # label -> float [T, N]
    membership: np.ndarray  # bool [T, N]
    targets: List[int]
    record_index: np.ndarray


class Reporter:
    """Progress and messages; the CLI passes one that draws tqdm bars on stderr."""

    def message(self, text: str) -> None:  # pragma: no cover - trivial
        pass

    def progress(self, total: int, desc: str):
        """A context manager yielding ``update(n)``."""
        import contextlib

        @contextlib.contextmanager
        def noop():
            yield lambda n=1, **kw: None

        return noop()


def config_document(config: EvalConfig, res: Resolved, targets: List[int]) -> Dict[str, Any]:
    """The fully resolved configuration, as written to ``config.json``."""
    return {
        "schema_version": 1,
        "command": "eval",
        "dataset": res.dataset[0].to_dict(),
        "model": res.model[0].to_dict(),
        "attacks": [{"label": label, **spec.to_dict()} for label, spec, _ in res.attacks],
        "defenses": [spec.to_dict() for _, spec, _ in res.defenses],
        "recipe": config.recipe.to_dict(),
        "n_models": config.n_models,
        "seed": config.seed,
        "targets": targets,
        "fprs": list(config.fprs),
        "confidence": config.confidence,
        "adaptive": True,
        "versions": versions(),
        "argv": list(sys.argv),
    }


def run_eval(config: EvalConfig, *, cache: Optional[PopulationCache] = None, reporter: Optional[Reporter] = None,
             resolved: Optional[Resolved] = None) -> EvalResult:
    """Run one evaluation end to end (no files written; see :mod:`mia_core.results`)."""
    reporter = reporter or Reporter()
    cache = cache or PopulationCache(None)
    res = resolved or resolve(config)
    targets = parse_targets(config.targets, config.n_models)

    (dspec, dataset), (mspec, family) = res.dataset, res.model
    records = _guarded(f"dataset {dspec.name!r}", dataset.load)
    if not isinstance(records, Records):
        raise PluginRuntimeError(f"dataset {dspec.name!r}", f"load() returned {type(records).__name__}, not Records")
    if records.n < 4:
        raise ParamError(f"dataset {dspec.name!r} has only {records.n} records; membership inference needs at least 4")

    key = population_key(config, res, records)
    build = lambda: family.build(records.n_features, records.n_classes)  # noqa: E731
    state = cache.load(key)
    population = None
    if state is not None:
        try:
            population = ModelPopulation.from_state(state, records=records, build=build, recipe=config.recipe, seed=config.seed)
            reporter.message(f"loaded {config.n_models} trained models from the cache ({key[:12]})")
        except (KeyError, ValueError, TypeError) as exc:
            reporter.message(f"ignoring a cache entry that does not fit ({exc}); retraining")
            population = None
    if population is None:
        desc = f"training {config.n_models} x {mspec.name} on {records.name} ({records.n} records)"
        with reporter.progress(config.recipe.epochs, desc) as update:
            population = _guarded(
                f"model {mspec.name!r}",
                lambda: ModelPopulation.train(
                    records, build, config.recipe, n_models=config.n_models, seed=config.seed,
                    on_epoch=lambda e, loss: update(1, loss=loss),
                ),
            )
        cache.store(key, population.state(), {"key": key, "dataset": dspec.to_dict(), "model": mspec.to_dict(),
                                               "recipe": config.recipe.to_dict(), "n_models": config.n_models,
                                               "seed": config.seed, "versions": versions()})

    undefended_acc = population.accuracy()
    work = population.clone()
    defense_reports = []
    for i, (label, spec, defense) in enumerate(res.defenses):
        reporter.message(f"applying defense {label.split(':', 1)[1]}")
        report = _guarded(f"defense {spec.name!r}", defense.apply, DefenseContext(work, position=i))
        work.invalidate()
        defense_reports.append({"name": spec.name, "params": dict(spec.params), "report": _jsonable(report)})

    acc = work.accuracy()
    scores: Dict[str, np.ndarray] = {}
    membership = work.keep[targets]
    all_records = np.arange(records.n, dtype=np.int64)
    attack_metrics = {}
    for label, spec, attack in res.attacks:
        ctx = AttackContext(work, attack.access, owner=f"attack {spec.name!r}")
        with reporter.progress(len(targets), f"attack {label}") as update:
            _guarded(f"attack {label!r}", attack.fit, ctx)
            rows = []
            for t in targets:
                out = _guarded(f"attack {label!r}", attack.score, t, all_records)
                rows.append(_check_scores(f"attack {label!r}", out, records.n))
                update(1)
        scores[label] = np.stack(rows)
        summary = metrics.summarize(scores[label].ravel(), membership.ravel(), fprs=tuple(config.fprs),
                                    confidence=config.confidence)
        per_target = [metrics.auc(row, m) for row, m in zip(scores[label], membership)]
        summary["per_target_auc"] = {
            "mean": float(np.mean(per_target)), "std": float(np.std(per_target)),
            "min": float(np.min(per_target)), "max": float(np.max(per_target)),
        }
        summary["name"] = spec.name
        summary["params"] = dict(spec.params)
        attack_metrics[label] = summary

    metrics_doc = {
        "schema_version": 1,
        "attacks": attack_metrics,
        "target": {
            "targets": targets,
            "pooled_over_targets": len(targets),
            "train_accuracy": float(acc["train"][targets].mean()),
            "test_accuracy": float(acc["test"][targets].mean()),
            "train_accuracy_per_target": [float(a) for a in acc["train"][targets]],
            "test_accuracy_per_target": [float(a) for a in acc["test"][targets]],
            "undefended_train_accuracy": float(undefended_acc["train"][targets].mean()),
            "undefended_test_accuracy": float(undefended_acc["test"][targets].mean()),
        },
        "defenses": defense_reports,
        "population": {
            "n_models": config.n_models,
            "n_records": records.n,
            "members_per_model_mean": float(work.keep.sum(1).mean()),
            "cache_key": key,
        },
    }
    config_doc = config_document(config, res, targets)
    return EvalResult(config=config_doc, metrics=metrics_doc, scores=scores, membership=membership,
                      targets=targets, record_index=records.index)


def _jsonable(obj):
    """Round-trip through JSON so a plugin's report is plain data (numpy and torch values allowed)."""
    from mia_core.results import json_default

    return json.loads(json.dumps(obj, default=json_default))


__all__ = ["USAGE_ERRORS", "config_document", "EvalConfig", "EvalResult", "PluginRuntimeError", "Reporter", "Resolved", "parse_targets", "resolve", "run_eval"]
