"""Membership inference for machine unlearning (``miafw unlearn``): did the models forget?

A population is trained as for ``miafw eval``. A forget set ``S`` of records is chosen (at random,
by class, or by id); model ``m`` forgets ``F_m = K[m] & S`` (its members in ``S``) and keeps
``R_m = K[m] & ~S``. Every unlearner (plugin group ``miafw.unlearners``) is applied to a copy of the
population, and the models retrained from scratch on ``R_m`` (same initialisation and batch
streams) are the gold standard. Two evaluations:

* **the common recipe** (../shared/papers/note-membership-inference-attack.md, "MIA for Machine
  Unlearning"), once per ``--attack``: the attack scores every record against each model (its
  reference models, where it uses any, are the *original* population's: the attacker's shadow
  models are trained normally, so the unlearned or retrained model is the target of a
  non-adaptive attack); per model, the threshold on those scores that best tells its retain set
  (members) from the records it never saw (non-members, the validation set), at the best balanced
  accuracy; the share of its forget set at or above it, pooled over models, next to the same
  share for the retrained models;
* **U-LiRA** (Hayes, Shumailov, Triantafillou, Khalifa, Papernot, SaTML 2025, "Inexact unlearning
  needs more careful evaluations"): per forget record ``j`` and model ``m`` with ``j`` in ``F_m``,
  the confidence of the unlearned model and of the retrained model are scored by a likelihood
  ratio of two Gaussians fitted on the *other* models that forgot ``j`` (their unlearned and their
  retrained confidences on ``j``, per-record means, pooled variance), as LiRA does with IN/OUT
  models. The AUC of telling the unlearned model from the retrained one (0.5: indistinguishable
  from retraining) and the TPR at 1% FPR (Clopper-Pearson).

Intervals: a score shares its forget record with the other models' scores of that record, and
its model (one training run, one threshold) with the model's other forget records. The AUC's and
the member rate's intervals therefore resample models and records together (Owen's pigeonhole
bootstrap, :func:`~mia_core.metrics.crossed_auc_interval`). Resampling records alone covered 0.5
for an independent ``retrain`` in 17 of 20 seeds of the default experiment, the crossed interval
in 19 of 20 (``benchmarks/RESULTS.md``).

Deviation from Hayes et al.: they train separate shadow populations for the reference Gaussians;
here the population's other models are the references (leave-one-model-out), which the
complementary-pair design makes independent of the scored model's own training set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mia_core import metrics
from mia_core.base import TrainingDefense
from mia_core.data import DataError, Records
from mia_core.engine.cache import PopulationCache
from mia_core.engine.population import ModelPopulation
from mia_core.engine.progress import Reporter
from mia_core.engine.stages import (
    USAGE_ERRORS,
    Component,
    EvalConfig,
    Plan,
    _check_finite,
    _guarded,
    _jsonable,
    _resolve_one,
    _unique,
    compute_signals,
    load_records,
    resolve,
    run_attacks,
    train_population,
)
from mia_core.params import ParamError
from mia_core.results import RunDir, plain_json, text_table
from mia_core.runindex import RunIndex, summary_of

#: What ``miafw unlearn`` runs when no ``--unlearner`` is given: every method shipped.
DEFAULT_UNLEARNERS = ("retrain", "finetune", "gradient-ascent", "neggrad-plus", "random-labels")

#: The version of an unlearn run's ``metrics.json`` (``mia_core/schemas/unlearn.schema.json``); 2 added
#: the attacks, the warnings, the steps of retraining and the crossed intervals.
UNLEARN_SCHEMA_VERSION = 2

#: The smallest population U-LiRA can use: every record is a member of half the models, and the
#: leave-one-model-out Gaussians of a forget record need at least two other models that forgot it.
MIN_MODELS = 6

#: The FPR of the U-LiRA TPR reported.
ULIRA_FPR = 0.01


# ============================================================================ configuration
@dataclass(frozen=True)
class UnlearnConfig:
    """An unlearning evaluation: the population (``evaluation``: dataset, model, recipe, seed,
    ``n_models``; its attacks, defenses, estimators and targets are not used), the unlearners, the
    forget set (``random:fraction=F``, ``class=K`` or ``ids=FILE``), and the attacks of the
    common recipe."""

    evaluation: EvalConfig = field(default_factory=EvalConfig)
    unlearners: Sequence[str] = DEFAULT_UNLEARNERS
    forget: str = "random:fraction=0.05"
    #: The attacks of the common recipe (``NAME[:k=v]``).
    attacks: Sequence[str] = ("loss",)


@dataclass(frozen=True)
class UnlearnPlan:
    plan: Plan
    unlearners: Tuple[Component, ...]
    forget: str
    #: the configuration resolved (an ``ids=`` forget file by its absolute path), as the run's
    #: ``config.toml`` records it
    config: Optional[UnlearnConfig] = None

    @property
    def document(self) -> Dict[str, Any]:
        doc = dict(self.plan.document)
        for key in ("estimators", "defenses", "targets", "n_targets"):
            doc.pop(key, None)
        doc.update({"command": "unlearn", "forget": self.forget,
                    "unlearners": [{"label": u.label, **u.spec.to_dict()} for u in self.unlearners]})
        return doc


def resolve_unlearn(config: UnlearnConfig) -> UnlearnPlan:
    """Validate everything before anything trains.

    Raises:
        One of :data:`~mia_core.engine.stages.USAGE_ERRORS`.
    """
    if not config.unlearners:
        raise ParamError("no unlearner given; use --unlearner NAME (see `miafw list --kind unlearners`)")
    if not config.attacks:
        raise ParamError("no attack given for the forget-set member rate; use --attack NAME (e.g. loss)")
    plan = resolve(dataclasses.replace(config.evaluation, attacks=tuple(config.attacks), defenses=(),
                                       estimators=(), targets="all"))
    if plan.config.n_models < MIN_MODELS:
        raise ParamError(f"miafw unlearn needs --n-models >= {MIN_MODELS}, got {plan.config.n_models}: U-LiRA fits "
                         f"each forget record's Gaussians on the other models that forgot it, and a record is a member "
                         f"of half the models")
    unlearners = [_resolve_one("unlearner", t, i) for i, t in enumerate(config.unlearners)]
    _unique(unlearners)
    kind, arg = parse_forget(config.forget)
    forget = f"ids={arg.resolve()}" if kind == "ids" else str(config.forget).strip()  # config.toml works anywhere
    resolved = dataclasses.replace(config, forget=forget, attacks=tuple(config.attacks),
                                   unlearners=tuple(config.unlearners))
    return UnlearnPlan(plan=plan, unlearners=tuple(unlearners), forget=forget, config=resolved)


def parse_forget(text: str) -> Tuple[str, Any]:
    """``("random", fraction)``, ``("class", k)`` or ``("ids", path)``.

    Raises:
        ParamError: any other form, or a fraction outside (0, 1).
    """
    t = str(text).strip()
    if t.startswith("random:fraction="):
        try:
            f = float(t[len("random:fraction="):])
        except ValueError:
            f = float("nan")
        if not 0 < f < 1:
            raise ParamError(f"--forget {t!r}: the fraction must be a number in (0, 1)")
        return "random", f
    if t.startswith("class="):
        try:
            return "class", int(t[len("class="):])
        except ValueError:
            raise ParamError(f"--forget {t!r}: class=K needs an integer label") from None
    if t.startswith("ids="):
        return "ids", Path(t[len("ids="):]).expanduser()
    raise ParamError(f"--forget must be random:fraction=F, class=K or ids=FILE (one record id per line); got {t!r}")


def forget_records(spec: str, records: Records, keep: np.ndarray, *, seed: int) -> np.ndarray:
    """The forget set ``S`` (bool ``[N]``), checked: every model has members in it and members
    outside it.

    Raises:
        DataError: an empty forget set, an unknown class or id, or a model left with no forget
            record or no retain record.
    """
    kind, arg = parse_forget(spec)
    if kind == "random":
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x666F72]))  # "for"
        k = int(round(arg * records.n))
        s = np.zeros(records.n, dtype=bool)
        s[rng.choice(records.n, size=k, replace=False)] = True
    elif kind == "class":
        if records.is_regression or not 0 <= arg < records.n_classes:
            raise DataError(f"--forget class={arg}: dataset {records.name!r} has classes 0..{records.n_classes - 1}")
        s = records.y == arg
    else:
        if not arg.is_file():
            raise DataError(f"--forget ids={arg}: no such file")
        try:
            ids = np.array([int(line) for line in arg.read_text().split() if line.strip()], dtype=np.int64)
        except ValueError:
            raise DataError(f"--forget ids={arg.name}: every line must be an integer record id") from None
        unknown = ids[~np.isin(ids, records.index)]
        if unknown.size:
            raise DataError(f"--forget ids={arg.name}: {unknown.size} id(s) not in dataset {records.name!r} "
                            f"(first: {', '.join(map(str, unknown[:5].tolist()))})")
        s = np.isin(records.index, ids)
    if not s.any():
        raise DataError(f"--forget {spec}: the forget set is empty")
    forget = keep & s[None]
    if not forget.any(axis=1).all():
        m = int(np.argmin(forget.any(axis=1)))
        raise DataError(f"--forget {spec}: model {m} has no member in the forget set ({int(s.sum())} records); "
                        f"use a larger forget set")
    if (keep & ~s[None]).sum(axis=1).min() == 0:
        raise DataError(f"--forget {spec}: the forget set holds every member of some model; nothing would be left "
                        f"to retain")
    return s


# ============================================================================ what unlearners see
class _Ascent(TrainingDefense):
    """Gradient ascent: the penalty ``-2 x`` the batch's mean cross-entropy turns each model's
    descent step on the batch into an ascent step (Thudi et al. 2022's NegGrad)."""

    def penalty(self, params, batch):
        logits = batch.logits(params)
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.y.flatten(), reduction="none")
        ce = ce.view(batch.y.shape)
        if batch.mask is not None:
            m = batch.mask.to(ce.dtype)
            return -2 * (ce * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)
        return -2 * ce.mean(dim=1)

    def report(self, result):
        return {}


