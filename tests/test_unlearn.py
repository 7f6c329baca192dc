"""`miafw unlearn`: unlearning methods against retraining, with the common recipe and U-LiRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import mia_core
from mia_core import metrics
from mia_core.cli import main
from mia_core.data import DataError
from mia_core.engine.unlearn import UnlearnConfig, member_rate, ulira, unlearn

SMALL = dict(dataset="digits:n_records=400", model="mlp:width=32", n_models=8, recipe=mia_core.TrainingRecipe(epochs=20))
CLI_SMALL = ["--dataset", "digits:n_records=400", "--model", "mlp:width=32", "--n-models", "8", "--epochs", "20", "-q"]


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    cfg = UnlearnConfig(mia_core.EvalConfig(**SMALL), forget="random:fraction=0.1",
                        unlearners=("retrain", "retrain:stream=0", "finetune", "gradient-ascent"))
    return unlearn(cfg, cache=tmp_path_factory.mktemp("cache")).document


def test_retraining_is_indistinguishable_from_retraining(doc):
    """The built-in sanity check: an independent retraining (other streams) is indistinguishable
    from the gold standard (U-LiRA's AUC interval holds 0.5); the same streams reproduce it bitwise."""
    lo, hi = doc["unlearners"]["retrain"]["ulira"]["auc_ci"]
    assert lo <= 0.5 <= hi
    same = doc["unlearners"]["retrain:stream=0"]
    assert same["ulira"]["auc"] == 0.5 and same["forget_member_rate"] == doc["retrained"]["forget_member_rate"]


def test_fine_tuning_leaves_the_forget_set_detectable(doc):
    ft = doc["unlearners"]["finetune"]["ulira"]
    assert ft["auc_ci"][0] > 0.5
    assert doc["unlearners"]["gradient-ascent"]["steps"] > 0 and doc["unlearners"]["finetune"]["steps"] > 0
    for row in doc["unlearners"].values():
        assert {"retain_accuracy", "forget_accuracy", "test_accuracy", "seconds"} <= set(row)


def test_ulira_on_known_distributions():
    rng = np.random.default_rng(0)
    m, n = 80, 200  # many models per record: the reference means are close to the true ones
    forget = rng.random((m, n)) < 0.5
    retrained = rng.normal(size=(m, n))
    same = ulira(unlearned=rng.normal(size=(m, n)), retrained=retrained, forget=forget)
    assert same["auc_ci"][0] <= 0.5 <= same["auc_ci"][1]
    shifted = ulira(unlearned=rng.normal(size=(m, n)) + 1.0, retrained=retrained, forget=forget)
    # two unit Gaussians one standard deviation apart: the likelihood ratio's AUC is Phi(1 / sqrt(2)) = 0.760,
    # approached from below as the leave-one-out means sharpen
    assert 0.72 <= shifted["auc"] <= 0.765


def test_member_rate_is_the_share_above_each_models_best_threshold():
    rng = np.random.default_rng(1)
    keep = np.zeros((2, 200), bool)
    keep[:, :100] = True
    forget = np.zeros_like(keep)
    forget[:, :20] = True
    retain = keep & ~forget
    conf = np.where(keep, 2.0, 0.0) + rng.normal(scale=0.1, size=keep.shape)
    conf[:, :10] = 0.0  # half the forget set looks unseen
    out = member_rate(conf=conf, keep=keep, forget=forget, retain=retain)
    assert out["rate"] == 0.5 and out["forget_scores"] == 40
    assert out["interval"] == list(metrics.clopper_pearson(20, 40))


@pytest.mark.parametrize("forget, match", [
    ("class=12", "dataset 'digits' has classes 0..9"),
    ("random:fraction=0", "the fraction must be a number in (0, 1)"),
    ("ids={d}/empty.txt", "the forget set is empty"),
    ("ids={d}/unknown.txt", "1 id(s) not in dataset 'digits' (first: 5000)"),
    ("everything", "--forget must be random:fraction=F, class=K or ids=FILE"),
])
def test_bad_forget_sets_are_one_line_and_exit_2_before_training(tmp_path, forget, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "unknown.txt").write_text("1\n5000\n")
    res = CliRunner().invoke(main, ["unlearn", *CLI_SMALL, "--forget", forget.format(d=tmp_path),
                                    "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2, res.output
    assert len(res.stderr.strip().splitlines()) == 1 and match in res.stderr
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_a_forget_set_holding_every_member_is_refused():
    rec = mia_core.engine.stages.load_records(mia_core.engine.stages.resolve(mia_core.EvalConfig(**SMALL)))
    keep = np.zeros((2, rec.n), bool)
    keep[0, :5] = keep[1, 5:10] = True
    from mia_core.engine.unlearn import forget_records

    with pytest.raises(DataError, match="holds every member of some model"):
        forget_records("random:fraction=0.99", rec, keep, seed=0)


def test_cli_end_to_end(tmp_path):
    res = CliRunner().invoke(main, ["unlearn", *CLI_SMALL, "--unlearner", "finetune:epochs=2", "--json",
                                    "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert list(doc["unlearners"]) == ["finetune:epochs=2"] and doc["command"] == "unlearn"
    run = next(p for p in (tmp_path / "r").iterdir() if p.is_dir())
    assert json.loads((run / "config.json").read_text())["command"] == "unlearn"
    res = CliRunner().invoke(main, ["unlearn", *CLI_SMALL, "--unlearner", "finetune:epochs=0"])
    assert res.exit_code == 2 and "epochs must be an integer >= 1" in res.stderr
    res = CliRunner().invoke(main, ["unlearn", *CLI_SMALL, "--defense", "prune"])
    assert res.exit_code == 2 and "takes no --defense" in res.stderr


def test_neggrad_plus_and_stable_streams(tmp_path):
    """NegGrad+ runs and reports its steps; an unlearner's numbers do not depend on which others run."""
    cache = tmp_path / "c"
    both = unlearn(UnlearnConfig(mia_core.EvalConfig(**SMALL), forget="random:fraction=0.1",
                                 unlearners=("finetune", "neggrad-plus:epochs=2,beta=0.7")), cache=cache).document
    alone = unlearn(UnlearnConfig(mia_core.EvalConfig(**SMALL), forget="random:fraction=0.1",
                                  unlearners=("neggrad-plus:epochs=2,beta=0.7",)), cache=cache).document
    ng = both["unlearners"]["neggrad-plus:epochs=2,beta=0.7"]
    assert ng["report"]["beta"] == 0.7 and ng["steps"] > 0
    assert alone["unlearners"]["neggrad-plus:epochs=2,beta=0.7"]["ulira"] == ng["ulira"]
    with pytest.raises(mia_core.params.ParamError, match=r"beta must be a number in \(0, 1\)"):
        unlearn(UnlearnConfig(mia_core.EvalConfig(**SMALL), unlearners=("neggrad-plus:beta=1",)))
