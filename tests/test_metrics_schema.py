"""The metrics.json schema (mia_core/schemas/metrics.schema.json): a valid draft 2020-12 schema at
the results' SCHEMA_VERSION, met by the documents real runs write (eval with train-time and
post-training defenses, an estimator and a budget; regression; an audit), refusing broken ones
with the JSON path named, and documented key by key in docs/metrics-schema.md."""

from __future__ import annotations

import copy
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

import mia_core
from mia_core import schema
from mia_core.cli import main
from mia_core.results import SCHEMA_VERSION
from mia_core.schema import SCHEMA_PATH, load_schema, validate_metrics

jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "metrics-schema.md"


# ---------------------------------------------------------------------------------------- documents
@pytest.fixture(scope="module")
def eval_doc(tmp_path_factory):
    """metrics.json as `miafw eval` writes it: two attacks, a train-time (dp-sgd) and a
    post-training (prune) defense, an estimator and a budget, so dp_audit and budget are there."""
    out = tmp_path_factory.mktemp("eval")
    result = CliRunner().invoke(main, [
        "eval", "--dataset", "digits:n_records=200", "--model", "mlp:width=16", "--n-models", "6",
        "--epochs", "2", "-q", "--attack", "lira", "--attack", "loss", "--estimator", "kl-leakage:source=signal",
        "--defense", "dp-sgd", "--defense", "prune:sparsity=0.5", "--budget", "auc<=1", "--out", str(out),
        "--no-cache",
    ])
    assert result.exit_code == 0, result.output
    (path,) = out.glob("*/metrics.json")
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def regression_doc():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # too few non-members for 0.1% FPR: expected at this size
        ev = mia_core.evaluate(mia_core.EvalConfig(dataset="diabetes", model="linreg", attacks=("loss",), n_models=4))
    return ev.metrics


