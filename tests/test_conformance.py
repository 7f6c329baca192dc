"""The conformance kit, run over every registered plugin, and shown to catch broken ones."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import mia_core.base
from mia_core import registry
from mia_core.base import Attack, Defense, Estimator, TrainingDefense
from mia_core.testing import (ConformanceError, check_attack, check_defense, check_estimator, check_params,
                              check_unlearner)

# Extra parameter sets worth covering for the built-ins (the defaults always run).
EXTRA = {
    ("attacks", "lira"): [{"online": False}, {"variance": "per-example"}, {"stat": "median"},
                          {"online": False, "n_references": 1}, {"n_references": 2}],
    ("attacks", "rmia"): [{"online": False}, {"online": False, "offline_a": 0.3}, {"temperature": 2.0},
                          {"gamma": 2.0}, {"population_size": 50}],
    ("attacks", "confidence"): [{"thresholds": "none"}],
    ("attacks", "mentr"): [{"thresholds": "global"}, {"n_references": 2}],
    ("attacks", "loss"): [{"threshold": "yeom"}, {"threshold": "yeom", "n_references": 2}],
    ("attacks", "shadow"): [{"per_class": True, "features": "logits,label"}, {"classifier": "hgb", "n_references": 2}],
    ("attacks", "quantile"): [{"method": "gaussian", "statistic": "confidence"},
                              {"reference_model": 0, "use_label": False}],
    ("attacks", "bavaria"): [{"online": False, "offline_test": "one-sided"}, {"variant": "n"}, {"online": False, "n_references": 1},
                             {"online": True, "n_references": 2, "variant": "n"}],
    ("defenses", "quantize"): [{"bits": 4, "granularity": "per-channel", "include_bias": True},
                               {"method": "ternary", "keep_last_layer": True, "last_layer_bits": None},
                               {"bits": 3, "scheme": "affine", "rounding": "stochastic"}, {"method": "sign"}],
    ("defenses", "dp-sgd"): [{"target_epsilon": 4.0, "max_grad_norm": 0.5}, {"noise_multiplier": 0.0}],
    ("defenses", "adv-reg"): [{"gamma": 3.0, "k": 2, "attack_width": 16, "attack_batch": 32},
                              {"gamma": 0.0, "attack_width": 8, "attack_batch": 16},
                              {"warmup_epochs": 5, "reference_fraction": 0.2, "attack_width": 16, "attack_lr": 1e-2}],
    ("defenses", "noise"): [{"sigma": 0.0}, {"sigma": 0.05, "include_bias": False},
                            {"epsilon": 0.9, "delta": 1e-5, "sensitivity": 0.005}],
    ("estimators", "kl-leakage"): [{"signal": "logits"}, {"source": "params"}, {"source": "params", "dim": 3,
                                                                                  "covariance": "full"}],
    ("estimators", "info"): [{"signal": "loss", "classifier": "logistic", "n_resamples": 5},
                             {"signal": "correct", "n_resamples": 5},
                             {"calibrate": "record", "js_method": "kde", "n_resamples": 5}],
    ("estimators", "mis-quant"): [{"n_neighbours": 12, "method": "ternary", "granularity": "per-channel"},
                                  {"n_neighbours": 12, "method": "sign"},
                                  {"n_neighbours": 12, "bits": 4, "scheme": "affine"}],
    ("estimators", "tail"): [{"fpr": 0.05, "fnr": 0.0, "n_boot": 0}, {"slope": 0.6, "intercept": 0.005}],
    ("unlearners", "random-labels"): [{"retain": False, "epochs": 3}],
    ("unlearners", "retrain"): [{"stream": 0}],
    ("unlearners", "neggrad-plus"): [{"beta": 0.8, "epochs": 1}],
    ("defenses", "prune"): [{"search": True, "grid": "0.5,0.9", "finetune_epochs": 1},
                            {"search": True, "grid": "0.5,0.9", "finetune_epochs": 1, "search_attack": "lira",
                             "select": "sparsest", "leakage": "auc"}, {"scope": "layer", "sparsity": 0.5, "finetune_epochs": 0}],
}


def _names(kind):
    """miafw's own plugins; every installed plugin only with MIAFW_CONFORMANCE_ALL=1, so a broken
    third-party package in the environment cannot fail miafw's own test suite."""
    if os.environ.get("MIAFW_CONFORMANCE_ALL") == "1":
        return registry.names(kind)
    return [i.name for i in registry.inspect_group(kind) if i.distribution == "miafw"]


