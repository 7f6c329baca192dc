"""The prune defense: exact magnitude masks, achieved sparsity, masks kept through fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mia_core.data import Records
from mia_core.engine import DefenseContext, ModelPopulation
from mia_core.engine.trainer import TrainingRecipe
from mia_plugins.defenses.prune import Prune, magnitude_masks


def test_magnitude_masks_global_and_layer():
    w1 = torch.tensor([[[1.0, -5.0], [0.5, 3.0]]])  # one model, 4 weights
    w2 = torch.tensor([[0.1, -0.2, 4.0, 2.0]])
    g = magnitude_masks([w1, w2], 0.5, scope="global")
    # 8 weights, remove 4 smallest |w|: 0.1, 0.2, 0.5, 1.0
    assert g[0].tolist() == [[[False, True], [False, True]]]
    assert g[1].tolist() == [[False, False, True, True]]
    lay = magnitude_masks([w1, w2], 0.5, scope="layer")
    assert lay[0].tolist() == [[[False, True], [False, True]]]
    assert lay[1].tolist() == [[False, False, True, True]]
    lay = magnitude_masks([w1, w2], 0.25, scope="layer")
    assert lay[0].sum() == 3 and lay[1].sum() == 3


def test_masks_are_per_model():
    w = torch.stack([torch.arange(10.0), -torch.arange(10.0).flip(0)])  # models rank positions differently
    mk = magnitude_masks([w], 0.3, scope="global")[0]
    assert mk[0].tolist() == [False] * 3 + [True] * 7
    assert mk[1].tolist() == [True] * 7 + [False] * 3


def _pop():
    rng = np.random.default_rng(0)
    rec = Records.from_arrays(rng.normal(size=(200, 6)), rng.integers(0, 3, 200), name="toy")
    build = lambda: torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))  # noqa: E731
    return ModelPopulation.train(rec, build, TrainingRecipe(epochs=3, batch_size=32), n_models=4, seed=0)


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("finetune", [0, 2])
def test_prune_reaches_target_and_keeps_mask(scope, finetune):
    pop = _pop()
    report = Prune(sparsity=0.7, scope=scope, finetune_epochs=finetune).apply(DefenseContext(pop))
    weights = [pop.params["0.weight"], pop.params["2.weight"]]
    total = sum(w[0].numel() for w in weights)
    for m in range(4):
        zeros = sum(int((w[m] == 0).sum()) for w in weights)
        assert zeros == round(0.7 * total) if scope == "global" else abs(zeros / total - 0.7) < 0.02
    assert abs(report["achieved_sparsity"] - 0.7) < 0.02
    assert report["pruned_tensors"] == ["0.weight", "2.weight"]
    assert not (pop.params["0.bias"] == 0).any()  # biases untouched by default


def test_finetuning_changes_surviving_weights_only():
    pop = _pop()
    ctx = DefenseContext(pop)
    Prune(sparsity=0.5, finetune_epochs=0).apply(ctx)
    before = pop.params["0.weight"].clone()
    Prune(sparsity=0.5, finetune_epochs=2).apply(DefenseContext(pop))
    after = pop.params["0.weight"]
    assert torch.equal(after == 0, (before == 0) | (after == 0))
    assert not torch.equal(before, after)


def test_sparsity_zero_is_identity():
    pop = _pop()
    before = {k: v.clone() for k, v in pop.params.items()}
    Prune(sparsity=0.0, finetune_epochs=0).apply(DefenseContext(pop))
    for k in before:
        assert torch.equal(before[k], pop.params[k])


# ----------------------------------------------------------------------------- MIA-Pruning search
import json  # noqa: E402

from click.testing import CliRunner  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mia_core.cli  # noqa: E402
from mia_core import kernels  # noqa: E402
from mia_core.engine.probe import load_attack, probe  # noqa: E402
from mia_core.params import ParamError, parse_spec  # noqa: E402
from mia_core.testing import check_defense  # noqa: E402
from mia_plugins.defenses.prune import parse_grid, search_models, select_point  # noqa: E402

#: The report of the defaults before the search existed: these keys, in this order.
DEFAULT_REPORT_KEYS = ["target_sparsity", "achieved_sparsity", "achieved_sparsity_min", "achieved_sparsity_max",
                       "overall_sparsity", "pruned_tensors", "prunable_parameters_per_model",
                       "parameters_per_model", "scope", "finetune_epochs", "kernel_backend"]


def test_parse_grid():
    assert parse_grid("0.9, 0.5,0.8") == (0.5, 0.8, 0.9)
    assert parse_grid("0") == (0.0,)
    for bad in ["", " , ", "0.5,1.0", "-0.1", "0.5,abc", "0.5,0.5", "nan", "0.5,,0.9"]:
        with pytest.raises(ValueError, match="grid"):
            parse_grid(bad)


def test_select_hand_made_grids():
    s = [0.5, 0.8, 0.9, 0.95]
    drop = [0.0, 0.01, 0.02, 0.05]
    leak = [0.30, 0.10, 0.20, 0.05]
    # sparsest within the 2-point budget: 0.9 (0.95 is over it), whatever it leaks
    assert select_point(sparsity=s, accuracy_drop=drop, leakage=leak, budget=0.02, rule="sparsest") == 2
    # least leaking within budget: 0.8 (0.95 leaks least but is over budget)
    assert select_point(sparsity=s, accuracy_drop=drop, leakage=leak, budget=0.02, rule="least-leaking") == 1
    # a larger budget admits 0.95
    assert select_point(sparsity=s, accuracy_drop=drop, leakage=leak, budget=0.05, rule="least-leaking") == 3
    # nothing within budget -> None (the defense then leaves the models unpruned)
    assert select_point(sparsity=s, accuracy_drop=[0.03] * 4, leakage=leak, budget=0.02, rule="sparsest") is None
    assert select_point(sparsity=s, accuracy_drop=[0.03] * 4, leakage=leak, budget=0.02,
                        rule="least-leaking") is None
    # equal leakage goes to the sparser point; gains in accuracy (negative drops) are within budget
    assert select_point(sparsity=[0.5, 0.9], accuracy_drop=[-0.01, -0.02], leakage=[0.1, 0.1], budget=0.0,
                        rule="least-leaking") == 1
    # a drop equal to the budget up to float rounding is within it (0.9 - 0.88 > 0.02 in floats)
    assert 0.9 - 0.88 > 0.02
    assert select_point(sparsity=[0.5], accuracy_drop=[0.9 - 0.88], leakage=[0.1], budget=0.02,
                        rule="sparsest") == 0
    # the grid order does not matter
    assert select_point(sparsity=s[::-1], accuracy_drop=drop[::-1], leakage=leak[::-1], budget=0.02,
                        rule="least-leaking") == 2


def test_select_errors():
    with pytest.raises(ValueError, match="rule"):
        select_point(sparsity=[0.5], accuracy_drop=[0.0], leakage=[0.1], budget=0.02, rule="fastest")
    with pytest.raises(ValueError, match="one length"):
        select_point(sparsity=[0.5, 0.6], accuracy_drop=[0.0], leakage=[0.1], budget=0.02, rule="sparsest")
    with pytest.raises(ValueError, match="NaN"):
        select_point(sparsity=[0.5], accuracy_drop=[float("nan")], leakage=[0.1], budget=0.02, rule="sparsest")


def _select_reference(sparsity, drop, leak, budget, rule):
    """Brute force: every candidate compared with every other."""
    cands = [i for i in range(len(sparsity)) if drop[i] <= budget + 1e-9]
    for i in cands:
        if rule == "sparsest" and all(sparsity[i] >= sparsity[j] for j in cands):
            return i
        if rule == "least-leaking" and all(leak[i] < leak[j] or (leak[i] == leak[j] and sparsity[i] >= sparsity[j])
                                           for j in cands):
            return i
    return None


@settings(max_examples=80, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 9), st.sampled_from([-0.01, 0.0, 0.01, 0.02, 0.03]),
                          st.sampled_from([0.0, 0.05, 0.1, 0.2])), min_size=1, max_size=6,
                unique_by=lambda t: t[0]),
       st.sampled_from([0.0, 0.01, 0.02]), st.sampled_from(["sparsest", "least-leaking"]))
def test_select_matches_brute_force(points, budget, rule):
    s = [p[0] / 10 for p in points]
    d = [p[1] for p in points]
    g = [p[2] for p in points]
    assert select_point(sparsity=s, accuracy_drop=d, leakage=g, budget=budget, rule=rule) == \
        _select_reference(s, d, g, budget, rule)


def test_search_models_rule():
    assert search_models(16, None, 2).tolist() == list(range(8, 16))  # half, the last pairs
    assert search_models(8, None, 6).tolist() == list(range(2, 8))  # at least what LiRA needs
    assert search_models(6, None, 6).tolist() == list(range(6))  # all: nothing held out
    assert search_models(10, None, 2).tolist() == list(range(4, 10))  # half rounded up to whole pairs
    assert search_models(16, 4, 2).tolist() == [12, 13, 14, 15]
    with pytest.raises(ValueError, match="at least 6 models"):
        search_models(4, None, 6)
    with pytest.raises(ValueError, match="exceeds"):
        search_models(6, 8, 2)
    with pytest.raises(ValueError, match="too few"):
        search_models(16, 4, 6)


@pytest.mark.parametrize("params, match", [
    ({"grid": "0.5,1.5"}, "grid"),
    ({"grid": ""}, "grid"),
    ({"accuracy_budget": -0.01}, "accuracy_budget"),
    ({"accuracy_budget": 2.0}, "accuracy_budget"),
    ({"select": "fastest"}, "select"),
    ({"leakage": "tpr"}, "leakage"),
    ({"search_models": 3}, "search_models"),
    ({"search_models": 0}, "search_models"),
    ({"search_attack": "nope"}, "search_attack='nope'"),
    ({"search_attack": "lira:online=maybe"}, "search_attack"),
    ({"search_attack": "lira", "search_models": 4}, "too few"),
    ({"search": "yes"}, "search must be"),
])
def test_validation_errors(params, match):
    with pytest.raises(ValueError, match=match) as exc:
        Prune(**params).validate()
    assert "\n" not in str(exc.value)


def test_cli_spec_with_quoted_grid_and_attack():
    spec = parse_spec('prune:search=true,grid="0.5,0.9",search_attack="lira:online=false",select=sparsest',
                      Prune, label="defense 'prune'")
    assert dict(spec.params) == {"search": True, "grid": "0.5,0.9", "search_attack": "lira:online=false",
                                 "select": "sparsest"}
    Prune(**spec.params).validate()
    with pytest.raises(ParamError, match="unclosed"):
        parse_spec('prune:grid="0.5,0.9', Prune, label="defense 'prune'")


def test_search_off_is_the_plain_defense():
    """Defaults (search off): exactly magnitude masks + masked fine-tuning, the report as before;
    the search's parameters change nothing while search is off."""
    a = _pop()
    b, c = a.clone(), a.clone()
    rep = Prune().apply(DefenseContext(a))
    assert list(rep) == DEFAULT_REPORT_KEYS
    names = ["0.weight", "2.weight"]
    ctx = DefenseContext(b)
    tensors = [b.params[n] for n in names]
    plan = kernels.MaskPlan(tensors, magnitude_masks(tensors, 0.8, scope="global"))
    with torch.no_grad():
        plan.apply()
    ctx.finetune(10, post_step=lambda params: plan.apply())
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    rep_c = Prune(grid="0.1", search_attack="lira", select="sparsest", accuracy_budget=0.5,
                  search_models=6).apply(DefenseContext(c))
    assert json.dumps(rep_c) == json.dumps(rep)
    for k in a.params:
        assert torch.equal(a.params[k], c.params[k])


