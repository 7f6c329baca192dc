"""`miafw audit` end to end: the release gate's exit statuses and one clear line per bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from audit_helpers import digits, half, mlp, save_target, train_plain
from click.testing import CliRunner

from mia_core.cli import main

SMALL = ["--dataset", "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6", "--epochs", "30", "-q"]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A leaky target: 30 epochs of a plain torch loop on half of 300 digits."""
    d = tmp_path_factory.mktemp("target")
    x, y = digits(300)
    members = half(len(y), seed=2)
    torch.manual_seed(2)
    files = save_target(d, train_plain(mlp(64, 10, 32), x, y, members, epochs=30, seed=2), x, members)
    return {k: str(v) for k, v in files.items()}


def _audit(target, tmp_path, *args, source="weights"):
    opt = "--weights" if source == "weights" else "--predictions"
    return CliRunner().invoke(main, ["audit", opt, target[source], "--members", target["members"], *SMALL,
                                     "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"), *args])


def test_the_gate_fails_a_leaky_model_with_a_tight_budget_and_passes_a_loose_one(target, tmp_path):
    tight = _audit(target, tmp_path, "--attack", "lira", "--attack", "loss", "--budget", "auc<=0.5")
    assert tight.exit_code == 3, tight.output
    assert "budget 'auc<=0.5' broken by attack 'lira'" in tight.stderr
    loose = _audit(target, tmp_path, "--attack", "lira", "--attack", "loss", "--budget", "auc<=1",
                   "--budget", "tpr@10%<=1")
    assert loose.exit_code == 0, loose.output
    assert "budget: every attack within auc<=1, tpr@10%<=1" in loose.stderr
    assert "target: weights target.pt (sha256 " in loose.stdout and "; 4 reference models" in loose.stdout


def test_audit_writes_a_run_directory_with_the_targets_provenance(target, tmp_path):
    res = _audit(target, tmp_path, "--json", source="logits")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    src = doc["audit"]["source"]
    assert src["kind"] == "predictions" and src["outputs"] == "logits"
    assert src["sha256"] == hashlib.sha256(open(target["logits"], "rb").read()).hexdigest()
    assert doc["audit"]["members"] + doc["audit"]["non_members"] == 300
    # no --attack: every registered attack (a logits file answers all the built-in ones)
    assert {"lira", "rmia", "bavaria", "loss", "shadow", "quantile"} <= set(doc["attacks"])
    run = tmp_path / "runs" / doc["run_dir"].split("/")[-1]
    config = json.loads((run / "config.json").read_text())
    assert config["command"] == "audit" and config["target"]["sha256"] == src["sha256"]
    assert config["reference_models"] == 4 and (run / "scores.npz").is_file() and (run / "roc.png").is_file()
    with np.load(run / "scores.npz") as z:
        assert z["membership"].shape == (1, 300) and z["targets"].tolist() == [0]


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_bad_inputs_get_one_line_and_exit_status_2(target, tmp_path):
    # a malformed budget
    _one_line_error(_audit(target, tmp_path, "--budget", "auc=0.5"), "--budget 'auc=0.5': expected")
    # a checkpoint that does not fit the architecture
    _one_line_error(_audit(target, tmp_path, "--model", "mlp:width=16"),
                    "does not fit model 'mlp:width=16'", "mis-shaped 0.bias (32,) (expected (16,))")
    # a members file with unknown ids
    bad = tmp_path / "members.txt"
    bad.write_text("0\n1\n300\n12345\n")
    res = CliRunner().invoke(main, ["audit", "--weights", target["weights"], "--members", str(bad), *SMALL,
                                    "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    _one_line_error(res, "2 id(s) not in dataset 'digits' (first: 300, 12345)")
    # a predictions file of the wrong shape
    np.savez(tmp_path / "short.npz", logits=np.zeros((299, 10)))
    res = CliRunner().invoke(main, ["audit", "--predictions", str(tmp_path / "short.npz"), "--members",
                                    target["members"], *SMALL, "--out", str(tmp_path / "runs"),
                                    "--cache-dir", str(tmp_path / "cache")])
    _one_line_error(res, "logits have shape (299, 10)", "expected (300, 10)")
    # neither or both kinds of target; an attack the file cannot answer; --model with --module
    _one_line_error(CliRunner().invoke(main, ["audit", "--members", target["members"], *SMALL]), "exactly one of")
    _one_line_error(_audit(target, tmp_path, "--attack", "lira:augment=mirror", source="probs"),
                    "queries the target on inputs other than the records")
    _one_line_error(_audit(target, tmp_path, "--module", "x.y:Z"), "--model or as --module, not both")
    _one_line_error(_audit(target, tmp_path, "--module-arg", "hidden"), "--module-arg 'hidden': expected NAME=VALUE")
    # nothing was trained and no run directory was left behind
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
