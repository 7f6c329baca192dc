"""Reserved records, the keep matrix's third role: trained on by no model, scored against no target."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mia_core import EvalConfig, evaluate
from mia_core.base import TrainingDefense
from mia_core.engine import ModelPopulation
from mia_core.engine.stages import load_records, resolve, train_population
from mia_core.engine.trainer import TrainingRecipe, reserve_records

SEEN = {}


class Reserves(TrainingDefense):
    """Asks for a fifth of the records and remembers what training showed it."""

    api_version = "1.0"

    def __init__(self, fraction: float = 0.2):
        self.fraction = fraction

    def reserve_fraction(self) -> float:
        return self.fraction

    def configure(self, ctx):
        SEEN["reserved"] = ctx.reserved.copy()
        SEEN["keep"] = ctx.keep.copy()

    def report(self, result):
        return {"fraction": self.fraction}


def test_reserve_records_is_seeded_and_sized():
    a = reserve_records(1000, 0.1, 3)
    assert a.sum() == 100 and np.array_equal(a, reserve_records(1000, 0.1, 3))
    assert not np.array_equal(a, reserve_records(1000, 0.1, 4))
    assert reserve_records(10, 0.0, 0).sum() == 0
    with pytest.raises(ValueError, match=r"reserved fraction must be in \[0, 1\)"):
        reserve_records(10, 1.0, 0)


def test_reserved_records_are_never_trained_nor_scored(tmp_path, monkeypatch):
    from mia_core import registry

    real = registry.load

    def load(kind, name):
        return Reserves if (kind, name) == ("defenses", "reserves") else real(kind, name)

    monkeypatch.setattr(registry, "load", load)
    config = EvalConfig(attacks=("lira", "loss", "rmia", "bavaria"), defenses=("reserves",), dataset="digits:n_records=300",
                        model="mlp:width=16", n_models=6, targets="first:2", recipe=TrainingRecipe(epochs=2))
    plan = resolve(config)
    assert plan.reserve == 0.2 and plan.document["reserved_fraction"] == 0.2
    ev = evaluate(plan, cache=tmp_path / "cache")
    reserved = reserve_records(300, 0.2, 0)
    assert np.array_equal(np.sort(SEEN["reserved"]), np.flatnonzero(reserved))
    assert not SEEN["keep"][:, reserved].any()  # no model trains on them
    assert ev.scores["lira"].shape == (2, 240) and ev.membership.shape == (2, 240)
    assert np.array_equal(ev.record_index, np.flatnonzero(~reserved))
    assert ev.metrics["population"]["reserved_records"] == 60
    assert ev.metrics["attacks"]["lira"]["n_members"] + ev.metrics["attacks"]["lira"]["n_nonmembers"] == 480
    # the undefended baseline (for the accuracy cost, and the non-adaptive references) has the same keep matrix
    records = load_records(plan)
    base = train_population(dataclasses.replace(plan, train_defenses=()), records, cache=None)
    assert np.array_equal(base.population.keep, ev.population.keep)
    assert np.array_equal(base.population.reserved, reserved)
    # the reservation survives the cache
    from mia_core.engine.cache import PopulationCache

    again = train_population(plan, records, cache=PopulationCache(tmp_path / "cache"))
    assert again.from_cache and np.array_equal(again.population.reserved, reserved)
    pop = ModelPopulation.from_state(ev.population.state(), records=records, build=lambda: plan.model.plugin.build(
        records.n_features, records.n_classes), recipe=plan.config.recipe, seed=0)
    assert np.array_equal(pop.reserved, reserved) and np.array_equal(pop.scored_records, np.flatnonzero(~reserved))


def test_attacks_see_only_the_scored_records():
    from mia_core.engine.signals import compute_signals
    from mia_core.engine.stages import scored_view
    from mia_core.testing import planted_population

    pop = planted_population(0)
    signals = compute_signals(pop.logits(), pop.records.y)
    assert scored_view(pop, signals) == (pop, signals)  # nothing reserved: the same objects
    reserved = reserve_records(pop.n_records, 0.25, 1)
    pop.keep[:, reserved] = False
    pop.reserved = reserved
    view, sig = scored_view(pop, signals)
    assert view.n_records == sig.confidence.shape[1] == (~reserved).sum() and view.reserved is None
    assert np.array_equal(view.records.index, pop.records.index[~reserved])
    assert np.array_equal(sig.loss, signals.loss[:, ~reserved]) and np.array_equal(view.keep, pop.keep[:, ~reserved])
    # every record an attack sees is IN for exactly one model of each pair
    assert (view.keep[0::2] ^ view.keep[1::2]).all()


def test_a_defense_probe_shows_attacks_the_scored_records_only():
    """DefenseContext.probe runs attacks as the engine does: RMIA online needs an IN reference for
    every record it sees, which reserved records never have."""
    from mia_core.engine.contexts import DefenseContext
    from mia_core.testing import planted_population

    pop = planted_population(0)
    reserved = reserve_records(pop.n_records, 0.25, 1)
    pop.keep[:, reserved] = False
    pop.reserved = reserved
    probe = DefenseContext(pop).probe("rmia")
    assert np.array_equal(probe.records, np.flatnonzero(~reserved))
    assert probe.scores.shape == (pop.n_models, (~reserved).sum())
    assert np.array_equal(probe.membership, pop.keep[:, ~reserved])
