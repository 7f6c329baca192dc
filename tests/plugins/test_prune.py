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
