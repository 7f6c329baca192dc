"""The adv-reg train-time defense (Nasr et al. 2018): the inference model, its gain and the
classifier's penalty against independent references, gradient separation, per-model streams,
the reserved reference set, validation, the conformance kit and the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import mia_core.cli
from mia_core.base import TrainingDefense
from mia_core.engine.trainer import StepBatch, Trainer, TrainingRecipe, init_ensemble, make_keep_matrix, reserve_records
from mia_core.testing import check_defense
from mia_plugins.defenses.adv_reg import (
    CHANCE_GAIN,
    AdversarialRegularization,
    inference_gain,
    inference_logits,
    inference_shapes,
    init_inference_params,
    membership_accuracy,
    pack_inference_params,
    privacy_penalty,
    unpack_inference_params,
)

HYP = settings(max_examples=20, deadline=None, derandomize=True)
D, C = 5, 3


# --------------------------------------------------------------------------- pure maths
def _reference_module(params, m):
    """Model ``m``'s inference model as ordinary torch modules (an independent forward)."""
    def lin(name):
        w = params[f"{name}.w"][m].detach()
        layer = torch.nn.Linear(w.shape[0], w.shape[1]).double()
        with torch.no_grad():
            layer.weight.copy_(w.T)
            layer.bias.copy_(params[f"{name}.b"][m].detach())
        return layer

    pred = torch.nn.Sequential(lin("pred1"), torch.nn.ReLU(), lin("pred2"), torch.nn.ReLU())
    label = torch.nn.Sequential(lin("label"), torch.nn.ReLU())
    comb = torch.nn.Sequential(lin("comb1"), torch.nn.ReLU(), lin("comb2"))

    def forward(probs, labels):
        onehot = torch.zeros(len(labels), probs.shape[-1], dtype=probs.dtype)
        onehot[torch.arange(len(labels)), labels] = 1.0
        return comb(torch.cat([pred(probs), label(onehot)], dim=1)).squeeze(1)

    return forward


