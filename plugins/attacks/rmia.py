"""RMIA: the relative membership inference attack of Zarifzadeh, Liu and Shokri (ICML 2024).

The maths are pure keyword-only functions of numpy arrays (shapes: ``R`` reference models, ``N``
records, ``C`` classes, ``Z`` population records); :class:`RMIA` is a thin wrapper around them.
Everything works in log space: ``log Pr(x|θ)`` is read from the exact per-record loss, so a
probability that underflows float64 still has a finite log and every likelihood ratio is finite.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy import special

from mia_core import metrics
from mia_core.base import Attack
from mia_core.params import check_n_references

#: Values of ``a`` tried when the offline ``a`` is tuned (the authors' code sweeps 0, 0.1, ..., 1).
OFFLINE_A_GRID: Tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))

_LOG2 = math.log(2.0)


# ----------------------------------------------------------------------------- signals
def true_label_log_prob(*, loss, probs=None, labels=None, temperature: float = 1.0) -> np.ndarray:
    """``log Pr(x|θ)``: the log of the softmax probability of the true label, at temperature ``T``.

    RMIA (Sec. 3) uses ``Pr(x|θ)`` = the model's probability of the record's true label; the
    authors' code optionally divides the logits by a temperature first. ``softmax(z / T)`` is a
    function of the probability vector alone, since ``log p_c = z_c - logsumexp(z)``:

        log softmax(z / T)_y = log p_y / T - logsumexp_c(log p_c / T).

    Args:
        loss: float ``[..., N]``, the cross-entropy ``-log p_y`` (exact even where ``p_y`` rounds
            to 0, so the result is always finite).
        probs: float ``[..., N, C]`` softmax outputs; needed only when ``temperature != 1``.
        labels: int ``[N]`` true labels; needed only when ``temperature != 1``.
        temperature: ``T > 0``. With ``T != 1`` a class probability that underflowed to 0 in
            ``probs`` (``log p_c < -745``) counts as 0, which is exact for ``T`` up to about 10.

    Returns:
        float64 ``[..., N]``.
    """
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    log_py = -np.asarray(loss, dtype=np.float64)
    if t == 1.0:
        return log_py
    if probs is None or labels is None:
        raise ValueError("temperature != 1 needs probs [..., N, C] and labels [N]")
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.shape[:-1] != log_py.shape or y.shape != (p.shape[-2],):
        raise ValueError(f"probs must be [..., N, C] matching loss {log_py.shape} and labels [N]; "
                         f"got probs {p.shape}, labels {y.shape}")
    with np.errstate(divide="ignore"):
        logp = np.log(p)
    idx = np.broadcast_to(y[:, None], p.shape[:-1] + (1,))
    np.put_along_axis(logp, idx, log_py[..., None], axis=-1)  # the exact true-label term
    logp /= t
    return log_py / t - special.logsumexp(logp, axis=-1)


# ----------------------------------------------------------------------------- Pr(x)
def _log_masked_mean(log_p: np.ndarray, mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``log mean(exp(log_p[mask[:, j], j]))`` per column, and the counts."""
    n = mask.sum(axis=0)
    with np.errstate(divide="ignore"):
        lse = special.logsumexp(np.where(mask, log_p, -np.inf), axis=0)
        return lse - np.log(np.maximum(n, 1)), n


def _check_ref(log_p_ref, ref_in):
    lp = np.asarray(log_p_ref, dtype=np.float64)
    k = np.asarray(ref_in, dtype=bool)
    if lp.ndim != 2 or lp.shape != k.shape:
        raise ValueError(f"log_p_ref and ref_in must both be [R, N]; got {lp.shape} and {k.shape}")
    return lp, k


