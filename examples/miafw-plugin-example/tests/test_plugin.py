"""Tests of the example plugins: miafw's conformance kit plus what is specific to each plugin."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mia_core.engine import AttackContext, DefenseContext, ModelPopulation
from mia_core.testing import check_attack, check_defense, planted_population
from miafw_plugin_example.mentr import Mentr, modified_entropy
from miafw_plugin_example.temperature import Temperature, output_layer


def reference_mentr(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Song & Mittal's Mentr written out term by term, one row at a time (no clipping)."""
    out = np.empty(len(labels))
    for k, (row, y) in enumerate(zip(probs, labels)):
        total = -(1.0 - row[y]) * math.log(row[y])
        for i, p_i in enumerate(row):
            if i != y:
                total -= p_i * math.log(1.0 - p_i)
        out[k] = total
    return out


# ----------------------------------------------------------------------------- conformance
def test_mentr_conforms():
    report = check_attack(Mentr)
    assert report["auc"] > 0.8  # members of the planted population are memorised


def test_mentr_conforms_with_other_eps():
    check_attack(Mentr, params={"eps": 1e-6})


def test_temperature_conforms():
    report = check_defense(Temperature)
    assert report == {"T": 2.0, "layer": "2", "scaled_parameters": ["2.weight", "2.bias"]}
    check_defense(Temperature, params={"T": 0.5})


# ----------------------------------------------------------------------------- Mentr
@pytest.mark.parametrize("n_classes", [2, 3, 10, 100])
def test_mentr_matches_numpy_reference(n_classes):
    rng = np.random.default_rng(n_classes)
    probs = rng.dirichlet(np.full(n_classes, 0.5), size=200)
    labels = rng.integers(0, n_classes, size=200)
    expected = reference_mentr(probs, labels)
    np.testing.assert_allclose(modified_entropy(probs, labels), expected, rtol=1e-12, atol=1e-15)
    assert (expected >= 0).all()


def test_mentr_limits_are_finite():
    probs = np.array([
        [1.0, 0.0, 0.0],  # certain and right: Mentr = 0
        [0.0, 1.0, 0.0],  # certain and wrong: both logarithms clipped
        [1 / 3, 1 / 3, 1 / 3],
    ])
    labels = np.array([0, 0, 0])
    m = modified_entropy(probs, labels, eps=1e-12)
    assert np.isfinite(m).all()
    assert m[0] == 0.0
    assert m[1] == pytest.approx(-math.log(1e-12) - math.log(1e-12), rel=1e-9)
    assert m[2] == pytest.approx(reference_mentr(probs[2:], labels[2:])[0], rel=1e-12)
    assert m[0] < m[2] < m[1]


def test_mentr_scores_are_negated_mentr_of_the_target():
    pop = planted_population()
    attack = Mentr().fit(AttackContext(pop, Mentr.access, owner="test"))
    records = np.array([5, 0, 17, 239, 5])
    z = pop.logits().detach().to(torch.float64)[1, records]
    probs = torch.softmax(z, dim=-1).numpy()
    expected = -reference_mentr(probs, pop.records.y[records])
    np.testing.assert_allclose(attack.score(1, records), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, -1e-12, 1e-3, 0.5, float("nan"), True, "1e-12"])
def test_mentr_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        Mentr(eps=eps).validate()


# ----------------------------------------------------------------------------- temperature
def _apply(pop: ModelPopulation, **params):
    return Temperature(**params).apply(DefenseContext(pop))


def test_temperature_keeps_argmax_and_lowers_confidence():
    pop = planted_population()
    before = pop.logits().detach().to(torch.float64)
    acc_before = pop.accuracy()
    report = _apply(pop, T=4.0)
    json.dumps(report)
    after = pop.logits().detach().to(torch.float64)
    assert torch.equal(before.argmax(-1), after.argmax(-1))
    torch.testing.assert_close(after, before / 4.0, rtol=1e-5, atol=1e-6)
    p_before = torch.softmax(before, -1).amax(-1)
    p_after = torch.softmax(after, -1).amax(-1)
    assert bool((p_after <= p_before + 1e-12).all())
    assert float(p_after.mean()) < float(p_before.mean()) - 0.05
    for split in ("train", "test"):
        np.testing.assert_array_equal(pop.accuracy()[split], acc_before[split])


def test_temperature_below_one_sharpens():
    pop = planted_population()
    p_before = torch.softmax(pop.logits().double(), -1).amax(-1)
    _apply(pop, T=0.5)
    p_after = torch.softmax(pop.logits().double(), -1).amax(-1)
    assert bool((p_after >= p_before - 1e-12).all())


def test_temperature_one_is_identity():
    pop = planted_population()
    before = {k: v.clone() for k, v in pop.params.items()}
    _apply(pop, T=1)
    assert all(torch.equal(before[k], pop.params[k]) for k in before)


def test_temperature_touches_only_the_output_layer():
    pop = planted_population()
    before = {k: v.clone() for k, v in pop.params.items()}
    _apply(pop, T=2.0)
    assert torch.equal(pop.params["0.weight"], before["0.weight"])
    assert torch.equal(pop.params["0.bias"], before["0.bias"])
    assert torch.equal(pop.params["2.weight"], before["2.weight"] / 2)
    assert torch.equal(pop.params["2.bias"], before["2.bias"] / 2)


def test_output_layer_of_unnamed_and_biasless_heads():
    m = 3
    assert output_layer({"weight": torch.zeros(m, 4, 6), "bias": torch.zeros(m, 4)}, 4) == ("", ["weight", "bias"])
    params = {"body.weight": torch.zeros(m, 8, 6), "head.weight": torch.zeros(m, 4, 8)}
    assert output_layer(params, 4) == ("head", ["head.weight"])


def test_output_layer_must_map_to_the_classes():
    # a module that registers its head before its body: the last matrix is not the head
    params = {"head.weight": torch.zeros(2, 4, 8), "head.bias": torch.zeros(2, 4),
              "body.weight": torch.zeros(2, 8, 6), "body.bias": torch.zeros(2, 8)}
    with pytest.raises(ValueError, match="8 outputs but the dataset has 4 classes"):
        output_layer(params, 4)
    with pytest.raises(ValueError, match="no weight matrix"):
        output_layer({"bias": torch.zeros(2, 4)}, 4)


@pytest.mark.parametrize("T", [0, 0.0, -2.0, float("inf"), float("nan"), None, True, "2"])
def test_temperature_rejects_bad_T(T):
    with pytest.raises(ValueError, match="T must be"):
        Temperature(T=T).validate()
