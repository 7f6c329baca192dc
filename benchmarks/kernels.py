"""Benchmark miafw's native mask kernel against torch baselines and a bandwidth probe.

Run from the repository root (after building the extension)::

    python benchmarks/kernels.py            # table
    python benchmarks/kernels.py --json     # the same numbers as JSON

Everything runs in ONE process, so the kernel, the torch baselines and the stream-copy probe
share the machine state (threads, caches, frequency). Each entry is the median of repeated
timings (time.perf_counter, after warm-up); small operations are timed in batches and
divided. Nothing here asserts on time: the numbers are for reading, not for CI.

Sections:
  (a) stream copy: ``dst.copy_(src)`` into a preallocated float32 buffer, GB/s counting the
      bytes read plus the bytes written, at two sizes: 1e7 elements (the same element count
      as (c)/(d), so the same cache regime: on machines with a large L3 these stay in cache)
      and 2**26 elements (512 MiB for src + dst, beyond any current L3: DRAM bandwidth);
  (b) a 50-tensor model with ~1e5 parameters and float masks: native ``apply_masks`` (one call)
      vs a Python loop of ``w.mul_(m)``;
  (c) a bool mask over 1e7 float32: native (in place) vs ``torch.where(m, w, 0)`` (allocates a
      new output every call) vs ``w.masked_fill_(~m, 0)`` (in place, but ``~m`` allocates);
  (d) a float mask over 1e7 float32: native vs ``w.mul_(m)``, as GB/s (read w + read m +
      write w) and as a fraction of both stream-copy bandwidths from (a).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
from mia_core import kernels  # noqa: E402


def measure(fn, *, inner=1, samples=21, warmup=3):
    """Median seconds per call of ``fn`` over ``samples`` batches of ``inner`` calls."""
    for _ in range(warmup):
        for _ in range(inner):
            fn()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def gbps(nbytes, seconds):
    return nbytes / seconds / 1e9


def bench_stream_copy(n, samples):
    src = torch.rand(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    s = measure(lambda: dst.copy_(src), samples=samples)
    nbytes = 2 * n * 4
    return {"elements": n, "bytes_moved": nbytes, "seconds": s, "gb_per_s": gbps(nbytes, s)}


def bench_model(n_tensors, total, samples, seed):
    g = torch.Generator().manual_seed(seed)
    # Layer-like sizes that sum to ~total: weights large, biases small, alternating.
    raw = torch.rand(n_tensors, generator=g) + torch.tensor([1.0, 0.05] * (n_tensors // 2)
                                                             + [1.0] * (n_tensors % 2))
    sizes = [max(1, int(r)) for r in (raw / raw.sum() * total).tolist()]
    ws = [torch.randn(n, generator=g) for n in sizes]
    ms = [(torch.rand(n, generator=g) < 0.5).float() for n in sizes]
    inner = 50

    def loop():
        for w, m in zip(ws, ms):
            w.mul_(m)

    rows = {"python loop w.mul_(m)": measure(loop, inner=inner, samples=samples)}
    rows["apply_masks(backend='torch')"] = measure(
        lambda: kernels.apply_masks(ws, ms, backend="torch"), inner=inner, samples=samples)
    if kernels.native_available():
        rows["apply_masks(backend='native')"] = measure(
            lambda: kernels.apply_masks(ws, ms, backend="native"), inner=inner, samples=samples)
        wa = [w.numpy() for w in ws]
        ma = [m.numpy() for m in ms]
        nt = torch.get_num_threads()
        rows["_C.apply_masks on prebuilt numpy views"] = measure(
            lambda: kernels._C.apply_masks(wa, ma, num_threads=nt), inner=inner, samples=samples)
    return {"tensors": len(sizes), "parameters": sum(sizes), "seconds": rows,
            "baseline": "python loop w.mul_(m)"}


def bench_bool(n, samples, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    m = torch.rand(n, generator=g) < 0.5
    zero = torch.zeros((), dtype=w.dtype)
    rows = {
        "torch.where(m, w, 0)  [allocates output]": measure(lambda: torch.where(m, w, zero),
                                                          samples=samples),
        "w.masked_fill_(~m, 0) [in place; ~m allocates]": measure(lambda: w.masked_fill_(~m, 0),
                                                                 samples=samples),
    }
    if kernels.native_available():
        rows["native apply_masks [in place]"] = measure(
            lambda: kernels.apply_masks([w], [m], backend="native"), samples=samples)
    nbytes = n * 4 + n * 1 + n * 4  # read w, read m, write w (the minimum traffic of any variant)
    return {"elements": n, "bytes_min": nbytes, "seconds": rows,
            "baseline": "w.masked_fill_(~m, 0) [in place; ~m allocates]",
            "gb_per_s": {k: gbps(nbytes, s) for k, s in rows.items()}}


def bench_float(n, samples, seed, copy_gbps):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=g)
    m = (torch.rand(n, generator=g) < 0.5).float()
    nbytes = 3 * n * 4  # read w, read m, write w
    rows = {"w.mul_(m)": measure(lambda: w.mul_(m), samples=samples)}
    if kernels.native_available():
        rows["native apply_masks"] = measure(
            lambda: kernels.apply_masks([w], [m], backend="native"), samples=samples)
    out = {"elements": n, "bytes_moved": nbytes, "seconds": rows, "baseline": "w.mul_(m)",
           "gb_per_s": {k: gbps(nbytes, s) for k, s in rows.items()}}
    out["fraction_of_stream_copy"] = {
        label: {k: v / bw for k, v in out["gb_per_s"].items()} for label, bw in copy_gbps.items()
    }
    return out


def machine():
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": load,
        "processor": platform.processor() or platform.machine(),
        "kernels": kernels.backend_info(),
    }


def print_section(title, rows, baseline, extra=None):
    base = rows[baseline]
    print(f"\n{title}")
    header = f"  {'variant':48s} {'median':>12s} {'vs baseline':>12s}"
    print(header + ("" if extra is None else f" {extra[0]:>10s}"))
    for name, s in rows.items():
        t = f"{s * 1e6:10.1f} us" if s < 1e-3 else f"{s * 1e3:10.3f} ms"
        ratio = f"{base / s:10.2f}x"
        line = f"  {name:48s} {t:>12s} {ratio:>12s}"
        if extra is not None:
            line += f" {extra[1][name]:10.2f}"
        print(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--samples", type=int, default=21, help="timed repeats per entry (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--elements", type=int, default=10_000_000,
                    help="float32 elements in (c), (d) and the same-size copy probe (default 1e7)")
    ap.add_argument("--dram-copy-elements", type=int, default=1 << 26,
                    help="float32 elements in the DRAM-sized copy probe (default 2**26 = 256 MiB)")
    args = ap.parse_args(argv)

    info = machine()
    copy = {"same_size": bench_stream_copy(args.elements, args.samples),
            "dram_size": bench_stream_copy(args.dram_copy_elements, max(5, args.samples // 2))}
    model = bench_model(50, 100_000, args.samples, args.seed)
    boolm = bench_bool(args.elements, args.samples, args.seed)
    floatm = bench_float(args.elements, args.samples, args.seed,
                             {k: v["gb_per_s"] for k, v in copy.items()})
    try:
        info["loadavg_at_end"] = os.getloadavg()
    except OSError:
        info["loadavg_at_end"] = None
    result = {"machine": info, "stream_copy": copy, "model_50_tensors": model,
              "bool_mask": boolm, "float_mask": floatm}

    if args.json:
        print(json.dumps(result, indent=2))
        return result

    k = info["kernels"]
    print(f"python {info['python']}, torch {info['torch']}, {info['cpu_count']} CPUs, "
          f"torch threads {info['torch_threads']}, load average at start {info['loadavg_at_start']}, "
          f"at end {info['loadavg_at_end']}")
    print(f"native: {k['native_available']}"
          + (f" (OpenMP {k['openmp']}, {k['build']['compiler']})" if k["native_available"]
             else f" -- {k['import_error']}"))
    print("\n(a) stream copy dst.copy_(src) into a preallocated buffer, GB/s = (read + write bytes) / time")
    for label, c in copy.items():
        print(f"  {label:10s} {c['elements']:>12,} float32: {c['seconds'] * 1e3:9.3f} ms, "
              f"{c['gb_per_s']:7.2f} GB/s")
    print_section(f"(b) {model['tensors']}-tensor model, {model['parameters']:,} parameters, float masks "
                  "(ratio = loop time / variant time; >1 is faster than the loop)",
                  model["seconds"], model["baseline"])
    print_section(f"(c) bool mask, {boolm['elements']:,} float32 "
                  "(ratio = masked_fill_ time / variant time; GB/s over the 9 bytes/element minimum)",
                  boolm["seconds"], boolm["baseline"], extra=("GB/s", boolm["gb_per_s"]))
    print_section(f"(d) float mask, {floatm['elements']:,} float32, bytes = read w + read m + write w "
                  "(ratio = mul_ time / variant time; last column = GB/s)",
                  floatm["seconds"], floatm["baseline"], extra=("GB/s", floatm["gb_per_s"]))
    for label, fr in floatm["fraction_of_stream_copy"].items():
        print(f"    as a fraction of the {label} stream copy: "
              + ", ".join(f"{k} {v:.2f}" for k, v in fr.items()))
    return result


if __name__ == "__main__":
    main()
