"""One evaluation as named stages with typed results; :func:`evaluate` runs them all.

The whole lifecycle, in order (each stage is a function of the previous stages' results, so each
can be run and tested on its own, and a later executor can run them elsewhere)::

    resolve(config)                           -> Plan          plugins loaded and validated, targets, device
    load_records(plan)                        -> Records       the dataset
    train_population(plan, records, cache=)   -> PopulationResult   trained with the train-time defenses
                                                                (or loaded from the verified cache)
    apply_defenses(plan, population)          -> DefenseResult  post-training defenses on a copy
    compute_signals(population)               -> Signals       once, after the last defense
    run_attacks(plan, population, signals)    -> {label: float [T, N]}
    run_estimators(plan, population, signals) -> {label: Estimate}
    compute_metrics(plan, ...)                -> MetricsResult metrics.json and the ROC curves
    write_run(run, evaluation)                                 the run directory (mia_core.results)

:func:`evaluate` is the one public entry point (``mia_core.evaluate``): the CLI, sweeps, notebooks
and executors call it. Every usage error (unknown name, bad value, unusable data) is raised by
:func:`resolve` or :func:`load_records` before any training, as one of :data:`USAGE_ERRORS`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import shutil
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import mia_core
from mia_core import metrics, registry
from mia_core.base import PluginSpec
from mia_core.data import DataError, Records
from mia_core.engine.cache import PopulationCache, cache_key
from mia_core.engine.executors import make_executor, parse_executor
from mia_core.engine.contexts import AttackContext, DefenseContext, EstimatorContext, SignalContext
from mia_core.engine.population import ModelPopulation, accuracy, mse, scored_view
from mia_core.engine.shards import forget_shards, train_sharded
from mia_core.engine.progress import Reporter
from mia_core.engine.signals import Signals, SignalUnavailable
from mia_core.engine.trainer import TrainingRecipe, select_references
from mia_core.gate import check_budgets, parse_budgets
from mia_core.params import ParamError, instantiate, parse_spec, split_spec
from mia_core.results import SCHEMA_VERSION, RunDir, plain_json, write_run
from mia_core.runindex import RunIndex

DEFAULT_FPRS = (0.001, 0.01, 0.1)


class PluginRuntimeError(RuntimeError):
    """A plugin raised while running, or returned unusable output."""

    def __init__(self, label: str, message: str, tb: str = ""):
        super().__init__(f"{label} failed: {message}")
        self.label = label
        self.traceback = tb


#: Errors that mean "the user's input is unusable" (exit status 2), even when a plugin raises them.
USAGE_ERRORS = (ParamError, registry.PluginError, DataError)


# ============================================================================ configuration
@dataclass(frozen=True)
class EvalConfig:
    """Everything that defines an evaluation (the CLI fills it from its options).

    Attributes:
        attacks, defenses, estimators: plugin specifications ``NAME[:k=v,...]``; defenses are
            applied in order (train-time ones during training, post-training ones after it).
        dataset, model: plugin specifications.
        n_models: models in the population (even, >= 2).
        seed: membership, initialisation, batch order and defense randomness derive from it.
        targets: ``"all"``, ``"first:K"`` or comma-separated model indices.
        recipe: how each model is trained.
        fprs: FPR levels for TPR-at-FPR; confidence: level of every interval.
        device: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"`` (CUDA when available).
        adaptive: ``True`` (default): every model carries the defenses, so the attacker's
            reference models are defended like the target (it knows the recipe); ``False``: only
            the target is defended, the references are the same models without any defense.
        budgets: release-gate limits such as ``"tpr@0.1%<=0.005"`` (:mod:`mia_core.gate`); the
            result is in ``metrics.json``'s ``budget`` and the CLI exits 3 when one is broken.
        shards: train the population in this many shards (contiguous groups of models); each
            finished shard is cached, so a killed run resumes from it. The models, and so the
            metrics, do not depend on it (:mod:`mia_core.engine.shards`).
        executor: where the shards train: ``local``, ``local:N`` or ``dask://HOST:PORT``
            (:mod:`mia_core.engine.executors`).
    """

    attacks: Sequence[str] = ("lira",)
    defenses: Sequence[str] = ()
    estimators: Sequence[str] = ()
    dataset: str = "digits"
    model: str = "mlp"
    n_models: int = 16
    seed: int = 0
    targets: str = "all"
    recipe: TrainingRecipe = field(default_factory=TrainingRecipe)
    fprs: Sequence[float] = DEFAULT_FPRS
    confidence: float = 0.95
    device: str = "cpu"
    adaptive: bool = True
    budgets: Sequence[str] = ()
    shards: int = 1
    executor: str = "local"


@dataclass(frozen=True)
class Component:
    """One resolved plugin: its kind, the label the user gave, every parameter and the instance.

    Attributes:
        kind: ``"attack"``, ``"defense"``, ``"estimator"``, ``"dataset"`` or ``"model"``.
        label: the specification as given (stripped), e.g. ``"lira:online=false"``; unique per kind.
        spec: name and every parameter, defaults included.
        plugin: the validated plugin instance.
        position: index among the user's plugins of this kind (defenses: order of application).
    """

    kind: str
    label: str
    spec: PluginSpec
    plugin: Any
    position: int = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def owner(self) -> str:
        """How errors name this plugin: ``attack 'lira:online=false'``."""
        return f"{self.kind} {self.label!r}"


@dataclass(frozen=True)
class Plan:
    """Stage 1's result: a validated evaluation, ready to run (nothing trained yet)."""

    config: EvalConfig
    dataset: Component
    model: Component
    attacks: Tuple[Component, ...]
    train_defenses: Tuple[Component, ...]
    post_defenses: Tuple[Component, ...]
    estimators: Tuple[Component, ...]
    targets: Tuple[int, ...]
    device: torch.device
    versions: Dict[str, str]
    #: Fraction of the records reserved (no model trains on them, none is scored): the largest
    #: any train-time defense asks for; kept when the undefended baseline drops the defenses.
    reserve: float = 0.0

    @property
    def defenses(self) -> Tuple[Component, ...]:
        """Every defense in the user's order."""
        return tuple(sorted(self.train_defenses + self.post_defenses, key=lambda c: c.position))

    @functools.cached_property
    def document(self) -> Dict[str, Any]:
        """The fully resolved configuration, as written to ``config.json``."""
        c = self.config
        return {
            "schema_version": SCHEMA_VERSION,
            "command": "eval",
            "dataset": self.dataset.spec.to_dict(),
            "model": self.model.spec.to_dict(),
            "attacks": [{"label": a.label, **a.spec.to_dict()} for a in self.attacks],
            "defenses": [{**d.spec.to_dict(), "stage": d.plugin.stage} for d in self.defenses],
            "estimators": [{"label": e.label, **e.spec.to_dict()} for e in self.estimators],
            "recipe": c.recipe.to_dict(),
            "n_models": c.n_models,
            "seed": c.seed,
            # the user's spec ("all", "first:K", "0,3"), never the expanded index list: config.json
            # stays a few KB whatever the population size (metrics.json lists the targets scored)
            "targets": c.targets,
            "n_targets": len(self.targets),
            "fprs": list(c.fprs),
            "confidence": c.confidence,
            "device": str(self.device),
            "adaptive": bool(c.adaptive),
            **({"reserved_fraction": self.reserve} if self.reserve else {}),
            **({"budgets": list(c.budgets)} if c.budgets else {}),
            **({"shards": c.shards} if c.shards != 1 else {}),
            **({"executor": c.executor} if c.executor != "local" else {}),
            "versions": self.versions,
            "argv": list(sys.argv),
        }


