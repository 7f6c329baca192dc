"""The vectorized trainer against per-model torch loops: samplers, per-model streams, the fast
and the generic forward path, per-sample gradients and the TrainingDefense hooks."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mia_core.base import TrainingDefense
from mia_core.data import Records
from mia_core.engine import ModelPopulation
from mia_core.engine.ensemble import StackedSequential, VmapForward, ensemble_forward
from mia_core.engine.samplers import (
    FixedSizeSampler,
    PoissonSampler,
    model_generators,
    stream_root,
)
from mia_core.engine.trainer import (
    StepInfo,
    Trainer,
    TrainingRecipe,
    TrainingResult,
    init_ensemble,
    make_keep_matrix,
    train_ensemble,
)

D, C, H = 5, 3, 8


def _data(n=90, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(n, D)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, C, size=n))
    return x, y


def _build():
    return torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C))


def _setup(m=4, n=90, seed=7):
    x, y = _data(n)
    keep = make_keep_matrix(m + m % 2, n, np.random.default_rng(1))[:m]
    base, params, buffers = init_ensemble(_build, m, seed=seed)
    return x, y, keep, base, params, buffers


def _clone(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


def _replay_plans(recipe, keep, seed, epochs, *, epoch_size=None, model_ids=None, sampler=None):
    """The batches the trainer draws: each model from its own stream, epoch after epoch."""
    sampler = sampler or recipe.make_sampler()
    epoch_size = int(keep.sum(1).max()) if epoch_size is None else epoch_size
    ids = range(keep.shape[0]) if model_ids is None else model_ids
    rngs = model_generators(stream_root(seed), ids)
    return [sampler.plan(keep, epoch_size, rngs) for _ in range(epochs)], sampler, epoch_size


def _module(params, i):
    model = _build()
    model.load_state_dict({k: v[i] for k, v in params.items()})
    return model


def _optimizer(model, recipe):
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)


# --------------------------------------------------------------------------- samplers
def test_fixed_sampler_walks_each_models_own_half():
    keep = make_keep_matrix(6, 101, np.random.default_rng(0))
    rngs = model_generators(stream_root(3), range(6))
    plan = FixedSizeSampler(16).plan(keep, int(keep.sum(1).max()), rngs)
    assert plan.index.shape == (plan.steps, 6, 16) and not plan.ragged
    for m in range(6):
        used = plan.index[:, m].ravel()
        assert keep[m, used].all()  # no step holds a non-member
        assert set(np.flatnonzero(keep[m])) <= set(used.tolist())  # every own record once per epoch


def test_poisson_sampler_draws_each_record_with_rate_q():
    keep = make_keep_matrix(4, 400, np.random.default_rng(0))
    sampler = PoissonSampler(0.1)
    rngs = model_generators(stream_root(3), range(4))
    plans = [sampler.plan(keep, int(keep.sum(1).max()), rngs) for _ in range(20)]
    assert all(p.steps == 10 for p in plans)  # round(1 / q) steps per epoch
    counts = np.zeros_like(keep, dtype=np.int64)
    for p in plans:
        assert p.ragged and (p.widths == np.maximum(p.sizes.max(1), 1)).all()
        for s in range(p.steps):
            for m in range(4):
                real = p.index[s, m, : p.sizes[s, m]]
                assert keep[m, real].all() and len(set(real.tolist())) == real.size
                pad = p.index[s, m, p.sizes[s, m]:]  # padding: one of the model's own records
                assert (pad == np.flatnonzero(keep[m])[0]).all() and keep[m, pad].all()
                np.add.at(counts[m], real, 1)
    assert counts[~keep].sum() == 0
    rate = counts[keep].mean() / 200  # 20 epochs x 10 steps
    assert abs(rate - 0.1) < 0.01
    assert sampler.denominators(200, keep.sum(1)).tolist() == (0.1 * keep.sum(1)).tolist()


def test_each_models_plan_depends_on_its_own_stream_only():
    keep = make_keep_matrix(4, 60, np.random.default_rng(0))
    for sampler in (FixedSizeSampler(8), PoissonSampler(0.2)):
        full = sampler.plan(keep, 40, model_generators(stream_root(5), range(4)))
        part = sampler.plan(keep[2:], 40, model_generators(stream_root(5), [2, 3]))
        for j, m in enumerate([2, 3]):
            np.testing.assert_array_equal(full.sizes[:, m], part.sizes[:, j])
            for s in range(full.steps):
                n = full.sizes[s, m]
                np.testing.assert_array_equal(full.index[s, m, :n], part.index[s, j, :n])


@pytest.mark.parametrize("kw,match", [
    (dict(sampler="uniform"), "sampler must be one of fixed, poisson"),
    (dict(sampling_rate=0.1), "poisson sampler only"),
    (dict(sampler="poisson", sampling_rate=0.0), r"sampling_rate must be in \(0, 1\]"),
    (dict(sampler="poisson", sampling_rate=1.5), r"sampling_rate must be in \(0, 1\]"),
])
def test_recipe_rejects_bad_sampler_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainingRecipe(**kw).validate()


# --------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("kind,kw", [("adam", dict(weight_decay=0.01)), ("sgd", dict(momentum=0.9, weight_decay=0.01)),
                                     ("sgd", dict(momentum=0.0))])
def test_fused_step_is_bitwise_torch_optim(kind, kw):
    """The direct fused kernels compute exactly torch.optim's fused update, step after step."""
    from mia_core.engine.optim import FusedAdam, FusedSGD, make_optimizer

    torch.manual_seed(0)
    ours = [torch.randn(4, 3, 5), torch.randn(4, 7)]
    ref = [t.clone() for t in ours]
    opt = make_optimizer(ours, optimizer=kind, lr=0.01, **kw)
    assert isinstance(opt, FusedAdam if kind == "adam" else FusedSGD) and opt.kind == "fused"
    cls = torch.optim.Adam if kind == "adam" else torch.optim.SGD
    torch_opt = cls(ref, lr=0.01, fused=True, **kw)
    for _ in range(5):
        for a, b in zip(ours, ref):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        torch_opt.step()
        for a, b in zip(ours, ref):
            assert torch.equal(a, b)
    foreach = make_optimizer(ours, optimizer=kind, lr=0.01, fused=False, **kw)
    assert foreach.kind == "foreach"
    # a gradient in another memory layout (autograd returns transposed ones) pairs by index, not address
    ours[0].grad = torch.randn(4, 5, 3).transpose(1, 2)
    ref[0].grad = ours[0].grad.contiguous()
    ours[1].grad, ref[1].grad = torch.zeros(4, 7), torch.zeros(4, 7)
    opt.step()
    torch_opt.step()
    assert torch.equal(ours[0], ref[0])


