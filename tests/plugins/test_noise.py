"""The noise defense: the Gaussian mechanism's sigma (formula and the exact privacy profile), the
noise's scale, per-model streams independent of the population's size, validation, the report,
conformance and the CLI."""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from mia_core.base import Defense
from mia_core.engine import DefenseContext
from mia_core.testing import check_defense
from mia_plugins.defenses.noise import (
    DEFAULT_SIGMA,
    NOISE_SALT,
    SENSITIVITY_NOTE,
    ParameterNoise,
    add_parameter_noise,
    gaussian_mechanism_sigma,
    model_noise_generators,
)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
EPS = st.floats(1e-6, 1.0, exclude_max=True)
DELTA = st.floats(1e-15, 1.0, exclude_max=True)
SENS = st.floats(1e-6, 1e6)


def _exact_delta(*, epsilon: float, sigma: float, sensitivity: float) -> float:
    """The smallest δ for which N(0, σ²) noise on an L2-sensitivity-Δ release is (ε, δ)-DP
    (Balle & Wang 2018, Theorem 8): Φ(Δ/2σ − εσ/Δ) − e^ε Φ(−Δ/2σ − εσ/Δ). Independent of
    Dwork & Roth's sufficient condition that Proposition 1 uses."""
    a, b = sensitivity / (2 * sigma), epsilon * sigma / sensitivity
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    return phi(a - b) - math.exp(epsilon) * phi(-a - b)


# ----------------------------------------------------------------------------- gaussian_mechanism_sigma
def test_sigma_formula_by_hand():
    # sqrt(2 ln(1.25 / 1e-5)) = sqrt(2 * 11.736...) = 4.8448...
    assert gaussian_mechanism_sigma(epsilon=0.5, delta=1e-5, sensitivity=1.0) == pytest.approx(9.68961, rel=1e-5)
    assert gaussian_mechanism_sigma(epsilon=0.1, delta=0.5, sensitivity=2.0) == pytest.approx(
        math.sqrt(2 * math.log(2.5)) * 20, rel=1e-12)


@SETTINGS
@given(eps=EPS, delta=DELTA, sens=SENS)
def test_sigma_matches_the_formula_and_scales(eps, delta, sens):
    s = gaussian_mechanism_sigma(epsilon=eps, delta=delta, sensitivity=sens)
    assert s > 0 and math.isfinite(s)
    assert s == pytest.approx(math.sqrt(2 * math.log(1.25 / delta)) * sens / eps, rel=1e-12)
    assert gaussian_mechanism_sigma(epsilon=eps, delta=delta, sensitivity=3 * sens) == pytest.approx(3 * s, rel=1e-12)
    assert gaussian_mechanism_sigma(epsilon=eps / 2, delta=delta, sensitivity=sens) == pytest.approx(2 * s, rel=1e-12)
    assert gaussian_mechanism_sigma(epsilon=eps, delta=delta / 2, sensitivity=sens) > s  # smaller δ, more noise


@SETTINGS
@given(eps=EPS, delta=st.floats(1e-12, 0.999), sens=st.floats(1e-3, 1e3))
def test_sigma_gives_the_guarantee_by_the_exact_privacy_profile(eps, delta, sens):
    """Numerical check: with σ from the formula, the exact δ(ε) of the Gaussian mechanism is <= δ."""
    s = gaussian_mechanism_sigma(epsilon=eps, delta=delta, sensitivity=sens)
    assert _exact_delta(epsilon=eps, sigma=s, sensitivity=sens) <= delta * (1 + 1e-9)


def test_why_epsilon_must_stay_below_one():
    """The classic formula is only a sufficient condition for ε < 1: at ε = 10 its σ is too small."""
    eps, delta = 10.0, 1e-6
    s = math.sqrt(2 * math.log(1.25 / delta)) / eps
    assert _exact_delta(epsilon=eps, sigma=s, sensitivity=1.0) > delta
    with pytest.raises(ValueError, match=r"epsilon must be in \(0, 1\), got 10.0: .*Thm A.1"):
        gaussian_mechanism_sigma(epsilon=eps, delta=delta, sensitivity=1.0)


