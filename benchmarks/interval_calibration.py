"""Are the intervals `miafw eval` reports as wide as the run-to-run spread they stand for?

An experiment (16 MLPs, LiRA and the loss threshold; by default on digits) is evaluated for seeds
0..S-1. Each seed draws new memberships, initialisations and batch orders. On digits the records
stay the same 1,797, so the spread across seeds is the variability *given these records*; an
interval that resamples records also counts the variability of drawing the records, which that
spread leaves out. A dataset spec holding ``{seed}`` (e.g.
``synthetic:kind=mixture,n_records=2000,dim=20,seed={seed}``) draws fresh records for every seed,
and then the spread is the whole sampling variability the intervals stand for. For the AUC
(bootstrap over records) and TPR at 1% FPR (Clopper-Pearson over members, the threshold taken as
given), the table compares the standard deviation across seeds with the mean standard error the
intervals imply (half-width / 1.96). A ratio above 1 means the interval is too narrow. Two
candidate replacements for TPR's interval are measured beside it: the percentile bootstrap that
re-thresholds in every resample, resampling records, and resampling records and target models
together (pigeonhole), 200 resamples each.

    python benchmarks/interval_calibration.py [--seeds 10] [--dataset SPEC]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

import mia_core
from mia_core import metrics as M


def _tpr_bootstrap(scores, membership, *, crossed: bool, seed: int, n_boot: int = 200, fpr: float = 0.01):
    """Percentile interval of TPR at ``fpr`` from resamples that re-threshold (private helpers of
    :mod:`mia_core.metrics`: the weighted statistics its AUC bootstrap uses)."""
    t, n = membership.shape
    s, m = scores.ravel(), membership.ravel()
    order = np.argsort(s, kind="stable")
    p = M._prepare(s, m, None)
    rows = np.repeat(np.arange(t), n) if crossed else np.zeros(t * n, dtype=int)
    factors = M._crossed_factors(s.size, rows, np.tile(np.arange(n), t), order)
    rng = np.random.default_rng(seed)
    out = [M._weighted_stats(p, M._pigeonhole_weights(rng, factors, min(64, n_boot - lo), s.size), (fpr,))[2][:, 0]
           for lo in range(0, n_boot, 64)]
    return tuple(np.quantile(np.concatenate(out), [0.025, 0.975]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--dataset", default="digits", help="dataset spec; {seed} is replaced by the seed")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory() as cache:
        for seed in range(args.seeds):
            ev = mia_core.evaluate(mia_core.EvalConfig(seed=seed, attacks=("lira", "loss"),
                                                       dataset=args.dataset.replace("{seed}", str(seed))), cache=cache)
            for label, m in ev.metrics["attacks"].items():
                t = m["tpr_at_fpr"]["0.01"]
                sc = ev.scores[label]
                rows.setdefault(label, []).append((
                    m["auc"], *m["auc_ci"], t["tpr"], t["ci_low"], t["ci_high"],
                    t["tpr"], *_tpr_bootstrap(sc, ev.membership, crossed=False, seed=seed),
                    t["tpr"], *_tpr_bootstrap(sc, ev.membership, crossed=True, seed=seed)))
    print("| attack | metric | mean | sd across seeds | mean SE implied by the interval | ratio |")
    print("|---|---|---|---|---|---|")
    for label, v in rows.items():
        v = np.array(v)
        for name, k in (("AUC (bootstrap, records)", 0), ("TPR@1% (Clopper-Pearson)", 3),
                        ("TPR@1% (bootstrap, records)", 6), ("TPR@1% (bootstrap, records x targets)", 9)):
            sd = v[:, k].std(ddof=1)
            se = ((v[:, k + 2] - v[:, k + 1]) / 2 / 1.96).mean()
            print(f"| {label} | {name} | {v[:, k].mean():.4f} | {sd:.4f} | {se:.4f} | {sd / se:.2f} |")
    print(f"({args.dataset}, {args.seeds} seeds, {time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