def versions() -> Dict[str, str]:
    """The versions that can change a result (recorded in ``config.json``)."""
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


def _resolve_one(kind: str, text: str, position: int = 0) -> Component:
    name, _ = split_spec(text)
    cls = registry.load(f"{kind}s", name)
    label = f"{kind} {name!r}"
    spec = parse_spec(text, cls, label=label)
    obj = instantiate(cls, spec, label=label)
    return Component(kind, str(text).strip(), PluginSpec(name, obj.get_params()), obj, position)


def _unique(components: List[Component]) -> None:
    seen = set()
    for c in components:
        if c.label in seen:
            raise ParamError(f"{c.kind} {c.label!r} given twice")
        seen.add(c.label)


def resolve_device(text: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA when available, else the CPU).

    Raises:
        ParamError: an unknown device, or CUDA asked for where there is none.
    """
    t = str(text).strip().lower()
    if t == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if t == "cpu":
        return torch.device("cpu")
    if t == "cuda" or t.startswith("cuda:"):
        try:
            dev = torch.device(t)
        except RuntimeError:
            raise ParamError(f"--device {text!r} is not a device; use cpu, cuda, cuda:N or auto") from None
        if not torch.cuda.is_available():
            raise ParamError(f"--device {text!r}: no CUDA device is available here; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ParamError(f"--device {text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return dev
    raise ParamError(f"--device must be one of cpu, cuda, cuda:N, auto; got {text!r}")


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


def resolve(config: EvalConfig) -> Plan:
    """Stage 1: load and validate every plugin and setting of ``config`` (no training).

    Raises:
        ParamError, registry.UnknownPluginError, registry.BrokenPluginError: with a one-line message.
    """
    if isinstance(config.n_models, bool) or not isinstance(config.n_models, int) or config.n_models < 2 \
            or config.n_models % 2:
        raise ParamError(f"--n-models must be an even integer >= 2, got {config.n_models}")
    try:
        config.recipe.validate()
    except ValueError as exc:
        raise ParamError(f"training recipe: {exc}") from None
    for f in config.fprs:
        if not 0 < f < 1:
            raise ParamError(f"FPR levels must be in (0, 1), got {f}")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int) or not 0 <= config.seed < 2**63:
        raise ParamError(f"--seed must be an integer >= 0, got {config.seed}")
    if not 0 < config.confidence < 1:
        raise ParamError(f"confidence must be in (0, 1), got {config.confidence}")
    if not config.attacks:
        raise ParamError("no attack given; use --attack NAME (see `miafw list`)")
    if isinstance(config.shards, bool) or not isinstance(config.shards, int) or not 1 <= config.shards <= config.n_models:
        raise ParamError(f"--shards must be an integer between 1 and --n-models ({config.n_models}), got {config.shards!r}")
    parse_executor(config.executor)
    budgets = parse_budgets(config.budgets)
    extra = [b.fpr for b in budgets if b.fpr is not None and b.fpr not in tuple(config.fprs)]
    if extra:  # a TPR budget at an FPR the table does not report: report it too
        config = dataclasses.replace(config, fprs=tuple(sorted(set(config.fprs) | set(extra))))
    device = resolve_device(config.device)
    targets = tuple(parse_targets(config.targets, config.n_models))
    dataset = _resolve_one("dataset", config.dataset)
    model = _resolve_one("model", config.model)
    attacks = [_resolve_one("attack", t, i) for i, t in enumerate(config.attacks)]
    _unique(attacks)
    for a in attacks:
        needed = getattr(a.plugin, "min_reference_models", 0)
        if config.n_models - 2 < needed:  # references: every model but the target and its partner
            raise ParamError(
                f"attack {a.label!r} needs at least {needed} reference models besides the target and its "
                f"partner: use --n-models {needed + 2 + needed % 2} or more (got {config.n_models})"
            )
        n_refs, online = a.plugin.reference_budget()
        try:
            select_references(target=0, n_models=config.n_models, n_references=n_refs, online=online, seed=0)
        except ValueError as exc:
            if n_refs is not None and getattr(a.plugin, "n_references", None) is None:  # the attack's own need
                pairs = n_refs if not online else (n_refs + 1) // 2
                raise ParamError(f"attack {a.label!r} needs {pairs} reference pairs besides the target's; a "
                                 f"population of {config.n_models} models has {(config.n_models - 2) // 2}: use "
                                 f"--n-models {2 * pairs + 2} or more") from None
            raise ParamError(f"attack {a.label!r}: {exc}") from None
    defenses = [_resolve_one("defense", t, i) for i, t in enumerate(config.defenses)]
    for d in defenses:
        if d.plugin.stage not in ("train", "post"):
            raise ParamError(f"defense {d.name!r} declares stage {d.plugin.stage!r}; expected 'train' or 'post'")
    estimators = [_resolve_one("estimator", t, i) for i, t in enumerate(config.estimators)]
    _unique(estimators)
    reserve = 0.0
    for d in defenses:
        if d.plugin.stage == "train":
            f = float(d.plugin.reserve_fraction())
            if not 0.0 <= f < 1.0:
                raise ParamError(f"defense {d.label!r} asks to reserve {f!r} of the records; expected [0, 1)")
            reserve = max(reserve, f)
    return Plan(
        config=config,
        dataset=dataset,
        model=model,
        attacks=tuple(attacks),
        train_defenses=tuple(d for d in defenses if d.plugin.stage == "train"),
        post_defenses=tuple(d for d in defenses if d.plugin.stage == "post"),
        estimators=tuple(estimators),
        targets=targets,
        device=device,
        versions=versions(),
        reserve=reserve,
    )


# ============================================================================ plugin calls
def _guarded(owner: str, fn: Callable, *args):
    """Run plugin code; anything but a usage error becomes a PluginRuntimeError naming the plugin."""
    try:
        return fn(*args)
    except SignalUnavailable as exc:  # e.g. an attack reading probs on a regression dataset: one line, exit 2
        raise SignalUnavailable(f"{owner}: {exc}") from None
    except (PluginRuntimeError, KeyboardInterrupt) + USAGE_ERRORS:
        raise
    except Exception as exc:
        raise PluginRuntimeError(owner, f"{type(exc).__name__}: {exc}", traceback.format_exc()) from exc


def _jsonable(owner: str, obj) -> Any:
    """Round-trip through JSON so a plugin's report is plain data (numpy and torch values allowed)."""
    try:
        return plain_json(obj)
    except ValueError as exc:
        raise PluginRuntimeError(owner, f"returned a report that is {exc}") from None