@pytest.fixture(scope="module")
def audit_doc(tmp_path_factory):
    """An audit of a target trained by a plain torch loop, known by its predicted probabilities."""
    import torch
    from audit_helpers import digits, half, mlp, save_target, train_plain

    from mia_core.engine.audit import AuditConfig

    x, y = digits(200)
    members = half(len(y))
    torch.manual_seed(3)
    files = save_target(tmp_path_factory.mktemp("audit"), train_plain(mlp(64, 10, 16), x, y, members, epochs=3),
                        x, members)
    cfg = mia_core.EvalConfig(dataset="digits:n_records=200", model="mlp:width=16", n_models=4, attacks=("loss",),
                              recipe=mia_core.TrainingRecipe(epochs=3), budgets=("tpr@1%<=1",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = mia_core.audit(AuditConfig(cfg, members=str(files["members"]), predictions=str(files["probs"])))
    return ev.metrics


# ---------------------------------------------------------------------------------------- the schema
def test_the_schema_is_a_valid_draft_2020_12_schema():
    s = load_schema()
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert s["$id"].endswith(f"metrics-{SCHEMA_VERSION}.json")
    assert s["title"] and s["description"]


def test_the_schema_version_is_the_results_schema_version():
    s = load_schema()
    assert s["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    assert "schema_version" in s["required"]


def test_the_schema_file_ships_inside_the_package():
    assert SCHEMA_PATH.is_file()
    assert SCHEMA_PATH.parent.parent == Path(mia_core.__file__).resolve().parent
    assert json.loads(SCHEMA_PATH.read_text()) == load_schema()
    first = load_schema()
    first["title"] = "changed"
    assert load_schema()["title"] != "changed"  # a copy each time


# ---------------------------------------------------------------------------------------- real runs
def test_an_eval_with_defenses_estimator_and_budget_validates(eval_doc):
    validate_metrics(eval_doc)
    assert {"dp_audit", "budget"} <= set(eval_doc)
    assert [d["stage"] for d in eval_doc["defenses"]] == ["train", "post"]
    assert eval_doc["estimators"] and set(eval_doc["attacks"]) == {"lira", "loss"}


def test_a_regression_run_validates(regression_doc):
    validate_metrics(regression_doc)
    assert regression_doc["target"]["train_accuracy"] is None and "train_mse" in regression_doc["target"]
    assert all(a["slices"] == {} for a in regression_doc["attacks"].values())


def test_an_audit_validates(audit_doc):
    validate_metrics(audit_doc)
    assert audit_doc["audit"]["source"]["kind"] == "predictions"
    assert audit_doc["population"]["reference_models"] == 2 and "budget" in audit_doc


def test_plugins_may_add_keys_to_their_params_and_reports(eval_doc):
    doc = copy.deepcopy(eval_doc)
    doc["defenses"][1]["report"]["anything"] = {"nested": [1, 2]}
    doc["defenses"][1]["params"]["new_param"] = None
    doc["attacks"]["lira"]["params"]["new_param"] = "x"
    next(iter(doc["estimators"].values()))["report"]["extra"] = [0.5]
    doc["training"]["new_trainer_field"] = 1
    validate_metrics(doc)


# ---------------------------------------------------------------------------------------- broken documents
def _set(path, value):
    def mutate(doc):
        *head, last = path
        for k in head:
            doc = doc[k]
        doc[last] = value
    return mutate


def _drop(path):
    def mutate(doc):
        *head, last = path
        for k in head:
            doc = doc[k]
        del doc[last]
    return mutate


MUTATIONS = {
    "auc above 1": (_set(["attacks", "lira", "auc"], 1.5), "$.attacks.lira.auc"),
    "no schema_version": (_drop(["schema_version"]), "$.schema_version: required key missing"),
    "schema_version 3": (_set(["schema_version"], 3), "$.schema_version: expected 2, got 3"),
    "tpr entry without ci_high": (_drop(["attacks", "loss", "tpr_at_fpr", "0.01", "ci_high"]),
                                  "$.attacks.loss.tpr_at_fpr['0.01'].ci_high: required key missing"),
    "negative TPR": (_set(["attacks", "loss", "tpr_at_fpr", "0.1", "tpr"], -0.1),
                     "$.attacks.loss.tpr_at_fpr['0.1'].tpr"),
    "interval of one number": (_set(["attacks", "lira", "auc_ci"], [0.5]), "$.attacks.lira.auc_ci"),
    "resolvable as a string": (_set(["attacks", "lira", "tpr_at_fpr", "0.001", "resolvable"], "no"),
                               "$.attacks.lira.tpr_at_fpr['0.001'].resolvable: expected boolean, got string"),
    "an unknown attack key": (_set(["attacks", "lira", "auc_typo"], 0.5), "'auc_typo' was unexpected"),
    "an unknown top-level key": (_set(["metrics"], {}), "$: Additional properties are not allowed"),
    "an MSE in a classification run": (_set(["target", "train_mse"], 0.3), "$.target.train_mse: key not allowed"),
    "an unknown defense stage": (_set(["defenses", 0, "stage"], "during"), "$.defenses[0].stage"),
    "an advantage bound above 1": (_set(["estimators", "kl-leakage:source=signal", "advantage_bound"], 2.0),
                                   "$.estimators['kl-leakage:source=signal'].advantage_bound"),
    "a budget without its verdict": (_drop(["budget", "passed"]), "$.budget.passed: required key missing"),
    "a dp_audit without epsilon": (_drop(["dp_audit", "accountant_epsilon"]), "$.dp_audit.accountant_epsilon"),
    "no attack": (_set(["attacks"], {}), "$.attacks"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_broken_document_fails_naming_the_path(eval_doc, name):
    mutate, where = MUTATIONS[name]
    doc = copy.deepcopy(eval_doc)
    mutate(doc)
    with pytest.raises(ValueError, match=re.escape(where)) as info:
        validate_metrics(doc)
    assert "\n" not in str(info.value) and str(info.value).startswith("metrics.json does not match schema version 2")


def test_a_regression_run_with_an_accuracy_fails(regression_doc):
    doc = copy.deepcopy(regression_doc)
    doc["target"]["test_accuracy"] = 0.5
    with pytest.raises(ValueError, match=re.escape("$.target.test_accuracy: expected null, got number")):
        validate_metrics(doc)
    doc = copy.deepcopy(regression_doc)
    del doc["target"]["test_mse"]
    with pytest.raises(ValueError, match=re.escape("$.target.test_mse: required key missing")):
        validate_metrics(doc)


def test_an_audit_section_is_checked(audit_doc):
    doc = copy.deepcopy(audit_doc)
    doc["audit"]["source"]["kind"] = "guess"
    with pytest.raises(ValueError, match=re.escape("$.audit.source.kind")):
        validate_metrics(doc)


def test_not_a_document():
    with pytest.raises(ValueError, match=re.escape("$: expected object, got array")):
        validate_metrics([])


def test_without_jsonschema_the_error_says_what_to_install(monkeypatch, eval_doc):
    schema._validator.cache_clear()
    monkeypatch.setitem(sys.modules, "jsonschema", None)  # `import jsonschema` raises ImportError
    try:
        with pytest.raises(ImportError, match="pip install jsonschema"):
            validate_metrics(eval_doc)
    finally:
        schema._validator.cache_clear()


# ---------------------------------------------------------------------------------------- the reference
def _property_names(node, out):
    if isinstance(node, dict):
        for key, sub in node.get("properties", {}).items():
            out.add(key)
        for value in node.values():
            _property_names(value, out)
    elif isinstance(node, list):
        for value in node:
            _property_names(value, out)
    return out


def test_the_reference_documents_every_key():
    text = DOC.read_text()
    missing = sorted(k for k in _property_names(load_schema(), set()) if f"`{k}`" not in text)
    assert not missing, f"docs/metrics-schema.md does not mention {missing}"
    assert f"schema version {SCHEMA_VERSION}" in text.lower()


def test_the_references_python_example_runs(eval_doc, tmp_path, monkeypatch):
    block = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S) if "validate_metrics" in b)
    path = re.search(r'"(runs/[^"]+/metrics\.json)"', block).group(1)
    (tmp_path / path).parent.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / path).write_text(json.dumps(eval_doc))
    exec(compile(block, "<metrics-schema.md>", "exec"), {})
    (tmp_path / path).write_text(json.dumps({**eval_doc, "schema_version": 3}))
    with pytest.raises(ValueError, match=re.escape("$.schema_version")):
        exec(compile(block, "<metrics-schema.md>", "exec"), {})
