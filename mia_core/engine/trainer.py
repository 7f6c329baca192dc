"""Training M models at once: the vectorized ensemble and its step pipeline.

The M models of a population share an architecture, so their parameters are stacked along a new
leading axis (``torch.func.stack_module_state``) and one batched forward/backward pass trains all
of them (:mod:`mia_core.engine.ensemble`: batched GEMMs for MLPs, ``vmap`` over
``functional_call`` otherwise). Because the models' parameters are disjoint slices and Adam/SGD
update elementwise, one optimizer over the stacked tensors performs exactly the M independent
optimisations (``tests/engine/test_trainer.py`` checks this against per-model torch loops).

One optimizer step of :class:`Trainer` runs these named stages, in the order of Opacus'
``DPOptimizer`` (``pre_step`` -> clip and accumulate -> add noise -> scale -> step hook), each a
method a subclass or a :class:`~mia_core.base.TrainingDefense` hook can change:

============================  =================================================================
stage                         where
============================  =================================================================
0. configure                  ``TrainingDefense.configure(ctx)`` once (may replace ``ctx.sampler``)
1. batch sampler              :meth:`Trainer.sample_epoch` (a :class:`~mia_core.engine.samplers.BatchSampler`,
                              per-model streams), :meth:`Trainer.batches` (gathers on the device)
2. per-model loss             :meth:`Trainer.losses`, :meth:`Trainer.data_loss`; :meth:`Trainer.penalty`
                              (``TrainingDefense.penalty``)
3. gradients                  :meth:`Trainer.gradients`: :meth:`Trainer.batch_gradients` (MLP fast path's
                              own backward, or autograd), or per sample (``torch.func``)
4. gradient transforms        in :meth:`Trainer.gradients`: ``transform_per_sample`` -> sum over the
                              batch -> ``transform_batch`` -> / denominator -> + penalty gradient
5. optimizer step             :meth:`Trainer.optimizer_step` (:mod:`mia_core.engine.optim`: fused Adam/SGD)
6. post-step hooks            :meth:`Trainer.post_step` (``TrainingDefense.post_step``, then ``post_step=``)
7. report                     :meth:`Trainer.fit` returns the :class:`TrainingResult` with every
                              ``TrainingDefense.report(result)``
============================  =================================================================

The result is a typed :class:`TrainingResult`. Every model draws its data order (and any noise)
from its own random stream derived from ``(seed, model index)``, so training models ``0..M-1``
in one ensemble or in shards gives the same models.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

from mia_core.params import check_n_references
from mia_core.engine import optim as _optim
from mia_core.engine.ensemble import EnsembleForward, StackedSequential, Workspace, ensemble_forward, per_sample_gradients
from mia_core.engine.samplers import (
    SAMPLERS,
    STREAM_NOISE,
    STREAM_ORDER,
    BatchSampler,
    EpochPlan,
    FixedSizeSampler,
    PoissonSampler,
    SeedLike,
    model_generators,
    model_stream,
    permutation_plan,
    stream_root,
)

Params = Dict[str, torch.Tensor]

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainingRecipe:
    """How every model of a population is trained.

    Attributes:
        epochs: passes over each model's training half.
        batch_size: records per mini-batch and model (the expected number with Poisson sampling).
        lr: learning rate.
        weight_decay: L2 coefficient of the optimizer (as in ``torch.optim``: ``weight_decay * θ``
            is added to the gradient; the ``weight-decay`` defense is the reported alternative).
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum (ignored by Adam).
        sampler: ``"fixed"`` (per-model permutations, ``batch_size`` records a step) or
            ``"poisson"`` (each training record in a step's batch with probability
            ``sampling_rate``). A train-time defense may replace the sampler (DP-SGD needs Poisson).
        sampling_rate: Poisson's ``q`` in ``(0, 1]``; ``None`` = ``batch_size`` over the largest
            training half (so a batch holds ``batch_size`` records on average). Only with ``poisson``.
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9
    sampler: str = "fixed"
    sampling_rate: Optional[float] = None

    def validate(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.sampling_rate is not None:
            if self.sampler != "poisson":
                raise ValueError(f"sampling_rate applies to the poisson sampler only (sampler is {self.sampler!r})")
            if not (isinstance(self.sampling_rate, (int, float)) and 0 < self.sampling_rate <= 1):
                raise ValueError(f"sampling_rate must be in (0, 1], got {self.sampling_rate!r}")

    def make_sampler(self) -> BatchSampler:
        """The batch sampler this recipe asks for."""
        if self.sampler == "poisson":
            return PoissonSampler(self.sampling_rate, batch_size=self.batch_size)
        return FixedSizeSampler(self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)


def make_keep_matrix(n_models: int, n_records: int, rng: np.random.Generator) -> np.ndarray:
    """Random membership in complementary pairs: bool ``[M, N]``, ``K[2i+1] = ~K[2i]``.

    Each pair of models ``(2i, 2i+1)`` splits the records in two: every record is IN for exactly
    one model of each pair, chosen by a fair coin per record and pair, so every record is IN for
    exactly ``M/2`` models and each model trains on a random half (about ``N/2`` records).

    Why pairs (the fair membership game): with LiRA's reference design (each record IN for the
    ``M/2`` models holding its smallest uniforms) the other models hold ``M/2 - K[t, j]`` IN
    references for record ``j``, so the reference keep matrix alone reveals the target's
    membership. Here the references of target ``t`` are every model but ``t`` and its partner
    ``t ^ 1`` (:func:`references`): ``(M-2)/2`` pairs, each with one IN and one OUT model for every
    record, drawn independently of the target's pair. The references' membership is then
    independent of the target's, and every record has ``(M-2)/2`` IN and ``(M-2)/2`` OUT references.
    """
    if n_models < 2 or n_models % 2:
        raise ValueError(f"n_models must be an even number >= 2, got {n_models}")
    first = rng.random((n_models // 2, n_records)) < 0.5  # [pairs, N]: IN for the pair's first model
    keep = np.empty((n_models, n_records), dtype=bool)
    keep[0::2] = first
    keep[1::2] = ~first
    return keep


def reserve_records(n_records: int, fraction: float, seed: int) -> np.ndarray:
    """The reserved records (the keep matrix's third role: trained on by no model, scored against
    no target): bool ``[N]`` with ``round(fraction * N)`` entries set, drawn from the run seed on a
    stream of their own, so the pairs' coin flips of the other records do not change."""
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"the reserved fraction must be in [0, 1), got {fraction!r}")
    out = np.zeros(n_records, dtype=bool)
    k = int(round(float(fraction) * n_records))
    if k:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x72657376]))  # "resv"
        out[rng.choice(n_records, size=k, replace=False)] = True
    return out