# --------------------------------------------------------------------------- against torch loops
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("sampler", ["fixed", "poisson"])
def test_trainer_equals_independent_torch_loops(optimizer, sampler):
    """The ensemble does exactly what M ordinary training loops on the same batches do."""
    x, y, keep, base, params, buffers = _setup()
    recipe = TrainingRecipe(epochs=3, batch_size=16, lr=0.05, weight_decay=1e-3, optimizer=optimizer, sampler=sampler)
    init = _clone(params)
    result = train_ensemble(base, params, buffers, x, y, keep, recipe, 11)
    plans, smp, epoch_size = _replay_plans(recipe, keep, 11, recipe.epochs)
    denom = smp.denominators(epoch_size, keep.sum(1))
    for i in range(keep.shape[0]):
        model = _module(init, i)
        opt = _optimizer(model, recipe)
        for plan in plans:
            for s in range(plan.steps):
                idx = torch.from_numpy(plan.index[s, i, : plan.sizes[s, i]])  # real rows only
                opt.zero_grad()
                (F.cross_entropy(model(x[idx]), y[idx], reduction="sum") / float(denom[i])).backward()
                opt.step()
        for k, v in model.state_dict().items():
            torch.testing.assert_close(params[k][i], v, rtol=1e-4, atol=1e-5)
    assert result.steps == recipe.epochs * plans[0].steps and result.sampler == sampler
    assert len(result.losses) == recipe.epochs and result.forward == "stacked"


