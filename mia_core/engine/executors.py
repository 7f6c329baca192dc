"""Where independent jobs run: in this process, in local worker processes, or on a Dask cluster.

``--executor`` takes

``local``              in this process, one job after another (the default);
``local:N``            ``N`` worker processes through joblib's ``loky`` backend (spawned, never
                       ``fork`` after OpenMP has run: a forked child can deadlock in libgomp);
``dask://HOST:PORT``   a Dask ``distributed`` scheduler (``dask scheduler`` and ``dask worker
                       tcp://HOST:PORT`` on the machines; every worker needs miafw and torch
                       installed, and the data the jobs name when it is read from a file).

An executor maps a picklable top-level function over jobs and returns the results in job order,
calling ``on_done(index, result)`` as each finishes (in completion order) so the caller can cache
and report progress. What travels: each job's arguments (for a population shard: the records'
features and labels, the plugin specifications, the recipe and the seed) and each result (the
shard's weights as CPU tensors and what training did). Nothing else is shared.
"""

from __future__ import annotations

import abc
import os
import re
from typing import Any, Callable, List, Optional, Sequence

from mia_core.params import ParamError

_LOCAL_N = re.compile(r"^local:(\d+)$")

#: Seconds to wait for a Dask scheduler to answer.
CONNECT_TIMEOUT = 10


class Executor(abc.ABC):
    """Runs ``fn`` over jobs; subclasses say where."""

    #: The specification it was made from, as recorded in ``config.json``.
    spec: str = "local"

    @abc.abstractmethod
    def map(self, fn: Callable[[Any], Any], jobs: Sequence[Any], *,
            on_done: Optional[Callable[[int, Any], None]] = None) -> List[Any]:
        """``[fn(job) for job in jobs]``, computed where this executor runs them, calling
        ``on_done(index, result)`` as each job finishes."""

    def close(self) -> None:
        """Release workers or connections (idempotent)."""


class LocalExecutor(Executor):
    """In this process, in order."""

    spec = "local"

    def map(self, fn, jobs, *, on_done=None):
        out = []
        for i, job in enumerate(jobs):
            out.append(fn(job))
            if on_done is not None:
                on_done(i, out[-1])
        return out


class LokyExecutor(Executor):
    """``n`` spawned worker processes (joblib's loky backend); each worker's BLAS/OpenMP threads
    are limited to its share of the cores, so the workers do not oversubscribe the machine."""

    def __init__(self, n: int):
        self.n = int(n)
        self.spec = f"local:{self.n}"

    def map(self, fn, jobs, *, on_done=None):
        from joblib import Parallel, delayed

        threads = max(1, (os.cpu_count() or 1) // self.n)
        out: List[Any] = [None] * len(jobs)
        par = Parallel(n_jobs=self.n, backend="loky", return_as="generator_unordered",
                       inner_max_num_threads=threads)
        for i, result in par(delayed(_indexed)(fn, i, job) for i, job in enumerate(jobs)):
            out[i] = result
            if on_done is not None:
                on_done(i, result)
        return out


def _indexed(fn, i, job):
    return i, fn(job)


class DaskExecutor(Executor):
    """A Dask ``distributed`` cluster at ``address`` (``tcp://HOST:PORT``)."""

    def __init__(self, address: str):
        try:
            from distributed import Client
        except ImportError:  # pragma: no cover - distributed is a test dependency
            raise ParamError("--executor dask://...: the 'distributed' package is not installed "
                             "(pip install 'dask[distributed]')") from None
        self.address = address
        self.spec = "dask://" + address.split("://", 1)[-1]
        try:
            self.client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise ParamError(f"--executor {self.spec}: cannot reach a Dask scheduler there ({exc}); start one with "
                             f"`dask scheduler` and workers with `dask worker {address}`") from None

    def map(self, fn, jobs, *, on_done=None):
        from distributed import as_completed

        futures = [self.client.submit(fn, job, pure=False, key=f"miafw-{i}-{os.getpid()}-{id(job)}")
                   for i, job in enumerate(jobs)]
        index = {f.key: i for i, f in enumerate(futures)}
        out: List[Any] = [None] * len(jobs)
        try:
            with self.client.as_current():  # as_completed looks the client up
                for fut in as_completed(futures):  # each shard is handed over (and cached) as it finishes
                    i = index[fut.key]
                    out[i] = fut.result()  # re-raises a job's exception here
                    if on_done is not None:
                        on_done(i, out[i])
        finally:
            for f in futures:
                f.release()
        return out

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
            self.client = None


def parse_executor(text: str) -> str:
    """Validate an ``--executor`` specification (without connecting); returns it normalised.

    Raises:
        ParamError: anything but ``local``, ``local:N`` (N >= 1) or ``dask://HOST:PORT``.
    """
    t = str(text).strip()
    if t == "local":
        return t
    m = _LOCAL_N.match(t)
    if m:
        if int(m.group(1)) < 1:
            raise ParamError(f"--executor {t!r}: local:N needs N >= 1 worker processes")
        return t
    if t.startswith("dask://"):
        rest = t[len("dask://"):]
        host, sep, port = rest.rpartition(":")
        if sep and host and port.isdigit() and 0 < int(port) < 65536:
            return t
    raise ParamError(f"--executor must be local, local:N or dask://HOST:PORT, got {text!r}")


def make_executor(text: str) -> Executor:
    """The executor for a specification (:func:`parse_executor`); a Dask one connects here."""
    t = parse_executor(text)
    if t == "local":
        return LocalExecutor()
    m = _LOCAL_N.match(t)
    if m:
        n = int(m.group(1))
        return LocalExecutor() if n == 1 else LokyExecutor(n)
    return DaskExecutor("tcp://" + t[len("dask://"):])


__all__ = ["DaskExecutor", "Executor", "LocalExecutor", "LokyExecutor", "make_executor", "parse_executor"]
