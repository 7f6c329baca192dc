"""Training M models at once as one vectorized ensemble (``torch.func``).

The M models of a population share an architecture, so their parameters are stacked along a new
leading axis (``torch.func.stack_module_state``) and one ``vmap``-ed ``functional_call`` runs the
forward and backward pass of all of them in a single batched call. Each model sees its own
mini-batches, drawn from its own training half (its row of the keep matrix). Because the
models' parameters are disjoint slices and Adam/SGD update elementwise, one optimizer over the
stacked tensors performs exactly the M independent optimisations; ``tests/test_population.py``
checks this against a plain per-model loop.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state, vmap

Params = Dict[str, torch.Tensor]

OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainingRecipe:
    """How every model of a population is trained.

    Attributes:
        epochs: passes over each model's training half.
        batch_size: records per mini-batch and model.
        lr: learning rate.
        weight_decay: L2 penalty coefficient (as in ``torch.optim``).
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum (ignored by Adam).
    """

    epochs: int = 60
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.9

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

    def to_dict(self) -> dict:
        return asdict(self)


def make_keep_matrix(n_models: int, n_records: int, rng: np.random.Generator) -> np.ndarray:
    """Random membership: bool ``[M, N]`` with every record IN for exactly ``M/2`` models.

    As in LiRA's reference code (Carlini et al. 2022): draw ``U[M, N]`` uniform, and put record
    ``j`` in the models holding the ``M/2`` smallest values of column ``j``. Each model then trains
    on about half of the records (a random number concentrated around ``N/2``).
    """
    if n_models < 2 or n_models % 2:
        raise ValueError(f"n_models must be an even number >= 2, got {n_models}")
    u = rng.random((n_models, n_records))
    order = u.argsort(axis=0).argsort(axis=0)  # rank of each model within each column
    return order < n_models // 2


def model_seeds(seed: int, n_models: int) -> list:
    """Independent per-model initialisation seeds derived from one run seed."""
    ss = np.random.SeedSequence([seed, 0x6D6961])  # "mia": keeps streams apart from batching
    return [int(s.generate_state(1)[0]) for s in ss.spawn(n_models)]


def init_ensemble(build: Callable[[], torch.nn.Module], n_models: int, seed: int) -> Tuple[torch.nn.Module, Params, Params]:
    """Build ``n_models`` freshly initialised copies and stack their state.

    Returns:
        ``(base, params, buffers)``: ``base`` is a parameter-free (meta-device) copy of the
        architecture for ``functional_call``; ``params`` and ``buffers`` map names to stacked
        tensors ``[M, ...]`` (params are leaves with ``requires_grad=True``).
    """
    models = []
    for s in model_seeds(seed, n_models):
        torch.manual_seed(s)
        models.append(build())
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    return base, params, buffers


def _batch_plan(keep: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Index plan for one epoch: int64 ``[steps, M, B]``.

    Each model walks a fresh permutation of its own training half. Models own slightly different
    numbers of records; the epoch has ``ceil(max_m n_m / B)`` steps and a model with fewer records
    continues into a second permutation of its half (so no step ever holds a non-member).
    """
    n_models = keep.shape[0]
    sizes = keep.sum(axis=1)
    steps = max(1, int(math.ceil(sizes.max() / batch_size)))
    total = steps * batch_size
    plan = np.empty((n_models, total), dtype=np.int64)
    for m in range(n_models):
        own = np.flatnonzero(keep[m])
        if own.size == 0:
            raise ValueError(f"model {m} has no training records")
        reps = int(math.ceil(total / own.size))
        seq = np.concatenate([rng.permutation(own) for _ in range(reps)])
        plan[m] = seq[:total]
    return plan.reshape(n_models, steps, batch_size).transpose(1, 0, 2).copy()


def _make_optimizer(params: Params, recipe: TrainingRecipe, lr: Optional[float] = None):
    tensors = list(params.values())
    lr = recipe.lr if lr is None else lr
    if recipe.optimizer == "adam":
        return torch.optim.Adam(tensors, lr=lr, weight_decay=recipe.weight_decay, foreach=True)
    return torch.optim.SGD(
        tensors, lr=lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, foreach=True
    )


def train_ensemble(
    base: torch.nn.Module,
    params: Params,
    buffers: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    keep: np.ndarray,
    recipe: TrainingRecipe,
    rng: np.random.Generator,
    *,
    epochs: Optional[int] = None,
    lr: Optional[float] = None,
    post_step: Optional[Callable[[Params], None]] = None,
    on_epoch: Optional[Callable[[int, float], None]] = None,
) -> None:
    """Train the stacked ensemble in place.

    Args:
        base: meta-device module from :func:`init_ensemble`.
        params: stacked parameters ``{name: Tensor[M, ...]}``, updated in place.
        buffers: stacked buffers.
        x: float32 ``[N, D]`` features of the whole population.
        y: int64 ``[N]`` labels.
        keep: bool ``[M, N]``; model ``m`` trains on records ``keep[m]`` only.
        recipe: optimiser settings.
        rng: source of the mini-batch order.
        epochs, lr: override the recipe's (used for fine-tuning).
        post_step: called with ``params`` after every optimiser step, under ``no_grad``
            (e.g. to re-apply pruning masks).
        on_epoch: called with ``(epoch, mean training loss over models)`` after each epoch.
    """
    epochs = recipe.epochs if epochs is None else epochs
    if epochs <= 0:
        return
    for p in params.values():
        p.requires_grad_(True)
    opt = _make_optimizer(params, recipe, lr)

    def one_loss(p, b, xb, yb):
        return F.cross_entropy(functional_call(base, (p, b), (xb,)), yb)

    batched_loss = vmap(one_loss)
    for epoch in range(epochs):
        plan = torch.from_numpy(_batch_plan(keep, recipe.batch_size, rng))
        total = 0.0
        for idx in plan:  # idx: [M, B]
            losses = batched_loss(params, buffers, x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            # Summing over models keeps every model's gradient equal to its own loss's gradient.
            losses.sum().backward()
            opt.step()
            if post_step is not None:
                with torch.no_grad():
                    post_step(params)
            total += float(losses.detach().mean())
        if on_epoch is not None:
            on_epoch(epoch, total / len(plan))
    for p in params.values():
        p.requires_grad_(False)
        p.grad = None


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
    "TrainingRecipe",
    "ensemble_logits",
    "init_ensemble",
    "make_keep_matrix",
    "model_seeds",
    "train_ensemble",
]
