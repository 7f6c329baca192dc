"""Defense sweeps: one evaluation per point of a parameter grid, resumable (``miafw sweep``).

A sweep takes an :class:`~mia_core.engine.stages.EvalConfig` and one or two grid axes, each a
defense parameter and its values (``--grid sparsity=0,0.5,0.9``). Every point is an ordinary
evaluation through :func:`mia_core.evaluate`, written as a run under the sweep's directory; the
population is trained once and served from the cache for every point that changes only
post-training defenses (a train-time defense's parameters are part of the cache key, so each of
its values trains its own population, once).

The sweep directory ``<out>/sweep-<id>/`` (``id`` hashes the configuration and the grid, so the
same command finds the same directory) holds

``sweep.json``    what was swept: the base configuration, the axes and every point's specification;
``points.jsonl``  one line per finished point (appended and flushed as each finishes);
``runs/``         each point's run directory and ``index.sqlite``;
``table.md``      one row per point: parameters, accuracy, per attack AUC [CI] and TPR at the FPRs;
``tradeoff.png``  TPR at 1% FPR and AUC against test accuracy and against the swept parameter.
``report.html``   the trade-off figure (95% intervals as bars and bands), the table and a link to
                  every point's own report, self-contained.

Running the same sweep again resumes it: points whose line is in ``points.jsonl`` and whose run
directory still holds a ``metrics.json`` are not run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mia_core.params import ParamError, split_spec

SWEEP_SCHEMA = 1


#: ``GridAxis.defense`` of the run-seed axis (``--grid seed=0,1,2``): every seed is an independent
#: evaluation (new memberships, initialisations and batches), the spread across them what repeating
#: the experiment would show.
SEED_AXIS = -1


@dataclass(frozen=True)
class GridAxis:
    """One swept parameter: the defense it belongs to (index into the config's defenses, or
    :data:`SEED_AXIS` for the run seed), the parameter's name and its values as given (strings,
    typed by the plugin when resolved)."""

    defense: int
    param: str
    values: Tuple[str, ...]

    @property
    def is_seed(self) -> bool:
        return self.defense == SEED_AXIS

    def label(self, defenses: Sequence[str]) -> str:
        return "seed" if self.is_seed else f"{split_spec(defenses[self.defense])[0]}.{self.param}"


def parse_grid(texts: Sequence[str], defenses: Sequence[str]) -> List[GridAxis]:
    """Parse ``--grid [DEFENSE.]PARAM=V1,V2,...`` against the configuration's defenses.

    Without ``DEFENSE.`` the parameter belongs to the only defense; with several defenses the
    prefix is required. At most two axes (their product is swept).

    Raises:
        ParamError: a malformed axis, an unknown or ambiguous defense, a parameter swept twice,
            an empty or repeated value, or more than two axes.
    """
    if not texts:
        raise ParamError("no --grid given; use --grid PARAM=V1,V2,... (e.g. --grid sparsity=0,0.5,0.9)")
    if len(texts) > 2:
        raise ParamError(f"at most two --grid axes (their product is swept), got {len(texts)}")
    if not defenses and not all(t.partition("=")[0].strip() == "seed" for t in texts):
        raise ParamError("a sweep varies a defense's parameter or the run seed; give the defense with --defense NAME, "
                         "or sweep --grid seed=0,1,2")
    names = [split_spec(d)[0] for d in defenses]
    axes: List[GridAxis] = []
    for text in texts:
        key, eq, values = text.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ParamError(f"--grid {text!r}: expected [DEFENSE.]PARAM=V1,V2,... or seed=S1,S2,...")
        if key == "seed":
            vals = tuple(v.strip() for v in values.split(","))
            if not all(v.isdigit() for v in vals):
                raise ParamError(f"--grid {text!r}: seeds must be integers >= 0")
            if len(set(int(v) for v in vals)) != len(vals):
                raise ParamError(f"--grid {text!r}: a seed is repeated")
            if any(a.is_seed for a in axes):
                raise ParamError(f"--grid {text!r}: the seed is swept twice")
            axes.append(GridAxis(SEED_AXIS, "seed", vals))
            continue
        if "." in key:
            dname, param = key.split(".", 1)
            hits = [i for i, n in enumerate(names) if n == dname]
            if not hits:
                raise ParamError(f"--grid {text!r}: no defense {dname!r} among --defense {', '.join(names)}")
            if len(hits) > 1:
                raise ParamError(f"--grid {text!r}: defense {dname!r} is given {len(hits)} times; sweep one only")
            index = hits[0]
        else:
            if len(names) > 1:
                raise ParamError(f"--grid {text!r}: several defenses ({', '.join(names)}); name one as DEFENSE.{key}")
            index, param = 0, key
        vals = tuple(v.strip() for v in values.split(","))
        if not vals or any(not v for v in vals):
            raise ParamError(f"--grid {text!r}: empty value; expected PARAM=V1,V2,...")
        if len(set(vals)) != len(vals):
            raise ParamError(f"--grid {text!r}: a value is repeated")
        if any(a.defense == index and a.param == param for a in axes):
            raise ParamError(f"--grid {text!r}: {names[index]}.{param} is swept twice")
        if param in split_spec(defenses[index])[1]:
            raise ParamError(f"--grid {text!r}: {param} is also fixed in --defense {defenses[index]!r}; give it once")
        axes.append(GridAxis(index, param, vals))
    return axes


def grid_points(axes: Sequence[GridAxis]) -> List[Tuple[str, ...]]:
    """Every combination of the axes' values, first axis slowest."""
    return list(itertools.product(*(a.values for a in axes)))


