"""`miafw sweep`: grid parsing, one evaluation per point, table and plot, resume."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from mia_core.cli import main
from mia_core.params import ParamError
from mia_core.sweep import GridAxis, grid_points, parse_grid, point_defenses

SMALL = ["--dataset", "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6", "--epochs", "3",
         "--targets", "first:2", "-q", "--attack", "lira", "--attack", "loss"]


def test_grid_parsing_and_points():
    axes = parse_grid(["sparsity=0,0.5", "scope=global,layer"], ["prune:finetune_epochs=0"])
    assert axes == [GridAxis(0, "sparsity", ("0", "0.5")), GridAxis(0, "scope", ("global", "layer"))]
    assert grid_points(axes) == [("0", "global"), ("0", "layer"), ("0.5", "global"), ("0.5", "layer")]
    assert point_defenses(["prune:finetune_epochs=0"], axes, ("0.5", "layer")) == \
        ("prune:finetune_epochs=0,sparsity=0.5,scope=layer",)
    two = parse_grid(["weight-decay.lam=0,0.01"], ["weight-decay", "prune"])
    assert point_defenses(["weight-decay", "prune"], two, ("0.01",)) == ("weight-decay:lam=0.01", "prune")


@pytest.mark.parametrize("grids,defenses,match", [
    ([], ["prune"], "no --grid given"),
    (["sparsity=0.5"], [], "give the defense with --defense NAME"),
    (["sparsity"], ["prune"], "expected \\[DEFENSE.\\]PARAM=V1,V2"),
    (["sparsity=0.5,,0.9"], ["prune"], "empty value"),
    (["sparsity=0.5,0.5"], ["prune"], "a value is repeated"),
    (["lam=0.1"], ["prune", "weight-decay"], "several defenses \\(prune, weight-decay\\); name one as DEFENSE.lam"),
    (["noise.sigma=1"], ["prune"], "no defense 'noise' among --defense prune"),
    (["sparsity=0.5", "sparsity=0.9"], ["prune"], "prune.sparsity is swept twice"),
    (["sparsity=0.5"], ["prune:sparsity=0.8"], "sparsity is also fixed in --defense"),
    (["a=1", "b=2", "c=3"], ["prune"], "at most two --grid axes"),
    (["seed=0,x"], [], "seeds must be integers >= 0"),
    (["seed=-1"], [], "seeds must be integers >= 0"),
    (["seed=1,01"], [], "a seed is repeated"),
    (["seed=1", "seed=2"], [], "the seed is swept twice"),
])
def test_bad_grids_are_usage_errors(grids, defenses, match):
    with pytest.raises(ParamError, match=match):
        parse_grid(grids, defenses)


def test_sweep_end_to_end_trains_once_writes_table_plot_and_resumes(tmp_path):
    out, cache = tmp_path / "sweeps", tmp_path / "cache"
    args = ["sweep", *SMALL, "--defense", "prune:finetune_epochs=0", "--grid", "sparsity=0.3,0.9",
            "--out", str(out), "--cache-dir", str(cache)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    (sweep,) = list(out.iterdir())
    assert {p.name for p in sweep.iterdir()} == {"sweep.json", "points.jsonl", "runs", "table.md", "tradeoff.png",
                                                 "report.html"}
    page = (sweep / "report.html").read_text()
    assert 'id="tradeoff" alt="trade-off curves" src="data:image/png;base64,' in page and 'id="points"' in page
    for href in re.findall(r'<a href="([^"]+)"', page):  # every point's own report, relative to the sweep
        assert (sweep / href).is_file()
    assert len(re.findall(r'<a href="runs/', page)) == 2
    rows = [json.loads(line) for line in (sweep / "points.jsonl").read_text().splitlines()]
    assert [r["point"] for r in rows] == [{"prune.sparsity": "0.3"}, {"prune.sparsity": "0.9"}]
    sparsity = [r["defenses"][0]["report"]["achieved_sparsity"] for r in rows]
    assert sparsity == pytest.approx([0.3, 0.9], abs=0.01)
    table = (sweep / "table.md").read_text()
    assert table.count("\n") == 4 and "| 0.9 |" in table and "lira AUC [95% CI]" in table
    assert len(list((cache / "populations").iterdir())) == 1  # one population, defended twice
    doc = json.loads((sweep / "sweep.json").read_text())
    assert doc["defenses"] == [["prune:finetune_epochs=0,sparsity=0.3"], ["prune:finetune_epochs=0,sparsity=0.9"]]
    # the same command again: nothing is re-run
    again = CliRunner().invoke(main, args[:-4] + ["--out", str(out), "--cache-dir", str(cache)])
    assert again.exit_code == 0 and "resumed: 2 of 2 points were already done" in again.stderr
    assert len(list((sweep / "runs").glob("2*"))) == 2
    # a cut-short last line: only that point runs again
    lines = (sweep / "points.jsonl").read_text().splitlines()
    (sweep / "points.jsonl").write_text(lines[0] + "\n" + lines[1][:20])
    third = CliRunner().invoke(main, args)
    assert third.exit_code == 0 and "resumed: 1 of 2 points were already done" in third.stderr
    assert len(list((sweep / "runs").glob("2*"))) == 3


def test_an_unusable_point_fails_before_anything_is_trained(tmp_path):
    res = CliRunner().invoke(main, ["sweep", *SMALL, "--defense", "prune", "--grid", "sparsity=0.5,1.5",
                                    "--out", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 2
    assert res.stderr.startswith("Error: defense 'prune") and "1.5" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "s").exists() and not (tmp_path / "c").exists()


def test_two_axes_sweep_their_product(tmp_path):
    res = CliRunner().invoke(main, ["sweep", *SMALL, "--defense", "prune:finetune_epochs=0", "--grid",
                                    "sparsity=0.5,0.8", "--grid", "scope=global,layer", "--no-cache",
                                    "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    (sweep,) = list((tmp_path / "s").iterdir())
    rows = [json.loads(line) for line in (sweep / "points.jsonl").read_text().splitlines()]
    assert [(r["point"]["prune.sparsity"], r["point"]["prune.scope"]) for r in rows] == [("0.5", "global"), ("0.5", "layer"), ("0.8", "global"),
                                                           ("0.8", "layer")]
    assert (sweep / "tradeoff.png").stat().st_size > 10_000


def test_a_regression_population_sweeps_with_mse_as_its_utility(tmp_path):
    res = CliRunner().invoke(main, ["sweep", "--dataset", "diabetes", "--model", "linreg", "--attack", "loss",
                                    "--defense", "noise", "--grid", "sigma=0,0.05", "--n-models", "6", "-q",
                                    "--out", str(tmp_path / "s"), "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    (sweep,) = list((tmp_path / "s").iterdir())
    table = (sweep / "table.md").read_text()
    assert "train MSE | test MSE" in table and (sweep / "tradeoff.png").is_file()
    rows = [json.loads(line) for line in (sweep / "points.jsonl").read_text().splitlines()]
    assert all(r["test_accuracy"] is None and r["test_mse"] > 0 for r in rows)


def test_a_seed_axis_repeats_the_evaluation_and_reports_the_spread(tmp_path):
    """--grid seed=...: each point is the evaluation at that seed (new memberships, initialisations
    and batches), with or without a defense axis, and the mean ± sd across seeds is added."""
    import numpy as np

    import mia_core
    from mia_core.sweep import SEED_AXIS, seed_summary

    axes = parse_grid(["sparsity=0.5,0.9", "seed=3,4"], ["prune:finetune_epochs=0"])
    assert axes[1] == GridAxis(SEED_AXIS, "seed", ("3", "4")) and axes[1].label(["prune"]) == "seed"
    assert point_defenses(["prune:finetune_epochs=0"], axes, ("0.9", "4")) == ("prune:finetune_epochs=0,sparsity=0.9",)
    res = CliRunner().invoke(main, ["sweep", *SMALL, "--grid", "seed=3,4", "--out", str(tmp_path / "s"),
                                    "--cache-dir", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert "mean ± sd across seeds:" in res.stdout
    (sweep,) = list((tmp_path / "s").iterdir())
    rows = [json.loads(line) for line in (sweep / "points.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: r["index"])
    for row, seed in zip(rows, (3, 4)):
        ev = mia_core.evaluate(mia_core.EvalConfig(dataset="digits:n_records=300", model="mlp:width=32", n_models=6,
                                                   targets="first:2", attacks=("lira", "loss"), seed=seed,
                                                   recipe=mia_core.TrainingRecipe(epochs=3)),
                               cache=tmp_path / "c")
        assert row["point"] == {"seed": str(seed)}
        assert row["attacks"]["lira"]["auc"] == ev.metrics["attacks"]["lira"]["auc"]
    aucs = [r["attacks"]["loss"]["auc"] for r in rows]
    want = f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}"
    summary = seed_summary(rows, ["seed"])
    assert want in summary and want in (sweep / "table.md").read_text() and "| 2 |" in summary
    page = (sweep / "report.html").read_text()
    assert 'id="seeds"' in page and want in page
    assert seed_summary(rows, ["prune.sparsity"]) is None
