"""BaVarIA: Bayesian variance inference attack of Brännvall 2026 (LiRA with conjugate NIG priors).

Sources and what could be checked
---------------------------------
Only the abstract of the paper (arXiv:2603.11799v1) could be read here; its sections and equation
numbers could not, so no equation number of the paper is cited. What the abstract fixes: per-record
IN/OUT Gaussians (LiRA's model) with conjugate normal-inverse-gamma (NIG) priors in place of LiRA's
threshold switch between per-example and global variance; a Student-t posterior predictive
(BaVarIA-t) or a Gaussian with stabilized variance (BaVarIA-n); "no additional hyperparameter
tuning". The details below (the empirical-Bayes fit, the defaults kappa0 = 1 and alpha0 = 2 for -t
/ 1 for -n, the mean BaVarIA-n uses, the offline score) follow the author's public code demo
(github.com/rickardbrannvall/exponential-family-mia, ``methods.py``, which its README says
reproduces the paper's pipeline scores); the code here is written anew. The NIG algebra is the
textbook one (K. P. Murphy, "Conjugate Bayesian analysis of the Gaussian distribution", 2007, the
NIG sections; Gelman et al., *Bayesian Data Analysis*, 3rd ed., Sec. 3.3, in its
(nu, sigma^2) parametrization, nu = 2 alpha, sigma^2 = beta / alpha).

Model, per record j and side s in {IN, OUT} (Shapes: ``R`` reference models, ``N`` records)::

    sigma^2 ~ InvGamma(alpha0_s, beta0_s),  mu | sigma^2 ~ N(mu0_s, sigma^2 / kappa0),
    phi_mj | mu, sigma^2 ~ N(mu, sigma^2)   for the references m on side s of record j,

where phi is LiRA's logit-scaled confidence. The hyperparameters (mu0_s, beta0_s) are shared by
all records of a side and fitted on the whole reference population (empirical Bayes), so one or
two references per record suffice: the prior carries the variance the record's own references
cannot estimate.

What was measured here (README, "Reference budgets"): with the author's defaults (``kappa0 = 1``)
BaVarIA's TPR at 0.1% FPR stays at chance on the default digits population at every budget,
online and offline, although its online AUC with every reference matches LiRA's. The cause is
the conjugate coupling of mean and variance: the posterior scale ``beta_n`` gains
``kappa0 n (xbar - mu0)^2 / (2 kappa_n)``, so a record whose references sit far from the
population mean ``mu0`` — exactly the confidently fitted records the low-FPR tail is made of —
gets a wide predictive. With ``kappa0 = 0.01`` (a weak prior on the mean) the same population
gives BaVarIA-t online above LiRA at every budget and, with ``offline_test=one-sided``, offline
equal to LiRA's. That is reported as a diagnosis, not adopted as a default: the defaults are the
author's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Tuple

import numpy as np
from scipy import special

from mia_core.base import Attack
from mia_core.stats import gaussian_logpdf, normal_logsf
from mia_core.params import check_n_references

#: Smallest pooled variance the empirical-Bayes fit returns: keeps a side whose reference scores
#: all coincide (a single score, ties) from producing a zero scale and an infinite ratio.
MIN_PRIOR_VARIANCE = 1e-12

#: The author's defaults of alpha0 per variant (the -t prior predictive then has a finite
#: variance; the -n prior uses alpha0 = 1, beta0 = pooled variance).
DEFAULT_ALPHA0 = {"t": 2.0, "n": 1.0}


@dataclass(frozen=True)
class NIG:
    """Normal-inverse-gamma parameters: ``sigma^2 ~ InvGamma(alpha, beta)`` (shape, scale) and
    ``mu | sigma^2 ~ N(mu, sigma^2 / kappa)``. Floats (a prior) or float ``[N]`` (per-record
    posteriors), broadcastable against each other."""

    mu: np.ndarray
    kappa: np.ndarray
    alpha: np.ndarray
    beta: np.ndarray


def fit_nig_prior(*, values, kappa0: float, alpha0: float) -> NIG:
    """Empirical-Bayes NIG hyperparameters of one side (IN or OUT) from its pooled reference scores.

    Moment matching on every score of that side, over all records and reference models (the
    author's code; the paper's abstract says only that the priors are fitted on the population):

    * ``mu0 = mean(values)``;
    * ``beta0 = var(values) * (alpha0 - 1)`` so that the prior mean of the variance,
      ``E[sigma^2] = beta0 / (alpha0 - 1)``, is the pooled variance; for ``alpha0 <= 1`` that mean
      is infinite and ``beta0 = var(values)`` (the author's choice for BaVarIA-n's alpha0 = 1);
    * ``kappa0`` and ``alpha0`` are given (prior strengths in pseudo-observations: ``kappa0`` for
      the mean, ``2 alpha0`` for the variance).

    ``var`` is the population variance (ddof 0) of the pooled scores, i.e. across records as well
    as across reference models, as in the author's code, floored at :data:`MIN_PRIOR_VARIANCE`.

    Args:
        values: float, any shape: the side's reference scores (non-finite entries are ignored).
        kappa0, alpha0: positive prior strengths.

    Returns:
        a :class:`NIG` of floats.

    Raises:
        ValueError: no finite score, or a non-positive ``kappa0``/``alpha0``.
    """
    if not (kappa0 > 0 and alpha0 > 0):
        raise ValueError(f"kappa0 and alpha0 must be > 0, got kappa0={kappa0!r}, alpha0={alpha0!r}")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("fit_nig_prior needs at least one finite reference score on this side")
    var = max(float(v.var()), MIN_PRIOR_VARIANCE)
    beta0 = var * (alpha0 - 1.0) if alpha0 > 1.0 else var
    return NIG(mu=float(v.mean()), kappa=float(kappa0), alpha=float(alpha0), beta=beta0)


def nig_posterior(*, values, mask, prior: NIG) -> NIG:
    """Per-record conjugate NIG posterior given the reference scores selected by ``mask``.

    With ``n`` observations ``x_1..x_n`` of mean ``xbar`` (Murphy 2007; BDA3 Sec. 3.3)::

        kappa_n = kappa0 + n
        mu_n    = (kappa0 mu0 + n xbar) / kappa_n
        alpha_n = alpha0 + n / 2
        beta_n  = beta0 + 1/2 sum_i (x_i - xbar)^2 + kappa0 n (xbar - mu0)^2 / (2 kappa_n)

    A record without observations (``n = 0``) keeps the prior.

    Args:
        values: float ``[R, N]``; entries outside ``mask`` are ignored (may be nan).
        mask: bool ``[R, N]``: which entries are observations of record ``j``.
        prior: the side's prior (floats, or float ``[N]``).

    Returns:
        a :class:`NIG` of float ``[N]`` arrays.
    """
    k = np.asarray(mask, dtype=bool)
    x = np.where(k, np.asarray(values, dtype=np.float64), 0.0)
    if x.ndim != 2 or x.shape != k.shape:
        raise ValueError(f"values and mask must both be [R, N]; got {np.shape(values)} and {k.shape}")
    n = k.sum(axis=0).astype(np.float64)
    total = x.sum(axis=0)
    xbar = total / np.maximum(n, 1.0)
    resid = np.where(k, x - xbar, 0.0)
    ss = (resid * resid).sum(axis=0)
    kappa_n = prior.kappa + n
    mu_n = (prior.kappa * prior.mu + total) / kappa_n
    alpha_n = prior.alpha + 0.5 * n
    beta_n = prior.beta + 0.5 * ss + 0.5 * prior.kappa * n * (xbar - prior.mu) ** 2 / kappa_n
    full = lambda a: np.broadcast_to(np.asarray(a, dtype=np.float64), xbar.shape).copy()  # noqa: E731
    return NIG(mu=full(mu_n), kappa=full(kappa_n), alpha=full(alpha_n), beta=full(beta_n))


def student_t_logpdf(x, *, df, loc, scale) -> np.ndarray:
    """log of the location-scale Student-t density, elementwise::

        log Gamma((df+1)/2) - log Gamma(df/2) - 1/2 log(df pi) - log scale
            - (df+1)/2 log(1 + ((x - loc) / scale)^2 / df)
    """
    df = np.asarray(df, dtype=np.float64)
    z = (np.asarray(x, dtype=np.float64) - loc) / scale
    return (special.gammaln(0.5 * (df + 1.0)) - special.gammaln(0.5 * df) - 0.5 * np.log(df * math.pi)
            - np.log(scale) - 0.5 * (df + 1.0) * np.log1p(z * z / df))


def nig_log_predictive(x, *, post: NIG) -> np.ndarray:
    """BaVarIA-t's density: the NIG posterior predictive, a Student-t (Murphy 2007)::

        p(x | data) = t_{2 alpha_n}(x; mu_n, beta_n (kappa_n + 1) / (alpha_n kappa_n))

    (location ``mu_n``, squared scale as written). With no observations it is the prior
    predictive. Float ``[N]`` (or scalar), elementwise in ``x`` and ``post``.
    """
    scale = np.sqrt(post.beta * (post.kappa + 1.0) / (post.alpha * post.kappa))
    return student_t_logpdf(x, df=2.0 * post.alpha, loc=post.mu, scale=scale)


def stabilized_variance(*, post: NIG) -> np.ndarray:
    """BaVarIA-n's variance: the posterior mean of ``sigma^2``, ``beta_n / (alpha_n - 1)``.

    It shrinks each record's sample variance towards the pooled one, by a weight that falls as
    the record's references grow (``-> sum (x - xbar)^2 / n``, LiRA's per-example MLE, for many).
    Where the mean does not exist (``alpha_n <= 1``: no observations and ``alpha0 <= 1``) it is
    ``beta_n`` itself, as in the author's code (with ``alpha0 = 1`` that is the pooled variance).
    """
    a = np.asarray(post.alpha, dtype=np.float64)
    b = np.asarray(post.beta, dtype=np.float64)
    return np.where(a > 1.0, b / np.maximum(a - 1.0, 1e-300), b)


def stabilized_gaussian(*, values, mask, prior: NIG) -> Tuple[np.ndarray, np.ndarray]:
    """BaVarIA-n's Gaussian of each record: ``(mean, variance)``, float ``[N]`` each.

    The mean is the record's sample mean (LiRA's), the prior mean ``mu0`` for a record with no
    observations; the variance is :func:`stabilized_variance` of the NIG posterior. (The author's
    code uses the sample mean rather than the posterior mean ``mu_n``; only the variance is
    stabilized.)
    """
    k = np.asarray(mask, dtype=bool)
    x = np.where(k, np.asarray(values, dtype=np.float64), 0.0)
    n = k.sum(axis=0)
    mean = np.where(n > 0, x.sum(axis=0) / np.maximum(n, 1), prior.mu)
    return mean, stabilized_variance(post=nig_posterior(values=values, mask=mask, prior=prior))


def nig_log_predictive_sf(x, *, post: NIG) -> np.ndarray:
    """log Pr[X > x] under BaVarIA-t's predictive (the Student-t of :func:`nig_log_predictive`)."""
    from scipy import stats

    scale = np.sqrt(post.beta * (post.kappa + 1.0) / (post.alpha * post.kappa))
    return stats.t.logsf(np.asarray(x, dtype=np.float64), 2.0 * post.alpha, loc=post.mu, scale=scale)


