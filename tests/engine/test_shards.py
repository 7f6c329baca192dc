"""Populations trained in shards, on every executor, give the single ensemble's metrics; killed
runs and sweeps resume from what they finished."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mia_core
from mia_core.engine.executors import parse_executor
from mia_core.engine.shards import shard_ids
from mia_core.params import ParamError

#: Attack metrics of a population trained in shards differ from the single ensemble's by float
#: rounding only (one-model shards run the GEMMs with other blockings): measured <= 1e-6.
TOL = 1e-5
SMALL = dict(dataset="digits:n_records=400", model="mlp:width=32", n_models=16, attacks=("lira", "loss"),
             recipe=mia_core.TrainingRecipe(epochs=10))


def _leaves(d, path=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, f"{path}.{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, d


def assert_same_metrics(a, b, *, tol=TOL):
    """Every leaf equal; floats within ``tol`` (the per-epoch training losses, averaged per shard,
    included)."""
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    assert la.keys() == lb.keys()
    for k in la:
        if k.startswith(".population.cache_key"):
            continue
        if isinstance(la[k], float) and isinstance(lb[k], float):
            assert abs(la[k] - lb[k]) <= tol, (k, la[k], lb[k])
        else:
            assert la[k] == lb[k], (k, la[k], lb[k])


def test_shard_ids_keep_pairs_together_and_cover_every_model():
    assert shard_ids(16, 4) == [list(range(i, i + 4)) for i in range(0, 16, 4)]
    assert shard_ids(16, 16) == [[i] for i in range(16)]
    for m, s in ((6, 3), (10, 4), (16, 5), (8, 8)):
        groups = shard_ids(m, s)
        assert sum(groups, []) == list(range(m)) and len(groups) == s
        if m // 2 >= s:
            assert all(len(g) % 2 == 0 for g in groups)


@pytest.mark.parametrize("text", ["local", "local:1", "local:4", "dask://127.0.0.1:8786", "dask://sched.example:1"])
def test_executor_specs(text):
    assert parse_executor(text) == text


@pytest.mark.parametrize("text", ["remote", "local:0", "local:x", "dask://nohost", "dask://h:99999", "dask:/h:1"])
def test_bad_executor_specs_are_usage_errors(text):
    with pytest.raises(ParamError, match="--executor must be local, local:N or dask://HOST:PORT|needs N >= 1"):
        parse_executor(text)
    with pytest.raises(ParamError):
        mia_core.evaluate(mia_core.EvalConfig(**SMALL, executor=text))


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return mia_core.evaluate(mia_core.EvalConfig(**SMALL)).metrics


@pytest.mark.parametrize("shards, executor", [(4, "local"), (16, "local"), (4, "local:2")])
def test_shards_give_the_single_ensembles_metrics(single, tmp_path, shards, executor):
    ev = mia_core.evaluate(mia_core.EvalConfig(**SMALL, shards=shards, executor=executor), cache=tmp_path)
    assert_same_metrics(single, ev.metrics)
    assert not [p for p in (tmp_path / "populations").iterdir()
                if json.loads((p / "meta.json").read_text()).get("kind") == "shard"]  # shard entries dropped
    again = mia_core.evaluate(mia_core.EvalConfig(**SMALL), cache=tmp_path)  # the whole population, cached
    assert again.metrics == ev.metrics


def test_shards_on_a_dask_localcluster_give_the_same_metrics(single, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        address = cluster.scheduler_address.split("://", 1)[1]
        ev = mia_core.evaluate(mia_core.EvalConfig(**SMALL, shards=4, executor=f"dask://{address}"), out=tmp_path)
    assert_same_metrics(single, ev.metrics)
    assert json.loads((ev.run_dir / "config.json").read_text())["executor"] == f"dask://{address}"


def test_an_unreachable_scheduler_is_one_clear_line(monkeypatch):
    pytest.importorskip("distributed")
    from mia_core.engine import executors

    monkeypatch.setattr(executors, "CONNECT_TIMEOUT", 1)
    with pytest.raises(ParamError, match=r"--executor dask://127.0.0.1:9: cannot reach a Dask scheduler"):
        mia_core.evaluate(mia_core.EvalConfig(**{**SMALL, "attacks": ("loss",), "n_models": 4}, shards=2,
                                                  executor="dask://127.0.0.1:9"))


# ----------------------------------------------------------------------------------- kill and resume
CMD = [sys.executable, "-m", "mia_core.cli", "eval", "--dataset", "digits:n_records=600", "--model", "mlp:width=64",
       "--n-models", "16", "--epochs", "40", "--attack", "lira", "--shards", "8"]


def _shard_entries(cache: Path):
    root = cache / "populations"
    if not root.is_dir():
        return [], []
    metas = []
    for p in root.iterdir():
        if p.name.startswith("."):  # an entry being written (renamed into place when complete)
            continue
        try:
            metas.append(json.loads((p / "meta.json").read_text()))
        except (OSError, ValueError):
            continue
    return [m for m in metas if m.get("kind") == "shard"], [m for m in metas if m.get("kind") != "shard"]


def _kill_when(proc, ready, timeout=120):
    t0 = time.time()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before it could be killed mid-way")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("no progress to kill at")
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_a_killed_eval_resumes_from_its_finished_shards(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(CMD + ["--out", str(tmp_path / "full"), "--no-cache", "-q"], env=env,
                          capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    cache = tmp_path / "cache"
    proc = subprocess.Popen(CMD + ["--out", str(tmp_path / "runs"), "--cache-dir", str(cache), "-q"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: len(_shard_entries(cache)[0]) >= 2)
    shards, whole = _shard_entries(cache)
    assert 2 <= len(shards) < 8 and not whole  # killed mid-population
    again = subprocess.run(CMD + ["--out", str(tmp_path / "runs"), "--cache-dir", str(cache)], env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {len(shards)} of 8 shards are already trained" in again.stderr
    runs = lambda d: [p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")]  # noqa: E731
    (done,) = runs(tmp_path / "runs")  # the killed run left only a .partial directory
    (reference,) = runs(tmp_path / "full")
    assert (done / "metrics.json").read_bytes() == (reference / "metrics.json").read_bytes() or \
        assert_same_metrics(json.loads((reference / "metrics.json").read_text()),
                            json.loads((done / "metrics.json").read_text())) is None


@pytest.mark.slow
def test_a_killed_sweep_resumes_from_its_finished_points(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mia_core.cli", "sweep", "--dataset", "digits:n_records=400", "--model", "mlp:width=32",
           "--n-models", "6", "--epochs", "20", "--attack", "lira", "--defense", "prune:finetune_epochs=3",
           "--grid", "sparsity=0.2,0.5,0.8", "-q"]
    full = subprocess.run(cmd + ["--out", str(tmp_path / "full"), "--cache-dir", str(tmp_path / "c1")], env=env,
                          capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    out = tmp_path / "sweeps"
    proc = subprocess.Popen(cmd + ["--out", str(out), "--cache-dir", str(tmp_path / "c2")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = lambda: [p / "points.jsonl" for p in out.glob("sweep-*") if (p / "points.jsonl").is_file()]  # noqa: E731
    _kill_when(proc, lambda: any(f.read_text().count("\n") >= 1 for f in lines()))
    again = subprocess.run(cmd + ["--out", str(out), "--cache-dir", str(tmp_path / "c2")], env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "resumed: " in again.stderr and "of 3 points were already done" in again.stderr
    rows = lambda d: [{k: v for k, v in json.loads(line).items() if k != "run_dir"}  # noqa: E731
                      for line in next(d.glob("sweep-*/points.jsonl")).read_text().splitlines()]
    assert sorted(rows(out), key=lambda r: r["index"]) == sorted(rows(tmp_path / "full"), key=lambda r: r["index"])


@pytest.mark.parametrize("executor", ["local:2", "dask"])
def test_sweep_points_run_as_jobs_on_an_executor(tmp_path, executor):
    """Each point's population is trained (and cached) first; then each point runs as one job; the
    points' numbers equal the same sweep run in this process."""
    from mia_core.sweep import parse_grid, run_sweep

    base = mia_core.EvalConfig(**{**SMALL, "n_models": 6, "attacks": ("lira",)},
                               defenses=("prune:finetune_epochs=0",))
    axes = parse_grid(["sparsity=0.3,0.9"], base.defenses)
    here = run_sweep(base, axes, out=tmp_path / "here", cache=tmp_path / "c1")
    if executor == "dask":
        distributed = pytest.importorskip("distributed")
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                      dashboard_address=None) as cluster:
            spec = "dask://" + cluster.scheduler_address.split("://", 1)[1]
            there = run_sweep(dataclasses.replace(base, executor=spec), axes, out=tmp_path / "there",
                              cache=tmp_path / "c2")
    else:
        there = run_sweep(dataclasses.replace(base, executor=executor), axes, out=tmp_path / "there",
                          cache=tmp_path / "c2")
    strip = lambda rows: [{k: v for k, v in r.items() if k != "run_dir"} for r in rows]  # noqa: E731
    assert strip(there.rows) == strip(here.rows)
    assert all((Path(r["run_dir"]) / "report.html").is_file() for r in there.rows)
    assert (there.directory / "report.html").is_file()
