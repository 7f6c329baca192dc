"""Probes: run an attack on (part of) a population from inside a defense.

A defense that tunes itself against an adversary (Wang et al.'s MIA-Pruning picks its sparsity
by the attack's gain, their Algorithm 1) needs to score an attack on the models it is changing,
as the engine does in :func:`mia_core.engine.stages.run_attacks`: a strict
:class:`~mia_core.engine.contexts.AttackContext`, each ``score(t, ...)`` inside
``ctx.scoring(t)``, scores checked. A probe does that on a *sub-population*: a subset of whole
complementary pairs, renumbered, whose targets take their references only from that subset, so
what the probe measures depends on those models' weights and membership alone. A defense that
probes models ``S`` and applies its choice to all models leaves the other models' evaluation free
of the choice (evaluate them with ``--targets``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import numpy as np
import torch

from mia_core import metrics
from mia_core.engine.contexts import AttackContext
from mia_core.engine.population import ModelPopulation, accuracy, scored_view
from mia_core.engine.trainer import select_references

if TYPE_CHECKING:  # pragma: no cover
    from mia_core.base import Attack
    from mia_core.engine.contexts import DefenseContext


def load_attack(spec: str) -> "Attack":
    """A validated attack instance from a registry specification ``NAME[:k=v,...]``.

    Raises:
        ValueError: an unknown or broken attack, or bad parameters (one line, naming them).
    """
    from mia_core import registry
    from mia_core.params import instantiate, parse_spec, split_spec

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"an attack specification must be a non-empty string NAME[:k=v,...], got {spec!r}")
    name, _ = split_spec(spec)
    try:
        cls = registry.load("attacks", name)
    except registry.PluginError as exc:
        raise ValueError(str(exc)) from None
    label = f"attack {name!r}"
    return instantiate(cls, parse_spec(spec, cls, label=label), label=label)


def models_needed(attack: "Attack") -> int:
    """The fewest models (whole pairs) a population needs for ``attack`` to score a target: its
    ``min_reference_models`` and its reference budget (:meth:`~mia_core.base.Attack.reference_budget`)
    besides the target's own pair."""
    need = int(getattr(attack, "min_reference_models", 0) or 0)
    k, online = attack.reference_budget()
    if k is not None:
        need = max(need, 2 * (int(k) if not online else (int(k) + 1) // 2))
    need += need % 2
    return need + 2


def check_probe(attack: "Attack", n_models: int) -> None:
    """Refuse, before any work, an attack that cannot score a population of ``n_models``.

    Raises:
        ValueError: naming the attack's need and the population's size.
    """
    need = models_needed(attack)
    if n_models < need:
        raise ValueError(f"attack {type(attack).__name__} needs a population of at least {need} models "
                         f"(its reference models besides the target's pair), the probe has {n_models}")
    k, online = attack.reference_budget()
    select_references(target=0, n_models=n_models, n_references=k, online=online, seed=0)


def whole_pairs(models: Sequence[int], n_models: int) -> np.ndarray:
    """``models`` as sorted int64 indices, checked to be whole complementary pairs ``(2i, 2i+1)``
    of a population of ``n_models`` (so the sub-population keeps the fair membership game)."""
    idx = np.asarray(sorted(int(m) for m in models), dtype=np.int64)
    if idx.size == 0 or len(set(idx.tolist())) != idx.size:
        raise ValueError(f"models must be distinct model indices, got {list(models)!r}")
    if idx[0] < 0 or idx[-1] >= n_models:
        raise ValueError(f"model indices must be in [0, {n_models}), got {idx.tolist()}")
    if idx.size % 2 or not np.array_equal(idx[1::2], idx[0::2] + 1) or (idx[0::2] % 2).any():
        raise ValueError(f"models must be whole complementary pairs (2i, 2i+1), got {idx.tolist()}")
    return idx


def sub_population(population: ModelPopulation, models: Sequence[int]) -> ModelPopulation:
    """Models ``models`` (whole pairs) of ``population`` as a population of their own, renumbered
    ``0..S-1`` in order (pairs stay pairs), with copies of their parameters."""
    idx = whole_pairs(models, population.n_models)
    sel = lambda t: t.detach()[torch.as_tensor(idx, dtype=torch.long, device=t.device)].clone()  # noqa: E731
    return dataclasses.replace(
        population,
        keep=population.keep[idx].copy(),
        params={k: sel(v) for k, v in population.params.items()},
        buffers={k: sel(v) for k, v in population.buffers.items()},
        training=None,
    )


@dataclass(frozen=True)
class Probe:
    """What a probe measured on a sub-population.

    Attributes:
        models: int ``[S]`` the population indices of the probed models (sub-population order).
        records: int ``[N']`` the scored records (all but reserved ones).
        scores: float64 ``[S, N']`` the attack's scores, every probed model a target.
        membership: bool ``[S, N']`` the targets' membership.
        train_accuracy, test_accuracy: float64 ``[S]`` each probed model's accuracy on its own
            training half and on the other records.
    """

    models: np.ndarray
    records: np.ndarray
    scores: np.ndarray
    membership: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray

    @property
    def auc(self) -> float:
        """AUC pooled over the targets (members positive)."""
        return metrics.auc(self.scores.ravel(), self.membership.ravel())

    @property
    def advantage(self) -> float:
        """Membership advantage ``max TPR - FPR`` pooled over the targets."""
        return metrics.advantage(self.scores.ravel(), self.membership.ravel())


def probe_population(population: ModelPopulation, attack: "Attack", *, models: Optional[Sequence[int]] = None,
                     owner: str = "probe") -> Probe:
    """Fit ``attack`` on the sub-population of ``models`` (default: all) and score every record
    against each of its models, as the engine runs attacks (strict context, one target's view at
    a time). The attack is fitted afresh; pass a new instance to keep runs independent.

    Raises:
        ValueError: the attack cannot score a population this size, or returned unusable scores.
    """
    idx = np.arange(population.n_models) if models is None else whole_pairs(models, population.n_models)
    sub = population if models is None else sub_population(population, idx)
    check_probe(attack, sub.n_models)
    signals = sub.signals()
    # as the engine shows attacks: the scored records only (reserved ones have no IN reference)
    view, view_signals = scored_view(sub, signals)
    ctx = AttackContext(view, attack.access, owner=f"{owner} attack {type(attack).__name__}",
                        signals=view_signals, strict=True)
    records = np.asarray(sub.scored_records, dtype=np.int64)  # the view's columns, in the population's ids
    attack.fit(ctx)
    rows = []
    for t in range(sub.n_models):
        with ctx.scoring(t):
            s = np.asarray(attack.score(t, np.arange(view.n_records, dtype=np.int64)))
        if s.shape != records.shape or not np.issubdtype(s.dtype, np.number) or not np.isfinite(s).all():
            raise ValueError(f"{owner}: attack {type(attack).__name__} returned unusable scores for target {t} "
                             f"(shape {s.shape}, expected {records.shape}, finite reals)")
        rows.append(s.astype(np.float64))
    acc = accuracy(signals, sub.keep)
    return Probe(models=idx, records=records, scores=np.stack(rows), membership=sub.keep[:, records],
                 train_accuracy=np.asarray(acc["train"], dtype=np.float64),
                 test_accuracy=np.asarray(acc["test"], dtype=np.float64))


def probe(ctx: "DefenseContext", attack: "Attack", *, models: Optional[Sequence[int]] = None) -> Probe:
    """:meth:`DefenseContext.probe <mia_core.engine.contexts.DefenseContext.probe>`, as a function."""
    return ctx.probe(attack, models=models)


__all__: Tuple[str, ...] = ("Probe", "check_probe", "load_attack", "models_needed", "probe", "probe_population",
                            "sub_population", "whole_pairs")
