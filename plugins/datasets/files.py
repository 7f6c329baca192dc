"""Your own data from a file: CSV with a header row, or a NumPy ``.npz`` archive."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mia_core.base import DatasetSource
from mia_core.data import DataError, Records


class FileDataset(DatasetSource):
    """Records read from a local file, used as given (no preprocessing, so scale features first).

    * ``.csv``: a header row, then one record per row; every column is a number; the column
      named ``label`` holds the class (integers from 0). Every other column is a feature, except
      the ``id`` column and the ``drop`` columns.
    * ``.npz``: arrays ``x`` (``[N, D]``) and ``y`` (``[N]``), read with ``allow_pickle=False``;
      other arrays of ``N`` entries are columns (the ``id`` one, or one read by :meth:`column`).

    Args:
        path: the file.
        label: the label column of a CSV file.
        id: a column (CSV) or array (npz) of distinct integer record ids, used as the records'
            stable identifiers instead of the row numbers (``miafw audit --members FILE`` lists
            them); never a feature. Empty: the row numbers, from 0.
        drop: CSV columns that are not features, comma separated (quote the list: ``drop="a,b"``),
            e.g. a membership column read by ``miafw audit --members column=NAME`` (which adds its
            column here itself).
    """

    api_version = "1.0"

    def __init__(self, path: str = "", label: str = "label", id: str = "", drop: str = ""):
        self.path = path
        self.label = label
        self.id = id
        self.drop = drop

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path is required, e.g. --dataset file:path=data.csv")
        if Path(self.path).suffix.lower() not in (".csv", ".npz"):
            raise ValueError(f"path must end in .csv or .npz, got {self.path!r}")
        for name in self._dropped():
            if name in (self.label, self.id):
                raise ValueError(f"drop names column {name!r}, which is the {'label' if name == self.label else 'id'} "
                                 f"column")

    def _dropped(self):
        return [c.strip() for c in str(self.drop).split(",") if c.strip()]

    def column(self, name: str) -> np.ndarray:
        """A CSV column among ``drop`` (or an npz array besides ``x`` and ``y``), float64 ``[N]`` in
        record order.

        Raises:
            DataError: no such column; or (CSV) a column that is a feature (not in ``drop``).
        """
        self.validate()
        p = Path(self.path).expanduser()
        if not p.is_file():
            raise DataError(f"dataset file {str(p)!r} does not exist")
        if p.suffix.lower() == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if name not in z.files or name in ("x", "y"):
                    others = [k for k in z.files if k not in ("x", "y")]
                    raise DataError(f"{p.name}: no array named {name!r} besides x and y; found "
                                    f"{', '.join(others) or 'none'}")
                col = np.asarray(z[name])
            if col.ndim != 1 or not np.issubdtype(col.dtype, np.number):
                raise DataError(f"{p.name}: array {name!r} must hold one number per record, got dtype {col.dtype} "
                                f"and shape {col.shape}")
            return col.astype(np.float64)
        header, values = self._read_csv(p)
        if name not in header:
            raise DataError(f"{p.name}: no column named {name!r}; columns: {', '.join(header)}")
        if name not in self._dropped() and name != self.id:
            raise DataError(f"{p.name}: column {name!r} is a feature of the records; leave it out of the features "
                            f"with drop={name}")
        return values[:, header.index(name)].copy()

    def load(self) -> Records:
        self.validate()
        p = Path(self.path).expanduser()
        if not p.is_file():
            raise DataError(f"dataset file {str(p)!r} does not exist")
        if p.suffix.lower() == ".npz":
            return self._load_npz(p)
        return self._load_csv(p)

    def _load_npz(self, p: Path) -> Records:
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [k for k in ("x", "y") if k not in z.files]
                if missing:
                    raise DataError(f"{p.name}: missing arrays {missing}; found {z.files} (need x and y)")
                x, y = z["x"], z["y"]
                if self.id and self.id not in z.files:
                    raise DataError(f"{p.name}: no array named {self.id!r} (id=); found {z.files}")
                ids = z[self.id] if self.id else None
        except DataError:
            raise
        except (ValueError, OSError) as exc:  # object arrays (pickles) are refused here too
            raise DataError(f"{p.name}: cannot read as a NumPy archive: {exc}") from None
        return Records.from_arrays(x, y, name=p.stem, index=self._ids(p, ids, len(y)))

    def _ids(self, p: Path, ids, n: int):
        """The id column checked: ``n`` distinct integers (``None`` without ``id=``)."""
        if ids is None:
            return None
        ids = np.asarray(ids)
        if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.number) or not np.all(np.isfinite(ids)) \
                or not np.all(ids == np.round(ids)):
            raise DataError(f"{p.name}: the id column {self.id!r} must hold one integer per record")
        ids = ids.astype(np.int64)
        if len(np.unique(ids)) != n:
            values, counts = np.unique(ids, return_counts=True)
            dup = values[np.argmax(counts > 1)]
            raise DataError(f"{p.name}: the id column {self.id!r} repeats id {int(dup)}; ids must be distinct")
        return ids

    def _load_csv(self, p: Path) -> Records:
        header, values = self._read_csv(p)
        for name in [self.label] + ([self.id] if self.id else []) + self._dropped():
            if name not in header:
                raise DataError(f"{p.name}: no column named {name!r}; columns: {', '.join(header)}")
        li = header.index(self.label)
        drop = [li] + ([header.index(self.id)] if self.id else []) + [header.index(c) for c in self._dropped()]
        x = np.delete(values, sorted(set(drop)), axis=1)
        ids = values[:, header.index(self.id)] if self.id else None
        return Records.from_arrays(x, values[:, li], name=p.stem, index=self._ids(p, ids, len(values)))

    def _read_csv(self, p: Path):
        """The header and every cell as float64 ``[N, columns]``."""
        with p.open(newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            raise DataError(f"{p.name} is empty (0 records)")
        header = [h.strip() for h in rows[0]]
        body = [r for r in rows[1:] if any(c.strip() for c in r)]
        values = np.empty((len(body), len(header)), dtype=np.float64)
        for i, row in enumerate(body):
            if len(row) != len(header):
                raise DataError(f"{p.name}: line {i + 2} has {len(row)} fields, the header has {len(header)}")
            for j, cell in enumerate(row):
                try:
                    values[i, j] = float(cell)
                except ValueError:
                    raise DataError(f"{p.name}: line {i + 2}, column {header[j]!r}: {cell!r} is not a number") from None
        return header, values
