"""linreg: closed-form ridge regression of a whole population, and the engine's regression path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core.data import Records
from mia_core.engine.population import ModelPopulation, accuracy, mse
from mia_core.engine.signals import SignalUnavailable, compute_signals
from mia_core.engine.trainer import TrainingRecipe
from mia_plugins.models.linreg import LinReg, ridge_solve

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


def _problem(n, d, m, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = x @ rng.standard_normal(d) + 0.5 * rng.standard_normal(n) + 1.5
    keep = np.zeros((m, n), dtype=bool)
    for i in range(m):  # every model at least d + 2 records
        keep[i, rng.choice(n, size=rng.integers(d + 2, n + 1), replace=False)] = True
    return x, y, keep


@SETTINGS
@given(n=st.integers(6, 24), d=st.integers(1, 4), m=st.integers(1, 4), lam=st.floats(1e-4, 10.0),
       seed=st.integers(0, 2**16))
def test_equals_sklearn_ridge_per_model(n, d, m, lam, seed):
    from sklearn.linear_model import Ridge

    x, y, keep = _problem(n, d, m, seed)
    w, b = ridge_solve(x=torch.from_numpy(x), y=torch.from_numpy(y), keep=torch.from_numpy(keep), lam=lam)
    assert w.shape == (m, d) and b.shape == (m,) and w.dtype == torch.float64
    for i in range(m):
        ref = Ridge(alpha=lam * keep[i].sum(), fit_intercept=True, solver="cholesky").fit(x[keep[i]], y[keep[i]])
        np.testing.assert_allclose(w[i].numpy(), ref.coef_, rtol=1e-7, atol=1e-8)
        np.testing.assert_allclose(b[i].item(), ref.intercept_, rtol=1e-7, atol=1e-8)


@SETTINGS
@given(n=st.integers(6, 24), d=st.integers(1, 4), m=st.integers(1, 4), lam=st.floats(0.0, 10.0),
       penalize=st.booleans(), seed=st.integers(0, 2**16))
def test_batched_equals_per_model_and_normal_equations(n, d, m, lam, penalize, seed):
    x, y, keep = _problem(n, d, m, seed)
    w, b = ridge_solve(x=x, y=y, keep=keep, lam=lam, penalize_bias=penalize)
    for i in range(m):
        wi, bi = ridge_solve(x=x[keep[i]], y=y[keep[i]], keep=np.ones((1, keep[i].sum()), bool), lam=lam,
                             penalize_bias=penalize)
        np.testing.assert_allclose(w[i].numpy(), wi[0].numpy(), rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(b[i].item(), bi[0].item(), rtol=1e-8, atol=1e-9)
        # the normal equations themselves (numpy, independent of the einsum path)
        a = np.hstack([x[keep[i]], np.ones((keep[i].sum(), 1))])
        p = np.eye(d + 1)
        p[d, d] = 1.0 if penalize else 0.0
        beta = np.linalg.solve(a.T @ a + lam * keep[i].sum() * p, a.T @ y[keep[i]])
        np.testing.assert_allclose(np.r_[w[i].numpy(), b[i].item()], beta, rtol=1e-7, atol=1e-8)


def test_validation_and_build():
    for bad in (-1.0, float("inf"), float("nan"), "x"):
        with pytest.raises(ValueError, match="lam must be"):
            LinReg(lam=bad).validate()
    assert tuple(LinReg().build(5, 1).weight.shape) == (1, 5)
    with pytest.raises(ValueError, match="regression model"):
        LinReg().build(5, 10)


def _regression_records(n=40, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    return Records.from_arrays(x, x @ np.arange(1.0, d + 1) + rng.standard_normal(n), name="toy", task="regression")


def test_population_solved_in_closed_form_and_regression_signals():
    rec = _regression_records()
    fam = LinReg(lam=0.1)
    pop = ModelPopulation.train(rec, lambda: fam.build(rec.n_features, 1), TrainingRecipe(), n_models=4, seed=3,
                                closed_form=fam.fit_closed_form)
    w, b = ridge_solve(x=rec.x.astype(np.float64), y=rec.y, keep=pop.keep, lam=0.1)
    np.testing.assert_allclose(pop.params["weight"][:, 0].detach().numpy(), w.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pop.params["bias"][:, 0].detach().numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    assert pop.training.forward == "closed-form" and pop.training.steps == 0
    sig = pop.signals()
    pred = sig.logits[..., 0].astype(np.float64)
    assert sig.logits.shape == (4, rec.n, 1) and sig.task == "regression"
    np.testing.assert_allclose(sig.loss, (pred - rec.y) ** 2)
    np.testing.assert_array_equal(sig.confidence, -sig.loss)
    for name in ("probs", "correct"):
        with pytest.raises(SignalUnavailable, match=f"'{name}' is undefined on a regression"):
            sig.get(name)
    with pytest.raises(SignalUnavailable):
        accuracy(sig, pop.keep)
    err = mse(sig, pop.keep)
    np.testing.assert_allclose(err["train"][0], sig.loss[0][pop.keep[0]].mean())
    assert (err["train"] < err["test"]).all()  # ridge fits its own half better
    sub = sig.take(np.array([0, 2]))
    assert sub.loss.shape == (4, 2) and sub.correct is None and sub.task == "regression"
    with pytest.raises(ValueError, match="closed form"):  # SGD fine-tuning does not apply
        pop._train(1, 0)


def test_regression_signals_reference():
    z = torch.tensor([[[1.0], [2.0]], [[0.0], [-1.0]]])
    sig = compute_signals(z, np.array([0.5, 2.0]), task="regression")
    np.testing.assert_allclose(sig.loss, [[0.25, 0.0], [0.25, 9.0]])
    with pytest.raises(ValueError, match="one output"):
        compute_signals(torch.zeros(1, 2, 3), np.zeros(2), task="regression")


def _cli(tmp_path, *extra):
    from click.testing import CliRunner

    from mia_core.cli import main

    args = ["eval", "--dataset", "diabetes", "--n-models", "16", "-q", "--out", str(tmp_path / "runs"),
            "--cache-dir", str(tmp_path / "cache"), *extra]
    return CliRunner().invoke(main, args)


@pytest.mark.slow
def test_cli_end_to_end_diabetes(tmp_path):
    res = _cli(tmp_path, "--model", "linreg:lam=0.01", "--attack", "loss", "--attack", "loss:threshold=yeom")
    assert res.exit_code == 0, res.output
    assert "target MSE: train" in res.output and "loss:threshold=yeom" in res.output
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    doc = json.loads((run / "metrics.json").read_text())
    t = doc["target"]
    assert t["train_accuracy"] is None and 0 < t["train_mse"] < t["test_mse"] < 1.5
    assert 0.5 <= doc["attacks"]["loss"]["auc"] < 0.7


@pytest.mark.parametrize("extra, needle", [
    (("--model", "linreg", "--attack", "entropy"), "signal 'probs' is undefined on a regression dataset"),
    (("--model", "linreg", "--attack", "gap"), "reads predicted labels only"),
    (("--model", "mlp", "--attack", "loss"), "use a regression model, e.g. linreg"),
    (("--model", "linreg", "--attack", "loss", "--defense", "dp-sgd"), "solved in closed form"),
])
def test_cli_refuses_what_regression_lacks(tmp_path, extra, needle):
    res = _cli(tmp_path, *extra)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], res.output
    assert not any((tmp_path / "runs").glob("*.failed")) if (tmp_path / "runs").exists() else True
