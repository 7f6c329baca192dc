"""CIFAR-10 read from the official files on the local disk (nothing is downloaded).

Both official distributions of https://www.cs.toronto.edu/~kriz/cifar.html are read, once
extracted (``tar xzf cifar-10-python.tar.gz`` or ``cifar-10-binary.tar.gz``):

* the **binary version**, directory ``cifar-10-batches-bin``: ``data_batch_1.bin`` ..
  ``data_batch_5.bin`` and ``test_batch.bin``, each a sequence of 3,073-byte records (one label
  byte, then 3,072 pixel bytes: the 1,024 red, then green, then blue values of a 32x32 image,
  row-major);
* the **python version**, directory ``cifar-10-batches-py``: ``data_batch_1`` .. ``data_batch_5``
  and ``test_batch``, each a pickle of a dict with ``b"data"`` (uint8 ``[10000, 3072]``, the same
  pixel layout) and ``b"labels"`` (10,000 integers in ``[0, 10)``).

**Pickles are never loaded with a normal unpickler.** Unpickling runs whatever callables a file
names, so a doctored ``data_batch_1`` could run code on the machine that reads it. These batches
are read with :class:`RestrictedUnpickler`, whose ``find_class`` hands out only what a batch
needs to rebuild its numpy array: numpy's array reconstruction
(``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``, with
``numpy.ndarray`` as its argument but never callable itself, and ``numpy._core.numeric._frombuffer``,
which pickle protocol 5 uses for the same array) and ``numpy.dtype`` (object dtypes refused).
Any other global (``os.system``, ``builtins.eval``, any class) is refused with a
:class:`~mia_core.data.DataError` before it is called; the dicts, lists, bytes and integers of a
batch need no globals at all. When both layouts are present, the binary one is preferred (it
involves no pickle at all).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Tuple

import numpy as np

from mia_core.base import DatasetSource
from mia_core.data import DataError, Records

SPLITS = ("train", "test", "all")
FORMATS = ("auto", "python", "binary")
N_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
N_PIXELS = 3 * 32 * 32  # 3072
RECORD_BYTES = 1 + N_PIXELS  # 3073: label byte + pixels (binary version)
#: ITU-R BT.601 luma weights (R, G, B) for ``grayscale=true``.
LUMA = (0.299, 0.587, 0.114)

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
DIRS = {"binary": "cifar-10-batches-bin", "python": "cifar-10-batches-py"}


def batch_names(split: str, layout: str) -> List[str]:
    """File names of ``split``'s batches in ``layout`` (``"python"`` or ``"binary"``), in order."""
    names = {"train": TRAIN_BATCHES, "test": TEST_BATCHES, "all": TRAIN_BATCHES + TEST_BATCHES}[split]
    return [n + ".bin" if layout == "binary" else n for n in names]


# ----------------------------------------------------------------------------- restricted unpickling
class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR-10 batch never needs."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


def _numpy_internal(name: str) -> Any:
    """``numpy._core.<name>`` (numpy 2), else ``numpy.core.<name>`` (numpy 1), without importing
    the deprecated alias module on numpy 2."""
    import importlib

    module, _, attr = name.rpartition(".")
    for prefix in ("numpy._core.", "numpy.core."):
        try:
            return getattr(importlib.import_module(prefix + module), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name}")  # pragma: no cover - every numpy has one of them


def _safe_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject:
        raise pickle.UnpicklingError("a numpy object dtype (a CIFAR-10 batch holds uint8 pixels only)")
    return dt


class _ArrayType:
    """What ``numpy.ndarray`` resolves to: a token that only :func:`_safe_reconstruct` accepts (the
    array reconstruction names the class as its first argument), so a pickle cannot call the
    ``ndarray`` constructor itself."""

    def __repr__(self) -> str:
        return "numpy.ndarray"

    def __call__(self, *args, **kwargs):
        raise pickle.UnpicklingError("a direct numpy.ndarray(...) call (arrays are rebuilt only through "
                                     "numpy's array reconstruction)")


_NDARRAY = _ArrayType()


def _safe_reconstruct(subtype, shape, dtype):
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError(f"an array of type {subtype!r} (only numpy.ndarray is allowed)")
    return _numpy_internal("multiarray._reconstruct")(np.ndarray, shape, _safe_dtype(dtype))


def _safe_frombuffer(buf, dtype, shape, order):
    return _numpy_internal("numeric._frombuffer")(buf, _safe_dtype(dtype), shape, order)


