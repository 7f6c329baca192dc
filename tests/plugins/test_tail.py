"""The ``tail`` estimator (Dodd et al. 2025): the LOSS attack's TNR at low FNR against a brute-force
reference, shifted Gaussian losses where the answer is known in closed form, the no-leakage and
perfect-separation limits, validation errors, the conformance kit and one command-line run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core.testing import check_estimator
from mia_plugins.estimators.tail import (TailEstimator, gaussian_tail_tnr, head_tpr, predict_tpr, tail_estimate,
                                         tail_tnr)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def _brute_tnr(loss_row, keep_row, fnr):
    """Every candidate threshold (each member loss and +inf): the largest TNR among those leaving at most
    floor(fnr * n_in) members strictly above (the LOSS attack predicts member iff loss <= t)."""
    members = [v for v, k in zip(loss_row, keep_row) if k]
    others = [v for v, k in zip(loss_row, keep_row) if not k]
    allowed = int(np.floor(fnr * len(members) + 1e-9))
    best = 0.0
    for t in members + [float("inf")]:
        if sum(v > t for v in members) <= allowed:
            best = max(best, sum(v > t for v in others) / len(others))
    return best


def _population(draw_rng, m, n):
    keep = draw_rng.random((m, n)) < 0.5
    keep[:, 0], keep[:, 1] = True, False  # every model has a member and a non-member
    return keep


@SETTINGS
@given(m=st.integers(1, 4), n=st.integers(2, 25), fnr=st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.5, 0.9]),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_tail_tnr_matches_brute_force(m, n, fnr, ties, seed):
    rng = np.random.default_rng(seed)
    keep = _population(rng, m, n)
    loss = rng.integers(0, 4, (m, n)).astype(float) if ties else rng.exponential(size=(m, n))
    tnr, tau = tail_tnr(loss=loss, keep=keep, fnr=fnr)
    assert tnr.shape == tau.shape == (m,)
    for i in range(m):
        assert tnr[i] == pytest.approx(_brute_tnr(loss[i].tolist(), keep[i].tolist(), fnr), abs=1e-12)
        assert (loss[i][keep[i]] > tau[i]).sum() <= np.floor(fnr * keep[i].sum() + 1e-9)  # FNR <= fnr


@SETTINGS
@given(m=st.integers(1, 3), n=st.integers(2, 20), fpr=st.sampled_from([0.0, 0.05, 0.2, 0.5]), seed=st.integers(0, 2**16))
def test_head_tpr_is_the_mirror_image(m, n, fpr, seed):
    """The LOSS attack's TPR at FPR <= fpr: brute force over thresholds "member iff loss < t"."""
    rng = np.random.default_rng(seed)
    keep = _population(rng, m, n)
    loss = rng.integers(0, 5, (m, n)).astype(float)
    got = head_tpr(loss=loss, keep=keep, fpr=fpr)
    for i in range(m):
        mem, non = loss[i][keep[i]], loss[i][~keep[i]]
        allowed = np.floor(fpr * non.size + 1e-9)
        want = max((mem < t).mean() for t in list(non) + [-np.inf] if (non < t).sum() <= allowed)
        assert got[i] == pytest.approx(want, abs=1e-12)


def test_predict_tpr_is_a_clipped_line():
    np.testing.assert_allclose(predict_tpr(tnr=np.array([0.0, 0.2, 1.0])), [0.0, 0.2, 1.0])
    np.testing.assert_allclose(predict_tpr(tnr=np.array([0.0, 0.2, 1.0]), slope=2.0, intercept=-0.1), [0.0, 0.3, 1.0])