def log_marginal_online(*, log_p_ref, ref_in) -> np.ndarray:
    """Online ``log Pr(x)``: the mean of ``Pr(x|θ')`` over reference models of which half trained
    on ``x`` (Sec. 3: ``Pr(x) = Σ_θ' Pr(x|θ') Pr(θ')``, estimated on reference models trained on
    random halves of the population, so half IN and half OUT for each ``x``):

        Pr(x) = ½ (mean_IN Pr(x|θ') + mean_OUT Pr(x|θ')).

    The IN and OUT means are weighted equally, which equals the plain mean over all reference
    models whenever a record has as many IN as OUT references (always, in miafw's paired game).

    Args:
        log_p_ref: float ``[R, N]``, ``log Pr(x|θ')`` of every reference model on every record.
        ref_in: bool ``[R, N]``, which reference models trained on which record.

    Returns:
        float64 ``[N]``.

    Raises:
        ValueError: a record without an IN or without an OUT reference model.
    """
    lp, k = _check_ref(log_p_ref, ref_in)
    log_in, n_in = _log_masked_mean(lp, k)
    log_out, n_out = _log_masked_mean(lp, ~k)
    if lp.shape[1] and (n_in.min() < 1 or n_out.min() < 1):
        raise ValueError("online RMIA needs at least one IN and one OUT reference model for every record "
                         f"(smallest: {int(n_in.min())} IN, {int(n_out.min())} OUT)")
    return np.logaddexp(log_in, log_out) - _LOG2


def log_marginal_offline(*, log_p_ref, ref_in, a: float) -> np.ndarray:
    """Offline ``log Pr(x)`` from OUT reference models only (the paper's offline approximation):
    ``Pr_IN(x)`` is approximated as ``a · Pr_OUT(x) + (1 - a)``, so

        Pr(x) = ½ (Pr_IN(x) + Pr_OUT(x)) = ½ ((1 + a) · Pr_OUT(x) + (1 - a)),

    with ``Pr_OUT(x)`` the mean of ``Pr(x|θ')`` over the reference models that did not train on
    ``x``. ``a = 1`` uses ``Pr_OUT`` alone; smaller ``a`` assumes IN models gain more.

    Args:
        log_p_ref: float ``[R, N]``; ref_in: bool ``[R, N]`` (IN entries are ignored).
        a: in ``[0, 1]``.

    Returns:
        float64 ``[N]``.

    Raises:
        ValueError: ``a`` outside ``[0, 1]``, or a record without an OUT reference model.
    """
    a = float(a)
    if not (0.0 <= a <= 1.0):
        raise ValueError(f"offline a must be in [0, 1], got {a!r}")
    lp, k = _check_ref(log_p_ref, ref_in)
    log_out, n_out = _log_masked_mean(lp, ~k)
    if lp.shape[1] and n_out.min() < 1:
        raise ValueError("offline RMIA needs at least one OUT reference model for every record")
    with np.errstate(divide="ignore"):  # a = 1: log(1 - a) = -inf, and logaddexp ignores it
        return np.logaddexp(math.log1p(a) + log_out, math.log1p(-a) if a < 1 else -np.inf) - _LOG2


# ----------------------------------------------------------------------------- pairwise dominance
def _check_dominance_args(log_ratio_x, log_ratio_z, gamma, self_index):
    lx = np.asarray(log_ratio_x, dtype=np.float64)
    lz = np.asarray(log_ratio_z, dtype=np.float64)
    if lx.ndim != 1 or lz.ndim != 1:
        raise ValueError(f"log_ratio_x and log_ratio_z must be 1-D; got shapes {lx.shape} and {lz.shape}")
    if np.isnan(lx).any() or np.isnan(lz).any():
        raise ValueError("log ratios must not be NaN")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    si = None
    if self_index is not None:
        si = np.asarray(self_index)
        if si.shape != lx.shape or not np.issubdtype(si.dtype, np.integer):
            raise ValueError(f"self_index must be an integer array shaped like log_ratio_x {lx.shape}, "
                             f"got {si.dtype} {si.shape}")
        si = si.astype(np.int64)
        if si.size and (si.min() < -1 or si.max() >= lz.size):
            raise ValueError(f"self_index entries must be -1 (not in the population) or in [0, {lz.size}), "
                             f"got range [{si.min()}, {si.max()}]")
    return lx, lz, math.log(gamma), si