def _cases(kind):
    out = []
    for name in _names(kind):
        out.append(pytest.param(name, {}, id=f"{name}-defaults"))
        for i, params in enumerate(EXTRA.get((kind, name), [])):
            out.append(pytest.param(name, params, id=f"{name}-{i}"))
    return out


#: Attacks that by design see less of what the planted models memorised. The planted models learn
#: random labels, so they are confidently wrong on non-members as often as confidently right on
#: members: a prediction-entropy threshold, which ignores the label, reaches about 0.57-0.60 there
#: (the raw -H over all 8 models and records gives 0.58), against about 0.9 for label-aware attacks.
MIN_AUC = {"entropy": 0.55}


@pytest.mark.parametrize("name,params", _cases("attacks"))
def test_registered_attacks_conform(name, params):
    bar = MIN_AUC.get(name, 0.6)
    report = check_attack(registry.load("attacks", name), params=params, min_auc=bar)
    assert report["auc"] > bar


@pytest.mark.parametrize("name,params", _cases("defenses"))
def test_registered_defenses_conform(name, params):
    check_defense(registry.load("defenses", name), params=params)


@pytest.mark.parametrize("name,params", _cases("estimators") or [pytest.param(None, None, marks=pytest.mark.skip(
    reason="no estimator is registered yet; the kit's estimator check is exercised below"))])
def test_registered_estimators_conform(name, params):
    check_estimator(registry.load("estimators", name), params=params)


REQUIRED = {("datasets", "file"): {"path": "data.csv"}}  # parameters without a usable default


@pytest.mark.parametrize("name,params", _cases("unlearners"))
def test_registered_unlearners_conform(name, params):
    report = check_unlearner(registry.load("unlearners", name), params=params)
    assert report["steps"] > 0


class Forgetful(mia_core.base.Unlearner):
    """Fine-tunes the retain set for one epoch but reports no cost."""

    api_version = "1.0"

    def __init__(self):
        pass

    def unlearn(self, ctx):
        ctx.train(keep=ctx.retain, epochs=1)
        return {}


class GlobalNoise(mia_core.base.Unlearner):
    """Adds unseeded noise to the weights."""

    api_version = "1.0"

    def __init__(self):
        pass

    def unlearn(self, ctx):
        import torch

        for v in ctx.params.values():
            v.add_(torch.randn(v.shape))
        return {"steps": 0}


def test_kit_on_unlearners():
    with pytest.raises(ConformanceError, match="must report its cost as 'steps'"):
        check_unlearner(Forgetful)
    with pytest.raises(ConformanceError, match="two runs with the same parameters and seed gave different"):
        check_unlearner(GlobalNoise)
    with pytest.raises(ConformanceError, match="is not a subclass of mia_core.base.Unlearner"):
        check_unlearner(dict)


@pytest.mark.parametrize("kind", ["datasets", "models"])
def test_registered_datasets_and_models_follow_parameter_rules(kind):
    for name in _names(kind):
        check_params(registry.load(kind, name), REQUIRED.get((kind, name)))


# ----------------------------------------------------------------------- the kit catches bad plugins
class LossScore(Attack):
    access = ("loss",)

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def fit(self, ctx):
        self.ctx_ = ctx
        return self

    def score(self, target, records):
        return -self.scale * self.ctx_.for_target(target).target_signal("loss")[records]


