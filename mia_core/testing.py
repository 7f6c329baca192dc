"""Conformance kit for plugin authors: ``check_attack``, ``check_defense``, ``check_estimator``,
``check_unlearner``.

Run these in your plugin's test suite (miafw runs them over every registered plugin too)::

    from mia_core.testing import check_attack

    def test_my_attack_conforms():
        check_attack(MyAttack)                       # default parameters
        check_attack(MyAttack, params={"k": 3})      # and any others worth covering

Each check raises :class:`ConformanceError` (an ``AssertionError``, so pytest shows it as a
failure) naming the plugin and the broken rule, and returns a small report dict on success.

What is checked:

* **contract** — the right base class, a compatible plugin API version, a valid ``access``
  declaration (attacks, estimators) or ``stage`` (defenses);
* **parameters** — scikit-learn's rules: every ``__init__`` argument is keyword-able with a
  default, is stored unchanged under its own name, ``get_params()`` round-trips through the
  constructor, ``__init__`` sets no learned (``_``-suffixed) state, the defaults pass
  ``validate()``;
* **behaviour on a planted population** — 8 small MLPs trained on random labels, so members are
  memorised and non-members are not: any sound attack must score members higher
  (pooled AUC > 0.6); scores are finite, one per record, and a record's score does not depend
  on which other records are scored with it;
* **no signal, no membership** — on the null population (the planted models, with membership
  redrawn independently of what they trained on, so no attack can beat chance) the AUC's
  99.9% bootstrap interval must contain 0.5: an attack that "finds" members there reads the
  answer from somewhere it should not (the 99.9% level keeps the check at chance from failing
  by luck across the many attacks and parameter sets a suite checks);
* **determinism** — a fresh instance with the same parameters gives identical output;
* **access** — with a context that grants nothing, the plugin must hit an
  :class:`~mia_core.engine.contexts.AccessError` (it reads signals only through the context, so its
  declared threat model is the real one).
"""

from __future__ import annotations

import functools
import inspect
import json
from typing import Any, Dict, Mapping, Optional

import numpy as np

from mia_core.base import ACCESS_LEVELS, Attack, Defense, Estimator, Plugin, TrainingDefense, check_api_version
from mia_core.engine import AccessError, AttackContext, DefenseContext, EstimatorContext, ModelPopulation
from mia_core.results import json_default, plain_json

#: Pooled AUC an attack must reach on the planted population (members memorised random labels;
#: the loss attack reaches about 0.9).
MIN_PLANTED_AUC = 0.6
PLANTED_TARGETS = (0, 1)
#: Level of the AUC interval that must contain 0.5 on the null population.
NULL_CONFIDENCE = 0.999


class ConformanceError(AssertionError):
    """A plugin breaks a rule of its contract."""


def _fail(cls, rule: str) -> None:
    raise ConformanceError(f"{getattr(cls, '__qualname__', cls)}: {rule}")


def _planted_setup(seed: int):
    """The planted population's records, model builder and recipe."""
    import torch

    from mia_core.data import Records
    from mia_core.engine.trainer import TrainingRecipe

    rng = np.random.default_rng(seed)
    n, d, c = 240, 10, 4
    records = Records.from_arrays(rng.normal(size=(n, d)), rng.integers(0, c, size=n), name="planted")

    def build():
        return torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, c))

    return records, build, TrainingRecipe(epochs=40, lr=5e-3, batch_size=32)


@functools.lru_cache(maxsize=2)
def _planted(seed: int) -> ModelPopulation:
    records, build, recipe = _planted_setup(seed)
    return ModelPopulation.train(records, build, recipe, n_models=8, seed=seed)


def planted_population(seed: int = 0) -> ModelPopulation:
    """A fresh copy of the planted population: 8 MLPs (10-64-4) trained for 40 epochs on random
    halves of 240 records with random labels, so membership is all they learn (train accuracy
    about 0.93, test accuracy about chance, 0.25). Built once per process and seed (1-2 s on
    an idle 2-core machine)."""
    return _planted(seed).clone()


def null_population(seed: int = 0) -> ModelPopulation:
    """The planted population with its keep matrix replaced by an independent one (fresh
    complementary pairs): the models still memorised their training halves, but the membership
    an attack is scored against is unrelated to them, so every attack's AUC is 0.5 in
    expectation."""
    from mia_core.engine.trainer import make_keep_matrix

    pop = _planted(seed).clone()
    pop.keep = make_keep_matrix(pop.n_models, pop.n_records, np.random.default_rng([seed, 0x6E756C6C]))
    return pop