# ============================================================================ stage 2: records
def load_records(plan: Plan) -> Records:
    """Stage 2: the dataset's records (at least 4)."""
    d = plan.dataset
    records = _guarded(d.owner, d.plugin.load)
    if not isinstance(records, Records):
        raise PluginRuntimeError(d.owner, f"load() returned {type(records).__name__}, not Records")
    if records.n < 4:
        raise ParamError(f"dataset {d.name!r} has only {records.n} records; membership inference needs at least 4")
    return records


def check_task(plan: Plan, records: Records) -> None:
    """Refuse, before anything trains, a plan whose plugins cannot work on the dataset's task.

    A regression dataset (:attr:`Records.task`) needs a model family solved in closed form (one with
    ``fit_closed_form``, e.g. ``linreg``: SGD training minimises cross-entropy), takes no train-time
    defense, and gives no ``correct``/``probs`` signal, so a plugin whose access is ``label`` only
    cannot run. A closed-form (regression) family on a classification dataset is refused too.
    Attacks that read ``probs`` under ``probs`` access fail when they read it (one line, exit 2).

    Raises:
        ParamError: naming the plugin and what to use instead.
    """
    fam = plan.model
    closed = callable(getattr(fam.plugin, "fit_closed_form", None))
    if not records.is_regression:
        if closed:
            raise ParamError(f"model {fam.label!r} is a regression model; dataset {plan.dataset.label!r} is a "
                             f"classification task (use a regression dataset, e.g. diabetes)")
        return
    if not closed:
        raise ParamError(f"dataset {plan.dataset.label!r} is a regression task (real-valued targets); model "
                         f"{fam.label!r} trains by SGD on cross-entropy: use a regression model, e.g. linreg")
    if plan.train_defenses:
        raise ParamError(f"defense {plan.train_defenses[0].label!r} hooks into SGD training; model {fam.label!r} is "
                         f"solved in closed form (use its regularisation, or a post-training defense)")
    for c in list(plan.attacks) + list(plan.estimators):
        if set(c.plugin.access) <= {"label"}:
            raise ParamError(f"{c.owner} reads predicted labels only ({tuple(c.plugin.access)} access), which a "
                             f"regression dataset ({plan.dataset.label!r}) does not have")


# ============================================================================ stage 3: population
@dataclass
class PopulationResult:
    """Stage 3's result: the trained (undefended by post-training defenses) population.

    Attributes:
        population: the trained models.
        key: the content-address of the population in the cache.
        from_cache: whether it was loaded instead of trained.
        train_reports: each train-time defense's report, in order (from the cache's metadata when
            loaded).
        training: what training did (:meth:`TrainingResult.to_dict` without the defenses'
            reports: per-epoch losses, steps, sampling rate, sampler, forward path), from the
            cache's metadata when loaded.
    """

    population: ModelPopulation
    key: str
    from_cache: bool
    train_reports: List[Dict[str, Any]]
    training: Dict[str, Any]


def population_key(plan: Plan, records: Records) -> str:
    """The cache address of the population ``plan`` trains on ``records``: everything that
    defines the trained weights (data, model, recipe, train-time defenses, size, seed, versions,
    device type)."""
    c = plan.config
    return cache_key(
        {
            "kind": "population",
            "dataset": plan.dataset.spec.to_dict(),
            "records": records.fingerprint(),
            "model": plan.model.spec.to_dict(),
            "recipe": c.recipe.to_dict(),
            "train_defenses": [d.spec.to_dict() for d in plan.train_defenses],
            "n_models": c.n_models,
            "seed": c.seed,
            "device": plan.device.type,
            **({"reserve": plan.reserve} if plan.reserve else {}),  # keys without a reservation stay as they were
            "miafw": mia_core.__version__,
            "torch": torch.__version__,
        }
    )


def train_population(plan: Plan, records: Records, *, cache: Optional[PopulationCache] = None,
                     reporter: Optional[Reporter] = None) -> PopulationResult:
    """Stage 3: train ``n_models`` models with the recipe and the train-time defenses, or load
    them from the cache."""
    reporter = reporter or Reporter()
    cache = cache or PopulationCache(None)
    c, fam = plan.config, plan.model
    check_task(plan, records)
    key = population_key(plan, records)
    build = lambda: fam.plugin.build(records.n_features, records.n_classes)  # noqa: E731
    closed_form = getattr(fam.plugin, "fit_closed_form", None)  # e.g. linreg: no SGD
    entry = cache.load(key)
    if entry is not None:
        state, meta = entry
        try:
            pop = ModelPopulation.from_state(state, records=records, build=build, recipe=c.recipe, seed=c.seed,
                                             device=plan.device)
            raw, training = meta["train_defense_reports"], meta["training"]
            if not isinstance(raw, list) or len(raw) != len(plan.train_defenses):
                raise ValueError("its train-time defense reports do not match the defense chain")
            if not isinstance(training, dict):
                raise ValueError("its training record is not an object")
            pop.train_defenses = tuple(d.plugin for d in plan.train_defenses)  # fine-tuning keeps them
            reporter.message(f"loaded {c.n_models} trained models from the cache ({key[:12]})")
            return PopulationResult(pop, key, True, [_defense_entry(d, r) for d, r in zip(plan.train_defenses, raw)],
                                    training)
        except (KeyError, ValueError, TypeError) as exc:
            reporter.message(f"ignoring a cache entry that does not fit ({exc}); retraining")
    defenses = [d.plugin for d in plan.train_defenses]
    names = "".join(f" + {d.label}" for d in plan.train_defenses)
    if closed_form is None and (c.shards > 1 or c.executor != "local"):
        pop = _train_in_shards(plan, records, key=key, cache=cache, reporter=reporter, build=build)
        _check_finite(fam.owner, pop, "training")
        reports = [_defense_entry(d, rep) for d, rep in zip(plan.train_defenses, pop.training.defenses)]
        training = json.loads(json.dumps({k: v for k, v in pop.training.to_dict().items() if k != "defenses"}))
        _store_population(plan, cache, key, pop, reports, training)
        forget_shards(cache, key, c.n_models, c.shards)
        return PopulationResult(pop, key, False, reports, training)
    desc = f"training {c.n_models} x {fam.name}{names} on {records.name} ({records.n} records)"
    owner = fam.owner if not plan.train_defenses else \
        f"training ({fam.owner} with " + ", ".join(d.owner for d in plan.train_defenses) + ")"
    if closed_form is not None:
        desc = f"solving {c.n_models} x {fam.name} in closed form on {records.name} ({records.n} records)"
    with reporter.progress(1 if closed_form is not None else c.recipe.epochs, desc) as update:
        pop = _guarded(
            owner,
            lambda: ModelPopulation.train(records, build, c.recipe, n_models=c.n_models, seed=c.seed,
                                          defenses=defenses, device=plan.device, reserve=plan.reserve,
                                          on_epoch=lambda e, loss: update(1, loss=loss), closed_form=closed_form),
        )
        if closed_form is not None:
            update(1)
    _check_finite(owner, pop, "training")
    reports = [_defense_entry(d, rep) for d, rep in zip(plan.train_defenses, pop.training.defenses)]
    training = json.loads(json.dumps({k: v for k, v in pop.training.to_dict().items() if k != "defenses"}))
    _store_population(plan, cache, key, pop, reports, training)
    return PopulationResult(pop, key, False, reports, training)