def partner(model: int) -> int:
    """The other model of ``model``'s complementary pair (see :func:`make_keep_matrix`)."""
    return int(model) ^ 1


def references(target: int, n_models: int) -> np.ndarray:
    """The reference models of ``target``: every model but the target and its partner, int64
    ``[M - 2]`` (the partner's membership is the complement of the target's)."""
    if not 0 <= target < n_models:
        raise IndexError(f"target {target} out of range [0, {n_models})")
    return np.array([m for m in range(n_models) if m != target and m != partner(target)], dtype=np.int64)


def select_references(*, target: int, n_models: int, n_references: Optional[int], online: bool,
                      seed: int) -> np.ndarray:
    """A reproducible subset of ``target``'s references for an attack with a reference budget.

    The references come in complementary pairs (:func:`make_keep_matrix`), so a subset taken as
    whole pairs keeps the fair game: every record then has as many IN as OUT references, whatever
    the target's membership. The pairs are shuffled once per ``(seed, target)`` and taken from the
    front, so the budgets are nested (the 2-reference subset contains the 1-reference one) and
    every attack given the same budget sees the same models.

    * ``online=False`` (offline attacks use only the OUT references of each record): ``k`` pairs,
      so every record is scored against exactly ``k`` OUT reference models, as in the papers'
      offline setting with ``k`` reference models that never trained on the target records.
    * ``online=True``: ``k / 2`` pairs, so ``k`` reference models, ``k / 2`` IN and ``k / 2`` OUT
      for every record (``k`` must be even).

    Args:
        target: the target model; n_models: ``M``.
        n_references: ``k``, or ``None`` for all ``M - 2`` references.
        online: whether the attack uses IN references (see above).
        seed: the attack context's seed (:attr:`AttackContext.seed`).

    Returns:
        int64 ``[R]`` model indices, ``R = 2k`` offline, ``k`` online, ``M - 2`` for ``None``.

    Raises:
        ValueError: ``k`` is not a positive integer, is odd online, or needs more pairs than the
            ``(M - 2) / 2`` the population has.
    """
    refs = references(target, n_models)
    if n_references is None:
        return refs
    k = n_references
    check_n_references(k, even=online, online_option=True)
    pairs = int(k) if not online else int(k) // 2
    available = (n_models - 2) // 2
    if pairs > available:
        most = available if not online else 2 * available
        raise ValueError(f"n_references={k} needs {pairs} reference pairs but a population of {n_models} models "
                         f"has {available} besides the target's; use n_references <= {most} or more --n-models")
    first = refs[0::2]  # refs are whole pairs in order: (2i, 2i+1) for every pair i but the target's
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0x726566, int(target)])).permutation(len(first))
    chosen = np.sort(first[order[:pairs]])
    return np.sort(np.concatenate([chosen, chosen ^ 1])).astype(np.int64)


