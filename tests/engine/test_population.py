"""ModelPopulation: keep matrix, signals, cache, contexts (the trainer against per-model torch loops is
tested in test_trainer.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core.engine.cache import PopulationCache
from mia_core.data import DataError, Records
from mia_core.engine import AccessError, AttackContext, ModelPopulation, SignalContext
from mia_core.engine.signals import compute_signals
from mia_core.engine.trainer import TrainingRecipe, _batch_plan, make_keep_matrix, references


@settings(max_examples=40, deadline=None, derandomize=True)
@given(half=st.integers(1, 10), n=st.integers(1, 60), seed=st.integers(0, 2**16))
def test_keep_matrix_each_record_in_exactly_half(half, n, seed):
    keep = make_keep_matrix(2 * half, n, np.random.default_rng(seed))
    assert keep.shape == (2 * half, n) and keep.dtype == bool
    assert (keep.sum(axis=0) == half).all()


def test_keep_matrix_pairs_are_complements_so_references_do_not_reveal_the_target():
    keep = make_keep_matrix(8, 500, np.random.default_rng(3))
    assert (keep[0::2] == ~keep[1::2]).all()
    for t in range(8):
        refs = references(t, 8)
        assert t not in refs and (t ^ 1) not in refs and len(refs) == 6
        # every record has 3 IN and 3 OUT references, whatever the target's membership
        assert (keep[refs].sum(axis=0) == 3).all()


@pytest.mark.parametrize("m", [0, 1, 3])
def test_keep_matrix_needs_even_models(m):
    with pytest.raises(ValueError, match="even number"):
        make_keep_matrix(m, 10, np.random.default_rng(0))


def test_batch_plan_only_uses_own_records():
    rng = np.random.default_rng(0)
    keep = make_keep_matrix(6, 101, rng)
    plan = _batch_plan(keep, 16, rng)
    for m in range(6):
        used = plan[:, m].ravel()
        assert keep[m, used].all()
        # every own record appears at least once per epoch
        assert set(np.flatnonzero(keep[m])) <= set(used.tolist())


def _toy(n=120, d=5, c=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, c, size=n)
    return Records.from_arrays(x, y, name="toy", n_classes=c)


def _build(d=5, c=3):
    return lambda: torch.nn.Sequential(torch.nn.Linear(d, 8), torch.nn.Tanh(), torch.nn.Linear(8, c))


def test_signals_match_direct_formulas():
    torch.manual_seed(0)
    logits = torch.randn(3, 50, 4, dtype=torch.float32) * 5
    logits[0, 0] = torch.tensor([60.0, -60.0, -60.0, -60.0])  # p_y rounds to 1 in float32
    y = np.random.default_rng(0).integers(0, 4, size=50)
    y[0] = 0
    s = compute_signals(logits, y)
    p = torch.softmax(logits.double(), -1).numpy()
    py = p[:, np.arange(50), y]
    np.testing.assert_allclose(s.loss, -np.log(py), rtol=1e-9)
    ok = py < 1 - 1e-9
    np.testing.assert_allclose(s.confidence[ok], np.log(py[ok]) - np.log1p(-py[ok]), rtol=1e-6, atol=1e-8)
    assert np.isfinite(s.confidence).all() and s.confidence[0, 0] > 100  # exact where 1 - p_y underflows
    np.testing.assert_array_equal(s.correct, (p.argmax(-1) == y).astype(float))


def test_population_trains_and_generalises_on_digits():
    from mia_plugins.datasets.sklearn_data import Digits
    from mia_plugins.models.mlp import MLP

    rec = Digits(n_records=600).load()
    pop = ModelPopulation.train(rec, lambda: MLP(width=64).build(64, 10), TrainingRecipe(epochs=40),
                                n_models=4, seed=0)
    acc = pop.accuracy()
    assert (acc["train"] > 0.97).all() and (acc["test"] > 0.85).all()
    # the module view agrees with the vectorised forward pass
    m2 = pop.module(2)
    torch.testing.assert_close(m2(torch.from_numpy(rec.x)), pop.logits()[2])


def test_cache_roundtrip_is_exact(tmp_path):
    rec = _toy()
    recipe = TrainingRecipe(epochs=2, batch_size=32)
    pop = ModelPopulation.train(rec, _build(), recipe, n_models=4, seed=3)
    cache = PopulationCache(tmp_path / "c")
    cache.store("k" * 64, pop.state(), {"note": "test"})
    back = ModelPopulation.from_state(cache.load("k" * 64)[0], records=rec, build=_build(), recipe=recipe, seed=3)
    np.testing.assert_array_equal(back.keep, pop.keep)
    assert torch.equal(back.logits(), pop.logits())
    # a damaged entry is ignored with a warning, never unpickled or trusted
    (tmp_path / "c" / "populations" / ("k" * 64) / "population.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="is damaged .population.pt does not match its checksum"):
        assert cache.load("k" * 64) is None


def test_attack_context_enforces_access_and_hides_target_membership():
    rec = _toy()
    pop = ModelPopulation.train(rec, _build(), TrainingRecipe(epochs=1), n_models=4, seed=0)
    ctx = AttackContext(pop, ("loss",), owner="attack 'x'", strict=True)
    assert AttackContext(pop, ("loss",)).for_target(1).target == 1  # hand-built (unit tests): lenient
    # run strictly (engine, kit): a view only of the target being scored: any other would hold this target's membership row
    with pytest.raises(AccessError, match=r"for_target\(1\) called in fit\(\)"):
        ctx.for_target(1)
    with ctx.scoring(0), pytest.raises(AccessError, match=r"for_target\(1\) called in score\(0, ...\)"):
        ctx.for_target(1)
    with ctx.scoring(1):
        view = ctx.for_target(1)
    assert view.ref_signal("loss").shape == (2, rec.n)  # every model but the target and its partner
    assert view.references.tolist() == [2, 3]
    # the attack's seed is not the run seed, from which the keep matrix could be redrawn
    assert ctx.seed != pop.seed and ctx.seed == AttackContext(pop, ("loss",)).seed
    with pytest.raises(AccessError, match="declared access \\('loss',\\) but read signal 'logits'"):
        view.ref_signal("logits")
    with pytest.raises(AccessError, match="full keep matrix"):
        ctx.keep
    assert SignalContext(pop, ("label",)).keep.shape == (4, rec.n)


@pytest.mark.parametrize("x,y,match", [
    (np.zeros((0, 3)), np.zeros(0, dtype=int), "empty"),
    (np.zeros((4, 3)), np.zeros(4, dtype=int), "single class"),
    (np.zeros((4, 3)), np.array([0, 1, 0.5, 1]), "labels must be integers"),
    (np.zeros((4, 3)), np.array(["a", "b", "a", "b"]), "labels must be integers"),
    (np.zeros((4, 3)), np.array([0, 1, -1, 1]), ">= 0"),
    (np.full((4, 3), np.nan), np.array([0, 1, 0, 1]), "non-finite"),
    (np.zeros((4, 3)), np.array([0, 1, 0]), "one label per record"),
])
def test_records_reject_unusable_data(x, y, match):
    with pytest.raises(DataError, match=match):
        Records.from_arrays(x, y, name="bad")
