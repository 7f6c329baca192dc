"""The run index: ``<out>/index.sqlite``, one row per run, behind ``miafw runs``.

A run is recorded as ``running`` (with its process id and host) when its directory is created and
moved to ``complete``, ``failed`` or ``interrupted`` (Ctrl-C, SIGTERM) when it ends, in one
transaction each, so the index never names a half-written run as complete. A ``running`` run
whose process is gone (``kill -9``, a crash) is listed as ``interrupted``; :meth:`RunIndex.prune`
removes such runs. Rows of runs rejected as usage errors (before any result exists) are removed.
The run directories are the record: an index that is missing or corrupt is rebuilt from them
(:meth:`RunIndex.rebuild`), the corrupt file kept aside.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

SCHEMA_VERSION = 2
STATUSES = ("running", "complete", "failed", "interrupted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id        TEXT PRIMARY KEY,
    status    TEXT NOT NULL CHECK (status IN ('running', 'complete', 'failed', 'interrupted')),
    created   TEXT NOT NULL,
    finished  TEXT,
    path      TEXT NOT NULL,
    dataset   TEXT,
    model     TEXT,
    attacks   TEXT,
    defenses  TEXT,
    n_models  INTEGER,
    seed      INTEGER,
    summary   TEXT,
    error     TEXT,
    pid       INTEGER,
    host      TEXT
)
"""

#: Schema 1 had neither the ``interrupted`` status nor the pid and host of the running process.
_FROM_V1 = """
ALTER TABLE runs RENAME TO runs_v1;
{schema};
INSERT INTO runs (id, status, created, finished, path, dataset, model, attacks, defenses, n_models, seed,
                  summary, error)
    SELECT id, status, created, finished, path, dataset, model, attacks, defenses, n_models, seed, summary, error
    FROM runs_v1;
DROP TABLE runs_v1;
"""


def _alive(pid: Optional[int], host: Optional[str]) -> bool:
    """Whether the process that started a run may still be running it (a run started on another
    host is assumed alive: it cannot be checked from here)."""
    if pid is None or host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class RunIndex:
    """SQLite index of the runs under one output directory."""

    def __init__(self, out: Path):
        self.path = Path(out) / "index.sqlite"

    def _connect(self) -> sqlite3.Connection:
        """An open index; a missing index beside existing run directories, or a corrupt one (moved
        aside as ``index.sqlite.corrupt-<time>``), is first rebuilt from the run directories."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.is_file() and _run_dirs(self.path.parent):
            self.rebuild()
        try:
            return self._open()
        except sqlite3.DatabaseError:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)
            self.rebuild()
            return self._open()

    def _open(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        try:
            version = con.execute("PRAGMA user_version").fetchone()[0]
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError:
            con.close()
            raise
        if version not in (0, 1, SCHEMA_VERSION):
            con.close()
            raise RuntimeError(f"{self.path} has index schema {version}; this miafw reads schema {SCHEMA_VERSION}")
        if version == 1:
            with con:
                con.executescript(_FROM_V1.format(schema=_SCHEMA.strip()))
        con.execute(_SCHEMA)
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return con

    def start(self, run_id: str, path: Path, config: Dict[str, Any]) -> None:
        con = self._connect()
        try:
            with con:
                con.execute(
                    "INSERT INTO runs (id, status, created, path, dataset, model, attacks, defenses, n_models, seed, "
                    "pid, host) VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        run_id, _now(), str(path),
                        config["dataset"]["name"], config["model"]["name"],
                        ",".join(a["label"] for a in config.get("attacks", [])),
                        ",".join(d["name"] for d in config.get("defenses", [])),
                        config.get("n_models"), config.get("seed"), os.getpid(), socket.gethostname(),
                    ),
                )
        finally:
            con.close()

    def finish(self, run_id: str, status: str, path: Path, *, summary: Optional[Dict] = None,
               error: Optional[str] = None) -> None:
        if status not in STATUSES[1:]:
            raise ValueError(f"status must be one of {', '.join(STATUSES[1:])}, got {status!r}")
        con = self._connect()
        try:
            with con:
                con.execute(
                    "UPDATE runs SET status = ?, finished = ?, path = ?, summary = ?, error = ? WHERE id = ?",
                    (status, _now(), str(path), json.dumps(summary) if summary is not None else None, error, run_id),
                )
        finally:
            con.close()

    def forget(self, run_id: str) -> None:
        con = self._connect()
        try:
            with con:
                con.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        finally:
            con.close()

    def is_empty(self) -> bool:
        """True when the index file is missing or holds no run."""
        if not self.path.is_file():
            return True
        con = self._connect()
        try:
            return con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
        finally:
            con.close()

    def delete(self) -> None:
        """Remove the index file (and SQLite's journal beside it)."""
        for suffix in ("", "-journal", "-wal", "-shm"):
            Path(str(self.path) + suffix).unlink(missing_ok=True)

    def list(self, *, limit: Optional[int] = None) -> List[Dict[str, Any]]:
        """Runs, newest first (rebuilt from the run directories when the index is missing)."""
        if not self.path.is_file() and not _run_dirs(self.path.parent):
            return []
        con = self._connect()
        try:
            con.row_factory = sqlite3.Row
            q = "SELECT * FROM runs ORDER BY rowid DESC"
            rows = con.execute(q + (f" LIMIT {int(limit)}" if limit else "")).fetchall()
        finally:
            con.close()
        out = []
        for r in rows:
            d = dict(r)
            d["summary"] = json.loads(d["summary"]) if d["summary"] else None
            if d["status"] == "running" and not _alive(d["pid"], d["host"]):
                d["status"] = "interrupted"  # its process died (kill -9, a crash) without recording it
                d["error"] = d["error"] or f"process {d['pid']} on {d['host']} ended without finishing the run"
            out.append(d)
        return out

    def rebuild(self) -> int:
        """Write the index anew from the run directories under its folder (a finished run from its
        ``config.json`` and ``metrics.json``, a ``.failed`` one with the first line of its
        ``FAILED.txt``, a ``.partial`` one as interrupted); returns the number of runs indexed.
        Written to a temporary file and renamed, so a crash leaves the old index or the new one."""
        rows = [_row_from_dir(d) for d in _run_dirs(self.path.parent)]
        rows = sorted((r for r in rows if r is not None), key=lambda r: (r["created"], r["id"]))
        tmp = self.path.with_name(f".{self.path.name}.rebuild")
        tmp.unlink(missing_ok=True)
        con = sqlite3.connect(tmp)
        try:
            with con:
                con.execute(_SCHEMA)
                con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                con.executemany(
                    "INSERT INTO runs (id, status, created, finished, path, dataset, model, attacks, defenses, "
                    "n_models, seed, summary, error) VALUES (:id, :status, :created, :finished, :path, :dataset, "
                    ":model, :attacks, :defenses, :n_models, :seed, :summary, :error)", rows)
        finally:
            con.close()
        os.replace(tmp, self.path)
        return len(rows)

    def prune(self) -> List[Dict[str, Any]]:
        """Remove the runs whose process died without finishing them (their row and their
        ``.partial`` directory); returns the rows removed."""
        dead = [r for r in self.list() if r["status"] == "interrupted" and r["finished"] is None]
        for r in dead:
            path = Path(r["path"])
            if path.name.endswith(".partial") and path.parent == self.path.parent:
                shutil.rmtree(path, ignore_errors=True)
            self.forget(r["id"])
        return dead


def _run_dirs(out: Path) -> List[Path]:
    """Directories under ``out`` that hold a run's ``config.json`` (finished, ``.failed`` or
    ``.partial``)."""
    if not out.is_dir():
        return []
    return sorted(d for d in out.iterdir() if d.is_dir() and (d / "config.json").is_file())


def _row_from_dir(d: Path) -> Optional[Dict[str, Any]]:
    """An index row for the run directory ``d`` (``None`` when its config cannot be read)."""
    try:
        config = json.loads((d / "config.json").read_text())
        dataset, model = config["dataset"]["name"], config["model"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    name = d.name
    summary, error, finished = None, None, None
    if name.endswith(".failed"):
        status, run_id = "failed", name[: -len(".failed")]
        try:
            lines = [line for line in (d / "FAILED.txt").read_text().splitlines() if line.strip()]
            error = lines[-1] if lines else None
            status = "interrupted" if error and error.startswith(("KeyboardInterrupt", "Terminated")) else status
        except OSError:
            pass
    elif name.startswith(".") and name.endswith(".partial"):
        status, run_id = "interrupted", name[1: -len(".partial")]
        error = "the run's process ended without finishing it (found as a .partial directory)"
    else:
        run_id = name
        try:
            summary = summary_of(json.loads((d / "metrics.json").read_text()))
            status = "complete"
            finished = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime((d / "metrics.json").stat().st_mtime))
        except (OSError, ValueError):
            status, error = "failed", "no readable metrics.json"
    created = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime((d / "config.json").stat().st_mtime))
    return {"id": run_id, "status": status, "created": created, "finished": finished, "path": str(d),
            "dataset": dataset, "model": model,
            "attacks": ",".join(a.get("label", a.get("name", "")) for a in config.get("attacks", [])),
            "defenses": ",".join(x.get("name", "") for x in config.get("defenses", [])),
            "n_models": config.get("n_models"), "seed": config.get("seed"),
            "summary": None if summary is None else json.dumps(summary), "error": error}


