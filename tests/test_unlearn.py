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
from mia_core.engine.unlearn import UnlearnConfig, UnlearnContext, member_rate, ulira, unlearn

SMALL = dict(dataset="digits:n_records=400", model="mlp:width=32", n_models=8, recipe=mia_core.TrainingRecipe(epochs=20))
CLI_SMALL = ["--dataset", "digits:n_records=400", "--model", "mlp:width=32", "--n-models", "8", "--epochs", "20", "-q"]


@pytest.fixture(scope="module")
def doc(tmp_path_factory):
    cfg = UnlearnConfig(mia_core.EvalConfig(**SMALL), forget="random:fraction=0.1", attacks=("loss", "lira"),
                        unlearners=("retrain", "retrain:stream=0", "finetune", "gradient-ascent"))
    return unlearn(cfg, cache=tmp_path_factory.mktemp("cache")).document


def test_retraining_is_indistinguishable_from_retraining(doc):
    """The built-in sanity check: an independent retraining (other streams) is indistinguishable
    from the gold standard (U-LiRA's AUC interval holds 0.5); the same streams reproduce it bitwise."""
    lo, hi = doc["unlearners"]["retrain"]["ulira"]["auc_ci"]
    assert lo <= 0.5 <= hi
    same = doc["unlearners"]["retrain:stream=0"]
    assert same["ulira"]["auc"] == 0.5 and same["forget_member_rate"] == doc["retrained"]["forget_member_rate"]
    assert set(same["forget_member_rate"]) == {"loss", "lira"} and doc["attacks"] == ["loss", "lira"]
    assert same["steps"] == doc["retrained"]["steps"] > 0


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
    out = member_rate(scores=conf, keep=keep, forget=forget, retain=retain)
    assert out["rate"] == 0.5 and out["forget_scores"] == 40
    # the same 10 records miss in both models: resampling records moves the rate, resampling models does not
    lo, hi = out["interval"]
    boot = metrics.crossed_mean_interval(values=np.tile(np.r_[np.zeros(10), np.ones(10)], 2),
                                         rows=np.repeat([0, 1], 20), cols=np.tile(np.arange(20), 2))
    cp = metrics.clopper_pearson(20, 40)
    assert lo < 0.5 < hi and out["interval"] == [min(boot[0], cp[0]), max(boot[1], cp[1])]
    # no forget record above the threshold: every resample says 0, Clopper-Pearson keeps the interval honest
    conf[:, :20] = -1.0
    out = member_rate(scores=conf, keep=keep, forget=forget, retain=retain)
    assert out["rate"] == 0.0 and out["interval"] == [0.0, metrics.clopper_pearson(0, 40)[1]] and out["interval"][1] > 0.05