@pytest.mark.parametrize("shift", [0.5, 1.5, 3.0])
@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_shifted_gaussians_known_answer(shift, alpha):
    """Member losses N(0, 1), non-member losses N(shift, 1): the per-model loss threshold's true TPR at
    FPR alpha is Phi(shift - z_(1-alpha)); by the symmetry of the equal-variance ROC the tail TNR at
    FNR alpha is the same number. The estimator (identity map) recovers it, its bootstrap interval
    covers it, and the head statistic agrees."""
    from statistics import NormalDist

    truth = NormalDist().cdf(shift - NormalDist().inv_cdf(1 - alpha))
    assert gaussian_tail_tnr(shift=shift, fnr=alpha) == pytest.approx(truth, rel=1e-12)
    rng = np.random.default_rng(7)
    m, n = 4, 20_000
    keep = rng.random((m, n)) < 0.5
    loss = rng.normal(size=(m, n)) + np.where(keep, 0.0, shift)
    out = tail_estimate(loss=loss, keep=keep, fpr=alpha, n_boot=60, seed=1)
    se = np.sqrt(truth * (1 - truth) / (m * n / 2)) + 0.01 * truth  # binomial noise + the threshold's own
    assert abs(out["value"] - truth) < 4 * se + 2e-3
    lo, hi = out["interval"]
    assert lo <= truth <= hi and lo <= out["value"] <= hi
    assert abs(out["loss_tpr_at_fpr"] - truth) < 4 * se + 2e-3
    assert len(out["per_model"]) == m and out["fnr"] == alpha


def test_heavy_test_tail_is_seen_by_the_tail_not_the_head():
    """The paper's picture: training removed the high-loss outliers, the heads coincide. Members
    N(0, 1); non-members the same mixed with 10% of N(4, 1) outliers. The LOSS attack's TPR at 1% FPR
    (head) stays near chance; the tail TNR at 1% FNR sees the missing outliers (closed form below)."""
    from statistics import NormalDist

    rng = np.random.default_rng(3)
    m, n = 2, 100_000
    keep = rng.random((m, n)) < 0.5
    outlier = rng.random((m, n)) < 0.1
    loss = rng.normal(size=(m, n)) + np.where(~keep & outlier, 4.0, 0.0)
    out = tail_estimate(loss=loss, keep=keep, fpr=0.01, n_boot=0)
    z = NormalDist().inv_cdf(0.99)
    want = 0.9 * 0.01 + 0.1 * (1 - NormalDist(4.0, 1.0).cdf(z))
    assert out["value"] == pytest.approx(want, abs=0.01)
    assert out["loss_tpr_at_fpr"] < 0.02 and out["value"] > 5 * out["loss_tpr_at_fpr"]
    assert "interval" not in out


def test_limits_no_leakage_and_perfect_separation():
    rng = np.random.default_rng(0)
    m, n = 3, 30_000
    keep = rng.random((m, n)) < 0.5
    same = rng.exponential(size=(m, n))
    null = tail_estimate(loss=same, keep=keep, fpr=0.01, n_boot=50)
    assert null["value"] == pytest.approx(0.01, abs=0.004)
    apart = np.where(keep, 0.0, 1.0) + 0.01 * same
    assert tail_estimate(loss=apart, keep=keep, fpr=0.01, n_boot=50)["value"] == 1.0


def test_tail_rises_with_the_shift():
    rng = np.random.default_rng(1)
    keep = rng.random((2, 4000)) < 0.5
    base = rng.normal(size=keep.shape)
    values = [tail_estimate(loss=base + np.where(keep, 0, s), keep=keep, n_boot=0)["value"] for s in (0, 1, 2, 3)]
    assert values == sorted(values) and values[-1] > values[0] + 0.3


def test_bootstrap_is_seeded_and_tiny_resamples_survive():
    rng = np.random.default_rng(2)
    keep = rng.random((3, 400)) < 0.5
    loss = rng.exponential(size=keep.shape) + np.where(keep, 0, 0.5)
    a = tail_estimate(loss=loss, keep=keep, seed=5)
    assert a == tail_estimate(loss=loss, keep=keep, seed=5)
    b = tail_estimate(loss=loss, keep=keep, seed=6)
    assert a["value"] == b["value"] and a["interval"] != b["interval"]
    # two records per model: many resamples have a one-sided model, which is left out of that resample
    small = tail_estimate(loss=np.array([[0.1, 2.0], [1.0, 0.2]]), keep=np.array([[1, 0], [0, 1]], bool), n_boot=50)
    assert small["value"] == 1.0 and small["interval"][0] <= 1.0 <= small["interval"][1]