def dominance_fraction(*, log_ratio_x, log_ratio_z, gamma: float, self_index=None) -> np.ndarray:
    """RMIA's score: the fraction of population records ``z`` that ``x`` dominates,

        Score(x) = Pr_{z ∈ Z} [ LR(x, z) ≥ γ ],  LR(x, z) = (Pr(x|θ) / Pr(x)) / (Pr(z|θ) / Pr(z)),

    (Sec. 3, the pairwise likelihood ratio and the score thresholded at ``β``), from the log
    ratios ``log r = log Pr(·|θ) - log Pr(·)``. In ``O((N + Z) log Z)`` time and ``O(N + Z)``
    memory: ``LR(x, z) ≥ γ`` iff ``log r_z ≤ log r_x - log γ``, so the count is one binary search
    (:func:`numpy.searchsorted`, ``side="right"``) of ``log r_x - log γ`` in the sorted
    ``log r_z`` — never an ``N × Z`` matrix (:func:`dominance_fraction_dense` is that reference).

    The comparison is inclusive (``≥ γ``: a ``z`` exactly at the threshold counts) and is decided
    as ``log r_z <= fl(log r_x - log γ)`` in float64. With ``γ = 1`` (``log γ = 0``) that is
    exactly ``r_z <= r_x`` on the log ratios, ties included. With ``γ != 1`` it can differ from
    the other rounding, ``fl(log r_x - log r_z) >= fl(log γ)``, only for pairs whose log ratios
    are within an ulp of being exactly ``log γ`` apart; both roundings are monotone in ``r_z``,
    so neither reorders records.

    Args:
        log_ratio_x: float ``[N]``, ``log(Pr(x|θ) / Pr(x))`` of the records scored.
        log_ratio_z: float ``[Z]``, the same for the population records.
        gamma: ``γ > 0``.
        self_index: optional int ``[N]``: ``self_index[i]`` is the position of record ``i`` in the
            population (``-1`` if it is not in it). That pair (``LR(x, x) = 1``) is left out of
            both the count and the denominator, which is then ``Z - 1``. Without it every record
            is treated as outside the population.

    Returns:
        float64 ``[N]`` in ``[0, 1]``; ``0`` for a record whose population is empty (``Z = 0``,
        or ``Z = 1`` holding only the record itself).

    Raises:
        ValueError: NaN log ratios, ``γ`` not a finite number ``> 0``, or a malformed ``self_index``.
    """
    lx, lz, log_gamma, si = _check_dominance_args(log_ratio_x, log_ratio_z, gamma, self_index)
    threshold = lx - log_gamma
    counts = np.searchsorted(np.sort(lz), threshold, side="right").astype(np.int64)
    denom = np.full(lx.shape, lz.size, dtype=np.int64)
    if si is not None:
        inside = si >= 0
        # the record's own entry was counted iff it passes the same test the search applied to it
        counts[inside] -= (lz[si[inside]] <= threshold[inside]).astype(np.int64)
        denom[inside] -= 1
    out = np.zeros(lx.shape, dtype=np.float64)
    np.divide(counts, denom, out=out, where=denom > 0)
    return out


def dominance_fraction_dense(*, log_ratio_x, log_ratio_z, gamma: float, self_index=None) -> np.ndarray:
    """:func:`dominance_fraction` computed on the full ``N × Z`` comparison matrix: the reference
    implementation (``O(N · Z)`` time and memory: a bool byte per pair), for tests and benchmarks.
    Same arguments, same result."""
    lx, lz, log_gamma, si = _check_dominance_args(log_ratio_x, log_ratio_z, gamma, self_index)
    dominated = lz[None, :] <= (lx - log_gamma)[:, None]  # [N, Z]
    denom = np.full(lx.shape, lz.size, dtype=np.int64)
    if si is not None:
        rows = np.flatnonzero(si >= 0)
        dominated[rows, si[rows]] = False
        denom[rows] -= 1
    counts = dominated.sum(axis=1)
    out = np.zeros(lx.shape, dtype=np.float64)
    np.divide(counts, denom, out=out, where=denom > 0)
    return out


