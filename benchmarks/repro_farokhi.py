"""Reproduce the analogues of Farokhi & Kaafar (2020), Figures 1, 3, 4 and 5, on linear regression (issue 12).

    OMP_NUM_THREADS=1 python benchmarks/repro_farokhi.py                 # all five sweeps, under a minute on 2 cores
    OMP_NUM_THREADS=1 python benchmarks/repro_farokhi.py --quick         # smoke run, a few seconds
    OMP_NUM_THREADS=1 python benchmarks/repro_farokhi.py --sweep lam --sweep sigma --seeds 5

The paper trains linear regression on the Adult data (PCA to ``p_x`` features) and plots, against one
setting at a time, the advantage of Yeom et al.'s threshold adversary (box plot over repetitions of
the membership experiment) and the membership information leakage (a line):

* Figure 1, training-set size ``n`` (lambda = 0, p_x = 5)       -> ``--sweep n``
* Figure 3, ridge weight lambda (n = 10, p_x = 5)                 -> ``--sweep lam`` (bias penalised, as
  their g(theta) = theta^T theta) and ``--sweep lam-free`` (bias free, scikit-learn's ``Ridge``)
* Figure 4, number of features p_x (n = 10, lambda = 1e-6)        -> ``--sweep px``
* Figure 5, parameter-noise sigma (n = 30, lambda = 0, p_x = 5)   -> ``--sweep sigma``

Adult cannot be downloaded here, so the data are scikit-learn's ``diabetes`` (442 records, 10
standardised features, PCA to ``p_x``; ``--dataset synthetic`` uses ``make_regression`` instead).
Every point is one miafw evaluation per repetition (seed) through the Python API,
``mia_core.evaluate(EvalConfig(...))``: a population of ``--n-models`` ridge regressions
(``linreg``, closed form) in complementary pairs over ``2n`` records, so each model trains on a
random half (about ``n`` records) and every record has ``M/2`` IN and ``M/2`` OUT models. Per
point and seed it records

* the advantage (TPR - FPR, pooled over the first 8 targets) of ``loss:threshold=yeom`` (the
  paper's adversary: member iff the target's squared error <= the mean training loss of the
  reference models) and of ``lira``, ``rmia`` and ``loss`` (best threshold), for the bound check;
* ``kl-leakage:source=params`` (white-box, the paper's setting: full-covariance Gaussians fitted to
  the ``p_x + 1`` parameters of the ``M/2`` IN and ``M/2`` OUT models of each record) and
  ``kl-leakage:signal=logits`` (black-box: 1-D Gaussians fitted to the prediction on the record):
  rho_KL with its bootstrap interval, rho_MI <= rho_KL / 4 (Corollary 1), the advantage bound
  1/2 sqrt(rho_KL) (Theorem 1, read as a bound on the advantage);
* the finite-sample floor of the white-box estimate on the same parameters: rho_KL with each
  record's membership redrawn at random *within the complementary pairs* (exact value 0; this
  keeps the pair structure, which the estimator's own ``null_value`` shuffle does not).

Deviations from the paper, on purpose: lambda = 0 is run as lambda = 1e-6 (with n = 10 some random
halves would leave ordinary least squares singular); the lambda sweep penalises the bias too
(``penalize_bias=true``, their g(theta) = theta^T theta over every parameter; ``lam-free`` repeats it
with the bias unpenalised, linreg's default); the training-set
size is about n (each model's half is drawn by a fair coin per record). Leakage is plotted as the
bound rho_KL/4 on rho_MI (rho_MI itself cannot exceed ln 2, drawn as a dashed line).

Prints Markdown tables (median [IQR] over seeds per point), the four trends (Spearman's rank
correlation of the setting with the per-point medians) and the bound check, and writes one PNG per
sweep to ``--figures`` (``benchmarks/figures/farokhi_<sweep>.png``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
from scipy import stats

import mia_core
from mia_core import metrics
from mia_plugins.estimators.kl_leakage import per_record_kl

YEOM = "loss:threshold=yeom"
ATTACKS = (YEOM, "lira", "rmia", "loss")
WHITE = "kl-leakage:source=params"
BLACK = "kl-leakage:signal=logits"
LAM0 = 1e-6  # the paper's lambda = 0 (see the module docstring)
SWEEP_NAMES = ("n", "lam", "lam-free", "px", "sigma")
FIGURES = Path(__file__).resolve().parent / "figures"


@dataclass(frozen=True)
class Sweep:
    """One figure: the setting varied, its grid, and how a point becomes (dataset, model, defenses)."""

    name: str
    figure: str
    label: str
    log_x: bool
    points: Tuple[float, ...]
    build: Callable[[float], Tuple[str, str, Tuple[str, ...]]]
    fixed: str
    expect: str  # "falls" or "rises" (Farokhi & Kaafar's trend)


def data_spec(dataset: str, *, n: int, px: int) -> str:
    """The dataset specification for ``2n`` records with ``p_x`` features."""
    if dataset == "diabetes":
        return f"diabetes:pca={px},n_records={min(2 * n, 442)}"
    return f"synthetic:kind=regression,n_records={2 * n},dim={px},noise=0.1,seed=0"


def sweeps(dataset: str, quick: bool) -> Dict[str, Sweep]:
    n_grid = (10, 20, 40, 80, 160, 221) if dataset == "diabetes" else (10, 20, 40, 80, 160, 320, 640)
    lam_grid = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    px_grid = tuple(range(1, 11))
    sigma_grid = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    if quick:
        n_grid, lam_grid, px_grid, sigma_grid = (n_grid[0], n_grid[-1]), (1e-6, 100.0), (2, 10), (0.0, 1.0)
    linreg = f"linreg:lam={LAM0}"
    return {
        "n": Sweep("n", "Figure 1", "training-set size n", True, tuple(map(float, n_grid)),
                   lambda v: (data_spec(dataset, n=int(v), px=5), linreg, ()),
                   f"lambda = {LAM0:g}, p_x = 5", "falls"),
        "lam": Sweep("lam", "Figure 3", "ridge weight lambda", True, lam_grid,
                     lambda v: (data_spec(dataset, n=10, px=5), f"linreg:lam={v:g},penalize_bias=true", ()),
                     "n = 10, p_x = 5, bias penalised", "falls"),
        "lam-free": Sweep("lam-free", "Figure 3", "ridge weight lambda (bias free)", True, lam_grid,
                          lambda v: (data_spec(dataset, n=10, px=5), f"linreg:lam={v:g}", ()),
                          "n = 10, p_x = 5, bias not penalised", "falls"),
        "px": Sweep("px", "Figure 4", "number of features p_x", False, tuple(map(float, px_grid)),
                    lambda v: (data_spec(dataset, n=10, px=int(v)), linreg, ()),
                    f"n = 10, lambda = {LAM0:g}", "rises"),
        "sigma": Sweep("sigma", "Figure 5", "parameter-noise sigma", False, sigma_grid,
                       lambda v: (data_spec(dataset, n=30, px=5), linreg, (f"noise:sigma={v:g}",) if v > 0 else ()),
                       f"n = 30, lambda = {LAM0:g}, p_x = 5", "falls"),
    }


def pair_floor(keep: np.ndarray, params: Dict[str, object], seed: int) -> float:
    """White-box rho_KL of ``params`` with each record's membership redrawn at random within the
    complementary pairs (model ``2i`` or ``2i+1`` IN, by a fair coin per record and pair): the exact
    value is 0, so the estimate is the finite-sample floor of the plug-in fit on these parameters."""
    m = keep.shape[0]
    theta = np.concatenate([np.asarray(v.detach().double().reshape(m, -1).cpu()) for v in params.values()], axis=1)
    first = np.random.default_rng([seed, 0x70616972]).random((m // 2, keep.shape[1])) < 0.5
    fake = np.empty_like(keep)
    fake[0::2], fake[1::2] = first, ~first
    return float(per_record_kl(values=theta[:, None, :], keep=fake).symmetric.mean())


def advantage_interval(scores: np.ndarray, membership: np.ndarray, *, seed: int, n_boot: int = 200,
                       confidence: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap of the best-threshold advantage max(TPR - FPR), resampling records
    (columns of ``scores``/``membership`` [T, N]: a record's scores against every target together)."""
    rng = np.random.default_rng(seed)
    n = scores.shape[1]
    out = np.empty(n_boot)
    for b in range(n_boot):
        cols = rng.integers(0, n, n)
        s, mm = scores[:, cols].ravel(), membership[:, cols].ravel()
        if mm.all() or not mm.any():
            out[b] = 0.0
            continue
        fpr, tpr, _ = metrics.roc_curve(s, mm)
        out[b] = max(0.0, float(np.max(tpr - fpr)))
    a = (1 - confidence) / 2
    lo, hi = np.quantile(out, [a, 1 - a])
    return float(lo), float(hi)


