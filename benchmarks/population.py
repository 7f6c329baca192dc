"""Benchmark population training: the vectorized ensemble against a per-model torch loop.

The product path (:meth:`mia_core.engine.ModelPopulation.train`) trains M MLPs (the default
recipe on sklearn digits: MLP 64-256-10 ReLU, Adam lr 2e-3, batch 64, 60 epochs, each model on
its random half of the 1,797 records) against the loop a user would write: one ``nn.Module`` and
one ``torch.optim.Adam`` per model, the same batch size and epochs over the same halves. Both run
in ONE process, interleaved and repeated (the minimum is kept), for M = 4, 16, 64, 256 by default.

Two limits bind a training step; each is measured in the same process:

1. the matmul FLOPs a step needs (forward, the weight gradients, and the input gradients of every
   layer but the first, which backpropagation skips) against a large-sgemm probe;
2. the optimizer's memory traffic (Adam reads parameter, gradient and both moments and writes
   parameter and moments: 7 floats per parameter per step) against a copy probe moving the
   same bytes.

The fraction of each limit achieved is printed, and the one that binds (the longer lower bound).
Mean train/test accuracy of both populations checks that the speed does not change the models'
behaviour. Nothing here asserts on time. Numbers taken while other processes run are noisy on a
small machine: run it on an idle one. Run::

    python benchmarks/population.py                       # M = 1, 4, 16, 64, 256; 60 epochs
    python benchmarks/population.py --family cnn          # the cnn family on digits as 1x8x8 images
    python benchmarks/population.py --models 64 --epochs 10 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from mia_core.kernels.bench.common import min_times_interleaved
from mia_core.engine import ModelPopulation, TrainingRecipe
from mia_core.engine.trainer import make_optimizer, model_seeds
from mia_plugins.datasets.sklearn_data import Digits
from mia_plugins.models.mlp import MLP


def _best(fn, repeat: int, warmup: bool = True) -> float:
    if warmup:
        fn()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sgemm_probe(repeat: int, n: int = 2048) -> float:
    """GFLOP/s of one large float32 matrix product (the machine's matmul limit)."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    return 2 * n**3 / _best(lambda: torch.mm(a, b, out=c), repeat) / 1e9


def copy_probe(n_bytes: int, repeat: int) -> float:
    """GB/s (read + written) of ``dst.copy_(src)`` moving ``n_bytes`` in total."""
    n = max(1, n_bytes // 8)  # float32: 4 bytes read + 4 written per element
    src, dst = torch.randn(n), torch.empty(n)
    return 8 * n / _best(lambda: dst.copy_(src), repeat) / 1e9


def optimizer_step_time(pop, recipe: TrainingRecipe, repeat: int) -> float:
    """Seconds of one optimizer step (the trainer's, fused where available) on the population's
    stacked parameters, gradients in place."""
    params = [p.detach().clone() for p in pop.params.values()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = make_optimizer(params, recipe)
    return _best(opt.step, repeat)


def mlp_step_flops(widths: List[int], batch: int) -> int:
    """Matmul FLOPs of one training step of one MLP with layer widths ``widths`` (input first):
    forward and weight gradients for every layer, input gradients for all but the first."""
    mats = [a * b for a, b in zip(widths[:-1], widths[1:])]
    return 2 * batch * (2 * sum(mats) + sum(mats[1:]))


def loop_train(records, keep: np.ndarray, recipe: TrainingRecipe, build, seeds) -> List[torch.nn.Module]:
    """The baseline: one module and one Adam per model, each walking a fresh permutation of its
    own half every epoch in batches of ``recipe.batch_size`` (the last one smaller)."""
    x, y = torch.from_numpy(records.x), torch.from_numpy(records.y)
    models = []
    for m in range(keep.shape[0]):
        torch.manual_seed(seeds[m])
        model = build()
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        own = torch.from_numpy(np.flatnonzero(keep[m]))
        g = torch.Generator().manual_seed(seeds[m])
        for _ in range(recipe.epochs):
            perm = own[torch.randperm(own.numel(), generator=g)]
            for i in range(0, perm.numel(), recipe.batch_size):
                idx = perm[i : i + recipe.batch_size]
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        models.append(model)
    return models


@torch.no_grad()
def loop_accuracy(models, records, keep) -> Dict[str, float]:
    x, y = torch.from_numpy(records.x), torch.from_numpy(records.y)
    train, test = [], []
    for m, model in enumerate(models):
        ok = (model(x).argmax(1) == y).numpy()
        train.append(ok[keep[m]].mean())
        test.append(ok[~keep[m]].mean())
    return {"train": float(np.mean(train)), "test": float(np.mean(test))}


def _train(records, build, recipe, m: int, seed: int) -> ModelPopulation:
    """M models as one vectorized ensemble; M = 1 is model 0 of a 2-model population trained alone
    (a one-model shard: populations come in complementary pairs)."""
    if m == 1:
        return ModelPopulation.train(records, build, recipe, n_models=2, seed=seed, model_ids=[0])
    return ModelPopulation.train(records, build, recipe, n_models=m, seed=seed)


def run(models: List[int], epochs: int, repeat: int, loop_models: int, seed: int = 0, family_name: str = "mlp") -> Dict:
    if family_name == "cnn":
        from mia_plugins.models.cnn import CNN

        records, family = Digits(image=True).load(), CNN()
    else:
        records, family = Digits().load(), MLP()
    recipe = TrainingRecipe(epochs=epochs)
    build = lambda: family.build(records.n_features, records.n_classes)  # noqa: E731
    mlp = family_name == "mlp"
    widths = [records.n_features] + [family.width] * family.depth + [records.n_classes] if mlp else []
    n_params = sum(p.numel() for p in build().parameters())
    sgemm = sgemm_probe(max(3, repeat))
    # warm-up: first-call costs (imports, allocator growth) are paid before any timing
    warm = ModelPopulation.train(records, build, TrainingRecipe(epochs=1), n_models=2, seed=seed)
    loop_train(records, warm.keep[:1], TrainingRecipe(epochs=1), build, model_seeds(seed, 1))
    rows = []
    for m in models:
        pops: list = []
        trained: list = []
        k = min(m, loop_models)
        seeds = model_seeds(seed, m)
        keep = _train(records, build, TrainingRecipe(epochs=0), m, seed).keep
        times = min_times_interleaved({
            "vectorized": lambda: pops.append(_train(records, build, recipe, m, seed)),
            "loop": lambda: trained.append(loop_train(records, keep[:k], recipe, build, seeds)),
        }, repeat=repeat)
        vec_t, loop_t = times["vectorized"], times["loop"]
        pop = pops[-1]
        loop_t_scaled = loop_t * m / k
        acc = pop.accuracy()
        res = pop.training
        step_flops = mlp_step_flops(widths, recipe.batch_size) * m if mlp else 0  # the FLOP model is the MLP's
        flops = step_flops * res.steps
        adam_bytes = 7 * 4 * n_params * m  # per step
        copy_bw = copy_probe(adam_bytes, max(5, repeat))
        adam_step = optimizer_step_time(pop, recipe, max(20, repeat))
        t_flop = flops / (sgemm * 1e9)
        t_mem = adam_bytes * res.steps / (copy_bw * 1e9)
        rows.append({
            "models": m,
            "vectorized_s": vec_t,
            "vectorized_ms_per_model": vec_t / m * 1e3,
            "loop_s": loop_t_scaled,
            "loop_ms_per_model": loop_t / k * 1e3,
            "loop_models_timed": k,
            "loop_over_vectorized": loop_t_scaled / vec_t,
            "steps": res.steps,
            "forward": res.forward,
            "matmul_gflop": flops / 1e9 if mlp else None,
            "matmul_gflops_achieved": flops / vec_t / 1e9 if mlp else None,
            "matmul_fraction_of_sgemm": t_flop / vec_t if mlp else None,
            "adam_gb": adam_bytes * res.steps / 1e9,
            "copy_gbs": copy_bw,
            "adam_fraction_of_copy": t_mem / vec_t,
            "adam_step_ms": adam_step * 1e3,
            "adam_step_gbs": adam_bytes / adam_step / 1e9,
            "bound_s": max(t_flop, t_mem),
            "binds": ("matmul" if t_flop >= t_mem else "optimizer memory") if mlp else "-",
            "accuracy_vectorized": {"train": float(acc["train"].mean()), "test": float(acc["test"].mean())},
            "accuracy_loop": loop_accuracy(trained[-1], records, pop.keep[:k]),
        })
    return {"sgemm_gflops": sgemm, "params_per_model": n_params, "epochs": epochs, "family": family_name,
            "rows": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=int, action="append", help="population size M; repeatable (default 4 16 64 256)")
    ap.add_argument("--epochs", type=int, default=TrainingRecipe().epochs, help="epochs (default: the recipe's 60)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats per entry (the minimum is kept)")
    ap.add_argument("--loop-models", type=int, default=16,
                    help="time the per-model loop on at most this many models and scale per model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--family", choices=["mlp", "cnn"], default="mlp",
                    help="mlp (digits, 64-256-10) or cnn (digits as 1x8x8 images, the cnn family's defaults)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    out = run(args.models or [1, 4, 16, 64, 256], args.epochs, args.repeat, args.loop_models, family_name=args.family)
    out["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(), "loadavg_at_start": load_start,
                      "loadavg_at_end": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.json:
        print(json.dumps(out, indent=2))
        return out
    mach = out["machine"]
    print(f"python {mach['python']}, torch {mach['torch']}, {mach['cpu_count']} CPUs, torch threads "
          f"{mach['torch_threads']}, load average {mach['loadavg_at_start'][0]:.2f} -> {mach['loadavg_at_end'][0]:.2f}")
    what = "MLP 64-256-10" if out["family"] == "mlp" else "CNN (cnn defaults) on 1x8x8 images"
    print(f"digits, {what} ({out['params_per_model']:,} parameters), Adam, batch 64, {out['epochs']} epochs; "
          f"sgemm probe {out['sgemm_gflops']:.0f} GFLOP/s; min of {args.repeat} runs")
    print("  GFLOP/s and %sgemm: matmul FLOPs of the whole run per second, and that against the sgemm probe;"
          " Adam GB and %copy: optimizer bytes moved, and their rate against a same-size copy;"
          " step ms and %copy: one optimizer step alone")
    print(f"{'M':>4} {'vectorized':>10} {'ms/model':>9} {'loop':>9} {'ms/model':>9} {'loop/vec':>8}   "
          f"{'GFLOP/s':>7} {'%sgemm':>8} {'Adam GB':>8} {'%copy':>7} {'step ms':>7} {'%copy':>7}  "
          f"binds             acc train/test vec | loop")
    for r in out["rows"]:
        scaled = "" if r["loop_models_timed"] == r["models"] else f" (timed on {r['loop_models_timed']}, scaled)"
        av, al = r["accuracy_vectorized"], r["accuracy_loop"]
        gf = "-" if r["matmul_gflops_achieved"] is None else f"{r['matmul_gflops_achieved']:.0f}"
        fr = "-" if r["matmul_fraction_of_sgemm"] is None else f"{r['matmul_fraction_of_sgemm']:.0%}"
        print(f"{r['models']:>4} {r['vectorized_s']:>9.2f}s {r['vectorized_ms_per_model']:>9.1f} {r['loop_s']:>8.2f}s "
              f"{r['loop_ms_per_model']:>9.1f} {r['loop_over_vectorized']:>7.1f}x   {gf:>7} "
              f"{fr:>8} {r['adam_gb']:>8.1f} {r['adam_fraction_of_copy']:>7.1%} "
              f"{r['adam_step_ms']:>7.2f} {r['adam_step_gbs'] / r['copy_gbs']:>7.0%}  "
              f"{r['binds']:<16}  {av['train']:.3f}/{av['test']:.3f} | {al['train']:.3f}/{al['test']:.3f}{scaled}")
    return out


if __name__ == "__main__":
    main()