def bavaria_scores(*, obs, ref_scores, ref_in, variant: str = "t", online: bool = True,
                   kappa0: float = 1.0, alpha0: Optional[float] = None, offline_test: str = "ratio") -> np.ndarray:
    """BaVarIA membership scores of every record: ``log p_IN(phi_obs) - log p_OUT(phi_obs)``.

    * the IN and OUT priors are fitted (:func:`fit_nig_prior`) on all the IN, respectively OUT,
      reference scores of every record;
    * online: each side's density is the record's posterior given its own IN (OUT) references;
    * offline: the OUT side is the record's posterior given its OUT references, and the IN side
      is the IN *prior* (no per-record IN observation is used), as in the author's code — a
      likelihood ratio against a population-level IN model, unlike LiRA's one-sided offline test.
      The IN prior is fitted on the IN scores of the references, pooled over all records (how
      reference models behave on their training data in general);
    * ``variant="t"``: densities are the Student-t predictives (:func:`nig_log_predictive`);
      ``"n"``: Gaussians with the sample mean and :func:`stabilized_variance`.
    * ``offline_test="one-sided"`` (offline only; miafw's addition, not in the paper or the
      author's code): LiRA's one-sided offline test (Carlini et al. 2022, Sec. IV-D) on the
      record's OUT predictive, ``-log Pr[X > phi_obs]``, with no IN side. The ratio against a
      population-level IN prior is two-sided in effect (a score far *below* the record's OUT
      scores also raises it), which is what cost the authors' two-sided offline LiRA here too.

    Args:
        obs: float ``[N]``, the target's scores.
        ref_scores: float ``[R, N]``; ref_in: bool ``[R, N]``. Non-finite reference scores are
            ignored.
        alpha0: ``None``: the variant's default (:data:`DEFAULT_ALPHA0`).

    Returns:
        float ``[N]``, higher = member; a non-finite score (non-finite ``obs``) becomes 0.
    """
    if variant not in ("t", "n"):
        raise ValueError(f"variant must be 't' or 'n', got {variant!r}")
    a0 = DEFAULT_ALPHA0[variant] if alpha0 is None else float(alpha0)
    s = np.asarray(ref_scores, dtype=np.float64)
    k = np.asarray(ref_in, dtype=bool)
    if s.ndim != 2 or s.shape != k.shape:
        raise ValueError(f"ref_scores and ref_in must both be [R, N]; got {s.shape} and {k.shape}")
    valid = np.isfinite(s)
    k_in, k_out = k & valid, ~k & valid
    prior_in = fit_nig_prior(values=s[k_in], kappa0=kappa0, alpha0=a0)
    prior_out = fit_nig_prior(values=s[k_out], kappa0=kappa0, alpha0=a0)
    if offline_test not in ("ratio", "one-sided"):
        raise ValueError(f"offline_test must be 'ratio' or 'one-sided', got {offline_test!r}")
    obs = np.asarray(obs, dtype=np.float64)
    if not online and offline_test == "one-sided":
        if variant == "t":
            out = -nig_log_predictive_sf(obs, post=nig_posterior(values=s, mask=k_out, prior=prior_out))
        else:
            mean, var = stabilized_gaussian(values=s, mask=k_out, prior=prior_out)
            out = -normal_logsf(obs, mu=mean, std=np.sqrt(var))
        return np.where(np.isfinite(out), out, 0.0)
    if not online:
        k_in = np.zeros_like(k_in)  # the IN side is the prior alone
    logp = []
    for mask, prior in ((k_in, prior_in), (k_out, prior_out)):
        if variant == "t":
            logp.append(nig_log_predictive(obs, post=nig_posterior(values=s, mask=mask, prior=prior)))
        else:
            mean, var = stabilized_gaussian(values=s, mask=mask, prior=prior)
            logp.append(gaussian_logpdf(obs, mu=mean, std=np.sqrt(var)))
    with np.errstate(invalid="ignore", over="ignore"):
        out = logp[0] - logp[1]
    return np.where(np.isfinite(out), out, 0.0)


