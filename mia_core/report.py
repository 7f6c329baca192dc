"""``report.html``: a self-contained page for one run directory, rendered with Jinja2.

Everything comes from the run directory's own files (``config.json``, ``metrics.json`` and
``scores.npz``, read without pickles and checked against each other), so ``miafw report RUN_DIR``
regenerates the same page from a run's record alone. Figures are PNGs embedded as ``data:`` URIs
(no network, no external files): the log-log ROC of every attack with the chance diagonal,
recomputed from the stored scores, and the member and non-member score histograms.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from mia_core import metrics
from mia_core.results import scores_key

#: Records listed as the most exposed.
TOP_RECORDS = 10
#: The FPR whose threshold says an attack "flags" a record.
FLAG_FPR = 0.01


class ReportError(ValueError):
    """A run directory whose files are missing, unreadable or inconsistent."""


def _load_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise ReportError(f"{path.parent}: no {path.name} (not a finished miafw run directory)")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot be read as JSON ({exc})") from None


def _load_npz(path: Path) -> Dict[str, np.ndarray]:
    """Every array of a run's ``.npz`` file, read without pickles.

    Raises:
        ReportError: the file is missing or unreadable.
    """
    if not path.is_file():
        raise ReportError(f"{path.parent}: no {path.name}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ReportError(f"{path}: cannot be read ({exc})") from None


def load_run(run_dir: Path) -> Dict[str, Any]:
    """The run's config, metrics and scores, verified: every attack in ``metrics.json`` has its
    scores, all of shape ``membership.shape``, finite, with member counts that match.

    Raises:
        ReportError: naming the file and what is wrong.
    """
    run_dir = Path(run_dir)
    config = _load_json(run_dir / "config.json")
    if config.get("command") == "unlearn":
        raise ReportError(f"{run_dir}: a `miafw unlearn` run, which holds no attack scores of its own; this takes the "
                          f"run directories of eval, audit and sweep points")
    doc = _load_json(run_dir / "metrics.json")
    path = run_dir / "scores.npz"
    arrays = _load_npz(path)
    membership = arrays.get("membership")
    if membership is None or membership.ndim != 2 or membership.dtype != bool:
        raise ReportError(f"{path}: membership must be a bool [targets, records] array")
    scores = {}
    for label, m in doc.get("attacks", {}).items():
        s = arrays.get(scores_key(label))
        if s is None:
            raise ReportError(f"{path}: no scores for attack {label!r} listed in metrics.json")
        if s.shape != membership.shape or not np.isfinite(s).all():
            raise ReportError(f"{path}: scores of {label!r} have shape {s.shape}, expected {membership.shape}, "
                              f"and must be finite")
        if int(membership.sum()) != m["n_members"]:
            raise ReportError(f"{path}: {int(membership.sum())} members, metrics.json says {m['n_members']}")
        scores[label] = s.astype(np.float64)
    return {"config": config, "metrics": doc, "scores": scores, "membership": membership,
            "record_index": arrays.get("record_index"), "record_label": arrays.get("record_label")}


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def roc_figure(scores: Dict[str, np.ndarray], membership: np.ndarray) -> str:
    """Log-log ROC of every attack (pooled over targets) with the chance diagonal, as a data URI."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 5.0), dpi=110)
    m = membership.ravel()
    floor = 1.0 / max(1, int((~m).sum()))
    for label, s in scores.items():
        fpr, tpr, _ = metrics.roc_curve(s.ravel(), m)
        ax.plot(np.maximum(fpr, floor / 10), np.maximum(tpr, floor / 10),
                label=f"{label} (AUC {metrics.auc(s.ravel(), m):.3f})")
    finish_roc_axes(ax, floor=floor, legend_size=8)
    fig.tight_layout()
    return _png(fig)


