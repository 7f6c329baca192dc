"""The weight-decay train-time defense: penalty value and gradient, its effect through the
trainer, validation errors, the report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mia_core.base import TrainingDefense
from mia_core.engine.trainer import Trainer, TrainingRecipe, init_ensemble, make_keep_matrix
from mia_plugins.defenses.weight_decay import WeightDecay, l2_penalty


def _params():
    torch.manual_seed(0)
    return {"w": torch.randn(3, 4, 2, requires_grad=True), "b": torch.randn(3, 4, requires_grad=True)}


def test_penalty_is_lam_times_squared_norm_per_model():
    params = _params()
    wd = WeightDecay(lam=0.25)
    wd.configure(None)
    pen = wd.penalty(params).detach()
    assert pen.shape == (3,)
    for m in range(3):
        by_hand = 0.25 * sum(float(v) ** 2 for p in params.values() for v in p[m].detach().flatten())
        assert float(pen[m]) == pytest.approx(by_hand, rel=1e-6)


def test_penalty_gradient_is_two_lam_theta():
    params = _params()
    grads = torch.autograd.grad(WeightDecay(lam=0.1).penalty(params).sum(), list(params.values()))
    for p, g in zip(params.values(), grads):
        torch.testing.assert_close(g, 2 * 0.1 * p.detach())


def _toy(m=4, n=80, d=5, c=3):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, c, size=n))
    keep = make_keep_matrix(m, n, np.random.default_rng(1))
    build = lambda: torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.ReLU(), torch.nn.Linear(8, c))  # noqa: E731
    base, params, buffers = init_ensemble(build, m, seed=3)
    return x, y, keep, base, params, buffers


def test_trainer_adds_two_lam_theta_to_the_gradient():
    """One plain SGD step with lr 1: the defended update differs by exactly 2 λ θ."""
    x, y, keep, base, params, buffers = _toy()
    recipe = TrainingRecipe(epochs=1, batch_size=100, lr=1.0, optimizer="sgd", momentum=0.0)
    runs = []
    for defenses in ([], [WeightDecay(lam=0.05)]):
        p = {k: v.detach().clone() for k, v in params.items()}
        Trainer(base, p, buffers, x, y, keep, recipe, seed=0, defenses=defenses).fit()
        runs.append(p)
    for k in params:
        torch.testing.assert_close(runs[0][k] - runs[1][k], 2 * 0.05 * params[k].detach(), rtol=1e-5, atol=1e-6)


def test_equivalent_to_recipe_weight_decay_of_two_lam():
    """The documented equivalence: WeightDecay(lam) computes Adam's weight_decay = 2 lam update."""
    x, y, keep, base, params, buffers = _toy()
    runs = []
    for recipe, defenses in ((TrainingRecipe(epochs=3, batch_size=16, weight_decay=0.02), []),
                             (TrainingRecipe(epochs=3, batch_size=16), [WeightDecay(lam=0.01)])):
        p = {k: v.detach().clone() for k, v in params.items()}
        Trainer(base, p, buffers, x, y, keep, recipe, seed=0, defenses=defenses).fit()
        runs.append(p)
    for k in params:
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-4, atol=1e-6)


def test_report_and_shrinking_norm():
    x, y, keep, base, params, buffers = _toy()
    norms = []
    for lam in (0.0, 0.1):
        p = {k: v.detach().clone() for k, v in params.items()}
        wd = WeightDecay(lam=lam)
        res = Trainer(base, p, buffers, x, y, keep, TrainingRecipe(epochs=5, batch_size=16), seed=0, defenses=[wd]).fit()
        report = res.defenses[0]
        assert report["lam"] == lam and set(report) >= {"param_norm_mean", "param_norm_max", "penalty_mean"}
        assert math.isfinite(report["param_norm_mean"]) and report["param_norm_max"] >= report["param_norm_mean"]
        norms.append(report["param_norm_mean"])
    assert norms[1] < norms[0]


@pytest.mark.parametrize("lam", [-1e-3, float("nan"), float("inf"), "0.1", None, True])
def test_validate_rejects(lam):
    with pytest.raises(ValueError, match=r"lam must be a finite number >= 0 \(the L2 penalty weight λ\), got"):
        WeightDecay(lam=lam).validate()


def test_contract():
    wd = WeightDecay()
    assert isinstance(wd, TrainingDefense) and wd.stage == "train" and wd.api_version == "1.0"
    assert wd.get_params() == {"lam": 1e-3} and not wd.per_sample_gradients
    WeightDecay(lam=0).validate()
    assert "Farokhi" in wd.reference and "Theorem 3" in wd.reference
    with pytest.raises(ValueError, match="no parameters"):
        l2_penalty({}, 1.0)


def test_fine_tuning_after_training_keeps_the_penalty():
    """A post-training defense that fine-tunes (prune) must keep training under weight decay:
    the defense and the recipe's equivalent ``weight_decay = 2 lam`` stay equal through it."""
    from mia_core.data import Records
    from mia_core.engine import DefenseContext, ModelPopulation
    from mia_plugins.defenses.prune import Prune

    rng = np.random.default_rng(0)
    rec = Records.from_arrays(rng.normal(size=(60, 5)), rng.integers(0, 3, size=60), name="toy")

    def build():
        return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    recipe = TrainingRecipe(epochs=3, batch_size=16, lr=0.05, optimizer="sgd", momentum=0.0)
    pops = [ModelPopulation.train(rec, build, recipe, n_models=2, seed=1, defenses=[WeightDecay(lam=0.05)]),
            ModelPopulation.train(rec, build, TrainingRecipe(**{**recipe.to_dict(), "weight_decay": 0.1}),
                                  n_models=2, seed=1)]
    for pop in pops:
        Prune(sparsity=0.5, finetune_epochs=5).apply(DefenseContext(pop))
    for k in pops[0].params:
        torch.testing.assert_close(pops[0].params[k], pops[1].params[k], rtol=1e-5, atol=1e-6)
