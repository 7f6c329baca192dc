"""DP-SGD as a train-time defense: Poisson sampling, flat per-sample clipping, Gaussian noise, and
the privacy spent from Opacus' accountant (Abadi et al. 2016, Algorithm 1).

One optimizer step of model ``m`` (all ``M`` models at once, inside the trainer's ensemble):

1. Poisson sampling (:class:`~mia_core.engine.samplers.PoissonSampler`): each record of model
   ``m``'s training half is in the step's batch ``B_t`` independently with probability ``q``.
2. Per-sample gradients ``g_i = ∇_θ ℓ(θ_m; x_i)`` over all of the model's parameters (the
   trainer's ``torch.func`` path), clipped as one flat vector (Algorithm 1, "clip gradient"):
   ``ḡ_i = g_i · min(1, C / (‖g_i‖₂ + 1e-6))`` (:func:`clip_per_sample_`; the paper's
   ``g_i / max(1, ‖g_i‖₂ / C)`` with Opacus' ``1e-6`` guard, so ``‖ḡ_i‖₂ ≤ C`` always).
3. Noise ("add noise"): ``Σ_{i∈B_t} ḡ_i + N(0, σ² C² I)`` (:func:`add_gaussian_noise_`), drawn
   from model ``m``'s own noise generator.
4. The trainer divides by the sampler's denominator ``q · n_m``, the expected batch size of model
   ``m`` (Algorithm 1's lot size ``L = qN``; Opacus divides by ``int(q · N)``), and the recipe's
   optimizer (Adam or SGD) steps; any optimizer on the privatised gradient is post-processing.

The privacy spent is that of ``T`` compositions of the Poisson-subsampled Gaussian mechanism
with noise multiplier ``σ`` and rate ``q``, converted to ``(ε, δ)`` by Opacus' accountants:
Rényi DP (Mironov 2017; the sampled Gaussian's RDP of Mironov, Talwar & Zhang 2019) or the
privacy random variable accountant (Gopi, Lee & Wutschitz 2021) (:func:`privacy_spent`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from mia_core.base import TrainingDefense
from mia_core.engine.samplers import PoissonSampler

#: Opacus' accountants that :func:`privacy_spent` accepts.
ACCOUNTANTS = ("rdp", "prv")
#: ``σ`` when neither ``noise_multiplier`` nor ``target_epsilon`` is given.
DEFAULT_NOISE_MULTIPLIER = 1.0
#: The largest default ``δ`` (see :func:`default_delta`).
MAX_DEFAULT_DELTA = 1e-5
#: Opacus' guard in the clipping factor ``C / (‖g‖ + 1e-6)``.
CLIP_EPS = 1e-6


# ----------------------------------------------------------------------------- pure maths
def clip_per_sample_(grads: Dict[str, torch.Tensor], *, max_grad_norm: float) -> torch.Tensor:
    """Clip every sample's gradient, over all of its model's parameters, to L2 norm ``≤ C``, in place.

    Args:
        grads: per-sample gradients ``{name: Tensor[M, B, ...]}`` (model, sample, parameter
            shape); sample ``b`` of model ``m``'s gradient is the concatenation of
            ``grads[name][m, b]`` over every name (flat clipping, as Opacus' default).
        max_grad_norm: ``C > 0``.

    Returns:
        float ``[M, B]``: each sample's norm ``‖g_{m,b}‖₂`` before clipping. Each gradient is
        multiplied by ``min(1, C / (‖g‖₂ + 1e-6))``, exactly Opacus'
        ``DPOptimizer.clip_and_accumulate`` (Abadi et al. 2016, Algorithm 1 with a ``1e-6``
        guard); an all-zero row (a padding row of a ragged batch) is left zero.
    """
    if not grads:
        raise ValueError("the model has no parameters to clip")
    tensors = list(grads.values())
    m, b = tensors[0].shape[:2]
    for name, g in grads.items():
        if tuple(g.shape[:2]) != (m, b):
            raise ValueError(f"per-sample gradient {name!r} is {tuple(g.shape)}, expected [{m}, {b}, ...]")
    per_param = [g.reshape(m, b, -1).norm(2, dim=-1) for g in tensors]  # each [M, B]
    norms = torch.stack(per_param, dim=-1).norm(2, dim=-1)  # [M, B]
    factor = clip_factors(norms, max_grad_norm=max_grad_norm)
    for g in tensors:
        g.mul_(factor.view(m, b, *([1] * (g.dim() - 2))).to(g.dtype))
    return norms


def clip_factors(norms: torch.Tensor, *, max_grad_norm: float) -> torch.Tensor:
    """Opacus' per-sample clipping factors ``min(1, C / (‖g‖₂ + 1e-6))`` for the norms ``‖g‖₂``."""
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)


