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
      named ``label`` holds the class (integers from 0).
    * ``.npz``: arrays ``x`` (``[N, D]``) and ``y`` (``[N]``), read with ``allow_pickle=False``.

    Args:
        path: the file.
        label: the label column of a CSV file.
    """

    api_version = "1.0"

    def __init__(self, path: str = "", label: str = "label"):
        self.path = path
        self.label = label

    def validate(self) -> None:
        if not self.path:
            raise ValueError("path is required, e.g. --dataset file:path=data.csv")
        if Path(self.path).suffix.lower() not in (".csv", ".npz"):
            raise ValueError(f"path must end in .csv or .npz, got {self.path!r}")

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
        except DataError:
            raise
        except (ValueError, OSError) as exc:  # object arrays (pickles) are refused here too
            raise DataError(f"{p.name}: cannot read as a NumPy archive: {exc}") from None
        return Records.from_arrays(x, y, name=p.stem)

    def _load_csv(self, p: Path) -> Records:
        with p.open(newline="") as fh:
            rows = list(csv.reader(fh))
        if not rows:
            raise DataError(f"{p.name} is empty (0 records)")
        header = [h.strip() for h in rows[0]]
        if self.label not in header:
            raise DataError(f"{p.name}: no column named {self.label!r}; columns: {', '.join(header)}")
        li = header.index(self.label)
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
        x = np.delete(values, li, axis=1)
        return Records.from_arrays(x, values[:, li], name=p.stem)
