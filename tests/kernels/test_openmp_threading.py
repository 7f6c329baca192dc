"""Threading and ABI guarantees of the native extension (mia_core._C) beside torch.

What is checked, each in a fresh interpreter where import order or fork matters:

(a) only ONE libgomp is mapped per process, whichever of torch / mia_core._C is imported first
    (torch first: torch's bundled copy serves both; _C first: the system libgomp the extension
    was linked against, which torch then reuses because the sonames match), and kernels and
    torch ops give correct results in both orders;
(b) ``torch.set_num_threads(n)`` governs our kernels: the extension's ``max_threads()`` reports
    ``n`` in the same thread, and results with 1 and 2 threads are identical;
(c) the built .so imports no GOMP_/OMP_ symbol version newer than GOMP_5.0 / OMP_5.0 (what
    torch's bundled libgomp exports), and every one it imports is exported by torch's copy;
(d) a ``fork`` after an OpenMP region may deadlock the child (GNU libgomp's thread pool does not
    survive fork), while the ``spawn`` multiprocessing context works: see mia_core/kernels/_mask.py.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from mia_core import kernels
from mia_core.kernels import _native

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_native = pytest.mark.skipif(not kernels.native_available(),
                                  reason="mia_core._C is not built")


def _run(code: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ (a) one libgomp

_ORDER_SCRIPT = """
import json, os
{imports}
import torch
from mia_core import kernels
from mia_core.kernels import _native
maps = [l.split()[-1] for l in open("/proc/self/maps") if "libgomp" in l or "libiomp" in l]
libs = sorted({{os.path.realpath(p) for p in maps}})
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
w = torch.randn(300_000, generator=g)
m = torch.rand(300_000, generator=g) < 0.5
expected = w.masked_fill(~m, 0)
ran = kernels.apply_masks([w], [m], backend="native")
mags = kernels.magnitude_masks([w.view(3, -1)], 0.7, stacked=True, backend="native")
ref = kernels.magnitude_masks_reference([w.view(3, -1)], 0.7, stacked=True)
s = torch.randn(500, 500, generator=g)
torch_ok = torch.allclose((s @ s).sum(), (s.double() @ s.double()).sum().float(), rtol=1e-3)
print(json.dumps({{"libs": libs, "ran": ran, "mask_ok": torch.equal(w, expected),
                   "mag_ok": torch.equal(mags[0], ref[0]), "torch_ok": bool(torch_ok),
                   "max_threads": _native._C.max_threads()}}))
"""


@pytest.fixture(scope="module")
def c_first_interpreter():
    """ONE fresh interpreter that imported mia_core._C before torch: the _C-first order probe,
    then the fork probe of (d) (which needs a process that has run OpenMP regions, as the order
    probe has). Returns (order probe result, fork outcome line); starting an interpreter that
    imports torch is most of each probe's cost."""
    proc = _run(_ORDER_SCRIPT.format(imports="import mia_core._C\nimport torch") +
                _FORK_SCRIPT.format(child_timeout=0.5))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    order = json.loads(next(line for line in lines if line.startswith("{")))
    return order, lines[-1]