def separable_population(seed: int = 0):
    """A population whose *signals* are planted so that members are separable for every kind of
    attack: ``(population, signals)``.

    The planted population's records, keep matrix and models, with the signals replaced by
    synthetic logits: on a member the true class leads by a margin of ``8 + |N(0, 2^2)|`` for 85% of
    the members and ``2 + |N(0, 1)|`` for the rest (a right-skewed loss, so even Yeom's "loss below
    the mean training loss" decision finds most members), so the prediction is right and confident; on a non-member the logits are ``N(0, 1)`` with the
    true class pushed down by 1, so the prediction is uncertain and usually wrong. Confidence,
    entropy, loss, correctness and every reference-based statistic then separate members; pass
    ``signals`` to :class:`~mia_core.engine.contexts.AttackContext`.
    """
    import torch

    from mia_core.engine.signals import compute_signals

    pop = _planted(seed).clone()
    rng = np.random.default_rng([seed, 0x736570])
    m, n, c = pop.n_models, pop.n_records, pop.records.n_classes
    z = rng.normal(size=(m, n, c))
    y = pop.records.y
    margin = np.where(rng.random((m, n)) < 0.85, 8.0 + np.abs(rng.normal(scale=2.0, size=(m, n))),
                      2.0 + np.abs(rng.normal(size=(m, n))))
    z[:, np.arange(n), y] += np.where(pop.keep, margin, -1.0)
    return pop, compute_signals(torch.from_numpy(z.astype(np.float32)), y)


# ----------------------------------------------------------------------------- parameters
def check_params(cls, params: Optional[Mapping[str, Any]] = None) -> Plugin:
    """scikit-learn's parameter rules; returns an instance built with ``params``."""
    params = dict(params or {})
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        _fail(cls, "is not a subclass of mia_core.base.Plugin")
    sig = inspect.signature(cls.__init__)
    for name, p in sig.parameters.items():
        if name == "self":
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            _fail(cls, f"__init__ takes *{name}; parameters must be explicit keyword arguments")
        if p.kind is p.POSITIONAL_ONLY:
            _fail(cls, f"__init__ parameter {name!r} is positional-only")
        if p.default is inspect.Parameter.empty:
            _fail(cls, f"__init__ parameter {name!r} has no default (every parameter needs one)")
    unknown = set(params) - set(cls.param_signature())
    if unknown:
        _fail(cls, f"check params {sorted(unknown)} are not __init__ parameters")
    try:
        obj = cls(**params)
    except Exception as exc:
        _fail(cls, f"__init__(**{params}) raised {type(exc).__name__}: {exc}")
    expected = {n: p.default for n, p in cls.param_signature().items()}
    expected.update(params)
    for name, value in expected.items():
        if not hasattr(obj, name):
            _fail(cls, f"__init__ does not store parameter {name!r} as self.{name}")
        got = getattr(obj, name)
        if got is not value and not _same(got, value):
            _fail(cls, f"__init__ changed parameter {name!r}: passed {value!r}, stored {got!r} "
                       "(validate in validate()/fit, store unchanged)")
    learned = [k for k in vars(obj) if k.endswith("_") and not k.startswith("_")]
    if learned:
        _fail(cls, f"__init__ sets learned attributes {learned}; set them in fit")
    if obj.get_params() != expected:
        _fail(cls, f"get_params() returned {obj.get_params()!r}, expected {expected!r}")
    try:
        clone = cls(**obj.get_params())
    except Exception as exc:
        _fail(cls, f"cannot be rebuilt from get_params(): {type(exc).__name__}: {exc}")
    if clone.get_params() != obj.get_params():
        _fail(cls, "get_params() does not round-trip through the constructor")
    try:
        obj.validate()
    except Exception as exc:
        _fail(cls, f"validate() rejects {'the defaults' if not params else params}: {type(exc).__name__}: {exc}")
    reason = check_api_version(getattr(cls, "api_version", None))
    if reason:
        _fail(cls, reason)
    return obj