@pytest.mark.parametrize("kw,msg", [
    ({"epsilon": 0.0}, "epsilon must be in"), ({"epsilon": 1.0}, "epsilon must be in"),
    ({"epsilon": -0.5}, "epsilon must be in"), ({"epsilon": float("nan")}, "epsilon must be in"),
    ({"delta": 0.0}, r"delta must be in \(0, 1\), got 0.0"), ({"delta": 1.0}, "delta must be in"),
    ({"delta": float("inf")}, "delta must be in"),
    ({"sensitivity": 0.0}, "sensitivity must be a finite number > 0"),
    ({"sensitivity": float("inf")}, "sensitivity must be"), ({"sensitivity": True}, "sensitivity must be"),
])
def test_sigma_rejects(kw, msg):
    args = {"epsilon": 0.5, "delta": 1e-5, "sensitivity": 1.0, **kw}
    with pytest.raises(ValueError, match=msg):
        gaussian_mechanism_sigma(**args)


# ----------------------------------------------------------------------------- add_parameter_noise
def _gens(n, seed=0):
    return model_noise_generators(root=np.random.SeedSequence(seed), n_models=n)


def test_noise_has_standard_deviation_sigma():
    """Each model's added noise: mean 0 and variance σ² within a two-sided χ² bound at 1e-6."""
    sigma = 0.07
    params = [torch.zeros(3, 60, 50), torch.zeros(3, 50)]
    norms = add_parameter_noise(params=params, sigma=sigma, generators=_gens(3))
    n = 60 * 50 + 50
    lo, hi = stats.chi2.ppf(1e-6, n), stats.chi2.ppf(1 - 1e-6, n)
    for m in range(3):
        w = torch.cat([p[m].flatten() for p in params]).double()
        ss = float(w.pow(2).sum())
        assert lo <= ss / sigma**2 <= hi
        assert abs(float(w.mean())) < 5 * sigma / math.sqrt(n)
        assert float(norms[m]) == pytest.approx(math.sqrt(ss), rel=1e-9)
    corr = np.corrcoef(torch.stack([torch.cat([p[m].flatten() for p in params]) for m in range(3)]).numpy())
    assert np.abs(corr[np.triu_indices(3, 1)]).max() < 5 / math.sqrt(n)  # independent across models


def test_zero_sigma_is_a_no_op():
    params = [torch.randn(2, 4, 3), torch.randn(2, 3)]
    before = [p.clone() for p in params]
    norms = add_parameter_noise(params=params, sigma=0.0, generators=_gens(2))
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and norms.tolist() == [0.0, 0.0]


def test_noise_is_deterministic_and_per_model():
    draws = []
    for _ in range(2):
        params = [torch.zeros(4, 5, 3)]
        add_parameter_noise(params=params, sigma=1.0, generators=_gens(4, seed=7))
        draws.append(params[0])
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0][0], draws[0][1])
    other = [torch.zeros(4, 5, 3)]
    add_parameter_noise(params=other, sigma=1.0, generators=_gens(4, seed=8))
    assert not torch.equal(other[0], draws[0])


def test_generators_do_not_depend_on_the_population_size():
    small, big = [torch.zeros(6, 9)], [torch.zeros(8, 9)]
    add_parameter_noise(params=small, sigma=1.0, generators=_gens(6))
    add_parameter_noise(params=big, sigma=1.0, generators=_gens(8))
    assert torch.equal(small[0], big[0][:6])


@pytest.mark.parametrize("kw,msg", [
    ({"sigma": -1.0}, "sigma must be a finite number >= 0"), ({"sigma": float("nan")}, "sigma must be"),
    ({"generators": "short"}, "need one generator per model: 2 models, 1 generators"),
    ({"params": [torch.zeros(2, 3, dtype=torch.int64)]}, "floating-point"),
    ({"params": [torch.zeros(2, 3), torch.zeros(3, 3)]}, "same model axis"),
])
def test_add_noise_rejects(kw, msg):
    args = {"params": [torch.zeros(2, 3)], "sigma": 0.1, "generators": _gens(2), **kw}
    if args["generators"] == "short":
        args["generators"] = _gens(1)
    with pytest.raises(ValueError, match=msg):
        add_parameter_noise(**args)


