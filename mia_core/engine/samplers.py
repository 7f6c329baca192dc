"""Batch samplers of the vectorized trainer, and the per-model random streams they draw from.

A sampler turns each model's training half (its row of the keep matrix) into the mini-batches of
one epoch, for all ``M`` models at once: an :class:`EpochPlan` with an index array
``[S, M, W]`` (``S`` steps, ``W`` the widest batch of the epoch) and the number of real rows of
every (step, model) batch. Two samplers exist:

* :class:`FixedSizeSampler` — each model walks fresh permutations of its own half, ``B`` records a
  step (no step ever holds a non-member). Denominator ``B``.
* :class:`PoissonSampler` — each of model ``m``'s ``n_m`` training records is in a step's batch
  independently with probability ``q`` (the sampling DP-SGD's accounting assumes, as in Opacus'
  ``DPDataLoader``). Batches are ragged; they are padded to the step's widest batch and carried
  with a bool mask. Denominator: the expected batch size ``q * n_m``, as Opacus divides by.

**Shard invariance.** Everything model ``m`` draws comes from its own generator, derived from
``(root seed, m)`` with :class:`numpy.random.SeedSequence` (:func:`model_stream`), and the number
of steps per epoch comes from a population-level ``epoch_size`` (not from the other models in the
ensemble). So training models ``0..M-1`` in one ensemble or in shards gives the same batches.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Sequence, Union

import numpy as np

#: Stream purposes: one independent stream per (model, purpose).
STREAM_ORDER = 0  # data order (batch sampling)
STREAM_NOISE = 1  # noise drawn by train-time defenses (StepInfo.generators)

SeedLike = Union[int, np.random.SeedSequence, np.random.Generator]


def stream_root(source: SeedLike) -> np.random.SeedSequence:
    """The root of a training run's per-model streams.

    Args:
        source: an ``int`` seed, a :class:`~numpy.random.SeedSequence` (used as is), or a
            :class:`~numpy.random.Generator`, from which 128 bits of entropy are drawn (this
            advances it; the same generator state gives the same root).
    """
    if isinstance(source, np.random.SeedSequence):
        return source
    if isinstance(source, np.random.Generator):
        return np.random.SeedSequence(source.integers(0, 2**32, size=4, dtype=np.uint64).tolist())
    if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
        return np.random.SeedSequence([int(source), 0x747261696E])  # "train"
    raise TypeError(f"a training seed must be an int, SeedSequence or Generator, got {type(source).__name__}")


def model_stream(root: np.random.SeedSequence, model: int, purpose: int) -> np.random.SeedSequence:
    """Model ``model``'s stream for ``purpose`` (:data:`STREAM_ORDER` or :data:`STREAM_NOISE`):
    a pure function of ``(root, model, purpose)``, independent of which other models train with it."""
    return np.random.SeedSequence(root.entropy, spawn_key=tuple(root.spawn_key) + (int(model), int(purpose)))


def model_generators(root: np.random.SeedSequence, model_ids: Sequence[int], purpose: int = STREAM_ORDER) -> List[np.random.Generator]:
    """One numpy generator per model (PCG64), in the order of ``model_ids``."""
    return [np.random.Generator(np.random.PCG64(model_stream(root, m, purpose))) for m in model_ids]


@dataclass(frozen=True)
class EpochPlan:
    """The mini-batches of one epoch for ``M`` models.

    Attributes:
        index: int64 ``[S, M, W]`` record indices into ``[0, N)``; ``W`` is the widest batch of
            the epoch. Rows at or beyond a batch's size are padding (index 0, never used).
        sizes: int64 ``[S, M]`` real rows of each (step, model) batch.
        widths: int64 ``[S]``: the width step ``s`` is cut to (its widest batch, at least 1).
        ragged: ``False`` when every batch is full (``sizes == W`` everywhere): no mask needed.
    """

    index: np.ndarray
    sizes: np.ndarray
    widths: np.ndarray
    ragged: bool

    @property
    def steps(self) -> int:
        return int(self.index.shape[0])


class BatchSampler(abc.ABC):
    """How each model's mini-batches are drawn from its training half (see the module docstring).

    A sampler is stateless: all randomness comes from the per-model generators passed to
    :meth:`plan`. ``epoch_size`` is the population-level number of records one epoch walks (by
    default the largest training half of the population), so that an ensemble trained in shards
    takes the same number of steps.
    """

    #: The name reported in :class:`~mia_core.engine.trainer.TrainingResult`.
    name: ClassVar[str] = ""

    @abc.abstractmethod
    def steps_per_epoch(self, epoch_size: int) -> int:
        """Optimizer steps per epoch."""

    @abc.abstractmethod
    def sampling_rates(self, epoch_size: int, sizes: np.ndarray) -> np.ndarray:
        """float64 ``[M]``: the expected fraction of model ``m``'s training half (``sizes[m]``
        records) in one step's batch."""

    @abc.abstractmethod
    def denominators(self, epoch_size: int, sizes: np.ndarray) -> np.ndarray:
        """float64 ``[M]``: what each model's summed batch loss and gradient are divided by."""

    @abc.abstractmethod
    def plan(self, keep: np.ndarray, epoch_size: int, rngs: Sequence[np.random.Generator]) -> EpochPlan:
        """Draw one epoch's batches.

        Args:
            keep: bool ``[M, N]``: model ``m`` may only use records ``keep[m]``.
            epoch_size: see the class docstring.
            rngs: ``M`` generators, model ``m`` draws from ``rngs[m]`` only.
        """

    def describe(self) -> dict:
        """The sampler's settings, JSON-serialisable (for reports)."""
        return {"name": self.name}