def _order_probe(first: str, request) -> dict:
    """_ORDER_SCRIPT's result in a fresh interpreter that imported ``first`` first (not this
    one: the test process may have loaded other OpenMP runtimes, scikit-learn's say)."""
    if first == "mia_core._C":
        return request.getfixturevalue("c_first_interpreter")[0]
    proc = _run(_ORDER_SCRIPT.format(imports="import torch\nimport mia_core._C"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_native
@pytest.mark.parametrize("first", ["torch", "mia_core._C"])
def test_one_libgomp_in_either_import_order(first, request):
    out = _order_probe(first, request)
    assert len(out["libs"]) == 1, f"more than one OpenMP runtime mapped: {out['libs']}"
    assert "gomp" in os.path.basename(out["libs"][0])
    assert out["ran"] == "native" and out["mask_ok"] and out["mag_ok"] and out["torch_ok"]
    assert out["max_threads"] == 2


# ------------------------------------------------------------------ (b) torch.set_num_threads


@needs_native
def test_torch_set_num_threads_governs_the_extension():
    old = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert _native._C.max_threads() == n
            assert kernels.backend_info()["max_threads"] == n
    finally:
        torch.set_num_threads(old)


@needs_native
def test_results_identical_with_one_and_two_threads():
    g = torch.Generator().manual_seed(1)
    w0 = [torch.randn(n, generator=g) for n in (70_001, 5, 200_000)]
    ms = [(torch.rand(t.shape, generator=g) < 0.5).float() for t in w0]
    ties = torch.randint(-3, 4, (400_000,), generator=g).float()
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ws = [t.clone() for t in w0]
            plan = kernels.MaskPlan(ws, ms, backend="native")
            plan.apply()
            mags = kernels.magnitude_masks([ties], 0.4, backend="native")
            stacked = kernels.magnitude_masks([ties.view(8, -1)], 0.4, stacked=True, backend="native")
            outs.append((ws, mags, stacked))
    finally:
        torch.set_num_threads(old)
    (a_ws, a_m, a_s), (b_ws, b_m, b_s) = outs
    for a, b in zip(a_ws, b_ws):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    assert torch.equal(a_m[0], b_m[0]) and torch.equal(a_s[0], b_s[0])


# ------------------------------------------------------------------ (c) symbol versions


def _versioned_omp_symbols(path: str, *, undefined: bool):
    tool = shutil.which("readelf")
    if tool is None:
        pytest.skip("readelf (binutils) is not installed; cannot read the .so's symbol versions")
    out = subprocess.run([tool, "--dyn-syms", "-W", path], capture_output=True, text=True,
                         check=True).stdout
    found = set()
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 8 or (cols[6] == "UND") != undefined:
            continue
        m = re.match(r"^([A-Za-z_][\w]*)@{1,2}((?:GOMP|OMP)_[\d.]+)", cols[7])
        if m:
            found.add((m.group(1), m.group(2)))
    return found


def _version_tuple(v: str):
    return tuple(int(x) for x in v.split("_", 1)[1].split("."))


@needs_native
def test_extension_uses_no_openmp_symbol_newer_than_torchs_libgomp():
    so = _native._C.__file__
    imported = _versioned_omp_symbols(so, undefined=True)
    assert imported, "the extension imports no versioned OpenMP symbols (built without -fopenmp?)"
    too_new = sorted((s, v) for s, v in imported if _version_tuple(v) > (5, 0))
    assert not too_new, f"OpenMP symbols newer than GOMP_5.0/OMP_5.0: {too_new}"
    bundled = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*"))
    if bundled:  # every (symbol, version) we import must be exported by torch's copy
        exported = _versioned_omp_symbols(bundled[0], undefined=False)
        missing = sorted(imported - exported)
        assert not missing, f"not exported by torch's {os.path.basename(bundled[0])}: {missing}"


# ------------------------------------------------------------------ (d) fork vs spawn

# Appended to _ORDER_SCRIPT (c_first_interpreter), which has imported torch and kernels.
_FORK_SCRIPT = """
import os, signal, sys, time
torch.set_num_threads(2)
w = torch.ones(1 << 20); m = torch.ones(1 << 20)
kernels.apply_masks([w], [m], backend="native")   # an OpenMP region in the parent
r, wfd = os.pipe()
pid = os.fork()
if pid == 0:
    kernels.apply_masks([w], [m], backend="native")  # first parallel region in the child
    os.write(wfd, b"done")
    os._exit(0)
os.close(wfd)
deadline = time.time() + {child_timeout}
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        print("FORK EXITED", os.read(r, 16).decode() or "-", status)
        sys.exit(0)
    time.sleep(0.02)
os.kill(pid, signal.SIGKILL)
os.waitpid(pid, 0)
print("FORK HUNG")
"""


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")
def test_fork_after_openmp_region_can_deadlock_the_child(c_first_interpreter):
    """Documents the hazard; the child is killed after 0.5 s (it masks 1M floats, which takes
    milliseconds unless it hangs; a child slowed down by load only turns a pass into an
    xfail). On the 2-core CI machine (gcc 12, torch 2.13 with its bundled libgomp) the child
    hangs; elsewhere it may not, and then this test only reports it."""
    outcome = c_first_interpreter[1]
    if outcome == "FORK HUNG":
        pytest.xfail("fork after an OpenMP region deadlocked the child (expected with GNU "
                     "libgomp); use the spawn context or joblib/loky")
    assert outcome.startswith("FORK EXITED")
    print(f"note: the forked child did not hang on this machine ({outcome})")


def _spawn_worker(n):
    import torch as _torch

    from mia_core import kernels as _k

    w = _torch.arange(float(n)) - n / 2
    keep = _k.magnitude_masks([w], 0.5, backend="native")[0]
    _k.apply_masks([w], [keep], backend="native")
    return int((w == 0).sum()), _k.backend_info()["native_available"]


@needs_native
def test_spawn_after_openmp_region_works():
    import multiprocessing as mp

    kernels.apply_masks([torch.ones(1 << 20)], [torch.ones(1 << 20)], backend="native")
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        zeros, native = pool.apply_async(_spawn_worker, (200_000,)).get(timeout=60)
    assert native and zeros == 100_000
