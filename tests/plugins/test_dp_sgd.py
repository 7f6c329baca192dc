"""The dp-sgd train-time defense, checked against Opacus itself: the per-sample gradients the
trainer hands to the defense (GradSampleModule), the clipped sums and the whole step
(DPOptimizer with no noise), epsilon (RDPAccountant, PRVAccountant and the RDP analysis); then
the noise, the sampler, determinism, shards, validation, conformance and the CLI."""

from __future__ import annotations

import math
import types
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core.base import TrainingDefense
from mia_core.engine.samplers import FixedSizeSampler, PoissonSampler
from mia_core.engine.trainer import Trainer, TrainingRecipe, init_ensemble, make_keep_matrix
from mia_core.testing import check_defense
from mia_plugins.defenses.dp_sgd import (
    DPSGD,
    add_gaussian_noise_,
    clip_per_sample_,
    default_delta,
    noise_for_epsilon,
    privacy_spent,
    unsupported_layers,
)

opacus = pytest.importorskip("opacus")
from opacus import GradSampleModule  # noqa: E402
from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402
from opacus.accountants.analysis import rdp as rdp_analysis  # noqa: E402
from opacus.optimizers import DPOptimizer  # noqa: E402

D, C_OUT = 5, 3


def _build(hidden=8):
    return lambda: torch.nn.Sequential(torch.nn.Linear(D, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, C_OUT))


def _toy(m=2, n=14, hidden=8, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, D)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, C_OUT, size=n))
    keep = make_keep_matrix(m, n, np.random.default_rng(seed + 1))
    base, params, buffers = init_ensemble(_build(hidden), m, seed=3)
    return x, y, keep, base, params, buffers


def _module(params, m, hidden=8):
    """Model ``m`` of the stacked parameters as a plain torch module."""
    mod = _build(hidden)()
    mod.load_state_dict({k: v[m].detach().clone() for k, v in params.items()})
    return mod


class CapturePerSample(TrainingDefense):
    """Copies what ``transform_per_sample`` receives at the first step."""

    per_sample_gradients = True

    def __init__(self):
        pass

    def transform_per_sample(self, grads, mask, step):
        if step.step == 0:
            self.grads_ = {k: g.detach().clone() for k, g in grads.items()}
            self.mask_ = mask.clone()

    def report(self, result):
        return {}


class CaptureBatch(TrainingDefense):
    """Copies what ``transform_batch`` receives at the first step (after earlier defenses)."""

    def __init__(self):
        pass

    def transform_batch(self, grads, step):
        if step.step == 0:
            self.grads_ = {k: g.detach().clone() for k, g in grads.items()}
            self.denominator_ = step.denominator.clone()
            self.batch_sizes_ = step.batch_sizes.clone()

    def report(self, result):
        return {}


def _one_full_step(defenses, *, lr=1.0, hidden=8, m=2, n=14):
    """One SGD step (lr, no momentum) on every model's whole half: Poisson with q = 1 takes each
    model's training records once, in the order of its half."""
    x, y, keep, base, params, buffers = _toy(m=m, n=n, hidden=hidden)
    before = {k: v.detach().clone() for k, v in params.items()}
    recipe = TrainingRecipe(epochs=1, batch_size=n, lr=lr, optimizer="sgd", momentum=0.0)
    tr = Trainer(base, params, buffers, x, y, keep, recipe, seed=0, defenses=defenses, sampler=PoissonSampler(1.0))
    res = tr.fit()
    assert res.steps == 1
    return x, y, keep, before, params, res


