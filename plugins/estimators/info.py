"""Information-theoretic membership leakage of a signal: mutual information, Jensen–Shannon
divergence, the cross-validated Bayes-error approximations, and the bounds they imply.

The setting. Pool the population's (model, record) pairs and draw one with membership
``B ~ Bernoulli(1/2)`` (every record is IN for exactly half the models, and the subsample below is
balanced), then observe a signal ``S`` of that model on that record (the logit-scaled confidence by
default). ``P`` and ``Q`` are the distributions of ``S`` on members and on non-members.

Facts used (natural logarithms throughout; ``H_b`` is the binary entropy in nats):

* ``I(S; B) = JS(P || Q)`` for a uniform prior: the Jensen–Shannon divergence is the mutual
  information between a sample of the equal mixture and its component (Lin, 1991, IEEE T-IT 37(1),
  Sec. IV). So the kNN estimate of the mutual information and the histogram/KDE estimate of the
  JS divergence estimate the same number by two routes.
* Wang et al. 2021, Eq. (9)–(10): the best inference model ``f_A* = p / (p + q)`` reaches the gain
  ``G(f_A*) = E_P log f_A* + E_Q log(1 - f_A*) = -log 4 + 2 JS(P || Q)`` (the GAN identity of
  Goodfellow et al. 2014, Thm. 1), in ``[-log 4, 0]``.
* Any attack that sees only ``S`` (and its own randomness) has membership advantage
  ``TPR - FPR <= TV(P, Q)``, and accuracy ``<= (1 + TV) / 2`` under the prior 1/2; the likelihood-
  ratio test reaches both, so ``TV`` is the Bayes advantage and ``(1 + TV) / 2`` one minus the
  Bayes error.
* Bound from ``I = JS`` (tight): ``JS >= g(TV)`` with ``g(v) = log 2 - H_b((1 + v) / 2)``, so
  ``TV <= g^{-1}(I)``. Derivation: the map ``s -> 1[p(s) > q(s)]`` keeps ``TV`` and cannot increase
  ``JS`` (data processing), which reduces the question to two-point distributions
  ``(a, 1 - a)`` vs ``(b, 1 - b)`` with ``a - b = v``; JS is jointly convex and symmetric under
  ``(a, b) -> (1 - b, 1 - a)``, so on that line it is smallest at ``a = (1 + v) / 2, b = (1 - v) / 2``,
  where it equals ``g(v)``. Equality holds for that pair, so no better function of ``I`` alone
  exists. It is also the binary Fano inequality: with ``P_e`` the error of the Bayes classifier,
  ``H_b(P_e) >= H(B | S) = log 2 - I`` and ``P_e = (1 - TV) / 2`` give the same ``g``.
* Pinsker (looser, for comparison): ``KL(P || M) >= 2 TV(P, M)^2`` with ``M = (P + Q) / 2`` and
  ``TV(P, M) = TV(P, Q) / 2`` give ``JS >= TV^2 / 2``, so ``TV <= sqrt(2 I)`` (``I`` in nats;
  ``sqrt(2 ln 2 I_bits)`` in bits). Since ``g(v) >= v^2 / 2`` the Fano bound is never looser.

Who the bounds hold for: attacks that observe the chosen signal of the target and nothing that
tells records apart. A reference-model attack (LiRA, RMIA) also uses *which* record it is and the
reference models' signals on it; what it can reach is ``TV`` of the pair (record, signal), i.e. the
record-averaged ``TV`` of the per-record distributions, which can exceed the pooled ``TV``. The
``calibrate="record"`` option standardises the signal per record over all models (IN and OUT
alike, so membership-blind) — the per-example calibration such attacks perform — and estimates the
leakage of that standardised signal, which is closer to what they use but still not a bound on them.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Literal, Optional, Tuple

import numpy as np
from scipy import special
from threadpoolctl import threadpool_limits

from mia_core.base import Estimator

#: Signals ``signal=`` accepts: ``confidence`` (logit-scaled), ``loss`` (cross-entropy),
#: ``correct`` (0/1, discrete), ``probs-sorted`` (the largest ``top_k`` softmax outputs).
SIGNALS: Tuple[str, ...] = ("confidence", "loss", "correct", "probs-sorted")
CALIBRATIONS: Tuple[str, ...] = ("none", "record")
CLASSIFIERS: Tuple[str, ...] = ("boosting", "logistic")
JS_METHODS: Tuple[str, ...] = ("auto", "histogram", "kde")
LOG2 = math.log(2.0)
LOG4 = math.log(4.0)
_SALT = 0x696E666F  # "info"


# --------------------------------------------------------------------------------------------
# bounds: closed forms
# --------------------------------------------------------------------------------------------


def js_of_binary_pair(*, tv) -> np.ndarray:
    """``g(v) = log 2 - H_b((1 + v) / 2)``: the JS divergence (nats) of the two-point distributions
    ``((1 + v) / 2, (1 - v) / 2)`` and ``((1 - v) / 2, (1 + v) / 2)``, the smallest JS divergence any
    pair of distributions at total variation ``v`` can have (see the module docstring).

    Args:
        tv: float or float ``[...]`` in ``[0, 1]``.

    Returns:
        float64 of the same shape, in ``[0, log 2]``, increasing and convex in ``tv``.
    """
    v = np.clip(np.asarray(tv, dtype=np.float64), 0.0, 1.0)
    # g(v) = ((1 + v) log(1 + v) + (1 - v) log(1 - v)) / 2 = sum_k v^(2k) / (2k (2k - 1)); the series
    # where the closed form cancels (small v), the closed form elsewhere
    small = v < 1e-2
    series = sum(v ** (2 * k) / (2 * k * (2 * k - 1)) for k in range(1, 7))
    with np.errstate(divide="ignore", invalid="ignore"):
        closed = 0.5 * (special.xlog1py(1.0 + v, v) + special.xlog1py(1.0 - v, -v))
    return np.where(small, series, closed)


def tv_bound_fano(*, information) -> np.ndarray:
    """The tight upper bound on the total variation, hence on any signal-only attack's advantage,
    implied by ``I(S; B) = JS(P || Q)`` (nats) under the prior 1/2: ``g^{-1}(I)`` with ``g`` of
    :func:`js_of_binary_pair` (equivalently the binary Fano inequality).

    Args:
        information: float or float ``[...]``, nats; negative values count as 0, values
            ``>= log 2`` give 1.

    Returns:
        float64 of the same shape in ``[0, 1]`` (bisection to float64 precision).
    """
    i = np.asarray(information, dtype=np.float64)
    if np.isnan(i).any():
        raise ValueError("information must not be NaN")
    # v^2 / 2 <= g(v) <= v^2 log 2 on [0, 1] (the series has positive terms and g(1) = log 2), so
    # the root lies in [sqrt(I / log 2), sqrt(2 I)]: bisecting that bracket keeps relative precision
    pos = np.clip(i, 0.0, LOG2)
    lo, hi = np.sqrt(pos / LOG2), np.minimum(np.sqrt(2.0 * pos), 1.0)
    for _ in range(64):
        mid = (lo + hi) / 2.0
        below = js_of_binary_pair(tv=mid) < pos
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    out = np.where(i <= 0.0, 0.0, hi)
    return np.where(i >= LOG2, 1.0, out)


def tv_bound_pinsker(*, information) -> np.ndarray:
    """Pinsker's bound ``TV <= min(1, sqrt(2 I))`` (``I = JS`` in nats; see the module docstring):
    valid, never tighter than :func:`tv_bound_fano`."""
    i = np.asarray(information, dtype=np.float64)
    return np.minimum(1.0, np.sqrt(2.0 * np.maximum(i, 0.0)))


def inference_gain(*, js) -> np.ndarray:
    """Wang et al. 2021, Eq. (10): the optimal inference model's gain ``-log 4 + 2 JS`` (``js`` in
    nats), in ``[-log 4, 0]``."""
    return -LOG4 + 2.0 * np.asarray(js, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# features and sampling
# --------------------------------------------------------------------------------------------


def sorted_probs(*, probs, top_k: Optional[int] = 3) -> np.ndarray:
    """The largest ``top_k`` softmax outputs in decreasing order (the label-free posterior features of
    Salem et al. 2019, who use the top three), each logit-scaled: ``log p_(i) - log sum_{j != (i)} p_j``.

    The logit scaling is Carlini et al.'s for the confidence (2022, eq. 4) applied to each kept
    probability. It is invertible coordinate by coordinate, so the mutual information and the JS
    divergence are unchanged, but it spreads the values that crowd near 1 on members (where a KDE
    with one bandwidth smooths the member/non-member difference away). The sum of the other
    probabilities is summed directly (not ``1 - p``), so it stays exact when the top probability
    rounds to 1; probabilities that underflowed to 0 count as the smallest positive float64.

    Args:
        probs: float ``[..., C]``.
        top_k: how many to keep; ``None`` or ``>= C`` keeps ``C - 1`` (the last is determined by the
            others, and a KDE needs a non-singular sample).

    Returns:
        float64 ``[..., min(top_k, C - 1)]`` (``[..., 1]`` for ``C = 1``).
    """
    p = np.asarray(probs, dtype=np.float64)
    c = p.shape[-1]
    k = c - 1 if top_k is None or top_k >= c else int(top_k)
    k = max(k, 1)
    srt = -np.sort(-p, axis=-1)
    others = srt.sum(axis=-1, keepdims=True) - srt  # fine where p <= 1/2: every entry but the first
    others[..., 0] = srt[..., 1:].sum(axis=-1)
    tiny = np.finfo(np.float64).tiny
    out = np.log(np.maximum(srt, tiny)) - np.log(np.maximum(others, tiny))
    return out[..., :k]


def calibrate_per_record(*, features) -> np.ndarray:
    """Standardise each record's features over the models: ``(f[m, j] - mean_m f[:, j]) / std_m f[:, j]``
    (population std, floored at ``1e-12`` times the feature's overall scale). Membership-blind: the
    mean and std run over all ``M`` models, half of them IN.

    Args:
        features: float ``[M, N, F]``.

    Returns:
        float64 ``[M, N, F]``.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 3:
        raise ValueError(f"features must be [M, N, F], got shape {f.shape}")
    mu = f.mean(axis=0, keepdims=True)
    sd = f.std(axis=0, keepdims=True)
    floor = 1e-12 * max(float(np.abs(f).max(initial=0.0)), 1.0)
    return (f - mu) / np.maximum(sd, floor)


def balanced_pairs(*, keep, records, n_each: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """A balanced sample of (model, record) pairs: ``n_each`` members and ``n_each`` non-members
    (fewer if there are not that many), without replacement among the pairs of ``records``.

    Args:
        keep: bool ``[M, N]``.
        records: int ``[R]`` record indices (a record listed twice contributes its ``M`` pairs
            twice).
        n_each: the most pairs per class.

    Returns:
        ``(models, records)``, int64 ``[K]`` each, ``K <= 2 n_each``: members first, then non-members.
    """
    keep = np.asarray(keep, dtype=bool)
    recs = np.asarray(records, dtype=np.int64)
    m = keep.shape[0]
    models = np.repeat(np.arange(m, dtype=np.int64)[:, None], recs.size, axis=1).ravel()
    cols = np.tile(recs, m)
    member = keep[models, cols]
    out = []
    for cls in (True, False):
        idx = np.flatnonzero(member == cls)
        if idx.size > n_each:
            idx = np.sort(rng.choice(idx, size=n_each, replace=False))
        out.append(idx)
    idx = np.concatenate(out)
    return models[idx], cols[idx]


# --------------------------------------------------------------------------------------------
# estimators
# --------------------------------------------------------------------------------------------


def _check_xy(x, membership) -> Tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    b = np.asarray(membership)
    if x.ndim != 2 or b.shape != (x.shape[0],):
        raise ValueError(f"x must be [n] or [n, F] and membership [n]; got {x.shape} and {b.shape}")
    if b.dtype != bool:
        if not np.isin(b, (0, 1)).all():
            raise ValueError("membership must be boolean (or 0/1)")
        b = b.astype(bool)
    if not np.isfinite(x).all():
        raise ValueError("x must be finite")
    if b.all() or not b.any():
        raise ValueError(f"membership needs members and non-members; got {int(b.sum())} members of {b.size}")
    return x, b


def _ross_mi(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Ross's (2014) kNN estimator of I(X; Y) for continuous ``X [n, d]`` and discrete ``Y [n]``, in
    the max norm, with scikit-learn's conventions (neighbours strictly inside the k-th distance,
    the point itself counted, labels seen once ignored). Unclipped."""
    from sklearn.neighbors import KDTree, NearestNeighbors

    n = len(x)
    radius, k_all, counts = np.zeros(n), np.zeros(n), np.zeros(n)
    for label in np.unique(y):
        mask = y == label
        cnt = int(mask.sum())
        if cnt > 1:
            kk = min(k, cnt - 1)
            nn = NearestNeighbors(n_neighbors=kk, metric="chebyshev").fit(x[mask])
            radius[mask] = np.nextafter(nn.kneighbors()[0][:, -1], 0)
            k_all[mask] = kk
        counts[mask] = cnt
    ok = counts > 1
    if ok.sum() < 2:
        return 0.0
    tree = KDTree(x[ok], metric="chebyshev")
    m_all = tree.query_radius(x[ok], radius[ok], count_only=True)
    return float(special.digamma(ok.sum()) + np.mean(special.digamma(k_all[ok]))
                 - np.mean(special.digamma(counts[ok])) - np.mean(special.digamma(m_all)))


def mutual_information(*, x, membership, n_neighbors: int = 3, discrete: bool = False, seed: int = 0) -> float:
    """``I(S; B)`` in nats by the kNN estimator of Kraskov et al. (2004) for a discrete target as
    adapted by Ross (2014), clipped at 0.

    One feature: exactly :func:`sklearn.feature_selection.mutual_info_classif` (``random_state=seed``;
    it scales the feature to unit variance and adds ``1e-10``-scale noise to break ties). Several
    features (``probs-sorted``): scikit-learn estimates each feature separately, which is not the
    joint information, so the same estimator runs here on the joint vector — same scaling and noise,
    max-norm neighbourhoods — and reduces to scikit-learn's in one dimension. ``discrete``: the
    plug-in (contingency table) estimate, scikit-learn's ``discrete_features=True``.

    Args:
        x: float ``[n]`` or ``[n, F]``; membership: bool ``[n]``; n_neighbors: ``k >= 1``.

    Returns:
        float, ``>= 0``.
    """
    from sklearn.feature_selection import mutual_info_classif

    x, b = _check_xy(x, membership)
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}")
    y = b.astype(np.int64)
    if discrete or x.shape[1] == 1:
        if discrete and x.shape[1] != 1:
            raise ValueError(f"a discrete signal must have one feature, got {x.shape[1]}")
        return float(mutual_info_classif(x, y, discrete_features=bool(discrete), n_neighbors=int(n_neighbors),
                                         random_state=int(seed) % (2**32))[0])
    rng = np.random.RandomState(int(seed) % (2**32))
    sd = x.std(axis=0)
    z = x / np.where(sd > 0, sd, 1.0)  # sklearn's scale(with_mean=False): zero-variance columns untouched
    z = z + 1e-10 * np.maximum(1.0, np.abs(z).mean(axis=0)) * rng.standard_normal(size=z.shape)
    return max(0.0, _ross_mi(z, y, int(n_neighbors)))


def js_histogram(*, x, membership, bins: int = 32, discrete: bool = False) -> float:
    """JS divergence (nats) between the member and non-member histograms of a one-feature signal:
    ``scipy.spatial.distance.jensenshannon(p, q) ** 2`` (scipy returns the JS *distance*, the square
    root). Bins: ``bins`` equal-mass bins from the pooled sample's quantiles (ties kept in one bin),
    or one bin per distinct value when ``discrete``.

    Binning is a deterministic map, so the binned JS is at most the true one (data processing); the
    plug-in estimate is biased upward by about ``(bins - 1) / (4 n)`` (the Miller–Madow term of
    ``I = JS``) — not corrected.

    Args:
        x: float ``[n]`` or ``[n, 1]``; membership: bool ``[n]``; bins: ``>= 2``.

    Returns:
        float in ``[0, log 2]``.
    """
    from scipy.spatial.distance import jensenshannon

    x, b = _check_xy(x, membership)
    if x.shape[1] != 1:
        raise ValueError(f"the histogram estimate needs a one-feature signal, got {x.shape[1]} features "
                         f"(use js_method=kde)")
    v = x[:, 0]
    if discrete:
        _, cell = np.unique(v, return_inverse=True)
    else:
        if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 2:
            raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
        edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, int(bins) + 1)[1:-1]))
        cell = np.searchsorted(edges, v, side="right")
    n_cells = int(cell.max()) + 1
    p = np.bincount(cell[b], minlength=n_cells) / b.sum()
    q = np.bincount(cell[~b], minlength=n_cells) / (~b).sum()
    return float(min(max(jensenshannon(p, q) ** 2, 0.0), LOG2))


def js_kde(*, x, membership, max_points: int = 2000, seed: int = 0) -> float:
    """JS divergence (nats) from Gaussian kernel density estimates (``scipy.stats.gaussian_kde``,
    Scott's bandwidth): each class is split in halves; ``p̂`` and ``q̂`` are fitted on one half and
    ``JS = 1/2 E_P log(2 p̂ / (p̂ + q̂)) + 1/2 E_Q log(2 q̂ / (p̂ + q̂))`` is averaged over at most
    ``max_points`` points of each class's other half (held out, so no resubstitution bias).

    Args:
        x: float ``[n]`` or ``[n, F]`` (each class needs at least 4 points and a non-singular
            covariance); membership: bool ``[n]``.

    Returns:
        float, clipped to ``[0, log 2]``.
    """
    from scipy.stats import gaussian_kde

    x, b = _check_xy(x, membership)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SALT, 3]))
    fits, evals = [], []
    for cls in (True, False):
        idx = rng.permutation(np.flatnonzero(b == cls))
        if idx.size < 4:
            raise ValueError(f"the KDE estimate needs at least 4 {'members' if cls else 'non-members'}, got {idx.size}")
        half = idx.size // 2
        fits.append(x[idx[:half]])
        evals.append(x[idx[half:][:max_points]])
    try:
        kp, kq = gaussian_kde(fits[0].T), gaussian_kde(fits[1].T)
    except np.linalg.LinAlgError as exc:
        raise ValueError(f"the KDE estimate needs a non-singular signal sample ({exc}); the signal is "
                         f"degenerate (constant or linearly dependent features)") from None
    terms = []
    for own, e in ((kp, evals[0]), (kq, evals[1])):
        lp, lq = kp.logpdf(e.T), kq.logpdf(e.T)
        lm = np.logaddexp(lp, lq) - LOG2
        lo = lp if own is kp else lq
        good = np.isfinite(lm)
        terms.append(float(np.mean(lo[good] - lm[good])) if good.any() else 0.0)
    return float(min(max(0.5 * terms[0] + 0.5 * terms[1], 0.0), LOG2))


def cv_bayes(*, x, membership, groups=None, classifier: str = "boosting", n_folds: int = 5,
             seed: int = 0) -> Dict[str, float]:
    """Out-of-fold membership predictions of a classifier on the signal, as Bayes-error approximations.

    ``classifier``: ``boosting`` (``HistGradientBoostingClassifier``, 100 trees, one OpenMP thread:
    any shape of the likelihood ratio) or ``logistic`` (``LogisticRegression`` on standardised
    features: a threshold on a linear score). Folds: ``StratifiedGroupKFold(n_folds, shuffle=True)``
    with ``groups`` (the records: no record's pairs on both sides), ``StratifiedKFold`` without.

    Returns:
        ``{"balanced_accuracy", "youden_j", "youden_j_best_threshold", "gain"}``: the balanced
        accuracy of the out-of-fold decisions at probability 1/2 (the Bayes rule under the prior 1/2,
        the classes being balanced); Youden's ``J = TPR - FPR = 2 * balanced_accuracy - 1`` there, an
        estimate from below of the Bayes advantage ``TV`` (a fixed classifier does no better than the
        Bayes rule, up to sampling error); the largest ``TPR - FPR`` over thresholds of the
        out-of-fold probabilities (the threshold chosen knowing the labels, as
        :func:`mia_core.metrics.advantage` does for the attacks: comparable with their measured
        advantage, and optimistic like it); and Wang et al.'s gain (Eq. 1) of the out-of-fold
        probabilities ``E_P log f + E_Q log(1 - f)``
        (probabilities clipped to ``[1e-6, 1 - 1e-6]``), at most the optimal gain of Eq. (10).
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    x, b = _check_xy(x, membership)
    if classifier not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}; got {classifier!r}")
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    y = b.astype(np.int64)
    rs = int(seed) % (2**32)
    if groups is None:
        splits = StratifiedKFold(int(n_folds), shuffle=True, random_state=rs).split(x, y)
    else:
        g = np.asarray(groups)
        if g.shape != y.shape:
            raise ValueError(f"groups must have one id per sample ({y.size}), got shape {g.shape}")
        splits = StratifiedGroupKFold(int(n_folds), shuffle=True, random_state=rs).split(x, y, g)
    prob = np.full(y.size, np.nan)
    with threadpool_limits(limits=1, user_api="openmp"):
        for train, test in splits:
            if np.unique(y[train]).size < 2:
                prob[test] = y[train].mean()
                continue
            prob[test] = _classifier(classifier, rs).fit(x[train], y[train]).predict_proba(x[test])[:, 1]
    from mia_core.metrics import advantage

    tpr = float(np.mean(prob[b] > 0.5))
    fpr = float(np.mean(prob[~b] > 0.5))
    f = np.clip(prob, 1e-6, 1 - 1e-6)
    gain = float(np.mean(np.log(f[b])) + np.mean(np.log1p(-f[~b])))
    return {"balanced_accuracy": (1.0 + tpr - fpr) / 2.0, "youden_j": tpr - fpr,
            "youden_j_best_threshold": float(advantage(prob, b)), "gain": gain}


def _classifier(kind: str, seed: int):
    if kind == "boosting":
        from sklearn.ensemble import HistGradientBoostingClassifier

        return HistGradientBoostingClassifier(max_iter=100, learning_rate=0.1, max_leaf_nodes=15,
                                              min_samples_leaf=40, early_stopping=False, random_state=seed)
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))


INTERVAL_METHOD = ("delete-d jackknife over records (Shao & Wu 1989), d = half the records: the estimate on "
                   "random halves of the records (all of a record's sampled pairs together), centred, added to the "
                   "full-sample value")


def half_sample_interval(*, x, membership, records, estimate, value: float, n_resamples: int = 20,
                         confidence: float = 0.95, seed: int = 0) -> Tuple[Optional[Tuple[float, float]], int]:
    """An interval for a statistic of pooled pairs, resampling records as clusters without replacement.

    Why not the bootstrap: drawing records with replacement duplicates their pairs, and a kNN
    estimator reads each exact duplicate as a same-class nearest neighbour at distance ~0. On
    ``N(0, 1)`` vs ``N(0.5, 1)`` pairs (true ``I = 0.0303`` nats, 16 models x 1250 records) the bootstrap
    replicates of the kNN estimate ran 0.18-0.21 while the estimate itself was 0.035.

    Method (delete-d jackknife, Shao & Wu 1989, Ann. Statist. 17(3), with ``d = n / 2``): each
    resample keeps a random half of the distinct records with all their pairs in the sample,
    balanced again (the larger class subsampled to the smaller); with ``d = n - d`` the jackknife
    variance ``(n - d) / d * Var(theta_half)`` is just the spread of the half-sample estimates. The
    interval is ``value + quantiles(theta_half - mean(theta_half))`` at ``(1 -/+ confidence) / 2``
    (centring removes the estimator's sample-size bias, which differs between ``n`` and ``n / 2``),
    clipped below at 0.

    Args:
        x: float ``[n, F]``; membership: bool ``[n]``; records: int ``[n]`` the record of each pair.
        estimate: ``(x, membership) -> float``.
        value: the statistic on the whole sample.

    Returns:
        ``((low, high), resamples used)``, or ``(None, 0)`` when no resample was usable.
    """
    x, b = _check_xy(x, membership)
    rec = np.asarray(records)
    if rec.shape != b.shape:
        raise ValueError(f"records must have one id per pair ({b.size}), got shape {rec.shape}")
    distinct = np.unique(rec)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) % (2**63), _SALT, 7]))
    vals = []
    for _ in range(int(n_resamples)):
        half = rng.choice(distinct, size=max(len(distinct) // 2, 1), replace=False)
        idx = np.flatnonzero(np.isin(rec, half))
        pos, neg = idx[b[idx]], idx[~b[idx]]
        k = min(pos.size, neg.size)
        if k < 2:
            continue
        idx = np.sort(np.concatenate([rng.choice(pos, size=k, replace=False), rng.choice(neg, size=k, replace=False)]))
        vals.append(float(estimate(x[idx], b[idx])))
    if not vals:
        return None, 0
    v = np.asarray(vals)
    alpha = 1.0 - confidence
    lo, hi = value + np.quantile(v - v.mean(), [alpha / 2, 1 - alpha / 2])
    return (max(float(lo), 0.0), max(float(hi), 0.0)), len(vals)


def information_leakage(*, features, keep, discrete: bool = False, n_neighbors: int = 3,
                        classifier: str = "boosting", n_folds: int = 5, js_method: str = "auto", bins: int = 32,
                        max_samples: int = 20000, n_resamples: int = 20, confidence: float = 0.95,
                        seed: int = 0) -> Dict[str, Any]:
    """Every estimate of the module for one signal of a population, with the bounds they imply.

    Args:
        features: float ``[M, N, F]`` the signal of each model on each record (``F = 1`` for scalar
            signals).
        keep: bool ``[M, N]`` membership.
        discrete: the signal takes few values (plug-in estimates instead of kNN / quantile bins).
        max_samples: the pairs used, balanced (at most ``max_samples // 2`` per class, seeded).
        n_resamples: half-samples of the records for the interval (see
            :func:`half_sample_interval`); 0 gives no interval.
        js_method: ``histogram`` (one feature), ``kde``, or ``auto`` (histogram for one feature,
            KDE for several).

    Returns:
        A JSON-ready dict: ``mi_nats``, ``mi_bits``, ``mi_interval``, ``js_nats``, ``js_method``,
        ``gain_optimal`` (Eq. 10 from the JS estimate) and ``gain_optimal_from_mi`` (from the MI
        estimate), ``cv`` (see :func:`cv_bayes`), ``advantage_bounds`` and ``accuracy_bounds``
        (``fano_mi``, ``pinsker_mi``, ``fano_js``, ``pinsker_js``), ``advantage_bound`` (``fano_mi``)
        and ``advantage_bound_interval`` (``fano`` of the MI interval), ``n_pairs``, ``n_resamples``
        (half-samples used) and ``interval_method``.
    """
    f = np.asarray(features, dtype=np.float64)
    keep = np.asarray(keep, dtype=bool)
    if f.ndim != 3 or keep.shape != f.shape[:2]:
        raise ValueError(f"features must be [M, N, F] and keep [M, N]; got {f.shape} and {keep.shape}")
    if js_method not in JS_METHODS:
        raise ValueError(f"js_method must be one of {', '.join(JS_METHODS)}; got {js_method!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence!r}")
    m, n, n_feat = f.shape
    n_each = max(int(max_samples) // 2, 1)
    ss = np.random.SeedSequence([int(seed) % (2**63), _SALT])
    s_pairs, s_mi, s_cv, s_kde, s_half = ss.spawn(5)
    all_records = np.arange(n, dtype=np.int64)
    mi_seed = int(s_mi.generate_state(1)[0])

    def sample(records, rng):
        mm, rr = balanced_pairs(keep=keep, records=records, n_each=n_each, rng=rng)
        return f[mm, rr], keep[mm, rr], rr

    x, b, rec = sample(all_records, np.random.default_rng(s_pairs))
    _check_xy(x, b)
    mi = mutual_information(x=x, membership=b, n_neighbors=n_neighbors, discrete=discrete, seed=mi_seed)
    method = ("histogram" if n_feat == 1 else "kde") if js_method == "auto" else js_method
    if method == "histogram":
        js = js_histogram(x=x, membership=b, bins=bins, discrete=discrete)
        js_desc = "histogram: one bin per value" if discrete else f"histogram: {bins} equal-mass bins, plug-in"
    else:
        js = js_kde(x=x, membership=b, seed=int(s_kde.generate_state(1)[0]))
        js_desc = "kde: Gaussian kernels (Scott), fitted on half of each class, averaged over the other half"
    cv = cv_bayes(x=x, membership=b, groups=rec, classifier=classifier, n_folds=n_folds,
                  seed=int(s_cv.generate_state(1)[0]))

    def mi_of(xs, bs):
        return mutual_information(x=xs, membership=bs, n_neighbors=n_neighbors, discrete=discrete, seed=mi_seed)

    interval, n_done = half_sample_interval(x=x, membership=b, records=rec, estimate=mi_of, value=mi,
                                            n_resamples=n_resamples, confidence=confidence,
                                            seed=int(s_half.generate_state(1)[0]))
    bounds = {
        "fano_mi": float(tv_bound_fano(information=mi)),
        "pinsker_mi": float(tv_bound_pinsker(information=mi)),
        "fano_js": float(tv_bound_fano(information=js)),
        "pinsker_js": float(tv_bound_pinsker(information=js)),
    }
    return {
        "mi_nats": mi,
        "mi_bits": mi / LOG2,
        "mi_interval": list(interval) if interval else None,
        "js_nats": js,
        "js_method": js_desc,
        "gain_optimal": float(inference_gain(js=js)),
        "gain_optimal_from_mi": float(inference_gain(js=min(mi, LOG2))),
        "cv": cv,
        "advantage_bounds": bounds,
        "accuracy_bounds": {k: (1.0 + v) / 2.0 for k, v in bounds.items()},
        "advantage_bound": bounds["fano_mi"],
        "advantage_bound_interval": ([float(tv_bound_fano(information=v)) for v in interval] if interval else None),
        "n_pairs": int(b.size),
        "n_resamples": n_done,
        "interval_method": INTERVAL_METHOD,
    }


# --------------------------------------------------------------------------------------------
# the plugin
# --------------------------------------------------------------------------------------------


class InfoBounds(Estimator):
    """MI, JS divergence and CV Bayes error of a signal vs membership, with advantage bounds.

    Pools the population's (model, record) pairs — a balanced sample of at most ``max_samples`` —
    and estimates how much the chosen signal reveals about membership (see the module docstring for
    the maths and the derivations):

    1. ``I(signal; membership)`` by scikit-learn's kNN estimator (``mutual_info_classif``, Kraskov et
       al. 2004 / Ross 2014; the joint vector for multi-feature signals), in nats and bits;
    2. balanced accuracy and Youden's J of a classifier's out-of-fold decisions (stratified group
       K-fold, records as groups): the note's Bayes-error approximations; J estimates the best
       advantage from below;
    3. the JS divergence between the member and non-member signal distributions (histogram of
       equal-mass bins for one feature, KDE for several) and Wang et al.'s optimal inference gain
       ``-log 4 + 2 JS`` (Eq. 10).

    ``value`` is the mutual information in nats; ``interval`` a resampling interval of it over
    records (a record's pairs with every model resampled together): half-samples without
    replacement (the delete-d jackknife), not the bootstrap, whose duplicated pairs the kNN
    estimator reads as neighbours (see :func:`half_sample_interval`). Bounds on the advantage of any
    attack that observes only the signal: ``g^{-1}(I)`` (tight; = binary Fano) and Pinsker's
    ``sqrt(2 I)``, each from the MI and from the JS estimate; ``advantage_bound`` is the Fano bound
    from the MI estimate (the tightest valid function of the main value); accuracy bounds are
    ``(1 + bound) / 2``. Reference-model attacks (LiRA, RMIA) also know which record they score and
    can exceed these bounds; ``calibrate=record`` estimates the leakage of the per-record
    standardised signal instead, closer to what they use.

    Args:
        signal: ``confidence`` (logit-scaled, the default), ``loss``, ``correct`` (discrete: plug-in
            estimates) or ``probs-sorted`` (the ``top_k`` largest probabilities, each logit-scaled,
            a vector; see :func:`sorted_probs`).
        top_k: features of ``probs-sorted`` (``None``: all but the last, which the others determine).
        calibrate: ``none`` (the raw signal) or ``record`` (standardised per record over all models).
        n_neighbors: ``k`` of the kNN estimator.
        classifier: ``boosting`` (histogram gradient boosting) or ``logistic``.
        n_folds: folds of the cross-validation.
        js_method: ``auto``, ``histogram`` or ``kde``; bins: histogram bins.
        max_samples: the most (model, record) pairs used (balanced, seeded).
        n_resamples: half-samples of the records for the interval (0: none).
        confidence: level of the interval.

    Deviations: the joint kNN estimate for vector signals is this module's (scikit-learn estimates
    per feature); the JS estimates are plug-in (histogram) or held-out KDE, both stated in the report.
    """

    api_version = "1.0"
    access = ("probs",)
    reference = (
        "Y. Wang, C. Wang, Z. Wang, S. Zhou, H. Liu, J. Bi, C. Ding, S. Rajasekaran. Against Membership "
        "Inference Attack: Pruning is All You Need. IJCAI 2021 (Eq. 10, the optimal inference gain); "
        "B. C. Ross. Mutual Information between Discrete and Continuous Data Sets. PLoS ONE 9(2), 2014 "
        "(the kNN estimator); J. Lin. Divergence Measures Based on the Shannon Entropy. IEEE Trans. Inf. "
        "Theory 37(1), 1991 (JS as mutual information)"
    )

    def __init__(self, signal: Literal["confidence", "loss", "correct", "probs-sorted"] = "confidence",
                 top_k: Optional[int] = 3, calibrate: Literal["none", "record"] = "none", n_neighbors: int = 3,
                 classifier: Literal["boosting", "logistic"] = "boosting", n_folds: int = 5,
                 js_method: Literal["auto", "histogram", "kde"] = "auto", bins: int = 32,
                 max_samples: int = 20000, n_resamples: int = 20, confidence: float = 0.95):
        self.signal = signal
        self.top_k = top_k
        self.calibrate = calibrate
        self.n_neighbors = n_neighbors
        self.classifier = classifier
        self.n_folds = n_folds
        self.js_method = js_method
        self.bins = bins
        self.max_samples = max_samples
        self.n_resamples = n_resamples
        self.confidence = confidence

    def validate(self) -> None:
        for name, allowed in (("signal", SIGNALS), ("calibrate", CALIBRATIONS), ("classifier", CLASSIFIERS),
                              ("js_method", JS_METHODS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name, low in (("n_neighbors", 1), ("n_folds", 2), ("bins", 2), ("max_samples", 20), ("n_resamples", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be an integer >= 1 or unset (all probabilities but the last), got {k!r}")
        c = self.confidence
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c < 1.0:
            raise ValueError(f"confidence must be a number in (0, 1), got {c!r}")
        if self.signal == "correct" and self.calibrate != "none":
            raise ValueError("calibrate=record needs a continuous signal; signal=correct is 0/1 (use calibrate=none)")
        if self.signal == "probs-sorted" and self.js_method == "histogram" and self.top_k != 1:
            raise ValueError("js_method=histogram needs a one-feature signal; signal=probs-sorted has top_k "
                             "features (use js_method=kde or auto, or top_k=1)")

    def features(self, ctx) -> np.ndarray:
        """The signal as float ``[M, N, F]``, calibrated as asked."""
        if self.signal == "probs-sorted":
            f = sorted_probs(probs=ctx.signal("probs"), top_k=self.top_k)
        else:
            f = np.asarray(ctx.signal(self.signal), dtype=np.float64)[..., None]
        return calibrate_per_record(features=f) if self.calibrate == "record" else f

    def estimate(self, ctx) -> Dict[str, Any]:
        self.validate()
        f = self.features(ctx)
        rep = information_leakage(
            features=f, keep=ctx.keep, discrete=self.signal == "correct", n_neighbors=self.n_neighbors,
            classifier=self.classifier, n_folds=self.n_folds, js_method=self.js_method, bins=self.bins,
            max_samples=self.max_samples, n_resamples=self.n_resamples, confidence=float(self.confidence),
            seed=int(ctx.seed))
        interval = rep["mi_interval"]
        return {
            "value": rep["mi_nats"],
            **({"interval": interval} if interval else {}),
            "advantage_bound": rep["advantage_bound"],
            "value_is": "I(signal; membership) in nats, kNN estimate (Ross 2014), prior 1/2",
            "advantage_bound_is": ("g^-1(I), g(v) = log 2 - H_b((1+v)/2): the tight JS/TV (binary Fano) bound on "
                                   "the advantage of attacks that see only the signal"),
            "signal": self.signal if self.signal != "probs-sorted" else f"probs-sorted (top {f.shape[-1]})",
            "calibrate": self.calibrate,
            **{k: v for k, v in rep.items() if k not in ("mi_nats", "mi_interval", "advantage_bound")},
            "mi_interval": interval,
        }


__all__ = [
    "InfoBounds",
    "balanced_pairs",
    "calibrate_per_record",
    "cv_bayes",
    "inference_gain",
    "information_leakage",
    "js_histogram",
    "js_kde",
    "js_of_binary_pair",
    "mutual_information",
    "sorted_probs",
    "tv_bound_fano",
    "tv_bound_pinsker",
]