class UnlearnContext:
    """A copy of the trained population that an unlearner changes in place.

    Attributes:
        forget, retain: bool ``[M, N]``: each model's members in and outside the forget set.
        recipe, records, seed: as on the population.
    """

    def __init__(self, population: ModelPopulation, forget: np.ndarray, *, build, position: int = 0):
        self._population = population
        self.forget = forget
        self.retain = population.keep & ~forget
        self._build = build
        self.position = position
        self.steps = 0

    @property
    def recipe(self):
        return self._population.recipe

    @property
    def records(self) -> Records:
        return self._population.records

    @property
    def seed(self) -> int:
        return self._population.seed

    @property
    def params(self):
        return self._population.params

    def rng(self, salt: int = 0) -> np.random.Generator:
        """A generator for the unlearner's own randomness (e.g. new labels), from the run seed,
        the unlearner's label and ``salt``."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, 0x726E67, self.position, int(salt)]))

    def train(self, *, keep: np.ndarray, epochs: int, lr: Optional[float] = None, ascent: bool = False,
              labels: Optional[np.ndarray] = None) -> int:
        """Continue training every model on its rows of ``keep`` (bool ``[M, N]``) for ``epochs``
        (fresh optimiser, the recipe's batch size); ``ascent`` ascends the loss instead;
        ``labels`` (int ``[M, N]``) gives each model its own labels (default: the records').
        Returns the optimizer steps taken.

        Raises:
            ValueError: ``labels`` of another shape or outside ``0..C-1``.
        """
        pop = self._population
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != pop.keep.shape or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"labels must be integers of shape {list(pop.keep.shape)}, got {labels.dtype} "
                                 f"{list(labels.shape)}")
            if labels.size and (labels.min() < 0 or labels.max() >= self.records.n_classes):
                raise ValueError(f"labels must lie in 0..{self.records.n_classes - 1}")
        saved = pop.keep
        pop.keep = np.asarray(keep, dtype=bool)
        try:
            rng = np.random.SeedSequence([pop.seed, 0x756E6C, self.position, self.steps])
            result = pop._train(epochs, rng, lr=lr, defenses=[_Ascent()] if ascent else [], labels=labels)
        finally:
            pop.keep = saved
        self.steps += int(result.steps)
        return int(result.steps)

    def retrain(self, *, stream: int = 0) -> int:
        """Train every model from scratch on its retain set; ``stream`` 0 uses the original
        training's initialisation and batch streams, another value independent ones (a retraining
        the gold standard did not see). Returns the optimizer steps taken."""
        pop = self._population
        seed = pop.seed if not stream else int(np.random.SeedSequence([pop.seed, 0x7265, int(stream)]).generate_state(1)[0])
        fresh = ModelPopulation.train(pop.records, self._build, pop.recipe, n_models=pop.n_models, seed=seed,
                                      keep=self.retain, device=pop.device)
        for k, v in fresh.params.items():
            pop.params[k] = v
        self.steps += int(fresh.training.steps)
        return int(fresh.training.steps)


# ============================================================================ the evaluations
def member_rate(*, scores: np.ndarray, keep: np.ndarray, forget: np.ndarray, retain: np.ndarray,
                confidence: float = 0.95, seed: int = 0) -> Dict[str, Any]:
    """The common recipe: per model, the threshold on its membership ``scores`` (float ``[M, N]``,
    higher = member) with the best balanced accuracy between its retain set (members) and the
    records it never trained on (non-members); the share of its forget set at or above it, pooled
    over models. The interval resamples models and forget records together
    (:func:`~mia_core.metrics.crossed_mean_interval`): a model's hits share its threshold, a
    record's hits share the record. It is widened to hold at least the Clopper-Pearson interval
    of the pooled hits: at a rate of 0 or 1 every resample agrees and the bootstrap alone would
    claim a zero-width interval."""
    hits, models, records = [], [], []
    for m in range(scores.shape[0]):
        pos, neg = scores[m, retain[m]], scores[m, ~keep[m]]
        s = np.concatenate([pos, neg])
        lab = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
        fpr, tpr, thr = metrics.roc_curve(s, lab)
        tau = thr[int(np.argmax(tpr - fpr))]
        j = np.flatnonzero(forget[m])
        hits.append(scores[m, j] >= tau)
        models.append(np.full(j.size, m))
        records.append(j)
    h = np.concatenate(hits)
    lo, hi = metrics.crossed_mean_interval(values=h, rows=np.concatenate(models), cols=np.concatenate(records),
                                           confidence=confidence, seed=seed)
    cp_lo, cp_hi = metrics.clopper_pearson(int(h.sum()), int(h.size), confidence=confidence)
    return {"rate": float(h.mean()), "interval": [min(lo, cp_lo), max(hi, cp_hi)], "forget_scores": int(h.size)}


def ulira_scores(*, unlearned: np.ndarray, retrained: np.ndarray,
                 forget: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U-LiRA's scores (module doc): for every (model, forget record) pair whose record at least
    two other models forgot, the log likelihood ratio of the unlearned model's confidence
    (positive) and of the retrained model's (negative) under the two leave-one-model-out Gaussians.

    Args:
        unlearned, retrained: float ``[M, N]`` confidences; forget: bool ``[M, N]``.

    Returns:
        ``(scores [2P], labels bool [2P], records [2P], models [2P])``: each score's forget record
        and model.

    Raises:
        DataError: no record was forgotten by three models or more.
    """
    m_idx, j_idx = np.nonzero(forget)
    counts = forget.sum(axis=0)  # models that forgot each record
    su, sr = (unlearned * forget).sum(axis=0), (retrained * forget).sum(axis=0)
    use = counts[j_idx] >= 3
    m_idx, j_idx = m_idx[use], j_idx[use]
    if not m_idx.size:
        raise DataError("U-LiRA needs every forget record forgotten by at least 3 models; use more --n-models")
    n = counts[j_idx] - 1
    phi_u, phi_r = unlearned[m_idx, j_idx], retrained[m_idx, j_idx]
    mu_u = (su[j_idx] - phi_u) / n  # leave-one-model-out means
    mu_r = (sr[j_idx] - phi_r) / n
    var_u = max(float(np.var(phi_u - mu_u)), 1e-12)  # pooled over records (global variances)
    var_r = max(float(np.var(phi_r - mu_r)), 1e-12)

    def llr(phi):
        return (-(phi - mu_u) ** 2 / (2 * var_u) - 0.5 * np.log(var_u)
                + (phi - mu_r) ** 2 / (2 * var_r) + 0.5 * np.log(var_r))

    scores = np.stack([llr(phi_u), llr(phi_r)], axis=1).ravel()  # pairs interleaved: (unlearned, retrained)
    labels = np.tile([True, False], m_idx.size)
    return scores, labels, np.repeat(j_idx, 2), np.repeat(m_idx, 2)


def ulira(*, unlearned: np.ndarray, retrained: np.ndarray, forget: np.ndarray, confidence: float = 0.95,
          seed: int = 0) -> Dict[str, Any]:
    """U-LiRA (module doc): the AUC and TPR at 1% FPR, with intervals, of telling every unlearned
    model from the retrained one on its forget records (scores from :func:`ulira_scores`).

    Args:
        unlearned, retrained: float ``[M, N]`` confidences; forget: bool ``[M, N]``.
    """
    scores, labels, records, models = ulira_scores(unlearned=unlearned, retrained=retrained, forget=forget)
    return summarize_ulira(scores, labels, records, models, confidence=confidence, seed=seed)


def summarize_ulira(scores: np.ndarray, labels: np.ndarray, records: np.ndarray, models: np.ndarray, *,
                    confidence: float = 0.95, seed: int = 0) -> Dict[str, Any]:
    """AUC and TPR at :data:`ULIRA_FPR` (Clopper-Pearson) of U-LiRA's scores. The AUC's interval
    resamples forget records and models together (:func:`~mia_core.metrics.crossed_auc_interval`):
    every score shares its record's effect with the other models' scores of that record and its
    model's effect (one training run) with the model's other forget records, and the record-only
    bootstrap missed the second."""
    summary, _ = metrics.summarize_with_curve(scores, labels, fprs=(ULIRA_FPR,), confidence=confidence,
                                              groups=records, seed=seed)
    t = summary["tpr_at_fpr"][metrics._fpr_key(ULIRA_FPR)]
    auc_ci = metrics.crossed_auc_interval(scores=scores, membership=labels, rows=models, cols=records,
                                          confidence=confidence, seed=seed)
    return {"auc": summary["auc"], "auc_ci": list(auc_ci), "auc_ci_records_only": summary["auc_ci"],
            "tpr_at_1pct": t["tpr"],
            "tpr_at_1pct_ci": [t["ci_low"], t["ci_high"]], "tpr_resolvable": t["resolvable"],
            "pairs": int(len(labels) // 2)}


def _accuracies(signals, keep: np.ndarray, forget: np.ndarray, retain: np.ndarray):
    correct = signals.correct.astype(bool)
    share = lambda mask: float((correct & mask).sum() / mask.sum())  # noqa: E731
    return {"retain_accuracy": share(retain), "forget_accuracy": share(forget), "test_accuracy": share(~keep)}


@dataclass
class UnlearnResult:
    document: Dict[str, Any]
    run_dir: Optional[Path] = None


def unlearn_warnings(rows: Dict[str, Any]) -> list:
    """What the reader must know about the unlearners' rows: the built-in sanity check failing (an
    independent ``retrain`` whose U-LiRA AUC interval misses 0.5: at 95% one run in twenty by
    chance; more often, the evaluation is miscalibrated) and TPRs too few scores can resolve."""
    out = []
    for label, r in rows.items():
        u = r["ulira"]
        if r["name"] == "retrain" and r["report"].get("stream") != 0 and not u["auc_ci"][0] <= 0.5 <= u["auc_ci"][1]:
            out.append(f"sanity check: {label} (an independent retraining) has U-LiRA AUC {u['auc']:.3f} "
                       f"[{u['auc_ci'][0]:.3f}, {u['auc_ci'][1]:.3f}], an interval without 0.5; a 95% interval misses "
                       f"by chance in one run of twenty (try another --seed), more often means the evaluation is "
                       f"miscalibrated")
        if not u["tpr_resolvable"]:
            out.append(f"{label}: {u['pairs']} retrained scores cannot resolve TPR at 1% FPR; use more --n-models or "
                       f"a larger forget set")
    return out


def attack_scores(plan: Plan, population: ModelPopulation, signals, *, original: Tuple[ModelPopulation, Any],
                  reporter: Reporter) -> Dict[str, np.ndarray]:
    """Every attack's scores ``[M, N]`` against every model of ``population`` (its ``signals``),
    with the original population as the reference models (a non-adaptive attack on unlearned or
    retrained targets)."""
    references = None if population is original[0] else original
    return run_attacks(plan, population, signals, reporter=reporter, references=references)


def _measure(plan: Plan, population: ModelPopulation, *, original, keep, forget, retain, reporter):
    """A population's signals (computed once), its accuracy trio and its forget member rate under
    every attack: ``(signals, row)``."""
    signals = original[1] if population is original[0] else compute_signals(population)
    scores = attack_scores(plan, population, signals, original=original, reporter=reporter)
    rates = {label: member_rate(scores=sc, keep=keep, forget=forget, retain=retain, confidence=plan.config.confidence,
                                seed=plan.config.seed)
             for label, sc in scores.items()}
    return signals, {**_accuracies(signals, keep, forget, retain), "forget_member_rate": rates}


def run_unlearning(plan: UnlearnPlan, *, cache: Optional[PopulationCache] = None,
                   reporter: Optional[Reporter] = None, records: Optional[Records] = None) -> Dict[str, Any]:
    """Train (or load) the population, choose the forget set, apply every unlearner and the
    retrained gold standard, and evaluate each (module doc). Returns the ``metrics.json`` document."""
    return _run_unlearning(plan, cache=cache, reporter=reporter, records=records)[0]


def _run_unlearning(plan: UnlearnPlan, *, cache, reporter, records):
    """:func:`run_unlearning`, and the arrays of ``ulira.npz``: every unlearner's U-LiRA scores,
    labels and forget records, in the order of ``unlearners``."""
    reporter = reporter or Reporter()
    p = plan.plan
    records = load_records(p) if records is None else records
    if records.is_regression:
        raise DataError(f"dataset {records.name!r} is a regression task; unlearning is evaluated on classifiers")
    trained = train_population(p, records, cache=cache, reporter=reporter)
    pop = trained.population
    keep = pop.keep
    if pop.reserved is not None and pop.reserved.any():  # no defense runs here, so none reserves records
        raise DataError("unlearning evaluates a population without reserved records")
    s = forget_records(plan.forget, records, keep, seed=p.config.seed)
    forget = keep & s[None]
    retain = keep & ~s[None]
    build = lambda: p.model.plugin.build(records.n_features, records.n_classes)  # noqa: E731
    reporter.message(f"forget set: {int(s.sum())} records ({plan.forget}); the gold standard: retraining "
                     f"{pop.n_models} models without it")
    original = (pop, compute_signals(pop))
    measure = functools.partial(_measure, p, original=original, keep=keep, forget=forget, retain=retain,
                                reporter=reporter)
    t0 = time.perf_counter()
    gold = pop.clone()
    gold_ctx = UnlearnContext(gold, forget, build=build)
    gold_ctx.retrain()
    retrain_s = time.perf_counter() - t0
    gold_signals, gold_row = measure(gold)
    conf_c = p.config.confidence
    rows: Dict[str, Any] = {}
    arrays: Dict[str, np.ndarray] = {"unlearners": np.array([u.label for u in plan.unlearners])}
    for i, u in enumerate(plan.unlearners):
        reporter.message(f"unlearner {u.label}")
        work = pop.clone()
        # the unlearner's random streams come from its label, so its numbers do not depend on which
        # other unlearners run beside it
        stream = int(hashlib.sha256(u.label.encode()).hexdigest()[:8], 16)
        ctx = UnlearnContext(work, forget, build=build, position=stream)
        t0 = time.perf_counter()
        report = _jsonable(u.owner, _guarded(u.owner, u.plugin.unlearn, ctx))
        seconds = time.perf_counter() - t0
        _check_finite(u.owner, work, "unlearn()")
        signals, measured = measure(work)
        sc, lab, grp, mod = ulira_scores(unlearned=signals.confidence, retrained=gold_signals.confidence,
                                         forget=forget)
        arrays.update({f"ulira_{i}_scores": sc, f"ulira_{i}_labels": lab, f"ulira_{i}_records": grp,
                       f"ulira_{i}_models": mod})
        rows[u.label] = {
            "name": u.name, "params": dict(u.spec.params), "report": report, **measured,
            "ulira": summarize_ulira(sc, lab, grp, mod, confidence=conf_c, seed=p.config.seed),
            "seconds": seconds, "steps": int(ctx.steps),
        }
    doc = {
        "schema_version": UNLEARN_SCHEMA_VERSION,
        "command": "unlearn",
        "warnings": unlearn_warnings(rows),
        "attacks": [a.label for a in p.attacks],
        "forget": {"spec": plan.forget, "records": int(s.sum()), "per_model_mean": float(forget.sum(1).mean())},
        "retrained": {**gold_row, "seconds": retrain_s, "steps": int(gold_ctx.steps)},
        "original": measure(pop)[1],
        "unlearners": rows,
        "population": {"n_models": p.config.n_models, "n_records": records.n, "cache_key": trained.key},
    }
    return plain_json(doc), arrays


def unlearn(config: Union[UnlearnConfig, UnlearnPlan], *, out: Optional[Union[str, Path]] = None,
            cache: Optional[Union[PopulationCache, str, Path]] = None,
            reporter: Optional[Reporter] = None) -> UnlearnResult:
    """Run an unlearning evaluation end to end (``mia_core.engine.unlearn.unlearn``); with ``out``,
    a run directory holding ``config.json``, ``config.toml``, ``metrics.json``, ``ulira.npz`` and
    ``report.html``."""
    plan = config if isinstance(config, UnlearnPlan) else resolve_unlearn(config)
    if not isinstance(cache, PopulationCache):
        cache = PopulationCache(None if cache is None else Path(cache).expanduser())
    records = load_records(plan.plan)
    if plan.forget.startswith(("class=", "ids=")):  # an unknown class or id is refused before training
        forget_records(plan.forget, records, np.ones((2, records.n), dtype=bool), seed=plan.plan.config.seed)
    if out is None:
        return UnlearnResult(run_unlearning(plan, cache=cache, reporter=reporter, records=records))
    run = RunDir(Path(out), plan.document, index=RunIndex(Path(out)), discard_on=USAGE_ERRORS)
    with run:
        if plan.config is not None:
            from mia_core import configfile

            (run.path / "config.toml").write_text(configfile.dump_unlearn(plan.config))  # `unlearn --config` repeats it
        doc, arrays = _run_unlearning(plan, cache=cache, reporter=reporter, records=records)
        write_unlearn_run(run.path, doc, arrays)
        run.summary = summary_of(doc)
    return UnlearnResult(doc, run.final)


def write_unlearn_run(directory: Path, doc: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> None:
    """``metrics.json``, ``ulira.npz`` (every unlearner's U-LiRA scores, labels and forget records)
    and ``report.html``, rendered from the two files just written."""
    import json

    from mia_core.report import write_report

    (directory / "metrics.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    np.savez_compressed(directory / "ulira.npz", **arrays)
    write_report(directory)


def format_table(doc: Dict[str, Any]) -> str:
    """The terminal table: per unlearner the accuracy trio, the forget-set member rate under each
    attack, U-LiRA, and the time against retraining."""
    attacks = list(doc["attacks"])
    head = (["unlearner", "retain acc", "forget acc", "test acc"]
            + [f"forget member rate ({a}) [95% CI]" for a in attacks]
            + ["U-LiRA AUC [95% CI]", "U-LiRA TPR@1% [95% CI]", "steps", "time (x retraining)"])
    base = doc["retrained"]["seconds"]
    ratio = lambda t: f"{t:.1f} s ({t / base:.2f}x)" if base > 0 else f"{t:.1f} s"  # noqa: E731
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    rate = lambda fm: f"{pct(fm['rate'])} [{pct(fm['interval'][0])}, {pct(fm['interval'][1])}]"  # noqa: E731
    rows = []
    for key, label in (("original", "(no unlearning)"), ("retrained", "(retrained, gold)")):
        r = doc[key]
        rows.append([label, pct(r["retain_accuracy"]), pct(r["forget_accuracy"]), pct(r["test_accuracy"])]
                    + [rate(r["forget_member_rate"][a]) for a in attacks] + ["-", "-"]
                    + [str(r["steps"]) if "steps" in r else "-", ratio(r["seconds"]) if "seconds" in r else "-"])
    for label, r in doc["unlearners"].items():
        u = r["ulira"]
        rows.append([label, pct(r["retain_accuracy"]), pct(r["forget_accuracy"]), pct(r["test_accuracy"])]
                    + [rate(r["forget_member_rate"][a]) for a in attacks]
                    + [f"{u['auc']:.3f} [{u['auc_ci'][0]:.3f}, {u['auc_ci'][1]:.3f}]",
                       f"{pct(u['tpr_at_1pct'])} [{pct(u['tpr_at_1pct_ci'][0])}, {pct(u['tpr_at_1pct_ci'][1])}]"
                       + ("" if u["tpr_resolvable"] else " !"), str(r["steps"]), ratio(r["seconds"])])
    f = doc["forget"]
    lines = text_table(head, rows) + [
        f"forget set {f['spec']}: {f['records']} records, {f['per_model_mean']:.1f} per model on average; "
        f"U-LiRA AUC 0.5 = indistinguishable from retraining"]
    lines += [f"warning: {w}" for w in doc.get("warnings", [])]
    return "\n".join(lines)


__all__ = ["DEFAULT_UNLEARNERS", "UnlearnConfig", "UnlearnContext", "UnlearnPlan", "attack_scores", "format_table",
           "forget_records", "member_rate", "parse_forget", "resolve_unlearn", "run_unlearning", "summarize_ulira", "ulira",
           "ulira_scores", "unlearn", "unlearn_warnings", "write_unlearn_run"]
