"""The mis-quant estimator: its pure functions against independent references (hypothesis), the
derivation's Gaussian step checked where it is exact, the grid it reads off quantized weights, the
SignalContext.logits seam it runs the models through, validation, the contract and one CLI run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

import mia_core.cli
from mia_core import kernels
from mia_core.engine import DefenseContext
from mia_core.engine.contexts import AccessError, EstimatorContext
from mia_core.testing import check_estimator, planted_population
from mia_plugins.defenses.quantize import Quantize, binarize, quantize_tensor, ternarize
from mia_plugins.estimators.mis_quant import (
    MISQuant,
    cross_entropy,
    implied_mis,
    infer_grid,
    loss_gap_rates,
    neighbour_moves,
    quantize_stacked,
)

HYP = settings(max_examples=25, deadline=None, derandomize=True)
FAST = {"n_neighbours": 12}


# ----------------------------------------------------------------------------- loss gaps
@HYP
@given(k=st.integers(0, 4), n=st.integers(2, 12), seed=st.integers(0, 2 ** 31))
def test_loss_gap_rates_match_numpy(k, n, seed):
    rng = np.random.default_rng(seed)
    lq = rng.exponential(size=n)
    lk = lq + rng.normal(loc=rng.normal(size=(k, 1)), size=(k, n))
    delta, var, rate = loss_gap_rates(loss_q=torch.from_numpy(lq), loss_k=torch.from_numpy(lk))
    d = lk - lq
    np.testing.assert_allclose(delta.numpy(), d.mean(axis=1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), d.var(axis=1, ddof=1), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(rate.numpy(), d.mean(axis=1) ** 2 / (2 * d.var(axis=1, ddof=1)), rtol=1e-9)
    assert delta.dtype == var.dtype == rate.dtype == torch.float64 and rate.shape == (k,)


def test_loss_gap_rates_edges():
    lq = torch.tensor([1.0, 2.0, 3.0])
    _, var, rate = loss_gap_rates(loss_q=lq, loss_k=torch.stack([lq, lq + 1]))
    assert var.tolist() == [0.0, 0.0] and torch.isnan(rate).all()  # nothing tells them apart
    with pytest.raises(ValueError, match="at least 2 held-out records"):
        loss_gap_rates(loss_q=lq[:1], loss_k=lq[:1].reshape(1, 1))
    with pytest.raises(ValueError, match=r"expected loss_q \[N\] and loss_k \[K, N\]"):
        loss_gap_rates(loss_q=lq, loss_k=lq.reshape(1, 1, 3))


def test_implied_mis():
    assert implied_mis(n_rate=0.0) == 0.0 and implied_mis(n_rate=math.inf) == 1.0
    x = np.array([0.0, 1e-12, 0.5, 3.0, 50.0])
    np.testing.assert_allclose(implied_mis(n_rate=x), 1 - np.exp(-x), rtol=1e-4, atol=0)  # naive form loses digits
    assert [implied_mis(n_rate=float(v)) for v in x] == list(implied_mis(n_rate=x))
    assert np.all(np.diff(implied_mis(n_rate=x)) > 0)  # more n r, more secure
    assert implied_mis(n_rate=1e-12) == pytest.approx(1e-12, rel=1e-9)  # expm1: no cancellation


def test_cross_entropy_matches_torch():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 7, 5, generator=g), torch.randint(0, 5, (7,), generator=g)
    ref = torch.stack([torch.nn.functional.cross_entropy(z[i].double(), y, reduction="none") for i in range(3)])
    torch.testing.assert_close(cross_entropy(logits=z, labels=y), ref)


def test_rate_is_the_boundary_crossing_exponent_for_a_gaussian_mean():
    """Derivation steps 2 and 4 where they are exact: l(t, z) = (t - z)^2 / 2, z ~ N(mu, tau^2),
    the minimizer is the sample mean, rounded to the grid h Z. The loss-gap rate toward the upper
    neighbour is b^2 / (2 tau^2), b the distance from mu to the rounding boundary, and
    P(round(mean_n) leaves the cell upward) = Phi(-sqrt(2 n r)), whose exponent is n r."""
    mu, tau, h = 0.3, 1.5, 1.0
    z = torch.from_numpy(np.random.default_rng(0).normal(mu, tau, size=400_000))
    grid = torch.tensor([0.0, h, -h])  # theta_Q = round(mu) = 0, then its two neighbours
    loss = 0.5 * (grid[:, None] - z[None]) ** 2
    delta, var, rate = loss_gap_rates(loss_q=loss[0], loss_k=loss[1:])
    b_up, b_down = h / 2 - mu, h / 2 + mu
    assert rate[0].item() == pytest.approx(b_up ** 2 / (2 * tau ** 2), rel=0.03)
    assert rate[1].item() == pytest.approx(b_down ** 2 / (2 * tau ** 2), rel=0.03)
    assert delta[0] > 0 and delta[1] > 0  # 0 is the grid's best point
    r = b_up ** 2 / (2 * tau ** 2)
    ratios = []
    for n in (10 ** 3, 10 ** 5, 10 ** 7):  # mean_n ~ N(mu, tau^2 / n): the exact crossing probability
        log_p = norm.logcdf(-math.sqrt(n) * b_up / tau)
        assert log_p == pytest.approx(norm.logcdf(-math.sqrt(2 * n * r)))
        ratios.append(-log_p / (n * r))  # 1 + (log sqrt(4 pi n r)) / (n r): the dropped prefactor
    assert ratios[0] > ratios[1] > ratios[2] > 1 and ratios[2] == pytest.approx(1.0, abs=1e-3)


# ----------------------------------------------------------------------------- the grid
@HYP
@given(bits=st.integers(2, 8), scheme=st.sampled_from(["symmetric", "affine"]), axis=st.sampled_from([None, 1]),
       seed=st.integers(0, 2 ** 31))
def test_grid_of_uniform_quantized_weights(bits, scheme, axis, seed):
    w = torch.randn(2, 3, 400, generator=torch.Generator().manual_seed(seed))
    q = quantize_stacked(w=w, method="uniform", bits=bits, scheme=scheme, axis=axis, ternary_sparsity=0.5)
    assert torch.equal(q, quantize_tensor(w=w, bits=bits, scheme=scheme, axis=axis))
    for m in range(2):
        rows_w = w[m].reshape(1, -1) if axis is None else w[m]
        rows_q = q[m].reshape(1, -1) if axis is None else q[m]
        g = infer_grid(q=rows_q, method="uniform", bits=bits, scheme=scheme)
        s, _ = kernels.quantization_params(rows_w, bits=bits, scheme=scheme, axis=None if axis is None else 0)
        assert g.ok.all()
        torch.testing.assert_close(g.step, s.double(), rtol=1e-6, atol=0)  # adjacent codes are used
        assert not infer_grid(q=rows_w, method="uniform", bits=bits, scheme=scheme).ok.any()  # floats are not


def test_grid_is_read_off_the_values_not_rederived():
    """Why a tensor already on the grid is taken as it is: re-quantizing a symmetric grid with the
    derived min-max scale is not idempotent (the scale grows by 2^b / (2^b - 1))."""
    w = torch.tensor([[[-1.0, -0.4, 0.1, 0.3]]])
    q = quantize_tensor(w=w, bits=2, scheme="symmetric")
    assert not torch.equal(quantize_tensor(w=q, bits=2, scheme="symmetric"), q)
    g = infer_grid(q=q[0], method="uniform", bits=2, scheme="symmetric")
    assert g.ok.all() and g.step.item() == pytest.approx(1 / 1.5)
    s_rederived, _ = kernels.quantization_params(q[0], bits=2, scheme="symmetric")
    assert s_rederived.item() == pytest.approx(g.step.item() * 4 / 3)


def test_grid_of_sign_and_ternary():
    w = torch.randn(1, 4, 50, generator=torch.Generator().manual_seed(3))
    for method, q in (("sign", binarize(w=w, axis=1)), ("ternary", ternarize(w=w, sparsity=0.4, axis=1))):
        g = infer_grid(q=q[0], method=method)
        assert g.ok.all()
        torch.testing.assert_close(g.step, q[0].abs().amax(dim=1).double())
        assert not infer_grid(q=w[0], method=method).ok.any()
    assert infer_grid(q=torch.zeros(2, 3), method="sign").step.tolist() == [0.0, 0.0]


def _moves_reference(q, grid, method):
    """Entry by entry, as the module docstring states the moves."""
    out = set()
    for r in range(q.shape[0]):
        s = float(grid.step[r])
        for c in range(q.shape[1]):
            v = float(q[r, c])
            if s == 0:
                continue
            if method == "uniform":
                code = round(v / s)
                for d in (1, -1):
                    if grid.lo[r] <= code + d <= grid.hi[r]:
                        out.add((r, c, round((code + d) * s, 9)))
            elif method == "sign" and v != 0:
                out.add((r, c, round(-v, 9)))
            elif method == "ternary":
                for nv in ((s, -s) if v == 0 else (0.0,)):
                    out.add((r, c, round(nv, 9)))
    return out


@HYP
@given(method=st.sampled_from(["uniform", "sign", "ternary"]), bits=st.integers(2, 4),
       scheme=st.sampled_from(["symmetric", "affine"]), seed=st.integers(0, 2 ** 31))
def test_neighbour_moves_match_reference(method, bits, scheme, seed):
    w = torch.randn(1, 3, 9, generator=torch.Generator().manual_seed(seed))
    w[0, 2] = 0.0  # a constant group: no moves for uniform and sign, both levels for ternary's zeros
    q = quantize_stacked(w=w, method=method, bits=bits, scheme=scheme, axis=1, ternary_sparsity=0.3)[0]
    g = infer_grid(q=q, method=method, bits=bits, scheme=scheme)
    row, col, val = neighbour_moves(q=q, grid=g, method=method)
    got = {(int(r), int(c), round(float(v), 9)) for r, c, v in zip(row, col, val)}
    assert got == _moves_reference(q, g, method) and len(got) == len(row)
    assert torch.all(row[1:] * q.shape[1] + col[1:] >= row[:-1] * q.shape[1] + col[:-1])  # entry order
    if method == "uniform":  # exactly one step, never outside the code range
        assert torch.allclose((val - q[row, col].double()).abs(), g.step[row], rtol=1e-6)
        assert infer_grid(q=torch.cat([q.double(), val[:, None].expand(-1, q.shape[1])]).float(), method=method,
                          bits=bits, scheme=scheme).ok[:q.shape[0]].all()


# ----------------------------------------------------------------------------- the seam
def test_signal_context_logits_seam():
    pop = planted_population(0)
    ctx = EstimatorContext(pop, ("params",))
    p = ctx.parameters()
    torch.testing.assert_close(ctx.logits(p), pop.logits())
    one = {k: v[3:4].double() for k, v in p.items()}
    x = pop.records.x[:5]
    out = ctx.logits(one, x, models=[3])
    assert out.shape == (1, 5, pop.records.n_classes) and out.dtype == torch.float64
    torch.testing.assert_close(out.float(), pop.logits()[3:4, :5], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="models has 8 entries but params hold 1 models"):
        ctx.logits(one)
    with pytest.raises(ValueError, match="params must hold exactly the tensors"):
        ctx.logits({"0.weight": p["0.weight"]})
    with pytest.raises(AccessError, match="without declaring 'params' access"):
        EstimatorContext(pop, ("logits",)).logits(p)


# ----------------------------------------------------------------------------- the plugin
@pytest.mark.parametrize("params,match", [
    ({"bits": 0}, "bits must be an integer in 1..16"),
    ({"method": "float"}, "method must be 'uniform', 'sign' or 'ternary'"),
    ({"scheme": "asym"}, "scheme must be 'symmetric' or 'affine'"),
    ({"ternary_sparsity": 1.0}, r"ternary_sparsity must be a number in \[0, 1\)"),
    ({"n_neighbours": 0}, "n_neighbours must be an integer >= 1"),
    ({"n_neighbours": True}, "n_neighbours must be an integer >= 1"),
    ({"confidence": 1.0}, r"confidence must be a number in \(0, 1\)"),
])
def test_validate_rejects(params, match):
    with pytest.raises(ValueError, match=match) as e:
        MISQuant(**params).validate()
    assert "\n" not in str(e.value)


def test_contract():
    out = check_estimator(MISQuant, params=FAST)
    assert 0 <= out["interval"][0] <= out["value"] <= out["interval"][1]  # expected one-step flips
    assert 0 <= out["implied_mis_union"] <= 1 and out["implied_mis_union"] == max(0.0, 1 - out["value"])
    assert "advantage_bound" not in out  # an asymptotic equivalent, not a bound
    check_estimator(MISQuant, params={**FAST, "method": "ternary", "granularity": "per-channel"})


def test_given_grid_versus_quantized_here():
    """After the quantize defense the estimator evaluates exactly the defended weights; on full
    precision it quantizes them itself with the same functions, to the same grid."""
    pop = planted_population(0)
    full = MISQuant(bits=3, **FAST).estimate(EstimatorContext(pop, ("params",)))
    Quantize(bits=3).apply(DefenseContext(pop))
    given_ = MISQuant(bits=3, **FAST).estimate(EstimatorContext(pop, ("params",)))
    assert {t["grid"] for t in full["tensors"].values()} == {"quantized here"}
    assert {t["grid"] for t in given_["tensors"].values()} == {"given (already quantized)"}
    assert full["tensors"] == {k: {**v, "grid": "quantized here"} for k, v in given_["tensors"].items()}
    assert full["n_r_per_model"] == pytest.approx(given_["n_r_per_model"], rel=1e-4)
    a = given_["per_model"][0]["argmin"]
    w = pop.params[a["tensor"]][0].reshape(-1)[a["index"]].item()
    assert a["from"] == pytest.approx(w, abs=1e-7)  # the defended weight, not a re-quantized one
    assert given_["neighbours"]["sampled_per_model"] == 12 and given_["n_r"] >= 0
    assert given_["implied_mis"] == pytest.approx(1 - math.exp(-given_["n_r"]))
    assert given_["value"] == given_["expected_flips"] == pytest.approx(float(np.median(given_["expected_flips_per_model"])))


def test_cli_run(tmp_path):
    res = CliRunner().invoke(mia_core.cli.main, [
        "eval", "--attack", "lira", "--defense", "quantize:bits=4", "--estimator", "mis-quant:bits=4,n_neighbours=16",
        "--dataset", "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6", "--epochs", "3",
        "--targets", "first:2", "-q", "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "mis-quant:bits=4,n_neighbours=16" in res.output and "advantage bound" in res.output


def test_expected_flips_are_the_sampled_sum_scaled_to_every_candidate_and_fall_with_coarser_grids():
    """With every candidate sampled, F_m is exactly sum_k exp(-n_m r_k) over the neighbours (checked
    against the per-model minimum: the sum is at least its largest term exp(-n_m r_min)); a coarser
    grid moves each weight further, so fewer flips are expected."""
    pop = planted_population(0)
    ctx = EstimatorContext(pop, ("params",))
    fine = MISQuant(bits=8, n_neighbours=10_000).estimate(ctx)
    coarse = MISQuant(bits=2, n_neighbours=10_000).estimate(ctx)
    for out in (fine, coarse):
        assert out["neighbours"]["sampled_per_model"] < 10_000  # every candidate of every model sampled
        for f, nr in zip(out["expected_flips_per_model"], out["n_r_per_model"]):
            assert f >= math.exp(-nr) * (1 - 1e-9)
    assert coarse["value"] < fine["value"]
