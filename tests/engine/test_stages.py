"""The evaluation's stages, each on its own, and the public entry point ``mia_core.evaluate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mia_core
from mia_core.engine import stages
from mia_core.engine.cache import PopulationCache
from mia_core.engine.stages import EvalConfig, PluginRuntimeError
from mia_core.engine.trainer import TrainingRecipe
from mia_core.params import ParamError
from plugin_fixtures import estimators as estimator_distribution, installed

SMALL = dict(dataset="digits:n_records=300", model="mlp:width=32", n_models=6, targets="first:2",
             recipe=TrainingRecipe(epochs=8))


@pytest.fixture
def test_estimators(tmp_path, monkeypatch):
    with installed(estimator_distribution(tmp_path / "site"), monkeypatch):
        yield


def test_public_api_is_the_stage_module():
    assert mia_core.evaluate is stages.evaluate
    assert mia_core.EvalConfig is EvalConfig
    with pytest.raises(AttributeError):
        mia_core.no_such_thing  # noqa: B018


def test_stages_one_by_one_equal_evaluate(tmp_path):
    config = EvalConfig(attacks=("lira", "loss"), defenses=("prune:sparsity=0.5,finetune_epochs=1",), **SMALL)
    plan = stages.resolve(config)
    assert [a.label for a in plan.attacks] == ["lira", "loss"]
    assert plan.targets == (0, 1) and plan.device == torch.device("cpu")
    assert plan.post_defenses[0].spec.params["scope"] == "global"  # defaults resolved
    assert plan.document["defenses"][0]["stage"] == "post"

    records = stages.load_records(plan)
    assert records.n == 300
    trained = stages.train_population(plan, records)
    assert not trained.from_cache and trained.population.n_models == 6
    before = {k: v.clone() for k, v in trained.population.params.items()}
    defended = stages.apply_defenses(plan, trained.population)
    # the trained population (possibly the cache's) is never changed by a post-training defense
    assert all(torch.equal(before[k], trained.population.params[k]) for k in before)
    assert defended.reports[0]["report"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    signals = stages.compute_signals(defended.population)
    scores = stages.run_attacks(plan, defended.population, signals)
    assert {k: v.shape for k, v in scores.items()} == {"lira": (2, 300), "loss": (2, 300)}
    m = stages.compute_metrics(plan, records=records, trained=trained, defended=defended,
                               undefended_signals=stages.compute_signals(trained.population), signals=signals,
                               scores=scores, estimates={})
    assert m.curves["lira"].auc == m.document["attacks"]["lira"]["auc"]

    ev = stages.evaluate(plan)
    assert json.dumps(ev.metrics, sort_keys=True) == json.dumps(m.document, sort_keys=True)
    np.testing.assert_array_equal(ev.scores["lira"], scores["lira"])
    assert ev.run_dir is None


def test_evaluate_writes_a_run_and_uses_the_cache(tmp_path):
    config = EvalConfig(attacks=("loss",), **SMALL)
    first = mia_core.evaluate(config, out=tmp_path / "runs", cache=tmp_path / "cache")
    assert first.run_dir.is_dir() and (first.run_dir / "metrics.json").is_file()
    assert json.loads((first.run_dir / "metrics.json").read_text()) == json.loads(json.dumps(first.metrics))
    msgs = []

    class Collect(mia_core.engine.progress.Reporter):
        def message(self, text):
            msgs.append(text)

    second = mia_core.evaluate(config, cache=PopulationCache(tmp_path / "cache"), reporter=Collect())
    assert any("loaded 6 trained models from the cache" in m for m in msgs)
    assert second.metrics == first.metrics
    training = first.metrics["training"]  # recorded with the cache entry, so a cached run reports it too
    assert len(training["losses"]) == 8 and training["steps"] == 8 * training["steps_per_epoch"]
    assert training["sampler"] == "fixed" and training["forward"] == "stacked"


@pytest.mark.parametrize("change,match", [
    (dict(device="tpu"), "--device must be one of"),
    (dict(n_models=3), "even integer"),
    (dict(targets="7"), "--targets indices"),
    (dict(confidence=1.5), "confidence must be in"),
    (dict(attacks=()), "no attack given"),
    (dict(attacks=("loss", "loss")), "given twice"),
    (dict(estimators=("nope",)), "unknown estimator 'nope'"),
])
def test_resolve_refuses_bad_input_before_any_work(change, match):
    with pytest.raises(stages.USAGE_ERRORS, match=match):
        stages.resolve(EvalConfig(**{**SMALL, **change}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no GPU")
def test_cuda_without_a_gpu_is_a_usage_error():
    with pytest.raises(ParamError, match="no CUDA device is available"):
        stages.resolve_device("cuda")
    assert stages.resolve_device("auto") == torch.device("cpu")


def test_estimators_run_beside_the_attacks(test_estimators):
    ev = mia_core.evaluate(EvalConfig(attacks=("lira", "loss"), estimators=("test-tv", "tiny-bound"), **SMALL))
    tv = ev.metrics["estimators"]["test-tv"]
    assert tv["name"] == "test-tv" and tv["params"] == {"bins": 20, "n_boot": 50}
    assert 0 < tv["value"] <= 1 and tv["interval"][0] <= tv["value"] <= tv["interval"][1]
    assert tv["advantage_bound"] == tv["value"] and tv["report"] == {"bins": 20}
    best = ev.metrics["best_attack"]
    assert best["advantage"] == max(a["advantage"] for a in ev.metrics["attacks"].values())
    # a bound below the measured advantage is shown, never hidden
    assert "exceeds this bound" in ev.metrics["estimators"]["tiny-bound"]["warning"]
    assert ev.estimates["test-tv"].value == tv["value"]


@pytest.mark.parametrize("name,match", [
    ("nan-value", "NaN/inf"),
    ("reversed-interval", "low <= high"),
    ("bad-bound", r"in \[0, 1\]"),
])
def test_unusable_estimates_fail_naming_the_estimator(test_estimators, name, match):
    with pytest.raises(PluginRuntimeError, match=f"estimator '{name}' failed: .*{match}"):
        mia_core.evaluate(EvalConfig(attacks=("loss",), estimators=(name,), **SMALL))


def test_a_failed_run_says_where_it_was_recorded(tmp_path, test_estimators):
    with pytest.raises(PluginRuntimeError) as info:
        mia_core.evaluate(EvalConfig(attacks=("loss",), estimators=("nan-value",), **SMALL), out=tmp_path)
    assert info.value.run_dir.name.endswith(".failed") and (info.value.run_dir / "FAILED.txt").is_file()


def test_a_population_that_did_not_learn_is_flagged():
    config = EvalConfig(attacks=("loss",), **{**SMALL, "recipe": TrainingRecipe(epochs=0)})
    with pytest.warns(stages.EvaluationWarning, match="the population did not learn"):
        ev = mia_core.evaluate(config)
    assert any("did not learn" in w for w in ev.metrics["warnings"])
    assert mia_core.evaluate(EvalConfig(attacks=("loss",), **SMALL)).metrics["warnings"] == []


def test_labels_with_gaps_are_flagged():
    from mia_core.data import Records

    rec = Records.from_arrays(np.zeros((4, 2)), np.array([0, 1000, 0, 1000]), name="gaps")
    (msg,) = stages.population_warnings(rec, 1.0, "gaps")
    assert "999 of its 1001 classes have no record (labels 1, 2, 3, 4, 5, ...)" in msg
