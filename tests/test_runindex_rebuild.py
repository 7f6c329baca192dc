"""The run directories are the record: `miafw runs` rebuilds a missing or corrupt index from them,
and filters the runs by dataset, attack, defense, status and date."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from click.testing import CliRunner

from mia_core.cli import main
from mia_core.runindex import RunIndex

SMALL = ["--model", "mlp:width=16", "--n-models", "6", "--epochs", "2", "-q", "--targets", "first:1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    for extra in (["--dataset", "digits:n_records=200", "--attack", "lira"],
                  ["--dataset", "breast-cancer", "--attack", "loss", "--defense", "prune:finetune_epochs=0"]):
        res = CliRunner().invoke(main, ["eval", *SMALL, *extra, "--out", str(out), "--no-cache"])
        assert res.exit_code == 0, res.output
    return out


def _ids(out, *args):
    res = CliRunner().invoke(main, ["runs", "--out", str(out), "--format", "json", *args])
    assert res.exit_code == 0, res.output
    return [r["dataset"] for r in json.loads(res.stdout)]


def test_filters(runs):
    today = time.strftime("%Y-%m-%d")
    assert _ids(runs) == ["breast-cancer", "digits"]
    assert _ids(runs, "--dataset", "digits") == ["digits"]
    assert _ids(runs, "--attack", "loss") == ["breast-cancer"]
    assert _ids(runs, "--defense", "prune") == ["breast-cancer"]
    assert _ids(runs, "--status", "failed") == []
    assert _ids(runs, "--since", today) == ["breast-cancer", "digits"]
    assert _ids(runs, "--until", "2000-01-01") == []
    res = CliRunner().invoke(main, ["runs", "--out", str(runs), "--since", "yesterday"])
    assert res.exit_code == 2 and "--since 'yesterday': expected a date YYYY-MM-DD" in res.stderr


def test_a_missing_or_corrupt_index_is_rebuilt_from_the_run_directories(runs, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(runs, out)
    before = {r["id"]: r for r in RunIndex(out).list()}
    (out / "index.sqlite").unlink()
    after = {r["id"]: r for r in RunIndex(out).list()}
    assert set(after) == set(before)
    for k, r in after.items():
        assert r["status"] == "complete" and r["summary"] == before[k]["summary"]
        assert (r["dataset"], r["model"], r["attacks"], r["defenses"]) == \
            (before[k]["dataset"], before[k]["model"], before[k]["attacks"], before[k]["defenses"])
    (out / "index.sqlite").write_bytes(b"this is not a database" * 100)
    assert {r["id"] for r in RunIndex(out).list()} == set(before)
    assert len(list(out.glob("index.sqlite.corrupt-*"))) == 1  # kept aside, not deleted
    # a failed and an interrupted run are found as such
    first = sorted(before)[0]
    shutil.copytree(out / first, out / "20990101-000000-deadbeef.failed")
    (out / "20990101-000000-deadbeef.failed" / "FAILED.txt").write_text("Traceback ...\nRuntimeError: boom\n")
    shutil.copytree(out / first, out / ".20990101-000001-cafecafe.partial")
    (out / ".20990101-000001-cafecafe.partial" / "metrics.json").unlink()
    res = CliRunner().invoke(main, ["runs", "--out", str(out), "--rebuild", "--format", "json"])
    assert res.exit_code == 0 and "rebuilt the index" in res.stderr
    rows = {r["id"]: r for r in json.loads(res.stdout)}
    assert rows["20990101-000000-deadbeef"]["status"] == "failed"
    assert rows["20990101-000000-deadbeef"]["error"] == "RuntimeError: boom"
    assert rows["20990101-000001-cafecafe"]["status"] == "interrupted"
    assert CliRunner().invoke(main, ["runs", "--out", str(out), "--prune"]).exit_code == 0
    assert not (out / ".20990101-000001-cafecafe.partial").exists()
