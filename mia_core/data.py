"""Records: the population every model of a :class:`~mia_core.engine.population.ModelPopulation`
draws its training half from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np


class DataError(ValueError):
    """A dataset that cannot be used for a membership-inference evaluation."""


@dataclass(frozen=True)
class Records:
    """Features, labels (or real-valued targets) and stable record indices.

    Attributes:
        x: float32 ``[N, D]`` features (fixed preprocessing only).
        y: int64 ``[N]`` labels in ``[0, n_classes)`` (``task == "classification"``), or float64
            ``[N]`` real-valued targets (``task == "regression"``).
        index: int64 ``[N]`` stable record identifiers (row numbers of the source data).
        n_classes: number of classes ``C``; ``1`` for regression (the models' single output).
        name: the dataset's name, for reports.
        task: ``"classification"`` (the default) or ``"regression"``. On regression the models
            output one prediction per record and the signals are squared-error based (see
            :mod:`mia_core.engine.signals`).
    """

    x: np.ndarray
    y: np.ndarray
    index: np.ndarray
    n_classes: int
    name: str = "records"
    #: ``(H, W)`` or ``(C, H, W)`` when each record is an image flattened row-major into its ``D``
    #: features (``prod(image_shape) == D``); enables query augmentations (mirror, shifts).
    image_shape: Optional[Tuple[int, ...]] = None
    task: str = "classification"

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @classmethod
    def from_arrays(cls, x, y, *, name: str, n_classes: Optional[int] = None, index=None,
                    image_shape: Optional[Sequence[int]] = None, task: str = "classification") -> "Records":
        """Validate and normalise arrays into :class:`Records`.

        ``task="regression"`` takes real-valued targets ``y`` (stored as float64) instead of
        labels; ``n_classes`` is then 1 (one output per record).

        Raises:
            DataError: empty data, non-finite features, non-integer or negative labels, fewer
                than two classes present (regression: non-finite or constant targets), or
                mismatched lengths.
        """
        if task not in TASKS:
            raise DataError(f"dataset {name!r}: task must be one of {', '.join(TASKS)}, got {task!r}")
        x = np.asarray(x)
        y = np.asarray(y)
        if x.ndim != 2:
            raise DataError(f"dataset {name!r}: features must be 2-D [N, D], got shape {x.shape}")
        if x.shape[0] == 0:
            raise DataError(f"dataset {name!r} is empty (0 records)")
        if x.shape[1] == 0:
            raise DataError(f"dataset {name!r} has 0 features")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(
                f"dataset {name!r}: labels must be 1-D with one label per record; "
                f"got labels of shape {y.shape} for {x.shape[0]} records"
            )
        if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"dataset {name!r}: features must be real numbers, got dtype {x.dtype}")
        x = x.astype(np.float32, copy=False)
        bad = ~np.isfinite(x)
        if bad.any():
            first = np.argwhere(bad)[0]
            raise DataError(
                f"dataset {name!r}: {int(bad.sum())} non-finite feature values "
                f"(first at record {int(first[0])}, feature {int(first[1])})"
            )
        if task == "regression":
            return cls._regression(x, y, name=name, n_classes=n_classes, index=index, image_shape=image_shape)
        if np.issubdtype(y.dtype, np.bool_) or not np.issubdtype(y.dtype, np.number):
            raise DataError(f"dataset {name!r}: labels must be integers, got dtype {y.dtype}")
        if not np.issubdtype(y.dtype, np.integer):
            if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
                raise DataError(f"dataset {name!r}: labels must be integers, got non-integer values")
        y = y.astype(np.int64)
        if y.min() < 0:
            raise DataError(f"dataset {name!r}: labels must be >= 0, got {int(y.min())}")
        present = np.unique(y)
        if present.size < 2:
            raise DataError(
                f"dataset {name!r} has a single class ({int(present[0])}); membership inference "
                f"needs a classifier, so at least 2 classes"
            )
        c = int(y.max()) + 1
        if n_classes is None:
            n_classes = c
        elif n_classes < c:
            raise DataError(f"dataset {name!r}: label {c - 1} is out of range for {n_classes} classes")
        index, image_shape = _index_and_shape(name, x, y, index, image_shape)
        return cls(x=np.ascontiguousarray(x), y=y, index=index, n_classes=int(n_classes), name=name,
                   image_shape=image_shape)

    @classmethod
    def _regression(cls, x, y, *, name, n_classes, index, image_shape) -> "Records":
        """The regression branch of :meth:`from_arrays` (``x`` already checked)."""
        if np.issubdtype(y.dtype, np.bool_) or not np.issubdtype(y.dtype, np.number) \
                or np.issubdtype(y.dtype, np.complexfloating):
            raise DataError(f"dataset {name!r}: regression targets must be real numbers, got dtype {y.dtype}")
        y = y.astype(np.float64)
        if not np.all(np.isfinite(y)):
            raise DataError(f"dataset {name!r}: {int((~np.isfinite(y)).sum())} non-finite regression targets")
        if np.ptp(y) == 0:
            raise DataError(f"dataset {name!r}: the regression target is constant ({y[0]!r}); membership "
                            f"inference needs a target that varies")
        if n_classes not in (None, 1):
            raise DataError(f"dataset {name!r}: a regression dataset has one output (n_classes=1), got {n_classes}")
        index, image_shape = _index_and_shape(name, x, y, index, image_shape)
        return cls(x=np.ascontiguousarray(x), y=y, index=index, n_classes=1, name=name, image_shape=image_shape,
                   task="regression")

    @property
    def n(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])

    def fingerprint(self) -> str:
        """A content hash, used in cache keys."""
        import hashlib

        h = hashlib.sha256()
        for arr in (self.x, self.y, self.index):
            h.update(str(arr.dtype).encode())
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        h.update(str(self.n_classes).encode())
        if self.task != "classification":  # classification fingerprints (cache keys) stay as they were
            h.update(self.task.encode())
        return h.hexdigest()[:16]


#: The learning tasks a dataset can pose.
TASKS = ("classification", "regression")


def _index_and_shape(name, x, y, index, image_shape):
    """Validate the record indices and the optional image shape."""
    if index is None:
        index = np.arange(x.shape[0], dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    if index.shape != y.shape:
        raise DataError(f"dataset {name!r}: index must have one entry per record")
    if image_shape is not None:
        shape = tuple(int(d) for d in image_shape)
        if len(shape) not in (2, 3) or min(shape) < 1 or int(np.prod(shape)) != x.shape[1]:
            raise DataError(f"dataset {name!r}: image_shape {tuple(image_shape)} must be (H, W) or (C, H, W) "
                            f"with {x.shape[1]} pixels in all")
        image_shape = shape
    return index, image_shape


__all__ = ["DataError", "Records", "TASKS"]