class Inverted(LossScore):
    def score(self, target, records):
        return -super().score(target, records)


class Noisy(LossScore):
    """Each fit draws an unseeded offset: consistent within a fit, different across fits."""

    def fit(self, ctx):
        self.offset_ = np.random.normal()
        return super().fit(ctx)

    def score(self, target, records):
        return super().score(target, records) + self.offset_


class NoDefault(LossScore):
    def __init__(self, scale):
        self.scale = scale


class Mutates(LossScore):
    def __init__(self, scale: float = 1.0):
        self.scale = float(abs(scale)) * 2


class LearnsInInit(LossScore):
    def __init__(self, scale: float = 1.0):
        self.scale = scale
        self.table_ = {}


class SideChannel(LossScore):
    """Reads the population behind the context's back, so its declared access means nothing."""

    def score(self, target, records):
        return -self.ctx_._population.signals().loss[target][records]


class PeeksAtMembership(LossScore):
    """Reads the target's membership row behind the context's back: perfect on the planted
    population, and just as perfect on the null one, where nothing can be learned."""

    def score(self, target, records):
        return super().score(target, records) + 100.0 * self.ctx_._population.keep[target][records]


class BatchDependent(LossScore):
    def score(self, target, records):
        s = super().score(target, records)
        return (s - s.mean()) / s.std()


class BadAccess(LossScore):
    access = ("everything",)


class ReturnsNone(LossScore):
    def fit(self, ctx):
        self.ctx_ = ctx


@pytest.mark.parametrize("cls,match", [
    (Inverted, "look inverted"),
    (Noisy, "different scores"),
    (NoDefault, "has no default"),
    (Mutates, "changed parameter 'scale'"),
    (LearnsInInit, "learned attributes"),
    (SideChannel, "no access granted"),
    (BatchDependent, "must not depend on the other records"),
    (PeeksAtMembership, "on the null population, where membership is unrelated"),
    (BadAccess, "unknown levels"),
    (ReturnsNone, "fit\\(\\) must return self"),
])
def test_kit_rejects_broken_attacks(cls, match):
    with pytest.raises(ConformanceError, match=match):
        check_attack(cls)


def test_kit_accepts_a_sound_attack_and_reports_auc():
    assert check_attack(LossScore, params={"scale": 2.0})["auc"] > 0.8


class HalveWeights(Defense):
    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def apply(self, ctx):
        for p in ctx.params.values():
            p.mul_(self.factor)
        ctx.changed()
        return {"factor": self.factor}


class RandomDefense(HalveWeights):
    def apply(self, ctx):
        import torch

        for p in ctx.params.values():
            p.add_(torch.randn_like(p))  # unseeded: not reproducible
        return {}


class ReshapingDefense(HalveWeights):
    def apply(self, ctx):
        k = next(iter(ctx.params))
        ctx.params[k] = ctx.params[k][:, :1]
        return {}


def test_kit_on_defenses():
    assert check_defense(HalveWeights) == {"factor": 0.5}
    with pytest.raises(ConformanceError, match="different weights"):
        check_defense(RandomDefense)
    with pytest.raises(ConformanceError, match="changed parameter names, shapes"):
        check_defense(ReshapingDefense)


class MeanLossGap(Estimator):
    """Toy estimator: the gap between mean non-member and member loss."""

    access = ("loss",)

    def __init__(self):
        pass

    def estimate(self, ctx):
        loss, keep = ctx.signal("loss"), ctx.keep
        return {"value": float(loss[~keep].mean() - loss[keep].mean())}


class NaNEstimator(MeanLossGap):
    def estimate(self, ctx):
        ctx.signal("loss")
        return {"value": float("nan")}


def test_kit_on_estimators():
    assert check_estimator(MeanLossGap)["value"] > 0
    with pytest.raises(ConformanceError, match="NaN"):
        check_estimator(NaNEstimator)


