"""Regenerate the README's "Results on the default" table.

    python benchmarks/leakage_table.py            # markdown table on stdout, ~1 minute on 2 cores

Runs ``miafw eval --json`` once per defense setting (the population is trained once and then
read from the cache) and prints AUC / TPR at 0.1% FPR [95% CI] / TPR at 1% FPR per attack,
plus the target models' accuracy and the achieved sparsity. Also times the quickstart command
from a cold start (new process, no cache).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time

ATTACKS = ["lira", "lira:online=false", "loss"]
DEFENSES = [None, "prune", "prune:sparsity=0.5,finetune_epochs=0", "prune:sparsity=0.8,finetune_epochs=0",
            "prune:sparsity=0.95"]
MIAFW = [sys.executable, "-m", "mia_core.cli"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run(MIAFW + ["eval", "-q", "--attack", "lira", "--defense", "prune", "--no-cache", "--out", tmp],
                       check=True, stdout=subprocess.DEVNULL)
        cold = time.perf_counter() - t0
        head = "| defense | sparsity | train acc | test acc | " + " | ".join(f"`{a}` AUC / TPR@0.1% [95% CI] / TPR@1%" for a in ATTACKS) + " |"
        print(head)
        print("|" + "---|" * (4 + len(ATTACKS)))
        for d in DEFENSES:
            cmd = MIAFW + ["eval", "--json", "--out", tmp, "--cache-dir", tmp + "/cache"]
            for a in ATTACKS:
                cmd += ["--attack", a]
            if d:
                cmd += ["--defense", d]
            m = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            t = m["target"]
            sp = m["defenses"][0]["report"]["achieved_sparsity"] if m["defenses"] else 0.0
            cells = []
            for a in ATTACKS:
                r = m["attacks"][a]
                lo, mid = r["tpr_at_fpr"]["0.001"], r["tpr_at_fpr"]["0.01"]
                cells.append(f"{r['auc']:.3f} / {100 * lo['tpr']:.1f}% [{100 * lo['ci_low']:.1f}, "
                             f"{100 * lo['ci_high']:.1f}] / {100 * mid['tpr']:.1f}%")
            print(f"| `{d or 'none'}` | {100 * sp:.0f}% | {100 * t['train_accuracy']:.1f}% | "
                  f"{100 * t['test_accuracy']:.1f}% | " + " | ".join(cells) + " |")
        print(f"\nquickstart `miafw eval --attack lira --defense prune`, cold start, no cache: {cold:.1f} s")


if __name__ == "__main__":
    main()
