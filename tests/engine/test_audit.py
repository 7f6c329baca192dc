"""`mia_core.audit`: the user's own model as the target, references trained by miafw."""

from __future__ import annotations

import csv
import dataclasses
import hashlib

import numpy as np
import pytest
import torch
from audit_helpers import digits, half, mlp, save_target, train_plain

import mia_core
from mia_core.data import DataError
from mia_core.engine.audit import (
    PREDICTION_ACCESS,
    AuditConfig,
    TargetSource,
    _unanswerable,
    audit,
    import_module_class,
    resolve_audit,
    with_target,
)
from mia_core.engine.population import ModelPopulation
from mia_core.engine.signals import SignalUnavailable
from mia_core.params import ParamError
from mia_plugins.attacks.lira import LiRA

SMALL = dict(dataset="digits:n_records=400", model="mlp:width=32", n_models=8,
             recipe=mia_core.TrainingRecipe(epochs=20))


@pytest.fixture(scope="module")
def small_target(tmp_path_factory):
    """A small leaky target trained by a plain torch loop on half of 400 digits."""
    d = tmp_path_factory.mktemp("small")
    x, y = digits(400)
    members = half(len(y))
    torch.manual_seed(3)
    net = train_plain(mlp(64, 10, 32), x, y, members, epochs=20)
    return {**save_target(d, net, x, members), "net": net, "x": x, "y": y, "mask": members, "dir": d}


def _config(target, *, attacks=("lira", "loss"), **over):
    kw = {**SMALL, **over.pop("evaluation", {})}
    return AuditConfig(mia_core.EvalConfig(attacks=attacks, **kw), members=str(target["members"]), **over)


@pytest.mark.slow
def test_a_plain_torch_model_audits_like_a_miafw_trained_one(tmp_path):
    """The must-show: an MLP trained on half of digits by a textbook torch loop, audited from its
    state_dict, against a miafw-trained model of the same recipe evaluated the usual way: LiRA's AUC
    and TPR@1% FPR intervals overlap, and both find the leak (AUC interval above 0.5)."""
    x, y = digits()
    members = half(len(y), seed=7)
    torch.manual_seed(7)
    files = save_target(tmp_path / "t", train_plain(mlp(64, 10, 256), x, y, members, epochs=60, seed=7), x, members)
    cfg = mia_core.EvalConfig(attacks=("lira",), n_models=16)
    audited = audit(AuditConfig(cfg, members=str(files["members"]), weights=str(files["weights"])),
                    cache=tmp_path / "cache")
    usual = mia_core.evaluate(mia_core.EvalConfig(attacks=("lira",), n_models=16, targets="0"), cache=tmp_path / "cache")
    a, u = audited.metrics["attacks"]["lira"], usual.metrics["attacks"]["lira"]
    assert a["auc_ci"][0] > 0.5 and u["auc_ci"][0] > 0.5
    assert a["auc_ci"][0] <= u["auc_ci"][1] and u["auc_ci"][0] <= a["auc_ci"][1]
    ta, tu = a["tpr_at_fpr"]["0.01"], u["tpr_at_fpr"]["0.01"]
    assert ta["resolvable"] and tu["resolvable"]
    assert ta["ci_low"] <= tu["ci_high"] and tu["ci_low"] <= ta["ci_high"]
    # the references are the eval population's own models 2..15 (the same cache entry, 14 models)
    assert audited.metrics["population"]["reference_models"] == 14
    assert audited.metrics["audit"]["members"] == int(members.sum())
    assert audited.metrics["target"]["train_accuracy"] == 1.0


