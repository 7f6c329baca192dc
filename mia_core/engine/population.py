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
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mia_core.data import DataError, Records
from mia_core.engine.signals import SignalUnavailable, Signals, compute_signals
from mia_core.engine.trainer import (
    Params,
    TrainingRecipe,
    TrainingResult,
    ensemble_logits,
    init_ensemble,
    make_keep_matrix,
    reserve_records,
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
        train_defenses: the train-time defenses the models trained with (fine-tuning keeps them).
        training: what :meth:`train` did (per-epoch losses, steps, sampling rate, the train-time
            defenses' reports); ``None`` for a population loaded from the cache.
    """

    records: Records
    keep: np.ndarray
    base: torch.nn.Module
    params: Params
    buffers: Params
    recipe: TrainingRecipe
    seed: int
    training: Optional[TrainingResult] = None
    train_defenses: Sequence[Any] = ()
    #: bool ``[N]``: the reserved records (no model trains on them, no target is scored on them;
    #: see :meth:`mia_core.base.TrainingDefense.reserve_fraction`); ``None``: none.
    reserved: Optional[np.ndarray] = None
    #: int ``[K]``: models known only by their outputs on the records (a target audited from a
    #: predictions file, :mod:`mia_core.engine.audit`): their rows of ``params`` are NaN
    #: placeholders, their logits on the records are ``external_logits`` (float64 ``[K, N, C]``),
    #: and they cannot be queried on other inputs (augmented views) nor exported. ``None``: none.
    external: Optional[np.ndarray] = None
    external_logits: Optional[torch.Tensor] = None
    #: Optimizer steps post-training defenses fine-tuned every model for (with the train-time
    #: defenses still on), which a train-time privacy accountant's ε does not count.
    finetune_steps: int = 0
    #: Per fine-tuning run, each train-time defense's report of it (``TrainingResult.defenses``),
    #: for :meth:`~mia_core.base.TrainingDefense.compose`.
    finetune_reports: List[List[Dict[str, Any]]] = dataclasses.field(default_factory=list)

    @property
    def scored_records(self) -> np.ndarray:
        """int64 indices of the records attacks are scored on: all but the reserved ones."""
        if self.reserved is None:
            return np.arange(self.n_records, dtype=np.int64)
        return np.flatnonzero(~self.reserved).astype(np.int64)

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
        device: Optional[torch.device] = None,
        defenses: Sequence[Any] = (),
        reserve: float = 0.0,
        closed_form: Optional[Callable[..., Params]] = None,
        model_ids: Optional[Sequence[int]] = None,
        keep: Optional[np.ndarray] = None,
    ) -> "ModelPopulation":
        """Draw the keep matrix, initialise ``n_models`` models and train them as one ensemble.

        Args:
            records, build, recipe: the data, the model family's builder, the recipe.
            n_models: ``M``, even.
            seed: the run seed. The keep matrix, and model ``m``'s initialisation and data order
                (and noise), derive from it, each model from its own stream
                (:mod:`mia_core.engine.samplers`), so shards of the population train the same models.
            on_epoch: called with ``(epoch, mean loss)`` after each epoch.
            device: where the models train (default the CPU). Initialisation always draws on the
                CPU, so every device starts from the same weights.
            defenses: train-time defenses (:class:`~mia_core.base.TrainingDefense`), in order.
            reserve: the fraction of records to reserve (:func:`~mia_core.engine.trainer.reserve_records`):
                no model trains on them and they are not scored.
            closed_form: a model family's ``fit_closed_form`` (e.g. ridge regression): called once as
                ``closed_form(x=float64 [N, D], y=float64 [N], keep=bool [M, N])`` on the CPU, it returns
                every model's parameters ``{name: Tensor[M, ...]}`` (the names and shapes ``build``'s
                module has), which replace the initialisation; no SGD runs, so ``recipe`` (epochs,
                lr, ...) and ``on_epoch`` are unused and train-time ``defenses`` are refused.
            keep: train on this membership instead of the one the seed draws (bool ``[M, N]``;
                initialisation and batch streams still come from the seed).
            model_ids: train only these models of the ``n_models`` (a shard: increasing indices),
                exactly as the whole population would train them (:mod:`mia_core.engine.shards`);
                the result holds those models only, with their rows of the keep matrix.

        Returns:
            the population; ``pop.training`` holds the :class:`~mia_core.engine.trainer.TrainingResult`.
        """
        recipe.validate()
        drawn, reserved = draw_membership(n_records=records.n, n_models=n_models, seed=seed, reserve=reserve)
        if keep is None:
            keep = drawn
        else:  # a given membership (e.g. unlearning's retrain: each model's members less its forget set)
            keep = np.asarray(keep, dtype=bool).copy()
            if keep.shape != drawn.shape or not keep.any(axis=1).all():
                raise ValueError(f"keep must be bool {drawn.shape} with a record for every model")
        epoch_size = int(keep.sum(axis=1).max())  # the whole population's, so a shard walks the same epochs
        ids = None if model_ids is None else np.asarray(model_ids, dtype=np.int64)
        if ids is not None:
            if ids.ndim != 1 or not ids.size or (np.diff(ids) <= 0).any() or ids[0] < 0 or ids[-1] >= n_models:
                raise ValueError(f"model_ids must be increasing indices in [0, {n_models}), got {ids.tolist()}")
            if closed_form is not None:
                raise ValueError("a population solved in closed form is not trained in shards")
            keep = keep[ids]
        base, params, buffers = init_ensemble(build, n_models if ids is None else len(ids), seed,
                                              model_ids=None if ids is None else ids.tolist())
        if device is not None:
            params = {k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in params.items()}
            buffers = {k: v.to(device) for k, v in buffers.items()}
        pop = cls(records=records, keep=keep, base=base, params=params, buffers=buffers, recipe=recipe, seed=seed,
                  reserved=reserved)
        pop.train_defenses = tuple(defenses)
        if closed_form is not None:
            pop.training = pop._solve(closed_form)
        else:
            pop.training = pop._train(recipe.epochs, seed, on_epoch=on_epoch, defenses=defenses, model_ids=ids,
                                      epoch_size=epoch_size)
        return pop

    @classmethod
    def concat(cls, shards: Sequence["ModelPopulation"], *, training: Optional[TrainingResult] = None
               ) -> "ModelPopulation":
        """The population made of ``shards`` (same records, recipe, seed and architecture) in the
        order given: their models stacked, their keep rows concatenated."""
        first = shards[0]
        for s in shards[1:]:
            if s.records is not first.records and s.records.fingerprint() != first.records.fingerprint():
                raise ValueError("shards of one population must share their records")
            if set(s.params) != set(first.params):
                raise ValueError("shards of one population must share their architecture")
        cat = lambda part: {k: torch.cat([getattr(s, part)[k].detach() for s in shards]) for k in getattr(first, part)}  # noqa: E731
        reserved = first.reserved
        return cls(records=first.records, keep=np.concatenate([s.keep for s in shards]), base=first.base,
                   params=cat("params"), buffers=cat("buffers"), recipe=first.recipe, seed=first.seed,
                   training=training, train_defenses=first.train_defenses,
                   reserved=None if reserved is None else reserved.copy())

    def _solve(self, closed_form: Callable[..., Params]) -> TrainingResult:
        """Set every model's parameters from the family's closed-form solver (one call)."""
        if self.train_defenses:
            raise DataError("train-time defenses hook into SGD training; this model family is solved in "
                            "closed form (use its own regularisation, or a post-training defense)")
        x = torch.from_numpy(self.records.x).to(torch.float64)
        y = torch.from_numpy(np.asarray(self.records.y, dtype=np.float64))
        solved = closed_form(x=x, y=y, keep=torch.from_numpy(self.keep))
        if not isinstance(solved, dict) or set(solved) != set(self.params):
            raise ValueError(f"fit_closed_form returned parameters {sorted(solved) if isinstance(solved, dict) else solved!r}, "
                             f"expected {sorted(self.params)}")
        for name, p in self.params.items():
            v = torch.as_tensor(solved[name])
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"fit_closed_form returned {name!r} of shape {tuple(v.shape)}, expected {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(v.to(p.dtype))
        return TrainingResult(losses=[], steps=0, epochs=0, steps_per_epoch=0, sampling_rate=0.0, sampler="none",
                              forward="closed-form", backward="none", per_sample_gradients=False)

    def _train(self, epochs, rng, *, lr=None, post_step=None, on_epoch=None, defenses=(), model_ids=None,
               epoch_size=None, labels=None) -> TrainingResult:
        """Train every model further on its own half and return what training did.

        ``rng`` (an int seed, a SeedSequence, or a Generator to draw one from) roots the
        per-model streams. An epoch walks the population's largest training half. ``labels``:
        int ``[M, N]`` per-model labels instead of the records' own.
        """
        if self.records.is_regression:
            raise DataError("SGD training (and fine-tuning) minimise cross-entropy; a regression population is "
                            "solved in closed form by its model family and cannot be fine-tuned")
        x = torch.from_numpy(self.records.x).to(self.device)
        y = torch.from_numpy(self.records.y if labels is None else np.asarray(labels, dtype=np.int64)).to(self.device)
        return train_ensemble(
            self.base, self.params, self.buffers, x, y, self.keep, self.recipe, rng,
            epochs=epochs, lr=lr, post_step=post_step, on_epoch=on_epoch, defenses=defenses, model_ids=model_ids,
            epoch_size=int(self.keep.sum(axis=1).max()) if epoch_size is None else int(epoch_size),
            reserved=None if self.reserved is None else np.flatnonzero(self.reserved),
        )

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
            training=self.training,
            train_defenses=self.train_defenses,
            reserved=None if self.reserved is None else self.reserved.copy(),
            external=None if self.external is None else self.external.copy(),
            external_logits=None if self.external_logits is None else self.external_logits.clone(),
            finetune_steps=self.finetune_steps,
            finetune_reports=[list(r) for r in self.finetune_reports],
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
        if self.external is not None and m in self.external:
            raise ValueError(f"model {m} is known only by its predictions on the records; it has no weights")
        mod = copy.deepcopy(self.base).to_empty(device="cpu")
        state = {k: v[m].detach().clone() for k, v in {**self.params, **self.buffers}.items()}
        mod.load_state_dict(state)
        return mod

    @property
    def device(self) -> torch.device:
        """The device the parameters live on."""
        return next(iter(self.params.values())).device

    def logits(self, x: Optional[np.ndarray] = None) -> torch.Tensor:
        """float32 ``[M, N, C]`` on the records (or on ``x``, float ``[N, D]``: e.g. augmented
        views of them), on the population's device."""
        if self.external is not None and x is not None:
            raise SignalUnavailable(
                f"model(s) {self.external.tolist()} are given as predictions on the records only and cannot be "
                f"queried on other inputs (e.g. augmented views); audit the model's weights instead (--weights)")
        on_records = x is None
        x = torch.from_numpy(np.ascontiguousarray(self.records.x if x is None else x, dtype=np.float32))
        x = x.to(self.device)
        out = ensemble_logits(self.base, self.params, self.buffers, x)
        if self.external is not None and on_records:
            out[torch.as_tensor(self.external, device=out.device)] = self.external_logits.to(out)
        return out

    def signals(self) -> Signals:
        """Every model's signals on every record, computed from the current weights.

        Not cached: the engine computes them once per stage (:func:`mia_core.engine.stages.compute_signals`)
        and hands the same :class:`Signals` to every attack and estimator, so a weight change can
        never leave stale signals behind.
        """
        return compute_signals(self.logits(), self.records.y, task=self.records.task)

    def accuracy(self) -> Dict[str, np.ndarray]:
        """Per-model accuracy on its own training half (``train``) and on the rest (``test``)
        (regression: raises :class:`~mia_core.engine.signals.SignalUnavailable`; see :func:`mse`)."""
        return accuracy(self.signals(), self.keep)

    # ----------------------------------------------------------------- persistence
    def state(self) -> Dict[str, Any]:
        """Tensors-only state for ``torch.save`` (loaded back with ``weights_only=True``)."""
        if self.external is not None:
            raise ValueError("a population holding models known only by their predictions is never stored")
        state = {
            "keep": torch.from_numpy(self.keep.copy()),
            "params": {k: v.detach().to("cpu", copy=True) for k, v in self.params.items()},
            "buffers": {k: v.detach().to("cpu", copy=True) for k, v in self.buffers.items()},
        }
        if self.reserved is not None:
            state["reserved"] = torch.from_numpy(self.reserved.copy())
        return state

    @classmethod
    def from_state(cls, state, *, records: Records, build, recipe: TrainingRecipe, seed: int,
                   device: Optional[torch.device] = None) -> "ModelPopulation":
        keep = state["keep"].numpy().astype(bool)
        if keep.shape[1] != records.n:
            raise ValueError(f"stored population has {keep.shape[1]} records, dataset has {records.n}")
        base = build().to("meta")
        device = torch.device("cpu") if device is None else torch.device(device)
        params = {k: v.to(device, copy=True) for k, v in state["params"].items()}
        buffers = {k: v.to(device, copy=True) for k, v in state["buffers"].items()}
        expected = {k for k, _ in base.named_parameters()}
        if set(params) != expected:
            raise ValueError(f"stored parameters {sorted(params)} do not match the model's {sorted(expected)}")
        reserved = state["reserved"].numpy().astype(bool) if "reserved" in state else None
        if reserved is not None and (reserved.shape != (records.n,) or keep[:, reserved].any()):
            raise ValueError("stored reserved records do not fit the keep matrix")
        return cls(records=records, keep=keep, base=base, params=params, buffers=buffers, recipe=recipe, seed=seed,
                   reserved=reserved)


def draw_membership(*, n_records: int, n_models: int, seed: int, reserve: float = 0.0
                    ) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The keep matrix (bool ``[M, N]``, complementary pairs) and the reserved records (bool
    ``[N]`` or ``None``) a population of ``n_models`` draws from ``seed``: a function of these
    arguments only, so every shard draws the same.

    Raises:
        DataError: a model would draw no training record.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6B656570]))  # "keep"
    keep = make_keep_matrix(n_models, n_records, rng)
    reserved = reserve_records(n_records, reserve, seed) if reserve else None
    if reserved is not None:
        keep[:, reserved] = False
    empty = np.flatnonzero(~keep.any(axis=1))
    if empty.size:
        raise DataError(f"with {n_records} records and {n_models} models, model {int(empty[0])} draws no "
                        f"training record (each record trains half of the models); use more records or "
                        f"fewer models")
    return keep, reserved


