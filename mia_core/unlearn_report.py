"""``report.html`` of a ``miafw unlearn`` run: the unlearners against retraining, on one page.

Rendered (Jinja2) from the run directory's own files only: ``config.json``, ``metrics.json`` and
``ulira.npz`` (every unlearner's U-LiRA scores, labels and forget records, read without pickles).
The stored scores are checked against ``metrics.json`` (counts, finiteness, and the AUC recomputed
from them) before anything is drawn, so a page never shows figures that disagree with its table.
:func:`mia_core.report.write_report` sends unlearn runs here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from mia_core import metrics
from mia_core.report import ReportError, _load_json, _load_npz, _pct, _plt, _png, finish_roc_axes


def load_unlearn_run(run_dir: Path) -> Dict[str, Any]:
    """The run's config, metrics and U-LiRA arrays, verified.

    Raises:
        ReportError: a missing or unreadable file, or arrays that disagree with ``metrics.json``.
    """
    run_dir = Path(run_dir)
    config = _load_json(run_dir / "config.json")
    doc = _load_json(run_dir / "metrics.json")
    from mia_core.engine.unlearn import UNLEARN_SCHEMA_VERSION

    if not isinstance(doc, dict) or doc.get("schema_version") != UNLEARN_SCHEMA_VERSION \
            or doc.get("command") != "unlearn":
        version = doc.get("schema_version") if isinstance(doc, dict) else None
        raise ReportError(f"{run_dir / 'metrics.json'}: not an unlearn document of schema version "
                          f"{UNLEARN_SCHEMA_VERSION} (found version {version!r}; runs of older miafw versions "
                          f"cannot be re-rendered: run `miafw unlearn` again)")
    path = run_dir / "ulira.npz"
    arrays = _load_npz(path)
    rows = doc.get("unlearners")
    order = [str(x) for x in arrays.get("unlearners", np.array([]))]
    if not isinstance(rows, dict) or sorted(order) != sorted(rows):
        raise ReportError(f"{path}: lists unlearners {order}, metrics.json has {sorted(rows or {})}")
    curves = {}
    for i, label in enumerate(order):
        s, lab, rec = (arrays.get(f"ulira_{i}_{k}") for k in ("scores", "labels", "records"))
        if s is None or lab is None or rec is None or not (s.shape == lab.shape == rec.shape and s.ndim == 1) \
                or lab.dtype != bool or not np.isfinite(s).all():
            raise ReportError(f"{path}: the U-LiRA arrays of {label!r} are missing, misshaped or not finite")
        u = rows[label]["ulira"]
        if int(lab.sum()) != u["pairs"] or int((~lab).sum()) != u["pairs"]:
            raise ReportError(f"{path}: {label!r} has {int(lab.sum())} unlearned scores, metrics.json says {u['pairs']}")
        if abs(metrics.auc(s, lab) - u["auc"]) > 1e-9:
            raise ReportError(f"{path}: the U-LiRA scores of {label!r} give AUC {metrics.auc(s, lab):.6f}, "
                              f"metrics.json says {u['auc']:.6f}")
        curves[label] = (s.astype(np.float64), lab)
    return {"config": config, "metrics": doc, "curves": curves, "order": order}


def ulira_roc_figure(curves: Dict[str, Any]) -> str:
    """Log-log ROC of U-LiRA for every unlearner (unlearned positive, retrained negative)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 5.0), dpi=110)
    n_neg = max(int((~lab).sum()) for _, lab in curves.values())
    floor = 1.0 / max(1, n_neg)
    for label, (s, lab) in curves.items():
        fpr, tpr, _ = metrics.roc_curve(s, lab)
        ax.plot(np.maximum(fpr, floor / 10), np.maximum(tpr, floor / 10),
                label=f"{label} (AUC {metrics.auc(s, lab):.3f})")
    finish_roc_axes(ax, floor=floor, legend_size=7)
    ax.set(xlabel="FPR (retrained models called unlearned)", ylabel="TPR (unlearned models found)")
    fig.tight_layout()
    return _png(fig)


