"""Shared benchmark machinery: robust timing, the stream-copy bandwidth probe, result rows.

Every kernel benchmark compares, in one process: the native kernel, the torch baseline(s) and
a memory-bandwidth probe (``dst.copy_(src)`` into a preallocated buffer of the same size), and
reports ratios, never bare times. Outputs are preallocated wherever the kernel offers ``out=``,
so page faults on fresh buffers are not what is measured.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch


@dataclass
class Measurement:
    """One timed variant of one benchmark case.

    Attributes:
        kernel: the op family (``mask``, ``kl``, ``fake_quantize``).
        case: the case within it (e.g. ``univariate``, ``per-channel-affine``).
        size: elements (or pairs) processed per call.
        dtype: element dtype, e.g. ``float32``.
        variant: what ran (``native``, ``torch-reference``, or the baseline's name).
        seconds: median wall time of one call.
        baseline: the variant ``ratio`` compares against.
        ratio: ``baseline seconds / seconds`` (> 1 means faster than the baseline).
        bytes_moved: minimum bytes read + written by one call, when meaningful.
        gbps: ``bytes_moved / seconds / 1e9``.
        bandwidth_fraction: ``gbps`` over the stream-copy GB/s measured in the same process on
            a buffer of the same byte size.
        note: anything the reader needs (e.g. "allocates its output").
    """

    kernel: str
    case: str
    size: int
    dtype: str
    variant: str
    seconds: float
    baseline: str = ""
    ratio: Optional[float] = None
    bytes_moved: Optional[int] = None
    gbps: Optional[float] = None
    bandwidth_fraction: Optional[float] = None
    note: str = ""
    extra: Dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> Dict:
        return asdict(self)


def median_time(fn: Callable[[], object], *, repeat: int = 21, warmup: int = 3, min_batch_s: float = 2e-4) -> float:
    """Median seconds per call of ``fn``; fast calls are timed in batches so the clock's
    resolution does not dominate."""
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    batch = max(1, int(min_batch_s / max(once, 1e-9)))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - t0) / batch)
    return statistics.median(samples)


def median_times_interleaved(fns: Sequence[Callable[[], object]], *, repeat: int = 21,
                             warmup: int = 3, min_batch_s: float = 2e-4) -> List[float]:
    """Median seconds per call of each of ``fns``, timed in interleaved rounds (one batch of
    each function per round) so that a drift of the machine's speed (memory bandwidth on a
    shared VM drifts over seconds) hits every variant alike; batching as :func:`median_time`."""
    batches = []
    for fn in fns:
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        once = time.perf_counter() - t0
        batches.append(max(1, int(min_batch_s / max(once, 1e-9))))
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(batches[i]):
                fn()
            samples[i].append((time.perf_counter() - t0) / batches[i])
    return [statistics.median(v) for v in samples]


def min_times_interleaved(fns: Dict[str, Callable[[], object]], *, repeat: int,
                          warmup: bool = False) -> Dict[str, float]:
    """The minimum wall time of one call of each of ``fns`` over ``repeat`` rounds, the functions
    alternating within a round so that every one sees the same machine state (for long calls,
    where :func:`median_times_interleaved`'s batching does not apply). ``warmup`` calls each once
    first, untimed."""
    if warmup:
        for fn in fns.values():
            fn()
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best


_COPY_CACHE: Dict[int, float] = {}


def stream_copy_gbps(n_bytes: int, *, repeat: int = 21) -> float:
    """GB/s of ``dst.copy_(src)`` on preallocated float32 buffers of ``n_bytes`` each, counting
    bytes read + bytes written. Cached per size for the life of the process."""
    n_bytes = max(int(n_bytes), 4)
    if n_bytes not in _COPY_CACHE:
        n = n_bytes // 4
        src = torch.rand(n)
        dst = torch.empty_like(src)
        dst.copy_(src)  # fault the pages in
        t = median_time(lambda: dst.copy_(src), repeat=repeat)
        _COPY_CACHE[n_bytes] = 2 * n * 4 / t / 1e9
    return _COPY_CACHE[n_bytes]


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype for a benchmark dtype name; ValueError listing the valid names."""
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def timed_row(kernel: str, case: str, size: int, dtype: str, variant: str, fn: Callable[[], object],
              repeat: int, note: str = "") -> Measurement:
    """Time ``fn`` (:func:`median_time`) into a :class:`Measurement`."""
    return Measurement(kernel=kernel, case=case, size=int(size), dtype=dtype, variant=variant,
                       seconds=median_time(fn, repeat=repeat), note=note)


def compare(rows: List[Measurement], baseline: str) -> List[Measurement]:
    """Fill ``baseline`` and ``ratio`` of rows sharing (kernel, case, size, dtype) with ``baseline``."""
    by_key: Dict[tuple, float] = {}
    for r in rows:
        if r.variant == baseline:
            by_key[(r.kernel, r.case, r.size, r.dtype)] = r.seconds
    for r in rows:
        base = by_key.get((r.kernel, r.case, r.size, r.dtype))
        if base is not None:
            r.baseline = baseline
            r.ratio = base / r.seconds
    return rows


def with_bandwidth(row: Measurement, bytes_moved: int, *, probe_bytes: Optional[int] = None) -> Measurement:
    """Set ``bytes_moved``, ``gbps`` and ``bandwidth_fraction`` (probe on ``probe_bytes``,
    default: the output's size, half of a read+write pair)."""
    row.bytes_moved = int(bytes_moved)
    row.gbps = bytes_moved / row.seconds / 1e9
    row.bandwidth_fraction = row.gbps / stream_copy_gbps(probe_bytes or bytes_moved // 2)
    return row


def format_table(rows: List[Measurement]) -> str:
    """A fixed-width table of measurements."""
    head = ["kernel", "case", "size", "dtype", "variant", "time", "ratio", "GB/s", "of copy"]
    body = []
    for r in rows:
        body.append([
            r.kernel, r.case, f"{r.size:.0e}" if r.size >= 1e4 else str(r.size), r.dtype, r.variant,
            _fmt_time(r.seconds),
            f"{r.ratio:.2f}x vs {r.baseline}" if r.ratio is not None and r.variant != r.baseline else ("baseline" if r.variant == r.baseline else ""),
            f"{r.gbps:.1f}" if r.gbps is not None else "",
            f"{100 * r.bandwidth_fraction:.0f}%" if r.bandwidth_fraction is not None else "",
        ])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


__all__ = ["DTYPES", "Measurement", "compare", "dtype_of", "timed_row", "format_table", "median_time", "stream_copy_gbps", "with_bandwidth"]
