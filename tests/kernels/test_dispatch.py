"""The one backend dispatcher (mia_core/kernels/_dispatch.py) and the package's door."""

import subprocess
import sys
import threading

import pytest
import torch

from mia_core import kernels
from mia_core.kernels import _dispatch, _kl, _mask, _quant

NATIVE = kernels.native_available()
needs_native = pytest.mark.skipif(not NATIVE, reason="mia_core._C is not built")


def test_door_names_match_the_modules():
    """The lazy door's name table and each op module's __all__ agree, and every name resolves."""
    for module in (_dispatch, _mask, _quant, _kl):
        for name in module.__all__:
            assert name in kernels.__all__, name
            assert getattr(kernels, name) is getattr(module, name)
    assert set(kernels.__all__) == {"backend_info", "native_available"} | {
        n for m in (_dispatch, _mask, _quant, _kl) for n in m.__all__}
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        kernels.nope  # noqa: B018


def test_bench_import_stays_light():
    """``miafw``'s CLI lists the benchmarks at import: that must not import torch."""
    code = ("import sys; from mia_core.kernels.bench import KERNELS; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(sorted(KERNELS))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['fake_quantize', 'kl', 'mask']"


def test_choose_rules():
    refuse = lambda b: _dispatch.Refusal("x is odd")  # noqa: E731
    assert _dispatch.choose("torch", refuse) == "torch" == kernels.last_backend()
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'; allowed: 'auto', 'native', 'torch'"):
        _dispatch.choose("gpu")
    if NATIVE:
        assert _dispatch.choose("auto") == "native" == kernels.last_backend()
        assert _dispatch.choose("auto", refuse) == "torch"
        with pytest.raises(RuntimeError, match=r"^backend='native' cannot run: x is odd; use "
                                               r"backend='auto' or 'torch'$"):
            _dispatch.choose("native", refuse)
        with pytest.raises(RuntimeError, match=r"^built without$"):
            _dispatch.choose("native", lambda b: _dispatch.Refusal("r", message="built without"))
        # the rule may bind "native" only
        assert _dispatch.choose("auto", lambda b: refuse(b) if b == "native" else None) == "native"


@needs_native
def test_last_backend_is_per_thread():
    """Two threads run ops with different backends in lockstep; each sees its own backend.
    A process-global record would fail deterministically: both calls happen before either
    thread reads it."""
    rounds = 50
    barrier = threading.Barrier(2)
    seen = {"native": [], "torch": []}
    errors = []
    x = torch.randn(1000)

    def worker(backend):
        try:
            for _ in range(rounds):
                barrier.wait()
                kernels.fake_quantize(x, scale=0.1, zero_point=128, backend=backend)
                kernels.gaussian_kl(x, x.abs() + 1, x, x.abs() + 2, backend=backend)
                barrier.wait()  # both threads have called; neither has read yet
                seen[backend].append(kernels.last_backend())
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(b,)) for b in ("native", "torch")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert seen == {"native": ["native"] * rounds, "torch": ["torch"] * rounds}


def test_every_op_records_its_backend():
    x = torch.randn(6, 4)
    t, m = [torch.ones(5)], [torch.ones(5, dtype=torch.bool)]
    calls = {
        "apply_masks": lambda b: kernels.apply_masks(t, m, backend=b),
        "MaskPlan.apply": lambda b: kernels.MaskPlan(t, m, backend=b).apply(),
        "magnitude_masks": lambda b: kernels.magnitude_masks([x], 0.5, backend=b),
        "fake_quantize": lambda b: kernels.fake_quantize(x, backend=b),
        "masked_fake_quantize": lambda b: kernels.masked_fake_quantize(x, x > 0, backend=b),
        "fake_quantize_sign": lambda b: kernels.fake_quantize_sign(x, backend=b),
        "fake_quantize_ternary": lambda b: kernels.fake_quantize_ternary(x, backend=b),
        "gaussian_kl": lambda b: kernels.gaussian_kl(x, x.abs() + 1, x, x.abs() + 1, backend=b),
        "gaussian_kl_full": lambda b: kernels.gaussian_kl_full(
            x[:, :2], torch.eye(2).expand(6, 2, 2), x[:, :2], torch.eye(2).expand(6, 2, 2), backend=b),
    }
    for name, call in calls.items():
        for backend in ("torch", "auto"):
            call(backend)
            expected = "native" if backend == "auto" and NATIVE else "torch"
            assert kernels.last_backend() == expected, (name, backend)
