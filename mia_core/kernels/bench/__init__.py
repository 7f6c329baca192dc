"""Kernel benchmarks, shared by ``miafw bench`` and ``benchmarks/kernels.py``.

Each op family has a module here exposing
``run(*, sizes, dtypes, backends, repeat) -> list[Measurement]``; :data:`KERNELS` maps the
names accepted by ``miafw bench --kernel`` to those modules.
"""

from __future__ import annotations

import importlib
from typing import Dict, Sequence


#: ``miafw bench --kernel`` name -> module under mia_core.kernels.bench.
KERNELS: Dict[str, str] = {
    "mask": "mia_core.kernels.bench.mask",
    "kl": "mia_core.kernels.bench.kl",
    "fake_quantize": "mia_core.kernels.bench.quant",
}


def run(kernels: Sequence[str], *, sizes: Sequence[int], dtypes: Sequence[str], backends: Sequence[str],
        repeat: int = 21) -> list:
    """Run the named kernels' benchmarks; unknown names raise ValueError listing the valid ones."""
    rows: list = []
    for k in kernels:
        if k not in KERNELS:
            raise ValueError(f"unknown kernel {k!r}; valid: {', '.join(KERNELS)}")
        mod = importlib.import_module(KERNELS[k])
        rows += mod.run(sizes=list(sizes), dtypes=list(dtypes), backends=list(backends), repeat=repeat)
    return rows


def format_table(rows) -> str:
    """See :func:`mia_core.kernels.bench.common.format_table` (imported lazily: it needs torch)."""
    from mia_core.kernels.bench.common import format_table as _fmt

    return _fmt(rows)


__all__ = ["KERNELS", "format_table", "run"]
