"""How much does DP-SGD cost over plain training, on each of the trainer's per-sample routes?

The default population (digits, 16 MLPs 64-256-10, Adam, 60 epochs) is trained three ways in one
process: without a defense (the stacked MLP route, manual backward), with `dp-sgd` on the
torch.func route (per-sample gradients materialised by `vmap(grad)`, then clipped; forced with
`manual_backward=False`), and with `dp-sgd` on the route that never materialises them (per-sample
norms from each linear layer's inputs and output gradients, the clipped sum as one batched GEMM
per layer). DP-SGD trains with Poisson sampling at the same expected batch size, so its steps
match plain training's in number. Each configuration runs `--repeats` times; the table gives the
best time and the ratios.

    python benchmarks/dp_sgd_speed.py [--repeats 3] [--epochs 60]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

import mia_core
from mia_core.engine.stages import load_records, resolve
from mia_core.engine.trainer import Trainer, init_ensemble, make_keep_matrix
from mia_plugins.defenses.dp_sgd import DPSGD


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--n-models", type=int, default=16)
    args = ap.parse_args(argv)
    plan = resolve(mia_core.EvalConfig())
    records = load_records(plan)
    recipe = mia_core.TrainingRecipe(epochs=args.epochs)
    x = torch.from_numpy(records.x)
    y = torch.from_numpy(records.y)
    keep = make_keep_matrix(args.n_models, records.n, np.random.default_rng(0))
    build = lambda: plan.model.plugin.build(records.n_features, records.n_classes)  # noqa: E731
    rows = {}
    for label, defenses, manual in (("no defense", False, True), ("dp-sgd, torch.func per-sample route", True, False),
                                    ("dp-sgd, per-sample norms route", True, True)):
        best, backward = float("inf"), None
        for _ in range(args.repeats):
            base, params, buffers = init_ensemble(build, args.n_models, seed=0)
            ds = [DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)] if defenses else []
            t0 = time.perf_counter()
            res = Trainer(base, params, buffers, x, y, keep, recipe, seed=0, defenses=ds, manual_backward=manual).fit()
            best = min(best, time.perf_counter() - t0)
            backward = res.backward
        rows[label] = (best, backward, res.steps)
        print(f"{label}: {best:.2f} s ({backward}, {res.steps} steps)", file=sys.stderr)
    plain = rows["no defense"][0]
    print(f"| training ({args.n_models} MLPs, {args.epochs} epochs, torch threads {torch.get_num_threads()}) | backward "
          f"| steps | best of {args.repeats} | x plain training |")
    print("|---|---|---|---|---|")
    for label, (t, backward, steps) in rows.items():
        print(f"| {label} | {backward} | {steps} | {t:.2f} s | {t / plain:.2f} |")
    old = rows["dp-sgd, torch.func per-sample route"][0]
    print(f"\nthe per-sample norms route is {old / rows['dp-sgd, per-sample norms route'][0]:.1f}x the torch.func route")
    return 0


if __name__ == "__main__":
    sys.exit(main())
