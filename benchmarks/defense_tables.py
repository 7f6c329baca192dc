"""Regenerate the README's defense tables (issue 11) through the Python API (``mia_core.evaluate``).

    python benchmarks/defense_tables.py                     # every table
    python benchmarks/defense_tables.py --table quantize    # one of: quantize noise dp-sgd adv-reg adaptive

Each row is one evaluation of the default setting (digits, 16 MLPs, seed 0, every model a target)
with LiRA (online) and RMIA, sharing trained populations through a private cache. A row prints the
defense, its headline (bits, sigma, epsilon, ...), the targets' train and test accuracy and per
attack AUC [95% CI] / TPR at 1% FPR [95% CI]. ``dp-sgd`` rows add the accountant's epsilon, the
best attack's empirical epsilon lower bound at the same delta (the DP audit) and the training time
against non-private training of the same population.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import mia_core

ATTACKS = ("lira", "rmia")
TABLES = {
    "quantize": (None, "quantize:bits=8", "quantize:bits=4", "quantize:bits=4,granularity=per-channel",
                 "quantize:bits=2,granularity=per-channel", "quantize:method=ternary,ternary_sparsity=0.3",
                 "quantize:method=ternary", "quantize:method=ternary,ternary_sparsity=0.7", "quantize:method=sign"),
    "noise": (None, "noise:sigma=0.01", "noise:sigma=0.03", "noise:sigma=0.05", "noise:sigma=0.1", "noise:sigma=0.2"),
    "dp-sgd": (None, "dp-sgd:target_epsilon=8", "dp-sgd:target_epsilon=4", "dp-sgd:target_epsilon=1"),
    "adv-reg": (None, "adv-reg:gamma=1", "adv-reg:gamma=3", "prune", ("adv-reg:gamma=1", "prune")),
}


def _cells(m) -> str:
    cells = []
    for a in ATTACKS:
        r = m["attacks"][a]
        t = r["tpr_at_fpr"]["0.01"]
        lo, hi = r["auc_ci"]
        cells.append(f"{r['auc']:.3f} [{lo:.3f}, {hi:.3f}] / {100 * t['tpr']:.2f}% [{100 * t['ci_low']:.2f}, "
                     f"{100 * t['ci_high']:.2f}]")
    return " | ".join(cells)


def _headline(m) -> str:
    parts = []
    for d in m["defenses"]:
        r = d["report"]
        if d["name"] == "quantize":
            parts.append(f"{r['effective_bits']:g} bits, "
                         f"sparsity {100 * r.get('sparsity_after', 0):.0f}%")
        elif d["name"] == "noise":
            parts.append(f"σ={r['sigma']:g}, ‖w‖/‖θ‖={r['noise_to_signal']:.2f}")
        elif d["name"] == "dp-sgd":
            parts.append(f"σ={r['noise_multiplier']:.3f}, ε={r['epsilon']:.2f} (δ={r['delta']:g})")
        elif d["name"] == "prune":
            parts.append(f"sparsity {100 * r['achieved_sparsity']:.0f}%")
        else:
            parts.append(d["name"])
    audit = m.get("dp_audit")
    if audit:
        parts.append(f"audit: best lower bound {audit['best_lower_bound']:.2f} ({audit['best_attack']}) "
                     f"{'≤' if audit['consistent'] else '> !!'} ε")
    return "; ".join(parts) or "-"


def table(name, cache) -> None:
    print(f"\n### {name}\n")
    print("| defense | what it did | train acc | test acc | time | "
          + " | ".join(f"`{a}` AUC [95% CI] / TPR@1% FPR [95% CI]" for a in ATTACKS) + " |")
    print("|" + "---|" * (5 + len(ATTACKS)))
    for row in TABLES[name]:
        defenses = () if row is None else ((row,) if isinstance(row, str) else tuple(row))
        t0 = time.perf_counter()
        # dp-sgd rows time training from scratch (no cache), as does their baseline
        use_cache = None if name == "dp-sgd" else cache
        m = mia_core.evaluate(mia_core.EvalConfig(attacks=ATTACKS, defenses=defenses), cache=use_cache).metrics
        took = time.perf_counter() - t0
        t = m["target"]
        label = " + ".join(f"`{d}`" for d in defenses) or "none"
        print(f"| {label} | {_headline(m)} | {100 * t['train_accuracy']:.1f}% | {100 * t['test_accuracy']:.1f}% | "
              f"{took:.0f} s | {_cells(m)} |", flush=True)


def adaptive_table(cache) -> None:
    print("\n### adaptive (references defended like the target) vs non-adaptive (references undefended)\n")
    print("| defense | attacker | " + " | ".join(f"`{a}` AUC [95% CI] / TPR@1% FPR [95% CI]" for a in ATTACKS) + " |")
    print("|" + "---|" * (2 + len(ATTACKS)))
    for d in ("prune:sparsity=0.8,finetune_epochs=0", "quantize:method=ternary", "noise:sigma=0.1"):
        for adaptive in (True, False):
            m = mia_core.evaluate(mia_core.EvalConfig(attacks=ATTACKS, defenses=(d,), adaptive=adaptive),
                                  cache=cache).metrics
            print(f"| `{d}` | {'adaptive' if adaptive else 'non-adaptive'} | {_cells(m)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", choices=("all", "adaptive") + tuple(TABLES), default="all")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        for name in TABLES:
            if args.table in ("all", name):
                table(name, cache)
        if args.table in ("all", "adaptive"):
            adaptive_table(cache)


if __name__ == "__main__":
    main()