def finish_roc_axes(ax, *, floor: float, legend_size: int = 8) -> None:
    """The chance diagonal, log-log axes down to half the smallest resolvable FPR ``floor``, labels,
    grid and legend of a ROC plot."""
    grid = np.logspace(np.log10(floor / 10), 0, 50)
    ax.plot(grid, grid, ls="--", color="grey", lw=1, label="chance")
    ax.set(xscale="log", yscale="log", xlim=(floor / 2, 1), ylim=(floor / 2, 1),
           xlabel="false positive rate (non-members flagged)", ylabel="true positive rate (members found)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=legend_size)


def histogram_figure(scores: Dict[str, np.ndarray], membership: np.ndarray) -> str:
    """Member and non-member score histograms, one panel per attack, as a data URI. Scores are
    clipped to their 0.5-99.5% range so one extreme score does not flatten the panel."""
    plt = _plt()
    n = len(scores)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.6 * rows), dpi=100, squeeze=False)
    m = membership.ravel()
    for ax, (label, s) in zip(axes.ravel(), scores.items()):
        v = s.ravel()
        lo, hi = np.quantile(v, [0.005, 0.995])
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        bins = np.linspace(lo, hi, 41)
        ax.hist(np.clip(v[~m], lo, hi), bins=bins, alpha=0.55, density=True, label="non-members", color="#4c72b0")
        ax.hist(np.clip(v[m], lo, hi), bins=bins, alpha=0.55, density=True, label="members", color="#dd8452")
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def exposed_records(run: Dict[str, Any], *, top: int = TOP_RECORDS) -> List[Dict[str, Any]]:
    """The records members of some target that the most attacks flag at ``FLAG_FPR`` (score at or
    above the attack's threshold for that FPR), ties broken by the best attack's largest score.

    Returns:
        up to ``top`` rows ``{"index", "label", "flagged_by", "attacks", "score"}``.
    """
    doc, scores, membership = run["metrics"], run["scores"], run["membership"]
    key = metrics._fpr_key(FLAG_FPR)
    flags = np.zeros(membership.shape[1], dtype=np.int64)
    names: List[List[str]] = [[] for _ in range(membership.shape[1])]
    for label, s in scores.items():
        t = doc["attacks"][label]["tpr_at_fpr"].get(key)
        if t is None or t.get("threshold") is None:
            continue
        hit = ((s >= t["threshold"]) & membership).any(axis=0)
        flags += hit
        for j in np.flatnonzero(hit):
            names[j].append(label)
    best = doc.get("best_attack", {}).get("label") or next(iter(scores))
    top_score = np.where(membership, scores[best], -np.inf).max(axis=0)
    order = np.lexsort((-top_score, -flags))
    index = run["record_index"] if run["record_index"] is not None else np.arange(membership.shape[1])
    labels = run["record_label"]
    out = []
    for j in order[:top]:
        if not np.isfinite(top_score[j]):
            break
        out.append({"index": int(index[j]), "label": None if labels is None else labels[j].item(),
                    "flagged_by": int(flags[j]), "attacks": names[j], "score": float(top_score[j])})
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * float(x):.1f}%"


def _num(x, fmt: str = ".3f") -> str:
    return "-" if x is None else format(float(x), fmt)


def context(run: Dict[str, Any]) -> Dict[str, Any]:
    """Everything the template shows, as plain values."""
    config, doc = run["config"], run["metrics"]
    fprs = sorted({float(k) for m in doc["attacks"].values() for k in m["tpr_at_fpr"]})
    attacks = []
    for label, m in doc["attacks"].items():
        attacks.append({
            "label": label, "auc": _num(m["auc"]),
            "auc_ci": "" if not m.get("auc_ci") else f"[{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]",
            "advantage": _num(m["advantage"]), "epsilon": _num(m["epsilon_lower_bound"], ".2f"),
            "tprs": [_tpr_cell(m["tpr_at_fpr"].get(metrics._fpr_key(f))) for f in fprs],
        })
    slices = _class_slices(doc)
    estimators = [{"label": k, "value": f"{e['value']:.4g}",
                   "interval": "" if e["interval"] is None else f"[{e['interval'][0]:.4g}, {e['interval'][1]:.4g}]",
                   "bound": _num(e["advantage_bound"]), "warning": e.get("warning")}
                  for k, e in (doc.get("estimators") or {}).items()]
    tgt = doc["target"]
    regression = tgt.get("train_accuracy") is None and "train_mse" in tgt
    quality = (lambda k: _num(tgt.get(k), ".4g")) if regression else (lambda k: _pct(tgt.get(k)))
    q = "mse" if regression else "accuracy"
    defenses = [{"name": d["name"], "label": d.get("label", d["name"]), "stage": d.get("stage", "post"),
                 "report": {k: (v if isinstance(v, (str, int, bool)) or v is None else
                                f"{v:.4g}" if isinstance(v, float) else json.dumps(v)[:200])
                            for k, v in d["report"].items()}} for d in doc.get("defenses", [])]
    warned = sorted({w for m in doc["attacks"].values() for w in m.get("warnings", [])}) + list(doc.get("warnings", []))
    audit = doc.get("audit")
    n_t = tgt.get("pooled_over_targets", 1)
    question = (f"How well can an attacker tell whether a record of {config['dataset']['name']} was in the training "
                f"set of " + ("your model" if audit else f"a {config['model']['name']} trained on half of it")
                + (" after " + ", ".join(d["label"] for d in defenses) if defenses else "") + "?")
    best = doc.get("best_attack") or {}
    return {
        "title": f"miafw {config.get('command', 'eval')}: {config['dataset']['name']} / {config['model']['name']}",
        "question": question,
        "answer": _answer(doc, best),
        "fprs": [f"{100 * f:g}%" for f in fprs],
        "attacks": attacks,
        "estimators": estimators,
        "slices": slices,
        "best": {"label": best.get("label"), "advantage": _num(best.get("advantage"))},
        "quality": q,
        "target": {"train": quality(f"train_{q}"), "test": quality(f"test_{q}"),
                   "undefended_train": quality(f"undefended_train_{q}"),
                   "undefended_test": quality(f"undefended_test_{q}"), "pooled": n_t,
                   "members": next(iter(doc["attacks"].values()))["n_members"],
                   "nonmembers": next(iter(doc["attacks"].values()))["n_nonmembers"]},
        "defenses": defenses,
        "adaptive": doc.get("adaptive", True),
        "warnings": warned,
        "budget": doc.get("budget"),
        "audit": audit,
        "exposed": exposed_records(run),
        "flag_fpr": f"{100 * FLAG_FPR:g}%",
        "config_json": json.dumps({k: v for k, v in config.items() if k not in ("versions", "argv")}, indent=2,
                                  sort_keys=True),
        "versions": config.get("versions", {}),
        "argv": " ".join(config.get("argv", [])),
        "roc": roc_figure(run["scores"], run["membership"]),
        "hist": histogram_figure(run["scores"], run["membership"]),
    }