@pytest.mark.parametrize("kwargs,message", [
    ({"loss": np.zeros(3), "keep": np.zeros(3, bool)}, r"2-D array \[M, N\], got shape \(3,\)"),
    ({"loss": np.zeros((2, 3)), "keep": np.zeros((3, 2), bool)}, r"shape of loss \(2, 3\), got \(3, 2\)"),
    ({"loss": np.array([[np.nan, 1.0]]), "keep": np.array([[True, False]])}, "1 NaN or infinite"),
    ({"loss": np.zeros((1, 2)), "keep": np.array([[2, 0]])}, "boolean"),
    ({"loss": np.zeros((2, 2)), "keep": np.array([[True, False], [True, True]])}, "model 1 has 2 members among 2"),
    ({"loss": np.zeros((1, 2)), "keep": np.array([[False, False]])}, "model 0 has 0 members"),
    ({"loss": np.zeros((1, 2)), "keep": np.array([[True, False]]), "fnr": 1.0}, r"fnr must be a number in \[0, 1\)"),
    ({"loss": np.zeros((1, 2)), "keep": np.array([[True, False]]), "fnr": -0.1}, "got -0.1"),
])
def test_tail_tnr_rejects(kwargs, message):
    kwargs.setdefault("fnr", 0.01)
    with pytest.raises(ValueError, match=message):
        tail_tnr(**kwargs)


@pytest.mark.parametrize("params,message", [
    ({"fpr": 0.0}, r"fpr must be a number in \(0, 1\), got 0.0"),
    ({"fpr": 1.5}, "got 1.5"),
    ({"fpr": "0.01"}, "got '0.01'"),
    ({"fnr": 1.0}, r"fnr must be a number in \[0, 1\), got 1.0"),
    ({"slope": 0.0}, "slope must be a finite number > 0"),
    ({"slope": float("inf")}, "got inf"),
    ({"intercept": 2.0}, r"intercept must be a number in \[-1, 1\], got 2.0"),
    ({"n_boot": 5}, "n_boot must be 0 .* or an integer >= 10, got 5"),
    ({"n_boot": True}, "got True"),
    ({"confidence": 1.0}, r"confidence must be a number in \(0, 1\)"),
])
def test_validate_rejects(params, message):
    with pytest.raises(ValueError, match=message):
        TailEstimator(**params).validate()


def test_defaults():
    est = TailEstimator()
    assert est.get_params() == {"fpr": 0.01, "fnr": None, "slope": 1.0, "intercept": 0.0, "n_boot": 200,
                                "confidence": 0.95}
    assert TailEstimator.access == ("loss",) and "2510.19773" in TailEstimator.reference
    TailEstimator(fnr=0.0, n_boot=0).validate()


@pytest.mark.parametrize("params", [{}, {"fpr": 0.05, "fnr": 0.0, "n_boot": 0}, {"slope": 0.6, "intercept": 0.005}])
def test_conformance_kit(params):
    out = check_estimator(TailEstimator, params=params)
    assert 0.0 <= out["value"] <= 1.0 and "advantage_bound" not in out
    if params.get("n_boot", 200):
        lo, hi = out["interval"]
        assert lo <= out["value"] <= hi
    # the planted models memorise their members: the tail is far above chance
    assert out["tnr"] > 0.3 and len(out["per_model"]) == out["n_models"]


def test_cli_row(tmp_path):
    from click.testing import CliRunner

    from mia_core.cli import main

    args = ["eval", "--attack", "lira", "--estimator", "tail", "--estimator", "tail:fpr=0.05,n_boot=50",
            "--dataset", "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6", "--epochs", "3",
            "--targets", "first:2", "-q", "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = [line for line in res.output.splitlines() if line.startswith("tail")]
    assert len(rows) == 2, res.output
    run = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir() and not d.name.startswith("."))
    est = json.loads((run / "metrics.json").read_text())["estimators"]
    for label in ("tail", "tail:fpr=0.05,n_boot=50"):
        e = est[label]
        assert 0.0 <= e["value"] <= 1.0 and e["interval"][0] <= e["value"] <= e["interval"][1]
        assert e["advantage_bound"] is None and len(e["report"]["per_model"]) == 6
    assert est["tail:fpr=0.05,n_boot=50"]["report"]["fnr"] == 0.05
