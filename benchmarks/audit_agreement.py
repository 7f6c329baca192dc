"""Does `miafw audit` on a model trained outside miafw measure what `miafw eval` measures on a
model miafw trained with the same recipe?

For each seed, a textbook torch loop (Adam, lr 2e-3, batches of 64, 60 epochs, no miafw) trains
the default MLP (64-256-10, ReLU) on a random half of scikit-learn's digits; `mia_core.audit`
scores it from its state_dict (and from its logits, which must give the same scores) against 14
reference models miafw trains with the default recipe. Beside it, `mia_core.evaluate` scores
model 0 of the 16-model default population, the usual way. Reported per seed: LiRA's AUC and TPR
at 1% FPR with their 95% intervals, whether the intervals overlap, and the largest score
difference between the weights and the logits modes.

    python benchmarks/audit_agreement.py [--seeds 5] [--out benchmarks/results/audit_agreement.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import mia_core
from mia_core.engine.audit import AuditConfig, audit


def _textbook():
    """The user's side, as the tests write it (``tests/audit_helpers.py``: a plain torch loop, no
    miafw), loaded from its file so the benchmark trains its targets exactly as the tests do."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tests" / "audit_helpers.py"
    spec = importlib.util.spec_from_file_location("audit_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(m):
    t = m["tpr_at_fpr"]["0.01"]
    return {"auc": m["auc"], "auc_ci": m["auc_ci"], "tpr_1pct": t["tpr"], "tpr_1pct_ci": [t["ci_low"], t["ci_high"]]}


def _overlap(a, b):
    return bool(a[0] <= b[1] and b[0] <= a[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/audit_agreement.json")
    args = ap.parse_args()
    t = _textbook()
    digits, half, mlp, save_target, train_plain = t.digits, t.half, t.mlp, t.save_target, t.train_plain
    x, y = digits()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            members = half(len(y), seed=100 + seed)
            torch.manual_seed(100 + seed)
            net = train_plain(mlp(64, 10, 256), x, y, members, epochs=60, seed=100 + seed)
            files = save_target(tmp / f"t{seed}", net, x, members)
            cfg = mia_core.EvalConfig(attacks=("lira",), n_models=16, seed=seed)
            by_weights = audit(AuditConfig(cfg, members=str(files["members"]), weights=str(files["weights"])),
                               cache=tmp / "cache")
            by_logits = audit(AuditConfig(cfg, members=str(files["members"]), predictions=str(files["logits"])),
                              cache=tmp / "cache")
            usual = mia_core.evaluate(mia_core.EvalConfig(attacks=("lira",), n_models=16, seed=seed, targets="0"),
                                      cache=tmp / "cache")
            a, u = _row(by_weights.metrics["attacks"]["lira"]), _row(usual.metrics["attacks"]["lira"])
            row = {"seed": seed, "audit": a, "eval": u, "auc_overlap": _overlap(a["auc_ci"], u["auc_ci"]),
                   "tpr_overlap": _overlap(a["tpr_1pct_ci"], u["tpr_1pct_ci"]),
                   "max_score_diff_weights_vs_logits": float(np.abs(by_weights.scores["lira"]
                                                                    - by_logits.scores["lira"]).max()),
                   "target_test_accuracy": by_weights.metrics["target"]["test_accuracy"],
                   "eval_test_accuracy": usual.metrics["target"]["test_accuracy"],
                   "seconds": time.perf_counter() - t0}
            rows.append(row)
            print(f"seed {seed}: audit AUC {a['auc']:.3f} [{a['auc_ci'][0]:.3f}, {a['auc_ci'][1]:.3f}] "
                  f"TPR@1% {100 * a['tpr_1pct']:.1f}% [{100 * a['tpr_1pct_ci'][0]:.1f}, {100 * a['tpr_1pct_ci'][1]:.1f}] | "
                  f"eval AUC {u['auc']:.3f} [{u['auc_ci'][0]:.3f}, {u['auc_ci'][1]:.3f}] "
                  f"TPR@1% {100 * u['tpr_1pct']:.1f}% [{100 * u['tpr_1pct_ci'][0]:.1f}, {100 * u['tpr_1pct_ci'][1]:.1f}] | "
                  f"overlap {row['auc_overlap']}/{row['tpr_overlap']} | weights vs logits "
                  f"{row['max_score_diff_weights_vs_logits']:.1e} | {row['seconds']:.0f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
