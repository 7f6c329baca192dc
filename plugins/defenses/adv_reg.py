"""Adversarial regularization as a train-time defense (Nasr, Shokri & Houmansadr, CCS 2018).

Every model ``f`` of the population trains against its own membership-inference model ``h``
(the paper's ``h``; wang2021's ``f_A``), a min-max game (Nasr et al. eq. 7; wang2021 eq. 3):

    min_f  L_D(f) + γ · max_h G_f(h),
    G_f(h) = E_{(x,y)∈D} [log h(x, y, f(x))] + E_{(x,y)∈D'} [log(1 − h(x, y, f(x)))]     (eq. 1)

with ``D`` the model's training half and ``D'`` a reference set of non-members: the records the
engine reserves (:meth:`AdversarialRegularization.reserve_fraction`), trained on by no model and
scored against no target. Algorithm 1 alternates, at every step of the classifier:

1. ``k`` steps of the inference model, each on a fresh mini-batch of ``m`` members from ``D``
   and ``m'`` reference records from ``D'``, ascending ``∇_ω G`` (the classifier's outputs are
   constants here): :func:`inference_gain`;
2. one step of the classifier on its own mini-batch, descending
   ``∇_θ [ (1/m) Σ ℓ(f(x_i), y_i) + γ · (1/m) Σ log h(x_i, y_i, f(x_i)) ]`` (Algorithm 1, line 9:
   only the members' term of the gain, through ``f(x)``; ``h`` is a constant here):
   :func:`privacy_penalty`.

The inference model (:func:`inference_logits`) follows the paper's three fully connected
sub-networks: one on the prediction vector ``f(x)`` (softmax probabilities, unsorted: the label
branch needs the class order), one on the one-hot label ``y``, one on their concatenation, ending
in a sigmoid: ``h = σ(z)``. It is kept small (``attack_width`` units a layer).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mia_core.base import TrainingDefense
from mia_core.engine.optim import make_optimizer

#: Per-model stream purposes (``ctx.model_stream(m, purpose)``), apart from the trainer's 0 (data
#: order) and 1 (noise): the inference model's initialisation, and its mini-batches.
STREAM_INIT = 0x61647669  # "advi"
STREAM_BATCH = 0x61647662  # "advb"

#: The gain ``G`` of an inference model that outputs ``h = 1/2`` everywhere: ``2 log(1/2)``.
CHANCE_GAIN = -2.0 * math.log(2.0)

#: The inference model's layers: ``name: (input, output)`` in units of ``C`` (classes) or ``w``.
_LAYERS = (
    ("pred1", "C", "w"),  # prediction-vector branch
    ("pred2", "w", "w"),
    ("label", "C", "w"),  # label branch (one-hot y)
    ("comb1", "2w", "w"),  # combination of both
    ("comb2", "w", "1"),
)


# ----------------------------------------------------------------------------- pure maths
def inference_shapes(*, n_classes: int, width: int) -> Dict[str, tuple]:
    """One inference model's parameter shapes: ``{"<layer>.w": (in, out), "<layer>.b": (out,)}``
    for the layers ``pred1 (C→w), pred2 (w→w), label (C→w), comb1 (2w→w), comb2 (w→1)``."""
    size = {"C": int(n_classes), "w": int(width), "2w": 2 * int(width), "1": 1}
    out: Dict[str, tuple] = {}
    for name, fan_in, fan_out in _LAYERS:
        out[f"{name}.w"] = (size[fan_in], size[fan_out])
        out[f"{name}.b"] = (size[fan_out],)
    return out


def init_inference_params(*, n_classes: int, width: int, seeds: Sequence[int],
                          dtype: torch.dtype = torch.float32, device: Any = "cpu") -> Dict[str, torch.Tensor]:
    """Freshly initialised inference models, one per seed, stacked: ``{name: Tensor[M, ...]}``.

    Model ``m`` draws from a CPU generator seeded with ``seeds[m]`` only (so it does not depend
    on the other models, nor on the device), every weight and bias uniform in
    ``±1/sqrt(fan_in)`` (``torch.nn.Linear``'s default; Nasr et al.'s code draws weights from
    ``N(0, 0.01²)`` and zero biases, which starts the 5-layer model with a vanishing output).
    """
    shapes = inference_shapes(n_classes=n_classes, width=width)
    per_model: List[Dict[str, torch.Tensor]] = []
    for s in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(int(s))
        one = {}
        for name, shape in shapes.items():
            fan_in = shapes[name[:-2] + ".w"][0]
            bound = 1.0 / math.sqrt(fan_in)
            one[name] = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).mul_(bound)
        per_model.append(one)
    return {name: torch.stack([p[name] for p in per_model]).to(device=device, dtype=dtype) for name in shapes}


def pack_inference_params(params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Stacked inference models as one flat buffer ``[M, P]`` (the layers of
    :func:`inference_shapes`, in order), so that one optimizer call updates them all."""
    return torch.cat([v.reshape(v.shape[0], -1) for v in params.values()], dim=1).contiguous()


