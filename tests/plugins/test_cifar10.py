"""The cifar10 dataset: both official layouts read from small generated batches, the restricted
unpickler, and a one-line DataError for every malformed input."""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from mia_core import registry
from mia_core.cli import main
from mia_core.data import DataError
from mia_core.testing import check_params
from mia_plugins.datasets.cifar10 import CIFAR10, RestrictedUnpickler, restricted_load

N = 20  # records per generated batch
NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _batches(seed=0):
    """Per batch name: (pixels uint8 [N, 3072], labels int [N]) with every class present."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in NAMES:
        labels = rng.permutation(np.arange(N) % 10)
        out[name] = (rng.integers(0, 256, size=(N, 3072), dtype=np.uint8), labels)
    return out


def _write_py(d, batches, *, dump=None):
    d.mkdir(parents=True, exist_ok=True)
    for name, (pixels, labels) in batches.items():
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": pixels,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))]}
        (d / name).write_bytes(dump(batch) if dump else pickle.dumps(batch))
    return d


def _write_bin(d, batches):
    d.mkdir(parents=True, exist_ok=True)
    for name, (pixels, labels) in batches.items():
        rows = np.concatenate([np.asarray(labels, dtype=np.uint8)[:, None], pixels], axis=1)
        (d / f"{name}.bin").write_bytes(rows.tobytes())
    return d


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 as Python 2's cPickle wrote the official batches: every string a BINSTRING (read
    back as bytes with encoding="bytes") and numpy's globals under ``numpy.core``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b if len(b) < 256
                   else pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + module.encode() + b"\n" + (name or obj.__qualname__).encode() + b"\n")
        self.memoize(obj)

    dispatch[str] = _save_str
    dispatch[bytes] = _save_str
    dispatch[type] = save_global


def _py2_dumps(obj):
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    batches = _batches()
    py = _write_py(root / "cifar-10-batches-py", batches)
    bn = _write_bin(root / "cifar-10-batches-bin", batches)
    return root, py, bn, batches


def _expected(batches, names):
    pixels = np.concatenate([batches[n][0] for n in names])
    labels = np.concatenate([batches[n][1] for n in names])
    return pixels.astype(np.float32) / np.float32(255.0), labels.astype(np.int64)


def _same(a, b):
    assert np.array_equal(a.x, b.x) and a.x.dtype == b.x.dtype == np.float32
    assert np.array_equal(a.y, b.y) and np.array_equal(a.index, b.index)
    assert (a.n_classes, a.image_shape, a.name) == (b.n_classes, b.image_shape, b.name)
    assert a.fingerprint() == b.fingerprint()


def test_registered_and_parameter_rules():
    assert registry.load("datasets", "cifar10") is CIFAR10
    check_params(CIFAR10)
    check_params(CIFAR10, {"path": "cifar-10-batches-py", "split": "all", "n_records": 100, "grayscale": True,
                           "format": "binary"})
    for bad, match in (({"split": "dev"}, "split must be one of"), ({"n_records": -1}, "n_records must be"),
                       ({"format": "npz"}, "format must be one of")):
        with pytest.raises(ValueError, match=match):
            CIFAR10(**bad).validate()


@pytest.mark.parametrize("split,names", [("train", NAMES[:5]), ("test", NAMES[5:]), ("all", NAMES)])
def test_both_layouts_give_identical_records(cifar, split, names):
    _, py, bn, batches = cifar
    a = CIFAR10(path=str(py), split=split).load()
    b = CIFAR10(path=str(bn), split=split).load()
    _same(a, b)
    x, y = _expected(batches, names)
    assert np.array_equal(a.x, x) and np.array_equal(a.y, y)
    assert a.n == N * len(names) and a.n_features == 3072
    assert a.image_shape == (3, 32, 32) and a.n_classes == 10 and a.y.dtype == np.int64
    assert 0.0 <= a.x.min() and a.x.max() <= 1.0
    assert np.array_equal(a.index, np.arange(a.n))


def test_official_python2_pickles_load(tmp_path, cifar):
    """The official python batches are Python 2 pickles (protocol 2, str keys read as bytes,
    numpy.core globals); the restricted unpickler reads them like the binary version."""
    _, _, bn, batches = cifar
    py2 = _write_py(tmp_path / "cifar-10-batches-py", batches, dump=_py2_dumps)
    assert b"numpy.core.multiarray\n_reconstruct" in (py2 / "data_batch_1").read_bytes()
    _same(CIFAR10(path=str(py2), split="all").load(), CIFAR10(path=str(bn), split="all").load())


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_any_pickle_protocol_of_numpy_arrays_loads(protocol):
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    blob = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=protocol)
    if protocol == 2:  # Python 3 writes bytes as _codecs.encode(...) under protocol 2: refused, not needed
        with pytest.raises(pickle.UnpicklingError, match="_codecs.encode"):
            restricted_load(blob)
        return
    out = restricted_load(blob)
    assert np.array_equal(out[b"data"], data) and out[b"labels"] == [3, 4]


def test_parent_directory_finds_a_layout_and_prefers_binary(tmp_path, cifar):
    _, _, _, batches = cifar
    root = tmp_path / "both"
    _write_bin(root / "cifar-10-batches-bin", batches)
    py = _write_py(root / "cifar-10-batches-py", batches)
    (py / "data_batch_1").write_bytes(b"not a pickle")  # never opened under auto: binary wins
    auto = CIFAR10(path=str(root)).load()
    assert auto.n == 5 * N
    with pytest.raises(DataError, match="not a readable CIFAR-10 python batch"):
        CIFAR10(path=str(root), format="python").load()
    only_py = tmp_path / "py-only"
    _write_py(only_py / "cifar-10-batches-py", batches)
    _same(CIFAR10(path=str(only_py)).load(), auto)
    _same(CIFAR10(path=str(root / "cifar-10-batches-bin"), format="binary").load(), auto)


def test_n_records_reads_only_what_it_needs(tmp_path, cifar):
    _, py, bn, batches = cifar
    full = CIFAR10(path=str(bn), split="all").load()
    for n in (5, N, N + 7, 3 * N):
        for p in (py, bn):
            r = CIFAR10(path=str(p), split="all", n_records=n).load()
            assert r.n == n and np.array_equal(r.x, full.x[:n]) and np.array_equal(r.y, full.y[:n])
    assert CIFAR10(path=str(bn), split="test", n_records=10 ** 6).load().n == N  # more than there are: all
    # the batches after the first n records are not read (a damaged data_batch_5 does not matter) ...
    d = _write_bin(tmp_path / "bin", batches)
    (d / "data_batch_5.bin").write_bytes(b"\x00" * 10)
    assert CIFAR10(path=str(d), n_records=N).load().n == N
    with pytest.raises(DataError, match="not a whole number"):
        CIFAR10(path=str(d)).load()


def test_grayscale(cifar):
    _, py, bn, batches = cifar
    g = CIFAR10(path=str(bn), split="test", grayscale=True).load()
    assert g.image_shape == (1, 32, 32) and g.n_features == 1024 and g.x.dtype == np.float32
    rgb = batches["test_batch"][0].astype(np.float64).reshape(N, 3, 1024) / 255.0
    want = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    np.testing.assert_allclose(g.x, want, atol=1e-6)
    _same(g, CIFAR10(path=str(py), split="test", grayscale=True).load())


# ----------------------------------------------------------------------------- malformed input
def _broken(tmp_path, layout, edit):
    """A copy of the generated batches in ``layout`` with ``edit(dir)`` applied."""
    batches = _batches(1)
    d = (_write_bin if layout == "binary" else _write_py)(tmp_path / f"cifar-10-batches-{layout[:3]}", batches)
    edit(d, batches)
    return d


def _pickle_into(name, obj, protocol=pickle.DEFAULT_PROTOCOL):
    def edit(d, batches):
        (d / name).write_bytes(pickle.dumps(obj, protocol=protocol))
    return edit


def _good_batch(change=None):
    batch = {b"data": np.zeros((N, 3072), np.uint8), b"labels": [int(v) for v in np.arange(N) % 10]}
    batch.update(change or {})
    return {k: v for k, v in batch.items() if v is not None}


def _truncate(d, batches):
    f = d / "data_batch_2.bin"
    f.write_bytes(f.read_bytes()[:-100])


def _bad_label_bin(d, batches):
    f = d / "test_batch.bin"
    raw = bytearray(f.read_bytes())
    raw[3073 * 4] = 10  # record 4's label byte
    f.write_bytes(bytes(raw))


MALFORMED = {
    "missing batch (binary)": ("binary", lambda d, b: (d / "data_batch_3.bin").unlink(), "train",
                               r"data_batch_3.bin' is missing \(split=train of the binary version"),
    "missing batch (python)": ("python", lambda d, b: (d / "test_batch").unlink(), "all",
                               r"test_batch' is missing \(split=all of the python version"),
    "truncated binary": ("binary", _truncate, "train", r"data_batch_2.bin is 61360 bytes, not a whole number of "
                                                       r"3073-byte records"),
    "empty binary": ("binary", lambda d, b: (d / "data_batch_1.bin").write_bytes(b""), "train",
                     "is 0 bytes, not a whole number"),
    "label out of range (binary)": ("binary", _bad_label_bin, "test", r"label 10 of record 4 is out of range \[0, 10\)"),
    "label out of range (python)": ("python",
                                    _pickle_into("data_batch_1", _good_batch({b"labels": [0] * 19 + [11]})),
                                    "train", r"label 11 of record 19 is out of range"),
    "negative label (python)": ("python", _pickle_into("data_batch_1", _good_batch({b"labels": [-1] + [0] * 19})),
                                "train", r"label -1 of record 0 is out of range"),
    "missing key": ("python", _pickle_into("data_batch_2", _good_batch({b"labels": None})), "train",
                    r"lacks b'labels' \(keys present: b'data'\)"),
    "missing both keys": ("python", _pickle_into("data_batch_2", {b"batch_label": b"x"}), "train",
                          r"lacks b'data' and b'labels'"),
    "wrong shape": ("python", _pickle_into("data_batch_1", _good_batch({b"data": np.zeros((N, 3000), np.uint8)})),
                    "train", r"b'data' must be a uint8 array \[n, 3072\], got a uint8 array of shape \(20, 3000\)"),
    "wrong dtype": ("python", _pickle_into("data_batch_1", _good_batch({b"data": np.zeros((N, 3072))})),
                    "train", r"must be a uint8 array \[n, 3072\], got a float64 array"),
    "data not an array": ("python", _pickle_into("data_batch_1", _good_batch({b"data": b"\x00" * 3072})),
                          "train", r"got a bytes"),
    "label count": ("python", _pickle_into("test_batch", _good_batch({b"labels": [1, 2]})), "test",
                    r"2 labels for 20 images"),
    "labels not integers": ("python", _pickle_into("test_batch", _good_batch({b"labels": [0.5] * N})), "test",
                            r"b'labels' must be a flat list of integers, got float64"),
    "not a dict": ("python", _pickle_into("data_batch_4", [1, 2, 3]), "train", r"holds a list, not the dict"),
    "not a pickle": ("python", lambda d, b: (d / "data_batch_5").write_bytes(b"hello, world"), "train",
                     r"data_batch_5 is not a readable CIFAR-10 python batch \(UnpicklingError"),
    "truncated pickle": ("python", lambda d, b: (d / "test_batch").write_bytes((d / "test_batch").read_bytes()[:500]),
                         "test", r"test_batch is not a readable CIFAR-10 python batch"),
    "object array": ("python", _pickle_into("data_batch_1", _good_batch({b"data": np.array([[1]], dtype=object)})),
                     "train", r"not a readable CIFAR-10 python batch \(UnpicklingError: a numpy object dtype"),
    "disallowed global": ("python", _pickle_into("data_batch_1", _good_batch({b"labels": range(N)})), "train",
                          r"asks to load 'builtins.range', which a CIFAR-10 batch never needs; refused"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_batches_give_one_line_data_errors(tmp_path, case):
    layout, edit, split, match = MALFORMED[case]
    d = _broken(tmp_path, layout, edit)
    with pytest.raises(DataError, match=match) as e:
        CIFAR10(path=str(d), split=split).load()
    assert "\n" not in str(e.value) and str(e.value).startswith("cifar10: ")


def test_bad_paths_give_one_line_data_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b")
    other = tmp_path / "other"
    (other / "cifar-10-batches-py").mkdir(parents=True)  # a layout directory with no batches in it
    cases = [
        ("", r"path is required"),
        (str(tmp_path / "nope"), r"does not exist"),
        (str(tmp_path / "cifar-10-python.tar.gz"), r"is not a directory \(extract it first"),
        (str(tmp_path / "empty"), r"holds no CIFAR-10 batches: expected the binary version \(cifar-10-batches-bin: "
                                  r"data_batch_1.bin..data_batch_5.bin, test_batch.bin\) or the python version"),
        (str(other), r"holds no CIFAR-10 batches"),
    ]
    for path, match in cases:
        with pytest.raises(DataError, match=match) as e:
            CIFAR10(path=path).load()
        assert "\n" not in str(e.value)


class _Pwn:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


@pytest.mark.parametrize("where", ["data", "labels", "top"])
def test_malicious_pickle_is_refused_without_running(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = _Pwn(marker)
    obj = payload if where == "top" else _good_batch({where.encode(): payload})
    d = _broken(tmp_path, "python", _pickle_into("data_batch_1", obj))
    assert b"system" in (d / "data_batch_1").read_bytes()
    with pytest.raises(DataError, match=rf"asks to load '{os.system.__module__}.system'.*refused") as e:
        CIFAR10(path=str(d)).load()
    assert "\n" not in str(e.value)
    assert not marker.exists()
    # the unpickler itself refuses the global before looking it up
    with pytest.raises(pickle.UnpicklingError, match="system"):
        RestrictedUnpickler(io.BytesIO((d / "data_batch_1").read_bytes()), encoding="bytes").load()
    assert not marker.exists()


class _NewArray:
    """Pickles as ``numpy.ndarray((4,), "O")`` called directly (NEWOBJ), not via _reconstruct."""

    def __reduce__(self):
        return (np.ndarray, ((4,), "O"))


def test_only_array_reconstruction_is_allowed():
    for obj in (_NewArray(), np.array([1, 2]).astype(object), [np.float64(1.0)], getattr, {b"data": eval}):
        with pytest.raises(pickle.UnpicklingError):
            restricted_load(pickle.dumps(obj))


def test_cli_reports_a_refused_pickle_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    d = _broken(tmp_path, "python", _pickle_into("data_batch_3", _Pwn(marker)))
    res = CliRunner().invoke(main, ["eval", "--dataset", f"cifar10:path={d}", "--attack", "loss", "-q",
                                    "--no-cache", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2, res.output
    assert "refused" in res.output and "Traceback" not in res.output
    assert not marker.exists()


@pytest.mark.slow
def test_cli_end_to_end_with_a_small_cnn(tmp_path, cifar):
    _, py, _, _ = cifar
    out = tmp_path / "runs"
    res = CliRunner().invoke(main, [
        "eval", "--dataset", f"cifar10:path={py},split=all", "--model", "cnn:channels=2,depth=2,width=0",
        "--attack", "lira:augment=mirror", "--n-models", "6", "--epochs", "2", "-q", "--no-cache", "--out", str(out)])
    assert res.exit_code == 0, res.output
    import json

    m = json.loads(next(out.rglob("metrics.json")).read_text())
    assert np.isfinite(m["attacks"]["lira:augment=mirror"]["auc"])