def model_seeds(seed: int, n_models: int, *, model_ids: Optional[Sequence[int]] = None) -> list:
    """Independent per-model initialisation seeds derived from one run seed.

    Model ``m``'s seed depends on ``(seed, m)`` only, so a shard given ``model_ids`` initialises
    its models exactly as the whole ensemble does.
    """
    ss = np.random.SeedSequence([seed, 0x6D6961])  # "mia": keeps streams apart from batching
    ids = range(n_models) if model_ids is None else model_ids
    return [int(np.random.SeedSequence(ss.entropy, spawn_key=(int(m),)).generate_state(1)[0]) for m in ids]


def init_ensemble(
    build: Callable[[], torch.nn.Module], n_models: int, seed: int, *, model_ids: Optional[Sequence[int]] = None
) -> Tuple[torch.nn.Module, Params, Params]:
    """Build freshly initialised copies of models ``model_ids`` (default ``0..n_models-1``) and
    stack their state.

    Returns:
        ``(base, params, buffers)``: ``base`` is a parameter-free (meta-device) copy of the
        architecture for ``functional_call``; ``params`` and ``buffers`` map names to stacked
        tensors ``[M, ...]`` (params are leaves with ``requires_grad=True``).
    """
    models = []
    for s in model_seeds(seed, n_models, model_ids=model_ids):
        torch.manual_seed(s)
        models.append(build())
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    return base, params, buffers


#: Today's name of :func:`~mia_core.engine.samplers.permutation_plan` (fixed-size batches).
_batch_plan = permutation_plan


# --------------------------------------------------------------------------- typed results
@dataclass
class TrainingContext:
    """What :meth:`~mia_core.base.TrainingDefense.configure` sees before training.

    Attributes:
        recipe: the training recipe.
        n_models: ``M``, the models trained together (a shard of the population, possibly).
        model_ids: int64 ``[M]``: the population index of each model (its random streams).
        train_sizes: int64 ``[M]``: ``n_m``, the records in each model's training half.
        n_records: ``N``, records in the population.
        epoch_size: records one epoch walks (population-level; the largest training half).
        epochs, lr: what this training run uses (fine-tuning may override the recipe's).
        param_shapes: ``{name: shape of one model's tensor}``.
        device: where the parameters live.
        seed: the root :class:`~numpy.random.SeedSequence` of the per-model streams.
        sampler: the batch sampler; a defense may replace it (e.g. DP-SGD sets Poisson).
        x, y: every record's features ``[N, ...]`` and labels int64 ``[N]`` (or ``[M, N]``:
            per-model labels, as unlearning by relabelling trains), on ``device`` (a defense that
            needs data of its own, such as adversarial regularization's reference set, takes it
            from here).
        keep: bool ``[M, N]``: which records each model trains on (its non-members are the rest).
        reserved: int64 ``[R]``: the reserved records (see
            :meth:`~mia_core.base.TrainingDefense.reserve_fraction`): no model trains on them and
            no target is scored on them, so a defense may use them as known non-members.
    """

    recipe: TrainingRecipe
    n_models: int
    model_ids: np.ndarray
    train_sizes: np.ndarray
    n_records: int
    epoch_size: int
    epochs: int
    lr: float
    param_shapes: Dict[str, Tuple[int, ...]]
    device: torch.device
    seed: np.random.SeedSequence
    sampler: BatchSampler
    x: torch.Tensor
    y: torch.Tensor
    keep: np.ndarray
    reserved: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: one model of the ensemble on the meta device (the architecture: layer types and shapes)
    module: Optional[torch.nn.Module] = None

    def model_stream(self, m: int, purpose: int) -> np.random.SeedSequence:
        """The random stream of the ``m``-th model of this ensemble (``model_ids[m]`` in the
        population) for ``purpose``; see :mod:`mia_core.engine.samplers`."""
        return model_stream(self.seed, int(self.model_ids[m]), purpose)