# ----------------------------------------------------------------------------- the defense
def _fake_population(m, seed=0):
    """What DefenseContext reads of a population: the stacked parameters and the run seed."""
    g = torch.Generator().manual_seed(123)
    params = {"0.weight": torch.randn(8, 5, 4, generator=g)[:m].clone(),
              "0.bias": torch.randn(8, 5, generator=g)[:m].clone(),
              "2.weight": torch.randn(8, 3, 5, generator=g)[:m].clone()}
    return types.SimpleNamespace(params=params, seed=seed)


def _noise_of(m, defense, *, seed=0, position=0):
    pop = _fake_population(m, seed)
    before = {k: v.clone() for k, v in pop.params.items()}
    report = defense.apply(DefenseContext(pop, position=position))
    return {k: pop.params[k] - before[k] for k in before}, report


def test_noise_of_model_m_is_the_same_in_a_population_of_6_or_8():
    six, _ = _noise_of(6, ParameterNoise(sigma=0.5))
    eight, _ = _noise_of(8, ParameterNoise(sigma=0.5))
    for k in six:
        torch.testing.assert_close(six[k], eight[k][:6], rtol=0, atol=1e-6)  # θ + w − θ: float rounding only


def test_noise_depends_on_seed_and_position():
    base, _ = _noise_of(4, ParameterNoise(sigma=0.5))
    for kw in ({"seed": 1}, {"position": 1}):
        other, _ = _noise_of(4, ParameterNoise(sigma=0.5), **kw)
        assert not torch.allclose(base["0.weight"], other["0.weight"])
    pop = _fake_population(2)
    ctx = DefenseContext(pop)
    gens = model_noise_generators(root=ctx.rng(NOISE_SALT).bit_generator.seed_seq, n_models=2)
    expected = torch.randn(5, 4, generator=gens[1]) * 0.5  # documented: model m from its own stream
    before = pop.params["0.weight"][1].clone()
    ParameterNoise(sigma=0.5).apply(ctx)
    torch.testing.assert_close(pop.params["0.weight"][1] - before, expected, rtol=0, atol=1e-6)


def test_include_bias_false_leaves_1d_parameters():
    noise, report = _noise_of(4, ParameterNoise(sigma=0.5, include_bias=False))
    assert torch.equal(noise["0.bias"], torch.zeros_like(noise["0.bias"]))
    assert report["noised_tensors"] == ["0.weight", "2.weight"]
    assert report["noised_parameters_per_model"] == 35 and report["parameters_per_model"] == 40


def test_report_sigma_mode():
    pop = _fake_population(4)
    before = torch.cat([v.reshape(4, -1) for v in pop.params.values()], dim=1).double()
    report = ParameterNoise(sigma=0.2).apply(DefenseContext(pop))
    after = torch.cat([v.reshape(4, -1) for v in pop.params.values()], dim=1).double()
    assert report["sigma"] == 0.2 and report["sigma_from"] == "sigma" and "epsilon" not in report
    assert "no (epsilon, delta) guarantee" in report["note"]
    assert report["param_norm_before"] == pytest.approx(float(before.norm(dim=1).mean()), rel=1e-9)
    assert report["param_norm_after"] == pytest.approx(float(after.norm(dim=1).mean()), rel=1e-6)
    ratio = (after - before).norm(dim=1) / before.norm(dim=1)
    assert report["noise_to_signal"] == pytest.approx(float(ratio.mean()), rel=1e-5)
    assert report["noise_to_signal_max"] == pytest.approx(float(ratio.max()), rel=1e-5)
    assert report["noise_norm"] == pytest.approx(0.2 * math.sqrt(40), rel=0.3)
    json.dumps(report, allow_nan=False)


def test_report_gaussian_mechanism_mode():
    _, report = _noise_of(4, ParameterNoise(epsilon=0.5, delta=1e-5, sensitivity=0.01))
    assert report["sigma"] == pytest.approx(gaussian_mechanism_sigma(epsilon=0.5, delta=1e-5, sensitivity=0.01))
    assert (report["epsilon"], report["delta"], report["sensitivity"]) == (0.5, 1e-5, 0.01)
    assert report["note"] == SENSITIVITY_NOTE
    assert "miafw does not bound the sensitivity of training" in report["note"]
    assert report["sigma_from"].startswith("gaussian mechanism")


def test_defaults_use_the_default_sigma():
    _, report = _noise_of(4, ParameterNoise())
    assert report["sigma"] == DEFAULT_SIGMA and report["sigma_from"] == "default"


