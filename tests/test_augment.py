"""Query augmentations (mirror, shifts) and their use through the attack context and LiRA."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core.augment import augment_records, view_specs
from mia_core.data import DataError, Records
from mia_core.engine import ModelPopulation
from mia_core.engine.contexts import AttackContext
from mia_core.engine.trainer import TrainingRecipe


def _reference_view(img, mirrored, dy, dx):
    """Pixel by pixel: out[i, j] = src[i - dy, j - dx] inside the image, else 0."""
    src = img[..., ::-1] if mirrored else img
    out = np.zeros_like(src)
    h, w = src.shape[-2:]
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[..., i, j] = src[..., i - dy, j - dx]
    return out


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 3), c=st.sampled_from([None, 1, 3]), h=st.integers(1, 5), w=st.integers(1, 5),
       kind=st.sampled_from(["none", "mirror", "mirror-shift"]), shift=st.integers(1, 3))
def test_views_match_a_pixel_loop(n, c, h, w, kind, shift):
    shape = (h, w) if c is None else (c, h, w)
    x = np.random.default_rng(0).normal(size=(n, int(np.prod(shape)))).astype(np.float32)
    views = augment_records(x, image_shape=shape, kind=kind, shift=shift)
    specs = view_specs(kind, shift=shift)
    assert views.shape == (len(specs), n, x.shape[1]) and views.dtype == x.dtype
    assert np.array_equal(views[0], x)
    imgs = x.reshape((n,) + shape)
    for v, (m, dy, dx) in zip(views, specs):
        assert np.array_equal(v.reshape(imgs.shape), _reference_view(imgs, m, dy, dx))


def test_view_counts_and_errors():
    assert [len(view_specs(k)) for k in ("none", "mirror", "mirror-shift")] == [1, 2, 18]
    with pytest.raises(ValueError, match="augment must be one of none, mirror, mirror-shift; got 'rot'"):
        view_specs("rot")
    with pytest.raises(ValueError, match="shift must be an integer >= 1"):
        view_specs("mirror-shift", shift=0)
    with pytest.raises(ValueError, match="not images of shape"):
        augment_records(np.zeros((2, 5)), image_shape=(2, 2), kind="mirror")


def test_records_validate_the_image_shape():
    x, y = np.zeros((4, 6)), np.array([0, 1, 0, 1])
    assert Records.from_arrays(x, y, name="r", image_shape=(2, 3)).image_shape == (2, 3)
    with pytest.raises(DataError, match=r"image_shape \(2, 2\) must be \(H, W\) or \(C, H, W\) with 6 pixels"):
        Records.from_arrays(x, y, name="r", image_shape=(2, 2))


def _population(image_shape):
    rng = np.random.default_rng(0)
    x = rng.random((60, 16)).astype(np.float32)
    y = rng.integers(0, 3, 60)
    records = Records.from_arrays(x, y, name="img", image_shape=image_shape)
    import torch

    def build():
        return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))

    return ModelPopulation.train(records, build, TrainingRecipe(epochs=2, batch_size=16), n_models=6, seed=0)


def test_context_queries_every_model_on_every_view():
    pop = _population((4, 4))
    ctx = AttackContext(pop, ("logits",), owner="attack t")
    aug = ctx.signal("confidence", augment="mirror")
    assert aug.shape == (2, 6, 60)
    assert np.array_equal(aug[0], ctx.signal("confidence"))
    mirrored = augment_records(pop.records.x, image_shape=(4, 4), kind="mirror")[1]
    from mia_core.engine.signals import compute_signals

    assert np.allclose(aug[1], compute_signals(pop.logits(mirrored), pop.records.y).confidence)
    view = ctx.for_target(0)
    assert view.ref_signal("loss", augment="mirror").shape == (2, 4, 60)
    assert view.target_signal("logits", augment="mirror").shape == (2, 60, 3)


def test_augmenting_non_images_is_a_clear_error():
    pop = _population(None)
    ctx = AttackContext(pop, ("logits",), owner="attack t")
    with pytest.raises(ValueError, match="declares no image_shape"):
        ctx.signal("confidence", augment="mirror")


def test_lira_averages_per_view_scores():
    from mia_plugins.attacks.lira import LiRA
    from mia_core.stats import fit_gaussians, lira_online

    pop = _population((4, 4))
    ctx = AttackContext(pop, ("logits",), owner="attack lira")
    scores = LiRA(augment="mirror", variance="global").fit(ctx).score(0, np.arange(60))
    view = ctx.for_target(0)
    ref, obs = view.ref_signal("confidence", augment="mirror"), view.target_signal("confidence", augment="mirror")
    expected = np.mean([lira_online(obs=obs[a], fit=fit_gaussians(ref_scores=ref[a], ref_in=view.ref_keep,
                                                                  variance="global")) for a in range(2)], axis=0)
    assert np.allclose(scores, expected)


def test_augmenting_a_dataset_without_image_shape_is_refused_before_training(tmp_path):
    from click.testing import CliRunner

    from mia_core.cli import main

    res = CliRunner().invoke(main, ["eval", "--attack", "lira:augment=mirror", "--dataset", "breast-cancer",
                                    "--n-models", "6", "-q", "--out", str(tmp_path / "runs"),
                                    "--cache-dir", str(tmp_path / "cache")])
    assert res.exit_code == 2
    assert res.stderr.strip() == ("Error: attack 'lira:augment=mirror' cannot run on dataset 'breast-cancer': "
                                  "augment=mirror needs image-shaped records; dataset 'breast-cancer' declares no "
                                  "image shape (use augment=none)")
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()