def _own_records(keep: np.ndarray) -> List[np.ndarray]:
    own = [np.flatnonzero(row) for row in keep]
    for m, o in enumerate(own):
        if o.size == 0:
            raise ValueError(f"model {m} has no training records")
    return own


def _check_rngs(keep: np.ndarray, rngs) -> Sequence[np.random.Generator]:
    if isinstance(rngs, np.random.Generator):  # one shared stream (not shard-invariant)
        return [rngs] * keep.shape[0]
    if len(rngs) != keep.shape[0]:
        raise ValueError(f"need one generator per model: {keep.shape[0]} models, {len(rngs)} generators")
    return rngs


def permutation_plan(keep: np.ndarray, batch_size: int, rngs, *, steps: Optional[int] = None) -> np.ndarray:
    """Fixed-size batches: int64 ``[steps, M, B]``.

    Each model walks a fresh permutation of its own training half, drawn from its own generator
    ``rngs[m]`` (a single generator is shared by all models in order, which is not
    shard-invariant). ``steps`` defaults to ``ceil(max_m n_m / B)``; a model with fewer records
    continues into a further permutation of its half, so no step ever holds a non-member and
    every own record appears at least once per epoch whenever ``steps * B >= n_m``.
    """
    own = _own_records(keep)
    rngs = _check_rngs(keep, rngs)
    if steps is None:
        steps = max(1, int(math.ceil(max(o.size for o in own) / batch_size)))
    total = steps * batch_size
    plan = np.empty((keep.shape[0], total), dtype=np.int64)
    for m, o in enumerate(own):
        reps = int(math.ceil(total / o.size))
        plan[m] = np.concatenate([rngs[m].permutation(o) for _ in range(reps)])[:total]
    return np.ascontiguousarray(plan.reshape(keep.shape[0], steps, batch_size).transpose(1, 0, 2))


def poisson_plan(keep: np.ndarray, rate: float, steps: int, rngs) -> EpochPlan:
    """Poisson batches: record ``j`` of model ``m``'s half is in step ``s``'s batch iff
    ``u[s, j] < rate`` for ``u`` uniform draws from ``rngs[m]`` (``[steps, n_m]``, row-major).
    Within a batch the records keep the order of the training half."""
    own = _own_records(keep)
    rngs = _check_rngs(keep, rngs)
    n_models = keep.shape[0]
    chosen = []
    sizes = np.zeros((steps, n_models), dtype=np.int64)
    for m, o in enumerate(own):
        sel = rngs[m].random((steps, o.size)) < rate
        sizes[:, m] = sel.sum(axis=1)
        chosen.append((sel, o))
    widths = np.maximum(sizes.max(axis=1), 1)
    width = int(widths.max())
    index = np.empty((steps, n_models, width), dtype=np.int64)
    for m, (sel, o) in enumerate(chosen):
        index[:, m, :] = o[0]  # padding rows point at one of the model's own records, never a non-member
        s_idx, j_idx = np.nonzero(sel)  # sorted by step, then by position in the half
        starts = np.concatenate([[0], np.cumsum(sizes[:, m])[:-1]])
        slot = np.arange(s_idx.size) - starts[s_idx]
        index[s_idx, m, slot] = o[j_idx]
    return EpochPlan(index=index, sizes=sizes, widths=widths, ragged=True)