@HYP
@given(m=st.integers(1, 3), b=st.integers(0, 5), c=st.integers(1, 4), w=st.integers(1, 6), seed=st.integers(0, 2**31))
def test_inference_logits_match_per_model_modules(m, b, c, w, seed):
    params = init_inference_params(n_classes=c, width=w, seeds=[seed + i for i in range(m)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(m, b, c, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, c, (m, b), generator=g)
    z = inference_logits(params=params, probs=probs, labels=labels)
    assert z.shape == (m, b)
    for i in range(m):
        torch.testing.assert_close(z[i], _reference_module(params, i)(probs[i], labels[i]))


def test_inference_shapes_and_init_per_model():
    shapes = inference_shapes(n_classes=4, width=3)
    assert shapes == {"pred1.w": (4, 3), "pred1.b": (3,), "pred2.w": (3, 3), "pred2.b": (3,), "label.w": (4, 3),
                      "label.b": (3,), "comb1.w": (6, 3), "comb1.b": (3,), "comb2.w": (3, 1), "comb2.b": (1,)}
    three = init_inference_params(n_classes=4, width=3, seeds=[11, 12, 13])
    alone = init_inference_params(n_classes=4, width=3, seeds=[12])
    for name, shape in shapes.items():
        assert three[name].shape == (3, *shape) and three[name].dtype == torch.float32
        assert torch.equal(three[name][1], alone[name][0])  # model m's init depends on its seed only
        assert float(three[name].abs().max()) <= 1 / math.sqrt(shapes[name[:-2] + ".w"][0])
    assert not torch.equal(three["pred1.w"][0], three["pred1.w"][1])
    flat = pack_inference_params(three)
    assert flat.shape == (3, sum(int(np.prod(s)) for s in shapes.values()))
    views = unpack_inference_params(flat, n_classes=4, width=3)
    assert all(torch.equal(views[k], three[k]) for k in shapes)
    with pytest.raises(ValueError, match="does not hold an inference model"):
        unpack_inference_params(flat, n_classes=5, width=3)


def _np_logsig(z):
    return -np.logaddexp(0.0, -z)


@HYP
@given(m=st.integers(1, 3), a=st.integers(1, 6), r=st.integers(1, 6), seed=st.integers(0, 2**31), masked=st.booleans())
def test_inference_gain_matches_numpy(m, a, r, seed, masked):
    rng = np.random.default_rng(seed)
    zi, zo = rng.normal(scale=4, size=(m, a)), rng.normal(scale=4, size=(m, r))
    mask = rng.random((m, a)) < 0.6 if masked else None
    if masked:
        mask[0] = False  # an empty row contributes 0
    got = inference_gain(member_logits=torch.from_numpy(zi), reference_logits=torch.from_numpy(zo),
                         member_mask=None if mask is None else torch.from_numpy(mask)).numpy()
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    for i in range(m):
        rows = np.ones(a, bool) if mask is None else mask[i]
        member = np.log(sig(zi[i][rows])).mean() if rows.any() else 0.0
        want = member + np.log(1 - sig(zo[i])).mean()
        assert got[i] == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_inference_gain_edges():
    z = torch.zeros(2, 3)
    assert torch.allclose(inference_gain(member_logits=z, reference_logits=z), torch.full((2,), CHANCE_GAIN))
    big = torch.full((1, 2), 200.0)  # a confident, correct attacker: gain -> 0, finite (no log(0))
    assert abs(float(inference_gain(member_logits=big, reference_logits=-big))) < 1e-30
    assert float(inference_gain(member_logits=-big, reference_logits=big)) == pytest.approx(-400.0)


@HYP
@given(m=st.integers(1, 3), w=st.integers(1, 6), gamma=st.floats(0, 10), seed=st.integers(0, 2**31))
def test_privacy_penalty_matches_numpy(m, w, gamma, seed):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3, size=(m, w))
    mask = rng.random((m, w)) < 0.7
    got = privacy_penalty(member_logits=torch.from_numpy(z), gamma=gamma, mask=torch.from_numpy(mask)).numpy()
    full = privacy_penalty(member_logits=torch.from_numpy(z), gamma=gamma).numpy()
    for i in range(m):
        want = gamma * _np_logsig(z[i][mask[i]]).mean() if mask[i].any() else 0.0
        assert got[i] == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert full[i] == pytest.approx(gamma * _np_logsig(z[i]).mean(), rel=1e-9, abs=1e-12)


def test_membership_accuracy():
    zi = torch.tensor([[1.0, -1.0, 2.0, 3.0]])
    zo = torch.tensor([[-1.0, 0.0, 1.0, -2.0]])
    assert float(membership_accuracy(member_logits=zi, reference_logits=zo)) == pytest.approx((0.75 + 0.75) / 2)


# --------------------------------------------------------------------------- through the trainer
def _toy(m=4, n=120, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, D)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, C, size=n))
    keep = make_keep_matrix(m, n, np.random.default_rng(1))
    reserved = np.flatnonzero(reserve_records(n, 0.2, 3))
    keep[:, reserved] = False
    base, params, buffers = init_ensemble(_build, m, seed=3)
    return x, y, keep, reserved, base, params, buffers


def _build():
    return torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.ReLU(), torch.nn.Linear(8, C))


def _clone(params):
    return {k: v.detach().clone() for k, v in params.items()}


def _fit(defenses, *, recipe=None, m=4, model_ids=None, epoch_size=None, rows=None, init_ids=None, stacked=True):
    x, y, keep, reserved, base, params, buffers = _toy(m=4)
    if rows is not None:
        keep = keep[rows]
        _, params, buffers = init_ensemble(_build, len(rows), seed=3, model_ids=init_ids)
    recipe = recipe or TrainingRecipe(epochs=3, batch_size=16)
    res = Trainer(base, params, buffers, x, y, keep, recipe, seed=5, defenses=defenses, reserved=reserved,
                  model_ids=model_ids, epoch_size=epoch_size, stacked=stacked).fit()
    return params, res