@pytest.mark.parametrize("layers", [
    lambda: [torch.nn.Linear(D, H), torch.nn.Tanh(), torch.nn.Linear(H, C)],
    lambda: [torch.nn.Identity(), torch.nn.ReLU(), torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Identity(),
             torch.nn.ReLU(), torch.nn.Linear(H, H, bias=False), torch.nn.GELU(), torch.nn.Linear(H, C)],
], ids=["tanh", "relu-identity-nobias"])
def test_stacked_and_vmap_paths_agree(layers):
    """The batched-GEMM fast path computes the same maths as vmap(functional_call)."""
    x, y = _data()
    keep = make_keep_matrix(4, x.shape[0], np.random.default_rng(1))
    base, params, buffers = init_ensemble(lambda: torch.nn.Sequential(*layers()), 4, seed=7)
    assert isinstance(ensemble_forward(base), StackedSequential)
    x_before = x.clone()
    recipe = TrainingRecipe(epochs=4, batch_size=16, lr=0.01)
    runs = []
    for stacked in (True, False):
        p = _clone(params)
        res = Trainer(base, p, buffers, x, y, keep, recipe, seed=3, stacked=stacked).fit()
        runs.append((p, res))
    assert runs[0][1].forward == "stacked" and runs[1][1].forward == "vmap"
    for k in params:
        torch.testing.assert_close(runs[0][0][k], runs[1][0][k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runs[0][1].losses, runs[1][1].losses, rtol=1e-5)
    assert torch.equal(x, x_before)  # in-place activations never touch the data


@pytest.mark.parametrize("act", [torch.nn.ReLU, torch.nn.Tanh, torch.nn.Sigmoid, lambda: torch.nn.GELU("tanh"),
                                 torch.nn.SiLU, lambda: torch.nn.LeakyReLU(0.1), torch.nn.Identity])
@pytest.mark.parametrize("sampler", ["fixed", "poisson"])
def test_manual_backward_is_bitwise_autograd(act, sampler):
    """The MLP path's own backward calls autograd's kernels: the trained models are identical."""
    x, y = _data()
    keep = make_keep_matrix(4, x.shape[0], np.random.default_rng(1))
    layers = lambda: torch.nn.Sequential(torch.nn.Linear(D, H), act(), torch.nn.Linear(H, H), act(), torch.nn.Linear(H, C))  # noqa: E731
    base, params, buffers = init_ensemble(layers, 4, seed=7)
    recipe = TrainingRecipe(epochs=3, batch_size=16, sampler=sampler)
    runs = []
    for manual in (True, False):
        p = _clone(params)
        res = Trainer(base, p, buffers, x, y, keep, recipe, seed=3, manual_backward=manual).fit()
        runs.append((p, res))
    assert runs[0][1].backward == "manual" and runs[1][1].backward == "autograd"
    for k in params:
        assert torch.equal(runs[0][0][k], runs[1][0][k]), k
    assert runs[0][1].losses == runs[1][1].losses


def test_fast_path_only_for_linear_stacks():
    assert isinstance(ensemble_forward(torch.nn.Linear(3, 2).to("meta")), StackedSequential)
    bn = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    prelu = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.PReLU(), torch.nn.Linear(4, 2))

    class MyLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    for mod in (bn, prelu, torch.nn.Sequential(MyLinear(3, 2)), torch.nn.Sequential(torch.nn.ReLU())):
        assert isinstance(ensemble_forward(mod.to("meta")), VmapForward)


# --------------------------------------------------------------------------- streams and shards
class _Noise(TrainingDefense):
    """Test-only: Gaussian noise on the summed gradients, from the per-model generators."""

    def __init__(self, sigma: float = 0.5):
        self.sigma = sigma

    def transform_batch(self, grads, step):
        for k, g in grads.items():
            g.add_(step.randn(g.shape[1:], dtype=g.dtype), alpha=self.sigma)

    def report(self, result):
        return {"sigma": self.sigma}


