"""Content-addressed, verified cache of trained populations.

Training is the expensive step of an evaluation, and it is a pure function of the dataset,
model family, recipe, train-time defenses, number of models, seed, device type and software
versions. Those go into a SHA-256 key; the entry is a directory holding ``population.pt``
(tensors only, read back with ``torch.load(..., weights_only=True)``), ``meta.json`` and
``checksums.json`` (the SHA-256 of both). Entries are written into a temporary directory and
renamed into place, so a crash never leaves a half-written entry under a valid key. Every load
verifies the checksums first: a damaged entry (a flipped byte, a truncated or edited file) is
reported in one line, never used, and replaced by the retrained population.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

ENTRY_FILE = "population.pt"
META_FILE = "meta.json"
CHECKSUM_FILE = "checksums.json"


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
        """``(state, meta)`` stored under ``key``, or ``None`` (missing, disabled, damaged or
        unreadable: a damaged entry is reported in one warning and will be replaced)."""
        if not self.enabled:
            return None
        entry = self._entry(key)
        if not (entry / ENTRY_FILE).is_file():
            return None
        problem = verify_entry(entry)
        if problem is not None:
            warnings.warn(f"cache entry {key[:12]} is damaged ({problem}); retraining")
            return None
        try:
            meta = json.loads((entry / META_FILE).read_text())
            if not isinstance(meta, dict):
                raise ValueError(f"{META_FILE} holds {type(meta).__name__}, not an object")
            return torch.load(entry / ENTRY_FILE, map_location="cpu", weights_only=True), meta
        except Exception as exc:  # a foreign file that matches its own checksum: retrain rather than fail
            warnings.warn(f"ignoring unreadable cache entry {entry}: {type(exc).__name__}: {exc}")
            return None

    def store(self, key: str, state: Dict[str, Any], meta: Dict[str, Any]) -> Optional[Path]:
        """Write ``state`` under ``key`` atomically, with the SHA-256 of every file in
        ``checksums.json``; returns the entry's path (``None`` if disabled).

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
                sums = {name: _sha256(tmp / name) for name in (ENTRY_FILE, META_FILE)}
                (tmp / CHECKSUM_FILE).write_text(json.dumps(sums, indent=2, sort_keys=True))
                if final.exists():  # an older damaged or unreadable entry: replace it
                    shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            warnings.warn(f"could not write the population cache at {final}: {exc}")
            return None
        return final

    def entries(self) -> List[CacheEntry]:
        """Every entry, newest first, each with its size and whether its files match their checksums."""
        if not self.enabled or not (self.root / "populations").is_dir():
            return []
        out = []
        for entry in (self.root / "populations").iterdir():
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            files = [p for p in entry.iterdir() if p.is_file()]
            try:
                meta = json.loads((entry / META_FILE).read_text())
                meta = meta if isinstance(meta, dict) else {}
            except (OSError, ValueError):
                meta = {}
            out.append(CacheEntry(key=entry.name, path=entry, size=sum(p.stat().st_size for p in files),
                                  modified=max((p.stat().st_mtime for p in files), default=0.0),
                                  problem=verify_entry(entry), meta=meta))
        return sorted(out, key=lambda e: e.modified, reverse=True)

    def remove(self, key: str) -> None:
        """Delete one entry (its whole directory)."""
        shutil.rmtree(self._entry(key), ignore_errors=True)


@dataclass(frozen=True)
class CacheEntry:
    """One cached population as :meth:`PopulationCache.entries` lists it (``problem`` is ``None``
    when every file matches its checksum)."""

    key: str
    path: Path
    size: int
    modified: float
    problem: Optional[str]
    meta: Dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_entry(entry: Path) -> Optional[str]:
    """``None`` when every file of the cache entry ``entry`` matches ``checksums.json``, else what is
    wrong, in a few words (a missing, unreadable or mismatched file)."""
    try:
        sums = json.loads((Path(entry) / CHECKSUM_FILE).read_text())
    except FileNotFoundError:
        return f"no {CHECKSUM_FILE}"
    except (OSError, ValueError) as exc:
        return f"{CHECKSUM_FILE} is unreadable: {type(exc).__name__}"
    if not isinstance(sums, dict) or set(sums) != {ENTRY_FILE, META_FILE}:
        return f"{CHECKSUM_FILE} does not list {ENTRY_FILE} and {META_FILE}"
    for name, expected in sorted(sums.items()):
        try:
            actual = _sha256(Path(entry) / name)
        except OSError as exc:
            return f"{name} is unreadable: {type(exc).__name__}"
        if actual != expected:
            return f"{name} does not match its checksum"
    return None


__all__ = ["CacheEntry", "PopulationCache", "cache_key", "default_cache_dir", "verify_entry"]
