"""Regenerate the README's result tables through the Python API (``mia_core.evaluate``).

    python benchmarks/leakage_table.py                   # both tables, a few minutes on 2 cores
    python benchmarks/leakage_table.py --table prune     # post-training defenses on the default population
    python benchmarks/leakage_table.py --table weight-decay   # the weight-decay (train-time) grid

Each row is one evaluation of the default setting (digits, 16 MLPs, seed 0, every model a target)
with three attacks; post-training rows share one trained population through a private cache. Each
row prints AUC / TPR at 0.1% FPR [95% CI] / TPR at 1% FPR per attack, the target models'
accuracy and the defense's headline number. The ``prune`` table also times the quickstart command
from a cold start (a new process, no cache).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import mia_core

ATTACKS = ("lira", "lira:online=false", "loss")
PRUNE_ROWS = (None, "prune", "prune:sparsity=0.5,finetune_epochs=0", "prune:sparsity=0.8,finetune_epochs=0",
              "prune:sparsity=0.95")
WEIGHT_DECAY_ROWS = (None, "weight-decay:lam=0.0001", "weight-decay:lam=0.001", "weight-decay:lam=0.003",
                     "weight-decay:lam=0.01", "weight-decay:lam=0.03")


def _cells(m) -> str:
    cells = []
    for a in ATTACKS:
        r = m["attacks"][a]
        lo, mid = r["tpr_at_fpr"]["0.001"], r["tpr_at_fpr"]["0.01"]
        cells.append(f"{r['auc']:.3f} / {100 * lo['tpr']:.1f}% [{100 * lo['ci_low']:.1f}, "
                     f"{100 * lo['ci_high']:.1f}] / {100 * mid['tpr']:.1f}%")
    return " | ".join(cells)


def _accuracy(m) -> str:
    t = m["target"]
    return f"{100 * t['train_accuracy']:.1f}% | {100 * t['test_accuracy']:.1f}%"


def table(rows, headline, head, cache) -> None:
    print(f"| defense | {head} | train acc | test acc | "
          + " | ".join(f"`{a}` AUC / TPR@0.1% [95% CI] / TPR@1%" for a in ATTACKS) + " |")
    print("|" + "---|" * (4 + len(ATTACKS)))
    for d in rows:
        config = mia_core.EvalConfig(attacks=ATTACKS, defenses=(d,) if d else ())
        m = mia_core.evaluate(config, cache=cache).metrics
        print(f"| `{d or 'none'}` | {headline(m)} | {_accuracy(m)} | {_cells(m)} |", flush=True)


def _sparsity(m) -> str:
    return f"{100 * m['defenses'][0]['report']['achieved_sparsity']:.0f}%" if m["defenses"] else "0%"


def _norm(m) -> str:
    if not m["defenses"]:
        return "-"
    return f"{m['defenses'][0]['report']['param_norm_mean']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--table", choices=("all", "prune", "weight-decay"), default="all")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.table in ("all", "prune"):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mia_core.cli", "eval", "-q", "--attack", "lira", "--defense",
                            "prune", "--no-cache", "--out", tmp], check=True, stdout=subprocess.DEVNULL)
            cold = time.perf_counter() - t0
            table(PRUNE_ROWS, _sparsity, "sparsity", tmp + "/cache")
            print(f"\nquickstart `miafw eval --attack lira --defense prune`, cold start, no cache: {cold:.1f} s\n")
        if args.table in ("all", "weight-decay"):
            table(WEIGHT_DECAY_ROWS, _norm, "mean ‖θ‖ after training", tmp + "/cache")


if __name__ == "__main__":
    main()