# ----------------------------------------------------------------------------- (a) per-sample gradients
def test_per_sample_gradients_match_opacus_grad_sample():
    cap = CapturePerSample()
    x, y, keep, before, _, _ = _one_full_step([cap])
    assert len(set(keep.sum(axis=1).tolist())) == 2  # halves of 6 and 8 records: the smaller one is padded
    for m in range(keep.shape[0]):
        own = np.flatnonzero(keep[m])
        mod = _module(before, m)
        gsm = GradSampleModule(mod, loss_reduction="sum")
        torch.nn.functional.cross_entropy(gsm(x[own]), y[own], reduction="sum").backward()
        assert bool(cap.mask_[m, : own.size].all()) and not bool(cap.mask_[m, own.size:].any())
        for name, p in mod.named_parameters():
            ours = cap.grads_[name][m]
            torch.testing.assert_close(ours[: own.size], p.grad_sample, rtol=1e-5, atol=1e-6)
            assert bool((ours[own.size:] == 0).all())  # padding rows of the ragged batch


# ----------------------------------------------------------------------------- (b) clipped sums, one step
@pytest.mark.parametrize("c", [0.05, 0.5, 100.0])
def test_clipped_sum_and_step_match_opacus_dp_optimizer(c):
    cap = CaptureBatch()
    dp = DPSGD(noise_multiplier=0.0, max_grad_norm=c, sampling_rate=1.0)
    x, y, keep, before, after, _ = _one_full_step([dp, cap], lr=1.0)
    for m in range(keep.shape[0]):
        own = np.flatnonzero(keep[m])
        assert float(cap.denominator_[m]) == own.size  # q * n_m with q = 1
        # the summed clipped gradient (loss_reduction="sum": Opacus neither scales nor noises)
        mod = _module(before, m)
        gsm = GradSampleModule(mod, loss_reduction="sum")
        opt = DPOptimizer(torch.optim.SGD(mod.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=c,
                          expected_batch_size=own.size, loss_reduction="sum")
        torch.nn.functional.cross_entropy(gsm(x[own]), y[own], reduction="sum").backward()
        opt.pre_step()
        for name, p in mod.named_parameters():
            torch.testing.assert_close(cap.grads_[name][m], p.summed_grad, rtol=1e-5, atol=1e-6)
        # the whole step: Opacus' mean reduction divides by expected_batch_size, the trainer by q * n_m
        mod = _module(before, m)
        gsm = GradSampleModule(mod, loss_reduction="mean")
        opt = DPOptimizer(torch.optim.SGD(mod.parameters(), lr=1.0), noise_multiplier=0.0, max_grad_norm=c,
                          expected_batch_size=own.size, loss_reduction="mean")
        torch.nn.functional.cross_entropy(gsm(x[own]), y[own]).backward()
        opt.step()
        for name, p in mod.named_parameters():
            torch.testing.assert_close(after[name][m].detach(), p.detach(), rtol=1e-5, atol=1e-6)


def test_trainer_clips_every_sample_to_c():
    c = 0.3

    cap = CapturePerSample()  # after dp-sgd in the chain: sees the clipped gradients
    _one_full_step([DPSGD(noise_multiplier=0.0, max_grad_norm=c, sampling_rate=1.0), cap])
    g = cap.grads_
    m, b = next(iter(g.values())).shape[:2]
    norms = torch.sqrt(sum(t.reshape(m, b, -1).double().pow(2).sum(-1) for t in g.values()))
    assert bool((norms <= c * (1 + 1e-6)).all()) and float(norms.max()) > 0.99 * c


# ----------------------------------------------------------------------------- clipping (pure)
def _clip_reference(arrays, c):
    """Flat clipping in float64, per (model, sample), as Abadi et al. Algorithm 1 with Opacus' guard."""
    m, b = arrays[0].shape[:2]
    flat = np.concatenate([a.reshape(m, b, -1).astype(np.float64) for a in arrays], axis=-1)
    norms = np.sqrt((flat ** 2).sum(-1))
    factor = np.minimum(1.0, c / (norms + 1e-6))
    return [a * factor.reshape(m, b, *([1] * (a.ndim - 2))) for a in arrays], norms


@settings(max_examples=30, derandomize=True, deadline=None)
@given(m=st.integers(1, 3), b=st.integers(1, 5), shapes=st.lists(st.lists(st.integers(1, 3), min_size=0, max_size=2),
                                                              min_size=1, max_size=3),
       c=st.floats(1e-3, 10.0), scale=st.sampled_from([0.0, 1e-3, 1.0, 100.0]), seed=st.integers(0, 2**16))
def test_clip_matches_reference(m, b, shapes, c, scale, seed):
    rng = np.random.default_rng(seed)
    arrays = [rng.normal(size=(m, b, *s)) * scale for s in shapes]
    grads = {f"p{i}": torch.from_numpy(a.copy()) for i, a in enumerate(arrays)}  # clipped in place
    norms = clip_per_sample_(grads, max_grad_norm=c)
    ref, ref_norms = _clip_reference(arrays, c)
    np.testing.assert_allclose(norms.numpy(), ref_norms, rtol=1e-12, atol=1e-12)
    for i, r in enumerate(ref):
        np.testing.assert_allclose(grads[f"p{i}"].numpy(), r, rtol=1e-12, atol=1e-12)


def test_clip_edge_cases():
    g = {"w": torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]]])}  # norms 5, 0 (padding), 0.5
    norms = clip_per_sample_(g, max_grad_norm=1.0)
    assert norms[0].tolist() == pytest.approx([5.0, 0.0, 0.5])
    torch.testing.assert_close(g["w"], torch.tensor([[[0.6, 0.8], [0.0, 0.0], [0.3, 0.4]]]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no parameters"):
        clip_per_sample_({}, max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"expected \[1, 3, ...\]"):
        clip_per_sample_({"a": torch.zeros(1, 3, 2), "b": torch.zeros(1, 2)}, max_grad_norm=1.0)


# ----------------------------------------------------------------------------- noise
def _gens(seeds):
    out = []
    for s in seeds:
        g = torch.Generator()
        g.manual_seed(s)
        out.append(g)
    return out


def test_noise_is_per_model_stream_and_sigma_c():
    std = 0.7
    grads = {"w": torch.zeros(2, 100, 90), "b": torch.zeros(2, 1000)}
    add_gaussian_noise_(grads, std=std, generators=_gens([11, 22]))
    flat = torch.cat([grads["w"].reshape(2, -1), grads["b"]], dim=1)  # [2, 10000]
    for m, seed in enumerate([11, 22]):
        torch.testing.assert_close(flat[m], std * torch.randn(10000, generator=_gens([seed])[0]))
        assert float(flat[m].std()) == pytest.approx(std, rel=0.03)  # 10000 draws: sd of the sd ~0.7%
        assert abs(float(flat[m].mean())) < 4 * std / 100
    swapped = {"w": torch.zeros(2, 100, 90), "b": torch.zeros(2, 1000)}
    add_gaussian_noise_(swapped, std=std, generators=_gens([22, 11]))
    torch.testing.assert_close(swapped["w"][0], grads["w"][1])  # a model's noise follows its stream only
    g = _gens([5])
    zero = {"w": torch.ones(1, 3)}
    add_gaussian_noise_(zero, std=0.0, generators=g)
    assert zero["w"].tolist() == [[1.0, 1.0, 1.0]]
    assert torch.equal(torch.randn(3, generator=g[0]), torch.randn(3, generator=_gens([5])[0]))  # nothing drawn
    with pytest.raises(ValueError, match="one generator per model"):
        add_gaussian_noise_({"w": torch.zeros(2, 3)}, std=1.0, generators=_gens([1]))


def test_trainer_noise_has_std_sigma_c_per_coordinate():
    """Same seed, sigma = 0 and sigma = 1.5 (C = 0.4): the batches and clipped sums are the same, so
    the difference of what transform_batch leaves is the noise, N(0, (sigma C)^2) per coordinate."""
    sigma, c, hidden = 1.5, 0.4, 64
    sums = []
    for s in (0.0, sigma):
        cap = CaptureBatch()
        x, y, keep, base, params, buffers = _toy(m=4, n=40, hidden=hidden)
        recipe = TrainingRecipe(epochs=1, batch_size=8)
        Trainer(base, params, buffers, x, y, keep, recipe, seed=7,
                defenses=[DPSGD(noise_multiplier=s, max_grad_norm=c), cap]).fit()
        sums.append(torch.cat([g.reshape(4, -1) for g in cap.grads_.values()], dim=1))
    noise = (sums[1] - sums[0]).double()  # [4, 579]: 2316 coordinates
    assert float(noise.std()) == pytest.approx(sigma * c, rel=0.06)
    assert abs(float(noise.mean())) < 4 * sigma * c / math.sqrt(noise.numel())


# ----------------------------------------------------------------------------- (c) epsilon
@settings(max_examples=12, derandomize=True, deadline=None)
@given(sigma=st.floats(0.3, 5.0), q=st.floats(1e-3, 1.0), steps=st.integers(1, 1000),
       delta=st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_rdp_epsilon_equals_opacus(sigma, q, steps, delta):
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = privacy_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="rdp")
        assert ours == acc.get_epsilon(delta)
        # the RDP analysis itself (Mironov 2017, Prop. 3 via Opacus' conversion), not the accountant class
        orders = RDPAccountant.DEFAULT_ALPHAS
        rdp = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
        assert ours == pytest.approx(rdp_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0], rel=1e-12)


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.07, 840), (0.8, 0.25, 12)])
def test_prv_epsilon_equals_opacus(sigma, q, steps):
    acc = PRVAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    ours = privacy_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant="prv")
    assert ours == acc.get_epsilon(1e-5)
    assert ours <= privacy_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5) + 0.05  # PRV is tighter


