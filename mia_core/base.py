"""The plugin contracts: one small abstract base per plugin kind.

Every plugin kind follows scikit-learn's estimator conventions:

* ``__init__`` takes keyword arguments with defaults and only stores them (same names as
  the arguments); the CLI's ``name:key=value`` parameters are parsed against that
  signature, and :meth:`Plugin.get_params` reads it back.
* Range checks live in :meth:`Plugin.validate`, which the engine calls before any work is
  done (so ``sparsity=1.5`` fails in a second, not after training); :meth:`fit` may call it too.
* Learned state ends in ``_``; ``fit`` returns ``self``; randomness comes from a
  ``random_state`` argument or from the seed the engine passes in.

Conventions shared by all kinds:

* ``M`` is the number of models in the population, ``N`` the number of records,
  ``C`` the number of classes, ``D`` the number of features.
* Members are the positive class. Attack scores are oriented so that **higher means
  more likely a member**.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mia_core import API_VERSION

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    import torch

    from mia_core.data import Records
    from mia_core.engine.contexts import AttackContext, DefenseContext, EstimatorContext
    from mia_core.engine.unlearn import UnlearnContext
    from mia_core.engine.trainer import StepBatch, StepInfo, TrainingContext, TrainingResult

#: Signals an attack may declare in :attr:`Attack.access`.
#: ``label``: the predicted label only; ``probs``: softmax outputs; ``logits``: raw outputs
#: (which also give the logit-scaled confidence); ``loss``: per-record loss (needs the true
#: label, as all of these do); ``params``: white-box access to the weights.
ACCESS_LEVELS: Tuple[str, ...] = ("label", "probs", "logits", "loss", "params")


class Plugin:
    """Common base: parameter introspection in scikit-learn's style.

    Class attributes a plugin should set:

    ``api_version``
        The miafw plugin API it was written against (``"MAJOR.MINOR"``). It is compatible when
        the major number equals :data:`mia_core.API_VERSION`'s and the minor number is not
        newer; ``None`` (undeclared) is accepted but shown as such by ``miafw list -v``.
    ``reference``
        The paper (authors, year, title, venue) the plugin implements, shown by ``miafw info``.
    """

    api_version: ClassVar[Optional[str]] = None
    reference: ClassVar[str] = ""

    @classmethod
    def param_signature(cls) -> Dict[str, inspect.Parameter]:
        """The ``__init__`` parameters (excluding ``self``), in declaration order."""
        sig = inspect.signature(cls.__init__)
        return {
            name: p
            for name, p in sig.parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def get_params(self) -> Dict[str, Any]:
        """The constructor arguments as stored on the instance (``{name: value}``)."""
        return {name: getattr(self, name) for name in self.param_signature()}

    def validate(self) -> None:
        """Check parameter values; raise ``ValueError`` naming the bad value and what is allowed.

        Called by the engine before any training so that a bad value fails fast. The default
        accepts everything.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class Attack(Plugin, abc.ABC):
    """A membership-inference attack (entry-point group ``miafw.attacks``).

    Class attributes:

    ``access``
        The signals the attack reads (a subset of :data:`ACCESS_LEVELS`). The context refuses
        any signal the attack did not declare, so a declared threat model is an enforced one.
    ``min_reference_models``
        How many reference (shadow) models the attack needs; ``0`` for attacks that need none
        (e.g. a global loss threshold). A population of ``M`` models gives each target ``M - 2``
        references (every model but the target and its complementary partner), with
        ``(M - 2) / 2`` IN and as many OUT references for every record.
    """

    access: ClassVar[Tuple[str, ...]] = ("logits",)
    min_reference_models: ClassVar[int] = 0

    def check_records(self, records: "Records") -> None:
        """Refuse records the attack cannot score before anything trains: raise ``ValueError``
        with one line naming what is missing (e.g. query augmentations on records that declare
        no image shape). Default: any records."""

    def queries_target(self) -> bool:
        """Whether the attack queries the target on inputs other than the records themselves
        (e.g. augmented views). A target known only by its predictions on the records (``miafw
        audit --predictions``) cannot answer such queries, so the audit refuses the attack before
        anything trains. Default: ``False``."""
        return False

    def reference_budget(self) -> Tuple[Optional[int], bool]:
        """``(n_references, online)``: the attack's reference budget, as it will pass them to
        ``ctx.for_target(t, n_references=..., online=...)``, so the engine can refuse a budget the
        population cannot meet before training. Read from the parameters ``n_references`` (default
        ``None``: all references) and ``online`` (default ``True``); override if yours differ."""
        return getattr(self, "n_references", None), bool(getattr(self, "online", True))

    @abc.abstractmethod
    def fit(self, ctx: "AttackContext") -> "Attack":
        """Prepare the attack from the shared population context.

        Args:
            ctx: an :class:`~mia_core.engine.contexts.AttackContext`: ``ctx.labels`` (int ``[N]``),
                ``ctx.n_models``, and ``ctx.for_target(t)``, whose ``references`` (int ``[R]``),
                ``ref_keep`` (bool ``[R, N]``: reference model trained on record; ``R = M - 2``, with
                ``R / 2`` IN and ``R / 2`` OUT references for every record),
                ``ref_signal(name)`` (float ``[R, N]``, or ``[R, N, C]`` for ``logits``/``probs``)
                and ``target_signal(name)`` (float ``[N]``, or ``[N, C]``)
                are everything an attack may use to score against target ``t``. Only the signals
                allowed by :attr:`access` can be read; the target's membership row never can.

        Returns:
            ``self``.
        """

    @abc.abstractmethod
    def score(self, target: int, records: np.ndarray) -> np.ndarray:
        """Membership scores of ``records`` against model ``target``.

        Args:
            target: index of the target model in ``[0, M)``. The attack may use every other model
                of the population as a reference, never the target's membership row.
            records: int ``[K]`` record indices into ``[0, N)``.

        Returns:
            float ``[K]``, finite, **higher = more likely a member** of ``target``'s training set.
        """