@dataclass
class StepBatch:
    """What :meth:`~mia_core.base.TrainingDefense.penalty` sees of the current step.

    Attributes:
        x: every model's batch ``[M, W, ...]`` (``W`` the step's width).
        y: int64 ``[M, W]`` labels.
        mask: bool ``[M, W]`` real samples of ragged (Poisson) batches, or ``None`` (all real).
    """

    x: torch.Tensor
    y: torch.Tensor
    mask: Optional[torch.Tensor]
    _forward: Callable[[Params, torch.Tensor], torch.Tensor] = field(repr=False)

    def logits(self, params: Params, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits ``[M, B, C]`` of model ``m`` on row ``m`` of ``x [M, B, ...]`` (default: the
        batch), differentiable in ``params`` (e.g. for a penalty on the outputs)."""
        return self._forward(params, self.x if x is None else x)


@dataclass
class StepInfo:
    """What gradient transforms and post-step hooks learn about the current step.

    Attributes:
        step: 0-based optimizer step since the start of this training run.
        epoch: 0-based epoch.
        denominator: float ``[M]`` on the parameters' device: what the summed gradients are
            divided by (``B`` for fixed-size batches, ``q * n_m`` for Poisson).
        batch_sizes: int64 ``[M]`` on the device: real (unpadded) samples of each model's batch.
        generators: one :class:`torch.Generator` per model on the parameters' device, seeded from
            the model's own noise stream: draw model ``m``'s noise from ``generators[m]`` only
            (or use :meth:`randn`), so the noise does not depend on the other models.
    """

    step: int
    epoch: int
    denominator: torch.Tensor
    batch_sizes: torch.Tensor
    generators: Sequence[torch.Generator]

    def randn(self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise ``[M, *shape]``: row ``m`` from ``generators[m]``."""
        dev = self.denominator.device
        return torch.stack([torch.randn(tuple(shape), generator=g, dtype=dtype, device=dev) for g in self.generators])


@dataclass
class TrainingResult:
    """What training did.

    Attributes:
        losses: per epoch, the mean over models and steps of each model's batch loss (the
            cross-entropy data term, penalties excluded).
        steps: optimizer steps taken.
        epochs: epochs run.
        steps_per_epoch: optimizer steps per epoch.
        sampling_rate: ``q``, the expected fraction of a model's training half in one step's batch
            (the largest over models: for fixed-size batches ``B / n_m`` varies per model).
        sampler: the sampler's name (``"fixed"`` or ``"poisson"``).
        forward: ``"stacked"`` (batched-GEMM MLP path) or ``"vmap"``.
        backward: ``"manual"`` (the MLP path's own backward into a reused workspace),
            ``"autograd"``, ``"per-sample"`` (``torch.func``, when a defense asks), or
            ``"per-sample-norms"`` (an MLP whose per-sample defenses only rescale by norm: the
            norms and the rescaled sum without materialising per-sample gradients).
        per_sample_gradients: whether per-sample gradients were computed.
        defenses: each train-time defense's ``report(result)``, in the order given.
    """

    losses: List[float]
    steps: int
    epochs: int
    steps_per_epoch: int
    sampling_rate: float
    sampler: str
    forward: str
    backward: str
    per_sample_gradients: bool
    defenses: List[Dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- optimizer
def make_optimizer(tensors: Sequence[torch.Tensor], recipe: TrainingRecipe, lr: Optional[float] = None):
    """Adam or SGD over the stacked tensors, per the recipe: torch's fused kernel where the device
    has one (:mod:`mia_core.engine.optim`), else ``torch.optim``'s ``foreach``. Both compute the
    same elementwise update; the returned object has ``step()`` and ``kind``."""
    return _optim.make_optimizer(
        tensors, optimizer=recipe.optimizer, lr=recipe.lr if lr is None else lr,
        weight_decay=recipe.weight_decay, momentum=recipe.momentum,
    )


def _overrides(obj: Any, hook: str) -> bool:
    """Whether a defense overrides ``TrainingDefense.<hook>`` (so no-op hooks cost nothing)."""
    from mia_core.base import TrainingDefense

    base = getattr(TrainingDefense, hook)
    return getattr(type(obj), hook, base) is not base


@dataclass
class _Batch:
    """One step's batch on the device."""

    x: torch.Tensor  # [M, W, ...]
    y: torch.Tensor  # int64 [M, W]
    mask: Optional[torch.Tensor]  # bool [M, W]; None = every row real
    scale: Optional[torch.Tensor]  # float [M, W]: mask / denominator (Poisson only)
    sizes: torch.Tensor  # int64 [M]


# --------------------------------------------------------------------------- the trainer
class Trainer:
    """Trains ``M`` stacked models in place, one step pipeline for all of them.

    Args:
        base: meta-device module from :func:`init_ensemble`.
        params: stacked parameters ``{name: Tensor[M, ...]}``, updated in place.
        buffers: stacked buffers.
        x: float ``[N, D]`` features of the whole population (any device; the parameters' device).
        y: int64 ``[N]`` labels, or ``[M, N]``: model ``m`` learns label ``y[m, j]`` for record ``j``.
        keep: bool ``[M, N]``; model ``m`` trains on records ``keep[m]`` only.
        recipe: optimiser, batch size, epochs, sampler.
        seed: the root of the per-model streams (``int``, ``SeedSequence`` or ``Generator``;
            see :func:`~mia_core.engine.samplers.stream_root`).
        model_ids: the population index of each of the ``M`` models (default ``0..M-1``); a
            shard passes its own, and gets the same models as the full ensemble.
        epoch_size: records one epoch walks; default the largest training half in ``keep``. A
            shard passes the whole population's value.
        defenses: train-time defenses (:class:`~mia_core.base.TrainingDefense`), in order.
        epochs, lr: override the recipe's (fine-tuning).
        post_step: called with ``params`` after every optimizer step (and after the defenses'
            ``post_step``), under ``no_grad`` (e.g. to re-apply pruning masks).
        on_epoch: called with ``(epoch, mean loss)`` after each epoch (one host sync per epoch).
        sampler: use this sampler instead of the recipe's (defenses may still replace it).
        stacked: allow the batched-GEMM fast path for MLPs (``False`` forces ``vmap``).
        manual_backward: on that path, run the backward pass without autograd where every
            activation allows it (``False`` uses autograd; both give the same gradients).
        reserved: int ``[R]`` the population's reserved records (``ctx.reserved`` for defenses).
    """

    def __init__(
        self,
        base: torch.nn.Module,
        params: Params,
        buffers: Params,
        x: torch.Tensor,
        y: torch.Tensor,
        keep: np.ndarray,
        recipe: TrainingRecipe,
        *,
        seed: SeedLike,
        model_ids: Optional[Sequence[int]] = None,
        epoch_size: Optional[int] = None,
        defenses: Sequence[Any] = (),
        epochs: Optional[int] = None,
        lr: Optional[float] = None,
        post_step: Optional[Callable[[Params], None]] = None,
        on_epoch: Optional[Callable[[int, float], None]] = None,
        sampler: Optional[BatchSampler] = None,
        stacked: bool = True,
        manual_backward: bool = True,
        reserved: Optional[np.ndarray] = None,
    ):
        keep = np.asarray(keep, dtype=bool)
        n_models = keep.shape[0]
        for name, p in params.items():
            if p.shape[0] != n_models:
                raise ValueError(f"parameter {name!r} stacks {p.shape[0]} models, the keep matrix has {n_models} rows")
        if x.shape[0] != keep.shape[1]:
            raise ValueError(f"x must have one row per record ({keep.shape[1]}), got {x.shape[0]}")
        if tuple(y.shape) not in ((keep.shape[1],), tuple(keep.shape)):
            raise ValueError(f"y must be [N] labels or [M, N] per-model labels with [M, N] = {list(keep.shape)}, "
                             f"got {list(y.shape)}")
        ids = np.arange(n_models) if model_ids is None else np.asarray(model_ids, dtype=np.int64)
        if ids.shape != (n_models,):
            raise ValueError(f"model_ids must list {n_models} model indices, got {len(ids)}")
        sizes = keep.sum(axis=1).astype(np.int64)
        if (sizes == 0).any():
            raise ValueError(f"model {int(ids[np.argmin(sizes)])} has no training records")
        self.base, self.params, self.buffers = base, params, buffers
        first = next(iter(params.values()))
        self.device = first.device
        self.x, self.y, self.keep = x, y, keep
        self.recipe = recipe
        self.defenses = list(defenses)
        self._post_step_fn, self._on_epoch = post_step, on_epoch
        self.ctx = TrainingContext(
            recipe=recipe,
            n_models=n_models,
            model_ids=ids,
            train_sizes=sizes,
            n_records=int(keep.shape[1]),
            epoch_size=int(sizes.max() if epoch_size is None else epoch_size),
            epochs=recipe.epochs if epochs is None else int(epochs),
            lr=recipe.lr if lr is None else float(lr),
            param_shapes={k: tuple(v.shape[1:]) for k, v in params.items()},
            device=self.device,
            seed=stream_root(seed),
            sampler=sampler if sampler is not None else recipe.make_sampler(),
            x=x,
            y=y,
            keep=keep,
            reserved=np.zeros(0, dtype=np.int64) if reserved is None else np.asarray(reserved, dtype=np.int64),
            module=base,
        )
        for d in self.defenses:  # stage 0: configure (may replace the sampler)
            d.configure(self.ctx)
        self.sampler: BatchSampler = self.ctx.sampler
        self.per_sample = any(getattr(d, "per_sample_gradients", False) for d in self.defenses)
        self._penalizers = [d for d in self.defenses if _overrides(d, "penalty")]
        self._per_sample_hooks = [d for d in self.defenses if _overrides(d, "transform_per_sample")]
        self._batch_hooks = [d for d in self.defenses if _overrides(d, "transform_batch")]
        self._post_hooks = [d for d in self.defenses if _overrides(d, "post_step")]
        self.forward: EnsembleForward = ensemble_forward(base, allow_stacked=stacked and x.dim() == 2)
        self._manual = isinstance(self.forward, StackedSequential) and self.forward.manual and manual_backward
        #: per-sample transforms that only rescale by norm, on a stacked MLP: no per-sample gradient
        #: is materialised (see TrainingDefense.per_sample_factors)
        self._rescale = (self.per_sample and self._manual
                         and all(_overrides(d, "per_sample_factors") for d in self._per_sample_hooks))
        self._workspace = Workspace()
        self._order_rngs = model_generators(self.ctx.seed, ids, STREAM_ORDER)
        self._generators: Optional[List[torch.Generator]] = None
        ctx = self.ctx
        denominators = self.sampler.denominators(ctx.epoch_size, sizes)
        self.denominator = torch.as_tensor(denominators, dtype=first.dtype, device=self.device)
        self._inv_batch = 1.0 / float(denominators[0])  # fixed-size batches: 1 / B, on the host
        self.steps_per_epoch = self.sampler.steps_per_epoch(ctx.epoch_size)
        self.sampling_rate = float(np.max(self.sampler.sampling_rates(ctx.epoch_size, sizes)))

    # ------------------------------------------------------------------ streams
    @property
    def generators(self) -> List[torch.Generator]:
        """Per-model torch generators for noise (created on first use)."""
        if self._generators is None:
            gens = []
            for m in range(self.ctx.n_models):
                g = torch.Generator(device=self.device)
                g.manual_seed(int(self.ctx.model_stream(m, STREAM_NOISE).generate_state(1, np.uint64)[0]))
                gens.append(g)
            self._generators = gens
        return self._generators

    # ------------------------------------------------------------------ stage 1: sampling
    def sample_epoch(self, epoch: int) -> EpochPlan:
        """One epoch's batch plan, each model from its own generator."""
        return self.sampler.plan(self.keep, self.ctx.epoch_size, self._order_rngs)

    def batches(self, plan: EpochPlan):
        """Yield the epoch's :class:`_Batch` es on the device. Index plans are drawn with numpy
        on the host and moved once per epoch."""
        dev = self.device
        index = torch.from_numpy(plan.index).to(dev)
        sizes = torch.from_numpy(plan.sizes).to(dev)
        n_models, width = index.shape[1], index.shape[2]
        mask = scale = None
        if plan.ragged:
            mask = torch.arange(width, device=dev) < sizes.unsqueeze(-1)  # [S, M, W]
            scale = mask.to(self.denominator.dtype) / self.denominator.view(1, -1, 1)
        feat = self.x.shape[1:]
        for s in range(plan.steps):
            w = int(plan.widths[s])
            idx = index[s, :, :w]
            flat = idx.reshape(-1)
            yield _Batch(
                x=self.x.index_select(0, flat).view(n_models, w, *feat),
                y=(self.y.index_select(0, flat).view(n_models, w) if self.y.dim() == 1
                   else torch.gather(self.y, 1, idx)),
                mask=None if mask is None else mask[s, :, :w],
                scale=None if scale is None else scale[s, :, :w],
                sizes=sizes[s],
            )

    # ------------------------------------------------------------------ stage 2: loss
    def losses(self, batch: _Batch) -> torch.Tensor:
        """Per-sample cross-entropy ``[M, W]`` of every model on its batch (padding included)."""
        if isinstance(self.forward, StackedSequential):  # logits [M, C, W]: no transpose needed
            return F.cross_entropy(self.forward.features_last(self.params, batch.x), batch.y, reduction="none")
        logits = self.forward(self.params, self.buffers, batch.x)
        n_models, width = batch.y.shape
        return F.cross_entropy(logits.reshape(n_models * width, -1), batch.y.reshape(-1), reduction="none").view(n_models, width)

    def data_loss(self, per_sample: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """Sum over models of each model's batch loss ``Σ_b mask·ℓ / denominator`` (a scalar);
        padding rows are multiplied by exactly zero."""
        if batch.scale is None:  # fixed-size batches: every model divides by B
            return per_sample.sum() / self.denominator[0]
        return (per_sample * batch.scale).sum()

    def penalty(self, batch: _Batch) -> Optional[torch.Tensor]:
        """Sum of the defenses' penalties, float ``[M]``, or ``None``."""
        total = None
        if not self._penalizers:
            return None
        seen = StepBatch(batch.x, batch.y, batch.mask, lambda params, x: self.forward(params, self.buffers, x))
        for d in self._penalizers:
            p = d.penalty(self.params, seen)
            if p is not None:
                total = p if total is None else total + p
        return total

    # ------------------------------------------------------------------ stage 3: gradients
    def batch_gradients(self, batch: _Batch, *, normalized: bool) -> Tuple[Params, torch.Tensor]:
        """Gradients of every model's weighted batch loss, and the per-sample losses.

        ``normalized``: each sample weighs ``mask / denominator`` (the final data gradient);
        otherwise ``mask`` (the summed gradient that ``transform_batch`` hooks receive). On the
        MLP fast path the backward pass runs without autograd, into a reused workspace
        (:meth:`~mia_core.engine.ensemble.StackedSequential.loss_and_grads`); elsewhere autograd.

        Returns:
            ``(grads, losses)``: ``grads[name]`` ``[M, ...]``, ``losses`` float ``[M, W]`` detached.
        """
        if batch.mask is None:
            weight = self._inv_batch if normalized else 1.0
        else:
            weight = batch.scale if normalized else batch.mask.to(self.denominator.dtype)
        if self._manual:
            losses, grads = self.forward.loss_and_grads(self.params, batch.x, batch.y, weight, self._workspace)
            return grads, losses
        per_sample = self.losses(batch)
        total = (per_sample * weight).sum() if isinstance(weight, torch.Tensor) else per_sample.sum() * weight
        grads = torch.autograd.grad(total, list(self.params.values()))
        return dict(zip(self.params, grads)), per_sample.detach()

    def gradients(self, batch: _Batch, info: StepInfo) -> torch.Tensor:
        """Set every parameter's ``.grad`` to its model's gradient for this step, after the
        defenses' transforms; returns the summed data loss (detached scalar).

        Every route computes ``g = T_batch(Σ_b T_sample(∇ mask·ℓ)) / denominator + ∇ penalty``;
        the cheapest that the defenses allow is taken: the data gradient weighted by
        ``mask / denominator`` directly when nobody transforms gradients; the summed gradient,
        then ``transform_batch``, then the division, when only batch transforms exist;
        per-sample gradients through ``torch.func`` when a defense asks for them. The penalty's
        gradient is added last, so it is never clipped or noised.
        """
        if self.per_sample:  # every sample's own gradient: padding rows weigh exactly zero
            mask = batch.mask if batch.mask is not None else torch.ones_like(batch.y, dtype=torch.bool)
            weight = mask.to(self.denominator.dtype)
        if self._rescale:

            def factors(norms):
                total = torch.ones_like(norms)
                for d in self._per_sample_hooks:
                    total = total * d.per_sample_factors(norms * total, mask, info)
                return total

            losses, grads, _ = self.forward.rescaled_grads(self.params, batch.x, batch.y, weight, factors,
                                                           self._workspace)
            data = (losses * weight).sum(dim=1).div(self.denominator).sum()
            normalized = False
        elif self.per_sample:
            grads, values = per_sample_gradients(self.base, self.params, self.buffers, batch.x, batch.y, weight)
            for d in self._per_sample_hooks:
                d.transform_per_sample(grads, mask, info)
            grads = {k: g.sum(dim=1) for k, g in grads.items()}
            data = values.detach().sum(dim=1).div(self.denominator).sum()
            normalized = False
        else:
            normalized = not self._batch_hooks
            grads, losses = self.batch_gradients(batch, normalized=normalized)
            data = self.data_loss(losses, batch)
        if not normalized:
            for d in self._batch_hooks:
                d.transform_batch(grads, info)
            for g in grads.values():
                g.div_(self.denominator.view(-1, *([1] * (g.dim() - 1))))
        pen = self.penalty(batch)
        if pen is not None:
            pen_grads = torch.autograd.grad(pen.sum(), list(self.params.values()), allow_unused=True)
            for name, pg in zip(self.params, pen_grads):
                if pg is not None:
                    grads[name].add_(pg)
        for name, p in self.params.items():
            p.grad = grads[name]
        return data

    # ------------------------------------------------------------------ stage 4-5: step, hooks
    def optimizer_step(self) -> None:
        self.optimizer.step()

    def post_step(self, info: StepInfo) -> None:
        """The defenses' ``post_step`` hooks, then the ``post_step=`` callback, under ``no_grad``."""
        if not self._post_hooks and self._post_step_fn is None:
            return
        with torch.no_grad():
            for d in self._post_hooks:
                d.post_step(self.params, info)
            if self._post_step_fn is not None:
                self._post_step_fn(self.params)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainingResult:
        """Run every epoch and return the :class:`TrainingResult` (with the defenses' reports)."""
        epochs = self.ctx.epochs
        losses: List[float] = []
        step = 0
        if epochs > 0:
            for p in self.params.values():
                p.requires_grad_(True)
            self.optimizer = make_optimizer(self.params.values(), self.recipe, self.ctx.lr)
            gens = self.generators if self.defenses else ()
            n_models = self.ctx.n_models
            try:
                for epoch in range(epochs):
                    plan = self.sample_epoch(epoch)
                    total = torch.zeros((), dtype=self.denominator.dtype, device=self.device)
                    for batch in self.batches(plan):
                        info = StepInfo(step=step, epoch=epoch, denominator=self.denominator,
                                        batch_sizes=batch.sizes, generators=gens)
                        total += self.gradients(batch, info)
                        self.optimizer_step()
                        self.post_step(info)
                        step += 1
                    mean = float(total) / (plan.steps * n_models)  # the one host sync per epoch
                    losses.append(mean)
                    if self._on_epoch is not None:
                        self._on_epoch(epoch, mean)
            finally:
                for p in self.params.values():
                    p.requires_grad_(False)
                    p.grad = None
                self.optimizer = None
                self._workspace = Workspace()
        result = TrainingResult(
            losses=losses,
            steps=step,
            epochs=epochs,
            steps_per_epoch=self.steps_per_epoch,
            sampling_rate=self.sampling_rate,
            sampler=self.sampler.name,
            forward=self.forward.name,
            backward=("per-sample-norms" if self._rescale else "per-sample" if self.per_sample
                      else "manual" if self._manual else "autograd"),
            per_sample_gradients=self.per_sample,
        )
        result.defenses = [d.report(result) for d in self.defenses]
        return result


def train_ensemble(
    base: torch.nn.Module,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    keep: np.ndarray,
    recipe: TrainingRecipe,
    rng: SeedLike,
    *,
    epochs: Optional[int] = None,
    lr: Optional[float] = None,
    post_step: Optional[Callable[[Params], None]] = None,
    on_epoch: Optional[Callable[[int, float], None]] = None,
    defenses: Sequence[Any] = (),
    model_ids: Optional[Sequence[int]] = None,
    epoch_size: Optional[int] = None,
    reserved: Optional[np.ndarray] = None,
) -> TrainingResult:
    """Train the stacked ensemble in place: ``Trainer(...).fit()`` (see :class:`Trainer` for
    the arguments; ``rng`` is its ``seed``, the root of the per-model streams).

    Returns:
        the :class:`TrainingResult`.
    """
    return Trainer(
        base, params, buffers, x, y, keep, recipe, seed=rng, model_ids=model_ids, epoch_size=epoch_size,
        defenses=defenses, epochs=epochs, lr=lr, post_step=post_step, on_epoch=on_epoch, reserved=reserved,
    ).fit()


@torch.no_grad()
def ensemble_logits(base: torch.nn.Module, params: Params, buffers: Params, x: torch.Tensor, *, chunk: int = 8192) -> torch.Tensor:
    """Logits of every model on every record: float32 ``[M, N, C]``."""
    fwd = vmap(lambda p, b, xb: functional_call(base, (p, b), (xb,)), in_dims=(0, 0, None))
    outs = [fwd(params, buffers, x[i : i + chunk]) for i in range(0, x.shape[0], chunk)]
    if not outs:
        raise ValueError("no records to evaluate")
    return torch.cat(outs, dim=1)


__all__ = [
    "OPTIMIZERS",
    "StepBatch",
    "StepInfo",
    "Trainer",
    "TrainingContext",
    "TrainingRecipe",
    "TrainingResult",
    "ensemble_logits",
    "init_ensemble",
    "make_keep_matrix",
    "partner",
    "references",
    "make_optimizer",
    "model_seeds",
    "train_ensemble",
]