def _store_population(plan: Plan, cache: PopulationCache, key: str, pop: ModelPopulation, reports, training) -> None:
    c = plan.config
    cache.store(key, pop.state(), {"key": key, "dataset": plan.dataset.spec.to_dict(),
                                   "model": plan.model.spec.to_dict(), "recipe": c.recipe.to_dict(),
                                   "train_defense_reports": [r["report"] for r in reports], "training": training,
                                   "n_models": c.n_models, "seed": c.seed, "device": plan.device.type,
                                   "versions": plan.versions})


def _train_in_shards(plan: Plan, records: Records, *, key: str, cache: PopulationCache, reporter: Reporter,
                     build) -> ModelPopulation:
    """The population trained as ``plan.config.shards`` shards on ``plan.config.executor``, each
    finished shard cached under its own key (a killed run resumes from them)."""
    c, fam = plan.config, plan.model
    executor = make_executor(c.executor)
    desc = (f"training {c.n_models} x {fam.name} on {records.name} in {c.shards} shard(s) on {executor.spec}")
    owner = f"training ({fam.owner}" + "".join(f", {d.owner}" for d in plan.train_defenses) + ")"
    try:
        with reporter.progress(c.shards, desc) as update:
            return _guarded(owner, lambda: train_sharded(
                records=records, model=(fam.spec.name, dict(fam.spec.params)), build=build,
                defenses=[(d.spec.name, dict(d.spec.params)) for d in plan.train_defenses],
                defense_plugins=[d.plugin for d in plan.train_defenses], recipe=c.recipe, n_models=c.n_models,
                seed=c.seed, reserve=plan.reserve, device=plan.device, shards=c.shards, executor=executor,
                cache=cache, population_key=key,
                on_shard=lambda i, cached: update(1),
                on_plan=lambda cached, total: cached and reporter.message(
                    f"resuming: {cached} of {total} shards are already trained (population cache)")))
    finally:
        executor.close()


def _check_finite(owner: str, population: ModelPopulation, what: str) -> None:
    """Weights that are NaN or inf are never evaluated (nor cached): the run fails, naming who made them."""
    for name, p in population.params.items():
        bad = ~torch.isfinite(p.detach()).reshape(p.shape[0], -1).all(dim=1)
        if bool(bad.any()):
            models = torch.nonzero(bad).flatten().tolist()
            raise PluginRuntimeError(owner, f"{what} left non-finite weights in {name!r} of model(s) "
                                            f"{models[:5]}{'...' if len(models) > 5 else ''}; lower the learning "
                                            f"rate or the defense's strength")


def _defense_entry(d: Component, report) -> Dict[str, Any]:
    if not isinstance(report, dict):
        raise PluginRuntimeError(d.owner, f"returned a report of type {type(report).__name__}, expected a dict")
    return {"name": d.name, "label": d.label, "stage": d.plugin.stage, "params": dict(d.spec.params),
            "report": _jsonable(d.owner, report)}


# ============================================================================ stage 4: defenses
@dataclass
class DefenseResult:
    """Stage 4's result: a defended copy of the population and each post-training defense's report."""

    population: ModelPopulation
    reports: List[Dict[str, Any]]


def apply_defenses(plan: Plan, population: ModelPopulation, *, reporter: Optional[Reporter] = None) -> DefenseResult:
    """Stage 4: apply the post-training defenses in order to a copy of every model (an adaptive
    attacker knows the recipe, so reference models are defended like the target). The input
    population (possibly the cache's) is never changed."""
    reporter = reporter or Reporter()
    if not plan.post_defenses:
        return DefenseResult(population, [])
    work = population.clone()
    reports = []
    for d in plan.post_defenses:
        reporter.message(f"applying defense {d.label}")
        report = _guarded(d.owner, d.plugin.apply, DefenseContext(work, position=d.position))
        _check_finite(d.owner, work, "apply()")
        reports.append(_defense_entry(d, report))
    return DefenseResult(work, reports)


# ============================================================================ stage 5: signals
def compute_signals(population: ModelPopulation) -> Signals:
    """Stage 5: every model's signals on every record, once, after the last defense."""
    return population.signals()


# ============================================================================ stage 6: attacks
def _check_scores(owner: str, scores, n: int) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.shape != (n,):
        raise PluginRuntimeError(owner, f"score() returned shape {arr.shape}, expected ({n},)")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise PluginRuntimeError(owner, f"score() returned dtype {arr.dtype}, expected real numbers")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise PluginRuntimeError(
            owner, f"score() returned {int(bad.sum())} NaN/inf values (first at record {int(np.argmax(bad))})"
        )
    return arr


def run_attacks(plan: Plan, population: ModelPopulation, signals: Signals, *,
                reporter: Optional[Reporter] = None,
                references: Optional[Tuple[ModelPopulation, Signals]] = None) -> Dict[str, np.ndarray]:
    """Stage 6: fit each attack once and score every record against each target.

    Args:
        references: for a non-adaptive evaluation, the undefended population and its signals:
            the attacks' reference models are read from it, the targets from ``population``.

    Returns:
        ``{label: float64 [T, N']}`` in the plan's attack order, ``T = len(plan.targets)``, over the
        population's scored records (``N' = N`` unless a train-time defense reserved some).
    """
    reporter = reporter or Reporter()
    all_records = population.scored_records  # every record but the reserved ones
    n = len(all_records)
    scores: Dict[str, np.ndarray] = {}
    for a in plan.attacks:
        ref_ctx = None
        if references is not None:
            ref_ctx = SignalContext(references[0], a.plugin.access, owner=f"attack {a.name!r}", signals=references[1])
        ctx = AttackContext(population, a.plugin.access, owner=f"attack {a.name!r}", signals=signals, strict=True,
                            references=ref_ctx)
        with reporter.progress(len(plan.targets), f"attack {a.label}") as update:
            _guarded(a.owner, a.plugin.fit, ctx)
            rows = []
            for t in plan.targets:
                with ctx.scoring(t):  # the attack may take only this target's view
                    rows.append(_check_scores(a.owner, _guarded(a.owner, a.plugin.score, t, all_records), n))
                update(1)
        scores[a.label] = np.stack(rows)
    return scores