def scored_view(population: ModelPopulation, signals: Signals) -> Tuple[ModelPopulation, Signals]:
    """The population and its signals restricted to the scored records: what attacks and
    estimators see. Without reserved records, the arguments themselves. With them (a train-time
    defense's non-member reference set, see
    :meth:`~mia_core.base.TrainingDefense.reserve_fraction`), a view holding the other records
    only, so no attack is ever shown a record that every model left out (it would have no IN
    reference) and the complementary-pair game holds for every record it sees."""
    if population.reserved is None or not population.reserved.any():
        return population, signals
    idx = population.scored_records
    r = population.records
    records = Records(x=r.x[idx], y=r.y[idx], index=r.index[idx], n_classes=r.n_classes, name=r.name,
                      image_shape=r.image_shape, task=r.task)
    ext = population.external_logits
    view = dataclasses.replace(population, records=records, keep=population.keep[:, idx], reserved=None,
                               external_logits=None if ext is None else ext[:, torch.as_tensor(idx)])
    return view, signals.take(idx)


def accuracy(signals: Signals, keep: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-model accuracy from ``signals.correct`` ``[M, N]``: on the model's own training half
    (``train``, float ``[M]``) and on the other records (``test``)."""
    correct = signals.get("correct").astype(bool)  # regression: SignalUnavailable (accuracy is undefined)
    keep = np.asarray(keep, dtype=bool)
    return {"train": (correct & keep).sum(1) / keep.sum(1), "test": (correct & ~keep).sum(1) / (~keep).sum(1)}


def mse(signals: Signals, keep: np.ndarray) -> Dict[str, np.ndarray]:
    """Per-model mean squared error (the mean of ``signals.loss`` ``[M, N]``; on regression the
    squared error) on the model's own training half (``train``, float ``[M]``) and on the other
    records (``test``): what regression reports where classification reports accuracy."""
    loss = np.asarray(signals.loss, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    return {"train": (loss * keep).sum(1) / keep.sum(1), "test": (loss * ~keep).sum(1) / (~keep).sum(1)}


__all__ = ["ModelPopulation", "accuracy", "draw_membership", "scored_view", "mse"]
