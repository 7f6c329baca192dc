"""The shadow-model attack of Shokri et al. 2017: a classifier trained on reference models."""

from __future__ import annotations

import warnings
from typing import Dict, Literal, Optional, Sequence, Tuple

import numpy as np
from threadpoolctl import threadpool_limits

from mia_core.base import Attack
from mia_core.params import check_n_references

#: Feature names ``features=`` accepts, in the order they are documented in :class:`ShadowAttack`.
FEATURES: Tuple[str, ...] = ("sorted-probs", "logits", "entropy", "confidence", "true-prob", "loss", "label")
#: The attack classifiers ``classifier=`` accepts.
CLASSIFIERS: Tuple[str, ...] = ("logreg", "svc", "mlp", "rf", "hgb")
#: A per-class attack model needs at least this many IN and this many OUT training rows of its
#: class; a class with fewer is scored by the global model instead.
MIN_CLASS_ROWS = 10
#: Floor on probabilities before a logarithm (float64's smallest normal number): keeps the
#: log-probability features finite when a softmax output underflows to 0.
_TINY = np.finfo(np.float64).tiny


def parse_features(text) -> Tuple[str, ...]:
    """The feature names in ``text`` (a comma- or ``+``-separated string), validated.

    Raises:
        ValueError: ``text`` is not a string, names an unknown feature, repeats one, or has no
            feature other than ``label``.
    """
    if not isinstance(text, str):
        raise ValueError(f"features must be a comma-separated string of {', '.join(FEATURES)}; got {text!r}")
    names = tuple(p.strip() for p in text.replace("+", ",").split(","))
    bad = [n for n in names if n not in FEATURES]
    if bad:
        raise ValueError(f"features: unknown feature {bad[0]!r} in {text!r}; allowed: {', '.join(FEATURES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"features: {text!r} names a feature twice")
    if all(n == "label" for n in names):
        raise ValueError(f"features: {text!r} has no model signal; add one of {', '.join(FEATURES[:-1])}")
    return names


def attack_features(*, probs, labels, features: Sequence[str], loss=None, confidence=None) -> np.ndarray:
    """The attack model's input for every (model, record): Shokri et al.'s view of the prediction
    vector (its attack model's input), and the per-record statistics later attacks reduce it to.

    Args:
        probs: float ``[..., N, C]`` softmax outputs (one model: ``[N, C]``; ``R`` models:
            ``[R, N, C]``).
        labels: int ``[N]`` true labels.
        features: names from :data:`FEATURES`, concatenated in the given order:

            * ``sorted-probs`` — the probability vector sorted in descending order (``C``
              columns): the shape of the prediction, whatever the class (Salem et al. 2019 sort
              it so one attack model serves every class; Shokri et al. keep the class order and
              train one attack model per class instead, which ``per_class`` reproduces);
            * ``logits`` — the logit vector up to its per-record additive constant, recovered
              from ``probs`` as the centred log-probabilities ``log p - mean_c log p`` (``C``
              columns; exact where no probability underflows to 0 in float64, otherwise
              log-probabilities are floored at ``log(tiny)``);
            * ``entropy`` — ``-sum_c p_c log p_c`` (Shannon entropy, nats);
            * ``confidence`` — LiRA's logit-scaled confidence of the true label,
              ``log p_y - log sum_{y' != y} p_y'`` (Carlini et al. 2022, eq. 4);
            * ``true-prob`` — the true label's probability ``p_y``;
            * ``loss`` — cross-entropy ``-log p_y``;
            * ``label`` — the true label one-hot (``C`` columns).

        loss, confidence: optional float ``[..., N]`` precomputed signals (the engine computes
            them from the logits, exactly even when ``p_y`` rounds to 1); computed from ``probs``
            when not given.

    Returns:
        float64 ``[..., N, F]``, ``F`` the total number of columns. Non-finite values (e.g. the
        confidence of a single-class problem) are clipped to finite ones.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if p.ndim < 2 or y.shape != (p.shape[-2],):
        raise ValueError(f"probs must be [..., N, C] and labels [N]; got {p.shape} and {y.shape}")
    c = p.shape[-1]
    if y.size and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}); got range [{y.min()}, {y.max()}]")
    onehot = np.zeros(p.shape[-2:], dtype=bool)
    onehot[np.arange(y.size), y] = True
    p_y = np.where(onehot, p, 0.0).sum(axis=-1)
    logp = np.log(np.maximum(p, _TINY))
    cols = []
    for name in features:
        if name == "sorted-probs":
            cols.append(-np.sort(-p, axis=-1))
        elif name == "logits":
            cols.append(logp - logp.mean(axis=-1, keepdims=True))
        elif name == "entropy":
            cols.append(-(np.where(p > 0, p * logp, 0.0)).sum(axis=-1, keepdims=True))
        elif name == "confidence":
            if confidence is None:
                rest = np.where(onehot, 0.0, p).sum(axis=-1)
                confidence = np.log(np.maximum(p_y, _TINY)) - np.log(np.maximum(rest, _TINY)) if c > 1 \
                    else np.full(p_y.shape, np.inf)
            cols.append(np.asarray(confidence, dtype=np.float64)[..., None])
        elif name == "true-prob":
            cols.append(p_y[..., None])
        elif name == "loss":
            if loss is None:
                loss = -np.log(np.maximum(p_y, _TINY))
            cols.append(np.asarray(loss, dtype=np.float64)[..., None])
        elif name == "label":
            cols.append(np.broadcast_to(onehot.astype(np.float64), p.shape))
        else:
            raise ValueError(f"unknown feature {name!r}; allowed: {', '.join(FEATURES)}")
    out = np.concatenate(cols, axis=-1)
    big = np.finfo(np.float64).max / 1e6  # finite, and still far beyond any real signal
    return np.nan_to_num(out, nan=0.0, posinf=big, neginf=-big)


def make_classifier(name: str, *, seed: int):
    """A fresh, unfitted scikit-learn attack classifier (seeded, single-threaded where it matters).

    ``logreg``: standardised logistic regression (L2, C = 1); ``svc``: standardised RBF SVM
    (C = 1, gamma = "scale"; cost grows quadratically with the rows, see ``max_train``);
    ``mlp``: standardised MLP with one hidden layer of 64 ReLU units, as Shokri et al.'s attack
    models are small neural networks; ``rf``: a random forest of 100 trees (min 5
    records a leaf); ``hgb``: histogram gradient boosting (100 rounds, no early stopping).
    """
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    seed = int(seed) % (2**32)
    if name == "logreg":
        return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    if name == "svc":
        return make_pipeline(StandardScaler(), SVC(C=1.0, kernel="rbf", gamma="scale", random_state=seed))
    if name == "mlp":
        return make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=300,
                                                             random_state=seed))
    if name == "rf":
        return RandomForestClassifier(n_estimators=100, min_samples_leaf=5, random_state=seed, n_jobs=1)
    if name == "hgb":
        return HistGradientBoostingClassifier(max_iter=100, early_stopping=False, random_state=seed)
    raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}; got {name!r}")


def member_score(model, x: np.ndarray) -> np.ndarray:
    """The fitted attack model's membership score for rows ``x`` ``[K, F]``: float64 ``[K]``.

    The member log-odds (``decision_function``) where the classifier has one (logreg, svc, hgb):
    a strictly increasing function of the member probability, so the same ranking, without the
    float saturation at probability 1 that would tie the most confident members; the member
    probability (``predict_proba``) otherwise (mlp, rf). Ties are left as they are.
    """
    if len(x) == 0:
        return np.zeros(0)
    with threadpool_limits(limits=1, user_api="openmp"):
        return _member_score(model, x)


def _member_score(model, x: np.ndarray) -> np.ndarray:
    if hasattr(model, "decision_function"):
        s = np.asarray(model.decision_function(x), dtype=np.float64)
    else:
        classes = list(model.classes_)
        s = np.asarray(model.predict_proba(x), dtype=np.float64)[:, classes.index(1)]
    return np.nan_to_num(s, nan=0.0, posinf=np.finfo(np.float64).max, neginf=-np.finfo(np.float64).max)


def _subsample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.arange(n)
    return idx if n <= cap else np.sort(rng.choice(n, size=cap, replace=False))


def fit_attack_models(*, x, member, labels, classifier: str, per_class: bool, max_train: int,
                      seed: int) -> Dict[Optional[int], object]:
    """Train the attack model(s) on reference rows (Shokri et al. 2017, "training the attack
    model": shadow outputs labelled "in" or "out", one attack model per output class).

    Args:
        x: float ``[K, F]`` attack features of (reference model, record) rows.
        member: bool ``[K]`` whether that reference model trained on that record (the label).
        labels: int ``[K]`` each row's record label (used when ``per_class``).
        classifier: a name from :data:`CLASSIFIERS`.
        per_class: one model per class, as in the paper, plus the global model for classes with
            fewer than :data:`MIN_CLASS_ROWS` IN or OUT rows.
        max_train: at most this many rows per model (a seeded subsample without replacement).
        seed: seeds the subsample and the classifiers.

    Returns:
        ``{None: global model, c: class-c model, ...}``; the global model is present unless
        every class in ``labels`` has its own.
    """
    x = np.asarray(x, dtype=np.float64)
    member = np.asarray(member, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    if x.ndim != 2 or member.shape != (len(x),) or labels.shape != (len(x),):
        raise ValueError(f"x must be [K, F] with member and labels [K]; got {x.shape}, {member.shape}, {labels.shape}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x736864]))
    models: Dict[Optional[int], object] = {}

    def fit(rows):
        rows = rows[_subsample(len(rows), max_train, rng)]
        if member[rows].all() or not member[rows].any():
            raise ValueError("the attack model's training rows must hold both IN and OUT examples")
        # one OpenMP thread (hgb): on attack-sized data, thread start-up on a loaded machine cost
        # more than it saved (a boosted fit of 120 rows: 0.08 s against 0.62 s on 2 shared cores)
        with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="openmp"):
            warnings.simplefilter("ignore")  # ConvergenceWarning of small MLP/logreg fits
            return make_classifier(classifier, seed=int(rng.integers(2**32))).fit(x[rows], member[rows].astype(int))

    need_global = not per_class
    if per_class:
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            n_in = int(member[rows].sum())
            if min(n_in, len(rows) - n_in) >= MIN_CLASS_ROWS:
                models[int(c)] = fit(rows)
            else:
                need_global = True
    if need_global:
        models[None] = fit(np.arange(len(x)))
    return models


def score_with_models(models: Dict[Optional[int], object], *, x, labels) -> np.ndarray:
    """Score rows ``x`` ``[K, F]`` with labels ``[K]``: each row by its class's model, or by the
    global one (key ``None``) when its class has none. Returns float64 ``[K]``."""
    x = np.asarray(x, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    out = np.zeros(len(x))
    own = np.zeros(len(x), dtype=bool)
    for c, model in models.items():
        if c is None:
            continue
        rows = np.flatnonzero(labels == c)
        out[rows] = member_score(model, x[rows])
        own[rows] = True
    rest = np.flatnonzero(~own)
    if rest.size:
        out[rest] = member_score(models[None], x[rest])
    return out


class ShadowAttack(Attack):
    """Shadow-model attack: a classifier trained on reference models' outputs (Shokri, Stronati,
    Song, Shmatikov 2017).

    The reference models play Shokri et al.'s shadow models (their "shadow training" technique): for target ``t``, every
    (reference model, record) pair becomes a training row of the attack model, its features the
    reference model's output on the record (see :func:`attack_features`) and its label whether
    the reference model trained on the record (``view.ref_keep``). The trained attack
    model is then applied to the target's outputs; the score is its member log-odds or member
    probability (see :func:`member_score`), higher = member.

    Because the references depend on the target (the target and its complementary partner are
    excluded), the attack model is trained inside ``score(t, ...)`` on all records of the
    references and every record's score for ``t`` is cached, so a record's score does not depend
    on the records asked for with it.

    Args:
        features: a comma- (or ``+``-) separated list from ``sorted-probs``, ``logits``,
            ``entropy``, ``confidence`` (LiRA's logit-scaled confidence of the true label),
            ``true-prob`` (``p_y``), ``loss`` and ``label`` (the true label one-hot); see
            :func:`attack_features`. The default ``sorted-probs,loss`` is the prediction vector
            as the attack model sees it plus how well it fits the true label. On the command line
            quote the value (``shadow:features="sorted-probs,entropy"``) or use ``+``.
        classifier: ``logreg``, ``svc``, ``mlp``, ``rf`` or ``hgb`` (see :func:`make_classifier`);
            default ``logreg``, the fastest (milliseconds per target), and on the planted
            population as good as the nonlinear ones (AUC 0.90 against 0.87-0.89).
        per_class: one attack model per true class, as Shokri et al. train one per output class;
            a class with fewer than :data:`MIN_CLASS_ROWS` IN or OUT training rows falls back
            to a global model trained on every row.
        n_references: reference budget (``None``: all ``M - 2``), an even number: ``k / 2`` IN and
            ``k / 2`` OUT references per record (see ``AttackContext.for_target``).
        max_train: at most this many training rows per attack model, a seeded subsample, so the
            attack stays fast on large populations (``svc`` scales quadratically with it).

    Access: the class declares ``("probs",)``, the black-box probability vector Shokri et al.'s
    attacker sees, and every feature is computed from it: the ``logits`` feature is the logit
    vector up to its per-record additive constant (the softmax removes it, so no probability
    vector reveals more), ``confidence`` and ``loss`` come from the engine's signals, which the
    ``probs`` level reveals.

    Differences from the paper: the shadow models are the population's reference models (same
    architecture and recipe, disjoint halves of the same records) instead of models trained on
    synthetic or noisy data; the attack model is any of five scikit-learn classifiers rather than
    only a neural network; the prediction vector may be sorted and reduced to per-record
    statistics; one global model is the default (``per_class=True`` is the paper's design).
    """

    api_version = "1.0"

    access = ("probs",)
    min_reference_models = 2  # one IN and one OUT reference per record
    reference = (
        "R. Shokri, M. Stronati, C. Song, V. Shmatikov. Membership Inference Attacks Against Machine "
        "Learning Models. IEEE S&P 2017. arXiv:1610.05820"
    )

    def __init__(self, features: str = "sorted-probs,loss",
                 classifier: Literal["logreg", "svc", "mlp", "rf", "hgb"] = "logreg", per_class: bool = False,
                 n_references: Optional[int] = None, max_train: int = 20000):
        self.features = features
        self.classifier = classifier
        self.per_class = per_class
        self.n_references = n_references
        self.max_train = max_train

    def validate(self) -> None:
        parse_features(self.features)
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier must be one of {', '.join(CLASSIFIERS)}; got {self.classifier!r}")
        if not isinstance(self.per_class, bool):
            raise ValueError(f"per_class must be true or false, got {self.per_class!r}")
        check_n_references(self.n_references, even=True)
        m = self.max_train
        if isinstance(m, bool) or not isinstance(m, int) or m < 2 * MIN_CLASS_ROWS:
            raise ValueError(f"max_train must be an integer >= {2 * MIN_CLASS_ROWS}, got {m!r}")

    def fit(self, ctx) -> "ShadowAttack":
        self.validate()
        n_refs = ctx.n_models - 2
        if n_refs < self.min_reference_models:
            raise ValueError(f"the shadow attack needs at least {self.min_reference_models} reference models besides "
                             f"the target and its partner (n_models >= {self.min_reference_models + 2}); got "
                             f"n_models={ctx.n_models}")
        if self.n_references is not None and self.n_references > n_refs:
            raise ValueError(f"n_references={self.n_references} exceeds the {n_refs} references a population of "
                             f"{ctx.n_models} models has besides the target and its partner")
        self.features_ = parse_features(self.features)
        self.ctx_ = ctx
        self.scores_: Dict[int, np.ndarray] = {}  # target -> scores of every record
        return self

    def _signals(self, read) -> Dict[str, np.ndarray]:
        """The signals the chosen features need, read through ``read(name)``."""
        out = {"probs": read("probs")}
        if "loss" in self.features_:
            out["loss"] = read("loss")
        if "confidence" in self.features_:
            out["confidence"] = read("confidence")
        return out

    def _scores_for(self, target: int) -> np.ndarray:
        view = self.ctx_.for_target(target, n_references=self.n_references, online=True)
        labels = np.asarray(self.ctx_.labels, dtype=np.int64)
        ref = attack_features(labels=labels, features=self.features_, **self._signals(view.ref_signal))
        r, n, f = ref.shape
        models = fit_attack_models(
            x=ref.reshape(r * n, f), member=np.asarray(view.ref_keep, dtype=bool).reshape(r * n),
            labels=np.broadcast_to(labels, (r, n)).reshape(r * n), classifier=self.classifier,
            per_class=self.per_class, max_train=self.max_train,
            seed=int(np.random.SeedSequence([self.ctx_.seed, int(target)]).generate_state(1)[0]))
        obs = attack_features(labels=labels, features=self.features_, **self._signals(view.target_signal))
        return score_with_models(models, x=obs, labels=labels)

    def score(self, target: int, records: np.ndarray) -> np.ndarray:
        target = int(target)
        if target not in self.scores_:
            self.scores_[target] = self._scores_for(target)
        return self.scores_[target][np.asarray(records, dtype=np.int64)].copy()