@pytest.mark.parametrize("sampler", ["fixed", "poisson"])
@pytest.mark.parametrize("noise", [False, True])
def test_shards_train_the_same_models(sampler, noise):
    """Models 2 and 3 trained alone equal models 2 and 3 of the 4-model ensemble: their
    initialisation, batches and noise come from (seed, model index) only, and every kernel involved
    (batched GEMM, row-wise cross-entropy, elementwise Adam) treats models independently.

    Bitwise with fixed-size batches. With Poisson batches a step is padded to the widest batch of
    the models trained together, so the shard's padded width differs; the padding rows add exact
    zeros, but the GEMM and sum kernels block their reduction over the batch axis by its length,
    which reassociates the real rows' sum (measured: 1-2 ulp after 3 epochs)."""
    x, y, keep, base, params, buffers = _setup(m=4)
    recipe = TrainingRecipe(epochs=3, batch_size=16, sampler=sampler)
    epoch_size = int(keep.sum(1).max())
    defenses = [_Noise()] if noise else []
    Trainer(base, params, buffers, x, y, keep, recipe, seed=21, defenses=defenses).fit()
    _, part, pbuf = init_ensemble(_build, 4, seed=7, model_ids=[2, 3])
    Trainer(base, part, pbuf, x, y, keep[2:], recipe, seed=21, model_ids=[2, 3], epoch_size=epoch_size,
            defenses=defenses).fit()
    for k in params:
        if sampler == "fixed":
            assert torch.equal(params[k][2:], part[k]), k
        else:
            torch.testing.assert_close(params[k][2:], part[k], rtol=1e-6, atol=1e-6)


def test_same_seed_same_models_bitwise_and_seed_matters():
    x, y, keep, base, params, buffers = _setup()
    recipe = TrainingRecipe(epochs=2, batch_size=16, sampler="poisson")
    outs = []
    for seed in (5, 5, 6):
        p = _clone(params)
        train_ensemble(base, p, buffers, x, y, keep, recipe, seed)
        outs.append(p)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in params)
    assert not all(torch.equal(outs[0][k], outs[2][k]) for k in params)


