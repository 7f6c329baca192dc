"""What plugins see of a population: the contexts handed to attacks, estimators and defenses.

Each context exposes only what its plugin kind may use. Attacks never see the target's row of the
keep matrix, and every signal read is checked against the plugin's declared access, so a declared
threat model is an enforced one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np

from mia_core.data import Records
from mia_core.engine.signals import SIGNAL_ACCESS, Signals
from mia_core.engine.trainer import Params, TrainingRecipe, references, select_references

if TYPE_CHECKING:  # pragma: no cover
    from mia_core.engine.population import ModelPopulation


class AccessError(PermissionError):
    """A plugin read a signal its declared access level does not allow."""


class SignalContext:
    """What attacks and estimators see: membership, labels and the signals they declared.

    Args:
        population: the (defended) population.
        access: the access levels the plugin declared.
        owner: the plugin's name, for error messages.
        signals: the population's signals (the engine computes them once for every plugin);
            computed on first use when not given.
    """

    def __init__(self, population: "ModelPopulation", access: Sequence[str], *, owner: str = "plugin",
                 signals: Optional[Signals] = None):
        self._population = population
        self.access = tuple(access)
        self.owner = owner
        self._signals = signals

    def _all_signals(self) -> Signals:
        if self._signals is None:  # computed once per context when the engine did not pass them
            self._signals = self._population.signals()
        return self._signals

    @property
    def keep(self) -> np.ndarray:
        """bool ``[M, N]``: ``keep[m, j]`` — record ``j`` trained model ``m``."""
        return self._population.keep

    @property
    def labels(self) -> np.ndarray:
        """int64 ``[N]`` true labels."""
        return self._population.records.y

    @property
    def record_index(self) -> np.ndarray:
        """int64 ``[N]`` the records' stable identifiers (row numbers of the source data), for
        reports that name records (positions shift when records are reserved)."""
        return self._population.records.index

    @property
    def features(self) -> np.ndarray:
        """float32 ``[N, D]`` the records' features (read-only). The attacker knows the records it
        asks about, so any access level may read them (e.g. a quantile-regression attack's input)."""
        x = self._population.records.x.view()
        x.flags.writeable = False
        return x

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
        """Indices of the reference models for ``target``: every model but the target and its
        complementary partner, int64 ``[M - 2]`` (see :func:`mia_core.engine.trainer.make_keep_matrix`:
        so the references' membership is independent of the target's)."""
        return references(target, self.n_models)

    def signal(self, name: str, *, augment: Optional[str] = None, shift: int = 1) -> np.ndarray:
        """The signal ``name`` for every model and record (see :mod:`mia_core.engine.signals`).

        Args:
            augment: ``None`` — the records as they are: ``[M, N]`` (``[M, N, C]`` for ``logits``
                and ``probs``); or one of :data:`mia_core.augment.AUGMENTATIONS` for image-shaped
                records: the models queried on each augmented view, ``[A, M, N]`` (``[A, M, N, C]``),
                view 0 the unmodified record (computed on first use, then kept).
            shift: pixels for ``mirror-shift``.

        Raises:
            AccessError: the plugin's declared access does not reveal this signal.
            ValueError: augmentations asked for on records that are not images.
        """
        self._check_access(name)
        if augment is not None:
            stacked = self.__dict__.setdefault("_aug_stacked", {})
            key = (augment, int(shift), name)
            if key not in stacked:
                stacked[key] = np.stack([s.get(name) for s in self._augmented(augment, shift)])
            return stacked[key]
        return self._all_signals().get(name)

    def _augmented(self, kind: str, shift: int):
        from mia_core.augment import augment_records
        from mia_core.engine.signals import compute_signals

        key = (kind, int(shift))
        cache = self.__dict__.setdefault("_aug_signals", {})
        if key not in cache:
            records = self._population.records
            if records.image_shape is None:
                raise ValueError(f"{self.owner}: augment={kind!r} needs image-shaped records; dataset "
                                 f"{records.name!r} declares no image_shape (use augment=none)")
            views = augment_records(records.x, image_shape=records.image_shape, kind=kind, shift=shift)
            cache[key] = [self._all_signals()] + [
                compute_signals(self._population.logits(v), records.y, task=records.task) for v in views[1:]]
        return cache[key]

    def _check_access(self, name: str) -> None:
        if name not in SIGNAL_ACCESS:
            raise KeyError(f"unknown signal {name!r}; available: {', '.join(SIGNAL_ACCESS)}")
        if not SIGNAL_ACCESS[name] & set(self.access):
            raise AccessError(
                f"{self.owner} declared access {self.access} but read signal {name!r}, which needs "
                f"one of {sorted(SIGNAL_ACCESS[name])}"
            )

    def parameters(self) -> Params:
        """White-box access: the stacked parameters (read-only copies)."""
        if "params" not in self.access:
            raise AccessError(f"{self.owner} read the model parameters without declaring 'params' access")
        return {k: v.detach().clone() for k, v in self._population.params.items()}

    def logits(self, params: Params, x: Optional[np.ndarray] = None, *,
               models: Optional[Sequence[int]] = None):
        """White-box access: the population's architecture run at parameters the plugin built
        (e.g. perturbed or re-quantized copies of :meth:`parameters`), without gradients.

        Args:
            params: stacked ``{name: Tensor[K, ...]}`` with every name of :meth:`parameters`,
                float32 or float64, on the population's device; ``K`` is any number of models.
            x: float ``[B, D]`` inputs (default: the records' features), cast to the dtype of
                ``params``.
            models: int ``[K]``, the population model whose buffers row ``k`` runs with
                (default ``0..M-1``, so ``K = M``).

        Returns:
            Tensor ``[K, B, C]`` of the dtype of ``params``.
        """
        if "params" not in self.access:
            raise AccessError(f"{self.owner} ran the models on its own parameters without declaring 'params' access")
        import torch

        from mia_core.engine.trainer import ensemble_logits

        pop = self._population
        if set(params) != set(pop.params):
            raise ValueError(f"params must hold exactly the tensors {sorted(pop.params)}, got {sorted(params)}")
        first = next(iter(params.values()))
        idx = torch.arange(pop.n_models) if models is None else torch.as_tensor(models, dtype=torch.long)
        if idx.shape != (first.shape[0],):
            raise ValueError(f"models has {idx.numel()} entries but params hold {first.shape[0]} models")
        xt = torch.as_tensor(np.asarray(pop.records.x if x is None else x), dtype=first.dtype, device=first.device)
        buffers = {k: v[idx.to(v.device)] for k, v in pop.buffers.items()}
        return ensemble_logits(pop.base, params, buffers, xt)


EstimatorContext = SignalContext


@dataclass(frozen=True)
class TargetView:
    """What an attack may use to score records against one target model.

    Attributes:
        target: the target model's index.
        references: int ``[R]`` indices of the reference models, ``R = M - 2`` (every model but
            the target and its complementary partner).
        ref_keep: bool ``[R, N]`` membership of the reference models.
    """

    target: int
    references: np.ndarray
    ref_keep: np.ndarray
    _ctx: "AttackContext" = field(repr=False)

    def ref_signal(self, name: str, *, augment: Optional[str] = None, shift: int = 1) -> np.ndarray:
        """The signal of every reference model: float ``[R, N]`` (``[R, N, C]`` for ``logits``
        and ``probs``); with ``augment`` (see :meth:`SignalContext.signal`) ``[A, R, N]``."""
        return self._ctx._reference_rows(name, self.references, augment=augment, shift=shift)

    def target_signal(self, name: str, *, augment: Optional[str] = None, shift: int = 1) -> np.ndarray:
        """The target model's signal, what the attacker observes by querying it: float ``[N]``
        (``[N, C]`` for ``logits`` and ``probs``); with ``augment`` ``[A, N]``."""
        if augment is None:
            return self._ctx.signal(name)[self.target]
        return self._ctx.signal(name, augment=augment, shift=shift)[:, self.target]


class AttackContext(SignalContext):
    """The context attacks receive. Unlike estimators, an attack never sees the full keep
    matrix: :meth:`for_target` hands out the reference models' membership and signals, and
    the target's signals, but never the target's membership row."""

    _scoring: Optional[int] = None

    def __init__(self, population: "ModelPopulation", access: Sequence[str], *, owner: str = "plugin",
                 signals: Optional[Signals] = None, strict: bool = False,
                 references: Optional["SignalContext"] = None):
        super().__init__(population, access, owner=owner, signals=signals)
        #: The engine and the conformance kit run attacks strictly: :meth:`for_target` only for
        #: the target being scored, inside :meth:`scoring`. A context built by hand (a plugin's
        #: own unit tests) allows any target's view.
        self.strict = strict
        #: Non-adaptive evaluation: the reference models' signals come from this context's
        #: population (the same models without the defenses), the target's from ``population``.
        self._references = references

    @property
    def adaptive(self) -> bool:
        """Whether the reference models carry the target's defenses (the default: the attacker
        knows the recipe) or not (``--non-adaptive``: only the target is defended)."""
        return self._references is None

    def _reference_rows(self, name: str, references: np.ndarray, *, augment: Optional[str] = None,
                        shift: int = 1) -> np.ndarray:
        """The signal of the reference models ``references`` only, for :class:`TargetView`: from the
        population itself (adaptive) or from the undefended population (non-adaptive). Private and
        restricted to the view's references on purpose: the undefended population also holds the
        target's undefended twin, which no attack may read."""
        self._check_access(name)
        source = self if self._references is None else self._references
        if augment is None:
            return source.signal(name)[references]
        return source.signal(name, augment=augment, shift=shift)[:, references]

    @property
    def keep(self) -> np.ndarray:  # type: ignore[override]
        raise AccessError(
            f"{self.owner}: attacks may not read the full keep matrix (it holds the target's "
            f"membership); use ctx.for_target(target).ref_keep"
        )

    @property
    def seed(self) -> int:  # type: ignore[override]
        """A seed for the attack's own randomness, derived from the run seed (the run seed itself
        would let an attack redraw the keep matrix)."""
        return int(np.random.SeedSequence([self._population.seed, 0x61747461636B]).generate_state(1)[0])

    @contextlib.contextmanager
    def scoring(self, target: int) -> Iterator[None]:
        """The engine wraps each ``score(target, ...)`` call in this: only then may the attack
        take :meth:`for_target` of that target."""
        self._scoring = target
        try:
            yield
        finally:
            self._scoring = None

    def for_target(self, target: int, *, n_references: Optional[int] = None, online: bool = True) -> TargetView:
        """The view of ``target``: only inside ``score(target, ...)``. Another target's view
        would hand out this target's membership row (every model is a reference of the others),
        and so would a view kept from ``fit``.

        Args:
            n_references: a reference budget ``k`` (``None``: all ``M - 2`` references): the view
                holds a reproducible subset of whole complementary pairs, the same for every attack
                given the same budget and nested across budgets (see
                :func:`~mia_core.engine.trainer.select_references`): offline, ``k`` pairs, so ``k``
                OUT references per record; online, ``k / 2`` pairs, ``k / 2`` IN and ``k / 2`` OUT.
            online: whether the attack uses IN references (sets how ``k`` is counted).

        Raises:
            ValueError: an unusable budget (see ``select_references``).
        """
        if self.strict and (self._scoring is None or int(target) != self._scoring):
            where = "fit()" if self._scoring is None else f"score({self._scoring}, ...)"
            raise AccessError(
                f"{self.owner}: for_target({target}) called in {where}; an attack may read only the "
                f"view of the target it is scoring, inside score(target, ...) (other targets' views "
                f"hold this target's membership)"
            )
        refs = select_references(target=int(target), n_models=self.n_models, n_references=n_references,
                                 online=online, seed=self.seed)
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
        """Continue training every model on its own training half (same recipe, fresh optimiser,
        and the population's train-time defenses, so fine-tuning never escapes them)."""
        result = self._population._train(epochs, self.rng(1), lr=lr, post_step=post_step, on_epoch=on_epoch,
                                         defenses=self._population.train_defenses)
        self._population.finetune_steps += int(result.steps)  # a privacy accountant must hear of them
        self._population.finetune_reports.append(list(result.defenses))

    def probe(self, attack, *, models=None):
        """Run ``attack`` (an :class:`~mia_core.base.Attack` instance or a spec such as
        ``"lira:online=false"``) on the population as it is now, the way the engine does (strict
        context, one target at a time), restricted to ``models`` (whole pairs; default all):
        what a defense that searches its own setting (MIA-Pruning) scores each candidate with.
        See :func:`mia_core.engine.probe.probe_population`."""
        from mia_core.engine.probe import load_attack, probe_population

        if isinstance(attack, str):
            attack = load_attack(attack)
        return probe_population(self._population, attack, models=models,
                                owner=f"defense at position {self.position}")

    def changed(self) -> None:
        """Kept for plugins written against API 1.0, which had to call it after changing weights.

        Nothing is left to do: the engine computes the signals after the last defense, from the
        weights as they are then.
        """


__all__ = [
    "AccessError",
    "AttackContext",
    "DefenseContext",
    "EstimatorContext",
    "SignalContext",
    "TargetView",
]
