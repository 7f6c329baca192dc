"""``miafw compare``: several runs side by side, each attack's metrics and their differences
from the first run with bootstrap intervals, and ``compare.html`` with the ROC curves overlaid.

Differences are ``metric(run) - metric(first run)`` for every attack label the two runs share,
from the stored scores (:func:`mia_core.metrics.difference_interval`). When both runs scored the
same records (equal ``record_index`` sets) the bootstrap is paired over records: each resample
draws the records once and weights both runs' scores alike, so the interval reflects the change
between the runs rather than which records happened to be drawn; otherwise the runs are
resampled independently. Either way a record's scores against several targets move together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np

from mia_core import metrics
from mia_core.report import ReportError, _plt, _png, finish_roc_axes, load_run
from mia_core.results import text_table

#: Metrics compared, by default: AUC and TPR at 1% FPR (the table also shows TPR at 0.1%).
DEFAULT_METRICS = ("auc", "tpr@0.01", "tpr@0.001")


def _groups(run: Dict[str, Any]) -> np.ndarray:
    index = run["record_index"]
    if index is None:
        index = np.arange(run["membership"].shape[1])
    return np.tile(np.asarray(index), run["membership"].shape[0])


def _value(m: Dict[str, Any], metric: str):
    if metric == "auc":
        return m["auc"], m.get("auc_ci"), True
    if metric == "advantage":
        return m["advantage"], m.get("advantage_ci"), True
    t = m["tpr_at_fpr"].get(metrics._fpr_key(float(metric[4:])))
    return (None, None, True) if t is None else (t["tpr"], [t["ci_low"], t["ci_high"]], t["resolvable"])


def compare_runs(run_dirs: Sequence[Path], *, metric_names: Sequence[str] = DEFAULT_METRICS, n_boot: int = 200,
                 confidence: float = 0.95, seed: int = 0) -> Dict[str, Any]:
    """Load and verify the runs, and compare every later run with the first.

    Returns:
        ``{"runs": [{"dir", "id", "command", "dataset", "model", "defenses", "attacks": {label:
        {metric: {"value", "interval", "resolvable"}}}}], "baseline", "metrics", "confidence", "differences":
        [{"run", "attack", "metric", "difference", "interval", "paired"}]}`` (plain JSON values).

    Raises:
        ReportError: fewer than two runs, or a run whose files are missing or inconsistent.
    """
    if len(run_dirs) < 2:
        raise ReportError(f"compare needs at least two run directories, got {len(run_dirs)}")
    loaded = [load_run(Path(d)) for d in run_dirs]
    runs = []
    for d, run in zip(run_dirs, loaded):
        cfg, doc = run["config"], run["metrics"]
        runs.append({"dir": str(d), "id": Path(d).name, "command": cfg.get("command", "eval"),
                     "dataset": cfg["dataset"]["name"], "model": cfg["model"]["name"],
                     "defenses": [x.get("label", x["name"]) for x in doc.get("defenses", [])],
                     "attacks": {label: {mt: dict(zip(("value", "interval", "resolvable"), _value(m, mt)))
                                         for mt in metric_names}
                                 for label, m in doc["attacks"].items()}})
    base = loaded[0]
    diffs = []
    for k, run in enumerate(loaded[1:], start=1):
        paired = (base["record_index"] is not None and run["record_index"] is not None
                  and np.array_equal(np.sort(base["record_index"]), np.sort(run["record_index"])))
        for label in base["scores"]:
            if label not in run["scores"]:
                continue
            for mt in metric_names:
                d, lo, hi = metrics.difference_interval(
                    scores_a=base["scores"][label].ravel(), membership_a=base["membership"].ravel(),
                    scores_b=run["scores"][label].ravel(), membership_b=run["membership"].ravel(),
                    groups_a=_groups(base), groups_b=_groups(run), metric=mt, paired=paired, n_boot=n_boot,
                    confidence=confidence, seed=seed)
                diffs.append({"run": runs[k]["id"], "attack": label, "metric": mt, "difference": d,
                              "interval": [lo, hi], "paired": bool(paired)})
    return {"runs": runs, "baseline": runs[0]["id"], "metrics": list(metric_names), "confidence": confidence,
            "differences": diffs, "_loaded": loaded}


def _fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if metric in ("auc", "advantage") else f"{100 * v:.1f}%"


def _fmt_signed(metric: str, v) -> str:
    return f"{v:+.3f}" if metric in ("auc", "advantage") else f"{100 * v:+.1f}%"


def _title(metric: str) -> str:
    return metric.upper() if metric == "auc" else metric if metric == "advantage" else \
        f"TPR@{100 * float(metric[4:]):g}%"


def table_rows(result: Dict[str, Any]) -> List[List[str]]:
    """Header and rows: attack, run, each metric with its interval, and its difference from the
    first run with the difference's interval."""
    mts = result["metrics"]
    head = ["attack", "run"]
    for mt in mts:
        head += [f"{_title(mt)} [CI]", f"Δ {_title(mt)} [CI]"]
    diffs = {(d["run"], d["attack"], d["metric"]): d for d in result["differences"]}
    labels = list(dict.fromkeys(label for r in result["runs"] for label in r["attacks"]))
    rows = [head]
    for label in labels:
        for k, r in enumerate(result["runs"]):
            if label not in r["attacks"]:
                continue
            row = [label, r["id"] + (" (baseline)" if k == 0 else "")]
            for mt in mts:
                v = r["attacks"][label][mt]
                cell = _fmt(mt, v["value"])
                if v["interval"]:
                    cell += f" [{_fmt(mt, v['interval'][0])}, {_fmt(mt, v['interval'][1])}]"
                row.append(cell + ("" if v["resolvable"] else " !"))
                d = diffs.get((r["id"], label, mt))
                row.append("-" if d is None else f"{_fmt_signed(mt, d['difference'])} "
                           f"[{_fmt_signed(mt, d['interval'][0])}, {_fmt_signed(mt, d['interval'][1])}]")
            rows.append(row)
    return rows


