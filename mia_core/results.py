"""Run directories and the terminal summary.

A run directory ``<out>/<YYYYmmdd-HHMMSS>-<hash>/`` holds

``config.json``   the fully resolved configuration (every plugin parameter, recipe, seed, versions);
``metrics.json``  schema-versioned metrics (no timings, so the same seed gives the same file);
``scores.npz``    per-attack scores ``[T, N]``, the membership ``[T, N]`` (True = member), the
                  target model indices ``[T]`` and the record indices ``[N]`` (no pickles);
``roc.png``       log-log ROC curves of every attack.

Files are written into ``<out>/.<name>.partial`` and the directory is renamed into place when
complete, so a directory without a dot prefix or suffix is always whole. A run that fails is
renamed to ``<name>.failed`` with the error in ``FAILED.txt``. Every run is also recorded in
``<out>/index.sqlite`` (:mod:`mia_core.runindex`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from mia_core import metrics
from mia_core.runindex import RunIndex, summary_of

#: Version of the ``config.json`` / ``metrics.json`` layout (2: estimators, train-time defenses,
#: best attack, device).
SCHEMA_VERSION = 2


def json_default(o):
    """``json.dumps`` default for plugin reports: numpy scalars and arrays, torch tensors."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def plain_json(obj):
    """``obj`` as plain JSON data (numpy and torch values converted), the rule for every plugin
    report and estimate: raises ``ValueError`` for what JSON cannot hold, NaN and inf included."""
    try:
        return json.loads(json.dumps(obj, default=json_default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON data without NaN/inf: {exc}") from None


def _dump(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def scores_key(label: str) -> str:
    """A stable npz key for an attack label (``lira:online=false`` -> ``scores__lira_online_false``)."""
    return "scores__" + re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_")


class RunDir:
    """A run directory being written; use as a context manager.

    On entry the staging directory ``<out>/.<name>.partial`` is created, ``config.json`` written
    and the run recorded as ``running`` in the index. On success the directory is renamed to
    ``<out>/<name>`` and the run marked ``complete``. On an exception listed in ``discard_on``
    (the user's input was unusable: nothing ran) the staging directory and the index row are
    removed, and so are the index file and the output directory if this run created them and
    they are empty again; on any other exception, KeyboardInterrupt included, the directory is renamed to
    ``<out>/<name>.failed`` with the traceback in ``FAILED.txt`` and the run marked ``failed``.
    """

    def __init__(self, out: Path, config_doc: Dict, *, index: Optional[RunIndex] = None,
                 discard_on: Tuple[type, ...] = ()):
        self.out = Path(out)
        self.config_doc = config_doc
        self.index = index
        self.discard_on = discard_on
        self.summary: Optional[Dict] = None
        digest = hashlib.sha256(json.dumps({k: v for k, v in config_doc.items() if k != "argv"},
                                           sort_keys=True, default=str).encode()).hexdigest()[:8]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{stamp}-{digest}"
        i = 1
        while any(p.exists() for p in (self.out / name, self.out / f".{name}.partial", self.out / f"{name}.failed")):
            i += 1
            name = f"{stamp}-{digest}-{i}"
        self.name = name
        self.final = self.out / name
        self.staging = self.out / f".{name}.partial"
        self.failed = self.out / f"{name}.failed"

    def __enter__(self) -> "RunDir":
        # what this run creates, so that a discarded run (a usage error) leaves nothing behind
        self._made_out = not self.out.exists()
        self._made_index = self.index is not None and not self.index.path.exists()
        # the index row first: a process killed at any later point leaves a row that `miafw runs`
        # shows as interrupted and `--prune` removes with its directory, never an orphan directory
        if self.index is not None:
            self.index.start(self.name, self.staging, self.config_doc)
        try:
            self.staging.mkdir(parents=True, exist_ok=False)
            _dump(self.staging / "config.json", self.config_doc)
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            if self.index is not None:
                self.index.forget(self.name)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            os.replace(self.staging, self.final)
            if self.index is not None:
                self.index.finish(self.name, "complete", self.final, summary=self.summary)
        elif self.discard_on and issubclass(exc_type, self.discard_on):
            shutil.rmtree(self.staging, ignore_errors=True)
            if self.index is not None:
                self.index.forget(self.name)
                if self._made_index and self.index.is_empty():
                    self.index.delete()
            if self._made_out:
                try:
                    self.out.rmdir()  # only if empty: another run may have started there meanwhile
                except OSError:
                    pass
        else:
            import traceback

            text = "".join(traceback.format_exception(exc_type, exc, tb))
            try:
                (self.staging / "FAILED.txt").write_text(text)
                os.replace(self.staging, self.failed)
            except OSError:
                shutil.rmtree(self.staging, ignore_errors=True)
            if self.index is not None:
                line = f"{exc_type.__name__}: {exc}".splitlines()[0] if str(exc) else exc_type.__name__
                status = "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed"
                self.index.finish(self.name, status, self.failed, error=line)
            if exc is not None:
                try:
                    exc.run_dir = self.failed  # where the failure was recorded, for the caller's message
                except AttributeError:  # pragma: no cover - exception types with __slots__
                    pass
        return False

    @property
    def path(self) -> Path:
        return self.staging


def write_run(run: RunDir, evaluation) -> None:
    """Write metrics, scores and the ROC plot of an :class:`~mia_core.engine.stages.Evaluation`
    (``config.json`` was written when the run started)."""
    d = run.path
    _dump(d / "metrics.json", evaluation.metrics)
    run.summary = summary_of(evaluation.metrics)
    arrays = {scores_key(k): v for k, v in evaluation.scores.items()}
    labels = list(evaluation.scores)
    np.savez_compressed(
        d / "scores.npz",
        membership=evaluation.membership,
        targets=np.asarray(evaluation.targets, dtype=np.int64),
        record_index=evaluation.record_index,
        attack_labels=np.asarray(labels, dtype=np.str_),
        record_label=_record_labels(evaluation),
        **arrays,
    )
    n_nonmembers = int((~evaluation.membership).sum())
    plot_roc(d / "roc.png", evaluation.curves, n_nonmembers=n_nonmembers, title=_title(evaluation.config))
    from mia_core.report import write_report  # the page is rendered from the files just written

    write_report(d)


def _record_labels(evaluation) -> np.ndarray:
    """The scored records' labels (classification) or targets (regression), aligned with
    ``record_index``."""
    pop = evaluation.population
    return np.asarray(pop.records.y)[pop.scored_records]


def _title(config: Dict) -> str:
    defs = ", ".join(s["name"] for s in config.get("defenses", [])) or "no defense"
    return f"{config['dataset']['name']} / {config['model']['name']} / {defs} ({config['n_models']} models)"


def plot_roc(path: Path, curves: Dict[str, "metrics.RocCurve"], *, n_nonmembers: int, title: str = "") -> None:
    """Log-log ROC curves (members positive) with the chance diagonal.

    Args:
        curves: ``{label: RocCurve}`` as computed with the metrics (never recomputed here).
        n_nonmembers: sets the plot's floor at ``1 / n_nonmembers``, the smallest resolvable FPR.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    floor = 1.0 / max(1, n_nonmembers)
    for label, c in curves.items():
        ax.plot(np.maximum(c.fpr, floor / 10), np.maximum(c.tpr, floor / 10), label=f"{label} (AUC {c.auc:.3f})")
    from mia_core.report import finish_roc_axes  # the report's ROC axes (the report imports this module)

    finish_roc_axes(ax, floor=floor, legend_size=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def text_table(head: List[str], rows: List[List[str]], *, left: int = 1) -> List[str]:
    """A plain-text table's lines: the header, a rule and the rows, each column as wide as its
    widest cell, the first ``left`` columns left-aligned and the others right-aligned."""
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]

    def line(r: List[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return [line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_summary(metrics_doc: Dict, *, fprs=(0.001, 0.01)) -> str:
    """The terminal table: one row per attack, then the target's accuracy and the defenses."""
    rows: List[List[str]] = []
    head = ["attack", "AUC [95% CI]", "advantage", "ε lower bound"] + [f"TPR@{_fmt_fpr(f)} FPR [95% CI]" for f in fprs]
    for label, m in metrics_doc["attacks"].items():
        auc = f"{m['auc']:.3f}"
        if m.get("auc_ci"):
            auc += f" [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]"
        row = [label, auc, f"{m['advantage']:.3f}", f"{m['epsilon_lower_bound']:.2f}"]
        for f in fprs:
            t = m["tpr_at_fpr"].get(_key(f))
            if t is None:
                row.append("-")
                continue
            cell = f"{_pct(t['tpr'])} [{_pct(t['ci_low'])}, {_pct(t['ci_high'])}]"
            if not t["resolvable"]:
                cell += " !"
            row.append(cell)
        rows.append(row)
    out = text_table(head, rows)
    out += _estimator_rows(metrics_doc)
    tgt = metrics_doc["target"]
    n_t = tgt["pooled_over_targets"]
    any_m = next(iter(metrics_doc["attacks"].values()), None)
    if any_m is not None:
        out.append(
            f"pooled over {n_t} target model{'s' if n_t != 1 else ''}: "
            f"{any_m['n_members']} member and {any_m['n_nonmembers']} non-member scores"
        )
    if tgt.get("train_accuracy") is None and "train_mse" in tgt:  # regression: accuracy is undefined
        out.append(
            f"target MSE: train {tgt['train_mse']:.4g}, test {tgt['test_mse']:.4g}"
            + (f" (before defenses: train {tgt['undefended_train_mse']:.4g}, "
               f"test {tgt['undefended_test_mse']:.4g})" if metrics_doc["defenses"] else "")
        )
    else:
        out.append(
            f"target accuracy: train {_pct(tgt['train_accuracy'])}, test {_pct(tgt['test_accuracy'])}"
            + (f" (before defenses: train {_pct(tgt['undefended_train_accuracy'])}, "
               f"test {_pct(tgt['undefended_test_accuracy'])})" if metrics_doc["defenses"] else "")
        )
    audit = metrics_doc.get("dp_audit")
    if audit and audit.get("consistent"):  # an inconsistent audit is listed with the warnings below
        out.append(audit["message"])
    if metrics_doc["defenses"] and not metrics_doc.get("adaptive", True):
        out.append("attacker: non-adaptive (the targets carry the defenses, the reference models do not)")
    for d in metrics_doc["defenses"]:
        rep = d["report"]
        shown = {k: v for k, v in rep.items() if not isinstance(v, (list, dict))}
        stage = f" ({d['stage']}-time)" if d.get("stage") == "train" else ""
        out.append(f"defense {d['name']}{stage}: " + ", ".join(f"{k}={_short(v)}" for k, v in shown.items()))
    warned = sorted({w for m in metrics_doc["attacks"].values() for w in m.get("warnings", [])})
    warned += metrics_doc.get("warnings", [])
    for w in warned:
        out.append(f"! {w}")
    return "\n".join(out)


def _estimator_rows(metrics_doc: Dict) -> List[str]:
    """The estimators' table under the attacks': value [interval], the advantage bound it implies
    and the best measured attack advantage beside it."""
    est = metrics_doc.get("estimators") or {}
    if not est:
        return []
    best = metrics_doc["best_attack"]
    head = ["estimator", "value [CI]", "advantage bound", f"best measured advantage ({best['label']})"]
    rows = []
    for label, e in est.items():
        value = f"{e['value']:.4g}"
        if e["interval"] is not None:
            value += f" [{e['interval'][0]:.4g}, {e['interval'][1]:.4g}]"
        bound = "-" if e["advantage_bound"] is None else f"{e['advantage_bound']:.3f}"
        rows.append([label, value, bound + (" !" if "warning" in e else ""), f"{best['advantage']:.3f}"])
    out = [""] + text_table(head, rows)
    out += [f"! {label}: {e['warning']}" for label, e in est.items() if "warning" in e]
    return out + [""]


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _key(f: float) -> str:
    return f"{f:g}"


def _fmt_fpr(f: float) -> str:
    return f"{100 * f:g}%"


def load_metrics(run_dir: Path) -> Optional[Dict]:
    p = Path(run_dir) / "metrics.json"
    return json.loads(p.read_text()) if p.is_file() else None


__all__ = ["RunDir", "json_default", "plain_json", "SCHEMA_VERSION", "format_summary", "load_metrics", "plot_roc", "scores_key", "write_run"]