def _class_slices(doc: Dict[str, Any]) -> List[List[str]]:
    """Rows ``[class, AUC of each attack..., "members / non-members"]`` from the per-class slices."""
    per_attack = [m.get("slices") or {} for m in doc["attacks"].values()]
    names = [k for k in per_attack[0] if k.startswith("class=")] if per_attack else []
    rows = []
    for name in names:
        first = per_attack[0][name]
        rows.append([name[len("class="):]] + [_num(p.get(name, {}).get("auc")) for p in per_attack]
                    + [f"{first.get('n_members', '-')} / {first.get('n_nonmembers', '-')}"])
    return rows


def _tpr_cell(t: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    if t is None:
        return {"text": "-", "resolvable": True}
    return {"text": f"{_pct(t['tpr'])} [{_pct(t['ci_low'])}, {_pct(t['ci_high'])}]", "resolvable": t["resolvable"]}


def _answer(doc: Dict[str, Any], best: Dict[str, Any]) -> str:
    label = best.get("label")
    if not label:
        return ""
    m = doc["attacks"][label]
    t = m["tpr_at_fpr"].get(metrics._fpr_key(0.01))
    found = "" if t is None else (f"; at 1% false positives it finds {_pct(t['tpr'])} of the members "
                                  f"[{_pct(t['ci_low'])}, {_pct(t['ci_high'])}]")
    return (f"The strongest attack, {label}, reaches AUC {m['auc']:.3f}"
            + (f" [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]" if m.get("auc_ci") else "") + found
            + " (chance: AUC 0.5, and as many members found as non-members flagged).")


def render(run: Dict[str, Any]) -> str:
    """The report page for a loaded run (:func:`load_run`)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("mia_core", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template("report.html.j2").render(**context(run))


def write_report(run_dir: Path, *, out: Optional[Path] = None) -> Path:
    """Render ``report.html`` from a run directory's files (written atomically): an evaluation's or
    audit's page, or an unlearning run's (:mod:`mia_core.unlearn_report`).

    Raises:
        ReportError: the run's files are missing or inconsistent.
    """
    run_dir = Path(run_dir)
    if _load_json(run_dir / "config.json").get("command") == "unlearn":
        from mia_core import unlearn_report

        page = unlearn_report.render(unlearn_report.load_unlearn_run(run_dir))
    else:
        page = render(load_run(run_dir))
    out = run_dir / "report.html" if out is None else Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["ReportError", "context", "exposed_records", "finish_roc_axes", "histogram_figure", "load_run", "render", "roc_figure",
           "write_report"]