def _same(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:
        return False


def _check_access_decl(cls) -> None:
    access = getattr(cls, "access", None)
    if not isinstance(access, tuple) or not access:
        _fail(cls, f"access must be a non-empty tuple drawn from {ACCESS_LEVELS}, got {access!r}")
    bad = [a for a in access if a not in ACCESS_LEVELS]
    if bad:
        _fail(cls, f"access declares unknown levels {bad}; allowed: {ACCESS_LEVELS}")


def _expect_access_error(cls, run, unenforced: str) -> None:
    """``run()`` happens with no access granted: it must stop at an AccessError."""
    try:
        run()
    except AccessError:
        return
    except ConformanceError:
        raise
    except Exception as exc:
        _fail(cls, f"with no access granted it raised {type(exc).__name__}: {exc} instead of AccessError")
    _fail(cls, unenforced)


# ----------------------------------------------------------------------------- attacks
def _score_all(cls, params, pop: ModelPopulation, access, targets=PLANTED_TARGETS) -> np.ndarray:
    obj = cls(**params)
    ctx = AttackContext(pop, access, owner=f"attack {cls.__qualname__}", strict=True)
    ret = obj.fit(ctx)
    if ret is not obj:
        _fail(cls, f"fit() must return self, returned {type(ret).__name__}")
    rows = []
    records = np.arange(pop.n_records, dtype=np.int64)
    for t in targets:
        with ctx.scoring(t):  # as the engine calls it: the target's view only while scoring it
            s = np.asarray(obj.score(t, records))
        if s.shape != (pop.n_records,):
            _fail(cls, f"score() returned shape {s.shape}, expected ({pop.n_records},)")
        if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
            _fail(cls, f"score() returned dtype {s.dtype}; scores must be real numbers")
        if not np.isfinite(s).all():
            _fail(cls, f"score() returned {int((~np.isfinite(s)).sum())} NaN/inf values")
        rows.append(s.astype(np.float64))
    # a record's score must not depend on which other records are scored with it
    sub = records[::-1][::3].copy()
    with ctx.scoring(PLANTED_TARGETS[0]):
        part = np.asarray(obj.score(PLANTED_TARGETS[0], sub), dtype=np.float64)
    if part.shape != sub.shape or not np.allclose(part, rows[0][sub], rtol=1e-9, atol=1e-12):
        _fail(cls, "score(t, subset) differs from score(t, all records)[subset]; a record's score must "
                   "not depend on the other records in the call")
    return np.stack(rows)


def check_attack(cls, *, params: Optional[Mapping[str, Any]] = None, seed: int = 0,
                 min_auc: float = MIN_PLANTED_AUC) -> Dict[str, Any]:
    """Check an :class:`~mia_core.base.Attack` subclass; returns ``{"auc": ..., ...}``.

    Args:
        min_auc: the pooled AUC the attack must exceed on the planted population. Lower it only
            for an attack that by design ignores what the planted models memorised (e.g. a
            prediction-entropy threshold ignores the label, and these models are confidently
            wrong on non-members too), and say why where you do.
    """
    from mia_core import metrics

    if not (isinstance(cls, type) and issubclass(cls, Attack)):
        _fail(cls, "is not a subclass of mia_core.base.Attack")
    params = dict(params or {})
    check_params(cls, params)
    _check_access_decl(cls)
    need = getattr(cls, "min_reference_models", 0)
    if not isinstance(need, int) or need < 0:
        _fail(cls, f"min_reference_models must be an integer >= 0, got {need!r}")
    pop = planted_population(seed)
    if need > pop.n_models - 1:
        _fail(cls, f"needs {need} reference models; the planted population has {pop.n_models - 1}")
    scores = _score_all(cls, params, pop, cls.access)
    membership = pop.keep[list(PLANTED_TARGETS)]
    auc = metrics.auc(scores.ravel(), membership.ravel())
    if auc < min_auc:
        hint = " — the scores look inverted (higher must mean member)" if auc < 1 - min_auc else ""
        _fail(cls, f"pooled AUC {auc:.3f} on the planted population, where members are memorised; "
                   f"expected > {min_auc}{hint}")
    null = null_population(seed)
    null_scores = _score_all(cls, params, null, cls.access, targets=range(null.n_models))
    n = null.n_records
    null_member = null.keep.ravel()
    lo, hi = metrics.auc_interval(scores=null_scores.ravel(), membership=null_member,
                                  groups=np.tile(np.arange(n), null.n_models), confidence=NULL_CONFIDENCE, seed=seed)
    if not lo <= 0.5 <= hi:
        null_auc = metrics.auc(null_scores.ravel(), null_member)
        _fail(cls, f"AUC {null_auc:.3f} [{lo:.3f}, {hi:.3f}] on the null population, where membership is unrelated "
                   f"to what the models trained on; the interval must contain 0.5 (does the attack read membership "
                   f"from the reference keep matrix or the target's?)")
    again = _score_all(cls, params, planted_population(seed), cls.access)
    if not np.array_equal(scores, again):
        _fail(cls, "two fits with the same parameters and population gave different scores (seed any "
                   "randomness from the context's seed or a random_state parameter)")
    _expect_access_error(cls, lambda: _score_all(cls, params, planted_population(seed), ()),
                         "scored records with no access granted; read signals through the context "
                         "(ctx.for_target(t).target_signal / ref_signal) so the declared access is enforced")
    return {"auc": auc, "params": cls(**params).get_params()}


# ----------------------------------------------------------------------------- defenses
def _check_report(cls, what: str, report) -> Dict[str, Any]:
    """A defense's report must be a dict of JSON data without NaN or inf."""
    if not isinstance(report, dict):
        _fail(cls, f"{what} must return a dict report, returned {type(report).__name__}")
    try:
        plain_json(report)  # the engine's own rule for reports
    except ValueError as exc:
        _fail(cls, f"{what} report is {exc}")
    return report


def _layout(pop: ModelPopulation) -> Dict[str, Any]:
    """The population's parameter names, shapes and dtypes, and a copy of its keep matrix."""
    return {"params": {k: (tuple(v.shape), v.dtype) for k, v in pop.params.items()}, "keep": pop.keep.copy()}


def _check_kept(cls, what: str, pop: ModelPopulation, before: Dict[str, Any]) -> None:
    """After ``what`` changed ``pop`` in place: the same parameter layout, finite weights, the
    same keep matrix."""
    after = _layout(pop)["params"]
    if after != before["params"]:
        _fail(cls, f"{what} changed parameter names, shapes or dtypes: {before['params']} -> {after}")
    for k, v in pop.params.items():
        if not bool(v.isfinite().all()):
            _fail(cls, f"{what} left non-finite values in {k!r}")
    if not np.array_equal(pop.keep, before["keep"]):
        _fail(cls, f"{what} changed the keep matrix")


def _apply(cls, params, pop: ModelPopulation) -> Dict[str, Any]:
    obj = cls(**params)
    before = _layout(pop)
    report = _check_report(cls, "apply()", obj.apply(DefenseContext(pop)))
    _check_kept(cls, "apply()", pop, before)
    return report


def check_defense(cls, *, params: Optional[Mapping[str, Any]] = None, seed: int = 0) -> Dict[str, Any]:
    """Check a defense: a :class:`~mia_core.base.Defense` (stage ``post``) applied to the planted
    population, or a :class:`~mia_core.base.TrainingDefense` (stage ``train``) training it.
    Returns its report."""
    import torch

    if not (isinstance(cls, type) and issubclass(cls, (Defense, TrainingDefense))):
        _fail(cls, "is not a subclass of mia_core.base.Defense (post-training) or TrainingDefense (train-time)")
    params = dict(params or {})
    check_params(cls, params)
    expected = "train" if issubclass(cls, TrainingDefense) else "post"
    if getattr(cls, "stage", None) != expected:
        _fail(cls, f"stage must be {expected!r} for a {'TrainingDefense' if expected == 'train' else 'Defense'} "
                   f"subclass, got {getattr(cls, 'stage', None)!r}")
    if expected == "train":
        a, rep_a = _train_with(cls, params, seed)
        b, rep_b = _train_with(cls, params, seed)
    else:
        a, b = planted_population(seed), planted_population(seed)
        rep_a, rep_b = _apply(cls, params, a), _apply(cls, params, b)
    same = all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    if not same or json.dumps(rep_a, sort_keys=True, default=json_default) != json.dumps(rep_b, sort_keys=True, default=json_default):
        _fail(cls, "two applications with the same parameters and seed gave different weights or reports "
                   "(draw randomness from ctx.rng() or, while training, from the step's per-model generators)")
    return rep_a


#: Epochs of the planted recipe a train-time defense trains for (enough to see it act, and fast).
TRAIN_CHECK_EPOCHS = 10


def _train_with(cls, params, seed: int):
    """The planted population trained (shortly) with one train-time defense: ``(pop, report)``."""
    import dataclasses

    records, build, recipe = _planted_setup(seed)
    recipe = dataclasses.replace(recipe, epochs=TRAIN_CHECK_EPOCHS)
    obj = cls(**params)
    pop = ModelPopulation.train(records, build, recipe, n_models=8, seed=seed, defenses=[obj],
                                reserve=float(obj.reserve_fraction()))  # as the engine reserves for it
    report = _check_report(cls, "report()", pop.training.defenses[0])
    for k, v in pop.params.items():
        if not bool(v.isfinite().all()):
            _fail(cls, f"training with it left non-finite values in {k!r}")
    return pop, report


# ----------------------------------------------------------------------------- estimators
def _estimate(cls, params, pop, access) -> Dict[str, Any]:
    from mia_core.engine.stages import check_estimate

    out = cls(**params).estimate(EstimatorContext(pop, access, owner=f"estimator {cls.__qualname__}"))
    try:
        check_estimate(out)  # the engine's own rules for an estimate
    except ValueError as exc:
        _fail(cls, str(exc))
    return out


def check_estimator(cls, *, params: Optional[Mapping[str, Any]] = None, seed: int = 0) -> Dict[str, Any]:
    """Check an :class:`~mia_core.base.Estimator` subclass; returns its estimate on the planted population."""
    if not (isinstance(cls, type) and issubclass(cls, Estimator)):
        _fail(cls, "is not a subclass of mia_core.base.Estimator")
    params = dict(params or {})
    check_params(cls, params)
    _check_access_decl(cls)
    first = _estimate(cls, params, planted_population(seed), cls.access)
    second = _estimate(cls, params, planted_population(seed), cls.access)
    if json.dumps(first, sort_keys=True, default=json_default) != json.dumps(second, sort_keys=True, default=json_default):
        _fail(cls, "two estimates with the same parameters and population differ")
    _expect_access_error(cls, lambda: _estimate(cls, params, planted_population(seed), ()),
                         "estimated with no access granted; read signals through the context")
    return first


# ----------------------------------------------------------------------------- unlearners
def _unlearn(cls, params, seed: int):
    """The planted population after ``cls`` unlearned every fifth record (each model its members
    among them): ``(pop, report)``."""
    from mia_core.engine.unlearn import UnlearnContext

    records, build, _ = _planted_setup(seed)
    pop = planted_population(seed)
    forget = pop.keep & (np.arange(pop.n_records) % 5 == 0)[None]
    before = _layout(pop)
    ctx = UnlearnContext(pop, forget, build=build)
    report = _check_report(cls, "unlearn()", cls(**params).unlearn(ctx))
    steps = report.get("steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps != ctx.steps:
        _fail(cls, f"unlearn() must report its cost as 'steps' (the optimizer steps it took: {ctx.steps}), "
                   f"got {steps!r}")
    _check_kept(cls, "unlearn()", pop, before)
    if not np.array_equal(ctx.forget, forget):
        _fail(cls, "unlearn() changed the forget set")
    return pop, report


def check_unlearner(cls, *, params: Optional[Mapping[str, Any]] = None, seed: int = 0) -> Dict[str, Any]:
    """Check an :class:`~mia_core.base.Unlearner` subclass on the planted population (every model
    forgets its members among every fifth record): the parameter rules, a JSON report whose
    ``steps`` is the optimizer steps taken through the context, unchanged parameter shapes and
    keep matrix, finite weights, and the same weights and report from a second run. Returns the
    report."""
    import torch

    from mia_core.base import Unlearner

    if not (isinstance(cls, type) and issubclass(cls, Unlearner)):
        _fail(cls, "is not a subclass of mia_core.base.Unlearner")
    params = dict(params or {})
    check_params(cls, params)
    a, rep_a = _unlearn(cls, params, seed)
    b, rep_b = _unlearn(cls, params, seed)
    same = all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    if not same or json.dumps(rep_a, sort_keys=True, default=json_default) != json.dumps(rep_b, sort_keys=True, default=json_default):
        _fail(cls, "two runs with the same parameters and seed gave different weights or reports (draw randomness "
                   "from ctx.rng(), and train through ctx.train / ctx.retrain, whose streams are seeded)")
    return rep_a


__all__ = [
    "ConformanceError",
    "MIN_PLANTED_AUC",
    "check_attack",
    "check_defense",
    "check_estimator",
    "check_params",
    "check_unlearner",
    "null_population",
    "planted_population",
    "separable_population",
]
