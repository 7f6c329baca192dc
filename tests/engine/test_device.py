"""``--device``: the evaluation on a GPU, end to end (skipped without one; run it wherever one is)."""

from __future__ import annotations

import pytest
import torch

import mia_core
from mia_core.engine.stages import EvalConfig
from mia_core.engine.trainer import TrainingRecipe

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")

SMALL = dict(dataset="digits:n_records=300", model="mlp:width=32", n_models=6, targets="first:2",
             recipe=TrainingRecipe(epochs=8), attacks=("lira", "loss"),
             defenses=("prune:sparsity=0.5,finetune_epochs=2",))


@pytest.mark.needs_cuda
@needs_cuda
def test_eval_end_to_end_on_cuda_agrees_with_the_cpu(tmp_path):
    """Training, the prune defense (its MaskPlan on CUDA tensors: the CUDA twin when built with
    MIAFW_CUDA=1, else the torch reference on the GPU), signals and attacks on the GPU. Float
    order differs between devices, so the two runs agree statistically, not bitwise."""
    gpu = mia_core.evaluate(EvalConfig(**SMALL, device="cuda"), out=tmp_path / "gpu")
    cpu = mia_core.evaluate(EvalConfig(**SMALL, device="cpu"))
    assert gpu.population.device.type == "cuda"
    assert gpu.plan.document["device"].startswith("cuda")
    assert gpu.metrics["population"]["cache_key"] != cpu.metrics["population"]["cache_key"]
    rep = gpu.metrics["defenses"][0]["report"]
    assert rep["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    for label in ("lira", "loss"):
        assert abs(gpu.metrics["attacks"][label]["auc"] - cpu.metrics["attacks"][label]["auc"]) < 0.05
    assert abs(gpu.metrics["target"]["test_accuracy"] - cpu.metrics["target"]["test_accuracy"]) < 0.05
    assert (gpu.run_dir / "metrics.json").is_file()


@pytest.mark.needs_cuda
@needs_cuda
def test_auto_picks_cuda_where_there_is_one():
    from mia_core.engine.stages import resolve_device

    assert resolve_device("auto").type == "cuda"
