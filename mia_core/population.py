"""ModelPopulation: M models trained with one recipe on random halves of the records.

This is the heart of an evaluation. The keep matrix ``K`` (bool ``[M, N]``) records which model
trained on which record; every record is IN for exactly ``M/2`` models. Any model can be the
target and the others are its references: for a target ``t`` and record ``j`` an attack sees the
reference models ``m != t`` split into those that trained on ``j`` and those that did not, and
must decide ``K[t, j]``.

The parameters of all models are stored stacked (``{name: Tensor[M, ...]}``), trained together
(:mod:`mia_core.training`), transformed together by post-training defenses, and evaluated
together into :class:`~mia_core.signals.Signals` once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from mia_core.data import Records
from mia_core.signals import SIGNAL_ACCESS, Signals, compute_signals
from mia_core.training import (
    Params,
    TrainingRecipe,
    ensemble_logits,
    init_ensemble,
    make_keep_matrix,
    train_ensemble,
)


class AccessError(PermissionError):
    """A plugin read a signal its declared access level does not allow."""


@dataclass
class ModelPopulation:
    """M models of one architecture, trained on random halves of ``records``.

    Attributes:
        records: the population's records.
        keep: bool ``[M, N]`` membership matrix.
        base: meta-device module used with ``functional_call``.
        params: stacked parameters ``{name: Tensor[M, ...]}``.
        buffers: stacked buffers.
        recipe: the training recipe.
        seed: the run seed (keep matrix, initialisation and batch order derive from it).
    """

    records: Records
    keep: np.ndarray
    base: torch.nn.Module
    params: Params
    buffers: Params
    recipe: TrainingRecipe
    seed: int
    _signals: Optional[Signals] = field(default=None, repr=False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def train(
        cls,
        records: Records,
        build: Callable[[], torch.nn.Module],
        recipe: TrainingRecipe,
        *,
        n_models: int,
        seed: int,
        on_epoch: Optional[Callable[[int, float], None]] = None,
    ) -> "ModelPopulation":
        """Draw the keep matrix, initialise ``n_models`` models and train them as one ensemble."""
        recipe.validate()
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6B656570]))  # "keep"
        keep = make_keep_matrix(n_models, records.n, rng)
        base, params, buffers = init_ensemble(build, n_models, seed)
        pop = cls(records=records, keep=keep, base=base, params=params, buffers=buffers, recipe=recipe, seed=seed)
        pop._train(recipe.epochs, rng, on_epoch=on_epoch)
        return pop

    def _train(self, epochs, rng, *, lr=None, post_step=None, on_epoch=None) -> None:
        x = torch.from_numpy(self.records.x)
        y = torch.from_numpy(self.records.y)
        train_ensemble(
            self.base, self.params, self.buffers, x, y, self.keep, self.recipe, rng,
            epochs=epochs, lr=lr, post_step=post_step, on_epoch=on_epoch,
        )
        self._signals = None

    def clone(self) -> "ModelPopulation":
        """A copy with its own parameters (so defenses never touch a cached population)."""
        return ModelPopulation(
            records=self.records,
            keep=self.keep.copy(),
            base=self.base,
            params={k: v.detach().clone() for k, v in self.params.items()},
            buffers={k: v.detach().clone() for k, v in self.buffers.items()},
            recipe=self.recipe,
            seed=self.seed,
        )

    # ----------------------------------------------------------------- views
    @property
    def n_models(self) -> int:
        return int(self.keep.shape[0])

    @property
    def n_records(self) -> int:
        return int(self.keep.shape[1])

    def module(self, m: int) -> torch.nn.Module:
        """Model ``m`` as an ordinary ``nn.Module`` (a copy; for white-box use and export)."""
        if not 0 <= m < self.n_models:
            raise IndexError(f"model index {m} out of range [0, {self.n_models})")
        mod = copy.deepcopy(self.base).to_empty(device="cpu")
        state = {k: v[m].detach().clone() for k, v in {**self.params, **self.buffers}.items()}
        mod.load_state_dict(state)
        return mod

    def logits(self) -> torch.Tensor:
        """float32 ``[M, N, C]``."""
        return ensemble_logits(self.base, self.params, self.buffers, torch.from_numpy(self.records.x))

    def signals(self) -> Signals:
        """The shared signals, computed on first use and kept until the weights change."""
        if self._signals is None:
            self._signals = compute_signals(self.logits(), self.records.y)
        return self._signals

    def invalidate(self) -> None:
        """Forget cached signals (call after changing ``params`` in place)."""
        self._signals = None

    def accuracy(self) -> Dict[str, np.ndarray]:
        """Per-model accuracy on its own training half (``train``) and on the rest (``test``)."""
        correct = self.signals().correct.astype(bool)
        keep = self.keep
        train = (correct & keep).sum(1) / keep.sum(1)
        test = (correct & ~keep).sum(1) / (~keep).sum(1)
        return {"train": train, "test": test}

    # ----------------------------------------------------------------- persistence
    def state(self) -> Dict[str, Any]:
        """Tensors-only state for ``torch.save`` (loaded back with ``weights_only=True``)."""
        return {
            "keep": torch.from_numpy(self.keep.copy()),
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "buffers": {k: v.detach().clone() for k, v in self.buffers.items()},
        }

    @classmethod
    def from_state(cls, state, *, records: Records, build, recipe: TrainingRecipe, seed: int) -> "ModelPopulation":
        keep = state["keep"].numpy().astype(bool)
        if keep.shape[1] != records.n:
            raise ValueError(f"stored population has {keep.shape[1]} records, dataset has {records.n}")
        base = build().to("meta")
        params = {k: v.clone() for k, v in state["params"].items()}
        buffers = {k: v.clone() for k, v in state["buffers"].items()}
        expected = {k for k, _ in base.named_parameters()}
        if set(params) != expected:
            raise ValueError(f"stored parameters {sorted(params)} do not match the model's {sorted(expected)}")
        return cls(records=records, keep=keep, base=base, params=params, buffers=buffers, recipe=recipe, seed=seed)


class SignalContext:
    """What attacks and estimators see: membership, labels and the signals they declared.

    Args:
        population: the (defended) population.
        access: the access levels the plugin declared.
        owner: the plugin's name, for error messages.
    """

    def __init__(self, population: ModelPopulation, access: Sequence[str], *, owner: str = "plugin"):
        self._population = population
        self.access = tuple(access)
        self.owner = owner

    @property
    def keep(self) -> np.ndarray:
        """bool ``[M, N]``: ``keep[m, j]`` — record ``j`` trained model ``m``."""
        return self._population.keep

    @property
    def labels(self) -> np.ndarray:
        """int64 ``[N]`` true labels."""
        return self._population.records.y

    @property
    def n_models(self) -> int:
        return self._population.n_models

    @property
    def n_records(self) -> int:
        return self._population.n_records

    @property
    def n_classes(self) -> int:
        return self._population.records.n_classes

    @property
    def seed(self) -> int:
        return self._population.seed

    def references(self, target: int) -> np.ndarray:
        """Indices of the reference models for ``target`` (every other model)."""
        if not 0 <= target < self.n_models:
            raise IndexError(f"target {target} out of range [0, {self.n_models})")
        return np.array([m for m in range(self.n_models) if m != target], dtype=np.int64)

    def signal(self, name: str) -> np.ndarray:
        """The signal ``name`` for every model and record (see :mod:`mia_core.signals`).

        Raises:
            AccessError: the plugin's declared access does not reveal this signal.
        """
        if name not in SIGNAL_ACCESS:
            raise KeyError(f"unknown signal {name!r}; available: {', '.join(SIGNAL_ACCESS)}")
        if not SIGNAL_ACCESS[name] & set(self.access):
            raise AccessError(
                f"{self.owner} declared access {self.access} but read signal {name!r}, which needs "
                f"one of {sorted(SIGNAL_ACCESS[name])}"
            )
        return self._population.signals().get(name)

    def parameters(self) -> Params:
        """White-box access: the stacked parameters (read-only copies)."""
        if "params" not in self.access:
            raise AccessError(f"{self.owner} read the model parameters without declaring 'params' access")
        return {k: v.detach().clone() for k, v in self._population.params.items()}


EstimatorContext = SignalContext


@dataclass(frozen=True)
class TargetView:
    """What an attack may use to score records against one target model.

    Attributes:
        target: the target model's index.
        references: int ``[R]`` indices of the reference models (every model but the target).
        ref_keep: bool ``[R, N]`` membership of the reference models.
    """

    target: int
    references: np.ndarray
    ref_keep: np.ndarray
    _ctx: "AttackContext" = field(repr=False)

    def ref_signal(self, name: str) -> np.ndarray:
        """The signal of every reference model: float ``[R, N]`` (``[R, N, C]`` for ``logits``
        and ``probs``)."""
        return self._ctx.signal(name)[self.references]

    def target_signal(self, name: str) -> np.ndarray:
        """The target model's signal, what the attacker observes by querying it: float ``[N]``
        (``[N, C]`` for ``logits`` and ``probs``)."""
        return self._ctx.signal(name)[self.target]


class AttackContext(SignalContext):
    """The context attacks receive. Unlike estimators, an attack never sees the full keep
    matrix: :meth:`for_target` hands out the reference models' membership and signals, and
    the target's signals, but never the target's membership row."""

    @property
    def keep(self) -> np.ndarray:  # type: ignore[override]
        raise AccessError(
            f"{self.owner}: attacks may not read the full keep matrix (it holds the target's "
            f"membership); use ctx.for_target(target).ref_keep"
        )

    def for_target(self, target: int) -> TargetView:
        refs = self.references(target)
        return TargetView(target=target, references=refs, ref_keep=self._population.keep[refs], _ctx=self)


class DefenseContext:
    """What a post-training defense sees and may change.

    Attributes:
        params: stacked parameters ``{name: Tensor[M, ...]}``; change them in place.
        keep, records, recipe, seed: as on the population.
    """

    def __init__(self, population: ModelPopulation, *, position: int = 0):
        self._population = population
        self.position = position

    @property
    def params(self) -> Params:
        return self._population.params

    @property
    def keep(self) -> np.ndarray:
        return self._population.keep

    @property
    def records(self) -> Records:
        return self._population.records

    @property
    def recipe(self) -> TrainingRecipe:
        return self._population.recipe

    @property
    def seed(self) -> int:
        return self._population.seed

    def rng(self, salt: int = 0) -> np.random.Generator:
        """A generator unique to this run, this defense's position in the chain and ``salt``."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, 0x646566, self.position, salt]))

    def finetune(self, epochs: int, *, lr: Optional[float] = None, post_step=None, on_epoch=None) -> None:
        """Continue training every model on its own training half (same recipe, fresh optimiser)."""
        self._population._train(epochs, self.rng(1), lr=lr, post_step=post_step, on_epoch=on_epoch)

    def changed(self) -> None:
        """Tell the population its weights changed (signals are recomputed)."""
        self._population.invalidate()


__all__ = [
    "AccessError",
    "AttackContext",
    "DefenseContext",
    "EstimatorContext",
    "ModelPopulation",
    "SignalContext",
    "TargetView",
]