def point_defenses(defenses: Sequence[str], axes: Sequence[GridAxis], point: Sequence[str]) -> Tuple[str, ...]:
    """The defense specifications at ``point``: each swept parameter set on its defense."""
    out = list(defenses)
    for axis, value in zip(axes, point):
        if axis.is_seed:
            continue
        name, raw = split_spec(out[axis.defense])
        raw = {**raw, axis.param: value}
        out[axis.defense] = name + ":" + ",".join(f"{k}={_quote(v)}" for k, v in raw.items())
    return tuple(out)


def point_config(config, axes: Sequence[GridAxis], point: Sequence[str]):
    """The :class:`~mia_core.engine.stages.EvalConfig` at ``point``: its defenses
    (:func:`point_defenses`) and, on a seed axis, its run seed."""
    seed = next((int(v) for a, v in zip(axes, point) if a.is_seed), config.seed)
    return dataclasses.replace(config, defenses=point_defenses(config.defenses, axes, point), seed=seed)


def _quote(value: str) -> str:
    return f'"{value}"' if ("," in value or ":" in value) and not value[:1] in "\"'" else value


def sweep_id(config, axes: Sequence[GridAxis]) -> str:
    """Content hash of the base configuration and the grid: the same command, the same sweep."""
    import mia_core

    # the miafw version too: a sweep resumed by another release is a new sweep, not a mix of two
    doc = {"config": dataclasses.asdict(config), "axes": [dataclasses.asdict(a) for a in axes],
           "miafw": mia_core.__version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:10]


@dataclass
class SweepResult:
    """What :func:`run_sweep` did.

    Attributes:
        directory: the sweep directory.
        rows: one summary per point, in grid order (see :func:`point_summary`).
        resumed: how many points were found done and not run again.
    """

    directory: Path
    rows: List[Dict[str, Any]]
    resumed: int


def point_summary(metrics: Dict[str, Any], *, point: Dict[str, str], run_dir: str, index: int) -> Dict[str, Any]:
    """The numbers of one point kept in ``points.jsonl``."""
    attacks = {}
    for label, m in metrics["attacks"].items():
        attacks[label] = {"auc": m["auc"], "auc_ci": m.get("auc_ci"), "advantage": m["advantage"],
                          "tpr_at_fpr": {k: {f: v[f] for f in ("tpr", "ci_low", "ci_high", "resolvable")}
                                         for k, v in m["tpr_at_fpr"].items()}}
    t = metrics["target"]
    return {"index": index, "point": point, "run_dir": run_dir, "attacks": attacks,
            "train_accuracy": t["train_accuracy"], "test_accuracy": t["test_accuracy"],
            "undefended_test_accuracy": t["undefended_test_accuracy"],
            # regression populations report mean squared errors instead of accuracies
            "train_mse": t.get("train_mse"), "test_mse": t.get("test_mse"),
            "defenses": [{"name": d["name"], "report": d["report"]} for d in metrics["defenses"]]}


