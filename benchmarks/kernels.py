"""Benchmark miafw's native kernels against their torch baselines and a bandwidth probe.

A thin script over :func:`mia_core.kernels.bench.run` (the same code as ``miafw bench``). Run
from the repository root after building the extension::

    python benchmarks/kernels.py                          # every registered kernel, table
    python benchmarks/kernels.py --kernel mask --size 1e7 --dtype float32
    python benchmarks/kernels.py --json                   # the same numbers as JSON

Everything runs in ONE process, so kernels, torch baselines and the stream-copy probe share the
machine state. Each entry is a median of repeated timings. Numbers taken while other processes
run (compilers, tests) are meaningless on a 2-core machine: run on an idle machine, e.g. under
``flock /tmp/miafw-bench.lock``. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

from mia_core.kernels import bench  # the installed package, with its compiled extension


def _size(text: str) -> int:
    value = float(text)
    if not (value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1 (e.g. 1e4)")
    return int(value)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", action="append", choices=list(bench.KERNELS),
                    help="kernel family; repeatable (default: all registered)")
    ap.add_argument("--size", action="append", type=_size,
                    help="elements per call, e.g. 1e4; repeatable (default: 1e4 and 1e7)")
    ap.add_argument("--dtype", action="append", choices=["float32", "float64"],
                    help="repeatable (default: float32)")
    ap.add_argument("--backend", action="append", choices=["native", "torch"],
                    help="repeatable (default: both)")
    ap.add_argument("--repeat", type=int, default=21, help="timed repeats per entry (median)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    import torch

    from mia_core import kernels

    backends = args.backend or ["native", "torch"]
    if "native" in backends and not kernels.native_available():
        print(f"the native extension mia_core._C is not available ({kernels.backend_info()}); only the torch "
              f"rows can run. Install the package (`pip install .`) and run this script outside the source tree.",
              file=sys.stderr)
        backends = [b for b in backends if b != "native"] or ["torch"]
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows = bench.run(args.kernel or list(bench.KERNELS), sizes=args.size or [10_000, 10_000_000],
                     dtypes=args.dtype or ["float32"], backends=backends,
                     repeat=args.repeat)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    machine = {"python": platform.python_version(), "torch": torch.__version__,
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "loadavg_at_start": load_start, "loadavg_at_end": load_end,
               "kernels": kernels.backend_info()}
    if args.json:
        print(json.dumps({"machine": machine, "results": [r.to_dict() for r in rows]},
                         indent=2, default=str))
    else:
        print(f"python {machine['python']}, torch {machine['torch']}, {machine['cpu_count']} CPUs, "
              f"torch threads {machine['torch_threads']}, load average {load_start} -> {load_end}")
        print(bench.format_table(rows))
    return rows


if __name__ == "__main__":
    main()
