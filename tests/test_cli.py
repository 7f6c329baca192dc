"""End-to-end tests of the command line: eval, list, info, and their usage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from mia_core.cli import main
from plugin_fixtures import third_party

SMALL = ["--dataset", "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6", "--epochs", "8",
         "--targets", "first:2", "-q"]


def _eval(tmp_path, *args, out="runs"):
    runner = CliRunner()
    res = runner.invoke(main, ["eval", *SMALL, "--out", str(tmp_path / out), *args], catch_exceptions=False)
    return res


def _run_dir(tmp_path, out="runs"):
    dirs = [d for d in (tmp_path / out).iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_eval_end_to_end_writes_run_directory(tmp_path):
    res = _eval(tmp_path, "--attack", "lira", "--attack", "loss", "--defense", "prune:sparsity=0.5")
    assert res.exit_code == 0, res.output
    assert "AUC" in res.output and "TPR@0.1% FPR" in res.output and "defense prune" in res.output
    run = _run_dir(tmp_path)
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.json", "scores.npz", "roc.png", "report.html",
                                                "config.toml"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["defenses"][0]["params"]["sparsity"] == 0.5
    assert cfg["defenses"][0]["params"]["scope"] == "global"  # defaults resolved
    assert cfg["model"]["params"] == {"width": 32, "depth": 1, "activation": "relu"}
    # the targets as the user gave them, never an array that grows with the population
    assert cfg["targets"] == "first:2" and cfg["n_targets"] == 2
    assert all(not isinstance(v, list) or len(v) < 20 for v in cfg.values())
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["attacks"]) == {"lira", "loss"}
    lira = m["attacks"]["lira"]
    assert 0 <= lira["auc"] <= 1 and lira["n_members"] + lira["n_nonmembers"] == 2 * 300
    assert m["defenses"][0]["report"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    with np.load(run / "scores.npz", allow_pickle=False) as z:
        assert z["scores__lira"].shape == (2, 300)
        assert z["membership"].shape == (2, 300) and z["membership"].dtype == bool
        assert (z["membership"].sum(axis=1) > 100).all()
    assert (run / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_identical_metrics(tmp_path):
    args = ["--attack", "lira", "--attack", "loss", "--defense", "prune:sparsity=0.3,finetune_epochs=1", "--seed", "5"]
    assert _eval(tmp_path, *args, out="a").exit_code == 0
    assert _eval(tmp_path, *args, out="b").exit_code == 0  # second run: population from the cache
    assert _eval(tmp_path, *args, "--no-cache", out="c").exit_code == 0
    a, b, c = ((_run_dir(tmp_path, o) / "metrics.json").read_bytes() for o in "abc")
    assert a == b == c
    assert _eval(tmp_path, "--attack", "lira", "--seed", "6", out="d").exit_code == 0
    assert (_run_dir(tmp_path, "d") / "metrics.json").read_bytes() != a


def test_json_output(tmp_path):
    res = _eval(tmp_path, "--attack", "loss", "--json")
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert doc["schema_version"] == 2 and "loss" in doc["attacks"]
    run = _run_dir(tmp_path)
    assert doc.pop("run_dir") == str(run)  # printed, but not in the file (which stays path-free)
    assert doc == json.loads((run / "metrics.json").read_text())


def test_long_input_is_not_echoed_back_whole_and_list_marks_cut_lines(tmp_path):
    res = _eval(tmp_path, "--attack", "x" * 300)
    assert res.exit_code == 2 and "…" in res.output and len(res.output.splitlines()[0]) < 200
    res = _eval(tmp_path, "--attack", "lira:" + "y" * 300 + "=1")
    assert res.exit_code == 2 and "…" in res.output and len(res.output.splitlines()[0]) < 200
    out = CliRunner().invoke(main, ["list", "--kind", "defenses"]).output
    assert any(line.endswith("…") for line in out.splitlines())


@pytest.mark.parametrize("args,message", [
    (["--attack", "lirra"], "unknown attack 'lirra'. Did you mean 'lira'?"),
    (["--defense", "prune:sparsity=1.5"], "defense 'prune': sparsity must be in [0, 1), got 1.5"),
    (["--defense", "prune:sparsty=0.5"], "unknown parameter 'sparsty' (did you mean 'sparsity'?)"),
    (["--defense", "prune:sparsity"], "malformed parameter 'sparsity'"),
    (["--defense", "prune:sparsity=high"], "sparsity='high' must be a number"),
    (["--attack", "lira:online=perhaps"], "must be a boolean"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--n-models", "5"], "--n-models must be an even integer >= 2, got 5"),
    (["--attack", "lira", "--n-models", "4"], "needs at least 4 reference models besides the target and its partner: use --n-models 6"),
    (["--targets", "9"], "--targets indices must be in [0, 6)"),
    (["--epochs", "-1"], "epochs must be an integer >= 0"),
    (["--attack", "loss", "--attack", "loss"], "given twice"),
])
def test_usage_errors_are_one_line_exit_2(tmp_path, args, message):
    res = CliRunner().invoke(main, ["eval", *SMALL, "--out", str(tmp_path / "runs"), *args])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and "Traceback" not in err
    assert message in err
    assert not (tmp_path / "runs").exists()  # nothing written for a rejected command


def test_list_and_info():
    res = CliRunner().invoke(main, ["list"])
    assert res.exit_code == 0
    for name in ("lira", "loss", "prune", "digits", "breast-cancer", "mlp", "logreg"):
        assert name in res.output
    res = CliRunner().invoke(main, ["info", "lira"])
    assert res.exit_code == 0
    assert "online: bool = True" in res.output and "access: ('probs',)" in res.output and "Carlini" in res.output
    res = CliRunner().invoke(main, ["info", "prunee"])
    assert res.exit_code == 2 and "Did you mean 'prune'?" in res.stderr


def test_installed_command_with_broken_third_party_plugin(tmp_path):
    """The real console script, in a fresh interpreter that sees a broken and a working plugin."""
    site = third_party(tmp_path / "site")
    env = dict(os.environ, PYTHONPATH=str(site) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    exe = [sys.executable, "-m", "mia_core.cli"]
    out = subprocess.run(exe + ["list", "--kind", "attacks", "-v"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "[BROKEN] ImportError: this plugin needs libfoo" in out.stdout
    assert "[INCOMPATIBLE]" in out.stdout and "from miafw-testplugins 0.0.1" in out.stdout
    out = subprocess.run(exe + ["eval", *SMALL, "--out", str(tmp_path / "r"), "--attack", "broken"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "libfoo" in out.stderr and "Traceback" not in out.stderr
    # the third party's working attack runs end to end next to a built-in one
    out = subprocess.run(exe + ["eval", *SMALL, "--out", str(tmp_path / "r"), "--attack", "tp-confidence",
                                "--attack", "lira"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tp-confidence" in out.stdout


def test_bench_command_json_and_errors():
    res = CliRunner().invoke(main, ["bench", "--kernel", "mask", "--size", "2000", "--repeat", "3", "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    rows = doc["results"]
    assert rows and {r["kernel"] for r in rows} == {"mask"}
    assert all(r["seconds"] > 0 for r in rows)
    assert any(r["ratio"] is not None and r["variant"] != r["baseline"] for r in rows)
    for bad, msg in ((["--kernel", "nope"], "unknown kernel 'nope'"), (["--size", "abc"], "is not a number"),
                     (["--size", "0"], "whole number")):
        res = CliRunner().invoke(main, ["bench", *bad])
        assert res.exit_code == 2 and msg in res.stderr


def test_eval_with_an_estimator_prints_it_under_the_attacks(tmp_path, monkeypatch):
    from plugin_fixtures import estimators, installed

    with installed(estimators(tmp_path / "site"), monkeypatch):
        res = _eval(tmp_path, "--attack", "lira", "--estimator", "test-tv:bins=10")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("estimator"))
    assert "advantage bound" in lines[head] and "best measured advantage (lira)" in lines[head]
    assert lines[head + 2].startswith("test-tv:bins=10")
    assert head > next(i for i, line in enumerate(lines) if line.startswith("lira"))  # under the attacks
    m = json.loads((_run_dir(tmp_path) / "metrics.json").read_text())
    est = m["estimators"]["test-tv:bins=10"]
    assert est["params"] == {"bins": 10, "n_boot": 50} and 0 <= est["advantage_bound"] <= 1
    cfg = json.loads((_run_dir(tmp_path) / "config.json").read_text())
    assert cfg["estimators"] == [{"label": "test-tv:bins=10", "name": "test-tv", "params": {"bins": 10, "n_boot": 50}}]


@pytest.mark.parametrize("args,match", [
    (["--estimator", "nope"], "unknown estimator 'nope'"),
    (["--device", "tpu"], "--device must be one of cpu, cuda, cuda:N, auto; got 'tpu'"),
    (["--sampler", "poisson", "--sampling-rate", "1.5"], "sampling_rate must be in (0, 1], got 1.5"),
])
def test_eval_usage_errors_for_estimators_devices_and_samplers(tmp_path, args, match):
    res = _eval(tmp_path, "--attack", "loss", *args)
    assert res.exit_code == 2 and match in res.output and "Traceback" not in res.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("args,code,match", [
    (["--seed", "-1"], 2, "--seed must be an integer >= 0, got -1"),
    (["--seed", str(2**64)], 2, "--seed must be an integer >= 0"),
    (["--dataset", "digits:n_records=4", "--n-models", "40", "--targets", "first:1"], 2, "draws no training record"),
    (["--defense", "weight-decay:lam=1e300"], 1, "left non-finite weights"),
    (["--n-models", "100000000"], 2, "use fewer --n-models or a smaller --batch-size"),
    (["--batch-size", str(10**12)], 2, "use fewer --n-models or a smaller --batch-size"),
])
def test_eval_bad_settings_fail_cleanly(tmp_path, args, code, match):
    res = _eval(tmp_path, "--attack", "loss", *args)
    assert res.exit_code == code and match in res.output, res.output
    assert "Traceback" not in res.output or code == 1


def test_cache_command_lists_verifies_and_clears(tmp_path):
    cache = ["--cache-dir", str(tmp_path / "cache")]
    runner = CliRunner()
    assert "no cached populations" in runner.invoke(main, ["cache", "ls", *cache]).output
    assert _eval(tmp_path, "--attack", "loss", *cache).exit_code == 0
    res = runner.invoke(main, ["cache", "ls", *cache])
    assert res.exit_code == 0 and "digits/mlp x6 seed 0  ok" in res.output
    assert runner.invoke(main, ["cache", "verify", *cache]).exit_code == 0
    (entry,) = (tmp_path / "cache" / "populations").iterdir()
    data = bytearray((entry / "population.pt").read_bytes())
    data[len(data) // 2] ^= 1
    (entry / "population.pt").write_bytes(bytes(data))
    res = runner.invoke(main, ["cache", "verify", *cache])
    assert res.exit_code == 1 and "DAMAGED: population.pt does not match its checksum" in res.output
    # the eval reports the damage in one line, retrains and replaces the entry
    res = _eval(tmp_path, "--attack", "loss", *cache, out="again")
    assert res.exit_code == 0 and "is damaged (population.pt does not match its checksum); retraining" in res.output
    assert "Traceback" not in res.output
    assert runner.invoke(main, ["cache", "verify", *cache]).exit_code == 0
    assert runner.invoke(main, ["cache", "clear", *cache], input="n\n").exit_code == 2
    res = runner.invoke(main, ["cache", "clear", "--yes", *cache])
    assert res.exit_code == 0 and "deleted 1 cached populations" in res.output
    assert "no cached populations" in runner.invoke(main, ["cache", "ls", *cache]).output


def _start_long_eval(out):
    """A real `miafw eval` process that trains long enough to be stopped, once its run has started."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "mia_core.cli", "eval", "--attack", "loss", "--dataset",
                             "digits:n_records=200", "--model", "mlp:width=16", "--n-models", "4", "--epochs",
                             "100000", "--no-cache", "-q", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out.is_dir() and any(p.name.endswith(".partial") for p in out.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    return proc


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    import signal

    from mia_core.runindex import RunIndex

    proc = _start_long_eval(tmp_path / "runs")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated (run marked interrupted" in err
    assert "Traceback" not in err
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert run.name.endswith(".failed") and (run / "FAILED.txt").is_file()
    (row,) = RunIndex(tmp_path / "runs").list()
    assert row["status"] == "interrupted" and row["finished"] is not None


def test_a_killed_run_shows_as_interrupted_and_prune_removes_it(tmp_path):
    proc = _start_long_eval(tmp_path / "runs")
    proc.kill()
    proc.communicate(timeout=60)
    runner = CliRunner()
    res = runner.invoke(main, ["runs", "--out", str(tmp_path / "runs")])
    assert "interrupted" in res.output and f"process {proc.pid}" in res.output
    res = runner.invoke(main, ["runs", "--out", str(tmp_path / "runs"), "--prune"])
    assert res.exit_code == 0 and "removed 1 interrupted run(s)" in res.output
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "runs").iterdir())
    assert "no runs recorded" in runner.invoke(main, ["runs", "--out", str(tmp_path / "runs")]).output