def tradeoff_figure(doc: Dict[str, Any], order: List[str]) -> str:
    """Two panels: U-LiRA AUC (95% interval) against test accuracy, and the forget-set member rate
    of the first attack (95% interval) per unlearner beside the retrained models' rate."""
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11.0, 4.6), dpi=100)
    gold = doc["retrained"]
    for label in order:
        r = doc["unlearners"][label]
        u = r["ulira"]
        a1.errorbar([r["test_accuracy"]], [u["auc"]], yerr=[[u["auc"] - u["auc_ci"][0]], [u["auc_ci"][1] - u["auc"]]],
                    fmt="o", capsize=3, label=label)
    a1.axhline(0.5, ls="--", color="grey", lw=1, label="indistinguishable (0.5)")
    a1.axvline(gold["test_accuracy"], ls=":", color="black", lw=1, label="retrained test accuracy")
    a1.set(xlabel="test accuracy", ylabel="U-LiRA AUC (lower = closer to retraining)",
           title="forgetting against accuracy")
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=7)
    attack = doc["attacks"][0]
    y = np.arange(len(order))
    rates = [doc["unlearners"][k]["forget_member_rate"][attack] for k in order]
    a2.errorbar([r["rate"] for r in rates], y, xerr=[[r["rate"] - r["interval"][0] for r in rates],
                                                     [r["interval"][1] - r["rate"] for r in rates]],
                fmt="o", capsize=3, color="#4c72b0")
    g = gold["forget_member_rate"][attack]
    a2.axvspan(g["interval"][0], g["interval"][1], color="#55a868", alpha=0.25, label="retrained (95% CI)")
    a2.axvline(g["rate"], color="#55a868", lw=1)
    a2.set_yticks(y, order, fontsize=8)
    a2.invert_yaxis()
    a2.set(xlabel=f"share of the forget set called member ({attack})", title="the common recipe")
    a2.grid(True, axis="x", alpha=0.3)
    a2.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def _ci(x: float, ci, fmt=_pct) -> str:
    return f"{fmt(x)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def context(run: Dict[str, Any]) -> Dict[str, Any]:
    """The template's variables for a loaded unlearn run."""
    doc, config, order = run["metrics"], run["config"], run["order"]
    attacks = list(doc["attacks"])
    base = doc["retrained"]["seconds"]

    def rates(r):
        return [_ci(r["forget_member_rate"][a]["rate"], r["forget_member_rate"][a]["interval"]) for a in attacks]

    rows = []
    for key, label in (("original", "(no unlearning)"), ("retrained", "(retrained: the gold standard)")):
        r = doc[key]
        rows.append({"label": label, "reference": True, "acc": [_pct(r[k]) for k in
                                                                 ("retain_accuracy", "forget_accuracy", "test_accuracy")],
                     "rates": rates(r), "auc": "", "tpr": "", "resolvable": True,
                     "steps": str(r.get("steps", "")), "time": f"{r['seconds']:.2f} s (1.00x)" if "seconds" in r else ""})
    for label in order:
        r = doc["unlearners"][label]
        u = r["ulira"]
        rows.append({"label": label, "reference": False,
                     "acc": [_pct(r[k]) for k in ("retain_accuracy", "forget_accuracy", "test_accuracy")],
                     "rates": rates(r), "auc": _ci(u["auc"], u["auc_ci"], lambda v: f"{v:.3f}"),
                     "tpr": _ci(u["tpr_at_1pct"], u["tpr_at_1pct_ci"]), "resolvable": u["tpr_resolvable"],
                     "steps": str(r["steps"]),
                     "time": f"{r['seconds']:.2f} s ({r['seconds'] / base:.2f}x)" if base > 0 else f"{r['seconds']:.2f} s"})
    closest = min(order, key=lambda k: abs(doc["unlearners"][k]["ulira"]["auc"] - 0.5))
    c = doc["unlearners"][closest]["ulira"]
    answer = (f"Closest to retraining: {closest}, U-LiRA AUC {c['auc']:.3f} [{c['auc_ci'][0]:.3f}, {c['auc_ci'][1]:.3f}]"
              + (" (its interval holds 0.5: indistinguishable from retraining at this sample size)."
                 if c["auc_ci"][0] <= 0.5 <= c["auc_ci"][1] else " (distinguishable from retraining)."))
    f = doc["forget"]
    warnings = list(doc.get("warnings", []))
    return {
        "title": f"miafw unlearn: {config['dataset']['name']} / {config['model']['name']} "
                 f"({config['n_models']} models)",
        "question": f"Each model forgets its members in the forget set {f['spec']} ({f['records']} records, "
                    f"{f['per_model_mean']:.1f} per model on average). Did the unlearning methods make the models look "
                    f"as if they had never trained on them?",
        "answer": answer, "attacks": attacks, "rows": rows, "warnings": warnings,
        "roc": ulira_roc_figure(run["curves"]), "tradeoff": tradeoff_figure(doc, order),
        "params": [{"label": k, "report": json.dumps(doc["unlearners"][k]["report"], sort_keys=True)} for k in order],
        "config_json": json.dumps({k: v for k, v in config.items() if k not in ("versions", "argv")}, indent=2,
                                  sort_keys=True),
        "versions": config.get("versions", {}),
    }


def render(run: Dict[str, Any]) -> str:
    """The page for a loaded unlearn run (:func:`load_unlearn_run`).

    Raises:
        ReportError: ``metrics.json`` lacks a key or a value the page needs.
    """
    import jinja2

    try:
        variables = context(run)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as exc:
        raise ReportError(f"metrics.json of this unlearn run is incomplete or malformed "
                          f"({type(exc).__name__}: {exc})") from None

    env = jinja2.Environment(loader=jinja2.PackageLoader("mia_core", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    return env.get_template("unlearn.html.j2").render(**variables)


__all__ = ["context", "load_unlearn_run", "render", "tradeoff_figure", "ulira_roc_figure"]