def add_gaussian_noise_(grads: Dict[str, torch.Tensor], *, std: float, generators: Sequence[torch.Generator]) -> None:
    """Add ``N(0, std² I)`` to every model's summed gradient, in place.

    Args:
        grads: ``{name: Tensor[M, ...]}``, the gradients summed over each model's batch.
        std: ``σ C >= 0`` (0 adds nothing and draws nothing).
        generators: ``M`` torch generators on the tensors' device; model ``m``'s noise is one flat
            standard-normal draw from ``generators[m]`` of all its coordinates (in the order of
            ``grads``), so it depends on no other model (a shard gets the same noise).
    """
    if std == 0 or not grads:
        return
    tensors = list(grads.values())
    n_models = tensors[0].shape[0]
    if len(generators) != n_models:
        raise ValueError(f"need one generator per model: {n_models} models, {len(generators)} generators")
    sizes = [g[0].numel() for g in tensors]
    total = sum(sizes)
    like = tensors[0]
    for m, gen in enumerate(generators):
        z = torch.randn(total, generator=gen, dtype=like.dtype, device=like.device).mul_(std)
        for g, chunk in zip(tensors, torch.split(z, sizes)):
            g[m].add_(chunk.view_as(g[m]))


def _accountant(name: str):
    from opacus.accountants import PRVAccountant, RDPAccountant

    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {name!r}")
    return RDPAccountant() if name == "rdp" else PRVAccountant()


def privacy_spent(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  accountant: str = "rdp") -> float:
    """``ε`` at ``δ`` after ``steps`` steps of the Poisson-subsampled Gaussian mechanism.

    Opacus' accountant does the analysis: ``RDPAccountant`` (the sampled Gaussian's Rényi DP,
    Mironov, Talwar & Zhang 2019, composed over steps and converted to ``(ε, δ)``, Mironov 2017)
    or ``PRVAccountant`` (Gopi, Lee & Wutschitz 2021; an upper estimate within
    ``eps_error = 0.01``). The accountant records ``.step(noise_multiplier=σ, sample_rate=q)``
    ``steps`` times, then ``get_epsilon(delta)``.

    Args:
        noise_multiplier: ``σ >= 0``; sample_rate: ``q`` in ``(0, 1]``; steps: ``T >= 0``;
        delta: ``δ`` in ``(0, 1)``; accountant: ``"rdp"`` or ``"prv"``.

    Returns:
        ``ε`` (float): ``0.0`` when ``T = 0`` (nothing was released), ``inf`` when ``σ = 0``
        (no noise, no finite guarantee).
    """
    acc = _accountant(accountant)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    for _ in range(int(steps)):
        acc.step(noise_multiplier=float(noise_multiplier), sample_rate=float(sample_rate))
    return float(acc.get_epsilon(delta=float(delta)))


def composed_privacy_spent(*, segments: Sequence[Tuple[float, float, int]], delta: float,
                           accountant: str = "rdp") -> float:
    """``ε`` at ``δ`` after consecutive runs of the subsampled Gaussian mechanism, each
    ``(noise_multiplier σ, sample_rate q, steps T)``: one Opacus accountant steps through them all
    in order (adaptive composition of the same mechanism at possibly different ``σ``).

    Returns:
        ``ε``; ``inf`` when any segment with steps has ``σ = 0``; ``0.0`` with no steps at all.
    """
    acc = _accountant(accountant)
    total = 0
    for sigma, q, steps in segments:
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps!r}")
        if steps and sigma == 0:
            return math.inf
        for _ in range(int(steps)):
            acc.step(noise_multiplier=float(sigma), sample_rate=float(q))
        total += int(steps)
    return float(acc.get_epsilon(delta=float(delta))) if total else 0.0