def _read_done(path: Path, n_points: int) -> Dict[int, Dict[str, Any]]:
    """Finished points from ``points.jsonl``: a line that does not parse (a write cut short) or
    whose run directory lost its metrics is ignored, so that point runs again."""
    done: Dict[int, Dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            i = int(row["index"])
        except (ValueError, KeyError, TypeError):
            continue
        if 0 <= i < n_points and (Path(row.get("run_dir", "")) / "metrics.json").is_file():
            done[i] = row
    return done


def run_sweep(config, axes: Sequence[GridAxis], *, out, cache=None, reporter=None) -> SweepResult:
    """Run (or resume) the sweep of ``config`` over ``axes``; see the module docstring.

    Args:
        config: the base :class:`~mia_core.engine.stages.EvalConfig` (its defenses hold the
            swept ones, without the swept parameters).
        axes: from :func:`parse_grid`.
        out: the directory that receives ``sweep-<id>/``.
        cache: a population cache (a :class:`~mia_core.engine.cache.PopulationCache` or a
            directory); ``None`` trains every point from scratch.
        reporter: progress messages.

    Raises:
        One of the engine's usage errors if any point's configuration is unusable, before
        anything is trained; :class:`~mia_core.engine.stages.PluginRuntimeError` as
        :func:`mia_core.evaluate`.
    """
    from mia_core.engine.progress import Reporter
    from mia_core.engine.stages import evaluate, resolve

    reporter = reporter or Reporter()
    points = grid_points(axes)
    plans = []
    for point in points:  # every point validated before the first is trained
        plans.append(resolve(point_config(config, axes, point)))
    directory = Path(out) / f"sweep-{sweep_id(config, axes)}"
    directory.mkdir(parents=True, exist_ok=True)
    labels = [a.label(config.defenses) for a in axes]
    doc = {"schema": SWEEP_SCHEMA, "axes": labels, "values": [list(a.values) for a in axes],
           "base": plans[0].document, "points": [dict(zip(labels, p)) for p in points],
           "defenses": [list(p.config.defenses) for p in plans]}
    (directory / "sweep.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    lines = directory / "points.jsonl"
    done = _read_done(lines, len(points))
    resumed = len(done)
    if resumed:
        reporter.message(f"resuming {directory}: {resumed} of {len(points)} points already done")
    def record(i: int, ev) -> None:
        row = point_summary(ev.metrics, point=dict(zip(labels, points[i])), run_dir=str(Path(ev.run_dir).resolve()),
                            index=i)
        with open(lines, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        done[i] = row

    pending = [i for i in range(len(points)) if i not in done]
    if config.executor != "local" and len(pending) > 1:
        _run_points_on_executor(config.executor, [plans[i] for i in pending], pending, directory=directory,
                                cache=cache, reporter=reporter, record=record)
    for i in pending:
        if i in done:
            continue
        plan = plans[i]
        shown = ", ".join(f"{k}={v}" for k, v in zip(labels, points[i]))
        reporter.message(f"point {i + 1}/{len(points)}: {shown}")
        ev = evaluate(plan, out=directory / "runs", cache=cache, reporter=reporter)
        record(i, ev)
    rows = [done[i] for i in range(len(points))]
    summary = seed_summary(rows, labels)
    (directory / "table.md").write_text(format_table(rows, labels) + "\n"
                                        + ("" if summary is None else "\nMean ± sd across seeds:\n\n" + summary + "\n"))
    plot_tradeoff(directory / "tradeoff.png", rows, labels)
    write_sweep_report(directory, rows, labels)
    return SweepResult(directory=directory, rows=rows, resumed=resumed)


def _run_points_on_executor(spec: str, plans, indices, *, directory: Path, cache, reporter, record) -> None:
    """The points as jobs on the executor ``spec``: every point's population is trained (in shards,
    on the executor too) and cached here first, then each point's defenses, signals, attacks and
    metrics run as one job; its run directory is written here as it returns, so an interrupted
    sweep keeps every finished point."""
    from mia_core.engine.cache import PopulationCache
    from mia_core.engine.executors import make_executor
    from mia_core.engine.stages import (load_records, prepare_records, run_point, train_point_populations,
                                        write_evaluation)

    if not isinstance(cache, PopulationCache):
        cache = PopulationCache(None if cache is None else Path(cache).expanduser())
    records_by_dataset: Dict[str, Any] = {}
    jobs = []
    for plan in plans:
        label = json.dumps(plan.dataset.spec.to_dict(), sort_keys=True, default=str)
        if label not in records_by_dataset:
            records_by_dataset[label] = load_records(plan)
        records = prepare_records(plan, out=directory / "runs", records=records_by_dataset[label])
        jobs.append(train_point_populations(plan, records, cache=cache, reporter=reporter))
    executor = make_executor(spec)
    reporter.message(f"running {len(jobs)} points on {executor.spec}")
    try:
        with reporter.progress(len(jobs), f"sweep points on {executor.spec}") as update:
            def finished(j: int, ev) -> None:
                record(indices[j], write_evaluation(plans[j], directory / "runs", lambda: ev))
                update(1)

            executor.map(run_point, jobs, on_done=finished)
    finally:
        executor.close()


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_table(rows: Sequence[Dict[str, Any]], labels: Sequence[str], *, fprs=("0.001", "0.01")) -> str:
    """A Markdown table, one row per point."""
    attacks = list(rows[0]["attacks"]) if rows else []
    regression = bool(rows) and rows[0]["test_accuracy"] is None
    head = list(labels) + (["train MSE", "test MSE"] if regression else ["train acc", "test acc"])
    for a in attacks:
        head += [f"{a} AUC [95% CI]"] + [f"{a} TPR@{float(f) * 100:g}% FPR [95% CI]" for f in fprs]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if regression:
            cells = [r["point"][lbl] for lbl in labels] + [f"{r['train_mse']:.4g}", f"{r['test_mse']:.4g}"]
        else:
            cells = [r["point"][lbl] for lbl in labels] + [_pct(r["train_accuracy"]), _pct(r["test_accuracy"])]
        for a in attacks:
            m = r["attacks"][a]
            ci = m.get("auc_ci") or [float("nan")] * 2
            cells.append(f"{m['auc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]")
            for f in fprs:
                t = m["tpr_at_fpr"].get(f)
                cells.append("-" if t is None else f"{_pct(t['tpr'])} [{_pct(t['ci_low'])}, {_pct(t['ci_high'])}]"
                             + ("" if t["resolvable"] else " !"))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def seed_summary(rows: Sequence[Dict[str, Any]], labels: Sequence[str], *,
                 fprs=("0.001", "0.01")) -> Optional[str]:
    """With a ``seed`` axis: a Markdown table of the mean and standard deviation across seeds
    (one row per value of the other axis, if any) of test accuracy, every attack's AUC and its TPR
    at ``fprs``. The per-point intervals describe one run; this spread is what repeating the
    experiment with new memberships, initialisations and batches shows (``None`` without a seed
    axis)."""
    if "seed" not in labels or not rows:
        return None
    others = [lbl for lbl in labels if lbl != "seed"]
    groups: Dict[Tuple[str, ...], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r["point"][lbl] for lbl in others), []).append(r)
    attacks = list(rows[0]["attacks"])
    regression = rows[0]["test_accuracy"] is None
    head = others + ["seeds", "test MSE" if regression else "test acc"]
    for a in attacks:
        head += [f"{a} AUC"] + [f"{a} TPR@{float(f) * 100:g}% FPR" for f in fprs]

    def spread(values, pct=False) -> str:
        v = np.array([np.nan if x is None else x for x in values], dtype=float)
        sd = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
        scale, unit, fmt = (100, "%", ".2f") if pct else (1, "", ".3f" if not regression else ".4g")
        return f"{scale * float(np.mean(v)):{fmt}}{unit} ± {scale * sd:{fmt}}{unit}"

    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, group in groups.items():
        cells = list(key) + [str(len(group)), spread([_utility(r) for r in group], pct=not regression)]
        for a in attacks:
            cells.append(spread([r["attacks"][a]["auc"] for r in group]))
            for f in fprs:
                cells.append(spread([r["attacks"][a]["tpr_at_fpr"].get(f, {}).get("tpr") for r in group], pct=True))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _numeric(values: Sequence[str]) -> Optional[List[float]]:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _utility(row: Dict[str, Any]) -> float:
    """A point's utility axis: test accuracy, or test MSE for a regression population."""
    return row["test_accuracy"] if row["test_accuracy"] is not None else row["test_mse"]


def tradeoff_figure(rows: Sequence[Dict[str, Any]], labels: Sequence[str]):
    """Four panels: TPR at 1% FPR and AUC, each against test accuracy (error bars: the 95%
    intervals) and against the first swept parameter (bands: the 95% intervals; one line per value
    of the second axis, if any), one colour per attack. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    attacks = list(rows[0]["attacks"]) if rows else []
    fig, axs = plt.subplots(2, 2, figsize=(10, 8), dpi=110)
    first = [r["point"][labels[0]] for r in rows]
    x_param = _numeric(first)
    groups: Dict[str, List[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["point"][labels[1]] if len(labels) > 1 else "", []).append(i)
    markers = "osd^v<>p*h"
    nan = float("nan")
    for a_i, a in enumerate(attacks):
        color = f"C{a_i % 10}"
        for g_i, (gval, idx) in enumerate(groups.items()):
            tag = a + (f" ({labels[1]}={gval})" if gval else "")
            acc = np.array([_utility(rows[i]) for i in idx], dtype=float)
            t01 = [rows[i]["attacks"][a]["tpr_at_fpr"].get("0.01", {}) for i in idx]
            tpr = np.array([t.get("tpr", nan) for t in t01], dtype=float)
            tlo = np.array([t.get("ci_low", nan) for t in t01], dtype=float)
            thi = np.array([t.get("ci_high", nan) for t in t01], dtype=float)
            auc = np.array([rows[i]["attacks"][a]["auc"] for i in idx], dtype=float)
            ci = [rows[i]["attacks"][a].get("auc_ci") or [nan, nan] for i in idx]
            alo, ahi = np.array([c[0] for c in ci], dtype=float), np.array([c[1] for c in ci], dtype=float)
            xs = np.array([x_param[i] for i in idx] if x_param is not None else list(range(len(idx))), dtype=float)
            kw = dict(color=color, marker=markers[g_i % len(markers)], label=tag)
            axs[0, 0].errorbar(acc, tpr, yerr=[tpr - tlo, thi - tpr], ls="", capsize=2, **kw)
            axs[0, 1].errorbar(acc, auc, yerr=[auc - alo, ahi - auc], ls="", capsize=2, **kw)
            axs[1, 0].plot(xs, tpr, **kw)
            axs[1, 0].fill_between(xs, tlo, thi, color=color, alpha=0.15, lw=0)
            axs[1, 1].plot(xs, auc, **kw)
            axs[1, 1].fill_between(xs, alo, ahi, color=color, alpha=0.15, lw=0)
    regression = bool(rows) and rows[0]["test_accuracy"] is None
    for ax in axs[0]:
        ax.set_xlabel("target test MSE" if regression else "target test accuracy")
    for ax in axs[1]:
        ax.set_xlabel(labels[0])
        if x_param is None:
            ax.set_xticks(range(len(groups.get(next(iter(groups)), []))))
            ax.set_xticklabels([rows[i]["point"][labels[0]] for i in next(iter(groups.values()))], rotation=30)
    for ax in (axs[0, 0], axs[1, 0]):
        ax.set_ylabel("TPR at 1% FPR")
        ax.axhline(0.01, color="grey", ls="--", lw=1)
    for ax in (axs[0, 1], axs[1, 1]):
        ax.set_ylabel("AUC")
        ax.axhline(0.5, color="grey", ls="--", lw=1)
    for ax in axs.ravel():
        ax.grid(True, alpha=0.3)
    axs[0, 0].legend(fontsize=7, loc="best")
    fig.suptitle("privacy-utility trade-off (95% intervals as bars and bands; dashed: chance)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_tradeoff(path: Path, rows: Sequence[Dict[str, Any]], labels: Sequence[str]) -> None:
    """:func:`tradeoff_figure` saved to ``path``."""
    import matplotlib.pyplot as plt

    fig = tradeoff_figure(rows, labels)
    fig.savefig(path)
    plt.close(fig)


def write_sweep_report(directory: Path, rows: Sequence[Dict[str, Any]], labels: Sequence[str]) -> Path:
    """``report.html`` of a sweep: the trade-off figure embedded, the table, and a link to every
    point's own report."""
    import jinja2

    from mia_core.report import _png

    env = jinja2.Environment(loader=jinja2.PackageLoader("mia_core", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    table = format_table(rows, labels).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in (table[0], *table[2:])]
    links = []
    for r in rows:
        rel = Path(r["run_dir"])
        try:
            rel = rel.relative_to(Path(directory).resolve())
        except ValueError:
            pass
        links.append(str(rel / "report.html"))
    summary = seed_summary(rows, labels)
    spread = [] if summary is None else [[c.strip() for c in line.strip("|").split("|")]
                                         for line in summary.splitlines() if not line.startswith("|---")]
    page = env.get_template("sweep.html.j2").render(
        title=f"miafw sweep over {', '.join(labels)}", head=cells[0], rows=cells[1:], links=links,
        figure=_png(tradeoff_figure(rows, labels)), spread=spread)
    out = Path(directory) / "report.html"
    tmp = out.with_name(".report.html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


__all__ = ["GridAxis", "SEED_AXIS", "SweepResult", "format_table", "grid_points", "parse_grid", "plot_tradeoff",
           "point_config", "point_defenses", "point_summary", "run_sweep", "seed_summary", "sweep_id", "tradeoff_figure",
           "write_sweep_report"]