#: The only globals :class:`RestrictedUnpickler` resolves: ``(module, name) -> callable``.
ALLOWED_GLOBALS: Dict[Tuple[str, str], Callable] = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy", "ndarray"): _NDARRAY,  # only as _reconstruct's first argument
    ("numpy", "dtype"): _safe_dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`ALLOWED_GLOBALS` (numpy array reconstruction and
    ``numpy.dtype``) and raises :class:`RefusedGlobal` for any other global, so no callable the
    file names is ever looked up, let alone run. Plain containers, bytes, strings and numbers
    need no globals. Persistent ids are refused too (``pickle.Unpickler``'s default)."""

    def find_class(self, module: str, name: str):
        obj = ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise RefusedGlobal(module, name)
        return obj


def restricted_load(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (``encoding="bytes"``, as the official
    Python 2 pickles of CIFAR-10 need: their dict keys come back as ``b"data"``, ``b"labels"``)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


# ----------------------------------------------------------------------------- readers
def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _check_labels(labels: np.ndarray, f: Path) -> np.ndarray:
    bad = (labels < 0) | (labels >= N_CLASSES)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"cifar10: {f}: label {int(labels[i])} of record {i} is out of range [0, {N_CLASSES}); "
                        f"not a CIFAR-10 batch")
    return labels.astype(np.int64)


def read_binary_batch(f: Path, limit: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """One batch of the binary version: ``(pixels uint8 [n, 3072], labels int64 [n])``, the first
    ``limit`` records only when ``limit > 0``.

    Raises:
        DataError: empty or truncated file (size not a multiple of 3,073 bytes), labels >= 10.
    """
    size = f.stat().st_size
    if size == 0 or size % RECORD_BYTES:
        raise DataError(f"cifar10: {f} is {size} bytes, not a whole number of {RECORD_BYTES}-byte records "
                        f"(1 label byte + {N_PIXELS} pixel bytes): truncated or not a CIFAR-10 binary batch")
    n = size // RECORD_BYTES
    if limit:
        n = min(n, limit)
    raw = np.fromfile(f, dtype=np.uint8, count=n * RECORD_BYTES).reshape(n, RECORD_BYTES)
    return np.ascontiguousarray(raw[:, 1:]), _check_labels(raw[:, 0], f)


def _get(batch: dict, key: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    return None


def read_python_batch(f: Path, limit: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """One batch of the python version, unpickled with :class:`RestrictedUnpickler`:
    ``(pixels uint8 [n, 3072], labels int64 [n])``.

    Raises:
        DataError: a global other than numpy's array reconstruction (refused before it is called),
            a file that is not a pickle, no dict, missing ``data``/``labels``, a wrong shape or
            dtype, labels not integers in ``[0, 10)``.
    """
    try:
        batch = restricted_load(f.read_bytes())
    except RefusedGlobal as exc:
        raise DataError(f"cifar10: {f} asks to load {exc.qualname!r}, which a CIFAR-10 batch never needs; refused "
                        f"(miafw unpickles only numpy arrays from these files and never runs code from them)") from None
    except Exception as exc:  # not a pickle, truncated, refused dtype, ...
        raise DataError(f"cifar10: {f} is not a readable CIFAR-10 python batch ({_one_line(exc)})") from None
    if not isinstance(batch, dict):
        raise DataError(f"cifar10: {f} holds a {type(batch).__name__}, not the dict of a CIFAR-10 python batch")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    missing = [k for k, v in (("data", data), ("labels", labels)) if v is None]
    if missing:
        keys = ", ".join(repr(k) for k in list(batch)[:6])
        raise DataError(f"cifar10: {f} lacks {' and '.join(repr(k.encode()) for k in missing)} "
                        f"(keys present: {keys or 'none'}); not a CIFAR-10 python batch")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != N_PIXELS:
        what = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"cifar10: {f}: b'data' must be a uint8 array [n, {N_PIXELS}], got a {what}")
    try:
        labels = np.asarray(labels)
    except Exception as exc:
        raise DataError(f"cifar10: {f}: b'labels' is not a list of integers ({_one_line(exc)})") from None
    if labels.ndim != 1 or labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"cifar10: {f}: b'labels' must be a flat list of integers, got {labels.dtype} "
                        f"of shape {labels.shape}")
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"cifar10: {f}: {labels.shape[0]} labels for {data.shape[0]} images")
    if data.shape[0] == 0:
        raise DataError(f"cifar10: {f} holds no records")
    if limit:
        data, labels = data[:limit], labels[:limit]
    return np.ascontiguousarray(data), _check_labels(labels, f)


READERS = {"binary": read_binary_batch, "python": read_python_batch}


def find_layout(root: Path, fmt: str = "auto") -> Tuple[str, Path]:
    """``(layout, directory)``: where the batches of the wanted layout (``fmt``) are: ``root``
    itself, or its subdirectory ``cifar-10-batches-bin`` / ``cifar-10-batches-py``. A directory
    counts as a layout when it holds any of that layout's batch files; binary wins over python
    under ``auto``.

    Raises:
        DataError: neither layout found.
    """
    layouts = ("binary", "python") if fmt == "auto" else (fmt,)
    for d in (root,) + tuple(root / DIRS[k] for k in layouts):
        if not d.is_dir():
            continue
        for layout in layouts:
            if any((d / n).is_file() for n in batch_names("all", layout)):
                return layout, d
    wanted = " or ".join(
        f"the {k} version ({DIRS[k]}: {batch_names('train', k)[0]}..{batch_names('train', k)[-1]}, "
        f"{batch_names('test', k)[0]})" for k in layouts)
    raise DataError(f"cifar10: {root} holds no CIFAR-10 batches: expected {wanted}, in it or in a subdirectory "
                    f"of that name")


class CIFAR10(DatasetSource):
    """CIFAR-10 (Krizhevsky 2009): 32x32 colour images of 10 classes, 50,000 training and 10,000
    test images, read from the official files on the local disk; nothing is downloaded.

    ``path`` is the extracted ``cifar-10-batches-py`` (python version) or ``cifar-10-batches-bin``
    (binary version) directory, or a directory holding one of them (the binary one is preferred
    when both are there). Pickled python batches are read with a restricted unpickler that loads
    numpy arrays only and refuses any other global (see the module docstring), so a doctored file
    cannot run code.

    Records: features float32 in ``[0, 1]`` (pixel / 255, a fixed scaling), flattened channel
    first (3 x 32 x 32 = 3,072, the files' own layout), ``image_shape=(3, 32, 32)``; labels int64
    in ``[0, 10)``; record ids are row numbers in the split (``all``: the 50,000 training images,
    then the test images).

    Args:
        path: the directory (required), e.g. ``~/data/cifar-10-batches-py``.
        split: ``train`` (data_batch_1..5), ``test`` (test_batch) or ``all`` (both, in that order).
        n_records: use only the first ``n_records`` records of the split (0 = all); only the
            batches holding them are read.
        grayscale: convert to one channel (ITU-R BT.601 luma, ``0.299 R + 0.587 G + 0.114 B``),
            ``image_shape=(1, 32, 32)``, 1,024 features.
        format: ``auto`` (binary if present, else python), ``python`` or ``binary``: which layout
            to read when ``path`` holds both.
    """

    api_version = "1.0"
    reference = "Krizhevsky: Learning Multiple Layers of Features from Tiny Images, tech. report, U. Toronto 2009"

    def __init__(self, path: str = "", split: Literal["train", "test", "all"] = "train", n_records: int = 0,
                 grayscale: bool = False, format: Literal["auto", "python", "binary"] = "auto"):
        self.path = path
        self.split = split
        self.n_records = n_records
        self.grayscale = grayscale
        self.format = format

    def validate(self) -> None:
        # path is checked by load() (a missing path is a DataError naming what to pass), so that the
        # defaults, which name no directory, still validate.
        if not isinstance(self.path, str):
            raise ValueError(f"path must be a directory name, got {self.path!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if isinstance(self.n_records, bool) or not isinstance(self.n_records, int) or self.n_records < 0:
            raise ValueError(f"n_records must be an integer >= 0 (0 = all), got {self.n_records!r}")
        if not isinstance(self.grayscale, (bool, np.bool_)):
            raise ValueError(f"grayscale must be true or false, got {self.grayscale!r}")
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")

    def batch_files(self) -> Tuple[str, List[Path]]:
        """``(layout, files)``: the batch files ``load`` reads for the split, in order.

        Raises:
            DataError: no path, a path that is not a directory, no CIFAR-10 layout there, or a
                batch file of the split missing.
        """
        self.validate()
        if not self.path:
            raise DataError("cifar10: path is required: the extracted CIFAR-10 directory, e.g. "
                            "--dataset cifar10:path=~/data/cifar-10-batches-py")
        root = Path(self.path).expanduser()
        if not root.exists():
            raise DataError(f"cifar10: path {str(root)!r} does not exist")
        if not root.is_dir():
            hint = " (extract it first: tar xzf ...)" if root.name.endswith((".tar.gz", ".tgz", ".tar")) else ""
            raise DataError(f"cifar10: path {str(root)!r} is not a directory{hint}; give the extracted "
                            f"cifar-10-batches-py or cifar-10-batches-bin directory")
        layout, d = find_layout(root, self.format)
        names = batch_names(self.split, layout)
        for n in names:
            if not (d / n).is_file():
                raise DataError(f"cifar10: batch file {str(d / n)!r} is missing (split={self.split} of the {layout} "
                                f"version reads {', '.join(names)})")
        return layout, [d / n for n in names]

    def load(self) -> Records:
        layout, files = self.batch_files()
        reader = READERS[layout]
        xs, ys, have = [], [], 0
        for f in files:
            left = self.n_records - have if self.n_records else 0
            data, labels = reader(f, left)
            xs.append(data)
            ys.append(labels)
            have += data.shape[0]
            if self.n_records and have >= self.n_records:
                break
        pixels = np.concatenate(xs) if len(xs) > 1 else xs[0]
        y = np.concatenate(ys) if len(ys) > 1 else ys[0]
        x = pixels.astype(np.float32) / np.float32(255.0)
        shape: Tuple[int, ...] = IMAGE_SHAPE
        if self.grayscale:
            rgb = x.reshape(x.shape[0], 3, 32 * 32)
            w = np.asarray(LUMA, dtype=np.float32)
            x = np.einsum("ncp,c->np", rgb, w).astype(np.float32)
            shape = (1, 32, 32)
        return Records.from_arrays(x, y, name="cifar10", n_classes=N_CLASSES, image_shape=shape)