def _learnable(n_models=4):
    """A population that learns (labels from a linear rule), so pruning hard costs accuracy."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(240, 6))
    y = (x @ rng.normal(size=(6, 3))).argmax(1)
    rec = Records.from_arrays(x, y, name="linear")
    build = lambda: torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))  # noqa: E731
    return ModelPopulation.train(rec, build, TrainingRecipe(epochs=15, batch_size=32, lr=1e-2), n_models=n_models,
                                 seed=0)


def test_search_keeps_the_scored_weights_and_reports_the_grid():
    pop = _learnable()
    rep = Prune(search=True, grid="0.3,0.6", finetune_epochs=1, accuracy_budget=1.0).apply(DefenseContext(pop))
    s = rep["search"]
    assert [r["sparsity"] for r in s["grid"]] == [0.3, 0.6]
    assert s["probed_models"] == [2, 3] and s["fresh_targets"] == "first:2"
    for r in s["grid"]:
        assert set(r) == {"sparsity", "achieved_sparsity", "train_accuracy", "test_accuracy", "accuracy_drop",
                          "auc", "advantage", "within_budget"}
        assert r["within_budget"] and r["accuracy_drop"] == pytest.approx(s["unpruned"]["test_accuracy"]
                                                                          - r["test_accuracy"])
    i = select_point(sparsity=[0.3, 0.6], accuracy_drop=[r["accuracy_drop"] for r in s["grid"]],
                     leakage=[r["advantage"] for r in s["grid"]], budget=1.0, rule="least-leaking")
    assert s["chosen_index"] == i and rep["chosen_sparsity"] == rep["target_sparsity"] == [0.3, 0.6][i]
    assert rep["achieved_sparsity"] == pytest.approx([0.3, 0.6][i], abs=0.01)
    # the population now holds exactly the weights the search scored at the chosen point
    again = probe(DefenseContext(pop), load_attack("loss"), models=[2, 3])
    assert again.auc == s["grid"][i]["auc"] and again.advantage == s["grid"][i]["advantage"]
    assert float(again.test_accuracy.mean()) == s["grid"][i]["test_accuracy"]
    assert "search_grid" in rep and "unpruned:" in rep["search_grid"]


def test_search_sparsest_takes_the_largest_within_budget():
    pop = _learnable()
    rep = Prune(search=True, grid="0.2,0.4", finetune_epochs=0, select="sparsest",
                accuracy_budget=1.0).apply(DefenseContext(pop))
    assert rep["chosen_sparsity"] == 0.4 and rep["search"]["reason"].startswith("sparsest")


def test_nothing_within_budget_leaves_the_models_unpruned():
    pop = _learnable()
    before = {k: v.clone() for k, v in pop.params.items()}
    rep = Prune(search=True, grid="0.97,0.99", finetune_epochs=0, accuracy_budget=0.0).apply(DefenseContext(pop))
    assert all(r["accuracy_drop"] > 0 for r in rep["search"]["grid"])
    assert rep["chosen_sparsity"] is None and rep["target_sparsity"] == 0.0
    assert "left unpruned" in rep["search_choice"]
    for k in before:
        assert torch.equal(before[k], pop.params[k])


def test_attack_too_big_for_the_population_fails_before_fine_tuning():
    pop = _pop()  # 4 models; LiRA needs 6
    before = {k: v.clone() for k, v in pop.params.items()}
    with pytest.raises(ValueError, match="at least 6 models"):
        Prune(search=True, search_attack="lira").apply(DefenseContext(pop))
    for k in before:
        assert torch.equal(before[k], pop.params[k])


@pytest.mark.parametrize("params", [
    {"search": True, "grid": "0.5,0.9", "finetune_epochs": 2},
    {"search": True, "grid": "0.5,0.9", "finetune_epochs": 1, "search_attack": "lira", "select": "sparsest",
     "leakage": "auc", "scope": "layer"},
])
def test_contract_with_search(params):
    rep = check_defense(Prune, params=params)
    assert len(rep["search"]["grid"]) == 2
    assert rep["search"]["probed_models"] == ([4, 5, 6, 7] if "search_attack" not in params else list(range(2, 8)))


def test_cli_end_to_end_with_search(tmp_path):
    res = CliRunner().invoke(mia_core.cli.main, [
        "eval", "--attack", "lira", "--defense", 'prune:search=true,grid="0.5,0.9",finetune_epochs=1',
        "--dataset", "digits:n_records=300", "--n-models", "6", "--epochs", "3", "--targets", "first:2", "-q",
        "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "defense prune:" in res.output and "chosen_sparsity=" in res.output
    assert "search_grid=unpruned:" in res.output and "0.9: acc" in res.output
    bad = CliRunner().invoke(mia_core.cli.main, [
        "eval", "--attack", "lira", "--defense", "prune:search=true,search_attack=nope", "-q",
        "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    assert bad.exit_code == 2 and "search_attack='nope'" in bad.output


def test_the_choice_ignores_the_models_it_does_not_probe():
    """Models outside the probed pairs never inform the choice: changing them changes nothing in
    the search's table (so targets among them are evaluated free of the selection)."""
    a = _learnable()
    b = a.clone()
    with torch.no_grad():
        for v in b.params.values():
            v[:2] += 0.5 * torch.randn(v[:2].shape, generator=torch.Generator().manual_seed(0))
    params = dict(search=True, grid="0.3,0.6,0.9", finetune_epochs=1, accuracy_budget=0.05)
    ra = Prune(**params).apply(DefenseContext(a))
    rb = Prune(**params).apply(DefenseContext(b))
    assert ra["search"]["probed_models"] == [2, 3]
    assert json.dumps(ra["search"]) == json.dumps(rb["search"])
    for k in a.params:
        assert torch.equal(a.params[k][2:], b.params[k][2:])