class FixedSizeSampler(BatchSampler):
    """Fixed-size batches from per-model permutations (the default; see :func:`permutation_plan`).

    Args:
        batch_size: records per step and model (``B``).
    """

    name = "fixed"

    def __init__(self, batch_size: int):
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)

    def steps_per_epoch(self, epoch_size: int) -> int:
        return max(1, int(math.ceil(epoch_size / self.batch_size)))

    def sampling_rates(self, epoch_size: int, sizes: np.ndarray) -> np.ndarray:
        return np.minimum(1.0, self.batch_size / np.asarray(sizes, dtype=np.float64))

    def denominators(self, epoch_size: int, sizes: np.ndarray) -> np.ndarray:
        return np.full(len(sizes), float(self.batch_size))

    def plan(self, keep, epoch_size, rngs) -> EpochPlan:
        steps = self.steps_per_epoch(epoch_size)
        index = permutation_plan(keep, self.batch_size, rngs, steps=steps)
        sizes = np.full(index.shape[:2], self.batch_size, dtype=np.int64)
        return EpochPlan(index=index, sizes=sizes, widths=np.full(steps, self.batch_size, dtype=np.int64), ragged=False)

    def describe(self) -> dict:
        return {"name": self.name, "batch_size": self.batch_size}


class PoissonSampler(BatchSampler):
    """Poisson sampling with rate ``q`` (see :func:`poisson_plan`).

    Args:
        sampling_rate: ``q`` in ``(0, 1]``. ``None``: ``batch_size / epoch_size``, so a model
            whose half has ``epoch_size`` records expects ``batch_size`` of them per step.
        batch_size: used only when ``sampling_rate`` is ``None``.

    An epoch has ``round(1 / q)`` steps (Opacus' convention: one expected pass over the data).
    """

    name = "poisson"

    def __init__(self, sampling_rate: Optional[float] = None, *, batch_size: Optional[int] = None):
        if sampling_rate is None and batch_size is None:
            raise ValueError("PoissonSampler needs a sampling_rate or a batch_size")
        if sampling_rate is not None and not (0.0 < sampling_rate <= 1.0):
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
        if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.sampling_rate = sampling_rate
        self.batch_size = batch_size

    def rate(self, epoch_size: int) -> float:
        """``q`` for a population whose epoch walks ``epoch_size`` records."""
        if self.sampling_rate is not None:
            return float(self.sampling_rate)
        return min(1.0, self.batch_size / max(1, epoch_size))

    def steps_per_epoch(self, epoch_size: int) -> int:
        return max(1, int(round(1.0 / self.rate(epoch_size))))

    def sampling_rates(self, epoch_size: int, sizes: np.ndarray) -> np.ndarray:
        return np.full(len(sizes), self.rate(epoch_size))

    def denominators(self, epoch_size: int, sizes: np.ndarray) -> np.ndarray:
        return self.rate(epoch_size) * np.asarray(sizes, dtype=np.float64)

    def plan(self, keep, epoch_size, rngs) -> EpochPlan:
        return poisson_plan(keep, self.rate(epoch_size), self.steps_per_epoch(epoch_size), rngs)

    def describe(self) -> dict:
        return {"name": self.name, "sampling_rate": self.sampling_rate, "batch_size": self.batch_size}


SAMPLERS = {"fixed": FixedSizeSampler, "poisson": PoissonSampler}

__all__ = [
    "BatchSampler",
    "EpochPlan",
    "FixedSizeSampler",
    "PoissonSampler",
    "SAMPLERS",
    "STREAM_NOISE",
    "STREAM_ORDER",
    "model_generators",
    "model_stream",
    "permutation_plan",
    "poisson_plan",
    "stream_root",
]
