"""ModelPopulation: M models trained with one recipe on random halves of the records.

This is the heart of an evaluation. The keep matrix ``K`` (bool ``[M, N]``) records which model
trained on which record; every record is IN for exactly ``M/2`` models. Any model can be the
target and the others are its references: for a target ``t`` and record ``j`` an attack sees the
reference models ``m != t`` split into those that trained on ``j`` and those that did not, and
must decide ``K[t, j]``.

The parameters of all models are stored stacked (``{name: Tensor[M, ...]}``), trained together
(:mod:`mia_core.engine.trainer`), transformed together by post-training defenses, and evaluated
together into :class:`~mia_core.engine.signals.Signals` once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from mia_core.data import Records
from mia_core.engine.signals import Signals, compute_signals
from mia_core.engine.trainer import (
    Params,
    TrainingRecipe,
    ensemble_logits,
    init_ensemble,
    make_keep_matrix,
    train_ensemble,
)


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


__all__ = ["ModelPopulation"]