# ============================================================================ stage 7: estimators
@dataclass(frozen=True)
class Estimate:
    """One estimator's result, checked.

    Attributes:
        value: the estimate.
        interval: ``(low, high)`` at the plan's confidence, or ``None``.
        advantage_bound: the upper bound it implies on any attack's membership advantage
            (in ``[0, 1]``), or ``None``.
        report: everything else the estimator returned.
    """

    value: float
    interval: Optional[Tuple[float, float]]
    advantage_bound: Optional[float]
    report: Dict[str, Any]


def check_estimate(out) -> Estimate:
    """Validate what :meth:`~mia_core.base.Estimator.estimate` returned (the engine and the
    conformance kit share this one rule set).

    Raises:
        ValueError: naming the bad field and what is allowed.
    """
    if not isinstance(out, dict):
        raise ValueError(f"estimate() returned {type(out).__name__}, expected a dict with a 'value' key")
    try:
        out = plain_json(out)
    except ValueError as exc:
        raise ValueError(f"estimate() returned a result that is {exc}") from None
    if "value" not in out:
        raise ValueError("estimate() returned no 'value'")
    value = out.pop("value")
    if not _is_real(value) or not math.isfinite(value):
        raise ValueError(f"estimate() returned value {value!r}, expected a finite number (not NaN or inf)")
    interval = out.pop("interval", None)
    if interval is not None:
        if not (isinstance(interval, list) and len(interval) == 2 and all(_is_real(v) and not math.isnan(v)
                                                                         for v in interval)) \
                or interval[0] > interval[1]:
            raise ValueError(f"estimate() returned interval {interval!r}, expected [low, high] with low <= high")
        interval = (float(interval[0]), float(interval[1]))
    bound = out.pop("advantage_bound", None)
    if bound is not None:
        if not _is_real(bound) or not 0 <= bound <= 1:
            raise ValueError(f"estimate() returned advantage_bound {bound!r}, expected a number in [0, 1] or None")
        bound = float(bound)
    return Estimate(float(value), interval, bound, out)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _checked_estimate(owner: str, out) -> Estimate:
    try:
        return check_estimate(out)
    except ValueError as exc:
        raise PluginRuntimeError(owner, str(exc)) from None


def run_estimators(plan: Plan, population: ModelPopulation, signals: Signals, *,
                   reporter: Optional[Reporter] = None) -> Dict[str, Estimate]:
    """Stage 7: each estimator on the same (defended) population and signals as the attacks.

    Estimators see the full keep matrix (they measure leakage, they do not attack a target).
    """
    reporter = reporter or Reporter()
    out: Dict[str, Estimate] = {}
    for e in plan.estimators:
        reporter.message(f"estimator {e.label}")
        ctx = EstimatorContext(population, e.plugin.access, owner=f"estimator {e.name!r}", signals=signals)
        out[e.label] = _checked_estimate(e.owner, _guarded(e.owner, e.plugin.estimate, ctx))
    return out


# ============================================================================ stage 8: metrics
@dataclass
class MetricsResult:
    """Stage 8's result: the ``metrics.json`` document and the ROC curve of each attack."""

    document: Dict[str, Any]
    curves: Dict[str, metrics.RocCurve]


def dp_audit(train_reports: List[Dict[str, Any]], scores: Dict[str, np.ndarray], membership: np.ndarray, *,
             confidence: float) -> Optional[Dict[str, Any]]:
    """Audit a differentially private training (Jagielski et al. 2020): every attack's empirical
    ε lower bound at the accountant's δ, beside the accountant's ε.

    A train-time defense that reports ``epsilon`` and ``delta`` (``dp-sgd``) is audited; with
    several, the one with the smallest ε. The lower bound of a sound audit cannot exceed the
    accountant's ε (up to the bound's statistical error and its independence assumption, see
    :func:`mia_core.metrics.epsilon_lower_bound`); one that does means a bug in the training, the
    accountant or the evaluation, and is reported as a warning, never hidden.

    Returns:
        ``None`` without such a defense; else ``{"defense", "accountant_epsilon", "delta",
        "lower_bounds": {attack: ε}, "best_attack", "best_lower_bound", "consistent", "message"}``.
    """
    dp = [r for r in train_reports if isinstance(r.get("report"), dict)
          and isinstance(r["report"].get("epsilon"), (int, float)) and isinstance(r["report"].get("delta"), (int, float))]
    if not dp or not scores:
        return None
    entry = min(dp, key=lambda r: r["report"]["epsilon"])
    eps, delta = float(entry["report"]["epsilon"]), float(entry["report"]["delta"])
    bounds = {label: metrics.epsilon_lower_bound(s, membership, confidence=confidence, delta=delta)
              for label, s in scores.items()}
    best = max(bounds, key=bounds.get)
    ok = bounds[best] <= eps
    if ok:
        message = (f"DP audit: the best attack's empirical ε lower bound ({best}: {bounds[best]:.3f} at δ={delta:g}) "
                   f"is below the accountant's ε = {eps:.3f}, as it must be")
    else:
        message = (f"DP AUDIT FAILED: attack {best!r} shows an empirical ε lower bound of {bounds[best]:.3f} at "
                   f"δ={delta:g}, above the accountant's ε = {eps:.3f} from {entry['name']!r}: a bug in the training, "
                   f"the accountant or the evaluation (or the bound's independence assumption does not hold here)")
    return {"defense": entry["name"], "accountant_epsilon": eps, "delta": delta, "lower_bounds": bounds,
            "best_attack": best, "best_lower_bound": bounds[best], "consistent": bool(ok), "message": message}