# ----------------------------------------------------------------------------- offline a
def tune_offline_a(*, log_p_pseudo, member, log_p_ref, ref_in, population, self_index, gamma: float,
                   grid: Sequence[float] = OFFLINE_A_GRID) -> Tuple[float, np.ndarray]:
    """Choose the offline ``a`` as the authors' method write-up describes it: attack a reference
    model whose membership is known (the pseudo-target) with offline RMIA on the remaining
    reference models, for every ``a`` of ``grid``, and keep the ``a`` with the highest AUC (the
    first on ties). The pseudo-target's complementary partner is left out of its references, as
    the engine leaves out every target's; the authors' library instead attacks the target's
    partner with a single reference model.

    Args:
        log_p_pseudo: float ``[N]``, ``log Pr(x|θ_pseudo)`` of the pseudo-target on every record.
        member: bool ``[N]``, the pseudo-target's training set.
        log_p_ref, ref_in: ``[R, N]`` of the remaining reference models (not the pseudo-target's
            complementary partner, whose membership is the pseudo-target's complement and would
            not be available to the real attack).
        population: int ``[Z]`` record indices of the population; self_index: int ``[N]`` (see
            :func:`dominance_fraction`); gamma: ``γ``.
        grid: candidate values of ``a`` in ``[0, 1]``.

    Returns:
        ``(a, aucs)``: the chosen ``a`` and the AUC of every grid value, float ``[len(grid)]``.
    """
    lp_pseudo = np.asarray(log_p_pseudo, dtype=np.float64)
    member = np.asarray(member, dtype=bool)
    population = np.asarray(population, dtype=np.int64)
    if not len(grid):
        raise ValueError("grid must hold at least one value of a")
    aucs = np.empty(len(grid))
    for i, a in enumerate(grid):
        lr = lp_pseudo - log_marginal_offline(log_p_ref=log_p_ref, ref_in=ref_in, a=a)
        s = dominance_fraction(log_ratio_x=lr, log_ratio_z=lr[population], gamma=gamma, self_index=self_index)
        aucs[i] = metrics.auc(s, member)
    return float(grid[int(np.argmax(aucs))]), aucs


# ----------------------------------------------------------------------------- the plugin
def _is_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)


def _is_count(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer))


