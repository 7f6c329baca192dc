"""End-to-end scale: whole evaluations of M = 4 .. 256 models, their wall time and peak memory,
one ensemble against shards on a 2-worker Dask LocalCluster (M >= 6: LiRA needs 4 references).

Each row is one ``mia_core.evaluate`` (training, signals, every target scored by the attacks,
metrics; no cache) in a fresh child process, so its peak resident memory (``ru_maxrss``) is its own.
Rows:

* ``ensemble``: the default experiment (digits, MLP 64-256-10, 60 epochs) with LiRA and RMIA,
  M models trained as one vectorized ensemble in the child;
* ``dask``: the same with ``--shards 4`` on a ``distributed.LocalCluster`` of 2 worker processes
  (1 thread each) started by the child: training happens in the workers, so the child's peak
  memory is the client's;
* ``cnn``: ``digits:image=true`` with the ``cnn`` family, when it is installed.

    python benchmarks/scale.py                          # M = 8, 16, 64, 256
    python benchmarks/scale.py --models 16 --models 64 --no-dask

Run it on an idle machine; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import mia_core
args = json.loads(sys.argv[1])
kw = dict(attacks=tuple(args["attacks"]), n_models=args["m"], dataset=args["dataset"], model=args["model"])
t0 = time.perf_counter()
if args["dask"]:
    from distributed import LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        address = cluster.scheduler_address.split("://", 1)[1]
        ev = mia_core.evaluate(mia_core.EvalConfig(**kw, shards=args["shards"], executor=f"dask://{address}"))
else:
    ev = mia_core.evaluate(mia_core.EvalConfig(**kw))
wall = time.perf_counter() - t0
m = ev.metrics["attacks"]
print(json.dumps({"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "auc": {k: v["auc"] for k, v in m.items()},
                  "tpr_at_0.001": {k: v["tpr_at_fpr"]["0.001"]["tpr"] for k, v in m.items()},
                  "test_accuracy": ev.metrics["target"]["test_accuracy"]}))
"""


def run(m: int, *, kind: str, attacks, shards: int) -> dict:
    dataset, model = ("digits:image=true", "cnn") if kind == "cnn" else ("digits", "mlp")
    args = {"m": m, "attacks": list(attacks), "dask": kind == "dask", "shards": shards, "dataset": dataset,
            "model": model}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"m": m, "kind": kind, "error": out.stderr.strip().splitlines()[-1]}
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row.update({"m": m, "kind": kind, "process_s": time.perf_counter() - t0})
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, action="append")
    ap.add_argument("--attack", action="append")
    ap.add_argument("--no-dask", action="store_true")
    ap.add_argument("--cnn", type=int, action="append", help="population sizes for the CNN rows")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    attacks = a.attack or ["lira", "rmia"]
    rows = []
    for m in a.models or [8, 16, 64, 256]:
        rows.append(run(m, kind="ensemble", attacks=attacks, shards=1))
        if not a.no_dask and m >= 16:
            rows.append(run(m, kind="dask", attacks=attacks, shards=4))
    for m in a.cnn or []:
        rows.append(run(m, kind="cnn", attacks=attacks, shards=1))
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print("| M | how | wall s | peak RSS MiB | " + " | ".join(f"{x} AUC" for x in attacks)
          + " | " + " | ".join(f"{x} TPR@0.1%" for x in attacks) + " | test acc |")
    print("|---|---|---|---|" + "---|" * (2 * len(attacks) + 1))
    for r in rows:
        if "error" in r:
            print(f"| {r['m']} | {r['kind']} | error: {r['error']} |")
            continue
        print(f"| {r['m']} | {r['kind']} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | "
              + " | ".join(f"{r['auc'][x]:.3f}" for x in attacks) + " | "
              + " | ".join(f"{100 * r['tpr_at_0.001'][x]:.2f}%" for x in attacks)
              + f" | {100 * r['test_accuracy']:.1f}% |", flush=True)


if __name__ == "__main__":
    main()