def compute_metrics(plan: Plan, *, records: Records, trained: PopulationResult, defended: DefenseResult,
                    undefended_signals: Signals, signals: Signals, scores: Dict[str, np.ndarray],
                    estimates: Dict[str, Estimate]) -> MetricsResult:
    """Stage 8: pooled attack metrics (members positive), estimator rows beside the best
    measured advantage, and the targets' accuracy with the defenses and without any
    (``undefended_signals``: the population trained without train-time defenses, before the
    post-training ones), which gives the defenses' accuracy cost."""
    c, targets = plan.config, list(plan.targets)
    keep = defended.population.keep
    scored = defended.population.scored_records  # reserved records are never scored
    membership = keep[targets][:, scored]
    attack_metrics, curves = {}, {}
    groups = np.tile(scored, len(targets))  # a record's scores against every target: one cluster
    slices = {}
    if not records.is_regression:  # classes and correctness do not exist on regression: no slices there
        labels = np.tile(records.y[scored], len(targets))
        correct = signals.correct[targets][:, scored].ravel() > 0.5
        slices = {f"class={k}": labels == k for k in range(records.n_classes) if (labels == k).any()}
        slices.update({"target_correct=true": correct, "target_correct=false": ~correct})
    for a in plan.attacks:
        s = scores[a.label]
        summary, curves[a.label] = metrics.summarize_with_curve(s.ravel(), membership.ravel(), fprs=tuple(c.fprs),
                                                                 confidence=c.confidence, groups=groups, seed=c.seed)
        summary["slices"] = metrics.slice_metrics(scores=s.ravel(), membership=membership.ravel(), slices=slices,
                                                  fprs=tuple(c.fprs), confidence=c.confidence)
        per_target = [metrics.auc(row, m) for row, m in zip(s, membership)]
        summary["per_target_auc"] = {"mean": float(np.mean(per_target)), "std": float(np.std(per_target)),
                                     "min": float(np.min(per_target)), "max": float(np.max(per_target))}
        summary["name"] = a.name
        summary["params"] = dict(a.spec.params)
        attack_metrics[a.label] = summary
    best_label = max(attack_metrics, key=lambda k: attack_metrics[k]["advantage"])
    best = {"label": best_label, "advantage": attack_metrics[best_label]["advantage"]}
    estimator_metrics = {}
    for e in plan.estimators:
        est = estimates[e.label]
        entry = {"name": e.name, "params": dict(e.spec.params), "value": est.value,
                 "interval": list(est.interval) if est.interval else None,
                 "advantage_bound": est.advantage_bound, "report": est.report}
        if est.advantage_bound is not None and best["advantage"] > est.advantage_bound:
            entry["warning"] = (f"the measured advantage of {best_label!r} ({best['advantage']:.3f}) exceeds this "
                                f"bound ({est.advantage_bound:.3f}); the bound's assumptions may not hold here "
                                f"(or the measured advantage is within its sampling error of it)")
        estimator_metrics[e.label] = entry
    regression = records.is_regression
    # regression: accuracy is undefined; the mean squared error stands in (target["train_mse"], ...),
    # and the accuracy fields are None
    # on the scored records only: reserved records are not the targets' test data
    measure = mse if regression else accuracy
    acc = measure(signals.take(scored), keep[:, scored])
    before = measure(undefended_signals.take(scored), keep[:, scored])
    doc_warnings = population_warnings(records, float(before["train"][targets].mean()), plan.dataset.name)
    quality = "mse" if regression else "accuracy"
    target_doc = {f"train_{quality}": float(acc["train"][targets].mean()),
                  f"test_{quality}": float(acc["test"][targets].mean()),
                  f"train_{quality}_per_target": [float(a) for a in acc["train"][targets]],
                  f"test_{quality}_per_target": [float(a) for a in acc["test"][targets]],
                  f"undefended_train_{quality}": float(before["train"][targets].mean()),
                  f"undefended_test_{quality}": float(before["test"][targets].mean())}
    if regression:
        target_doc.update({k.replace("mse", "accuracy"): None for k in list(target_doc)})
    audit = dp_audit(trained.train_reports, {a.label: scores[a.label].ravel() for a in plan.attacks},
                     membership.ravel(), confidence=c.confidence)
    if audit is not None and not audit["consistent"]:
        doc_warnings.append(audit["message"])
    for w in doc_warnings:
        warnings.warn(w, EvaluationWarning, stacklevel=2)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "attacks": attack_metrics,
        "best_attack": best,
        "adaptive": bool(c.adaptive),
        **({"dp_audit": audit} if audit is not None else {}),
        **({"budget": check_budgets(attack_metrics, parse_budgets(c.budgets))} if c.budgets else {}),
        "estimators": estimator_metrics,
        "target": {
            "targets": targets,
            "pooled_over_targets": len(targets),
            **target_doc,
        },
        "defenses": _in_user_order(plan, trained.train_reports, defended.reports),
        "training": trained.training,
        "warnings": doc_warnings,
        "population": {
            "n_models": c.n_models,
            "n_records": records.n,
            "reserved_records": int(records.n - len(scored)),
            "members_per_model_mean": float(keep.sum(1).mean()),
            "cache_key": trained.key,
        },
    }
    return MetricsResult(doc, curves)


class EvaluationWarning(UserWarning):
    """Something about the evaluation makes its numbers doubtful (also listed in ``metrics.json``)."""


#: A population whose mean train accuracy (before defenses) is within this of always predicting the
#: majority class did not learn: attacks on it measure nothing.
CHANCE_MARGIN = 0.05