def test_zero_sigma_defense_is_identity():
    noise, report = _noise_of(4, ParameterNoise(sigma=0))
    assert all(not v.any() for v in noise.values())
    assert report["noise_to_signal"] == 0.0 and report["param_norm_before"] == report["param_norm_after"]


@pytest.mark.parametrize("kw,msg", [
    ({"sigma": 0.1, "epsilon": 0.5}, r"give either sigma or \(epsilon, delta, sensitivity\), not both: got sigma=0.1 "
                                     r"and epsilon=0.5"),
    ({"epsilon": 0.5}, "needs epsilon, delta and sensitivity together; missing delta, sensitivity"),
    ({"epsilon": 0.5, "delta": 1e-5}, "missing sensitivity"),
    ({"sigma": -0.1}, "sigma must be a finite number >= 0"),
    ({"sigma": float("inf")}, "sigma must be"),
    ({"sigma": "0.1"}, "sigma must be"),
    ({"epsilon": 2.0, "delta": 1e-5, "sensitivity": 1.0}, r"epsilon must be in \(0, 1\), got 2.0"),
    ({"epsilon": 0.5, "delta": 1.5, "sensitivity": 1.0}, r"delta must be in \(0, 1\), got 1.5"),
    ({"epsilon": 0.5, "delta": 1e-5, "sensitivity": -1.0}, "sensitivity must be a finite number > 0"),
    ({"epsilon": 0.5, "delta": 1e-5, "sensitivity": 1.0, "include_bias": False},
     "include_bias must be true with epsilon"),
    ({"include_bias": "yes"}, "include_bias must be true or false"),
])
def test_validate_rejects(kw, msg):
    with pytest.raises(ValueError, match=msg) as err:
        ParameterNoise(**kw).validate()
    assert "\n" not in str(err.value)


def test_no_parameters_to_noise():
    pop = types.SimpleNamespace(params={"b": torch.zeros(2, 3)}, seed=0)
    with pytest.raises(ValueError, match="no parameters to noise \\(set include_bias=true"):
        ParameterNoise(sigma=0.1, include_bias=False).apply(DefenseContext(pop))


def test_contract():
    d = ParameterNoise()
    assert isinstance(d, Defense) and d.stage == "post" and d.api_version == "1.0"
    assert d.get_params() == {"sigma": None, "epsilon": None, "delta": None, "sensitivity": None, "include_bias": True}
    assert "Farokhi" in d.reference and "Proposition 1" in d.reference and "Dwork" in d.reference
    assert ParameterNoise.__doc__.splitlines()[0].startswith("Gaussian noise added to every model's parameters")


@pytest.mark.parametrize("params", [{}, {"sigma": 0.0}, {"sigma": 0.05, "include_bias": False},
                                    {"epsilon": 0.9, "delta": 1e-5, "sensitivity": 0.005}])
def test_conforms(params):
    report = check_defense(ParameterNoise, params=params)
    assert report["sigma"] >= 0


def test_cli_end_to_end(tmp_path):
    from click.testing import CliRunner

    from mia_core.cli import main

    args = ["eval", "--attack", "lira", "--dataset", "digits:n_records=300", "--model", "mlp:width=32",
            "--defense", "noise:sigma=0.01", "--defense", "noise:epsilon=0.5,delta=1e-5,sensitivity=0.001",
            "--n-models", "6", "--epochs", "3", "--targets", "first:2", "-q",
            "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "defense noise: sigma=0.01, sigma_from=sigma, note=sigma given directly" in res.output
    assert "miafw does not bound the sensitivity of training" in res.output
    run = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir() and not d.name.startswith("."))
    reports = [d["report"] for d in json.loads((run / "metrics.json").read_text())["defenses"]]
    assert reports[0]["sigma"] == 0.01 and reports[1]["epsilon"] == 0.5
    bad = CliRunner().invoke(main, ["eval", "--defense", "noise:sigma=0.1,epsilon=0.5", "-q",
                                    "--out", str(tmp_path / "r2"), "--cache-dir", str(tmp_path / "c2")])
    assert bad.exit_code == 2 and "give either sigma or (epsilon, delta, sensitivity), not both" in bad.stderr
