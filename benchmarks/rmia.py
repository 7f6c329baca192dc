"""Benchmark RMIA's pairwise dominance count: sort + binary search against the dense N x Z matrix.

RMIA scores a record x by the fraction of population records z with LR(x, z) >= gamma
(:func:`mia_plugins.attacks.rmia.dominance_fraction`). The product path sorts the population's
log ratios once and binary-searches every x: O((N + Z) log Z) time, O(N + Z) memory. The
baseline is the straightforward dense version (:func:`~mia_plugins.attacks.rmia.dominance_fraction_dense`):
an N x Z bool matrix, O(N Z) time and memory. Everything runs in ONE process:

1. at N = Z = ``--n`` (default 1e5, where the dense matrix would need 10 GB) the fast path alone,
   beside a probe: ``np.sort`` of Z float64, the part of the work no binary search can avoid;
2. at N = Z = ``--dense-n`` (default 2e4, a 400 MB matrix) fast and dense on the same input,
   interleaved, their results checked equal, and the ratios printed.

Both use the plugin's setting: the population is every record, each record's own pair left out
(``self_index``), gamma = 1. Times are the minimum over ``--repeat`` interleaved rounds; peak
memory is traced (``tracemalloc``, which sees numpy's buffers) in one separate, untimed call.
Nothing here asserts on time. Numbers taken while other processes run are noisy on a small
machine: run it on an idle one. Run::

    python benchmarks/rmia.py                      # N = 1e5 fast, 2e4 fast vs dense
    python benchmarks/rmia.py --quick              # N = 1e4, 2e3: a few seconds
    python benchmarks/rmia.py --n 1e6 --dense-n 1e4 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tracemalloc
from typing import Callable, Dict

import numpy as np

from mia_core.kernels.bench.common import min_times_interleaved
from mia_plugins.attacks.rmia import dominance_fraction, dominance_fraction_dense


def _size(text: str) -> int:
    value = float(text)
    if not (value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1 (e.g. 1e5)")
    return int(value)


def _peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes traced during one call of ``fn`` (its inputs, allocated before, not counted)."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _case(n: int, seed: int):
    """N = Z = n log ratios with ties (a tenth of them rounded to a coarse grid), as in a population
    where many records saturate; the population is every record, self excluded."""
    rng = np.random.default_rng(seed)
    lr = rng.normal(size=n)
    lr[: n // 10] = np.round(lr[: n // 10], 1)
    rng.shuffle(lr)
    return dict(log_ratio_x=lr, log_ratio_z=lr, gamma=1.0, self_index=np.arange(n))


def run(n: int, dense_n: int, repeat: int, seed: int = 0) -> Dict:
    big = _case(n, seed)
    z = big["log_ratio_z"]
    t = min_times_interleaved({"fast": lambda: dominance_fraction(**big),
                                "sort probe": lambda: np.sort(z)}, repeat=repeat, warmup=True)
    large = {"n": n, "z": n, "fast_s": t["fast"], "sort_probe_s": t["sort probe"],
             "fast_peak_bytes": _peak_bytes(lambda: dominance_fraction(**big)),
             "dense_would_need_bytes": n * n}  # one bool byte per pair

    small = _case(dense_n, seed + 1)
    fast_out, dense_out = dominance_fraction(**small), dominance_fraction_dense(**small)
    if not np.array_equal(fast_out, dense_out):
        raise AssertionError("fast and dense dominance fractions differ")
    t = min_times_interleaved({"fast": lambda: dominance_fraction(**small),
                                "dense": lambda: dominance_fraction_dense(**small)}, repeat=repeat, warmup=True)
    same = {"n": dense_n, "z": dense_n, "fast_s": t["fast"], "dense_s": t["dense"],
            "fast_peak_bytes": _peak_bytes(lambda: dominance_fraction(**small)),
            "dense_peak_bytes": _peak_bytes(lambda: dominance_fraction_dense(**small)),
            "equal": True}
    return {"large": large, "same_size": same}


def _fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_b(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return ""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=_size, default=None, help="N = Z for the fast path alone (default 1e5)")
    ap.add_argument("--dense-n", type=_size, default=None, help="N = Z for fast vs dense (default 2e4)")
    ap.add_argument("--repeat", type=int, default=None, help="timed rounds, the minimum is kept (default 7)")
    ap.add_argument("--quick", action="store_true", help="small sizes (1e4 and 2e3) and 3 rounds: a smoke run")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    n = args.n or (10_000 if args.quick else 100_000)
    dense_n = args.dense_n or (2_000 if args.quick else 20_000)
    repeat = args.repeat or (3 if args.quick else 7)

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    res = run(n, dense_n, repeat)
    res["machine"] = {"platform": platform.platform(), "processor": platform.processor(), "numpy": np.__version__,
                      "cpus": os.cpu_count(), "load_start": load_start, "repeat": repeat}
    if args.json:
        print(json.dumps(res, indent=2))
        return
    lg, sm = res["large"], res["same_size"]
    print(f"RMIA dominance count, gamma = 1, population = every record (self excluded); min of {repeat} rounds; "
          f"numpy {np.__version__}, {os.cpu_count()} CPUs, load at start {load_start}")
    print()
    print(f"N = Z = {lg['n']:,}")
    print(f"  fast (sort + searchsorted)  {_fmt_s(lg['fast_s']):>10}   peak {_fmt_b(lg['fast_peak_bytes'])}")
    print(f"  probe: np.sort of Z         {_fmt_s(lg['sort_probe_s']):>10}   "
          f"fast / sort = {lg['fast_s'] / lg['sort_probe_s']:.2f}x")
    print(f"  a dense N x Z matrix would need {_fmt_b(lg['dense_would_need_bytes'])}")
    print()
    print(f"N = Z = {sm['n']:,} (results equal: {sm['equal']})")
    print(f"  fast   {_fmt_s(sm['fast_s']):>10}   peak {_fmt_b(sm['fast_peak_bytes'])}")
    print(f"  dense  {_fmt_s(sm['dense_s']):>10}   peak {_fmt_b(sm['dense_peak_bytes'])}")
    print(f"  dense / fast: time {sm['dense_s'] / sm['fast_s']:.1f}x, "
          f"peak memory {sm['dense_peak_bytes'] / max(sm['fast_peak_bytes'], 1):.0f}x")


if __name__ == "__main__":
    main()
