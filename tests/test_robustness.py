"""Failures inside plugins and unusable input: clean errors, failed runs marked, nothing poisoned."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mia_core import kernels
from mia_core.cli import main
from mia_core.params import ParamError, parse_spec, split_spec
from mia_plugins.defenses.prune import Prune
from plugin_fixtures import faulty, installed

SMALL = ["--dataset", "digits:n_records=200", "--model", "mlp:width=16", "--n-models", "6", "--epochs", "3",
         "--targets", "first:1", "-q"]


@pytest.fixture
def faulty_plugins(tmp_path, monkeypatch):
    with installed(faulty(tmp_path / "site"), monkeypatch):
        yield


def _invoke(tmp_path, *args):
    return CliRunner().invoke(main, ["eval", *SMALL, "--out", str(tmp_path / "runs"),
                                     "--cache-dir", str(tmp_path / "cache"), *args])


def _index(tmp_path):
    con = sqlite3.connect(tmp_path / "runs" / "index.sqlite")
    try:
        return con.execute("SELECT id, status, error FROM runs ORDER BY rowid").fetchall()
    finally:
        con.close()


def _cache_entries(tmp_path):
    root = tmp_path / "cache" / "populations"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.mark.parametrize("args,code,message", [
    (["--attack", "fail-fit"], 1, "attack 'fail-fit' failed: RuntimeError: boom in fit"),
    (["--attack", "fail-score"], 1, "attack 'fail-score' failed: ZeroDivisionError: boom in score"),
    (["--attack", "nan-score"], 1, "attack 'nan-score' failed: score() returned 1 NaN/inf values (first at record 3)"),
    (["--attack", "wrong-shape"], 1, "score() returned shape (201,), expected (200,)"),
    (["--attack", "sneaky"], 1, "declared access ('label',) but read signal 'loss'"),
    (["--attack", "loss", "--defense", "fail-defense"], 1, "defense 'fail-defense' failed: ValueError: boom in apply"),
    (["--attack", "loss", "--model", "fail-model"], 1, "model 'fail-model' failed: MemoryError: boom in build"),
    (["--attack", "interrupt"], 130, "interrupted"),
])
def test_plugin_failure_marks_run_failed_and_poisons_nothing(tmp_path, faulty_plugins, args, code, message):
    res = _invoke(tmp_path, *args)
    assert res.exit_code == code, res.output
    assert message in res.stderr
    if code == 1 and "score()" not in message and "declared access" not in message:
        assert "Traceback" in res.stderr  # the plugin's own traceback, for its author
    runs = tmp_path / "runs"
    assert not [p for p in runs.iterdir() if p.name.endswith(".partial")]
    failed = [p for p in runs.iterdir() if p.name.endswith(".failed")]
    assert len(failed) == 1 and (failed[0] / "FAILED.txt").is_file()
    assert not (failed[0] / "metrics.json").exists()
    status = "interrupted" if code == 130 else "failed"
    assert [row[1] for row in _index(tmp_path)] == [status]
    entries = _cache_entries(tmp_path)
    assert not [e for e in entries if e.startswith(".")]  # no half-written cache entry
    if "fail-model" in args:
        assert entries == []
    else:
        assert len(entries) == 1
    # the cache still serves a good run, bit-identical to one trained from scratch
    good = _invoke(tmp_path, "--attack", "loss", "--json")
    fresh = _invoke(tmp_path, "--attack", "loss", "--json", "--no-cache")
    assert good.exit_code == 0 and fresh.exit_code == 0
    good_doc, fresh_doc = json.loads(good.stdout), json.loads(fresh.stdout)
    assert good_doc.pop("run_dir") != fresh_doc.pop("run_dir") and good_doc == fresh_doc
    assert [row[1] for row in _index(tmp_path)] == [status, "complete", "complete"]


def test_runs_command_lists_index(tmp_path, faulty_plugins):
    _invoke(tmp_path, "--attack", "fail-fit")
    _invoke(tmp_path, "--attack", "loss")
    res = CliRunner().invoke(main, ["runs", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 0
    assert "complete" in res.output and "failed" in res.output and "boom in fit" in res.output
    assert "loss AUC" in res.output


def _write_csv(path, header, rows):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


@pytest.mark.parametrize("make,message", [
    (lambda d: _write_csv(d / "one.csv", ["a", "label"], [[i, 1] for i in range(20)]), "single class"),
    (lambda d: _write_csv(d / "empty.csv", ["a", "label"], []), "is empty (0 records)"),
    (lambda d: _write_csv(d / "frac.csv", ["a", "label"], [[i, i % 2 + 0.5] for i in range(20)]), "labels must be integers"),
    (lambda d: _write_csv(d / "text.csv", ["a", "label"], [[i, "cat"] for i in range(20)]), "'cat' is not a number"),
    (lambda d: _write_csv(d / "nolabel.csv", ["a", "b"], [[i, 1] for i in range(20)]), "no column named 'label'"),
    (lambda d: d / "missing.csv", "does not exist"),
    (lambda d: (np.savez(d / "obj.npz", x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4)), d / "obj.npz")[1],
     "cannot read as a NumPy archive"),
    (lambda d: (np.savez(d / "noy.npz", x=np.zeros((4, 2))), d / "noy.npz")[1], "missing arrays ['y']"),
])
def test_unusable_datasets_are_one_line_usage_errors(tmp_path, make, message):
    path = make(tmp_path)
    res = CliRunner().invoke(main, ["eval", "--dataset", f"file:path={path}", "--n-models", "4", "--epochs", "1",
                                    "--attack", "loss", "-q", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and message in err
    # a usage error found mid-run (the dataset is read once the run started) leaves nothing at all:
    # not the run directory, not an index row, not the index file or the output directory it created
    assert not (tmp_path / "runs").exists()


def test_file_dataset_runs_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 3))
    y = (x[:, 0] > 0).astype(int)
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    res = CliRunner().invoke(main, ["eval", "--dataset", f"file:path={tmp_path / 'mine.npz'}", "--n-models", "4",
                                    "--epochs", "2", "--attack", "loss", "-q", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    assert "pooled over 4 target models" in res.output


# --------------------------------------------------------------------------- fuzzing
@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(alphabet=st.sampled_from("prune:sparsity=,.0123456789-eE+ _aZ\t:=nainf"), max_size=40))
def test_fuzz_parameter_parser_only_raises_param_errors(text):
    try:
        name, raw = split_spec(text)
        parse_spec(text, Prune, label="defense 'prune'")
    except ParamError as exc:
        assert "\n" not in str(exc) and str(exc)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(values=st.dictionaries(st.sampled_from(["sparsity", "scope", "finetune_epochs", "finetune_lr", "include_bias", "x"]),
                              st.text(max_size=8), max_size=4))
def test_fuzz_prune_values_only_raise_param_errors(values):
    from mia_core.params import instantiate

    text = "prune:" + ",".join(f"{k}={v}" for k, v in values.items()) if values else "prune"
    try:
        instantiate(Prune, parse_spec(text, Prune, label="defense 'prune'"), label="defense 'prune'")
    except ParamError as exc:
        assert "\n" not in str(exc)


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.int32, torch.bool, torch.uint8]


@st.composite
def _mask_inputs(draw):
    n = draw(st.integers(0, 4))
    tensors, masks = [], []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        t_dtype = draw(st.sampled_from(_DTYPES))
        m_dtype = draw(st.sampled_from(_DTYPES))
        m_shape = shape if draw(st.booleans()) else tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        t = torch.zeros(shape, dtype=t_dtype) if t_dtype != torch.bool else torch.zeros(shape, dtype=torch.bool)
        if t_dtype.is_floating_point:
            t = torch.randn(shape, dtype=t_dtype) if shape else torch.tensor(1.0, dtype=t_dtype)
        m = torch.ones(m_shape, dtype=m_dtype)
        if draw(st.booleans()) and t.dim() >= 2:
            t = t.transpose(0, 1)
        tensors.append(draw(st.sampled_from([t, t, "not a tensor", None])))
        masks.append(m)
    if draw(st.booleans()) and masks:
        masks = masks[:-1]
    return tensors, masks, draw(st.sampled_from(["auto", "native", "torch", "cuda", ""]))


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_mask_inputs())
def test_fuzz_kernels_python_face_only_raises_clean_errors(inp):
    tensors, masks, backend = inp
    try:
        used = kernels.apply_masks(tensors, masks, backend=backend)
    except (ValueError, TypeError) as exc:
        assert str(exc)
    except RuntimeError as exc:
        assert backend == "native" and "native" in str(exc)
    else:
        assert used in ("native", "torch")


def test_a_data_path_with_a_comma_is_quoted(tmp_path):
    rng = np.random.default_rng(0)
    path = _write_csv(tmp_path / "my,data.csv", ["a", "b", "label"],
                      [[float(rng.normal()), float(rng.normal()), i % 2] for i in range(40)])
    res = CliRunner().invoke(main, ["eval", "--dataset", f'file:path="{path}"', "--model", "logreg", "--n-models",
                                    "2", "--epochs", "1", "--attack", "loss", "-q", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output


def test_a_discarded_run_keeps_an_index_it_did_not_create(tmp_path):
    from mia_core.params import ParamError
    from mia_core.results import RunDir
    from mia_core.runindex import RunIndex

    doc = {"dataset": {"name": "d"}, "model": {"name": "m"}, "n_models": 2, "seed": 0}
    out = tmp_path / "runs"
    with RunDir(out, doc, index=RunIndex(out)):
        pass  # one complete run
    with pytest.raises(ParamError):
        with RunDir(out, doc, index=RunIndex(out), discard_on=(ParamError,)):
            raise ParamError("bad")
    assert [row[1] for row in _index(tmp_path)] == ["complete"]
    assert len([p for p in out.iterdir() if p.is_dir()]) == 1