class Defense(Plugin, abc.ABC):
    """A defense (entry-point group ``miafw.defenses``).

    ``stage`` is ``"post"`` for defenses that transform trained weights (pruning, quantization,
    parameter noise) and ``"train"`` for those that change the training recipe. Defenses are
    applied in the order given on the command line, to every model of the population (an
    adaptive attacker knows the recipe, so reference models are defended too).
    """

    stage: ClassVar[str] = "post"

    def check_model(self, module: "torch.nn.Module") -> None:
        """Refuse a model this defense cannot apply to, before anything trains: raise
        ``ValueError`` with one line naming the layer or tensor and why (e.g. per-channel
        quantization of a tensor without channels). ``module`` is one model of the population
        (on the meta device: shapes and layer types, no values). Default: every model is fine."""

    @abc.abstractmethod
    def apply(self, ctx: "DefenseContext") -> Dict[str, Any]:
        """Apply the defense to every model of the population, in place.

        Args:
            ctx: gives the stacked parameters (``ctx.params``: ``{name: Tensor[M, ...]}``,
                modified in place), the keep matrix, the records, and ``ctx.finetune(...)`` to
                continue training every model on its own training half.

        Returns:
            A JSON-serialisable report of what was done (e.g. achieved sparsity), shown in the
            terminal and stored in ``metrics.json``.
        """


