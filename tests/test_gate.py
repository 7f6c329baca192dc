"""Release gates (`--budget`): parsing, the upper-end rule, exit status 3, metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core import metrics
from mia_core.cli import main
from mia_core.gate import Budget, check_budgets, parse_budget
from mia_core.params import ParamError

SMALL = ["--dataset", "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6", "--epochs", "3",
         "--targets", "first:2", "-q", "--attack", "lira", "--attack", "loss"]


def test_parse_budget():
    assert parse_budget("tpr@0.1%<=0.005") == Budget("tpr@0.1%<=0.005", "tpr", 0.001, 0.005, False)
    assert parse_budget(" auc < 0.55 ") == Budget("auc < 0.55", "auc", None, 0.55, True)
    assert parse_budget("advantage<=1e-1").limit == 0.1


@pytest.mark.parametrize("text,match", [
    ("precision<=0.1", "expected auc<=X, advantage<=X or tpr@P%<=X"),
    ("auc>=0.5", "expected auc<=X"),
    ("auc<=1.5", "the limit must be in \\[0, 1\\], got 1.5"),
    ("tpr@0%<=0.1", "the FPR must be in \\(0%, 100%\\)"),
    ("tpr@0.1<=0.1", "expected auc<=X"),
])
def test_malformed_budgets_are_usage_errors(text, match):
    with pytest.raises(ParamError, match=match):
        parse_budget(text)


def _doc(auc_hi=0.6, adv_hi=0.1, tpr_hi=0.01, resolvable=True):
    return {"a": {"auc_ci": [0.5, auc_hi], "advantage_ci": [0.0, adv_hi],
                  "tpr_at_fpr": {"0.001": {"ci_high": tpr_hi, "resolvable": resolvable, "n_nonmembers": 300}}}}


def test_the_upper_end_of_each_interval_is_checked():
    budgets = [parse_budget(t) for t in ("auc<=0.6", "advantage<0.1", "tpr@0.1%<=0.01")]
    report = check_budgets(_doc(), budgets)
    assert [c["passed"] for c in report["checks"]] == [True, False, True] and not report["passed"]
    assert check_budgets(_doc(adv_hi=0.05), budgets)["passed"]
    unresolved = check_budgets(_doc(adv_hi=0.05, resolvable=False), budgets)
    assert not unresolved["passed"] and "cannot be resolved" in unresolved["checks"][2]["why"]


def _naive_weighted_advantage(s, m, w):
    best = 0.0
    for t in np.unique(s):
        sel = s >= t
        best = max(best, (w * (sel & m)).sum() / (w * m).sum() - (w * (sel & ~m)).sum() / (w * ~m).sum())
    return best


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(2, 20), seed=st.integers(0, 10_000), ties=st.booleans())
def test_advantage_interval_matches_a_naive_weighted_advantage(n, seed, ties):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 4, n).astype(float) if ties else rng.normal(size=n)
    m = rng.random(n) < 0.5
    m[0], m[1] = True, False
    lo, hi = metrics.advantage_interval(scores=s, membership=m, n_boot=5, seed=seed, confidence=0.5)
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=5).astype(float)
    naive = [_naive_weighted_advantage(s, m, c) for c in counts if c[m].sum() > 0 and c[~m].sum() > 0]
    if naive:
        assert lo == pytest.approx(np.quantile(naive, 0.25)) and hi == pytest.approx(np.quantile(naive, 0.75))


def test_gate_fails_a_leaky_model_with_a_tight_budget_and_passes_a_loose_one(tmp_path):
    tight = CliRunner().invoke(main, ["eval", *SMALL, "--budget", "auc<=0.5", "--out", str(tmp_path / "t"),
                                      "--cache-dir", str(tmp_path / "c")])
    assert tight.exit_code == 3, tight.output
    assert "budget 'auc<=0.5' broken by attack 'lira': upper end of the AUC's 95% interval is" in tight.stderr
    run = next(p for p in (tmp_path / "t").iterdir() if p.is_dir())
    doc = json.loads((run / "metrics.json").read_text())
    assert doc["budget"]["passed"] is False and len(doc["budget"]["checks"]) == 2
    assert json.loads((run / "config.json").read_text())["budgets"] == ["auc<=0.5"]
    loose = CliRunner().invoke(main, ["eval", *SMALL, "--budget", "auc<=1", "--budget", "tpr@10%<=1",
                                      "--out", str(tmp_path / "l"), "--cache-dir", str(tmp_path / "c")])
    assert loose.exit_code == 0, loose.output
    assert "budget: every attack within auc<=1, tpr@10%<=1" in loose.stderr


def test_a_budget_at_an_unreported_fpr_adds_it_to_the_table(tmp_path):
    res = CliRunner().invoke(main, ["eval", *SMALL, "--budget", "tpr@5%<=1", "--json", "--out", str(tmp_path / "r"),
                                    "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "0.05" in json.loads(res.stdout)["attacks"]["lira"]["tpr_at_fpr"]


def test_a_malformed_budget_exits_2_before_training(tmp_path):
    res = CliRunner().invoke(main, ["eval", *SMALL, "--budget", "auc=0.5", "--out", str(tmp_path / "r"),
                                    "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2 and res.stderr.startswith("Error: --budget 'auc=0.5': expected")
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()