def format_table(result: Dict[str, Any]) -> str:
    rows = table_rows(result)
    out = text_table(rows[0], rows[1:], left=2)
    paired = {d["paired"] for d in result["differences"]}
    if any(not v["resolvable"] for r in result["runs"] for a in r["attacks"].values() for v in a.values()):
        out.append("! a TPR too few non-members can resolve (fewer than 1/FPR)")
    out.append(f"differences: run minus baseline {result['baseline']}, {100 * result['confidence']:g}% bootstrap "
               f"intervals " + ("paired over the shared records" if paired == {True} else
                                "(runs on different records resampled independently)" if paired == {False} else
                                "(paired where the runs share their records)"))
    return "\n".join(out)


def overlay_figure(result: Dict[str, Any]) -> str:
    """Log-log ROC curves of every run's attacks on one plot, as a data URI."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.4), dpi=110)
    floor = 1.0
    styles = ["-", "--", ":", "-."]
    for k, (r, run) in enumerate(zip(result["runs"], result["_loaded"])):
        m = run["membership"].ravel()
        floor = min(floor, 1.0 / max(1, int((~m).sum())))
        for label, s in run["scores"].items():
            fpr, tpr, _ = metrics.roc_curve(s.ravel(), m)
            ax.plot(np.maximum(fpr, 1e-7), np.maximum(tpr, 1e-7), ls=styles[k % len(styles)],
                    label=f"{r['id']} · {label} (AUC {metrics.auc(s.ravel(), m):.3f})")
    finish_roc_axes(ax, floor=floor, legend_size=7)
    fig.tight_layout()
    return _png(fig)


def write_html(result: Dict[str, Any], path: Path) -> Path:
    """``compare.html``: the overlaid ROC curves and the table, self-contained."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("mia_core", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    rows = table_rows(result)
    page = env.get_template("compare.html.j2").render(runs=result["runs"], head=rows[0], rows=rows[1:],
                                                      roc=overlay_figure(result), note=format_table(result)
                                                      .splitlines()[-1])
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def to_json(result: Dict[str, Any]) -> Dict[str, Any]:
    """The comparison without the loaded arrays."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


__all__ = ["DEFAULT_METRICS", "compare_runs", "format_table", "overlay_figure", "table_rows", "to_json", "write_html"]