def test_predictions_give_the_same_scores_as_weights(small_target, tmp_path):
    t = small_target
    by_weights = audit(_config(t, weights=str(t["weights"])), cache=tmp_path)
    by_logits = audit(_config(t, predictions=str(t["logits"])), cache=tmp_path)
    by_probs = audit(_config(t, predictions=str(t["probs"])), cache=tmp_path)
    # a CSV of probabilities with the rows shuffled and matched back by record id
    order = np.random.default_rng(0).permutation(len(t["y"]))
    probs = np.load(t["probs"])["probs"]
    path = tmp_path / "probs.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index"] + [f"prob_{k}" for k in range(10)])
        for i in order:
            w.writerow([i] + [repr(float(p)) for p in probs[i]])
    by_csv = audit(_config(t, predictions=str(path)), cache=tmp_path)
    for label in ("lira", "loss"):
        ref = by_weights.scores[label]
        np.testing.assert_allclose(by_logits.scores[label], ref, rtol=0, atol=1e-9)  # the same float32 logits
        np.testing.assert_allclose(by_probs.scores[label], ref, rtol=1e-4, atol=1e-4)  # log(softmax) round trip
        np.testing.assert_allclose(by_csv.scores[label], ref, rtol=1e-4, atol=1e-4)
        assert by_probs.metrics["attacks"][label]["auc"] == pytest.approx(by_weights.metrics["attacks"][label]["auc"],
                                                                          abs=1e-3)
    assert by_weights.metrics["audit"]["source"]["access"][-1] == "params"
    assert by_probs.metrics["audit"]["source"]["outputs"] == "probs"
    assert by_csv.metrics["audit"]["source"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_audited_population_puts_the_target_in_front_of_intact_reference_pairs(small_target, tmp_path):
    t = small_target
    ev = audit(_config(t, weights=str(t["weights"])), cache=tmp_path)
    pop = ev.population
    assert pop.n_models == 8
    assert (pop.keep[0] == t["mask"]).all() and (pop.keep[1] == ~t["mask"]).all()
    refs = pop.keep[2:]
    assert (refs[0::2] == ~refs[1::2]).all()  # complementary pairs, independent of the target
    for name, value in t["net"].state_dict().items():
        assert torch.equal(pop.params[name][0], value)
    np.testing.assert_array_equal(ev.membership[0], t["mask"])
    assert ev.targets == [0]


def test_the_checkpoint_is_defended_like_the_references(small_target, tmp_path):
    t = small_target
    ev = audit(_config(t, weights=str(t["weights"]), evaluation={"defenses": ("quantize:bits=2",)}), cache=tmp_path)
    w = ev.population.params["0.weight"]
    assert len(torch.unique(w[0])) <= 4 and len(torch.unique(w[5])) <= 4  # target and a reference: 2 bits
    assert not torch.equal(w[0], t["net"].state_dict()["0.weight"])
    assert ev.metrics["defenses"][0]["name"] == "quantize"
    plain = audit(_config(t, weights=str(t["weights"]), evaluation={"defenses": ("quantize:bits=2",), "adaptive": False}),
                  cache=tmp_path)
    assert plain.metrics["adaptive"] is False
    assert not np.allclose(plain.scores["lira"], ev.scores["lira"])  # undefended references score differently


def test_predictions_defend_only_the_references(small_target, tmp_path):
    t = small_target
    ev = audit(_config(t, predictions=str(t["logits"]), evaluation={"defenses": ("quantize:bits=2",)}), cache=tmp_path)
    logits = ev.population.logits()
    with torch.no_grad():
        own = t["net"](torch.from_numpy(t["x"]))
    assert torch.allclose(logits[0], own.to(logits), atol=1e-5)  # the released model's outputs, as given
    assert len(torch.unique(ev.population.params["0.weight"][2])) <= 4
    with pytest.raises(ParamError, match="--non-adaptive with --predictions"):
        resolve_audit(_config(t, predictions=str(t["logits"]),
                              evaluation={"defenses": ("quantize:bits=2",), "adaptive": False}))


def test_members_from_a_column_of_the_data_file_match_a_members_file(small_target, tmp_path):
    t = small_target
    ids = 5000 + 3 * np.arange(len(t["y"]))  # the user's own record ids
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", *[f"f{j}" for j in range(64)], "label", "in_train"])
        for i in range(len(ids)):
            w.writerow([ids[i], *t["x"][i].tolist(), t["y"][i], int(t["mask"][i])])
    (tmp_path / "ids.txt").write_text("\n".join(map(str, ids[t["mask"]])) + "\n")
    common = {"dataset": f"file:path={path},id=id"}
    by_column = audit(AuditConfig(mia_core.EvalConfig(attacks=("lira",), **{**SMALL, **common}),
                                  members="column=in_train", weights=str(t["weights"])), cache=tmp_path)
    # with a members file the column is the user's to leave out of the features (drop=)
    dropped = {"dataset": f"file:path={path},id=id,drop=in_train"}
    by_file = audit(AuditConfig(mia_core.EvalConfig(attacks=("lira",), **{**SMALL, **dropped}),
                                members=str(tmp_path / "ids.txt"), weights=str(t["weights"])), cache=tmp_path)
    np.testing.assert_array_equal(by_column.membership, by_file.membership)
    np.testing.assert_array_equal(by_column.record_index, ids)
    # the membership column is never a feature: the records have 64 features either way
    assert by_column.population.records.x.shape == (len(ids), 64)
    np.testing.assert_allclose(by_column.scores["lira"], by_file.scores["lira"])
    assert by_column.plan.dataset.spec.params["drop"] == "in_train"


def test_an_importable_module_is_the_architecture(small_target, tmp_path, monkeypatch):
    t = small_target
    (tmp_path / "user_nets_audit.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, n_features, n_classes, hidden=16):\n"
        "        super().__init__()\n"
        "        self.inp = torch.nn.Linear(n_features, hidden)\n"
        "        self.out = torch.nn.Linear(hidden, n_classes)\n"
        "    def forward(self, x):\n"
        "        return self.out(torch.tanh(self.inp(x)))\n")
    monkeypatch.chdir(tmp_path)  # found in the current directory, as `python -m` would
    Net = import_module_class("user_nets_audit:Net")

    net = train_plain(Net(64, 10, hidden=24), t["x"], t["y"], t["mask"], epochs=20)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    cfg = _config(t, weights=str(tmp_path / "net.pt"), module="user_nets_audit:Net", module_args={"hidden": 24})
    ev = audit(cfg, cache=tmp_path / "c")
    assert ev.metrics["audit"]["architecture"]["name"] == "module"
    assert ev.metrics["audit"]["architecture"]["params"]["kwargs"] == {"hidden": 24}
    assert set(ev.population.params) == {"inp.weight", "inp.bias", "out.weight", "out.bias"}
    assert 0.5 < ev.metrics["attacks"]["lira"]["auc"] < 1
    wrong = _config(t, weights=str(tmp_path / "net.pt"), module="user_nets_audit:Net", module_args={"hidden": 16})
    with pytest.raises(DataError, match=r"mis-shaped inp.bias \(24,\) \(expected \(16,\)\), inp.weight \(24, 64\) \(expected \(16, 64\)\)"):
        audit(wrong, cache=tmp_path / "c")
    with pytest.raises(ParamError, match="cannot import 'no_such_pkg.nets' \(ModuleNotFoundError"):
        resolve_audit(_config(t, weights=str(tmp_path / "net.pt"), module="no_such_pkg.nets:Net"))


def test_a_checkpoint_that_does_not_fit_names_every_bad_key(small_target, tmp_path):
    t = small_target
    state = dict(t["net"].state_dict())
    state["extra.weight"] = torch.zeros(3)
    del state["2.bias"]
    state["0.weight"] = torch.zeros(8, 64)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(DataError) as err:
        audit(_config(t, weights=str(tmp_path / "bad.pt")), cache=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing 2.bias" in msg and "unexpected extra.weight" in msg and "mis-shaped 0.weight (8, 64)" in msg
    torch.save(t["net"], tmp_path / "whole.pt")  # a pickled module: weights_only refuses it
    with pytest.raises(DataError, match=r"weights_only=True.*save the model's state_dict"):
        audit(_config(t, weights=str(tmp_path / "whole.pt")), cache=tmp_path)
    prefixed = {f"_module.{k}": v for k, v in t["net"].state_dict().items()}  # Opacus' wrapper
    torch.save({"model_state_dict": prefixed, "epoch": torch.tensor(3)}, tmp_path / "wrapped.pt")
    ev = audit(_config(t, weights=str(tmp_path / "wrapped.pt"), attacks=("loss",)), cache=tmp_path)
    assert torch.equal(ev.population.params["0.weight"][0], t["net"].state_dict()["0.weight"])


@pytest.mark.parametrize("members, match", [
    ("{d}/unknown.txt", r"2 id\(s\) not in dataset 'digits' \(first: 400, 9999\); its record ids run from 0 to 399"),
    ("{d}/twice.txt", "record id 3 is listed 2 times"),
    ("{d}/text.txt", "line 3: 'x7' is not an integer record id"),
    ("{d}/all.txt", "400 of 400 records are members"),
    ("{d}/missing.txt", "no such file"),
    ("column=in_train", "has no columns besides its features"),
])
def test_bad_members_are_refused_before_training(small_target, tmp_path, members, match):
    t = small_target
    (tmp_path / "unknown.txt").write_text("1\n400\n9999\n")
    (tmp_path / "twice.txt").write_text("3\n3\n")
    (tmp_path / "text.txt").write_text("# ids\n1\nx7\n")
    (tmp_path / "all.txt").write_text("\n".join(map(str, range(400))))
    cfg = AuditConfig(mia_core.EvalConfig(attacks=("loss",), **SMALL), members=members.format(d=tmp_path),
                      weights=str(t["weights"]))
    with pytest.raises(DataError, match=match):
        audit(cfg, cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # nothing trained


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_bad_predictions_are_refused_before_training(small_target, tmp_path):
    t = small_target
    z = np.load(t["logits"])["logits"]
    p = np.load(t["probs"])["probs"]
    cases = [
        (_npz(tmp_path / "short.npz", logits=z[:100]), r"logits have shape \(100, 10\); dataset 'digits' has 400 "
                                                        r"records and 10 output\(s\), so expected \(400, 10\)"),
        (_npz(tmp_path / "two.npz", logits=z, probs=p), "expected exactly one of logits, probs or prediction"),
        (_npz(tmp_path / "notprob.npz", probs=np.exp(z)), "probs row 0 is not a distribution"),
        (_npz(tmp_path / "nan.npz", logits=np.where(np.arange(10) == 3, np.nan, z)), "NaN or inf"),
        (_npz(tmp_path / "ids.npz", logits=z, index=np.arange(400) + 1), r"1 id\(s\) not in dataset"),
        (_npz(tmp_path / "extra.npz", logits=z, y=t["y"]), "unexpected arrays y"),
    ]
    for path, match in cases:
        with pytest.raises((DataError, ParamError), match=match):
            audit(_config(t, predictions=path), cache=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_attacks_that_need_more_than_a_predictions_file_gives_are_refused(small_target):
    t = small_target
    with pytest.raises(ParamError, match=r"attack 'lira:augment=mirror' queries the target on inputs other than"):
        resolve_audit(_config(t, predictions=str(t["logits"]), attacks=("lira:augment=mirror",)))
    src = TargetSource("predictions", "/x/p.npz", "0" * 64, 1, "probs", PREDICTION_ACCESS["probs"])

    class WhiteBox(LiRA):
        access = ("params",)

    class RawLogits(LiRA):
        access = ("logits",)

    assert "needs params access (the weights)" in _unanswerable(WhiteBox(), src)
    assert "needs logits access (the logits); the target is predictions p.npz holding probs" in _unanswerable(
        RawLogits(), src)
    assert _unanswerable(RawLogits(), dataclasses.replace(src, outputs="logits", access=PREDICTION_ACCESS["logits"])) \
        is None
    assert _unanswerable(LiRA(), src) is None


def test_the_default_attack_set_is_every_registered_attack_the_target_answers(small_target):
    t = small_target
    plan = resolve_audit(_config(t, predictions=str(t["probs"]), attacks=()))
    from mia_core import registry

    assert [a.name for a in plan.attacks] == [n for n in registry.names("attacks")]
    assert plan.document["command"] == "audit" and plan.document["target"]["outputs"] == "probs"
    assert plan.document["reference_models"] == 6


def test_a_target_known_by_its_predictions_cannot_be_queried_elsewhere(small_target):
    t = small_target
    from mia_core.data import Records

    records = Records.from_arrays(t["x"], t["y"], name="d", n_classes=10)
    refs = ModelPopulation.train(records, lambda: mlp(64, 10, 8), mia_core.TrainingRecipe(epochs=1), n_models=2, seed=0)
    pop = with_target(refs, t["mask"], logits=torch.zeros(400, 10, dtype=torch.float64))
    assert torch.equal(pop.logits()[0], torch.zeros(400, 10))
    assert torch.isnan(pop.params["0.weight"][:2]).all()
    with pytest.raises(SignalUnavailable, match="cannot be queried on other inputs"):
        pop.logits(t["x"][::-1].copy())
    with pytest.raises(ValueError, match="never stored"):
        pop.state()


def test_usage_errors_of_the_audit_itself(small_target, tmp_path):
    t = small_target
    with pytest.raises(ParamError, match="exactly one of --weights FILE or --predictions FILE"):
        resolve_audit(_config(t))
    with pytest.raises(ParamError, match="exactly one"):
        resolve_audit(_config(t, weights=str(t["weights"]), predictions=str(t["logits"])))
    with pytest.raises(ParamError, match=r"--weights '.*nope.pt': no such file"):
        resolve_audit(_config(t, weights=str(tmp_path / "nope.pt")))
    with pytest.raises(ParamError, match="--n-models must be an even integer >= 4"):
        resolve_audit(_config(t, weights=str(t["weights"]), evaluation={"n_models": 2}))
    with pytest.raises(ParamError, match="estimators measure a population"):
        resolve_audit(_config(t, weights=str(t["weights"]), evaluation={"estimators": ("info",)}))


def test_scikit_learn_models_are_audited_from_their_predictions(tmp_path):
    """Models that are not torch: a logistic regression's predict_proba on breast-cancer (references:
    the logreg family) and a ridge regression's predictions on diabetes (references: linreg)."""
    from sklearn.linear_model import LogisticRegression, Ridge

    from mia_core import registry

    records = registry.load("datasets", "breast-cancer")().load()
    members = half(records.n, seed=4)
    clf = LogisticRegression(C=100.0, max_iter=5000).fit(records.x[members], records.y[members])
    np.savez(tmp_path / "clf.npz", probs=clf.predict_proba(records.x))
    np.savetxt(tmp_path / "clf_members.txt", records.index[members], fmt="%d")
    cfg = AuditConfig(mia_core.EvalConfig(attacks=("lira", "loss"), dataset="breast-cancer", model="logreg",
                                          n_models=8, recipe=mia_core.TrainingRecipe(epochs=30)),
                      members=str(tmp_path / "clf_members.txt"), predictions=str(tmp_path / "clf.npz"))
    ev = audit(cfg, cache=tmp_path / "c")
    assert ev.metrics["target"]["train_accuracy"] == pytest.approx(clf.score(records.x[members], records.y[members]))
    assert all(np.isfinite(s).all() for s in ev.scores.values())

    reg = registry.load("datasets", "diabetes")().load()
    members = half(reg.n, seed=5)
    ridge = Ridge(alpha=0.01).fit(reg.x[members], reg.y[members])
    np.savez(tmp_path / "ridge.npz", prediction=ridge.predict(reg.x))
    np.savetxt(tmp_path / "ridge_members.txt", reg.index[members], fmt="%d")
    cfg = AuditConfig(mia_core.EvalConfig(attacks=("lira", "loss"), dataset="diabetes", model="linreg", n_models=8),
                      members=str(tmp_path / "ridge_members.txt"), predictions=str(tmp_path / "ridge.npz"))
    ev = audit(cfg, cache=tmp_path / "c")
    mse = float(np.mean((ridge.predict(reg.x[members]) - reg.y[members]) ** 2))
    assert ev.metrics["target"]["train_mse"] == pytest.approx(mse, rel=1e-5)
    assert ev.metrics["attacks"]["loss"]["auc"] > 0.5  # ridge on 221 records overfits a little
    np.savez(tmp_path / "probs_for_regression.npz", probs=np.full((reg.n, 1), 1.0))
    bad = dataclasses.replace(cfg, predictions=str(tmp_path / "probs_for_regression.npz"))
    with pytest.raises(DataError, match="holds probs, but dataset 'diabetes' is a regression task"):
        audit(bad, cache=tmp_path / "c")