class ShrinkGradients(TrainingDefense):
    """Halves every summed gradient (a sound, deterministic train-time defense)."""

    def __init__(self, factor: float = 0.5):
        self.factor = factor

    def transform_batch(self, grads, step):
        for g in grads.values():
            g.mul_(self.factor)

    def report(self, result):
        return {"factor": self.factor, "steps": result.steps}


class UnseededNoise(ShrinkGradients):
    def transform_batch(self, grads, step):
        import torch

        for g in grads.values():
            g.add_(torch.randn(g.shape, generator=torch.Generator().manual_seed(int(time.time_ns()) % 2**31)))


class NaNPenalty(ShrinkGradients):
    def penalty(self, params, batch):
        return sum(p.reshape(p.shape[0], -1).sum(1) for p in params.values()) * float("nan")


class WrongStage(ShrinkGradients):
    stage = "post"


def test_kit_on_train_time_defenses():
    rep = check_defense(ShrinkGradients)
    assert rep["factor"] == 0.5 and rep["steps"] > 0
    with pytest.raises(ConformanceError, match="different weights or reports"):
        check_defense(UnseededNoise)
    with pytest.raises(ConformanceError, match="non-finite"):
        check_defense(NaNPenalty)
    with pytest.raises(ConformanceError, match="stage must be 'train'"):
        check_defense(WrongStage)


def test_third_party_plugins_are_checked_only_on_request(tmp_path, monkeypatch):
    from plugin_fixtures import installed, third_party

    with installed(third_party(tmp_path / "site"), monkeypatch):
        assert "broken" in registry.names("attacks") and "broken" not in _names("attacks")
        monkeypatch.setenv("MIAFW_CONFORMANCE_ALL", "1")
        assert "broken" in _names("attacks")


class CountsINReferences(Attack):
    """Cheats if it can: scores a record by how few IN references it has. Under the old design
    (every record IN for exactly M/2 of all models) the target's members have one IN reference
    fewer, and this reached AUC 1.000 on the default run."""

    access = ("label",)

    def __init__(self):
        pass

    def fit(self, ctx):
        self.ctx_ = ctx
        return self

    def score(self, target, records):
        return -self.ctx_.for_target(target).ref_keep.sum(axis=0)[records].astype(float)


def test_the_reference_keep_matrix_alone_scores_at_chance():
    """The fair membership game: the references' membership is independent of the target's, so
    an attack reading only the reference keep matrix is at chance (AUC exactly 0.5: every record
    has the same number of IN references)."""
    from mia_core import metrics
    from mia_core.engine import AttackContext
    from mia_core.testing import planted_population

    pop = planted_population(0)
    ctx = AttackContext(pop, CountsINReferences.access, strict=True)
    attack = CountsINReferences().fit(ctx)
    records = np.arange(pop.n_records)
    rows = []
    for t in range(pop.n_models):
        with ctx.scoring(t):
            rows.append(attack.score(t, records))
    scores, membership = np.stack(rows).ravel(), pop.keep.ravel()
    assert metrics.auc(scores, membership) == 0.5 and metrics.advantage(scores, membership) == 0.0


@pytest.mark.parametrize("name,params", _cases("attacks"))
def test_every_attack_separates_planted_separable_members(name, params):
    """Where members are planted to be separable in every signal (confident and right vs
    uncertain and usually wrong), every attack and parameter set reaches AUC >= 0.9, pooled over
    all targets. The null population (check_attack above) is the other half: chance there."""
    from mia_core import metrics
    from mia_core.engine import AttackContext
    from mia_core.testing import separable_population

    pop, signals = separable_population(0)
    cls = registry.load("attacks", name)
    ctx = AttackContext(pop, cls.access, signals=signals, strict=True)
    attack = cls(**params).fit(ctx)
    rows = []
    for t in range(pop.n_models):
        with ctx.scoring(t):
            rows.append(attack.score(t, np.arange(pop.n_records)))
    assert metrics.auc(np.stack(rows).ravel(), pop.keep.ravel()) >= 0.9
