"""Content-addressed cache of trained populations.

Training is the expensive step of an evaluation, and it is a pure function of the dataset,
model family, recipe, number of models, seed and software versions. Those go into a SHA-256
key; the entry is a directory holding ``population.pt`` (tensors only, read back with
``torch.load(..., weights_only=True)``) and ``meta.json``. Entries are written into a temporary
directory and renamed into place, so a crash never leaves a half-written entry under a valid
key, and an unreadable entry is reported, ignored and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

ENTRY_FILE = "population.pt"
META_FILE = "meta.json"


def default_cache_dir() -> Path:
    """``$MIAFW_CACHE`` if set, else ``$XDG_CACHE_HOME/miafw`` (``~/.cache/miafw``)."""
    env = os.environ.get("MIAFW_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "miafw"


def cache_key(payload: Dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``payload``."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class PopulationCache:
    """A directory of trained populations; ``root=None`` disables caching."""

    def __init__(self, root: Optional[Path]):
        self.root = Path(root) if root is not None else None

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _entry(self, key: str) -> Path:
        assert self.root is not None
        return self.root / "populations" / key

    def load(self, key: str) -> Optional[Tuple[Dict[str, Any], Dict[str, Any]]]:
        """``(state, meta)`` stored under ``key``, or ``None`` (missing, disabled or unreadable)."""
        if not self.enabled:
            return None
        entry = self._entry(key)
        path = entry / ENTRY_FILE
        if not path.is_file():
            return None
        try:
            meta = json.loads((entry / META_FILE).read_text())
            if not isinstance(meta, dict):
                raise ValueError(f"{META_FILE} holds {type(meta).__name__}, not an object")
            return torch.load(path, map_location="cpu", weights_only=True), meta
        except Exception as exc:  # a truncated or foreign file: retrain rather than fail
            warnings.warn(f"ignoring unreadable cache entry {entry}: {type(exc).__name__}: {exc}")
            return None

    def store(self, key: str, state: Dict[str, Any], meta: Dict[str, Any]) -> Optional[Path]:
        """Write ``state`` under ``key`` atomically; returns the entry's path (``None`` if disabled).

        A failure to write (read-only or full disk) warns and leaves the cache as it was.
        """
        if not self.enabled:
            return None
        final = self._entry(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
            try:
                torch.save(state, tmp / ENTRY_FILE)
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str))
                if final.exists():  # an older unreadable entry: replace it
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            warnings.warn(f"could not write the population cache at {final}: {exc}")
            return None
        return final


__all__ = ["PopulationCache", "cache_key", "default_cache_dir"]