def unpack_inference_params(flat: torch.Tensor, *, n_classes: int, width: int) -> Dict[str, torch.Tensor]:
    """Views ``{name: Tensor[M, ...]}`` into a flat buffer ``[M, P]`` from :func:`pack_inference_params`
    (differentiable: a gradient on the views reaches ``flat``)."""
    shapes = inference_shapes(n_classes=n_classes, width=width)
    total = sum(int(np.prod(shape)) for shape in shapes.values())
    if flat.dim() != 2 or flat.shape[1] != total:
        raise ValueError(f"a flat buffer of shape {tuple(flat.shape)} does not hold an inference model of "
                         f"{n_classes} classes and width {width} ([M, {total}])")
    out, off = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = flat[:, off:off + n].view(flat.shape[0], *shape)
        off += n
    return out


def inference_logits(*, params: Mapping[str, torch.Tensor], probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The inference models' logits ``z`` (``h = σ(z)`` is the probability of "member").

    Args:
        params: stacked inference models ``{name: Tensor[M, ...]}`` (:func:`inference_shapes`).
        probs: float ``[M, B, C]``: model ``m``'s prediction vectors ``f_m(x)`` for its rows.
        labels: int64 ``[M, B]`` in ``[0, C)``.

    Returns:
        float ``[M, B]``: ``z = comb2(relu(comb1([relu(pred2(relu(pred1(f(x))))), relu(label(y))])))``,
        each layer ``a @ W + b`` with model ``m``'s own weights.
    """
    def layer(name, a):
        return torch.baddbmm(params[f"{name}.b"].unsqueeze(1), a, params[f"{name}.w"])

    a = F.relu(layer("pred2", F.relu(layer("pred1", probs))))
    onehot = F.one_hot(labels, probs.shape[-1]).to(probs.dtype)
    b = F.relu(layer("label", onehot))
    h = F.relu(layer("comb1", torch.cat([a, b], dim=-1)))
    return layer("comb2", h).squeeze(-1)


def _masked_mean(v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the last axis of ``v [M, B]`` over the rows ``mask [M, B]`` marks (0 for none)."""
    if mask is None:
        return v.mean(dim=-1) if v.shape[-1] else v.sum(dim=-1)
    w = mask.to(v.dtype)
    return (v * w).sum(dim=-1) / w.sum(dim=-1).clamp_min(1.0)


def inference_gain(*, member_logits: torch.Tensor, reference_logits: torch.Tensor,
                   member_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The empirical gain of eq. 1 per model: float ``[M]``,
    ``(1/m) Σ_D log σ(z_i) + (1/m') Σ_D' log(1 − σ(z'_j))`` (``log σ`` computed stably as
    ``logsigmoid``; ``log(1 − σ(z)) = logsigmoid(−z)``).

    Args:
        member_logits: float ``[M, m]``: the inference model's logits on members.
        reference_logits: float ``[M, m']``: on reference (non-member) records.
        member_mask: optional bool ``[M, m]``: the real member rows (an empty row contributes 0).

    The maximum is 0 (a perfect inference model); an uninformed ``h = 1/2`` gains
    ``2 log(1/2) ≈ −1.386`` (:data:`CHANCE_GAIN`).
    """
    return _masked_mean(F.logsigmoid(member_logits), member_mask) + _masked_mean(F.logsigmoid(-reference_logits), None)


def privacy_penalty(*, member_logits: torch.Tensor, gamma: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The classifier's regulariser of Algorithm 1 (line 9) per model: float ``[M]``,
    ``γ · (1/m) Σ_i log h(x_i, y_i, f(x_i))`` over the real rows of the classifier's batch.

    Args:
        member_logits: float ``[M, W]``: the inference model's logits on the batch (differentiable
            in the classifier through ``f(x)``).
        gamma: ``γ`` (the paper's ``λ``).
        mask: optional bool ``[M, W]``: real rows (padding of ragged batches excluded; a model
            with none gets 0).
    """
    return float(gamma) * _masked_mean(F.logsigmoid(member_logits), mask)


def membership_accuracy(*, member_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Balanced accuracy of the rule ``h > 1/2`` per model: float ``[M]``,
    ``(mean[z > 0 on members] + mean[z ≤ 0 on references]) / 2``."""
    hit_in = (member_logits > 0).to(member_logits.dtype).mean(dim=-1)
    hit_out = (reference_logits <= 0).to(reference_logits.dtype).mean(dim=-1)
    return (hit_in + hit_out) / 2


# ----------------------------------------------------------------------------- the plugin
def _int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


class AdversarialRegularization(TrainingDefense):
    """Adversarial regularization: each model trains against its own membership-inference model (Nasr et al. 2018).

    Algorithm 1 of Nasr, Shokri & Houmansadr (CCS 2018), inside the trainer's ensemble: before
    every classifier step (:meth:`penalty`, once per step), each model's inference model ``h_m``
    takes ``k`` Adam steps (lr ``attack_lr``) ascending the gain of eq. 1 on ``attack_batch`` of
    model ``m``'s training records against ``attack_batch`` reserved records
    (:func:`inference_gain`), with the classifier's outputs detached; then the classifier's loss
    gets ``γ · mean_i log h_m(x_i, y_i, f_m(x_i))`` over its batch's real rows
    (:func:`privacy_penalty`), differentiable through ``f_m(x)`` only, ``h_m`` held fixed. The
    trainer adds this gradient to the data gradient before the optimizer step: the paper's
    descent on ``L + γ log h``.

    The reference set ``D'`` is the population's reserved records (``reference_fraction`` of all
    records, reserved by the engine for every model and never scored), the same for every model.
    Each inference model, its initialisation and its mini-batches come from its model's own
    random streams, so model ``m`` trains the same alone, in a shard or in the whole ensemble.
    A training run (the population's, or a post-training defense's fine-tuning) starts fresh
    inference models. For the first ``warmup_epochs`` epochs the classifier trains without the
    penalty while the inference models already train (Nasr et al.'s code trains the classifier
    alone for one epoch, then the attack alone for five, before alternating).

    Deviations: members for the inference model are sampled with replacement; the reference
    batch has the same size ``attack_batch``; the inference model is a small MLP (see
    :func:`inference_logits`), initialised as ``torch.nn.Linear``; the penalty is the paper's
    ``log h`` (the authors' code uses ``mean(h) − 1/2``). With gradient-transforming defenses
    (dp-sgd) in the same chain, the penalty's gradient is added after clipping and noise, so the
    reported ε would not cover it.

    Args:
        gamma: ``γ >= 0`` (the paper's ``λ``), the weight of the inference gain; 0 trains the
            classifiers as without the defense (the inference models still train, for the report).
        k: inference-model steps per classifier step, an integer >= 1.
        reference_fraction: fraction of all records reserved as the reference set, in (0, 0.5]
            (more would leave too few records to train on and to score).
        attack_lr: Adam learning rate of the inference models, > 0.
        attack_width: units per hidden layer of the inference model, >= 1.
        attack_batch: members and reference records per inference step (each), >= 1.
        warmup_epochs: epochs at the start without the penalty, >= 0.
    """

    api_version = "1.0"
    stage = "train"
    reference = (
        "M. Nasr, R. Shokri, A. Houmansadr. Machine Learning with Membership Privacy using Adversarial "
        "Regularization. ACM CCS 2018, pp. 634-646 (Algorithm 1)"
    )

    def __init__(self, gamma: float = 1.0, k: int = 1, reference_fraction: float = 0.1, attack_lr: float = 1e-3,
                 attack_width: int = 64, attack_batch: int = 64, warmup_epochs: int = 0):
        self.gamma = gamma
        self.k = k
        self.reference_fraction = reference_fraction
        self.attack_lr = attack_lr
        self.attack_width = attack_width
        self.attack_batch = attack_batch
        self.warmup_epochs = warmup_epochs

    # ------------------------------------------------------------------ parameters
    def validate(self) -> None:
        if not (_number(self.gamma) and self.gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0 (the weight of the inference gain), "
                             f"got {self.gamma!r}")
        if not (_int(self.k) and self.k >= 1):
            raise ValueError(f"k must be an integer >= 1 (inference-model steps per classifier step), got {self.k!r}")
        f = self.reference_fraction
        if not (_number(f) and 0 < f <= 0.5):
            raise ValueError(f"reference_fraction must be in (0, 0.5] (the fraction of records reserved as the "
                             f"reference set; the rest train and are scored), got {f!r}")
        if not (_number(self.attack_lr) and self.attack_lr > 0):
            raise ValueError(f"attack_lr must be a positive number, got {self.attack_lr!r}")
        for name in ("attack_width", "attack_batch"):
            v = getattr(self, name)
            if not (_int(v) and v >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (_int(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ValueError(f"warmup_epochs must be an integer >= 0, got {self.warmup_epochs!r}")

    def reserve_fraction(self) -> float:
        """``reference_fraction``: the engine reserves that many records as the reference set."""
        return float(self.reference_fraction)

    # ------------------------------------------------------------------ hooks
    def configure(self, ctx) -> None:
        self.validate()
        reserved = np.asarray(getattr(ctx, "reserved", ()), dtype=np.int64)
        if reserved.size == 0:
            raise ValueError(
                f"adv-reg needs reserved records as its non-member reference set (reference_fraction="
                f"{self.reference_fraction!r} of the records, asked for through reserve_fraction()), but this "
                f"training run has none: train through the engine (mia_core.evaluate / miafw eval) or pass "
                f"reserve=defense.reserve_fraction() to ModelPopulation.train")
        if ctx.y.dim() != 1:
            raise ValueError("adv-reg trains on one label per record; this training run gives each model its own "
                             "labels")
        if np.asarray(ctx.keep)[:, reserved].any():
            raise ValueError("adv-reg: some reserved records are in a model's training half")
        self._ctx = ctx
        dev = ctx.device
        self._reserved = torch.as_tensor(reserved, device=dev)
        keep = np.asarray(ctx.keep, dtype=bool)
        sizes = keep.sum(axis=1)
        members = np.zeros((keep.shape[0], int(sizes.max())), dtype=np.int64)
        for m in range(keep.shape[0]):
            own = np.flatnonzero(keep[m])
            members[m, : own.size] = own
        self._members = torch.as_tensor(members, device=dev)  # [M, max n_m], row m padded past n_m
        self._sizes = sizes.astype(np.int64)
        self._batch_rngs = [np.random.Generator(np.random.PCG64(ctx.model_stream(m, STREAM_BATCH)))
                            for m in range(ctx.n_models)]
        self._init_seeds = [int(ctx.model_stream(m, STREAM_INIT).generate_state(1, np.uint64)[0])
                            for m in range(ctx.n_models)]
        self._flat: Optional[torch.Tensor] = None  # the inference models [M, P], created at the first step (needs C)
        self._n_classes = 0
        self._optimizer = None
        self._steps_per_epoch: Optional[int] = None
        self._step = 0
        self._epoch_stats: List[torch.Tensor] = []  # per epoch: [3, M] sums of gain, accuracy, count
        self._current: Optional[torch.Tensor] = None
        self.epochs_ = int(ctx.epochs)
        self.reference_records_ = int(reserved.size)

    def _draw(self) -> torch.Tensor:
        """This step's inference mini-batches: int64 ``[k, M, 2A]`` record indices (members of model
        ``m`` first, then reserved records), each model from its own stream."""
        k, a = int(self.k), int(self.attack_batch)
        u = np.stack([g.random((k, 2, a)) for g in self._batch_rngs], axis=1)  # [k, M, 2, A]
        mem = np.floor(u[:, :, 0] * self._sizes[None, :, None]).astype(np.int64)
        ref = np.floor(u[:, :, 1] * len(self._reserved)).astype(np.int64)
        mem_t = torch.from_numpy(mem).to(self._members.device)
        ref_t = torch.from_numpy(ref).to(self._members.device)
        rows = torch.arange(self._members.shape[0], device=self._members.device).view(1, -1, 1)
        return torch.cat([self._members[rows, mem_t], self._reserved[ref_t]], dim=-1)

    def _train_inference(self, params: Dict[str, torch.Tensor], batch) -> None:
        """Algorithm 1, lines 2-6: ``k`` Adam steps of every inference model on fresh mini-batches."""
        ctx = self._ctx
        index = self._draw()
        a = int(self.attack_batch)
        n_models = index.shape[1]
        feat = ctx.x.shape[1:]
        stats = torch.zeros(3, n_models, dtype=torch.float32, device=index.device)
        for step in range(index.shape[0]):
            flat = index[step].reshape(-1)
            x = ctx.x.index_select(0, flat).view(n_models, 2 * a, *feat)
            y = ctx.y.index_select(0, flat).view(n_models, 2 * a)
            with torch.no_grad():  # the classifier's outputs are constants for h's update
                probs = torch.softmax(batch.logits(params, x), dim=-1)
            if self._flat is None:
                self._n_classes = int(probs.shape[-1])
                self._flat = pack_inference_params(init_inference_params(
                    n_classes=self._n_classes, width=int(self.attack_width), seeds=self._init_seeds,
                    dtype=probs.dtype, device=probs.device)).requires_grad_(True)
                # one buffer, one fused Adam call a step (elementwise: model m's update is its own)
                self._optimizer = make_optimizer([self._flat], optimizer="adam", lr=float(self.attack_lr))
            with torch.enable_grad():
                z = inference_logits(params=self.inference_params(), probs=probs, labels=y)
                z_in, z_out = z[:, :a], z[:, a:]
                gain = inference_gain(member_logits=z_in, reference_logits=z_out)
                (self._flat.grad,) = torch.autograd.grad(-gain.sum(), [self._flat])
            self._optimizer.step()
            self._flat.grad = None
            with torch.no_grad():
                stats[0] += gain.detach().float()
                stats[1] += membership_accuracy(member_logits=z_in.detach(), reference_logits=z_out.detach()).float()
                stats[2] += 1
        self._current = stats if self._current is None else self._current + stats

    def inference_params(self, *, detach: bool = False) -> Dict[str, torch.Tensor]:
        """The inference models as ``{name: Tensor[M, ...]}`` views of their flat buffer (``detach``:
        cut from its graph), or ``{}`` before the first step."""
        if self._flat is None:
            return {}
        flat = self._flat.detach() if detach else self._flat
        return unpack_inference_params(flat, n_classes=self._n_classes, width=int(self.attack_width))

    def penalty(self, params: Dict[str, torch.Tensor], batch) -> Optional[torch.Tensor]:
        """Train the inference models ``k`` steps, then return ``γ · mean log h_m(x, y, f_m(x))``
        over the batch's real rows, float ``[M]`` (``None`` during warm-up or with ``γ = 0``)."""
        if self._steps_per_epoch is None:  # every defense has configured the sampler by now
            self._steps_per_epoch = max(1, int(self._ctx.sampler.steps_per_epoch(self._ctx.epoch_size)))
        epoch = self._step // self._steps_per_epoch
        if self._step % self._steps_per_epoch == 0 and self._current is not None:
            self._epoch_stats.append(self._current)
            self._current = None
        self._step += 1
        self._train_inference(params, batch)
        if epoch < int(self.warmup_epochs) or float(self.gamma) == 0.0:
            return None
        probs = torch.softmax(batch.logits(params), dim=-1)
        frozen = self.inference_params(detach=True)  # h is a constant for f's step
        z = inference_logits(params=frozen, probs=probs, labels=batch.y)
        return privacy_penalty(member_logits=z, gamma=float(self.gamma), mask=batch.mask)

    def report(self, result) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "gamma": float(self.gamma),
            "k": int(self.k),
            "reference_records": int(getattr(self, "reference_records_", 0)),
            "warmup_epochs": int(self.warmup_epochs),
            "attack_width": int(self.attack_width),
            "chance_gain": CHANCE_GAIN,
        }
        stats = list(getattr(self, "_epoch_stats", []))
        if getattr(self, "_current", None) is not None:
            stats.append(self._current)
        if stats:
            s = torch.stack(stats).cpu().numpy()  # [E, 3, M]
            per_model = s[:, :2] / np.maximum(s[:, 2:3], 1)  # [E, 2, M] means over the epoch's inner steps
            gain, acc = per_model[:, 0].mean(axis=1), per_model[:, 1].mean(axis=1)
            out["inference_gain"] = float(gain[-1])
            out["inference_accuracy"] = float(acc[-1])
            out["inference_gain_per_epoch"] = [round(float(v), 4) for v in gain]
            out["inference_accuracy_per_epoch"] = [round(float(v), 4) for v in acc]
            out["inference_params"] = int(self._flat.shape[1])
        if hasattr(self, "epochs_"):
            out["penalised_epochs"] = max(0, self.epochs_ - int(self.warmup_epochs)) if float(self.gamma) else 0
        self._ctx = self._members = self._reserved = None  # training is over: let the data go
        return out


__all__ = [
    "AdversarialRegularization",
    "CHANCE_GAIN",
    "inference_gain",
    "inference_logits",
    "inference_shapes",
    "init_inference_params",
    "membership_accuracy",
    "pack_inference_params",
    "privacy_penalty",
    "unpack_inference_params",
]