class RMIA(Attack):
    """Relative membership inference (Zarifzadeh, Liu, Shokri: "Low-Cost High-Power Membership
    Inference Attacks", ICML 2024).

    RMIA compares the target's likelihood ratio on ``x`` with that on population records ``z``:

        LR(x, z) = (Pr(x|θ) / Pr(x)) / (Pr(z|θ) / Pr(z)),   score(x) = Pr_{z ∈ Z} [LR(x, z) ≥ γ]

    (Sec. 3), where ``Pr(·|θ)`` is the target's softmax probability of the true label (at
    ``temperature``) and ``Pr(·)`` its average over reference models: online, the mean of the IN
    and OUT means (:func:`log_marginal_online`); offline, ``½((1 + a) Pr_OUT + (1 - a))``
    (:func:`log_marginal_offline`). The count runs in ``O((N + Z) log Z)`` by sorting and binary
    search (:func:`dominance_fraction`).

    **The population Z.** The paper draws ``z`` from population data; miafw has no held-out set:
    every record is a member of the target with probability ½ and the attacker does not know
    which, so Z is drawn from the records themselves, each record's own pair left out of its
    count. The default is every record (``population_size`` unset): the authors' code compares
    each ``x`` with all of its population samples by default (there the target's non-members,
    which an attacker here cannot know); more ``z`` only refines the score, at the cost of a sort.
    The members inside Z do not bias the ranking, because with Z fixed

        score(x) = #{z ∈ Z \\ {x}: r_z ≤ r_x / γ} / |Z \\ {x}|,   r = Pr(·|θ) / Pr(·),

    is the population's empirical CDF at ``r_x / γ``: a non-decreasing step function of ``r_x``.
    For records scored against the same Z, γ therefore never reorders two of them — it only
    decides which records tie (those whose ``r_x / γ`` falls between the same two consecutive
    ``r_z``). With every record in Z,
    each record loses the same self pair and the same denominator, so the scores rank exactly as
    ``r_x`` does, and with ``γ = 1`` every distinct ratio gets a distinct score (the finest
    resolution). With a sampled Z, a record inside Z is scored on ``|Z| - 1`` pairs and one
    outside on ``|Z|``, which moves scores by less than ``1 / (|Z| - 1)`` between the two groups.
    ROC metrics therefore depend on Z and γ only through ties.

    Args:
        online: use IN and OUT reference models (True) or OUT models only (False).
        gamma: the threshold ``γ`` on ``LR(x, z)``, inclusive (``LR ≥ γ``, as the authors'
            method write-up defines it; their code compares strictly, ``>``, which differs only on
            exact ties). Default 1: with Z = every record it keeps the full ranking of ``r_x``.
            The authors' experiment configs use 2 and their library compares against 1; neither
            changes the order (see above).
        offline_a: the offline ``a`` in ``[0, 1]``; unset: tuned per target as the authors describe, on
            a reference model taken as pseudo-target (the first model of the view's first
            reference pair) attacked with the other reference pairs, over ``a`` in 0, 0.1, ..., 1
            by AUC (:func:`tune_offline_a`; needs 2 reference pairs). Online only: must be unset.
        temperature: softmax temperature ``T`` for ``Pr(x|θ)``. Default 1, the paper's definition
            (softmax probability of the true label); the authors' experiment configs use ``T = 2``
            with a Taylor soft-margin softmax, which is not implemented here.
        n_references: reference budget (``None``: all ``M - 2``); a reproducible subset of whole
            reference pairs (see :meth:`~mia_core.engine.contexts.AttackContext.for_target`).
            Online: ``k`` even, ``k / 2`` IN and ``k / 2`` OUT per record; offline: ``k`` OUT.
        population_size: size of Z, a random subset of the records drawn once from the
            context's seed (the same Z for every target); unset: every record.

    Learned: ``population_`` (int ``[Z]``), ``offline_a_`` (``{target: a}``, the ``a`` used for
    each target scored offline).

    Not implemented from the paper: query augmentations with a majority vote over views, the
    Taylor / soft-margin variants of ``Pr(x|θ)``, and the trimmed mean of the authors' code (online,
    they take a 20%-trimmed mean over the IN and OUT references together, at most half the
    reference models of each; here ``Pr(x)`` is the plain average of the IN mean and the OUT mean).
    Checked against the authors' method write-up and code (privacytrustlab/ml_privacy_meter); the
    paper's own text beyond its abstract was not available here.
    """

    api_version = "1.0"

    access = ("probs",)
    min_reference_models = 2  # one IN and one OUT reference per record online (one pair)
    reference = (
        "S. Zarifzadeh, P. Liu, R. Shokri. Low-Cost High-Power Membership Inference Attacks. "
        "ICML 2024 (PMLR 235). arXiv:2312.03262"
    )

    def __init__(self, online: bool = True, gamma: float = 1.0, offline_a: Optional[float] = None,
                 temperature: float = 1.0, n_references: Optional[int] = None,
                 population_size: Optional[int] = None):
        self.online = online
        self.gamma = gamma
        self.offline_a = offline_a
        self.temperature = temperature
        self.n_references = n_references
        self.population_size = population_size

    def validate(self) -> None:
        if not isinstance(self.online, bool):
            raise ValueError(f"online must be true or false, got {self.online!r}")
        if not (_is_number(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be a finite number > 0 (the threshold on LR(x, z)), got {self.gamma!r}")
        if self.offline_a is not None:
            if not (_is_number(self.offline_a) and 0 <= self.offline_a <= 1):
                raise ValueError(f"offline_a must be a number in [0, 1] (or unset to tune it), got {self.offline_a!r}")
            if self.online:
                raise ValueError(f"offline_a={self.offline_a!r} applies only with online=false")
        if not (_is_number(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        check_n_references(self.n_references, even=self.online, online_option=True)
        if self.n_references is not None:
            if not self.online and self.offline_a is None and self.n_references < 2:
                raise ValueError("tuning offline_a needs n_references >= 2 (one reference pair as pseudo-target, "
                                 "the rest as references); give offline_a or a larger n_references")
        if self.population_size is not None and not (_is_count(self.population_size) and self.population_size >= 1):
            raise ValueError(f"population_size must be a positive integer (or unset for every record), "
                             f"got {self.population_size!r}")

    def reference_budget(self):
        """As :meth:`Attack.reference_budget`; tuning the offline ``a`` on all references needs at
        least two reference pairs (one as pseudo-target), so the engine refuses a smaller
        population before training."""
        if not self.online and self.offline_a is None and self.n_references is None:
            return 2, False
        return self.n_references, bool(self.online)

    def fit(self, ctx) -> "RMIA":
        self.validate()
        pairs = (ctx.n_models - 2) // 2  # reference pairs besides the target's
        if pairs < 1:
            raise ValueError(f"RMIA needs at least {self.min_reference_models} reference models besides the target "
                             f"and its partner (n_models >= {self.min_reference_models + 2}); "
                             f"got n_models={ctx.n_models}")
        if not self.online and self.offline_a is None and self.n_references is None and pairs < 2:
            raise ValueError(f"tuning offline_a needs 2 reference pairs (n_models >= 6); got n_models={ctx.n_models}; "
                             "give offline_a")
        n = ctx.n_records
        if self.population_size is None:
            self.population_ = np.arange(n, dtype=np.int64)
        else:
            if self.population_size > n:
                raise ValueError(f"population_size={self.population_size} exceeds the {n} records")
            rng = np.random.default_rng(np.random.SeedSequence([ctx.seed, 0x726D6961]))
            self.population_ = np.sort(rng.choice(n, size=self.population_size, replace=False)).astype(np.int64)
        self.self_index_ = np.full(n, -1, dtype=np.int64)
        self.self_index_[self.population_] = np.arange(self.population_.size)
        self.offline_a_ = {}
        self.ctx_ = ctx
        return self

    def _log_probs(self, view) -> Tuple[np.ndarray, np.ndarray]:
        """``log Pr(x|θ')`` of the references ``[R, N]`` and of the target ``[N]``."""
        if self.temperature == 1:
            return (true_label_log_prob(loss=view.ref_signal("loss")),
                    true_label_log_prob(loss=view.target_signal("loss")))
        labels = self.ctx_.labels
        return (true_label_log_prob(loss=view.ref_signal("loss"), probs=view.ref_signal("probs"), labels=labels,
                                    temperature=self.temperature),
                true_label_log_prob(loss=view.target_signal("loss"), probs=view.target_signal("probs"),
                                    labels=labels, temperature=self.temperature))

    def _tuned_a(self, target: int, view, lp_ref: np.ndarray) -> float:
        if target not in self.offline_a_:
            refs = np.asarray(view.references)
            pseudo = 0  # the first model of the first reference pair; its partner is left out
            rest = refs != (refs[pseudo] ^ 1)
            rest[pseudo] = False
            a, _ = tune_offline_a(log_p_pseudo=lp_ref[pseudo], member=view.ref_keep[pseudo], log_p_ref=lp_ref[rest],
                                  ref_in=view.ref_keep[rest], population=self.population_,
                                  self_index=self.self_index_, gamma=self.gamma)
            self.offline_a_[target] = a
        return self.offline_a_[target]

    def score(self, target: int, records: np.ndarray) -> np.ndarray:
        view = self.ctx_.for_target(target, n_references=self.n_references, online=self.online)
        records = np.asarray(records, dtype=np.int64)
        lp_ref, lp_target = self._log_probs(view)
        if self.online:
            log_px = log_marginal_online(log_p_ref=lp_ref, ref_in=view.ref_keep)
        else:
            a = self.offline_a if self.offline_a is not None else self._tuned_a(target, view, lp_ref)
            self.offline_a_[target] = float(a)
            log_px = log_marginal_offline(log_p_ref=lp_ref, ref_in=view.ref_keep, a=a)
        # every record's ratio first, then select: Z and each score do not depend on `records`
        log_ratio = lp_target - log_px
        return dominance_fraction(log_ratio_x=log_ratio[records], log_ratio_z=log_ratio[self.population_],
                                  gamma=self.gamma, self_index=self.self_index_[records])


__all__ = [
    "OFFLINE_A_GRID",
    "RMIA",
    "dominance_fraction",
    "dominance_fraction_dense",
    "log_marginal_offline",
    "log_marginal_online",
    "true_label_log_prob",
    "tune_offline_a",
]