def test_penalty_gradient_reaches_the_classifier_only():
    """``penalty`` trains h (k steps, classifier detached), then returns γ·mean log h over the real
    rows, whose gradient flows into the classifier through f(x) only: checked against a per-model
    torch reference; h's parameters get no gradient from it, the classifier none from h's update."""
    x, y, keep, reserved, base, params, buffers = _toy()
    adv = AdversarialRegularization(gamma=2.5, k=2, attack_width=6, attack_batch=5)
    trainer = Trainer(base, params, buffers, x, y, keep, TrainingRecipe(batch_size=16, sampler="poisson"), seed=0,
                      defenses=[adv], reserved=reserved)
    batch = next(iter(trainer.batches(trainer.sample_epoch(0))))
    assert batch.mask is not None and not bool(batch.mask.all())  # ragged: padding rows must not count
    for p in params.values():
        p.requires_grad_(True)
    before = _clone(params)
    seen = StepBatch(batch.x, batch.y, batch.mask, lambda p, xb: trainer.forward(p, buffers, xb))
    pen = adv.penalty(params, seen)
    assert pen.shape == (4,) and adv._flat is not None and adv._flat.requires_grad
    assert all(p.grad is None for p in params.values())  # h's update did not backpropagate into f
    assert all(torch.equal(before[k], params[k].detach()) for k in params)
    attack = _clone(adv.inference_params())
    assert torch.autograd.grad(pen.sum(), [adv._flat], allow_unused=True) == (None,)
    grads = dict(zip(params, torch.autograd.grad(pen.sum(), list(params.values()), retain_graph=True)))
    pen.sum().backward()  # as a plain backward would: nothing accumulates into h
    assert adv._flat.grad is None and all(torch.equal(attack[k], v) for k, v in adv.inference_params().items())
    for m in range(4):  # reference: model m as a plain module, h_m frozen, mean over the real rows
        module = _build()
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(params[name][m])
        rows = batch.mask[m]
        probs = torch.softmax(module(batch.x[m][rows]), dim=-1).double()
        h = _reference_module(attack, m)
        want = 2.5 * F.logsigmoid(h(probs, batch.y[m][rows])).mean()
        assert float(pen[m].detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
        want.backward()
        for name, p in module.named_parameters():
            torch.testing.assert_close(grads[name][m], p.grad.float(), rtol=1e-4, atol=1e-6)


def test_gamma_zero_trains_as_without_the_defense():
    plain, _ = _fit([])
    zero, res = _fit([AdversarialRegularization(gamma=0.0, attack_batch=8, attack_width=8)])
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert res.defenses[0]["gamma"] == 0.0 and math.isfinite(res.defenses[0]["inference_gain"])
    warm, res = _fit([AdversarialRegularization(gamma=1.0, warmup_epochs=3, attack_batch=8, attack_width=8)])
    assert all(torch.equal(plain[k], warm[k]) for k in plain)  # warm-up = all epochs
    assert res.defenses[0]["penalised_epochs"] == 0 and len(res.defenses[0]["inference_gain_per_epoch"]) == 3
    half, _ = _fit([AdversarialRegularization(gamma=1.0, warmup_epochs=2, attack_batch=8, attack_width=8)])
    assert not all(torch.equal(plain[k], half[k]) for k in plain)


def test_deterministic_and_shard_invariant():
    """Model m's classifier and inference model come from its own streams: models 2 and 3
    trained alone (model_ids) equal models 2 and 3 of the 4-model ensemble, bitwise."""
    adv = dict(gamma=1.0, k=2, attack_batch=8, attack_width=8)
    a, ra = _fit([AdversarialRegularization(**adv)])
    b, rb = _fit([AdversarialRegularization(**adv)])
    assert all(torch.equal(a[k], b[k]) for k in a) and ra.defenses == rb.defenses
    x, y, keep, *_ = _toy()
    part, _ = _fit([AdversarialRegularization(**adv)], rows=[2, 3], init_ids=[2, 3], model_ids=[2, 3],
                   epoch_size=int(keep.sum(1).max()))
    assert all(torch.equal(a[k][2:], part[k]) for k in a)  # bitwise, as the trainer's own shards
    plain, _ = _fit([])
    assert not all(torch.equal(plain[k], a[k]) for k in a)
    generic, _ = _fit([AdversarialRegularization(**adv)], stacked=False)  # the vmap forward: same models
    for k in a:
        torch.testing.assert_close(generic[k], a[k], rtol=1e-4, atol=1e-5)


def test_report():
    _, res = _fit([AdversarialRegularization(gamma=3.0, k=2, attack_batch=8, attack_width=8)],
                  recipe=TrainingRecipe(epochs=4, batch_size=16))
    r = res.defenses[0]
    assert r["gamma"] == 3.0 and r["k"] == 2 and r["reference_records"] == 24 and r["warmup_epochs"] == 0
    assert r["penalised_epochs"] == 4
    assert len(r["inference_gain_per_epoch"]) == len(r["inference_accuracy_per_epoch"]) == 4
    assert CHANCE_GAIN - 0.5 < r["inference_gain"] <= 0 and 0 <= r["inference_accuracy"] <= 1
    assert r["inference_params"] == sum(int(np.prod(s)) for s in inference_shapes(n_classes=C, width=8).values())
    empty = AdversarialRegularization().report(None)  # never configured: the parameters only
    assert empty["gamma"] == 1.0 and "inference_gain" not in empty


def test_needs_reserved_records():
    x, y, keep, reserved, base, params, buffers = _toy()
    with pytest.raises(ValueError, match="adv-reg needs reserved records as its non-member reference set"):
        Trainer(base, params, buffers, x, y, keep, TrainingRecipe(epochs=1), seed=0,
                defenses=[AdversarialRegularization()])


def test_strong_gamma_reduces_memorisation():
    """On the planted population (random labels: membership is all a model can learn) a large γ
    keeps the models from fitting their training halves."""
    import dataclasses

    from mia_core.engine import ModelPopulation
    from mia_core.engine.trainer import ensemble_logits
    from mia_core.testing import _planted_setup

    records, build, recipe = _planted_setup(0)
    recipe = dataclasses.replace(recipe, epochs=20)
    x, y = torch.from_numpy(records.x), torch.from_numpy(records.y)
    accs = []
    for gamma in (0.0, 10.0):
        adv = AdversarialRegularization(gamma=gamma, attack_width=16, attack_batch=32, attack_lr=1e-2)
        pop = ModelPopulation.train(records, build, recipe, n_models=2, seed=0, defenses=[adv],
                                    reserve=adv.reserve_fraction())
        hit = (ensemble_logits(pop.base, pop.params, pop.buffers, x).argmax(-1) == y).numpy()
        accs.append(float((hit & pop.keep).sum() / pop.keep.sum()))
    assert accs[1] < accs[0] - 0.25, accs  # measured: 0.69 -> 0.26


@pytest.mark.parametrize("name, value, message", [
    ("gamma", -1.0, "gamma must be a finite number >= 0"), ("gamma", float("nan"), "gamma must be"),
    ("gamma", True, "gamma must be"), ("gamma", "1", "gamma must be"),
    ("k", 0, "k must be an integer >= 1"), ("k", 1.5, "k must be an integer >= 1"),
    ("reference_fraction", 0.0, r"reference_fraction must be in \(0, 0.5\]"),
    ("reference_fraction", 1.0, r"reference_fraction must be in \(0, 0.5\]"),
    ("reference_fraction", 0.6, r"reference_fraction must be in \(0, 0.5\]"),
    ("attack_lr", 0.0, "attack_lr must be a positive number"), ("attack_lr", float("inf"), "attack_lr"),
    ("attack_width", 0, "attack_width must be an integer >= 1"), ("attack_batch", 2.0, "attack_batch must be"),
    ("warmup_epochs", -1, "warmup_epochs must be an integer >= 0"), ("warmup_epochs", None, "warmup_epochs"),
])
def test_validate_rejects(name, value, message):
    with pytest.raises(ValueError, match=message):
        AdversarialRegularization(**{name: value}).validate()


def test_contract():
    adv = AdversarialRegularization()
    assert isinstance(adv, TrainingDefense) and adv.stage == "train" and adv.api_version == "1.0"
    assert adv.get_params() == {"gamma": 1.0, "k": 1, "reference_fraction": 0.1, "attack_lr": 1e-3,
                                "attack_width": 64, "attack_batch": 64, "warmup_epochs": 0}
    assert adv.reserve_fraction() == 0.1
    assert AdversarialRegularization(reference_fraction=0.25).reserve_fraction() == 0.25
    assert "Nasr" in adv.reference and "Algorithm 1" in adv.reference and not adv.per_sample_gradients


# --------------------------------------------------------------------------- kit and CLI
def test_check_defense_trains_with_the_reserved_records():
    """The kit reserves what the defense asks for, as the engine does (tests/test_conformance.py
    runs it on more parameter sets)."""
    report = check_defense(AdversarialRegularization, params={"attack_width": 8, "attack_batch": 16})
    assert report["gamma"] == 1.0 and math.isfinite(report["inference_gain"])


def test_cli_end_to_end(tmp_path):
    res = CliRunner().invoke(mia_core.cli.main, [
        "eval", "--attack", "lira", "--defense", "adv-reg:gamma=2,k=2,attack_width=8,attack_batch=16",
        "--n-models", "6", "--epochs", "3", "--targets", "first:2", "-q", "--out", str(tmp_path / "runs"),
        "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "defense adv-reg (train-time): gamma=2" in res.output and "inference_gain=" in res.output
    assert "reference_records=180" in res.output  # 10% of digits' 1797 records