def filter_runs(rows: List[Dict[str, Any]], *, dataset: Optional[str] = None, attack: Optional[str] = None,
                defense: Optional[str] = None, status: Optional[str] = None, since: Optional[str] = None,
                until: Optional[str] = None) -> List[Dict[str, Any]]:
    """Rows of :meth:`RunIndex.list` that match every given filter: the dataset name, an attack
    (its name or full label), a defense name, the status, and the creation date within
    ``[since, until]`` (``YYYY-MM-DD``, inclusive; a full ``YYYY-MM-DDTHH:MM:SS`` works too)."""
    def attacks(r):
        labels = [a for a in (r["attacks"] or "").split(",") if a]
        return set(labels) | {a.split(":")[0] for a in labels}

    out = []
    for r in rows:
        if dataset is not None and r["dataset"] != dataset:
            continue
        if attack is not None and attack not in attacks(r):
            continue
        if defense is not None and defense not in (r["defenses"] or "").split(","):
            continue
        if status is not None and r["status"] != status:
            continue
        if since is not None and r["created"][: len(since)] < since:
            continue
        if until is not None and r["created"][: len(until)] > until:
            continue
        out.append(r)
    return out


def summary_of(metrics_doc: Dict[str, Any]) -> Dict[str, Any]:
    """The few numbers the index keeps per run: AUC and TPR at 0.1% FPR per attack; for an
    unlearning run, each unlearner's U-LiRA AUC (as ``"U-LiRA <label>"``)."""
    if metrics_doc.get("command") == "unlearn":
        return {f"U-LiRA {label}": {"auc": row["ulira"]["auc"]}
                for label, row in metrics_doc.get("unlearners", {}).items()}
    return {
        label: {"auc": m["auc"], "tpr_at_0.001": m["tpr_at_fpr"].get("0.001", {}).get("tpr")}
        for label, m in metrics_doc.get("attacks", {}).items()
    }


__all__ = ["RunIndex", "SCHEMA_VERSION", "filter_runs", "summary_of"]