def test_an_index_of_schema_1_is_migrated(tmp_path):
    import sqlite3

    from mia_core.runindex import RunIndex

    (tmp_path / "runs").mkdir()
    con = sqlite3.connect(tmp_path / "runs" / "index.sqlite")
    con.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, status TEXT NOT NULL CHECK (status IN ('running', "
                "'complete', 'failed')), created TEXT NOT NULL, finished TEXT, path TEXT NOT NULL, dataset TEXT, "
                "model TEXT, attacks TEXT, defenses TEXT, n_models INTEGER, seed INTEGER, summary TEXT, error TEXT)")
    con.execute("INSERT INTO runs (id, status, created, finished, path) VALUES ('old', 'complete', 'then', 'then', 'p')")
    con.execute("PRAGMA user_version = 1")
    con.commit()
    con.close()
    index = RunIndex(tmp_path / "runs")
    assert [(r["id"], r["status"], r["pid"]) for r in index.list()] == [("old", "complete", None)]
    index.finish("old", "interrupted", tmp_path)  # the new status is accepted after the migration
    assert index.list()[0]["status"] == "interrupted"


def test_an_unusable_output_directory_is_refused_before_training(tmp_path):
    (tmp_path / "a-file").write_text("not a directory")
    res = CliRunner().invoke(main, ["eval", *SMALL, "--attack", "loss", "--out", str(tmp_path / "a-file" / "runs")])
    assert res.exit_code == 2 and "is not a writable directory" in res.output


def test_non_adaptive_defends_the_targets_only(tmp_path):
    """--non-adaptive: the attacker's references are the undefended models, the targets defended."""
    from mia_core import EvalConfig
    from mia_core.engine import AttackContext, SignalContext
    from mia_core.engine.stages import apply_defenses, compute_signals, load_records, resolve, train_population
    from mia_core.engine.trainer import TrainingRecipe

    common = ["--attack", "lira", "--attack", "loss", "--defense", "prune:sparsity=0.8,finetune_epochs=0"]
    adaptive = json.loads(_eval(tmp_path, *common, "--json", out="a").stdout)
    res = _eval(tmp_path, *common, "--non-adaptive", "--json", out="n")
    assert res.exit_code == 0, res.output
    non = json.loads(res.stdout)
    assert adaptive["adaptive"] is True and non["adaptive"] is False
    assert json.loads((_run_dir(tmp_path, "n") / "config.json").read_text())["adaptive"] is False
    assert non["attacks"]["loss"] == adaptive["attacks"]["loss"]  # no references: nothing changes
    assert non["attacks"]["lira"]["auc"] != adaptive["attacks"]["lira"]["auc"]
    table = _eval(tmp_path, *common, "--non-adaptive", out="t")
    assert "attacker: non-adaptive" in table.output
    # the views: references from the undefended population, the target from the defended one
    plan = resolve(EvalConfig(attacks=("lira",), defenses=("prune:sparsity=0.8,finetune_epochs=0",),
                              dataset="digits:n_records=300", model="mlp:width=32", n_models=6,
                              recipe=TrainingRecipe(epochs=3)))
    trained = train_population(plan, load_records(plan), cache=None)
    defended = apply_defenses(plan, trained.population)
    und, dfd = compute_signals(trained.population), compute_signals(defended.population)
    refs = SignalContext(trained.population, ("logits",), signals=und)
    ctx = AttackContext(defended.population, ("logits",), signals=dfd, references=refs)
    view = ctx.for_target(0)
    assert not ctx.adaptive
    # the undefended population also holds each target's undefended twin: no public way to it
    assert [n for n in dir(ctx) if "reference" in n and not n.startswith("_")] == ["references"]  # model ids only
    assert np.array_equal(view.ref_signal("confidence"), und.confidence[view.references])
    assert np.array_equal(view.target_signal("confidence"), dfd.confidence[0])
