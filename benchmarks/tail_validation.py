"""Validate the ``tail`` estimator (Dodd et al. 2025) against LiRA across miafw's defenses (issue 12).

    OMP_NUM_THREADS=1 python benchmarks/tail_validation.py [--cache-dir DIR] [--only NAME ...]

Each row is one evaluation of the default setting (digits, 16 MLPs, seed 0, every model a target)
through the Python API, ``mia_core.evaluate(EvalConfig(attacks=("lira",), estimators=("tail",),
defenses=(d,)))``, sharing trained populations through the population cache (post-training
defenses reuse the undefended population). A row prints the estimator's prediction of LiRA's TPR at
1% FPR [its bootstrap interval over records] beside what LiRA measured: pooled over the 16 targets
(as miafw's table reports it) with its Clopper–Pearson interval, and the mean of the per-target
values (the quantity the estimator predicts: a per-model TPR, averaged). It also prints the tail
statistic's head-side counterpart (the LOSS attack's own TPR at 1% FPR, no reference models either)
as a baseline. At the end: Pearson's and Spearman's correlation of prediction and measurement over
the settings, for the tail estimator and for the baseline, and the mean absolute error.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats

import mia_core
from mia_core import metrics
from mia_core.engine.cache import default_cache_dir

FPR = 0.01
SETTINGS = (
    None,
    "prune:sparsity=0.5", "prune:sparsity=0.8", "prune:sparsity=0.95",
    "prune:sparsity=0.5,finetune_epochs=0", "prune:sparsity=0.8,finetune_epochs=0",
    "prune:sparsity=0.95,finetune_epochs=0",
    "quantize:bits=8", "quantize:bits=4", "quantize:bits=2", "quantize:method=ternary",
    "noise:sigma=0.03", "noise:sigma=0.1", "noise:sigma=0.2",
    "weight-decay:lam=0.001", "weight-decay:lam=0.01", "weight-decay:lam=0.03",
    "dp-sgd:target_epsilon=8",
    "adv-reg:gamma=1",
)


def run(setting, cache):
    defenses = () if setting is None else (setting,)
    ev = mia_core.evaluate(mia_core.EvalConfig(attacks=("lira",), estimators=("tail",), defenses=defenses),
                           cache=cache)
    m = ev.metrics
    lira = m["attacks"]["lira"]["tpr_at_fpr"][format(FPR, ".12g")]
    per_target = [metrics.tpr_at_fpr(s, mem, FPR).tpr for s, mem in zip(ev.scores["lira"], ev.membership)]
    est = m["estimators"]["tail"]
    return {
        "setting": setting or "none",
        "pred": est["value"], "pred_ci": est["interval"],
        "baseline": est["report"]["loss_tpr_at_fpr"],
        "pooled": lira["tpr"], "pooled_ci": (lira["ci_low"], lira["ci_high"]),
        "per_target": float(np.mean(per_target)),
        "test_acc": m["target"]["test_accuracy"], "train_acc": m["target"]["train_accuracy"],
    }


def _pct(v):
    return f"{100 * v:.2f}"


def correlations(rows, key, target):
    x = np.array([r[key] for r in rows])
    y = np.array([r[target] for r in rows])
    return stats.pearsonr(x, y)[0], stats.spearmanr(x, y)[0], float(np.abs(x - y).mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=str(default_cache_dir()))
    ap.add_argument("--only", nargs="*", help="run only these settings (as written in SETTINGS; 'none' for no defense)")
    args = ap.parse_args()
    settings = SETTINGS if not args.only else [s for s in SETTINGS if (s or "none") in args.only]
    rows = []
    print("| defense | train / test acc | `tail` predicted TPR@1% [95% CI] | LOSS TPR@1% (baseline) | "
          "LiRA TPR@1% pooled [95% CI] | LiRA TPR@1% per-target mean | time |")
    print("|---|---|---|---|---|---|---|")
    for s in settings:
        t0 = time.perf_counter()
        r = run(s, args.cache_dir)
        took = time.perf_counter() - t0
        rows.append(r)
        lo, hi = r["pred_ci"]
        plo, phi = r["pooled_ci"]
        print(f"| `{r['setting']}` | {100 * r['train_acc']:.1f}% / {100 * r['test_acc']:.1f}% | "
              f"{_pct(r['pred'])}% [{_pct(lo)}, {_pct(hi)}] | {_pct(r['baseline'])}% | "
              f"{_pct(r['pooled'])}% [{_pct(plo)}, {_pct(phi)}] | {_pct(r['per_target'])}% | {took:.0f} s |",
              flush=True)
    if len(rows) < 3:
        return
    print()
    print("| predictor | against LiRA | Pearson r | Spearman ρ | mean abs. error (points of TPR) |")
    print("|---|---|---|---|---|")
    for key, name in (("pred", "`tail` (LOSS TNR at FNR 1%)"), ("baseline", "LOSS TPR at FPR 1%")):
        for target, tname in (("pooled", "pooled"), ("per_target", "per-target mean")):
            p, sp, mae = correlations(rows, key, target)
            print(f"| {name} | {tname} | {p:.3f} | {sp:.3f} | {100 * mae:.2f} |")


if __name__ == "__main__":
    main()
