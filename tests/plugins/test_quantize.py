"""The quantize defense: its pure functions against straightforward references (hypothesis),
per-model independence, zeros kept through pruning, validation, plan errors, the contract and
one CLI run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import mia_core.cli
from mia_core import kernels
from mia_core.data import Records
from mia_core.engine import DefenseContext, ModelPopulation
from mia_core.engine.trainer import TrainingRecipe
from mia_core.testing import check_defense
from mia_plugins.defenses.prune import Prune
from mia_plugins.defenses.quantize import (
    FLOAT_BITS,
    TERNARY_BITS,
    Quantize,
    StoredTensor,
    binarize,
    count_levels,
    effective_bits,
    model_bytes,
    quantize_tensor,
    ternarize,
)

HYP = settings(max_examples=25, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------- references
def rows(w, axis):
    """The (model, channel) groups of stacked ``w`` as a list of 1-D tensors, in row order."""
    if axis is None:
        return [w[m].reshape(-1) for m in range(w.shape[0])]
    return [w[m].select(axis - 1, c).reshape(-1) for m in range(w.shape[0]) for c in range(w.shape[axis])]


def ref_params(r, bits, scheme):
    """The documented min-max formula, written out (float64, scale rounded to float32)."""
    if scheme == "symmetric":
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2 ** bits - 1
    mn = min(float(r.min()), 0.0) if r.numel() else 0.0
    mx = max(float(r.max()), 0.0) if r.numel() else 0.0
    if scheme == "symmetric":
        s = max(max(-mn, mx) / ((qmax - qmin) / 2), 2.0 ** -23)
        s = float(np.float32(s))
        return s, 0, qmin, qmax
    s = float(np.float32(max((mx - mn) / (qmax - qmin), 2.0 ** -23)))
    z = int(min(max(qmin - np.round(mn / s), qmin), qmax))  # np.round: half to even
    return s, z, qmin, qmax


def ref_quantize(w, bits, scheme, axis, mask=None):
    """Per group: torch.fake_quantize_per_tensor_affine with the reference parameters."""
    x = w if mask is None else w.masked_fill(~mask, 0)
    out = torch.empty_like(x)
    view = [out[m].reshape(-1) if axis is None else None for m in range(w.shape[0])]
    for m in range(w.shape[0]):
        chans = [None] if axis is None else range(w.shape[axis])
        for c in chans:
            r = x[m].reshape(-1) if c is None else x[m].select(axis - 1, c)
            s, z, qmin, qmax = ref_params(r.reshape(-1), bits, scheme)
            q = torch.fake_quantize_per_tensor_affine(r, s, z, qmin, qmax)
            if c is None:
                view[m].copy_(q.reshape(-1))
            else:
                out[m].select(axis - 1, c).copy_(q)
    return out


def ref_ternary(w, sparsity, axis, mask=None):
    x = w if mask is None else w.masked_fill(~mask, 0)
    out = torch.empty_like(x)
    for m in range(w.shape[0]):
        for c in ([None] if axis is None else range(w.shape[axis])):
            r = (x[m] if c is None else x[m].select(axis - 1, c)).reshape(-1).numpy()
            dropped = np.zeros(r.shape, bool) if mask is None else \
                ~(mask[m] if c is None else mask[m].select(axis - 1, c)).reshape(-1).numpy()
            k = int(round(sparsity * r.size))
            zero = np.zeros(r.shape, bool)
            zero[np.argsort(np.abs(r), kind="stable")[:k]] = True
            zero |= dropped
            s = np.float32(np.abs(r[~zero].astype(np.float64)).mean()) if (~zero).any() else np.float32(0)
            res = torch.from_numpy(np.where(zero, np.float32(0), np.where(r < 0, -s, s)).astype(np.float32))
            if c is None:
                out[m].copy_(res.reshape(out[m].shape))
            else:
                out[m].select(axis - 1, c).copy_(res)
    return out


def ref_sign(w, axis, mask=None):
    out = torch.empty_like(w)
    for m in range(w.shape[0]):
        for c in ([None] if axis is None else range(w.shape[axis])):
            r = (w[m] if c is None else w[m].select(axis - 1, c)).reshape(-1).numpy()
            keep = np.ones(r.shape, bool) if mask is None else \
                (mask[m] if c is None else mask[m].select(axis - 1, c)).reshape(-1).numpy()
            s = np.float32(np.abs(r[keep].astype(np.float64)).mean()) if keep.any() else np.float32(0)
            res = torch.from_numpy(np.where(keep, np.where(r < 0, -s, s), np.float32(0)).astype(np.float32))
            if c is None:
                out[m].copy_(res.reshape(out[m].shape))
            else:
                out[m].select(axis - 1, c).copy_(res)
    return out


# ----------------------------------------------------------------------------- strategies
@st.composite
def stacked(draw, min_dims=3):
    """A float32 stacked tensor [M, A, B] (or [M, A]) with some exact zeros, and a channel axis."""
    m = draw(st.integers(1, 3))
    shape = (m, draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    if min_dims == 2 and draw(st.booleans()):
        shape = shape[:2]
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    w = torch.randn(shape, generator=g) * scale
    zero_frac = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    w[torch.rand(shape, generator=g) < zero_frac] = 0.0
    axis = draw(st.sampled_from([None, 1, 2])) if len(shape) == 3 else None
    return w, axis


SCHEME_BITS = st.one_of(st.tuples(st.just("symmetric"), st.integers(2, 8)),
                        st.tuples(st.just("affine"), st.integers(1, 8)))


# ----------------------------------------------------------------------------- uniform
@HYP
@given(stacked(min_dims=2), SCHEME_BITS)
def test_quantize_tensor_matches_reference_and_bounds(wa, sb):
    w, axis = wa
    scheme, bits = sb
    q = quantize_tensor(w=w, bits=bits, scheme=scheme, axis=axis)
    assert torch.equal(q, ref_quantize(w, bits, scheme, axis))
    assert int(count_levels(w=q, axis=axis).max()) <= 2 ** bits
    assert torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))  # zeros kept, both schemes
    for r_w, r_q in zip(rows(w, axis), rows(q, axis)):  # error <= s/2 (nearest, nothing clipped)
        s = ref_params(r_w, bits, scheme)[0]
        assert float((r_q - r_w).abs().max()) <= s / 2 * (1 + 1e-5) + 1e-30


@HYP
@given(stacked(min_dims=2), SCHEME_BITS)
def test_requantizing_with_the_same_parameters_is_the_identity(wa, sb):
    w, axis = wa
    scheme, bits = sb
    q = quantize_tensor(w=w, bits=bits, scheme=scheme, axis=axis)
    for r_w, r_q in zip(rows(w, axis), rows(q, axis)):
        s, z, qmin, qmax = ref_params(r_w, bits, scheme)
        assert torch.equal(kernels.fake_quantize(r_q.contiguous(), bits=bits, scheme=scheme, scale=s,
                                                 zero_point=z), r_q)


def test_requantizing_with_derived_parameters_moves_the_scale():
    # documented: the symmetric range puts the negative extreme at a half step (-1.5 -> -2).
    q = quantize_tensor(w=torch.tensor([[-1.0, 0.3]]), bits=2)
    assert q.tolist() == [[pytest.approx(-4 / 3), 0.0]]
    assert quantize_tensor(w=q, bits=2).tolist() == [[pytest.approx(-16 / 9), 0.0]]


@HYP
@given(stacked(), SCHEME_BITS, st.booleans())
def test_every_model_is_quantized_on_its_own(wa, sb, stochastic):
    w, axis = wa
    scheme, bits = sb
    kw = dict(bits=bits, scheme=scheme, axis=axis)
    if stochastic:
        seeds = [11 * m + 3 for m in range(w.shape[0])]
        full = quantize_tensor(w=w, rounding="stochastic", seed=seeds, **kw)
        as_int = [3 + m for m in range(w.shape[0])]  # an int seed s gives model m the seed s + m
        assert torch.equal(quantize_tensor(w=w, rounding="stochastic", seed=3, **kw),
                           quantize_tensor(w=w, rounding="stochastic", seed=as_int, **kw))
    else:
        full = quantize_tensor(w=w, **kw)
    for m in range(w.shape[0]):
        extra = dict(rounding="stochastic", seed=[seeds[m]]) if stochastic else {}
        assert torch.equal(quantize_tensor(w=w[m:m + 1], **kw, **extra), full[m:m + 1])
    for fn in (lambda x: binarize(w=x, axis=axis), lambda x: ternarize(w=x, sparsity=0.4, axis=axis)):
        full = fn(w)
        for m in range(w.shape[0]):
            assert torch.equal(fn(w[m:m + 1]), full[m:m + 1])


@HYP
@given(stacked(min_dims=2), SCHEME_BITS, st.integers(0, 2 ** 40))
def test_stochastic_rounding_picks_a_neighbouring_level(wa, sb, seed):
    w, axis = wa
    scheme, bits = sb
    q = quantize_tensor(w=w, bits=bits, scheme=scheme, axis=axis, rounding="stochastic", seed=seed)
    assert torch.equal(q, quantize_tensor(w=w, bits=bits, scheme=scheme, axis=axis, rounding="stochastic", seed=seed))
    assert torch.equal(q[w == 0], torch.zeros_like(q[w == 0]))
    for r_w, r_q in zip(rows(w, axis), rows(q, axis)):
        s, z, qmin, qmax = ref_params(r_w, bits, scheme)
        y = r_w.double() / s
        lo = (torch.floor(y).clamp(qmin - z, qmax - z)) * s
        hi = (torch.ceil(y).clamp(qmin - z, qmax - z)) * s
        tol = 1e-6 * (r_q.double().abs() + s)  # float32 products (c - z) * s
        ok = ((r_q.double() - lo).abs() <= tol) | ((r_q.double() - hi).abs() <= tol)
        assert bool(ok.all())


def test_stochastic_rounding_is_unbiased_on_average():
    w = torch.full((1, 20000), 0.3)
    w[0, 0] = 1.0  # scale: 1 / 127.5 at 8 bits
    q = quantize_tensor(w=w, bits=8, rounding="stochastic", seed=5)
    near = quantize_tensor(w=w, bits=8)
    assert len(set(q[0, 1:].tolist())) == 2
    assert abs(float(q[0, 1:].mean()) - 0.3) < 2e-4 < abs(float(near[0, 1]) - 0.3)


@HYP
@given(stacked(), SCHEME_BITS)
def test_mask_keeps_dropped_entries_at_zero(wa, sb):
    w, axis = wa
    scheme, bits = sb
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(w.numel())) < 0.6
    q = quantize_tensor(w=w, bits=bits, scheme=scheme, axis=axis, mask=mask)
    assert torch.equal(q, ref_quantize(w, bits, scheme, axis, mask=mask))
    assert bool((q[~mask] == 0).all())


# ----------------------------------------------------------------------------- sign, ternary
@HYP
@given(stacked(min_dims=2), st.booleans())
def test_binarize_keeps_signs_with_mean_abs_scale(wa, masked):
    w, axis = wa
    mask = (w != 0) if masked else None
    q = binarize(w=w, axis=axis, mask=mask)
    torch.testing.assert_close(q, ref_sign(w, axis, mask), rtol=1e-6, atol=0)
    nz = w != 0
    assert torch.equal(torch.sign(q[nz]), torch.sign(w[nz]))
    assert int(count_levels(w=q, axis=axis).max()) <= (3 if masked else 2)
    if masked:
        assert bool((q[~nz] == 0).all())


@HYP
@given(stacked(min_dims=2), st.sampled_from([0.0, 0.1, 1 / 3, 0.5, 0.9]), st.booleans())
def test_ternarize_reaches_sparsity_and_keeps_signs(wa, sparsity, masked):
    w, axis = wa
    mask = None
    if masked:
        mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(7)) < 0.5
    q = ternarize(w=w, sparsity=sparsity, axis=axis, mask=mask)
    ref = ref_ternary(w, sparsity, axis, mask)
    assert torch.equal(q == 0, ref == 0)
    torch.testing.assert_close(q, ref, rtol=1e-6, atol=0)
    nz = q != 0
    assert torch.equal(torch.sign(q[nz]), torch.sign(w[nz]))
    assert int(count_levels(w=q, axis=axis).max()) <= 3
    if mask is None:
        for r_w, r_q in zip(rows(w, axis), rows(q, axis)):
            n = r_w.numel()
            if bool((r_w != 0).all()):  # kept zeros would be +s: count only for nonzero data
                assert abs(float((r_q == 0).float().mean()) - sparsity) <= 1 / n
    else:
        assert bool((q[~mask] == 0).all())


def test_ternarize_with_a_mask_sparser_than_the_target():
    w = torch.tensor([[[0.0, 0.0, 0.0, -2.0, 4.0, 0.5]]])
    q = ternarize(w=w, sparsity=0.25, mask=w != 0)  # k = 2 < 3 pruned zeros
    assert q.tolist() == [[[0.0, 0.0, 0.0, pytest.approx(-6.5 / 3), pytest.approx(6.5 / 3), pytest.approx(6.5 / 3)]]]


def test_count_levels_matches_unique():
    w = torch.tensor([[[1.0, 1.0, -0.0], [0.0, 2.0, 2.0]], [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]]])
    assert count_levels(w=w).tolist() == [3, 1]
    assert count_levels(w=w, axis=1).tolist() == [[2, 2], [1, 1]]
    assert count_levels(w=w, axis=2).tolist() == [[2, 2, 2], [1, 1, 1]]


def test_model_bytes_and_effective_bits():
    t = [StoredTensor(100, 4, 1, False), StoredTensor(10, 8, 10, True), StoredTensor(5, FLOAT_BITS)]
    assert model_bytes(tensors=t) == 100 * 4 / 8 + 4 + 10 * 8 / 8 + 10 * 8 + 5 * 4
    assert effective_bits(tensors=t) == pytest.approx((400 + 80 + 160) / 115)
    assert model_bytes(tensors=[StoredTensor(3, TERNARY_BITS, 1)]) == pytest.approx(3 * math.log2(3) / 8 + 4)


@pytest.mark.parametrize("fn", [
    lambda: quantize_tensor(w=torch.ones(3, 4), bits=4, axis=1),
    lambda: binarize(w=torch.ones(3, 4), axis=1),
    lambda: ternarize(w=torch.ones(3, 4), sparsity=0.5, axis=-1),
])
def test_per_channel_of_a_1d_tensor_fails_in_one_line(fn):
    with pytest.raises(ValueError, match=r"^per-channel quantization .*1-D per model, e\.g\. a bias\) would make every entry its own channel") as e:
        fn()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kw,match", [
    (dict(w=torch.ones(2, 3, 4), bits=4, axis=0), "axis 0 is the model axis"),
    (dict(w=torch.ones(2, 3, 4), bits=1, scheme="symmetric"), "symmetric"),
    (dict(w=torch.ones(2, 3, 4), bits=17), "bits=17"),
    (dict(w=torch.ones(2, 3, 4), bits=4, rounding="stochastic"), "seed"),
    (dict(w=torch.ones(2, 3, 4), bits=4, rounding="stochastic", seed=[1]), "one per model"),
    (dict(w=torch.ones(2, 3, 4, dtype=torch.int32), bits=4), "dtype"),
])
def test_quantize_tensor_input_errors(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        quantize_tensor(**kw)


# ----------------------------------------------------------------------------- the plugin
@pytest.mark.parametrize("params,match", [
    ({"bits": 0}, "bits must be an integer in 1..16"),
    ({"bits": 17}, "bits must be an integer in 1..16"),
    ({"bits": 1}, "use method=sign"),
    ({"scheme": "asym"}, "scheme must be"),
    ({"granularity": "per-row"}, "granularity must be"),
    ({"method": "binary"}, "method must be"),
    ({"rounding": "up"}, "rounding must be"),
    ({"ternary_sparsity": 1.0}, r"ternary_sparsity must be a number in \[0, 1\)"),
    ({"method": "sign", "rounding": "stochastic"}, "method=uniform only"),
    ({"keep_last_layer": "yes"}, "keep_last_layer must be true or false"),
    ({"last_layer_bits": 1}, "last_layer_bits must be an integer in 2..16"),
    ({"keep_last_layer": True, "bits": 8, "last_layer_bits": 4}, "last_layer_bits=4 is below"),
])
def test_validate_rejects(params, match):
    with pytest.raises(ValueError, match=match) as e:
        Quantize(**params).validate()
    assert "\n" not in str(e.value)


def _params(**shapes):
    return {k.replace("_", "."): torch.randn(v, generator=torch.Generator().manual_seed(1)) for k, v in shapes.items()}


@pytest.mark.parametrize("params,kw,match", [
    (_params(a_bias=(2, 5)), {}, r"no weight tensors \(at least 2-D per model\) to quantize; its parameters are a\.bias \(set include_bias=true"),
    (_params(l0_weight=(2, 3, 1), l0_bias=(2, 3)), {"method": "ternary", "granularity": "per-channel",
                                                    "ternary_sparsity": 0.6}, "all 1 entries of each output channel of 'l0.weight'"),
    (_params(l0_weight=(2, 3, 4)), {"keep_last_layer": True, "last_layer_bits": None}, "leaves nothing to quantize"),
    ({"l0.weight": torch.ones(2, 3, 4, dtype=torch.float16)}, {}, "'l0.weight' has dtype torch.float16"),
    ({"l0.weight": torch.tensor([[[1.0, math.nan]]])}, {}, "'l0.weight' holds NaN or inf"),
])
def test_plan_fails_in_one_line_naming_the_tensor(params, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        Quantize(**kw).plan(params)
    assert "\n" not in str(e.value)


def test_plan_biases_per_tensor_and_last_layer():
    params = _params(l0_weight=(2, 6, 3), l0_bias=(2, 6), l2_weight=(2, 4, 6), l2_bias=(2, 4))
    items = {it.name: it for it in Quantize(granularity="per-channel", include_bias=True, keep_last_layer=True,
                                            method="ternary").plan(params)}
    assert (items["l0.weight"].axis, items["l0.bias"].axis, items["l2.weight"].axis) == (1, None, 1)
    assert [items[n].role for n in items] == ["weight", "bias", "last-layer", "last-layer"]
    assert items["l2.bias"].method == "uniform" and items["l2.bias"].bits == 8


def _pop():
    rng = np.random.default_rng(0)
    rec = Records.from_arrays(rng.normal(size=(200, 6)), rng.integers(0, 3, 200), name="toy")
    build = lambda: torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))  # noqa: E731
    return ModelPopulation.train(rec, build, TrainingRecipe(epochs=3, batch_size=32), n_models=4, seed=0)


@pytest.fixture(scope="module")
def pop():
    return _pop()


@pytest.mark.parametrize("kw", [
    dict(bits=4), dict(bits=3, scheme="affine"), dict(bits=2, granularity="per-channel", include_bias=True),
    dict(bits=4, scheme="affine", rounding="stochastic"), dict(method="sign"), dict(method="ternary"),
    dict(method="ternary", ternary_sparsity=0.8, granularity="per-channel"),
])
def test_pruned_zeros_stay_zero(pop, kw):
    p = pop.clone()
    Prune(sparsity=0.9, finetune_epochs=0, include_bias=kw.get("include_bias", False)).apply(DefenseContext(p))
    pruned = {k: v == 0 for k, v in p.params.items()}
    rep = Quantize(**kw).apply(DefenseContext(p, position=1))
    for k, z in pruned.items():
        assert bool((p.params[k][z] == 0).all()), k
    assert rep["zero_masked_tensors"] == rep["quantized_tensors"]  # every one was pruned
    assert rep["sparsity_before"] >= 0.85 and rep["sparsity_after"] >= rep["sparsity_before"]
    levels = {"sign": 3, "ternary": 3}.get(kw.get("method"), 2 ** kw.get("bits", 8))
    assert rep["max_levels_per_group"] <= levels


def test_report_sizes_levels_and_backend(pop):
    p = pop.clone()
    before = {k: v.clone() for k, v in p.params.items()}
    rep = Quantize(bits=4, keep_last_layer=True, last_layer_bits=None).apply(DefenseContext(p))
    assert torch.equal(p.params["2.weight"], before["2.weight"]) and torch.equal(p.params["0.bias"], before["0.bias"])
    assert not torch.equal(p.params["0.weight"], before["0.weight"])
    assert rep["quantized_tensors"] == ["0.weight"] and rep["last_layer_tensors"] == ["2.weight"]
    n0, n2, nb = 6 * 16, 16 * 3, 16 + 3
    assert rep["parameters_per_model"] == n0 + n2 + nb
    assert rep["bytes_before"] == 4 * (n0 + n2 + nb)
    assert rep["bytes_after"] == n0 * 4 / 8 + 4 + 4 * (n2 + nb)
    assert rep["overhead_bytes"] == 4
    assert rep["effective_bits"] == pytest.approx((4 * n0 + 32 * n2) / (n0 + n2), abs=1e-4)
    assert rep["max_levels_per_tensor"] <= 16 and rep["levels_per_tensor"] == {"0.weight": rep["max_levels_per_tensor"]}
    assert rep["kernel_backend"] == ("native" if kernels.native_available() else "torch")
    assert 0 < rep["relative_error"] < 0.5
    rep = Quantize(bits=2, granularity="per-channel", keep_last_layer=True, last_layer_bits=6).apply(DefenseContext(pop.clone()))
    assert rep["max_levels_per_group"] <= 64 and rep["effective_bits"] == pytest.approx((2 * n0 + 6 * n2) / (n0 + n2), abs=1e-4)
    assert rep["overhead_bytes"] == 4 * (16 + 3)  # one float32 scale per output channel


def test_stochastic_rounding_seeds_come_from_the_context(pop):
    a, b = pop.clone(), pop.clone()
    Quantize(bits=2, rounding="stochastic").apply(DefenseContext(a))
    Quantize(bits=2, rounding="stochastic").apply(DefenseContext(b, position=1))
    assert not torch.equal(a.params["0.weight"], b.params["0.weight"])


@pytest.mark.parametrize("params", [
    {}, {"bits": 4, "granularity": "per-channel", "include_bias": True}, {"method": "sign"},
    {"method": "ternary", "keep_last_layer": True, "last_layer_bits": None},
    {"bits": 3, "scheme": "affine", "rounding": "stochastic"},
])
def test_contract(params):
    rep = check_defense(Quantize, params=params)
    assert rep["method"] == params.get("method", "uniform")


def test_cli_end_to_end(tmp_path):
    res = CliRunner().invoke(mia_core.cli.main, [
        "eval", "--attack", "lira", "--defense", "prune:sparsity=0.5,finetune_epochs=0",
        "--defense", "quantize:bits=4,granularity=per-channel,keep_last_layer=true",
        "--n-models", "6", "--epochs", "3", "--targets", "first:2", "-q",
        "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "defense quantize:" in res.output and "effective_bits=" in res.output
    assert "kernel_backend=" in res.output


def test_a_model_quantize_cannot_apply_to_is_refused_before_training(tmp_path):
    """logreg's only 2-D tensor is its last layer: keeping it in float leaves nothing to quantize."""
    from click.testing import CliRunner

    from mia_core.cli import main

    res = CliRunner().invoke(main, ["eval", "--attack", "loss", "--model", "logreg", "--defense",
                                    "quantize:keep_last_layer=true,last_layer_bits=none",
                                    "--dataset", "digits:n_records=200", "--n-models", "4", "-q",
                                    "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("Error: defense 'quantize:keep_last_layer=true,last_layer_bits=none' cannot apply to "
                          "model 'logreg': keep_last_layer=true with last_layer_bits=none leaves nothing to quantize")
    assert "\n" not in err and not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
