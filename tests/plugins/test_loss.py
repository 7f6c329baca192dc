"""The loss-threshold attack: the sweep (default, -loss) and Yeom et al.'s fixed threshold (the
average training loss, estimated on reference models), validation errors, the planted population
and one command-line run."""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core import metrics
from mia_core.engine import AttackContext
from mia_core.testing import check_attack, planted_population
from mia_plugins.attacks.loss import LossAttack, mean_member_loss, yeom_decision

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@SETTINGS
@given(r=st.integers(1, 5), n=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_mean_member_loss_matches_loop(r, n, seed):
    rng = np.random.default_rng(seed)
    loss = rng.exponential(size=(r, n))
    keep = rng.random((r, n)) < 0.5
    keep[0, 0] = True  # at least one IN pair
    pairs = [loss[i, j] for i in range(r) for j in range(n) if keep[i, j]]
    assert mean_member_loss(ref_loss=loss, ref_in=keep) == pytest.approx(sum(pairs) / len(pairs), rel=1e-12)


@SETTINGS
@given(loss=st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=20), tau=st.floats(0, 10))
def test_yeom_decision_is_loss_at_most_tau(loss, tau):
    got = yeom_decision(loss=np.array(loss), tau=tau)
    assert got.dtype == np.float64
    assert got.tolist() == [1.0 if v <= tau else 0.0 for v in loss]


def test_mean_member_loss_rejects():
    with pytest.raises(ValueError, match="same shape"):
        mean_member_loss(ref_loss=np.zeros((2, 3)), ref_in=np.zeros((3, 2), bool))
    with pytest.raises(ValueError, match="at least one"):
        mean_member_loss(ref_loss=np.zeros((2, 3)), ref_in=np.zeros((2, 3), bool))


@pytest.mark.parametrize("params,message", [
    ({"threshold": "mean"}, "threshold must be one of sweep, yeom; got 'mean'"),
    ({"threshold": None}, "threshold must be one of"),
    ({"n_references": 3}, "positive even integer .* got 3"),
    ({"n_references": 0}, "got 0"),
    ({"n_references": False}, "got False"),
    ({"n_references": 2.0}, "got 2.0"),
])
def test_validate_rejects(params, message):
    with pytest.raises(ValueError, match=message):
        LossAttack(**params).validate()


class _Ctx:
    def __init__(self, n_models):
        self.n_models = n_models


def test_defaults_and_reference_needs():
    a = LossAttack()
    assert a.get_params() == {"threshold": "sweep", "n_references": None}
    assert LossAttack.min_reference_models == 0 and LossAttack.access == ("loss",)
    LossAttack().fit(_Ctx(2))  # the sweep needs no reference models
    with pytest.raises(ValueError, match=r"threshold=yeom .*\(n_models >= 4\), got n_models=2"):
        LossAttack(threshold="yeom").fit(_Ctx(2))
    assert LossAttack(n_references=4).reference_budget() == (None, True)
    assert LossAttack(threshold="yeom", n_references=4).reference_budget() == (4, True)


@pytest.fixture(scope="module")
def planted():
    return planted_population()


def test_sweep_is_negated_target_loss(planted):
    pop = planted
    records = np.arange(pop.n_records)
    got = LossAttack().fit(AttackContext(pop, ("loss",), owner="test")).score(3, records)
    np.testing.assert_array_equal(got, -pop.signals().loss[3])
    assert metrics.auc(got, pop.keep[3]) > 0.85


@pytest.mark.parametrize("n_references", [None, 2])
def test_yeom_threshold_is_the_references_mean_training_loss(planted, n_references):
    pop = planted
    ctx = AttackContext(pop, ("loss",), owner="test")
    attack = LossAttack(threshold="yeom", n_references=n_references).fit(ctx)
    records = np.arange(pop.n_records)
    scores = np.concatenate([attack.score(t, records) for t in range(4)])
    for t in range(4):
        refs = ctx.for_target(t, n_references=n_references, online=True).references
        assert t not in refs and (t ^ 1) not in refs
        keep = pop.keep[refs]
        assert attack.tau_[t] == pytest.approx(pop.signals().loss[refs][keep].mean(), rel=1e-12)
    np.testing.assert_array_equal(attack.score(0, records[5:9]), scores[5:9])
    assert set(np.unique(scores)) <= {0.0, 1.0}  # a decision: the ROC is a single point
    member = pop.keep[:4].ravel()
    tpr, fpr = scores[member].mean(), scores[~member].mean()
    # the mean training loss sits above the median (a skewed loss): TPR about 0.6, FPR about 0.1
    assert tpr > 0.5 and fpr < 0.2 and metrics.auc(scores, member) > 0.7


@pytest.mark.parametrize("params", [{"threshold": "yeom"}, {"threshold": "yeom", "n_references": 2}])
def test_conformance_kit(params):
    check_attack(LossAttack, params=params)


def test_cli_runs_both_thresholds(tmp_path):
    from plugin_fixtures import eval_attacks

    eval_attacks(tmp_path, "loss", "loss:threshold=yeom", "loss:threshold=yeom,n_references=2")