def test_epsilon_edge_cases_and_noise_search():
    assert privacy_spent(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0
    assert privacy_spent(noise_multiplier=0.0, sample_rate=0.1, steps=5, delta=1e-5) == math.inf
    with pytest.raises(ValueError, match="accountant must be one of rdp, prv"):
        privacy_spent(noise_multiplier=1.0, sample_rate=0.1, steps=5, delta=1e-5, accountant="gdp")
    sigma = noise_for_epsilon(target_epsilon=2.0, delta=1e-5, sample_rate=0.05, steps=200)
    eps = privacy_spent(noise_multiplier=sigma, sample_rate=0.05, steps=200, delta=1e-5)
    assert 2.0 - 0.01 <= eps <= 2.0
    with pytest.raises(ValueError, match=r"target_epsilon=1e-09 cannot be reached at delta=1e-05"):
        noise_for_epsilon(target_epsilon=1e-9, delta=1e-5, sample_rate=1.0, steps=100)  # q = 1: closed-form RDP


@pytest.mark.parametrize("n,delta", [(1, 1e-5), (9, 1e-5), (898, 1e-5), (60000, 1e-5), (100000, 1e-5),
                                     (100001, 1e-6), (10**6, 1e-6), (3 * 10**6, 1e-7)])
def test_default_delta(n, delta):
    assert default_delta(n) == delta and default_delta(n) <= 1 / n


def test_report_epsilon_is_opacus_for_the_steps_taken():
    x, y, keep, base, params, buffers = _toy(m=4, n=60)
    dp = DPSGD(noise_multiplier=1.1, max_grad_norm=0.5)
    res = Trainer(base, params, buffers, x, y, keep, TrainingRecipe(epochs=3, batch_size=8), seed=0, defenses=[dp]).fit()
    rep = res.defenses[0]
    n_max = int(keep.sum(1).max())
    assert rep["sampling_rate"] == 8 / n_max and rep["steps"] == res.steps == 3 * round(n_max / 8)
    assert rep["delta"] == 1e-5 and rep["noise_std"] == pytest.approx(0.55) and rep["accountant"] == "rdp"
    acc = RDPAccountant()
    for _ in range(rep["steps"]):
        acc.step(noise_multiplier=rep["noise_multiplier"], sample_rate=rep["sampling_rate"])
    assert rep["epsilon"] == acc.get_epsilon(rep["delta"])
    assert 0 <= rep["clipped_fraction"] <= 1 and rep["grad_norm_mean"] > 0
    assert rep["expected_batch_size_max"] == pytest.approx(8.0)
    assert res.sampler == "poisson" and res.backward == "per-sample-norms"  # the MLP route: no per-sample tensors


def test_target_epsilon_is_reached():
    x, y, keep, base, params, buffers = _toy(m=2, n=60)
    dp = DPSGD(target_epsilon=3.0, delta=1e-4)
    rep = Trainer(base, params, buffers, x, y, keep, TrainingRecipe(epochs=4, batch_size=10), seed=0,
                  defenses=[dp]).fit().defenses[0]
    assert 3.0 - 0.01 <= rep["epsilon"] <= 3.0 and rep["target_epsilon"] == 3.0 and rep["delta"] == 1e-4


def test_no_noise_reports_no_finite_epsilon():
    x, y, keep, base, params, buffers = _toy(m=2, n=30)
    rep = Trainer(base, params, buffers, x, y, keep, TrainingRecipe(epochs=1, batch_size=10), seed=0,
                  defenses=[DPSGD(noise_multiplier=0.0)]).fit().defenses[0]
    assert rep["epsilon"] is None and "infinite" in rep["epsilon_note"]


# ----------------------------------------------------------------------------- the sampler and the denominator
@pytest.mark.parametrize("recipe_kw,dp_kw,q", [
    ({}, {}, None),  # batch_size over the largest half
    ({"sampler": "poisson", "sampling_rate": 0.2}, {}, 0.2),  # the recipe's Poisson rate
    ({"sampler": "poisson", "sampling_rate": 0.2}, {"sampling_rate": 0.5}, 0.5),  # the defense's wins
])
def test_poisson_rate_and_denominator(recipe_kw, dp_kw, q):
    x, y, keep, base, params, buffers = _toy(m=4, n=50)
    recipe = TrainingRecipe(epochs=1, batch_size=6, **recipe_kw)
    tr = Trainer(base, params, buffers, x, y, keep, recipe, seed=0, defenses=[DPSGD(**dp_kw)])
    sizes = keep.sum(axis=1)
    q = 6 / sizes.max() if q is None else q
    assert isinstance(tr.sampler, PoissonSampler) and tr.sampling_rate == pytest.approx(q)
    # Opacus divides by the expected batch size q * N of each model's data set
    np.testing.assert_allclose(tr.denominator.numpy(), q * sizes, rtol=1e-6)


def test_a_later_sampler_change_is_refused():
    class Fixed(TrainingDefense):
        def __init__(self):
            pass

        def configure(self, ctx):
            ctx.sampler = FixedSizeSampler(4)

        def report(self, result):
            return {}

    x, y, keep, base, params, buffers = _toy(m=2, n=30)
    tr = Trainer(base, params, buffers, x, y, keep, TrainingRecipe(epochs=1, batch_size=4), seed=0,
                 defenses=[DPSGD(), Fixed()])
    with pytest.raises(ValueError, match="replaced the batch sampler"):
        tr.fit()


# ----------------------------------------------------------------------------- determinism, shards
def test_deterministic_and_shard_invariant():
    x, y, keep, base, params, buffers = _toy(m=4, n=60, hidden=16)
    recipe = TrainingRecipe(epochs=2, batch_size=8)
    runs = []
    for _ in range(2):
        p = {k: v.detach().clone() for k, v in params.items()}
        rep = Trainer(base, p, buffers, x, y, keep, recipe, seed=5, defenses=[DPSGD(noise_multiplier=1.0)]).fit()
        runs.append((p, rep.defenses[0]))
    assert runs[0][1] == runs[1][1]
    for k in params:
        assert torch.equal(runs[0][0][k], runs[1][0][k])
    # models 2 and 3 trained alone (a shard) get the same batches and noise as in the ensemble
    shard = {k: v[2:].detach().clone() for k, v in params.items()}
    Trainer(base, shard, buffers, x, y, keep[2:], recipe, seed=5, model_ids=[2, 3], epoch_size=int(keep.sum(1).max()),
            defenses=[DPSGD(noise_multiplier=1.0)]).fit()
    for k in params:
        torch.testing.assert_close(shard[k], runs[0][0][k][2:], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- layers without per-sample gradients
def test_unsupported_layers_fail_in_configure():
    bn = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    drop = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 3))
    inorm = torch.nn.Sequential(torch.nn.InstanceNorm1d(4, track_running_stats=True))
    ok = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    assert unsupported_layers(ok) == [] and unsupported_layers(_build()()) == []
    assert unsupported_layers(bn)[0].startswith("1 (BatchNorm1d): batch normalisation")
    assert "dropout" in unsupported_layers(drop)[0] and "running statistics" in unsupported_layers(inorm)[0]
    ctx = types.SimpleNamespace(module=bn.to("meta"))
    with pytest.raises(ValueError, match=r"^dp-sgd needs per-sample gradients, which layer 1 \(BatchNorm1d\)") as exc:
        DPSGD().configure(ctx)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------- validation, contract