@pytest.mark.parametrize("forget, match", [
    ("class=12", "dataset 'digits' has classes 0..9"),
    ("random:fraction=0", "the fraction must be a number in (0, 1)"),
    ("ids={d}/empty.txt", "the forget set is empty"),
    ("ids={d}/unknown.txt", "1 id(s) not in dataset 'digits' (first: 5000)"),
    ("everything", "--forget must be random:fraction=F, class=K or ids=FILE"),
    ("random:fraction=0.1 --n-models 4", "miafw unlearn needs --n-models >= 6, got 4"),
])
def test_bad_forget_sets_are_one_line_and_exit_2_before_training(tmp_path, forget, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "unknown.txt").write_text("1\n5000\n")
    spec, *extra = forget.format(d=tmp_path).split()
    res = CliRunner().invoke(main, ["unlearn", *CLI_SMALL, "--forget", spec, *extra,
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


def test_the_recipe_uses_the_attack_with_the_original_models_as_references(doc):
    """LiRA's member rate: against the models that never unlearned it calls more of the forget set
    member than against the retrained models, whose forget records its (original) references
    know as members of others only."""
    rate = lambda row: row["forget_member_rate"]["lira"]["rate"]  # noqa: E731
    assert rate(doc["original"]) > rate(doc["retrained"])


def test_random_labels_draws_a_wrong_label_for_every_forget_record(tmp_path):
    from mia_plugins.unlearners.basic import RandomLabels
    from mia_core.engine.stages import load_records, resolve, train_population
    from mia_core.engine.unlearn import forget_records

    plan = resolve(mia_core.EvalConfig(**SMALL))
    rec = load_records(plan)
    pop = train_population(plan, rec, cache=None).population.clone()
    s = forget_records("random:fraction=0.2", rec, pop.keep, seed=0)
    forget = pop.keep & s[None]
    ctx = UnlearnContext(pop, forget, build=lambda: plan.model.plugin.build(rec.n_features, rec.n_classes))
    seen = {}
    train = ctx.train
    ctx.train = lambda **kw: seen.update(kw) or train(**kw)
    before = pop.signals().correct.astype(bool)
    report = RandomLabels(epochs=10, retain=False, lr=0.02).unlearn(ctx)
    labels = seen["labels"]
    assert (labels[forget] != np.broadcast_to(rec.y, forget.shape)[forget]).all()
    assert (labels[~forget] == np.broadcast_to(rec.y, forget.shape)[~forget]).all()
    assert set(np.unique(labels[forget])) == set(range(rec.n_classes))  # every class can be drawn
    assert seen["keep"] is ctx.forget and report["steps"] == ctx.steps > 0
    after = pop.signals().correct.astype(bool)
    assert after[forget].mean() < 0.5 * before[forget].mean()  # the models learned the wrong labels
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        ctx.train(keep=forget, epochs=1, labels=np.full(forget.shape, 10))
    with pytest.raises(ValueError, match="retain must be true or false"):
        RandomLabels(retain="yes").unlearn(ctx)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("unlearn")
    res = CliRunner().invoke(main, ["unlearn", *CLI_SMALL, "--unlearner", "retrain", "--unlearner", "finetune:epochs=2",
                                    "--unlearner", "random-labels", "--attack", "loss", "--attack", "confidence",
                                    "--out", str(d / "r"), "--cache-dir", str(d / "c")])
    assert res.exit_code == 0, res.output
    assert "forget member rate (confidence)" in res.stdout and "random-labels" in res.stdout
    (run,) = [p for p in (d / "r").iterdir() if p.is_dir()]
    return run


def test_an_unlearn_run_has_its_report_and_miafw_report_regenerates_it(run_dir, tmp_path):
    assert {p.name for p in run_dir.iterdir()} >= {"config.json", "metrics.json", "ulira.npz", "report.html"}
    doc = json.loads((run_dir / "metrics.json").read_text())
    page = (run_dir / "report.html").read_text()
    ft = doc["unlearners"]["finetune:epochs=2"]["ulira"]
    assert f"{ft['auc']:.3f} [{ft['auc_ci'][0]:.3f}, {ft['auc_ci'][1]:.3f}]" in page
    assert "forget member rate (confidence)" in page and "<script" not in page
    res = CliRunner().invoke(main, ["report", str(run_dir), "--out", str(tmp_path / "again.html")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "again.html").read_text() == page


def test_a_tampered_ulira_file_is_refused_in_one_line(run_dir, tmp_path):
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    with np.load(bad / "ulira.npz") as z:
        arrays = dict(z)
    arrays["ulira_1_scores"] = arrays["ulira_1_scores"][::-1].copy()  # scores no longer match their labels
    np.savez(bad / "ulira.npz", **arrays)
    res = CliRunner().invoke(main, ["report", str(bad)])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "metrics.json says" in res.stderr and "finetune:epochs=2" in res.stderr


def test_an_unknown_attack_is_one_line_and_exit_2(tmp_path):
    res = CliRunner().invoke(main, ["unlearn", *CLI_SMALL, "--attack", "nosuch", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "nosuch" in res.stderr


def test_the_unlearn_page_renders_in_headless_chromium(run_dir, tmp_path):
    from test_report import CHROMEDRIVER, CHROMIUM, open_in_chromium

    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("headless Chromium is not installed (Debian: apt-get install chromium chromium-driver)")
    images, tables, log = open_in_chromium(run_dir / "report.html", tmp_path / "unlearn.png")
    assert [i[0] for i in images] == ["roc", "tradeoff"]
    assert all(ok and w > 300 and h > 300 for _, ok, w, h in images), images
    rows = {t[0]: t[1] for t in tables}
    assert rows["unlearners"] == 1 + 2 + 3 and rows["reports"] == 1 + 3 and "versions" in rows
    assert all(height > 20 for *_, height in tables) and log == [], (tables, log)


def test_miafw_runs_lists_unlearn_runs_with_their_ulira_auc(run_dir):
    doc = json.loads((run_dir / "metrics.json").read_text())
    want = f"U-LiRA finetune:epochs=2 AUC {doc['unlearners']['finetune:epochs=2']['ulira']['auc']:.3f}"
    for extra in ([], ["--rebuild"]):
        res = CliRunner().invoke(main, ["runs", "--out", str(run_dir.parent), *extra])
        assert res.exit_code == 0, res.output
        assert run_dir.name in res.stdout and want in res.stdout


def test_compare_refuses_an_unlearn_run_in_one_line(run_dir):
    res = CliRunner().invoke(main, ["compare", str(run_dir), str(run_dir), "--no-html"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "miafw unlearn" in res.stderr


def test_the_sanity_check_warns_when_an_independent_retraining_is_told_apart():
    from mia_core.engine.unlearn import unlearn_warnings

    def row(name, stream, ci, resolvable=True):
        return {"name": name, "report": {"stream": stream},
                "ulira": {"auc": sum(ci) / 2, "auc_ci": ci, "tpr_resolvable": resolvable, "pairs": 40}}

    assert unlearn_warnings({"retrain": row("retrain", 1, [0.47, 0.52])}) == []
    (w,) = unlearn_warnings({"retrain": row("retrain", 1, [0.51, 0.55])})
    assert w.startswith("sanity check: retrain (an independent retraining) has U-LiRA AUC 0.530 [0.510, 0.550]")
    assert unlearn_warnings({"retrain:stream=0": row("retrain", 0, [0.5, 0.5]),  # the gold standard itself
                             "finetune": row("finetune", None, [0.7, 0.8])}) == []
    (w,) = unlearn_warnings({"finetune": row("finetune", None, [0.7, 0.8], resolvable=False)})
    assert "40 retrained scores cannot resolve TPR at 1% FPR" in w


def test_unlearn_documents_match_their_schema_and_broken_ones_do_not(doc, run_dir):
    import copy

    from mia_core.schema import load_schema, validate_unlearn_metrics

    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(load_schema("unlearn"))
    validate_unlearn_metrics(doc)
    validate_unlearn_metrics(json.loads((run_dir / "metrics.json").read_text()))
    for path, value, message in [
        (("unlearners", "finetune", "ulira", "auc"), 1.5, r"\$\.unlearners\.finetune\.ulira\.auc: 1\.5 is greater"),
        (("retrained", "forget_member_rate", "loss", "extra"), 1, r"\$\.retrained\.forget_member_rate\.loss"),
        (("schema_version",), 1, r"\$\.schema_version: expected 2, got 1"),
    ]:
        bad = copy.deepcopy(doc)
        node = bad
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(ValueError, match=message):
            validate_unlearn_metrics(bad)
    bad = copy.deepcopy(doc)
    del bad["attacks"]
    with pytest.raises(ValueError, match=r"\$\.attacks: required key missing"):
        validate_unlearn_metrics(bad)


def test_an_older_or_foreign_metrics_file_is_refused_by_miafw_report(run_dir, tmp_path):
    import shutil

    bad = tmp_path / "run"
    shutil.copytree(run_dir, bad)
    doc = json.loads((bad / "metrics.json").read_text())
    (bad / "metrics.json").write_text(json.dumps({**doc, "schema_version": 1}))
    res = CliRunner().invoke(main, ["report", str(bad)])
    assert res.exit_code == 2 and "not an unlearn document of schema version 2 (found version 1" in res.stderr
    del doc["retrained"]
    (bad / "metrics.json").write_text(json.dumps(doc))
    res = CliRunner().invoke(main, ["report", str(bad)])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "KeyError" in res.stderr


def test_the_python_api_is_at_the_top_level():
    assert mia_core.unlearn is unlearn and mia_core.UnlearnConfig is UnlearnConfig
    assert {"unlearn", "UnlearnConfig"} <= set(mia_core.__all__)


def _without_seconds(x):
    if isinstance(x, dict):
        return {k: _without_seconds(v) for k, v in x.items() if k != "seconds"}
    return x


def test_config_toml_repeats_the_run_and_flags_override_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "forget.txt").write_text("\n".join(map(str, range(0, 400, 9))) + "\n")
    cache = ["--cache-dir", str(tmp_path / "c")]
    res = CliRunner().invoke(main, ["unlearn", *CLI_SMALL, *cache, "--unlearner", "finetune:epochs=2",
                                    "--unlearner", "random-labels:retain=false", "--attack", "loss",
                                    "--forget", "ids=forget.txt", "--out", "a"])
    assert res.exit_code == 0, res.output
    (first,) = (tmp_path / "a").glob("2*")
    toml = (first / "config.toml").read_text()
    assert f'forget = "ids={tmp_path / "forget.txt"}"' in toml  # absolute: the file works from anywhere
    assert 'unlearners = ["finetune:epochs=2", "random-labels:retain=false"]' in toml
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = CliRunner().invoke(main, ["unlearn", "--config", str(first / "config.toml"), *cache, "-q", "--out", "b"])
    assert res.exit_code == 0, res.output
    (again,) = (elsewhere / "b").glob("2*")
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (first, again))
    assert _without_seconds(one) == _without_seconds(two)
    assert (again / "config.toml").read_text() == toml
    res = CliRunner().invoke(main, ["unlearn", "--config", str(first / "config.toml"), *cache, "-q", "--out", "c",
                                    "--unlearner", "retrain", "--json"])
    assert res.exit_code == 0, res.output
    assert list(json.loads(res.stdout)["unlearners"]) == ["retrain"]
    res = CliRunner().invoke(main, ["eval", "--config", str(first / "config.toml")])
    assert res.exit_code == 2 and "it is a `miafw unlearn` config (use miafw unlearn --config)" in res.stderr
    bad = elsewhere / "bad.toml"
    bad.write_text(toml.replace("defenses = []", 'defenses = ["prune"]'))
    res = CliRunner().invoke(main, ["unlearn", "--config", str(bad)])
    assert res.exit_code == 2 and "takes no defenses" in res.stderr
    bad.write_text(toml + "colour = 1\n")
    res = CliRunner().invoke(main, ["unlearn", "--config", str(bad)])
    assert res.exit_code == 2 and "unknown key 'unlearn.colour'; valid unlearn keys: unlearners, forget" in res.stderr