class BaVarIA(Attack):
    """BaVarIA: LiRA with empirical-Bayes normal-inverse-gamma priors (Brännvall 2026).

    Works from one reference model per record (offline) or one complementary pair (online).

    For a target model and record, the attacker observes LiRA's logit-scaled confidence phi
    (Carlini et al. 2022, eq. 4) and compares it with the reference models that trained (IN) or
    did not train (OUT) on the record. Each side's per-record Gaussian has a conjugate NIG prior
    whose hyperparameters are fitted on the whole reference population (one prior per side), so
    the variance never switches between a per-example and a global estimate: the posterior moves
    from the pooled variance to the record's own as its references grow.

    * ``variant="t"`` (BaVarIA-t): the score is the log ratio of the Student-t posterior
      predictives, ``log t_IN(phi) - log t_OUT(phi)``;
    * ``variant="n"`` (BaVarIA-n): the log ratio of Gaussians with the sample mean and the
      stabilized variance ``E[sigma^2 | references] = beta_n / (alpha_n - 1)``;
    * offline: the IN side is the population-level IN prior (predictive), the OUT side the
      record's posterior given its OUT references.

    See the module docstring and :func:`bavaria_scores` for the formulas, the sources and what was
    reconstructed from the author's code rather than read in the paper.

    Args:
        variant: ``t`` or ``n`` (the paper's BaVarIA-t and BaVarIA-n).
        online: use the IN references of each record (True) or only its OUT references (False).
        n_references: reference budget (``None``: all): offline, ``k`` OUT references per record
            (``k = 1`` works: the prior carries the variance); online, ``k`` references, ``k/2``
            IN and ``k/2`` OUT (``k`` even, ``k = 2`` works).
        kappa0: prior strength of the mean, in pseudo-observations (the author's default 1).
        alpha0: shape of the variance prior; ``None`` uses the author's default per variant:
            2 for ``t`` (prior predictive of finite variance), 1 for ``n``.
        offline_test: offline only: ``ratio`` (the paper's: IN prior against the record's OUT
            posterior) or ``one-sided`` (miafw's addition: LiRA's one-sided test on the record's
            OUT predictive; see :func:`bavaria_scores`). The README's budget table shows both.
    """

    api_version = "1.0"

    access = ("probs",)  # the logit-scaled confidence needs the probabilities, not the logits
    min_reference_models = 2  # one complementary pair: 1 IN and 1 OUT reference per record
    reference = (
        "R. Brännvall. Exponential-Family Membership Inference: From LiRA and RMIA to BaVarIA. "
        "arXiv:2603.11799, 2026"
    )

    def __init__(self, variant: Literal["t", "n"] = "t", online: bool = True, n_references: Optional[int] = None,
                 kappa0: float = 1.0, alpha0: Optional[float] = None,
                 offline_test: Literal["ratio", "one-sided"] = "ratio"):
        self.variant = variant
        self.online = online
        self.n_references = n_references
        self.kappa0 = kappa0
        self.alpha0 = alpha0
        self.offline_test = offline_test

    def validate(self) -> None:
        if self.variant not in ("t", "n"):
            raise ValueError(f"variant must be t or n, got {self.variant!r}")
        if self.offline_test not in ("ratio", "one-sided"):
            raise ValueError(f"offline_test must be ratio or one-sided, got {self.offline_test!r}")
        if self.online and self.offline_test != "ratio":
            raise ValueError("offline_test=one-sided applies only with online=false")
        if not isinstance(self.online, bool):
            raise ValueError(f"online must be true or false, got {self.online!r}")
        check_n_references(self.n_references, even=self.online, online_option=True)
        for name in ("kappa0", "alpha0"):
            v = getattr(self, name)
            if v is None and name == "alpha0":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(v) or v <= 0:
                allowed = "a finite number > 0" + (" or None (the variant's default)" if name == "alpha0" else "")
                raise ValueError(f"{name} must be {allowed}, got {v!r}")

    def fit(self, ctx) -> "BaVarIA":
        self.validate()
        n_refs = ctx.n_models - 2  # every model but the target and its complementary partner
        if n_refs < self.min_reference_models:
            raise ValueError(
                f"BaVarIA needs at least {self.min_reference_models} reference models besides the target and "
                f"its partner (n_models >= {self.min_reference_models + 2}); got n_models={ctx.n_models}"
            )
        if self.n_references is not None:
            pairs = self.n_references // 2 if self.online else self.n_references
            if pairs > n_refs // 2:
                most = n_refs if self.online else n_refs // 2
                raise ValueError(f"n_references={self.n_references} needs {pairs} reference pairs but "
                                 f"n_models={ctx.n_models} has {n_refs // 2}; use n_references <= {most}")
        self.alpha0_ = DEFAULT_ALPHA0[self.variant] if self.alpha0 is None else float(self.alpha0)
        self.ctx_ = ctx
        return self

    def score(self, target: int, records: np.ndarray) -> np.ndarray:
        view = self.ctx_.for_target(target, n_references=self.n_references, online=self.online)
        records = np.asarray(records, dtype=np.int64)
        # Fit on every record, then select: the priors are properties of the reference population,
        # so a record's score must not depend on which others are scored with it.
        scores = bavaria_scores(obs=view.target_signal("confidence"), ref_scores=view.ref_signal("confidence"),
                                ref_in=view.ref_keep, variant=self.variant, online=self.online,
                                kappa0=float(self.kappa0), alpha0=self.alpha0_, offline_test=self.offline_test)
        return scores[records]


__all__ = [
    "BaVarIA",
    "DEFAULT_ALPHA0",
    "MIN_PRIOR_VARIANCE",
    "NIG",
    "bavaria_scores",
    "fit_nig_prior",
    "nig_log_predictive",
    "nig_log_predictive_sf",
    "nig_posterior",
    "stabilized_gaussian",
    "stabilized_variance",
    "student_t_logpdf",
]
