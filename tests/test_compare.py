"""`miafw compare` and the difference intervals behind it."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core import metrics
from mia_core.cli import main
from mia_core.compare import compare_runs

SMALL = ["--dataset", "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6", "--epochs", "20",
         "--targets", "first:2", "-q", "--attack", "lira", "--attack", "loss"]


@settings(max_examples=80, deadline=None)
@given(n=st.integers(4, 60), seed=st.integers(0, 10**6), ties=st.booleans(), f=st.sampled_from([0.01, 0.1, 0.3]))
def test_unit_weights_give_the_metrics_on_the_data(n, seed, ties, f):
    rng = np.random.default_rng(seed)
    m = rng.random(n) < 0.5
    m[:2] = [True, False]
    s = rng.normal(size=n) + m
    if ties:
        s = np.round(s)
    p = metrics._prepare(s, m, None)
    auc, adv, tpr, ok = metrics._weighted_stats(p, np.ones((1, n)), (f,))
    assert ok.all()
    assert auc[0] == pytest.approx(metrics.auc(s, m), abs=1e-12)
    assert adv[0] == pytest.approx(metrics.advantage(s, m), abs=1e-12)
    with pytest.warns(metrics.MetricsWarning) if (~m).sum() * f < 1 else contextlib.nullcontext():
        assert tpr[0, 0] == pytest.approx(metrics.tpr_at_fpr(s, m, f).tpr, abs=1e-12)


def test_difference_intervals_pairing_and_degenerate_cases():
    rng = np.random.default_rng(0)
    m = rng.random(2000) < 0.5
    a = rng.normal(size=2000) + 0.5 * m
    b = a + 0.3 * rng.normal(size=2000)
    g = np.arange(2000)
    d, lo, hi = metrics.difference_interval(scores_a=a, membership_a=m, scores_b=a, membership_b=m, groups_a=g,
                                            groups_b=g, paired=True)
    assert d == 0 and lo == 0 and hi == 0  # the same scores on the same records: no difference at all
    paired = metrics.difference_interval(scores_a=a, membership_a=m, scores_b=b, membership_b=m, groups_a=g,
                                         groups_b=g, paired=True)
    unpaired = metrics.difference_interval(scores_a=a, membership_a=m, scores_b=b, membership_b=m)
    assert paired[0] == pytest.approx(metrics.auc(b, m) - metrics.auc(a, m))
    assert paired[1] <= paired[0] <= paired[2] and unpaired[1] <= unpaired[0] <= unpaired[2]
    assert paired[2] - paired[1] < 0.5 * (unpaired[2] - unpaired[1])  # pairing removes the records' own spread
    t = metrics.difference_interval(scores_a=a, membership_a=m, scores_b=b, membership_b=m, metric="tpr@0.1")
    assert t[0] == pytest.approx(metrics.tpr_at_fpr(b, m, 0.1).tpr - metrics.tpr_at_fpr(a, m, 0.1).tpr)
    with pytest.raises(ValueError, match="metric must be 'auc', 'advantage' or 'tpr@F'"):
        metrics.difference_interval(scores_a=a, membership_a=m, scores_b=b, membership_b=m, metric="tpr@2")
    with pytest.raises(ValueError, match="paired=True needs groups_a and groups_b"):
        metrics.difference_interval(scores_a=a, membership_a=m, scores_b=b, membership_b=m, paired=True)


def test_compare_two_runs_writes_the_overlay_and_json(tmp_path):
    for name, extra in (("a", []), ("b", ["--defense", "prune:sparsity=0.9,finetune_epochs=0"])):
        res = CliRunner().invoke(main, ["eval", *SMALL, *extra, "--out", str(tmp_path / "runs"),
                                        "--cache-dir", str(tmp_path / "c")])
        assert res.exit_code == 0, res.output
    runs = sorted((p for p in (tmp_path / "runs").iterdir() if p.is_dir()),  # the undefended run first
                  key=lambda p: bool(json.loads((p / "config.json").read_text())["defenses"]))
    res = CliRunner().invoke(main, ["compare", *map(str, runs), "--html", str(tmp_path / "cmp.html")])
    assert res.exit_code == 0, res.output
    assert "(baseline)" in res.stdout and "paired over the shared records" in res.stdout
    page = (tmp_path / "cmp.html").read_text()
    assert 'id="roc"' in page and 'src="data:image/png;base64,' in page and 'id="compare"' in page
    res = CliRunner().invoke(main, ["compare", *map(str, runs), "--no-html", "--format", "json"])
    doc = json.loads(res.stdout)
    assert doc["html"] is None and doc["baseline"] == runs[0].name
    lira = next(d for d in doc["differences"] if d["attack"] == "lira" and d["metric"] == "auc")
    a = json.loads((runs[0] / "metrics.json").read_text())["attacks"]["lira"]["auc"]
    b = json.loads((runs[1] / "metrics.json").read_text())["attacks"]["lira"]["auc"]
    assert lira["difference"] == pytest.approx(b - a) and lira["paired"] is True
    assert lira["interval"][0] <= lira["difference"] <= lira["interval"][1]
    assert compare_runs(runs)["runs"][1]["defenses"] == ["prune:sparsity=0.9,finetune_epochs=0"]


def test_compare_refuses_what_it_cannot_compare(tmp_path):
    res = CliRunner().invoke(main, ["compare", str(tmp_path)])
    assert res.exit_code == 2 and "at least two run directories" in res.stderr
    res = CliRunner().invoke(main, ["compare", str(tmp_path / "x"), str(tmp_path / "y")])
    assert res.exit_code == 2 and "no config.json" in res.stderr