def run_point(sweep: Sweep, value: float, seed: int, *, n_models: int, targets: str, n_boot: int) -> dict:
    dataset, model, defenses = sweep.build(value)
    estimators = (f"{WHITE},n_bootstrap={n_boot}", f"{BLACK},n_bootstrap={n_boot}")
    config = mia_core.EvalConfig(attacks=ATTACKS, estimators=estimators, defenses=defenses, dataset=dataset,
                                 model=model, n_models=n_models, seed=seed, targets=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small populations: TPR at 0.1% FPR unresolvable, etc.
        ev = mia_core.evaluate(config)
    m = ev.metrics
    adv = {a: float(m["attacks"][a]["advantage"]) for a in ATTACKS}
    best = max(ATTACKS, key=lambda a: adv[a])
    white, black = m["estimators"][estimators[0]], m["estimators"][estimators[1]]
    rec = {
        "sweep": sweep.name, "value": value, "seed": seed, "dataset": dataset, "model": model,
        "defenses": list(defenses), "advantage": adv, "best": best,
        "rho_white": white["value"], "rho_white_ci": white["interval"], "bound_white": white["advantage_bound"],
        "bound_white_ci": white["report"]["advantage_bound_interval"],
        "rho_black": black["value"], "rho_black_ci": black["interval"], "bound_black": black["advantage_bound"],
        "bound_black_ci": black["report"]["advantage_bound_interval"],
        "null_white": white["report"]["null_value"],
        "floor_white": pair_floor(ev.population.keep, ev.population.params, seed),
        "train_mse": m["target"]["train_mse"], "test_mse": m["target"]["test_mse"],
    }
    # the bound check needs the advantage's sampling interval only where the bound's upper end is below it
    rec["best_ci"] = None
    if rec["bound_white_ci"][1] < adv[best] or rec["bound_black_ci"][1] < max(adv[a] for a in ATTACKS if a != "rmia"):
        rec["best_ci"] = {a: advantage_interval(ev.scores[a], ev.membership, seed=seed) for a in ATTACKS}
    return rec


# ----------------------------------------------------------------------------- reporting
def _q(v: Sequence[float]) -> Tuple[float, float, float]:
    q = np.quantile(np.asarray(v, dtype=float), [0.25, 0.5, 0.75])
    return float(q[1]), float(q[0]), float(q[2])


def _fmt(v: Sequence[float], digits: int = 3) -> str:
    med, lo, hi = _q(v)
    if max(abs(med), abs(hi)) >= 100:
        return f"{med:.0f} [{lo:.0f}, {hi:.0f}]"
    if max(abs(med), abs(hi)) >= 10:
        return f"{med:.1f} [{lo:.1f}, {hi:.1f}]"
    return f"{med:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _value(v: float) -> str:
    return f"{v:g}"


def by_point(recs: List[dict], sweep: Sweep) -> List[Tuple[float, List[dict]]]:
    return [(v, [r for r in recs if r["value"] == v]) for v in sweep.points]


def table(sweep: Sweep, recs: List[dict]) -> str:
    lines = [f"**{sweep.figure} analogue: {sweep.label}** ({sweep.fixed}); median [IQR] over "
             f"{len({r['seed'] for r in recs})} seeds",
             "",
             "| " + sweep.name + " | Yeom advantage | ρ_MI ≤ ρ_KL/4, white-box | floor/4 | ρ_MI ≤ ρ_KL/4, black-box "
             "(prediction) | ½√ρ_KL white-box | best attack advantage (which) | train / test MSE |",
             "|---:|---|---|---|---|---|---|---|"]
    for v, rs in by_point(recs, sweep):
        best = [r["advantage"][r["best"]] for r in rs]
        names = sorted({r["best"] for r in rs}, key=lambda a: (-sum(r["best"] == a for r in rs), a))
        lines.append(
            f"| {_value(v)} | {_fmt([r['advantage'][YEOM] for r in rs])} | {_fmt([r['rho_white'] / 4 for r in rs])} "
            f"| {_q([r['floor_white'] / 4 for r in rs])[0]:.3g} | {_fmt([r['rho_black'] / 4 for r in rs])} "
            f"| {_fmt([r['bound_white'] for r in rs], 2)} | {_fmt(best)} ({', '.join(names)}) "
            f"| {_q([r['train_mse'] for r in rs])[0]:.3f} / {_q([r['test_mse'] for r in rs])[0]:.3g} |")
    return "\n".join(lines)


def trend(sweep: Sweep, recs: List[dict]) -> str:
    pts = by_point(recs, sweep)
    xs = [v for v, _ in pts]
    cols = {
        "Yeom advantage": [_q([r["advantage"][YEOM] for r in rs])[0] for _, rs in pts],
        "white-box ρ_KL": [_q([r["rho_white"] for r in rs])[0] for _, rs in pts],
        "black-box ρ_KL": [_q([r["rho_black"] for r in rs])[0] for _, rs in pts],
        "best attack advantage": [_q([r["advantage"][r["best"]] for r in rs])[0] for _, rs in pts],
    }
    parts = []
    for name, ys in cols.items():
        rho = stats.spearmanr(xs, ys).statistic if len(xs) > 2 else float(np.sign(ys[-1] - ys[0]))
        parts.append(f"{name} {ys[0]:.3g} → {ys[-1]:.3g} (Spearman {rho:+.2f})")
    return (f"- **{sweep.label}** (paper: leakage and advantage {sweep.expect}; {_value(xs[0])} → {_value(xs[-1])}): "
            + "; ".join(parts))


def bound_check(recs: List[dict]) -> List[str]:
    """Where ½√ρ_KL falls below a measured advantage: beyond both intervals, or within them."""
    out, n = [], len(recs)
    for kind, covered in (("white", ATTACKS), ("black", tuple(a for a in ATTACKS if a != "rmia"))):
        below, beyond = [], []
        for r in recs:
            a = max(covered, key=lambda k: r["advantage"][k])
            if r[f"bound_{kind}"] < r["advantage"][a]:
                below.append(r)
                if r["best_ci"] is not None and r[f"bound_{kind}_ci"][1] < r["best_ci"][a][0]:
                    beyond.append((r, a))
        line = (f"- {kind}-box ½√ρ_KL against the best of {', '.join(covered)}: below the measured advantage in "
                f"{len(below)} of {n} (point, seed) runs, beyond both intervals in {len(beyond)}")
        if beyond:
            line += ": " + "; ".join(
                f"{r['sweep']}={_value(r['value'])} seed {r['seed']} ({a} {r['advantage'][a]:.3f} "
                f"[{r['best_ci'][a][0]:.3f}, {r['best_ci'][a][1]:.3f}] vs bound {r[f'bound_{kind}']:.3f} "
                f"[{r[f'bound_{kind}_ci'][0]:.3f}, {r[f'bound_{kind}_ci'][1]:.3f}])" for r, a in beyond[:6])
            if len(beyond) > 6:
                line += f"; and {len(beyond) - 6} more"
        out.append(line)
    tight = sorted(recs, key=lambda r: r["bound_white"] - r["advantage"][r["best"]])[:3]
    out.append("- tightest white-box cases (bound - best advantage): " + "; ".join(
        f"{r['sweep']}={_value(r['value'])} seed {r['seed']}: {r['bound_white']:.3f} vs {r['best']} "
        f"{r['advantage'][r['best']]:.3f}" for r in tight))
    return out


def figure(sweep: Sweep, recs: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = by_point(recs, sweep)
    pos = np.arange(len(pts))
    fig, ax = plt.subplots(figsize=(6.4, 4.3), dpi=100)
    ax.boxplot([[r["advantage"][YEOM] for r in rs] for _, rs in pts], positions=pos, widths=0.5,
               flierprops={"markersize": 3})
    best = [_q([r["advantage"][r["best"]] for r in rs])[0] for _, rs in pts]
    bound = [_q([r["bound_white"] for r in rs])[0] for _, rs in pts]
    ax.plot(pos, best, "v", color="tab:green", ms=5, label="best attack (median)")
    ax.plot(pos, bound, "_", color="tab:red", ms=12, mew=2, label="½√ρ_KL white-box (median)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("advantage (Yeom: box plot over seeds)")
    ax.set_xticks(pos)
    ax.set_xticklabels([_value(v) for v, _ in pts])
    ax.set_xlabel(sweep.label)
    ax2 = ax.twinx()
    for key, color, label in (("rho_white", "tab:blue", "ρ_KL/4 white-box"),
                              ("rho_black", "tab:orange", "ρ_KL/4 black-box"),
                              ("floor_white", "tab:gray", "white-box floor/4")):
        med = np.array([_q([r[key] / 4 for r in rs])[0] for _, rs in pts])
        lo = np.array([_q([r[key] / 4 for r in rs])[1] for _, rs in pts])
        hi = np.array([_q([r[key] / 4 for r in rs])[2] for _, rs in pts])
        ax2.plot(pos, med, "-" if key != "floor_white" else ":", color=color, label=label)
        if key != "floor_white":
            ax2.fill_between(pos, lo, hi, color=color, alpha=0.15, lw=0)
    ax2.axhline(math.log(2), color="k", ls="--", lw=0.8, label="ln 2 (ρ_MI ≤ ln 2)")
    ax2.set_yscale("log")
    ax2.set_ylabel("ρ_MI bound ρ_KL/4 (nats)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.set_title(f"{sweep.figure} analogue: linreg, {sweep.fixed}", fontsize=9)
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    fig.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower center", ncol=3, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="append", choices=SWEEP_NAMES,
                    help="sweeps to run (repeat; default: all five)")
    ap.add_argument("--dataset", choices=("diabetes", "synthetic"), default="diabetes")
    ap.add_argument("--seeds", type=int, default=10, help="repetitions per point (seeds 0..K-1)")
    ap.add_argument("--n-models", type=int, default=256, help="population size (M/2 IN and OUT models per record)")
    ap.add_argument("--targets", default="first:8")
    ap.add_argument("--n-bootstrap", type=int, default=1000, help="kl-leakage's bootstrap resamples")
    ap.add_argument("--figures", type=Path, default=FIGURES, help="directory for farokhi_<sweep>.png ('' = none)")
    ap.add_argument("--json", type=Path, default=None, help="also write every (point, seed) record here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 points per sweep, 2 seeds, 64 models")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.n_models, args.n_bootstrap = 2, 64, 100
    chosen = args.sweep or list(SWEEP_NAMES)
    all_sweeps = sweeps(args.dataset, args.quick)
    t0 = time.perf_counter()
    recs: List[dict] = []
    for name in chosen:
        sw = all_sweeps[name]
        t1 = time.perf_counter()
        rs = [run_point(sw, v, s, n_models=args.n_models, targets=args.targets, n_boot=args.n_bootstrap)
              for v in sw.points for s in range(args.seeds)]
        recs += rs
        print(f"[{name}: {len(rs)} evaluations in {time.perf_counter() - t1:.1f} s]", file=sys.stderr, flush=True)
        if str(args.figures):
            figure(sw, rs, Path(args.figures) / f"farokhi_{name}.png")
    print(f"dataset {args.dataset}, linreg, {args.n_models} models, targets {args.targets}, seeds 0-{args.seeds - 1}\n")
    for name in chosen:
        print(table(all_sweeps[name], [r for r in recs if r["sweep"] == name]) + "\n")
    print("Trends (per-point medians, first → last point):\n")
    for name in chosen:
        print(trend(all_sweeps[name], [r for r in recs if r["sweep"] == name]))
    print("\nBound check (Theorem 1, ½√ρ_KL against the measured advantages; intervals: 95% bootstrap of ρ_KL "
          "over records, and of the advantage over records):\n")
    print("\n".join(bound_check(recs)))
    print(f"\n[total {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(recs, indent=1))


if __name__ == "__main__":
    main()