@pytest.mark.parametrize("kw,match", [
    ({"noise_multiplier": -0.1}, r"noise_multiplier must be a finite number >= 0 \(sigma\), got -0.1"),
    ({"noise_multiplier": float("nan")}, "noise_multiplier must be"),
    ({"noise_multiplier": True}, "noise_multiplier must be"),
    ({"target_epsilon": 0.0}, "target_epsilon must be a finite number > 0, got 0.0"),
    ({"target_epsilon": float("inf")}, "target_epsilon must be"),
    ({"noise_multiplier": 1.0, "target_epsilon": 2.0}, "give noise_multiplier or target_epsilon, not both"),
    ({"max_grad_norm": 0.0}, r"max_grad_norm must be a finite number > 0 \(the clipping norm C\), got 0.0"),
    ({"max_grad_norm": "1"}, "max_grad_norm must be"),
    ({"delta": 1.0}, r"delta must be in \(0, 1\) or none"),
    ({"delta": 0.0}, "delta must be"),
    ({"sampling_rate": 0.0}, r"sampling_rate must be in \(0, 1\] or none"),
    ({"sampling_rate": 1.5}, "sampling_rate must be"),
    ({"accountant": "gdp"}, "accountant must be one of rdp, prv, got 'gdp'"),
])
def test_validate_rejects(kw, match):
    with pytest.raises(ValueError, match=match):
        DPSGD(**kw).validate()


