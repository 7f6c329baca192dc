"""The cnn model family: shapes, parameters, the vmap ensemble against per-model forwards,
training in a population, and end-to-end LiRA runs on digits:image=true."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from mia_core import registry
from mia_core.cli import main
from mia_core.engine.ensemble import VmapForward, ensemble_forward, per_sample_gradients
from mia_core.engine.population import ModelPopulation
from mia_core.engine.trainer import TrainingRecipe, ensemble_logits, init_ensemble, model_seeds
from mia_core.params import ParamError, parse_spec
from mia_core.testing import check_params
from mia_plugins.datasets.sklearn_data import Digits
from mia_plugins.models.cnn import CNN, infer_image_shape, parse_image_shape


def test_registered_under_cnn():
    assert registry.load("models", "cnn") is CNN


@pytest.mark.parametrize("params", [{}, {"channels": 4, "depth": 3, "norm": "group", "width": 0},
                                    {"image_shape": "3x32x32"}, {"image_shape": "8x8"}])
def test_parameters_follow_the_rules(params):
    check_params(CNN, params)


@pytest.mark.parametrize("params,match", [
    ({"channels": 0}, "channels must be an integer >= 1"),
    ({"depth": 0}, "depth must be an integer >= 1"),
    ({"width": -1}, "width must be an integer >= 0"),
    ({"norm": "batch"}, "norm must be one of none, group"),
    ({"image_shape": "3x32"}, None),  # HxW is fine: one channel
    ({"image_shape": "3by32"}, "image_shape must be CxHxW"),
    ({"image_shape": "0x8x8"}, "dimensions must be >= 1"),
])
def test_validate(params, match):
    if match is None:
        CNN(**params).validate()
        return
    with pytest.raises(ValueError, match=match):
        CNN(**params).validate()


def test_cli_spec_parses():
    spec = parse_spec("cnn:channels=8,depth=1,width=32,norm=group,image_shape=1x8x8", CNN, label="model")
    assert spec.params == {"channels": 8, "depth": 1, "width": 32, "norm": "group", "image_shape": "1x8x8"}


def test_image_shape_inference_and_parsing():
    assert infer_image_shape(64) == (1, 8, 8)
    assert infer_image_shape(1024) == (1, 32, 32)
    assert infer_image_shape(3072) == (3, 32, 32)
    assert infer_image_shape(3 * 28 * 28) == (3, 28, 28)
    assert parse_image_shape("") is None
    assert parse_image_shape("1x8x8") == (1, 8, 8)
    assert parse_image_shape(" 3 x 32 x 32 ") == (3, 32, 32)
    assert parse_image_shape("4x6") == (1, 4, 6)
    for n in (30, 10, 2):
        with pytest.raises(ParamError) as e:
            CNN().build(n, 2)
        msg = str(e.value)
        assert f"{n} features" in msg and "image_shape=CxHxW" in msg and "\n" not in msg
    with pytest.raises(ValueError, match="image_shape=2x2x8 has 32 values but the records have 64 features"):
        CNN(image_shape="2x2x8").build(64, 10)


@pytest.mark.parametrize("n_features,params,shape", [
    (64, {}, (1, 8, 8)),
    (64, {"depth": 4, "norm": "group", "channels": 6}, (1, 8, 8)),  # pooling stops at 1x1; 6 and 12 channels: 3 groups
    (3072, {"channels": 4, "width": 0}, (3, 32, 32)),
    (1024, {"channels": 4, "depth": 3}, (1, 32, 32)),
    (64, {"image_shape": "2x4x8", "channels": 4}, (2, 4, 8)),
    (60, {"image_shape": "3x4x5", "channels": 4, "depth": 3}, (3, 4, 5)),
])
def test_shapes_and_architecture(n_features, params, shape):
    module = CNN(**params).build(n_features, 7)
    assert module.image_shape == shape
    out = module(torch.rand(5, n_features))
    assert out.shape == (5, 7) and torch.isfinite(out).all()
    assert not list(module.buffers())  # vmap-safe: nothing updated in place
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    fam = CNN(**params)
    assert [c.out_channels for c in convs] == [fam.channels * 2 ** i for i in range(fam.depth)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    norms = [m for m in module.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == (fam.depth if fam.norm == "group" else 0)
    for g in norms:
        assert g.num_channels % g.num_groups == 0 and g.num_groups <= 4
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == (2 if fam.width else 1)


def test_group_norm_groups_are_min_4_channels_for_powers_of_two():
    for channels, groups in ((1, 1), (2, 2), (4, 4), (16, 4)):
        norms = [m for m in CNN(channels=channels, depth=1, norm="group").build(64, 10).modules()
                 if isinstance(m, nn.GroupNorm)]
        assert [g.num_groups for g in norms] == [groups]


def test_forward_reads_records_row_major_channel_first():
    """The module sees the record as the image augment.py and Records.image_shape describe."""
    module = CNN(channels=2, depth=1, width=0, image_shape="2x3x4").build(24, 3)
    seen = {}
    module.features.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0]))
    x = torch.arange(48, dtype=torch.float32).reshape(2, 24)
    module(x)
    assert torch.equal(seen["x"], x.reshape(2, 2, 3, 4))


@pytest.mark.parametrize("n_features,params", [
    (64, {}),
    (64, {"norm": "group", "depth": 3, "channels": 4}),
    (3072, {"channels": 4, "width": 16}),
])
def test_vmap_ensemble_equals_each_model_alone(n_features, params):
    fam = CNN(**params)
    base, p, b = init_ensemble(lambda: fam.build(n_features, 10), 3, seed=5)
    assert isinstance(ensemble_forward(base), VmapForward)  # never the MLP fast path
    x = torch.rand(9, n_features, generator=torch.Generator().manual_seed(1))
    got = ensemble_logits(base, p, b, x)
    assert got.shape == (3, 9, 10)
    for m, s in enumerate(model_seeds(5, 3)):
        torch.manual_seed(s)
        alone = fam.build(n_features, 10)
        with torch.no_grad():
            want = alone(x)
        torch.testing.assert_close(got[m], want, rtol=1e-5, atol=1e-5)
    # and the trainer's forward on per-model batches [M, B, D]
    xb = torch.rand(3, 4, n_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        per = ensemble_forward(base)(p, b, xb)
    for m, s in enumerate(model_seeds(5, 3)):
        torch.manual_seed(s)
        with torch.no_grad():
            torch.testing.assert_close(per[m], fam.build(n_features, 10)(xb[m]), rtol=1e-5, atol=1e-5)


def test_per_sample_gradients_match_autograd():
    """The torch.func path DP-SGD uses works through conv, GroupNorm and max-pool."""
    fam = CNN(channels=4, depth=2, norm="group", width=8)
    base, p, b = init_ensemble(lambda: fam.build(64, 10), 2, seed=0)
    x = torch.rand(2, 3, 64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([[1, 2, 3], [4, 5, 6]])
    grads, _ = per_sample_gradients(base, p, b, x, y, torch.ones(2, 3))
    for m, s in enumerate(model_seeds(0, 2)):
        torch.manual_seed(s)
        alone = fam.build(64, 10)
        loss = torch.nn.functional.cross_entropy(alone(x[m, 1:2]), y[m, 1:2])
        want = torch.autograd.grad(loss, list(alone.parameters()))
        for (name, g), w in zip(grads.items(), want):
            torch.testing.assert_close(g[m, 1], w, rtol=1e-4, atol=1e-5)


def test_trains_as_a_population():
    records = Digits(n_records=400, image=True).load()
    fam = CNN(channels=8, depth=2, width=16)
    pop = ModelPopulation.train(records, lambda: fam.build(records.n_features, records.n_classes),
                                TrainingRecipe(epochs=8, lr=1e-2, batch_size=32), n_models=4, seed=0)
    assert pop.training.forward == "vmap" and pop.training.backward == "autograd"
    assert pop.training.losses[-1] < pop.training.losses[0]
    logits = ensemble_logits(pop.base, pop.params, pop.buffers, torch.from_numpy(records.x))
    assert logits.shape == (4, 400, 10) and torch.isfinite(logits).all()
    acc = (logits.argmax(-1).numpy() == records.y[None]).mean()
    assert acc > 0.5  # 8 epochs of a small CNN on 8x8 digits learn something (about 0.8)


def _metrics(out):
    files = list(out.rglob("metrics.json"))
    assert len(files) == 1
    return json.loads(files[0].read_text())


@pytest.mark.slow
def test_cli_lira_on_digits_images(tmp_path):
    """The issue's command, plus LiRA with mirror augmentation on the same population."""
    out = tmp_path / "runs"
    res = CliRunner().invoke(main, [
        "eval", "--dataset", "digits:image=true", "--model", "cnn:channels=8,depth=1,width=32",
        "--attack", "lira", "--attack", "lira:augment=mirror", "--n-models", "6", "--epochs", "3",
        "-q", "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = _metrics(out)
    assert set(m["attacks"]) == {"lira", "lira:augment=mirror"}
    for a in m["attacks"].values():
        assert math.isfinite(a["auc"]) and 0.0 <= a["auc"] <= 1.0
    assert m["attacks"]["lira:augment=mirror"]["params"]["augment"] == "mirror"
    assert m["training"]["forward"] == "vmap"


def test_cli_refuses_records_that_are_not_images(tmp_path):
    res = CliRunner().invoke(main, ["eval", "--dataset", "breast-cancer", "--model", "cnn", "--attack", "loss",
                                    "-q", "--no-cache", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2
    assert "cannot infer an image shape from 30 features" in res.output
    assert "Traceback" not in res.output


def test_digits_image_shape_only_changes_the_declared_shape():
    plain, image = Digits().load(), Digits(image=True).load()
    assert plain.image_shape == (8, 8) and image.image_shape == (1, 8, 8)
    assert np.array_equal(plain.x, image.x) and np.array_equal(plain.y, image.y)
    assert plain.fingerprint() == image.fingerprint()


@pytest.mark.parametrize("kind", ["mirror", "mirror-shift"])
def test_augmentations_of_channel_first_digits_equal_the_plain_ones(kind):
    """mia_core.augment acts on the last two axes, so (1, 8, 8) gives the views of (8, 8)."""
    from mia_core.augment import augment_records

    x = Digits(n_records=50).load().x
    plain = augment_records(x, image_shape=(8, 8), kind=kind)
    image = augment_records(x, image_shape=(1, 8, 8), kind=kind)
    assert np.array_equal(plain, image)
    mirrored = image[len(image) // 2].reshape(50, 1, 8, 8)  # the first mirrored view, unshifted
    assert np.array_equal(mirrored, x.reshape(50, 1, 8, 8)[..., ::-1])