# --------------------------------------------------------------------------- per-sample gradients
class ClipPerSample(TrainingDefense):
    """Test-only: DP-SGD's flat clipping of each sample's gradient to norm ``c`` (over all of a
    model's parameters), with Opacus' factor ``min(1, c / (norm + 1e-6))``. Records what it saw."""

    per_sample_gradients = True

    def __init__(self, c: float = 0.5):
        self.c = c
        self.seen: List[Dict[str, torch.Tensor]] = []
        self.masks: List[torch.Tensor] = []

    def transform_per_sample(self, grads, mask, step):
        self.seen.append({k: g.clone() for k, g in grads.items()})
        self.masks.append(mask.clone())
        norms = torch.sqrt(sum(g.flatten(2).pow(2).sum(-1) for g in grads.values()))  # [M, B]
        factor = (self.c / (norms + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(factor.view(*factor.shape, *([1] * (g.dim() - 2))))

    def report(self, result):
        return {"c": self.c, "steps": result.steps}


@pytest.mark.parametrize("sampler", ["fixed", "poisson"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_per_sample_clipping_matches_autograd_loops(sampler, optimizer):
    """Per-sample gradients and clipped updates equal a per-model loop of plain autograd."""
    x, y, keep, base, params, buffers = _setup(m=3, n=60)
    recipe = TrainingRecipe(epochs=2, batch_size=8, lr=0.1, optimizer=optimizer, momentum=0.5, sampler=sampler)
    init = _clone(params)
    clip = ClipPerSample(0.5)
    result = train_ensemble(base, params, buffers, x, y, keep, recipe, 4, defenses=[clip])
    assert result.per_sample_gradients and result.defenses == [{"c": 0.5, "steps": result.steps}]
    plans, smp, epoch_size = _replay_plans(recipe, keep, 4, recipe.epochs)
    denom = smp.denominators(epoch_size, keep.sum(1))
    names = list(init)
    for i in range(3):
        model = _module(init, i)
        opt = _optimizer(model, recipe)
        t = 0
        for plan in plans:
            for s in range(plan.steps):
                rows = plan.index[s, i, : plan.sizes[s, i]]
                summed = [torch.zeros_like(p) for p in model.parameters()]
                for b, r in enumerate(rows):
                    loss = F.cross_entropy(model(x[r : r + 1]), y[r : r + 1])
                    g = torch.autograd.grad(loss, list(model.parameters()))
                    for k, gk in zip(names, g):  # the trainer saw the same per-sample gradient
                        torch.testing.assert_close(clip.seen[t][k][i, b], gk, rtol=1e-5, atol=1e-6)
                    norm = torch.sqrt(sum(gk.pow(2).sum() for gk in g))
                    factor = (0.5 / (norm + 1e-6)).clamp(max=1.0)
                    summed = [a + factor * gk for a, gk in zip(summed, g)]
                assert clip.masks[t][i].sum() == len(rows)
                for k in names:  # padding rows reach the hook as exact zeros
                    assert (clip.seen[t][k][i, len(rows):] == 0).all()
                for p, g in zip(model.parameters(), summed):
                    p.grad = g / float(denom[i])
                opt.step()
                t += 1
        for k, v in model.state_dict().items():
            torch.testing.assert_close(params[k][i], v, rtol=1e-4, atol=1e-5)


def _first_poisson_batch(trainer):
    plan = trainer.sample_epoch(0)
    for s, batch in enumerate(trainer.batches(plan)):
        if plan.sizes[s].min() < plan.widths[s]:  # some model's batch is padded
            return plan, s, batch
    raise AssertionError("no padded step drawn")


@pytest.mark.parametrize("per_sample", [False, True])
def test_poisson_padding_contributes_nothing(per_sample):
    """Gradients of a padded ragged batch equal each model's gradient on its real rows alone."""
    x, y, keep, base, params, buffers = _setup(m=4, n=120)
    recipe = TrainingRecipe(epochs=1, sampler="poisson", sampling_rate=0.1)
    defenses = [ClipPerSample(1e9)] if per_sample else []  # clipping that never binds
    trainer = Trainer(base, params, buffers, x, y, keep, recipe, seed=2, defenses=defenses)
    for p in params.values():
        p.requires_grad_(True)
    plan, s, batch = _first_poisson_batch(trainer)
    info = StepInfo(step=0, epoch=0, denominator=trainer.denominator, batch_sizes=batch.sizes, generators=())
    data = trainer.gradients(batch, info)
    denom = trainer.denominator
    expected_loss = 0.0
    for i in range(4):
        model = _module(params, i)
        idx = torch.from_numpy(plan.index[s, i, : plan.sizes[s, i]])
        loss = F.cross_entropy(model(x[idx]), y[idx], reduction="sum") / denom[i]
        loss.backward()
        expected_loss += float(loss.detach())
        for k, p in model.named_parameters():
            torch.testing.assert_close(params[k].grad[i], p.grad, rtol=1e-5, atol=1e-7)
    assert float(data) == pytest.approx(expected_loss, rel=1e-5)


# --------------------------------------------------------------------------- hooks and result
class _Penalty(TrainingDefense):
    """Test-only: 0.5 * a * ||b||^2 on the first layer's bias, per model."""

    def __init__(self, a: float = 0.3):
        self.a = a

    def penalty(self, params, batch):
        return 0.5 * self.a * params["0.bias"].pow(2).sum(dim=1)

    def report(self, result):
        return {"a": self.a}


class _Recorder(TrainingDefense):
    """Test-only: records configure/post_step calls and zeroes the last layer's bias after each step."""

    def __init__(self):
        self.steps: List[int] = []
        self.epochs: List[int] = []
        self.ctx = None

    def configure(self, ctx):
        self.ctx = ctx

    def post_step(self, params, step):
        assert not torch.is_grad_enabled()
        self.steps.append(step.step)
        self.epochs.append(step.epoch)
        params["2.bias"].zero_()

    def report(self, result):
        return {"calls": len(self.steps), "losses": len(result.losses)}


@pytest.mark.parametrize("route", ["batch", "transform_batch", "per_sample"])
def test_penalty_gradient_is_added_to_each_model(route):
    """One SGD step (lr 1): the update with the penalty minus the update without it is the
    penalty's gradient a * b, on every route the trainer can take."""
    x, y, keep, base, params, buffers = _setup()
    recipe = TrainingRecipe(epochs=1, batch_size=200, lr=1.0, optimizer="sgd", momentum=0.0)  # one step per epoch
    extra = {"batch": [], "transform_batch": [_Noise(0.0)], "per_sample": [ClipPerSample(1e9)]}[route]
    runs = []
    for defenses in (extra, extra + [_Penalty(0.3)]):
        p = _clone(params)
        res = Trainer(base, p, buffers, x, y, keep, recipe, seed=0, defenses=defenses).fit()
        assert res.steps == 1
        runs.append(p)
    torch.testing.assert_close(runs[0]["0.bias"] - runs[1]["0.bias"], 0.3 * params["0.bias"], rtol=1e-5, atol=1e-6)
    for k in ("0.weight", "2.weight", "2.bias"):
        torch.testing.assert_close(runs[0][k], runs[1][k], rtol=1e-6, atol=1e-7)


class _OutputPenalty(TrainingDefense):
    """Test-only: a * sum of squared logits of every model on 10 records of its own choosing,
    taken from the training context (as adversarial regularization takes its reference set)."""

    def __init__(self, a: float = 0.05):
        self.a = a

    def configure(self, ctx):
        self.ref_ = ctx.x[:10]
        assert ctx.y.shape == (ctx.x.shape[0],) and ctx.keep.shape == (ctx.n_models, ctx.x.shape[0])

    def penalty(self, params, batch):
        assert batch.x.shape[:2] == batch.y.shape
        ref = self.ref_.unsqueeze(0).expand(batch.x.shape[0], *self.ref_.shape)
        return self.a * batch.logits(params, ref).pow(2).sum(dim=(1, 2))

    def report(self, result):
        return {"a": self.a}


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("route", ["batch", "per_sample"])
def test_penalty_on_the_models_outputs(route, stacked):
    """A penalty on the outputs (through ``batch.logits``) adds exactly its gradient, as plain
    autograd on each model's own module computes it, on both forward paths."""
    x, y, keep, base, params, buffers = _setup()
    recipe = TrainingRecipe(epochs=1, batch_size=200, lr=1.0, optimizer="sgd", momentum=0.0)
    extra = {"batch": [], "per_sample": [ClipPerSample(1e9)]}[route]
    runs = []
    for defenses in (extra, extra + [_OutputPenalty(0.05)]):
        p = _clone(params)
        Trainer(base, p, buffers, x, y, keep, recipe, seed=0, defenses=defenses, stacked=stacked).fit()
        runs.append(p)
    for m in range(keep.shape[0]):
        model = _build()
        model.load_state_dict({k: v[m] for k, v in params.items()})
        loss = 0.05 * model(x[:10]).pow(2).sum()
        expected = dict(zip([k for k, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
        for k in params:
            torch.testing.assert_close(runs[0][k][m] - runs[1][k][m], expected[k], rtol=1e-4, atol=1e-6)


def test_post_step_configure_report_and_on_epoch():
    x, y, keep, base, params, buffers = _setup()
    recipe = TrainingRecipe(epochs=2, batch_size=16)
    rec, seen, zeros = _Recorder(), [], []
    result = train_ensemble(base, params, buffers, x, y, keep, recipe, 0, defenses=[rec, _Penalty()],
                            on_epoch=lambda e, loss: seen.append((e, loss)),
                            post_step=lambda p: zeros.append(bool((p["2.bias"] == 0).all())))
    assert isinstance(result, TrainingResult)
    assert rec.ctx.n_models == 4 and rec.ctx.param_shapes["0.weight"] == (H, D) and rec.ctx.sampler.name == "fixed"
    assert rec.steps == list(range(result.steps)) and rec.epochs[-1] == 1
    assert all(zeros) and len(zeros) == result.steps  # post_step= runs after the defenses' hooks
    assert (params["2.bias"] == 0).all() and not params["2.bias"].requires_grad
    assert result.defenses == [{"calls": result.steps, "losses": 2}, {"a": 0.3}]
    assert [e for e, _ in seen] == [0, 1] and [l for _, l in seen] == result.losses
    assert result.steps_per_epoch == int(np.ceil(keep.sum(1).max() / 16))
    assert result.sampling_rate == pytest.approx(16 / keep.sum(1).min())
    assert result.to_dict()["sampler"] == "fixed"


def test_configure_may_switch_to_poisson():
    class Poisson(_Recorder):
        def configure(self, ctx):
            ctx.sampler = PoissonSampler(0.25)

    x, y, keep, base, params, buffers = _setup()
    result = train_ensemble(base, params, buffers, x, y, keep, TrainingRecipe(epochs=1), 0, defenses=[Poisson()])
    assert result.sampler == "poisson" and result.sampling_rate == 0.25 and result.steps == 4


def test_population_train_stores_the_training_result():
    x, y = _data(80)
    rec = Records.from_arrays(x.numpy(), y.numpy(), name="toy", n_classes=C)
    pop = ModelPopulation.train(rec, _build, TrainingRecipe(epochs=2, batch_size=16), n_models=4, seed=0,
                                defenses=[_Penalty(0.1)])
    assert pop.training.epochs == 2 and pop.training.defenses == [{"a": 0.1}]
    assert pop.training.forward == "stacked"


# --------------------------------------------------------------------------- per-model labels
@pytest.mark.parametrize("sampler", ["fixed", "poisson"])
@pytest.mark.parametrize("stacked", [True, False], ids=["stacked", "vmap"])
def test_per_model_labels_are_each_models_own(sampler, stacked):
    """``y [M, N]``: model m learns ``y[m]``. The same labels repeated per model train bitwise the
    same models as ``y [N]``; other labels for one model change that model only, exactly as an
    ordinary loop on its own labels does."""
    x, y, keep, base, params, buffers = _setup()
    recipe = TrainingRecipe(epochs=2, batch_size=16, lr=0.05, sampler=sampler)
    init = _clone(params)
    Trainer(base, params, buffers, x, y, keep, recipe, seed=5, stacked=stacked).fit()
    repeated = _clone(init)
    Trainer(base, repeated, buffers, x, y.expand(keep.shape[0], -1).clone(), keep, recipe, seed=5, stacked=stacked).fit()
    for k in params:
        assert torch.equal(params[k], repeated[k])
    own = y.expand(keep.shape[0], -1).clone()
    own[2] = (y + 1) % C
    relabelled = _clone(init)
    Trainer(base, relabelled, buffers, x, own, keep, recipe, seed=5, stacked=stacked).fit()
    plans, smp, epoch_size = _replay_plans(recipe, keep, 5, recipe.epochs)
    denom = smp.denominators(epoch_size, keep.sum(1))
    model = _module(init, 2)
    opt = _optimizer(model, recipe)
    for plan in plans:
        for s in range(plan.steps):
            idx = torch.from_numpy(plan.index[s, 2, : plan.sizes[s, 2]])
            opt.zero_grad()
            (F.cross_entropy(model(x[idx]), own[2][idx], reduction="sum") / float(denom[2])).backward()
            opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(relabelled[k][2], v, rtol=1e-4, atol=1e-5)
        for m in (0, 1, 3):
            assert torch.equal(relabelled[k][m], params[k][m])
    with pytest.raises(ValueError, match=r"y must be \[N\] labels or \[M, N\] per-model labels"):
        Trainer(base, _clone(init), buffers, x, own[:2], keep, recipe, seed=5)