def test_contract():
    dp = DPSGD()
    assert isinstance(dp, TrainingDefense) and dp.stage == "train" and dp.api_version == "1.0"
    assert dp.per_sample_gradients
    assert dp.get_params() == {"noise_multiplier": None, "target_epsilon": None, "max_grad_norm": 1.0,
                               "delta": None, "sampling_rate": None, "accountant": "rdp"}
    for ref in ("Abadi", "Algorithm 1", "Mironov", "Gopi"):
        assert ref in dp.reference
    DPSGD(noise_multiplier=0).validate()
    DPSGD(sampling_rate=1, delta=1e-6, accountant="prv", target_epsilon=1).validate()


@pytest.mark.parametrize("params", [{}, {"target_epsilon": 4.0, "max_grad_norm": 0.5}])
def test_conformance(params):
    rep = check_defense(DPSGD, params=params)
    assert rep["epsilon"] > 0 and rep["steps"] > 0


def test_cli_end_to_end(tmp_path):
    from click.testing import CliRunner

    import mia_core.cli

    res = CliRunner().invoke(mia_core.cli.main, [
        "eval", "--attack", "lira", "--defense", "dp-sgd:target_epsilon=8", "--n-models", "6", "--epochs", "3",
        "--targets", "first:2", "-q", "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "defense dp-sgd (train-time): epsilon=" in res.output and "accountant=rdp" in res.output


def test_a_model_without_per_sample_gradients_is_refused_before_training(tmp_path, monkeypatch):
    """One clear line and exit status 2, before anything trains (nothing written, nothing cached)."""
    from click.testing import CliRunner
    from torch import nn

    from mia_core import registry
    from mia_core.base import ModelFamily
    from mia_core.cli import main

    class BatchNormMLP(ModelFamily):
        api_version = "1.0"

        def __init__(self):
            pass

        def build(self, n_features, n_classes):
            return nn.Sequential(nn.Linear(n_features, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, n_classes))

    real = registry.load
    monkeypatch.setattr(registry, "load", lambda kind, name: BatchNormMLP if (kind, name) == ("models", "bn-mlp")
                        else real(kind, name))
    res = CliRunner().invoke(main, ["eval", "--attack", "loss", "--defense", "dp-sgd", "--model", "bn-mlp",
                                    "--dataset", "digits:n_records=200", "--n-models", "4", "-q",
                                    "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("Error: defense 'dp-sgd' cannot apply to model 'bn-mlp': dp-sgd needs per-sample gradients")
    assert "\n" not in err and "BatchNorm" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_fine_tuning_after_dp_sgd_is_composed_into_epsilon():
    """prune's fine-tuning runs more noisy steps under dp-sgd: its ε is composed over training and
    fine-tuning (at one σ, the accountant over all 15 steps), the DP audit checks the composed ε, and
    the training-only value is kept."""
    import mia_core
    from mia_core.schema import validate_metrics
    from mia_plugins.defenses.dp_sgd import composed_privacy_spent, privacy_spent

    cfg = mia_core.EvalConfig(dataset="digits:n_records=300", model="mlp:width=32", n_models=6, attacks=("loss",),
                              defenses=("dp-sgd:noise_multiplier=1.0", "prune:sparsity=0.5,finetune_epochs=2"),
                              recipe=mia_core.TrainingRecipe(epochs=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", mia_core.engine.stages.EvaluationWarning)  # nothing is left out
        doc = mia_core.evaluate(cfg).metrics
    dp = next(d for d in doc["defenses"] if d["name"] == "dp-sgd")["report"]
    assert dp["steps"] == 9 and dp["steps_finetuning"] == 6 and dp["finetuning_runs"] == 1
    expected = max(privacy_spent(noise_multiplier=1.0, sample_rate=r, steps=15, delta=dp["delta"])
                   for r in dp["sampling_rates"])
    assert dp["epsilon"] == pytest.approx(expected, rel=1e-9) and dp["epsilon"] > dp["epsilon_training_only"]
    assert doc["dp_audit"]["accountant_epsilon"] == dp["epsilon"]
    validate_metrics(doc)
    # different noise per segment composes in order, between the two single-σ values
    a = composed_privacy_spent(segments=[(1.0, 0.1, 20), (2.0, 0.1, 20)], delta=1e-5)
    lo = privacy_spent(noise_multiplier=2.0, sample_rate=0.1, steps=40, delta=1e-5)
    hi = privacy_spent(noise_multiplier=1.0, sample_rate=0.1, steps=40, delta=1e-5)
    assert lo < a < hi
    assert composed_privacy_spent(segments=[(1.0, 0.1, 5), (0.0, 0.1, 1)], delta=1e-5) == math.inf


def test_an_epsilon_a_defense_cannot_compose_is_flagged():
    """A train-time defense that reports an ε but cannot compose fine-tuning into it: the engine says
    how many steps its ε leaves out, in its report, the DP audit and a warning."""
    import mia_core
    from mia_core.engine.stages import _flag_unaccounted_finetuning

    doc = {"defenses": [{"name": "mydp", "stage": "train", "report": {"epsilon": 2.0, "delta": 1e-5, "steps": 9}}],
           "warnings": [], "dp_audit": {"accountant_epsilon": 2.0}}
    plan = types.SimpleNamespace(post_defenses=[types.SimpleNamespace(label="prune:finetune_epochs=2")])
    with pytest.warns(mia_core.engine.stages.EvaluationWarning, match="fine-tuned every model for 6 more steps"):
        _flag_unaccounted_finetuning(plan, doc, 6)
    assert doc["defenses"][0]["report"]["epsilon_excludes_finetuning_steps"] == 6
    assert doc["dp_audit"]["accountant_epsilon_excludes_finetuning_steps"] == 6 and len(doc["warnings"]) == 1


# ----------------------------------------------------------------------------- the route without per-sample gradients
@pytest.mark.parametrize("layers", [
    lambda: [torch.nn.Linear(D, 8), torch.nn.ReLU(), torch.nn.Linear(8, C_OUT)],
    lambda: [torch.nn.Linear(D, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 7), torch.nn.GELU(),
             torch.nn.Linear(7, C_OUT, bias=False)],
], ids=["relu", "tanh-gelu-nobias"])
@pytest.mark.parametrize("c", [0.05, 1.0, 100.0])
def test_rescaled_grads_equal_clipping_materialised_per_sample_gradients(layers, c):
    """StackedSequential.rescaled_grads (norms from ‖δ‖·‖a‖, one GEMM per layer) against
    per-sample gradients from torch.func, clipped by clip_per_sample_ and summed."""
    from mia_core.engine.ensemble import StackedSequential, Workspace, per_sample_gradients
    from mia_plugins.defenses.dp_sgd import clip_factors

    torch.manual_seed(0)
    base, params, buffers = init_ensemble(lambda: torch.nn.Sequential(*layers()), 3, seed=1)
    x = torch.randn(3, 9, D)
    y = torch.randint(0, C_OUT, (3, 9))
    weight = (torch.rand(3, 9) < 0.7).float()  # ragged: zero rows are padding
    fwd = StackedSequential.for_module(base)
    loss, grads, norms = fwd.rescaled_grads(params, x, y, weight, lambda n: clip_factors(n, max_grad_norm=c),
                                            Workspace())
    ref, values = per_sample_gradients(base, params, buffers, x, y, weight)
    ref = {k: v.detach().clone() for k, v in ref.items()}
    ref_norms = clip_per_sample_(ref, max_grad_norm=c)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-6)
    for k in params:
        torch.testing.assert_close(grads[k], ref[k].sum(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss * weight, values.detach(), rtol=1e-5, atol=1e-6)


def test_both_routes_train_the_same_models_and_report_the_same_clipping():
    """dp-sgd with noise for three epochs: the route without per-sample gradients and the
    torch.func route (forced with manual_backward=False) agree."""
    out = []
    for manual in (True, False):
        x, y, keep, base, params, buffers = _toy(m=4, n=60)
        dp = DPSGD(noise_multiplier=1.0, max_grad_norm=0.5)
        res = Trainer(base, params, buffers, x, y, keep, TrainingRecipe(epochs=3, batch_size=8), seed=0,
                      defenses=[dp], manual_backward=manual).fit()
        out.append((params, res))
    (p1, r1), (p2, r2) = out
    assert (r1.backward, r2.backward) == ("per-sample-norms", "per-sample")
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-5)
    d1, d2 = r1.defenses[0], r2.defenses[0]
    assert d1["clipped_fraction"] == d2["clipped_fraction"] and d1["epsilon"] == d2["epsilon"]
    assert d1["grad_norm_mean"] == pytest.approx(d2["grad_norm_mean"], rel=1e-5)
