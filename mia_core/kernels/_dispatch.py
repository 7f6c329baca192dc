"""The one backend dispatcher of every op in :mod:`mia_core.kernels`.

Every op takes ``backend="auto" | "native" | "torch"`` and resolves it here, once per call
(or once per :class:`~mia_core.kernels.MaskPlan`), with :func:`choose`:

* the string is validated (:func:`check_backend`);
* ``"torch"`` runs the op's pure-torch reference;
* ``"native"`` and ``"auto"`` ask the op whether its native implementation (the CPU kernel,
  or the CUDA twin for CUDA tensors) can take these inputs: the op passes a ``refuse``
  callable returning ``None`` (it can) or a :class:`Refusal` saying why not. ``"native"``
  raises the refusal's ``RuntimeError``; ``"auto"`` runs the torch reference instead.
* When the extension failed to import, ``"native"`` raises and ``"auto"`` runs the reference
  with ONE :class:`NativeKernelWarning` per process, naming the import error.

Which backend ran is recorded per thread (the kernels release the GIL, so several threads may
run ops at once): :func:`last_backend` answers for the calling thread only.
"""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

from mia_core.kernels import _native

__all__ = ["BACKENDS", "NativeKernelWarning", "last_backend"]

#: Accepted values of every op's ``backend`` argument.
BACKENDS = ("auto", "native", "torch")

#: The suffix of most "backend='native' cannot run" errors.
DEFAULT_HINT = "use backend='auto' or 'torch'"


class NativeKernelWarning(UserWarning):
    """``backend="auto"`` fell back to torch because ``mia_core._C`` could not be imported."""


@dataclass(frozen=True)
class Refusal:
    """Why an op's native implementation cannot take the inputs it was given.

    Attributes:
        reason (str): what is wrong, naming the argument (``"x is not contiguous (...)"``).
        hint (str): what to do instead; ends the error message.
        message (str, optional): the whole error message, replacing
            ``"backend='native' cannot run: {reason}; {hint}"`` (for refusals that are not
            about the inputs, such as a build without CUDA kernels).
    """

    reason: str
    hint: str = DEFAULT_HINT
    message: Optional[str] = None

    def error(self) -> RuntimeError:
        """The ``RuntimeError`` that ``backend="native"`` raises."""
        if self.message is not None:
            return RuntimeError(self.message)
        return RuntimeError(f"backend='native' cannot run: {self.reason}; {self.hint}")


#: The refusal of every CUDA input in a build without the CUDA twins.
NO_CUDA_KERNELS = Refusal("no CUDA kernels in this build", message=_native.CUDA_MISSING_MESSAGE)

# Set once backend="auto" has warned that the extension is missing (one warning per process);
# the lock makes "once" hold when threads race to be first.
_warned_missing = False
_warn_lock = threading.Lock()

_state = threading.local()


def check_backend(backend) -> None:
    """Raise ValueError naming ``backend`` unless it is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(map(repr, BACKENDS))}")


def missing_message() -> str:
    """Why ``backend='native'`` cannot run at all (the extension did not import)."""
    return (
        "backend='native' requested but the extension mia_core._C failed to import "
        f"({_native._IMPORT_ERROR!r}); rebuild it (pip install -e . or python setup.py "
        "build_ext --inplace) or use backend='auto' / 'torch'"
    )


def warn_missing_once() -> None:
    """The one :class:`NativeKernelWarning` of this process (later calls do nothing)."""
    global _warned_missing
    with _warn_lock:
        if _warned_missing:
            return
        _warned_missing = True
    warnings.warn(
        f"mia_core._C (native kernels) failed to import ({_native._IMPORT_ERROR!r}); "
        "backend='auto' falls back to the torch reference, which gives the same results more "
        "slowly. Rebuild with `pip install -e .`. (Shown once per process.)",
        NativeKernelWarning,
        stacklevel=4,
    )


def record(ran: str) -> str:
    """Note that ``ran`` (``"native"`` or ``"torch"``) ran in this thread; returns ``ran``."""
    _state.last = ran
    return ran


def last_backend() -> Optional[str]:
    """The backend, ``"native"`` (CPU kernel or CUDA twin) or ``"torch"``, that ran the most
    recent kernel op called from THIS thread (None before the first). Thread-safe: each
    thread sees only its own calls."""
    return getattr(_state, "last", None)


def choose(backend: str, refuse: Optional[Callable[[str], Optional[Refusal]]] = None) -> str:
    """Resolve ``backend`` for one call of an op; returns ``"native"`` or ``"torch"``.

    Args:
        backend (str): the op's ``backend`` argument (validated here).
        refuse (callable, optional): ``refuse(backend) -> Refusal | None`` for the op's
            inputs (validated already); called only when the extension is loaded and
            ``backend`` is not ``"torch"``. ``backend`` is passed so that a rule may apply to
            ``"native"`` only (``"auto"`` copying, say, a strided input instead). None: the
            native implementation takes every valid input.

    Returns:
        str: ``"native"`` or ``"torch"``, also recorded for :func:`last_backend`.

    Raises:
        ValueError: unknown ``backend``.
        RuntimeError: ``backend="native"`` when the extension is missing or refuses.
    """
    check_backend(backend)
    if backend == "torch":
        return record("torch")
    if _native._C is None:
        if backend == "native":
            raise RuntimeError(missing_message())
        warn_missing_once()
        return record("torch")
    refusal = refuse(backend) if refuse is not None else None
    if refusal is None:
        return record("native")
    if backend == "native":
        raise refusal.error()
    return record("torch")