def noise_for_epsilon(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      accountant: str = "rdp") -> float:
    """The noise multiplier ``σ`` whose ``ε`` after ``steps`` steps at rate ``q`` is at most
    ``target_epsilon`` (within Opacus' ``epsilon_tolerance = 0.01`` below it): Opacus'
    ``get_noise_multiplier``, given the exact number of steps the trainer takes (Opacus' ``epochs=``
    form assumes ``int(epochs / q)``).

    Raises:
        ValueError: no ``σ ≤ 10⁶`` reaches ``target_epsilon`` (one line, with the inputs).
    """
    from opacus.accountants.utils import get_noise_multiplier

    _accountant(accountant)
    if steps <= 0:
        return 0.0
    try:
        with warnings.catch_warnings():  # the search visits orders at the edge of Opacus' alpha grid
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(get_noise_multiplier(target_epsilon=float(target_epsilon), target_delta=float(delta),
                                              sample_rate=float(sample_rate), steps=int(steps),
                                              accountant=accountant))
    except ValueError as exc:
        raise ValueError(f"target_epsilon={target_epsilon} cannot be reached at delta={delta:g} with sampling "
                         f"rate {sample_rate:.4g} over {steps} steps (Opacus: {exc})") from None


def default_delta(n_train: int) -> float:
    """The default ``δ``: ``1 / n`` rounded down to a power of ten, and at most ``1e-5``.

    ``n`` is the number of records a model trains on (the largest training half). ``δ ≤ 1/n``
    is the usual requirement (a mechanism that publishes one random record in full is
    ``(0, 1/n)``-DP); ``1e-5`` is the value of Abadi et al. (MNIST, n = 60 000) and of Opacus'
    examples, and caps ``δ`` well below ``1/n`` for small data sets such as digits (n ≈ 900).
    """
    n = int(n_train)
    if n < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train!r}")
    return min(MAX_DEFAULT_DELTA, 10.0 ** -math.ceil(math.log10(n)))


def unsupported_layers(module: torch.nn.Module) -> List[str]:
    """Layers the trainer's per-sample path cannot give a per-sample gradient for, one line each.

    The path (:func:`mia_core.engine.ensemble.per_sample_gradients`) runs every sample alone
    through ``torch.func.grad`` inside ``vmap``, so any layer that treats samples independently
    works without a per-layer rule (unlike Opacus' hooks). These do not:

    * batch normalisation (``_BatchNorm``, ``SyncBatchNorm``): it mixes the samples of a batch, so
      one sample's gradient is undefined (Opacus' ``ModuleValidator`` rejects it too); alone, a
      sample fails with "Expected more than 1 value per channel";
    * instance normalisation with ``track_running_stats``: its running statistics are updated in
      place by every sample;
    * dropout: it draws random numbers inside ``vmap``, which runs with ``randomness="error"``.
    """
    from torch import nn

    out = []
    for name, mod in module.named_modules():
        label = f"{name or '<root>'} ({type(mod).__name__})"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            out.append(f"{label}: batch normalisation mixes the samples of a batch, so per-sample gradients "
                       f"are undefined; use GroupNorm or LayerNorm")
        elif isinstance(mod, nn.modules.instancenorm._InstanceNorm) and mod.track_running_stats:
            out.append(f"{label}: running statistics are updated by every sample; set track_running_stats=False")
        elif isinstance(mod, (nn.modules.dropout._DropoutNd,)):
            out.append(f"{label}: dropout draws random numbers inside torch.func.vmap (randomness='error')")
    return out


