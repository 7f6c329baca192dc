"""Regenerate the README's attack tables through the Python API (``mia_core.evaluate``).

    python benchmarks/attack_tables.py --table attacks   # every attack on the default experiment
    python benchmarks/attack_tables.py --table budget    # offline (and online) reference budgets
    python benchmarks/attack_tables.py                   # both

``attacks``: the default experiment (digits, 16 MLPs, seed 0, every model a target) with every
built-in attack at its defaults, plus the offline variants of the reference-model attacks and
LiRA with query augmentations. One population, one call, so every attack scores the same models.

``budget``: a 34-model population (16 reference pairs besides each target's own), every model a
target, scored by lira, rmia and bavaria with ``n_references`` = 1, 2, 4, 8 and all, offline
(k OUT references per record) and online (k references, half IN and half OUT). Offline RMIA tunes
its ``a`` on one reference pair as pseudo-target, which needs two pairs; at k = 1 it uses the
median of the values tuned at k = 2 (printed).

Each row prints AUC [95% bootstrap CI] and TPR at 0.1% and 1% FPR [95% Clopper-Pearson CI],
pooled over the targets; ``!`` marks a TPR backed by fewer than 1/FPR non-members.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import mia_core

ATTACKS = ("lira", "lira:online=false", "lira:augment=mirror-shift", "rmia", "rmia:online=false", "bavaria",
           "bavaria:online=false", "shadow", "quantile", "mentr", "confidence", "entropy", "loss",
           "loss:threshold=yeom", "gap")
BUDGET_MODELS = 34
BUDGETS = (1, 2, 4, 8, None)
#: The budget table's columns: the three attacks at their defaults, and BaVarIA with a weak prior
#: on the mean and (offline) the one-sided test, the diagnosis in plugins/attacks/bavaria.py.
NAMES = ("lira", "rmia", "bavaria", "bavaria:kappa0=0.01,offline_test=one-sided")


def _pct(t) -> str:
    mark = "" if t["resolvable"] else " !"
    return f"{100 * t['tpr']:.2f}% [{100 * t['ci_low']:.2f}, {100 * t['ci_high']:.2f}]{mark}"


def _row(label: str, r) -> str:
    lo, hi = r["auc_ci"]
    return (f"| `{label}` | {r['auc']:.3f} [{lo:.3f}, {hi:.3f}] | {_pct(r['tpr_at_fpr']['0.001'])} | "
            f"{_pct(r['tpr_at_fpr']['0.01'])} | {r['epsilon_lower_bound']:.2f} |")


HEAD = ("| attack | AUC [95% CI] | TPR @ 0.1% FPR [95% CI] | TPR @ 1% FPR [95% CI] | ε lower bound (δ=0) |\n"
        "|---|---|---|---|---|")


def attacks_table(cache) -> None:
    t0 = time.perf_counter()
    ev = mia_core.evaluate(mia_core.EvalConfig(attacks=ATTACKS), cache=cache)
    m = ev.metrics
    print(HEAD)
    order = sorted(ATTACKS, key=lambda a: -m["attacks"][a]["tpr_at_fpr"]["0.01"]["tpr"])
    for a in order:
        print(_row(a, m["attacks"][a]))
    t = m["target"]
    print(f"\n{t['pooled_over_targets']} targets; {m['attacks']['lira']['n_members']} member and "
          f"{m['attacks']['lira']['n_nonmembers']} non-member scores; target train accuracy "
          f"{100 * t['train_accuracy']:.1f}%, test {100 * t['test_accuracy']:.1f}%; {time.perf_counter() - t0:.0f} s")


def budget_table(cache) -> None:
    t0 = time.perf_counter()

    def run(specs):
        return mia_core.evaluate(mia_core.EvalConfig(attacks=specs, n_models=BUDGET_MODELS), cache=cache)

    pairs = (BUDGET_MODELS - 2) // 2
    print(f"population: {BUDGET_MODELS} models, {pairs} reference pairs per target\n")
    for online in (False, True):
        mode = "online" if online else "offline"
        budgets = [k for k in BUDGETS if k is None or not online or k % 2 == 0]
        specs, labels = [], {}
        for k in budgets:
            for name in NAMES:
                base, _, extra = name.partition(":")
                parts = [] if online else ["online=false"]
                if k is not None:
                    parts.append(f"n_references={k}")
                if extra:
                    parts += [p for p in extra.split(",") if online is False or "offline_test" not in p]
                spec = base + (":" + ",".join(parts) if parts else "")
                labels[spec] = (name, k)
                specs.append(spec)
        tuned_note = ""
        if not online:  # offline RMIA at k = 1 cannot tune a: use the median tuned at k = 2
            probe = run(["rmia:online=false,n_references=2"])
            a_values = list(probe.plan.attacks[0].plugin.offline_a_.values())
            a = statistics.median(a_values)
            specs = [s if s != "rmia:online=false,n_references=1" else f"rmia:online=false,n_references=1,offline_a={a:g}"
                     for s in specs]
            labels = {(k if k != "rmia:online=false,n_references=1" else f"rmia:online=false,n_references=1,offline_a={a:g}"): v
                      for k, v in labels.items()}
            tuned_note = f" (offline RMIA at k=1: a = {a:g}, the median of the a tuned per target at k=2: {sorted(a_values)})"
        m = run(specs).metrics
        print(f"### {mode}{tuned_note}\n")
        print("| n_references | " + " | ".join(f"`{n}` AUC / TPR@0.1% / TPR@1%" for n in NAMES) + " |")
        print("|---|" + "---|" * len(NAMES))
        for k in budgets:
            cells = []
            for name in NAMES:
                spec = next(s for s, v in labels.items() if v == (name, k))
                r = m["attacks"][spec]
                lo, hi = r["auc_ci"]
                cells.append(f"{r['auc']:.3f} [{lo:.3f}, {hi:.3f}] / {_pct(r['tpr_at_fpr']['0.001'])} / "
                             f"{_pct(r['tpr_at_fpr']['0.01'])}")
            shown = "all" if k is None else str(k)
            print(f"| {shown} | " + " | ".join(cells) + " |")
        print()
    print(f"{time.perf_counter() - t0:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", choices=("attacks", "budget", "both"), default="both")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        if args.table in ("attacks", "both"):
            attacks_table(cache)
        if args.table in ("budget", "both"):
            budget_table(cache)


if __name__ == "__main__":
    main()