def population_warnings(records: Records, train_accuracy: float, dataset: str) -> List[str]:
    """What makes an evaluation doubtful: labels with gaps (classes without a record still get
    an output each), and a population that did not learn (train accuracy at chance).

    On a regression dataset ``train_accuracy`` is the train mean squared error, and a population
    did not learn when it explains less than ``CHANCE_MARGIN`` of the targets' variance
    (``R^2 = 1 - MSE / var(y)``; predicting the mean scores 0)."""
    out = []
    if records.is_regression:
        var = float(np.var(records.y))
        if train_accuracy >= (1 - CHANCE_MARGIN) * var:
            out.append(f"the population did not learn: mean train MSE {train_accuracy:.4g} explains under "
                       f"{100 * CHANCE_MARGIN:.0f}% of the targets' variance {var:.4g}, so the attacks measure "
                       f"little; check the model's regularisation")
        return out
    counts = np.bincount(records.y, minlength=records.n_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        shown = ", ".join(map(str, empty[:5].tolist())) + (", ..." if empty.size > 5 else "")
        out.append(f"dataset {dataset!r}: {empty.size} of its {records.n_classes} classes have no record "
                   f"(labels {shown}); the models still get one output each. Relabel the classes as 0..K-1")
    majority = float(counts.max() / counts.sum())
    if train_accuracy <= majority + CHANCE_MARGIN:
        out.append(f"the population did not learn: mean train accuracy {100 * train_accuracy:.1f}% is at chance "
                   f"(the majority class is {100 * majority:.1f}% of the records), so the attacks measure "
                   f"nothing; check --epochs and --lr")
    return out


def _in_user_order(plan: Plan, train_reports: List[Dict], post_reports: List[Dict]) -> List[Dict]:
    by_position = {d.position: r for d, r in zip(plan.train_defenses, train_reports)}
    by_position.update({d.position: r for d, r in zip(plan.post_defenses, post_reports)})
    return [by_position[p] for p in sorted(by_position)]


# ============================================================================ the whole evaluation
@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    Attributes:
        plan: the resolved plan (``plan.document`` is ``config.json``).
        metrics: the ``metrics.json`` document.
        scores: ``{attack label: float64 [T, N]}``, higher = more likely a member.
        membership: bool ``[T, N]``, True = member of that target's training set.
        targets: the target model indices ``[T]``; record_index: the records' stable indices ``[N]``.
        estimates: ``{estimator label: Estimate}``.
        curves: ``{attack label: RocCurve}`` (pooled over targets).
        population: the defended population the attacks ran on.
        run_dir: the run directory, when :func:`evaluate` was given ``out``.
    """

    plan: Plan
    metrics: Dict[str, Any]
    scores: Dict[str, np.ndarray]
    membership: np.ndarray
    targets: List[int]
    record_index: np.ndarray
    estimates: Dict[str, Estimate]
    curves: Dict[str, metrics.RocCurve]
    population: ModelPopulation
    run_dir: Optional[Path] = None

    @property
    def config(self) -> Dict[str, Any]:
        return self.plan.document


def _available_memory(device: torch.device) -> Optional[int]:
    """Bytes the evaluation may still allocate on ``device`` (None when unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate_memory(plan: Plan, records: Records) -> int:
    """Bytes training needs, roughly: every model's parameters with their gradients, Adam's two
    moments and the trainer's workspace (6 copies), plus one step's activations and their
    gradients for ``M x batch`` rows through every linear and convolutional layer's output
    (float32)."""
    model = plan.model.plugin.build(records.n_features, records.n_classes)
    n_params = sum(p.numel() for p in model.parameters())
    widths = []  # per record, the outputs of every linear and convolutional layer (one meta-device pass)
    hooks = [m.register_forward_hook(lambda mod, inp, out: widths.append(out[0].numel()))
             for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    try:
        with torch.no_grad():
            model.to("meta")(torch.empty(1, records.n_features, device="meta"))
    except Exception:  # a module the meta pass cannot run: count its linear layers' widths
        widths = [m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    finally:
        for h in hooks:
            h.remove()
    widths = widths or [records.n_classes]
    c = plan.config
    rows = c.n_models * c.recipe.batch_size  # a fixed-size batch larger than a half repeats records
    return 4 * (6 * c.n_models * n_params + 3 * rows * (records.n_features + sum(widths)))


def check_defenses(plan: Plan, records: Records) -> None:
    """Every attack's :meth:`~mia_core.base.Attack.check_records` on the records and every
    defense's :meth:`~mia_core.base.Defense.check_model` on the model family, before anything
    trains.

    Raises:
        ParamError: naming the attack or defense and why it cannot run here.
    """
    for a in plan.attacks:
        try:
            a.plugin.check_records(records)
        except ValueError as exc:
            raise ParamError(f"attack {a.label!r} cannot run on dataset {plan.dataset.label!r}: {exc}") from None
    if not plan.defenses:
        return
    module = plan.model.plugin.build(records.n_features, records.n_classes).to("meta")
    for d in plan.defenses:
        try:
            d.plugin.check_model(module)
        except ValueError as exc:
            raise ParamError(f"defense {d.label!r} cannot apply to model {plan.model.label!r}: {exc}") from None


def check_resources(plan: Plan, records: Records, *, out: Optional[Path] = None) -> None:
    """Refuse, before anything is trained or written, a population that cannot fit in memory and
    an output directory that cannot be written or has no room for the run.

    Raises:
        ParamError: naming what is short and what to change.
    """
    try:
        need = estimate_memory(plan, records)
    except Exception:  # a model family that fails to build fails in training, recorded with its traceback
        need = 0
    have = _available_memory(plan.device)
    if have is not None and need > have:
        raise ParamError(f"training {plan.config.n_models} models with batch size {plan.config.recipe.batch_size} "
                         f"needs about {need / 2**30:.1f} GiB, but {have / 2**30:.1f} GiB of {plan.device.type} "
                         f"memory is available; use fewer --n-models or a smaller --batch-size")
    if out is None:
        return
    existing = Path(out)
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ParamError(f"--out {out}: {existing} is not a writable directory")
    n_scores = len(plan.targets) * records.n * (len(plan.attacks) + 1)
    run_bytes = 8 * n_scores + 2**20  # scores.npz (uncompressed, the worst case), plots and JSON
    free = shutil.disk_usage(existing).free
    if free < run_bytes:
        raise ParamError(f"--out {out}: {free / 2**20:.1f} MiB free, the run needs about {run_bytes / 2**20:.1f} MiB")


def run_stages(plan: Plan, *, cache: Optional[PopulationCache] = None,
               reporter: Optional[Reporter] = None, records: Optional[Records] = None,
               trained: Optional[PopulationResult] = None, baseline: Optional[PopulationResult] = None) -> Evaluation:
    """Stages 2 to 8 for a resolved plan (nothing written); ``records`` when already loaded;
    ``trained`` (and, with train-time defenses, ``baseline``: the population without them) when
    already trained (:func:`train_point_populations`: a sweep point run on a worker)."""
    reporter = reporter or Reporter()
    records = load_records(plan) if records is None else records
    if trained is None:
        trained = train_population(plan, records, cache=cache, reporter=reporter)
    trained_signals = compute_signals(trained.population)
    undefended, undefended_signals = trained.population, trained_signals
    if plan.train_defenses:  # the accuracy cost of a train-time defense needs the population without it
        if baseline is None:
            reporter.message("the same population without train-time defenses, for their accuracy cost:")
            baseline = train_population(dataclasses.replace(plan, train_defenses=()), records, cache=cache,
                                        reporter=reporter)
        undefended, undefended_signals = baseline.population, compute_signals(baseline.population)
    defended = apply_defenses(plan, trained.population, reporter=reporter)
    trained = _compose_finetuning(plan, trained, defended.population)
    signals = compute_signals(defended.population) if plan.post_defenses else trained_signals
    target_pop, target_signals = scored_view(defended.population, signals)  # reserved records: never shown
    references = None
    if not plan.config.adaptive and plan.defenses:  # the target alone carries the defenses
        references = scored_view(undefended, undefended_signals)
    scores = run_attacks(plan, target_pop, target_signals, reporter=reporter, references=references)
    estimates = run_estimators(plan, target_pop, target_signals, reporter=reporter)
    m = compute_metrics(plan, records=records, trained=trained, defended=defended,
                        undefended_signals=undefended_signals, signals=signals, scores=scores, estimates=estimates)
    _flag_unaccounted_finetuning(plan, m.document, defended.population.finetune_steps)
    targets = list(plan.targets)
    scored = defended.population.scored_records
    return Evaluation(plan=plan, metrics=m.document, scores=scores,
                      membership=defended.population.keep[targets][:, scored],
                      targets=targets, record_index=records.index[scored], estimates=estimates, curves=m.curves,
                      population=defended.population)


def evaluate(config: Union[EvalConfig, Plan], *, out: Optional[Union[str, Path]] = None,
             cache: Optional[Union[PopulationCache, str, Path]] = None,
             reporter: Optional[Reporter] = None) -> Evaluation:
    """Run one evaluation end to end; the one public entry point.

    Args:
        config: what to evaluate (or a :class:`Plan` already resolved from one).
        out: a directory to write the run into (``<out>/<timestamp>-<hash>/``, recorded in
            ``<out>/index.sqlite``); ``None`` writes nothing.
        cache: a :class:`PopulationCache` or a cache directory; ``None`` disables the cache.
        reporter: progress and messages (:class:`~mia_core.engine.progress.TerminalReporter`
            draws bars); ``None`` is silent.

    Returns:
        An :class:`Evaluation`; ``evaluation.run_dir`` is the written directory when ``out`` was given.

    Raises:
        One of :data:`USAGE_ERRORS` for unusable input (before any training; no run directory is
        left behind), :class:`PluginRuntimeError` when a plugin fails (the run directory is
        renamed ``<name>.failed``; the exception's ``run_dir`` attribute names it).

    Example::

        import mia_core
        ev = mia_core.evaluate(mia_core.EvalConfig(attacks=["lira"], defenses=["prune:sparsity=0.9"]))
        print(ev.metrics["attacks"]["lira"]["auc"])
    """
    plan = config if isinstance(config, Plan) else resolve(config)
    if not isinstance(cache, PopulationCache):
        cache = PopulationCache(None if cache is None else Path(cache).expanduser())
    out = None if out is None else Path(out).expanduser()
    records = prepare_records(plan, out=out)
    if out is None:
        return run_stages(plan, cache=cache, reporter=reporter, records=records)
    return write_evaluation(plan, out, lambda: run_stages(plan, cache=cache, reporter=reporter, records=records))


def _compose_finetuning(plan: Plan, trained: PopulationResult, population: ModelPopulation) -> PopulationResult:
    """The train-time defenses' reports with the post-training fine-tuning composed in
    (:meth:`~mia_core.base.TrainingDefense.compose`: dp-sgd's ε then covers every noisy step the
    released models took); reports a defense cannot compose are left for
    :func:`_flag_unaccounted_finetuning`."""
    runs = population.finetune_reports
    if not runs or not plan.train_defenses:
        return trained
    reports = []
    for i, (d, entry) in enumerate(zip(plan.train_defenses, trained.train_reports)):
        composed = _guarded(d.owner, d.plugin.compose, [entry["report"]] + [run[i] for run in runs if i < len(run)])
        reports.append(entry if composed is None else {**entry, "report": _jsonable(d.owner, composed)})
    return dataclasses.replace(trained, train_reports=reports)


def _flag_unaccounted_finetuning(plan: Plan, doc: Dict[str, Any], steps: int) -> None:
    """A post-training defense that fine-tuned the models (prune's ``finetune_epochs``, its search)
    ran more noisy optimizer steps under a train-time defense that reports an ε; when that defense
    could not compose them (:meth:`~mia_core.base.TrainingDefense.compose`), its ε is a lower bound
    on the released models' ε. Said in the defense's report (``epsilon_excludes_finetuning_steps``),
    in the DP audit and as a warning; never silent."""
    if not steps:
        return
    for entry in doc["defenses"]:
        rep = entry.get("report", {})
        if entry.get("stage") == "train" and isinstance(rep.get("epsilon"), (int, float)) \
                and "steps_finetuning" not in rep:  # composed by the defense itself: nothing left out
            rep["epsilon_excludes_finetuning_steps"] = int(steps)
            names = ", ".join(d.label for d in plan.post_defenses)
            msg = (f"the post-training defense(s) {names} fine-tuned every model for {steps} more steps under "
                   f"{entry['name']!r}; its accountant's epsilon = {rep['epsilon']:.3g} counts the "
                   f"{rep.get('steps', '?')} training steps only, so the released models' epsilon is larger")
            doc["warnings"].append(msg)
            warnings.warn(msg, EvaluationWarning, stacklevel=3)
            if "dp_audit" in doc:
                doc["dp_audit"]["accountant_epsilon_excludes_finetuning_steps"] = int(steps)


def prepare_records(plan: Plan, *, out: Optional[Path] = None, records: Optional[Records] = None) -> Records:
    """The plan's records (loaded unless given), with every check that needs them run: the task,
    the attacks' records and the defenses' model, memory and the output directory. Unusable data
    is a usage error here, before anything trains or any run directory exists."""
    records = load_records(plan) if records is None else records
    check_task(plan, records)
    check_defenses(plan, records)
    check_resources(plan, records, out=out)
    return records


def write_evaluation(plan: Plan, out: Path, produce: Callable[[], Evaluation]) -> Evaluation:
    """Open the run directory (``config.json``, ``config.toml``, the index row), call ``produce``
    for the :class:`Evaluation` and write it; a failure marks the run failed (a usage error
    discards it)."""
    run = RunDir(Path(out), plan.document, index=RunIndex(Path(out)), discard_on=USAGE_ERRORS)
    with run:
        from mia_core import configfile

        (run.path / "config.toml").write_text(configfile.dump(plan.config))  # `eval --config` repeats the run
        ev = produce()
        write_run(run, ev)
    ev.run_dir = run.final
    return ev


@dataclass(frozen=True)
class PointJob:
    """One evaluation whose populations are already trained, to run anywhere (a sweep point on an
    executor): the plan, the records, the trained population and, with train-time defenses, the
    same population without them."""

    plan: Plan
    records: Records
    trained: PopulationResult
    baseline: Optional[PopulationResult] = None


def train_point_populations(plan: Plan, records: Records, *, cache: PopulationCache,
                            reporter: Optional[Reporter] = None) -> PointJob:
    """Train (or load) what :func:`run_point` needs, here: the population (in shards on the plan's
    executor) and, with train-time defenses, the one without them."""
    trained = train_population(plan, records, cache=cache, reporter=reporter)
    baseline = None
    if plan.train_defenses:
        baseline = train_population(dataclasses.replace(plan, train_defenses=()), records, cache=cache,
                                    reporter=reporter)
    return PointJob(plan=plan, records=records, trained=trained, baseline=baseline)


def run_point(job: PointJob) -> Evaluation:
    """Stages 4 to 8 of a :class:`PointJob` (defenses, signals, attacks, estimators, metrics),
    wherever the executor runs it."""
    return run_stages(job.plan, records=job.records, trained=job.trained, baseline=job.baseline)


__all__ = [
    "Component",
    "DEFAULT_FPRS",
    "DefenseResult",
    "Estimate",
    "EvalConfig",
    "EvaluationWarning",
    "Evaluation",
    "MetricsResult",
    "Plan",
    "PluginRuntimeError",
    "PointJob",
    "PopulationResult",
    "USAGE_ERRORS",
    "apply_defenses",
    "check_defenses",
    "check_estimate",
    "check_task",
    "check_resources",
    "estimate_memory",
    "compute_metrics",
    "compute_signals",
    "dp_audit",
    "evaluate",
    "load_records",
    "parse_targets",
    "prepare_records",
    "population_key",
    "resolve",
    "resolve_device",
    "run_attacks",
    "run_estimators",
    "run_point",
    "run_stages",
    "scored_view",
    "train_point_populations",
    "train_population",
    "versions",
    "write_evaluation",
]