# ----------------------------------------------------------------------------- the plugin
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class DPSGD(TrainingDefense):
    """DP-SGD: per-sample clipping to C and Gaussian noise σC under Poisson sampling, ε by Opacus (Abadi et al. 2016).

    Every model of the population is trained with DP-SGD (Abadi et al. 2016, Algorithm 1): the
    trainer samples each model's batches from its own training half by Poisson sampling with
    rate ``q``, computes per-sample gradients, clips each sample's gradient (all parameters of
    its model as one vector) to L2 norm ``C``, sums them, adds ``N(0, σ²C²I)`` from the model's
    own noise stream, and divides by the expected batch size ``q · n_m`` before the recipe's
    optimizer steps. The report gives ``(ε, δ)`` from Opacus' accountant for the ``T`` steps
    actually taken (see :func:`privacy_spent`).

    One ``q`` for all models: the sampler is population-level (so shards train the same models),
    hence every model has the same ``q`` and ``T`` and the same ``ε`` (the report gives the
    maximum over models, which is that value). Model ``m``'s half has ``n_m`` records, so its
    expected batch is ``q · n_m``, what the trainer divides by (Opacus divides by ``int(q·N)``).

    Deviations from the paper: the optimizer is the recipe's (Adam by default, i.e. DP-Adam;
    the paper uses SGD) and sees the privatised gradient only, which is post-processing; the
    clipping factor has Opacus' ``1e-6`` guard. A gradient of a ``penalty`` of another defense
    (weight decay) is added unclipped and un-noised, as Opacus treats an optimizer's weight decay;
    it depends on the parameters only. Fine-tuning by a post-training defense
    (``DefenseContext.finetune``) runs further DP-SGD steps whose privacy is not in this report.

    Args:
        noise_multiplier: ``σ >= 0`` (0: clipping only, no guarantee). Give this or
            ``target_epsilon``, not both; neither means ``σ = 1.0``.
        target_epsilon: the ``ε`` to reach after training: ``σ`` is found by Opacus'
            ``get_noise_multiplier`` for the exact ``q``, step count and ``δ``.
        max_grad_norm: ``C > 0``, the per-sample clipping norm.
        delta: ``δ`` in ``(0, 1)``; default ``1/n`` rounded down to a power of ten, at most
            ``1e-5`` (``n`` the largest training half; :func:`default_delta`).
        sampling_rate: ``q`` in ``(0, 1]``; default the recipe's (``--sampler poisson`` with its
            ``sampling_rate``), else ``batch_size`` over the largest training half.
        accountant: ``rdp`` (Rényi DP) or ``prv`` (privacy random variables, tighter).
    """

    api_version = "1.0"
    stage = "train"
    per_sample_gradients = True
    reference = (
        "M. Abadi, A. Chu, I. Goodfellow, H. B. McMahan, I. Mironov, K. Talwar, L. Zhang. Deep Learning "
        "with Differential Privacy. ACM CCS 2016 (Algorithm 1); I. Mironov. Renyi Differential Privacy. "
        "IEEE CSF 2017; I. Mironov, K. Talwar, L. Zhang. Renyi Differential Privacy of the Sampled Gaussian "
        "Mechanism. arXiv:1908.10530, 2019; S. Gopi, Y. T. Lee, L. Wutschitz. Numerical Composition of "
        "Differential Privacy. NeurIPS 2021 (PRV accountant); accountants from Opacus (Yousefpour et al., 2021)"
    )

    def __init__(
        self,
        noise_multiplier: Optional[float] = None,
        target_epsilon: Optional[float] = None,
        max_grad_norm: float = 1.0,
        delta: Optional[float] = None,
        sampling_rate: Optional[float] = None,
        accountant: Literal["rdp", "prv"] = "rdp",
    ):
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.max_grad_norm = max_grad_norm
        self.delta = delta
        self.sampling_rate = sampling_rate
        self.accountant = accountant

    def validate(self) -> None:
        s, e = self.noise_multiplier, self.target_epsilon
        if s is not None and not (_number(s) and s >= 0):
            raise ValueError(f"noise_multiplier must be a finite number >= 0 (sigma), got {s!r}")
        if e is not None and not (_number(e) and e > 0):
            raise ValueError(f"target_epsilon must be a finite number > 0, got {e!r}")
        if s is not None and e is not None:
            raise ValueError(f"give noise_multiplier or target_epsilon, not both (got noise_multiplier={s!r}, "
                             f"target_epsilon={e!r})")
        c = self.max_grad_norm
        if not (_number(c) and c > 0):
            raise ValueError(f"max_grad_norm must be a finite number > 0 (the clipping norm C), got {c!r}")
        d = self.delta
        if d is not None and not (_number(d) and 0 < d < 1):
            raise ValueError(f"delta must be in (0, 1) or none (default: min(1e-5, 1/n rounded down to a power "
                             f"of 10)), got {d!r}")
        q = self.sampling_rate
        if q is not None and not (_number(q) and 0 < q <= 1):
            raise ValueError(f"sampling_rate must be in (0, 1] or none (default: batch_size / training half), got {q!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")

    # ------------------------------------------------------------------ hooks
    def check_model(self, module) -> None:
        """Refuse, before training, a model with a layer that has no per-sample gradient."""
        bad = unsupported_layers(module)
        if bad:
            raise ValueError(f"dp-sgd needs per-sample gradients, which layer {bad[0]}")

    def configure(self, ctx) -> None:
        self.validate()
        if ctx.module is not None:  # also when training is driven without the engine's check
            self.check_model(ctx.module)
        if self.sampling_rate is not None:
            q = float(self.sampling_rate)
        elif isinstance(ctx.sampler, PoissonSampler):  # the recipe's own Poisson rate
            q = ctx.sampler.rate(ctx.epoch_size)
        else:
            q = PoissonSampler(batch_size=ctx.recipe.batch_size).rate(ctx.epoch_size)
        self.sampler_ = PoissonSampler(q)
        ctx.sampler = self.sampler_
        self.sample_rate_ = q
        self.epoch_size_ = int(ctx.epoch_size)
        self.train_sizes_ = np.asarray(ctx.train_sizes, dtype=np.int64)
        self.planned_steps_ = int(ctx.epochs) * self.sampler_.steps_per_epoch(ctx.epoch_size)
        self.delta_ = float(self.delta) if self.delta is not None else default_delta(ctx.epoch_size)
        if self.target_epsilon is not None:
            self.noise_multiplier_ = noise_for_epsilon(target_epsilon=self.target_epsilon, delta=self.delta_,
                                                       sample_rate=q, steps=self.planned_steps_,
                                                       accountant=self.accountant)
        elif self.noise_multiplier is not None:
            self.noise_multiplier_ = float(self.noise_multiplier)
        else:
            self.noise_multiplier_ = DEFAULT_NOISE_MULTIPLIER
        self._checked = False
        self._stats: Optional[torch.Tensor] = None  # on the device, read once in report()

    def transform_per_sample(self, grads, mask, step) -> None:
        """Flat clipping of every sample's gradient to ``C`` (:func:`clip_per_sample_`)."""
        with torch.no_grad():  # the trainer's per-sample gradients may carry autograd history: record none
            self._count(clip_per_sample_(grads, max_grad_norm=float(self.max_grad_norm)), mask)

    def per_sample_factors(self, norms, mask, step):
        """The same clipping as factors of the per-sample norms, ``min(1, C / (‖g‖₂ + 1e-6))``
        (:func:`clip_factors`), for the trainer's route that never materialises per-sample
        gradients."""
        self._count(norms, mask)
        return clip_factors(norms, max_grad_norm=float(self.max_grad_norm))

    def _count(self, norms, mask) -> None:
        c = float(self.max_grad_norm)
        real = mask.to(norms.dtype)
        stats = torch.stack([((norms > c).to(norms.dtype) * real).sum(), real.sum(), (norms * real).sum()])
        self._stats = stats if self._stats is None else self._stats.add_(stats)  # [clipped, seen, norm sum]

    def transform_batch(self, grads, step) -> None:
        """``+ N(0, σ²C²I)`` per model from ``step.generators[m]`` (:func:`add_gaussian_noise_`)."""
        if not self._checked:  # once per run: the trainer must divide by Poisson's q * n_m
            expected = self.sample_rate_ * self.train_sizes_.astype(np.float64)
            got = step.denominator.detach().to("cpu", torch.float64).numpy()
            if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-6, atol=0):
                raise ValueError(f"dp-sgd set Poisson sampling with q={self.sample_rate_:.4g}, but the trainer divides "
                                 f"by {got.tolist()[:4]} instead of q * n_m; a later train-time defense replaced the "
                                 f"batch sampler (give dp-sgd last)")
            self._checked = True
        with torch.no_grad():
            add_gaussian_noise_(grads, std=self.noise_multiplier_ * float(self.max_grad_norm), generators=step.generators)

    def report(self, result) -> Dict[str, Any]:
        sigma, c, q, delta = self.noise_multiplier_, float(self.max_grad_norm), self.sample_rate_, self.delta_
        if result.sampler != "poisson":
            raise ValueError(f"dp-sgd's accounting assumes Poisson sampling, but training used {result.sampler!r}")
        rates = np.unique(self.sampler_.sampling_rates(self.epoch_size_, self.train_sizes_))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            eps = max(privacy_spent(noise_multiplier=sigma, sample_rate=float(r), steps=result.steps, delta=delta,
                                    accountant=self.accountant) for r in rates)
        caught = sorted({str(w.message) for w in seen})
        expected_batch = q * self.train_sizes_.astype(np.float64)
        out: Dict[str, Any] = {
            "epsilon": eps if math.isfinite(eps) else None,
            "delta": delta,
            "accountant": self.accountant,
            "noise_multiplier": sigma,
            "target_epsilon": None if self.target_epsilon is None else float(self.target_epsilon),
            "max_grad_norm": c,
            "noise_std": sigma * c,
            "sampling_rate": q,
            "sampling_rates": [float(r) for r in rates],  # per model (fixed batch budget over its own half)
            "steps": int(result.steps),
            "epochs": int(result.epochs),
            "expected_batch_size_min": float(expected_batch.min()),
            "expected_batch_size_max": float(expected_batch.max()),
            "clipping": "flat: all parameters of a model, per sample",
        }
        if not math.isfinite(eps):
            out["epsilon_note"] = "noise_multiplier=0: no differential-privacy guarantee (epsilon is infinite)"
        if caught:
            out["accountant_warnings"] = caught
        if self._stats is not None and float(self._stats[1]) > 0:
            clipped, seen, norm_sum = self._stats.detach().to("cpu", torch.float64).tolist()
            out["clipped_fraction"] = clipped / seen  # of the real per-sample gradients, over training
            out["grad_norm_mean"] = norm_sum / seen  # their mean L2 norm before clipping
        return out

    def compose(self, reports: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
        """Training, then each fine-tuning run (a post-training defense's ``finetune_epochs``,
        every grid point of a pruning search): the privacy of the released models is the
        composition of every noisy step they took. One accountant steps through the segments in
        order, each at its own ``σ`` (a ``target_epsilon`` sets ``σ`` per run), at each model's
        sampling rate; ``epsilon`` is the largest over the models' rates, and the training-only
        value stays as ``epsilon_training_only``."""
        first = reports[0]
        later = reports[1:]
        ft = sum(int(r["steps"]) for r in later)
        out = {**first, "epsilon_training_only": first.get("epsilon"), "steps_finetuning": ft,
               "finetuning_runs": len(later)}
        if first.get("epsilon") is None or any(r.get("epsilon") is None and int(r["steps"]) for r in later):
            out["epsilon"] = None  # a segment without noise: no finite guarantee
            return out
        rates = first.get("sampling_rates") or next((r["sampling_rates"] for r in later if r.get("sampling_rates")),
                                                    [first["sampling_rate"]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps = max(composed_privacy_spent(
                segments=[(float(r["noise_multiplier"]), float(rate), int(r["steps"])) for r in reports],
                delta=float(first["delta"]), accountant=first.get("accountant", self.accountant)) for rate in rates)
        out["epsilon"] = eps if math.isfinite(eps) else None
        return out


__all__ = [
    "ACCOUNTANTS",
    "DPSGD",
    "add_gaussian_noise_",
    "composed_privacy_spent",
    "clip_factors",
    "clip_per_sample_",
    "default_delta",
    "noise_for_epsilon",
    "privacy_spent",
    "unsupported_layers",
]