class TrainingDefense(Plugin, abc.ABC):
    """A train-time defense (entry-point group ``miafw.defenses``, ``stage = "train"``).

    It changes how every model of the population is trained (weight decay, DP-SGD, adversarial
    regularization) by hooking into the steps of the vectorized trainer
    (:class:`mia_core.engine.trainer.Trainer`), in the order Opacus' optimizer uses
    (``pre_step`` -> clip and accumulate -> add noise -> scale -> step hook):

    1. :meth:`configure` once before training (may choose the batch sampler, e.g. Poisson);
    2. per step, the per-model loss plus every defense's :meth:`penalty`;
    3. gradients: per batch, or per sample when any defense sets
       :attr:`per_sample_gradients` (``torch.func`` inside the ensemble's ``vmap``);
    4. :meth:`transform_per_sample` on per-sample gradients (e.g. clip), then the sum over the
       batch, then :meth:`transform_batch` on the summed gradients (e.g. add noise), then the
       division by the sampler's denominator;
    5. the optimizer step, then :meth:`post_step`;
    6. :meth:`report` after training: what it did (lambda, epsilon, ...).

    Every hook works on all ``M`` models at once: tensors carry the model axis first. The
    defense's specification is part of the population's cache key, so a cached population is
    never reused across different train-time defenses. All hooks but :meth:`report` default
    to doing nothing, so a defense overrides only the steps it changes.
    """

    stage: ClassVar[str] = "train"
    #: Ask the trainer for per-sample gradients ``[M, B, ...]`` (costlier than per-batch ones).
    per_sample_gradients: ClassVar[bool] = False

    def check_model(self, module: "torch.nn.Module") -> None:
        """As :meth:`Defense.check_model`: refuse a model the defense cannot train (e.g. DP-SGD on
        a layer without per-sample gradients) with one ``ValueError`` line, before training."""

    def reserve_fraction(self) -> float:
        """The fraction of the records the defense needs as *reserved* records: trained on by no
        model and scored against no target (the keep matrix's third role), e.g. adversarial
        regularization's non-member reference set. The engine reserves the largest fraction any
        train-time defense asks for, for the defended population and its undefended baseline
        alike (so both have the same keep matrix); the defense finds them in ``ctx.reserved``.
        Default 0: no record is reserved."""
        return 0.0

    def configure(self, ctx: "TrainingContext") -> None:
        """Called once before training with the trainer's context: ``ctx.recipe``, ``ctx.n_models``,
        ``ctx.train_sizes`` (int ``[M]``), ``ctx.param_shapes``, ``ctx.epochs``, ``ctx.device``, the
        per-model streams (``ctx.model_stream(m, purpose)``) and ``ctx.sampler``, which the defense
        may replace (e.g. ``PoissonSampler(q)`` for DP-SGD). A good place to call :meth:`validate`."""

    def penalty(self, params: "Dict[str, torch.Tensor]", batch: "StepBatch") -> "Optional[torch.Tensor]":
        """An extra loss term per model, float ``[M]``, added to each model's training loss
        (differentiable in ``params``, called once per step), or ``None``.

        ``batch`` is the step's batch (``batch.x [M, W, ...]``, ``batch.y``, ``batch.mask``) with
        ``batch.logits(params, x=None)``, the ensemble's differentiable forward pass, so a penalty
        may depend on the models' outputs (on the batch, or on data of the defense's own from
        ``ctx.x`` seen in :meth:`configure`), as adversarial regularization's does.

        Its gradient is added after the gradient transforms and the division by the denominator,
        so it is never clipped or noised (as Opacus treats an optimizer's weight decay)."""
        return None

    def transform_per_sample(self, grads: "Dict[str, torch.Tensor]", mask: "torch.Tensor", step: "StepInfo") -> None:
        """Change per-sample gradients in place: ``grads[name]`` is ``[M, B, ...]``, ``mask`` bool
        ``[M, B]`` marks real samples (padding rows of ragged Poisson batches are zero).

        Called only when some defense sets :attr:`per_sample_gradients`. The tensors belong to the
        trainer: change them in place, and copy anything to keep beyond the call."""

    def per_sample_factors(self, norms: "torch.Tensor", mask: "torch.Tensor",
                           step: "StepInfo") -> "Optional[torch.Tensor]":
        """The same transform as :meth:`transform_per_sample`, for a defense whose per-sample
        transform only *rescales* each sample's gradient by a factor that depends on its L2 norm
        (over all of its model's parameters), such as clipping: return the factors, float
        ``[M, B]``, for the norms ``norms`` ``[M, B]`` (0 on padding rows, ``mask`` as there).

        A defense that implements it (beside :meth:`transform_per_sample`, which other model
        families still use) lets the trainer take a faster route on stacked MLPs: the norms of
        a linear layer's per-sample gradients follow from its inputs and its output gradients
        (``‖δ aᵀ‖ = ‖δ‖·‖a‖``), and the rescaled sum is one batched GEMM, so no per-sample
        gradient is ever materialised (the "ghost clipping" of Li, Tramèr, Liang, Hashimoto,
        ICLR 2022, sec. 4). Several such defenses compose: each sees the norms after the factors
        of the ones before it. Default: not implemented (``None``)."""
        return None

    def transform_batch(self, grads: "Dict[str, torch.Tensor]", step: "StepInfo") -> None:
        """Change the gradients summed over the batch, in place: ``grads[name]`` is ``[M, ...]``,
        before the division by ``step.denominator`` (float ``[M]``). Draw noise for model ``m``
        from ``step.generators[m]`` (or ``step.randn(shape)``), so it does not depend on which
        other models train alongside. The tensors are reused by the next step: copy to keep."""

    def post_step(self, params: "Dict[str, torch.Tensor]", step: "StepInfo") -> None:
        """Called after every optimizer step, under ``torch.no_grad()``; may change ``params``."""

    @abc.abstractmethod
    def report(self, result: "TrainingResult") -> Dict[str, Any]:
        """A JSON-serialisable report of what the defense did (e.g. ``{"lam": 1e-3}`` or the
        privacy spent), shown in the terminal and stored in ``metrics.json``."""

    def compose(self, reports: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """The report of training followed by fine-tuning (a post-training defense's
        ``finetune_epochs`` runs with the train-time defenses on), from this defense's report of
        each segment in order (training first). Default ``None``: the defense has nothing to add
        up; a privacy defense must compose its spending here (the engine flags a report whose
        ``epsilon`` it cannot compose)."""
        return None


class Estimator(Plugin, abc.ABC):
    """An information-theoretic leakage estimator (entry-point group ``miafw.estimators``)."""

    access: ClassVar[Tuple[str, ...]] = ("logits",)

    @abc.abstractmethod
    def estimate(self, ctx: "EstimatorContext") -> Dict[str, Any]:
        """Estimate membership leakage from the population and its signals.

        Returns:
            A JSON-serialisable dict with at least ``"value"`` (the estimate) and, where the
            estimator implies one, ``"advantage_bound"`` (an upper bound on any attack's
            membership advantage), to be shown next to the measured attacks.
        """


class DatasetSource(Plugin, abc.ABC):
    """A dataset (entry-point group ``miafw.datasets``): the whole population of records.

    Every model of a population is trained on a random half of these records; the other half
    are its non-members.
    """

    @abc.abstractmethod
    def load(self) -> "Records":
        """Return the records: float32 features ``x [N, D]``, int64 labels ``y [N]`` in
        ``[0, C)``, and stable record indices. Any preprocessing must be fixed (not fitted on a
        subset), so that members and non-members are treated alike.
        """

    def column(self, name: str) -> "np.ndarray":
        """A column of the source data that is *not* a feature, one value per record in the order
        of :meth:`load`'s records (``miafw audit --members column=NAME`` reads the target's
        membership from it). Default: the dataset has no such columns.

        Raises:
            DataError: no such column (naming the ones there are).
        """
        from mia_core.data import DataError

        raise DataError(f"dataset {type(self).__name__} has no columns besides its features and labels; give "
                        f"the members as a file of record ids (--members FILE)")


class ModelFamily(Plugin, abc.ABC):
    """A model architecture (entry-point group ``miafw.models``)."""

    @abc.abstractmethod
    def build(self, n_features: int, n_classes: int) -> "torch.nn.Module":
        """Return an untrained module mapping float ``[B, n_features]`` to logits
        ``[B, n_classes]``. It must be usable with ``torch.func.functional_call`` (no
        in-place buffer updates), so the population can train M copies as one vectorized
        ensemble. Initialisation draws from torch's global RNG, which the engine seeds.
        """


@dataclass(frozen=True)
class PluginSpec:
    """A plugin name with its parsed parameters, as given on the command line."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}


def check_api_version(declared: Optional[str]) -> Optional[str]:
    """``None`` when a plugin targeting API ``declared`` can run on this miafw, else the reason.

    Compatible: same major version and a minor version no newer than ours (a plugin written
    for 1.0 runs on 1.3; one written for 1.3 may use what 1.0 lacks; 2.x is a different API).
    An undeclared version (``None``) is accepted.
    """
    if declared is None:
        return None
    try:
        major, minor = (int(p) for p in str(declared).split("."))
    except ValueError:
        return f"declares api_version={declared!r}, which is not of the form MAJOR.MINOR"
    our_major, our_minor = (int(p) for p in API_VERSION.split("."))
    if major != our_major:
        return (
            f"targets plugin API {declared}, but this miafw provides API {API_VERSION} "
            f"(major versions must match)"
        )
    if minor > our_minor:
        return f"targets plugin API {declared}, newer than this miafw's {API_VERSION}; upgrade miafw"
    return None


class Unlearner(Plugin, abc.ABC):
    """A machine-unlearning method (entry-point group ``miafw.unlearners``): it changes every
    model of a trained population so that it forgets its forget set, vectorized across the
    population like a defense."""

    @abc.abstractmethod
    def unlearn(self, ctx: "UnlearnContext") -> Dict[str, Any]:
        """Unlearn in place through ``ctx`` (:class:`~mia_core.engine.unlearn.UnlearnContext`:
        ``ctx.forget`` and ``ctx.retain``, bool ``[M, N]``; ``ctx.train(keep=..., epochs=...,
        ascent=...)`` continues training every model on its own rows of ``keep``; ``ctx.retrain()``
        trains every model from scratch on its retain set). Returns a JSON-serialisable report
        (the cost in optimizer steps at least)."""


#: The base class each plugin kind's entry points must derive from (see :data:`KIND_BASES`).
KINDS: Dict[str, type] = {
    "attacks": Attack,
    "defenses": Defense,
    "estimators": Estimator,
    "datasets": DatasetSource,
    "models": ModelFamily,
    "unlearners": Unlearner,
}

#: The classes a plugin of each kind may derive from: defenses have one contract per stage.
KIND_BASES: Dict[str, Tuple[type, ...]] = {**{k: (v,) for k, v in KINDS.items()}, "defenses": (Defense, TrainingDefense)}

__all__: Sequence[str] = [
    "ACCESS_LEVELS",
    "Attack",
    "DatasetSource",
    "Defense",
    "Estimator",
    "KINDS",
    "KIND_BASES",
    "ModelFamily",
    "Plugin",
    "PluginSpec",
    "TrainingDefense",
    "Unlearner",
    "check_api_version",
]
