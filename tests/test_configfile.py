"""Config files: `miafw eval --config`, the config.toml every run writes, and exact reproduction."""

from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import mia_core
from mia_core import configfile
from mia_core.cli import main
from mia_core.params import ParamError

SMALL = ["--dataset", "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6", "--epochs", "5", "-q",
         "--attack", "lira", "--attack", "loss:threshold=yeom", "--defense", "prune:sparsity=0.5,finetune_epochs=1"]

texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=60, deadline=None)
@given(attacks=st.lists(texts, max_size=3), dataset=texts, n_models=st.integers(0, 10**6), seed=st.integers(0, 2**62),
       adaptive=st.booleans(), fprs=st.lists(finite, max_size=3), lr=finite, rate=st.one_of(st.none(), finite),
       confidence=finite)
def test_a_written_config_reads_back_to_the_same_config(attacks, dataset, n_models, seed, adaptive, fprs, lr, rate,
                                                          confidence):
    c = mia_core.EvalConfig(attacks=tuple(attacks), dataset=dataset, n_models=n_models, seed=seed, adaptive=adaptive,
                            fprs=tuple(fprs), confidence=confidence,
                            recipe=mia_core.TrainingRecipe(lr=lr, sampling_rate=rate))
    back = configfile.from_dict(__import__("tomllib").loads(configfile.dump(c)))
    assert back == dataclasses.replace(c, fprs=tuple(float(f) for f in fprs))


def _run(tmp_path, name, *args):
    res = CliRunner().invoke(main, ["eval", *args, "--out", str(tmp_path / name), "--no-cache"])
    assert res.exit_code == 0, res.output
    return next(p for p in (tmp_path / name).iterdir() if p.is_dir())


def test_a_runs_config_toml_reproduces_its_metrics_byte_for_byte(tmp_path):
    first = _run(tmp_path, "a", *SMALL, "--budget", "tpr@5%<=1", "--seed", "3")
    again = _run(tmp_path, "b", "--config", str(first / "config.toml"))
    assert (again / "metrics.json").read_bytes() == (first / "metrics.json").read_bytes()
    a, b = (json.loads((d / "config.json").read_text()) for d in (first, again))
    a.pop("argv"), b.pop("argv")
    assert a == b and a["seed"] == 3 and 0.05 in a["fprs"]


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('attacks = ["loss"]\ndataset = "digits:n_records=300"\nmodel = "mlp:width=32"\nn_models = 4\n'
                    'seed = 5\n[recipe]\nepochs = 3\nlr = 0.01\n')
    run = _run(tmp_path, "r", "--config", str(path), "--seed", "7", "--epochs", "2", "-q")
    doc = json.loads((run / "config.json").read_text())
    assert doc["seed"] == 7 and doc["recipe"]["epochs"] == 2  # typed: they win
    assert doc["recipe"]["lr"] == 0.01 and doc["n_models"] == 4 and doc["attacks"][0]["label"] == "loss"  # the file
    assert configfile.load(run / "config.toml").seed == 7


@pytest.mark.parametrize("text, match", [
    ("atacks = ['lira']\n", "unknown key 'atacks'; valid keys: attacks, defenses"),
    ("[recipe]\nepoch = 3\n", "unknown key 'recipe.epoch'; valid recipe keys: epochs, batch_size"),
    ("n_models = '16'\n", "n_models must be an integer, got '16'"),
    ("attacks = 'lira'\n", "attacks must be a list of strings, got 'lira'"),
    ("adaptive = 1\n", "adaptive must be a boolean"),
    ("seed = \n", "not valid TOML"),
])
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ParamError, match=match):
        configfile.load(path)
    res = CliRunner().invoke(main, ["eval", "--config", str(path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and match.split(";")[0] in res.stderr
    assert not (tmp_path / "r").exists()


def test_an_audit_runs_config_toml_repeats_the_audit_from_anywhere(tmp_path, monkeypatch):
    from audit_helpers import digits, half, mlp, save_target, train_plain

    x, y = digits(300)
    members = half(300)
    files = save_target(tmp_path / "t", train_plain(mlp(64, 10, 32), x, y, members, epochs=10), x, members)
    monkeypatch.chdir(tmp_path / "t")  # relative paths on the command line
    res = CliRunner().invoke(main, ["audit", "--weights", "target.pt", "--members", "members.txt", "--dataset",
                                    "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6",
                                    "--epochs", "10", "--attack", "lira", "--attack", "loss", "--no-cache", "-q",
                                    "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    first = next(p for p in (tmp_path / "a").iterdir() if p.is_dir())
    cfg = configfile.load_audit(first / "config.toml")
    assert cfg.weights == str(files["weights"].resolve()) and cfg.members == str(files["members"].resolve())
    assert cfg.evaluation.attacks == ("lira", "loss")
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["audit", "--config", str(first / "config.toml"), "--no-cache", "-q",
                                    "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    again = next(p for p in (tmp_path / "b").iterdir() if p.is_dir())
    assert (again / "metrics.json").read_bytes() == (first / "metrics.json").read_bytes()
    with pytest.raises(ParamError, match=r"holds an \[audit\] table"):
        configfile.load(first / "config.toml")
