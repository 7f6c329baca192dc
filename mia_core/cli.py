"""The ``miafw`` command line (click).

``miafw eval``   train a population, apply defenses, run attacks, write a run directory.
``miafw audit``  the same attacks against the user's own trained model (a release gate with --budget).
``miafw unlearn`` unlearning methods against retraining: forget-set member rate and U-LiRA.
``miafw report`` regenerate a run directory's self-contained report.html.
``miafw compare`` several runs side by side, differences with intervals, overlaid ROC curves.
``miafw list``   every registered plugin, with broken and incompatible ones flagged.
``miafw info``   one plugin's parameters, defaults, threat model and reference.
``miafw runs``   the runs recorded in an output directory's index.
``miafw cache``  list, verify or clear the trained populations in the cache.
``miafw bench``  the native kernels against torch and the memory bandwidth.

Usage errors (unknown names, malformed ``key=value``, out-of-range values, unusable data) print
one line, ``Error: ...``, and exit with status 2; a plugin that fails while running exits with
status 1 after printing its name and traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import signal
import sys
import textwrap
from pathlib import Path

import click

from mia_core import registry
from mia_core.base import KINDS

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_BUDGET = 3  # a release gate (--budget) was broken


def _fail(message: str, code: int = EXIT_USAGE):
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _names_help(kind: str) -> str:
    try:
        names = registry.names(kind)
    except Exception:  # never let metadata problems break --help
        names = []
    return ", ".join(names) if names else "none registered"


@contextlib.contextmanager
def _terse_warnings():
    """Warnings as one ``Warning: ...`` line on stderr; metrics warnings are left to the table."""
    import warnings

    from mia_core.engine.stages import EvaluationWarning
    from mia_core.metrics import MetricsWarning

    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"Warning: {message}", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricsWarning)  # both kinds are listed under the table
        warnings.simplefilter("ignore", EvaluationWarning)  # (and in metrics.json)
        warnings.showwarning = show
        yield


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, Slurm, ``docker stop``), handled like Ctrl-C."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """While the block runs, SIGTERM raises :class:`Terminated`, so the run is recorded as
    interrupted and its directory closed, exactly as for Ctrl-C."""
    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="miafw", prog_name="miafw")
def main() -> None:
    """miafw: how well can an attacker tell whether a record trained your model?

    Trains a population of models on random halves of a dataset, applies defenses
    (pruning, ...), runs membership-inference attacks (LiRA, loss threshold, ...) and reports
    TPR at low FPR with confidence intervals. Members are the positive class.
    """


def _population_options(f):
    """The options that define how a population is trained, defended and attacked: shared by
    `eval`, `sweep` and `audit`."""
    f = click.option("-q", "--quiet", is_flag=True, help="No progress output.")(f)
    f = click.option("--no-cache", is_flag=True, help="Neither read nor write the population cache.")(f)
    f = click.option("--cache-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
                     help="Population cache [default: $MIAFW_CACHE or ~/.cache/miafw].")(f)
    f = click.option("--non-adaptive", is_flag=True,
                     help="Defend the target models only; the attacker's reference models stay undefended (by default "
                          "the attacker knows the recipe and defends its references the same way).")(f)
    f = click.option("--shards", default=1, show_default=True, type=int,
                     help="Train the population in this many shards; each finished shard is cached, so re-running a "
                          "killed command resumes. The models do not depend on it.")(f)
    f = click.option("--executor", default="local", show_default=True, metavar="local|local:N|dask://HOST:PORT",
                     help="Where the shards train: this process, N local worker processes, or a Dask cluster.")(f)
    f = click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]|auto",
                     help="Where training, signals and defenses run; auto picks CUDA when available.")(f)
    f = click.option("--sampling-rate", default=None, type=float,
                     help="Poisson's q in (0, 1] [default: batch size / largest training half].")(f)
    f = click.option("--sampler", default=None, type=click.Choice(["fixed", "poisson"]),
                     help="Mini-batches: per-model permutations of --batch-size records, or Poisson sampling (each "
                          "record in a step with probability --sampling-rate) [default: fixed].")(f)
    f = click.option("--optimizer", default=None, type=click.Choice(["adam", "sgd"]), help="Optimizer [default: adam].")(f)
    f = click.option("--weight-decay", default=None, type=float,
                     help="The optimizer's L2 term [default: 0]; see also the weight-decay defense.")(f)
    f = click.option("--lr", default=None, type=float, help="Learning rate [default: 0.002].")(f)
    f = click.option("--batch-size", default=None, type=int, help="Mini-batch size [default: 64].")(f)
    f = click.option("--epochs", default=None, type=int, help="Training epochs per model [default: 60].")(f)
    f = click.option("--seed", default=0, show_default=True, type=int, help="Seed for membership, initialisation and batches.")(f)
    f = click.option("--dataset", default="digits", show_default=True, metavar="NAME[:k=v,...]",
                     help=f"Dataset. Available: {_names_help('datasets')}.")(f)
    f = click.option("--defense", "defenses", multiple=True, metavar="NAME[:k=v,...]",
                     help="Defense; repeatable, applied in order (train-time ones while training, post-training ones "
                       f"after it). Available: {_names_help('defenses')}.")(f)
    return f


def _evaluation_options(f):
    """The options that define an evaluation, shared by `eval` and `sweep`."""
    f = _population_options(f)
    f = click.option("--targets", default="all", show_default=True,
                     help="Target models whose scores are pooled: 'all', 'first:K', or indices like 0,3.")(f)
    f = click.option("--n-models", default=16, show_default=True, type=int,
                     help="Models in the population (even); each trains on a random half of the records.")(f)
    f = click.option("--model", default="mlp", show_default=True, metavar="NAME[:k=v,...]",
                     help=f"Model family. Available: {_names_help('models')}.")(f)
    f = click.option("--estimator", "estimators", multiple=True, metavar="NAME[:k=v,...]",
                     help="Leakage estimator, shown beside the attacks with the advantage bound it implies; repeatable. "
                       f"Available: {_names_help('estimators')}.")(f)
    f = click.option("--attack", "attacks", multiple=True, metavar="NAME[:k=v,...]",
                     help=f"Attack to run; repeatable. Default: lira. Available: {_names_help('attacks')}.")(f)
    return f


_BUDGET_HELP = ("Release gate, repeatable: auc<=X, advantage<=X or tpr@P%<=X, checked against the upper end of "
                "each interval for every attack; exit status 3 when one is broken (e.g. tpr@0.1%<=0.005).")


def _run_options(what: str):
    """The options of a command that writes one run: --config, --budget, --out, --json/--format."""
    def deco(f):
        f = click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json"]),
                         help="json: the same as --json.")(f)
        f = click.option("--json", "as_json", is_flag=True, help="Print metrics.json to stdout instead of the table.")(f)
        f = click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False, path_type=Path),
                         help="Directory that receives the run directory.")(f)
        f = click.option("--budget", "budgets", multiple=True, metavar="METRIC<=X", help=_BUDGET_HELP)(f)
        return click.option("--config", "config_file", default=None, metavar="FILE.toml",
                            type=click.Path(dir_okay=False, path_type=Path),
                            help=f"Read the {what} from a TOML file (every {what} run writes one: runs/<id>/config.toml); "
                                 f"flags given on the command line override it.")(f)
    return deco


def _report_gate(metrics_doc, budgets) -> None:
    """Print the release gate's verdict; exit 3 when a budget is broken."""
    from mia_core.gate import violations

    gate = metrics_doc.get("budget")
    if gate is None:
        return
    if not gate["passed"]:
        for line in violations(gate):
            click.echo(line, err=True)
        sys.exit(EXIT_BUDGET)
    click.echo(f"budget: every attack within {', '.join(budgets)} (upper ends of the intervals)", err=True)


@main.command("eval")
@_run_options("evaluation")
@_evaluation_options
def eval_cmd(out, as_json, fmt, budgets, config_file, **options):
    """Evaluate membership leakage of a (defended) model population.

    \b
    Examples:
      miafw eval --attack lira --defense prune
      miafw eval --attack lira --attack lira:online=false --attack loss --defense prune:sparsity=0.9
      miafw eval --attack lira --defense weight-decay:lam=0.001
      miafw eval --attack lira --defense prune:sparsity=0.9 --non-adaptive
      miafw eval --dataset breast-cancer --model logreg --n-models 32
    """
    from mia_core.engine.progress import TerminalReporter
    from mia_core.engine.stages import evaluate
    from mia_core.results import format_summary

    as_json = as_json or fmt == "json"
    base = None
    if config_file is not None:
        base = _read_config("load", config_file)
    plan, cache = _plan_and_cache({**options, "budgets": budgets}, base=base)
    with _engine_errors(out):
        ev = evaluate(plan, out=out, cache=cache, reporter=TerminalReporter(options["quiet"] or as_json))
    if as_json:  # metrics.json plus where the run was written (the file itself stays path-free)
        click.echo(json.dumps({**ev.metrics, "run_dir": str(ev.run_dir)}, indent=2, sort_keys=True))
    else:
        click.echo(format_summary(ev.metrics))
        click.echo(f"run directory: {ev.run_dir}")
    _report_gate(ev.metrics, budgets)


#: Command-line options and the :class:`EvalConfig` field (or ``recipe.`` field) each sets.
_OPTION_FIELDS = {"attacks": "attacks", "defenses": "defenses", "estimators": "estimators", "dataset": "dataset",
                  "model": "model", "n_models": "n_models", "seed": "seed", "targets": "targets", "device": "device",
                  "non_adaptive": "adaptive", "budgets": "budgets", "epochs": "recipe.epochs",
                  "batch_size": "recipe.batch_size", "lr": "recipe.lr", "weight_decay": "recipe.weight_decay",
                  "optimizer": "recipe.optimizer", "sampler": "recipe.sampler", "sampling_rate": "recipe.sampling_rate",
                  "shards": "shards", "executor": "executor"}


def _overlay(base, cli, given):
    """``base`` (a config file's :class:`EvalConfig`) with the fields of the options the user
    typed (``given``) taken from ``cli``."""
    import dataclasses

    top, recipe = {}, {}
    for option, fld in _OPTION_FIELDS.items():
        if option not in given:
            continue
        if fld.startswith("recipe."):
            recipe[fld[7:]] = getattr(cli.recipe, fld[7:])
        else:
            top[fld] = getattr(cli, fld)
    return dataclasses.replace(base, **top, recipe=dataclasses.replace(base.recipe, **recipe))


def _read_config(loader: str, path):
    """A config file read by ``mia_core.configfile.<loader>``; a bad one exits 2 with its one line."""
    from mia_core import configfile
    from mia_core.params import ParamError

    try:
        return getattr(configfile, loader)(path)
    except ParamError as exc:
        _fail(str(exc))


def _given_options() -> set:
    """The options the user typed on the command line (not defaults)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return {name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}


def _config_from(options):
    """An :class:`EvalConfig` from the :func:`_evaluation_options`."""
    import dataclasses

    from mia_core.engine.stages import EvalConfig
    from mia_core.engine.trainer import TrainingRecipe

    o = options
    overrides = {k: o[k] for k in ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "sampler",
                                   "sampling_rate") if o[k] is not None}
    return EvalConfig(attacks=tuple(o["attacks"]) or ("lira",), defenses=tuple(o["defenses"]),
                      estimators=tuple(o.get("estimators", ())), dataset=o["dataset"], model=o["model"] or "mlp",
                      n_models=o["n_models"], seed=o["seed"], targets=o.get("targets", "all"),
                      recipe=dataclasses.replace(TrainingRecipe(), **overrides), device=o["device"],
                      adaptive=not o["non_adaptive"], budgets=tuple(o.get("budgets", ())),
                      shards=o.get("shards", 1), executor=o.get("executor", "local"))


def _plan_and_cache(options, base=None):
    """The resolved plan (a usage error exits 2 here, before anything runs) and the cache;
    ``base``: a config file's :class:`EvalConfig`, which the typed options override."""
    from mia_core.engine.cache import PopulationCache, default_cache_dir
    from mia_core.engine.stages import USAGE_ERRORS, resolve

    config = _config_from(options)
    if base is not None:
        config = _overlay(base, config, _given_options())
    try:
        plan = resolve(config)
    except USAGE_ERRORS as exc:
        _fail(str(exc))
    cache = PopulationCache(None if options["no_cache"] else (options["cache_dir"] or default_cache_dir()))
    return plan, cache


@contextlib.contextmanager
def _engine_errors(out):
    """Run engine work: warnings as one line each, SIGTERM as Ctrl-C, and every failure as one
    line with its exit status (2 unusable input, 1 a plugin or I/O failure, 130/143 interrupted)."""
    from mia_core.engine.stages import USAGE_ERRORS, PluginRuntimeError

    try:
        with _terse_warnings(), _sigterm_interrupts():
            yield
    except USAGE_ERRORS as exc:
        _fail(str(exc))
    except PluginRuntimeError as exc:
        if exc.traceback:
            click.echo(exc.traceback, err=True, nl=False)
        _fail(f"{exc} (run marked failed: {getattr(exc, 'run_dir', '?')})", EXIT_FAILURE)
    except KeyboardInterrupt as exc:
        click.echo("", err=True)
        code = 128 + signal.SIGTERM if isinstance(exc, Terminated) else 130
        _fail(f"{'terminated' if code != 130 else 'interrupted'} (run marked interrupted: "
              f"{getattr(exc, 'run_dir', '?')})", code)
    except OSError as exc:
        _fail(f"could not write the run under {out}: {exc}", EXIT_FAILURE)
    except RuntimeError as exc:  # e.g. torch running out of device memory outside a plugin
        _fail(f"{type(exc).__name__}: {exc} (run marked failed: {getattr(exc, 'run_dir', '?')})", EXIT_FAILURE)


@main.command("sweep")
@click.option("--grid", "grids", multiple=True, metavar="[DEFENSE.]PARAM=V1,V2,...|seed=S1,S2,...",
              help="A defense parameter and the values to sweep, or seed=... for independent repetitions (each "
                   "seed draws new memberships, initialisations and batches; the sweep adds the mean ± sd across "
                   "seeds); give two for their product.")
@click.option("--out", default="sweeps", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory that receives the sweep directory (sweep-<id>/; the same sweep resumes there).")
@_evaluation_options
def sweep_cmd(grids, out, **options):
    """Sweep a defense parameter over a grid: one evaluation per point, a table and a trade-off plot.

    Post-training defenses train the population once and defend it at every point. Run the same
    command again to resume an interrupted sweep: finished points are kept.

    \b
    Examples:
      miafw sweep --attack lira --defense prune --grid sparsity=0,0.5,0.8,0.9,0.95
      miafw sweep --attack lira --defense prune:finetune_epochs=0 --grid sparsity=0.5,0.9 --grid scope=global,layer
      miafw sweep --attack lira --defense weight-decay --grid lam=0,0.001,0.01
      miafw sweep --attack lira --grid seed=0,1,2,3,4
      miafw sweep --attack lira --defense prune --grid sparsity=0.5,0.9 --grid seed=0,1,2 --executor local:2
    """
    import tempfile

    from mia_core.engine.progress import TerminalReporter
    from mia_core.params import ParamError
    from mia_core.sweep import format_table, parse_grid, run_sweep, seed_summary

    config = _config_from(options)
    try:
        axes = parse_grid(grids, config.defenses)
    except ParamError as exc:
        _fail(str(exc))
    with tempfile.TemporaryDirectory(prefix="miafw-sweep-cache-") as tmp:
        if options["no_cache"]:  # still train the population once for every post-training point
            options = {**options, "no_cache": False, "cache_dir": Path(tmp)}
        _, cache = _plan_and_cache(options)
        with _engine_errors(out):
            res = run_sweep(config, axes, out=out, cache=cache, reporter=TerminalReporter(options["quiet"]))
    if res.resumed:
        click.echo(f"resumed: {res.resumed} of {len(res.rows)} points were already done", err=True)
    labels = [a.label(config.defenses) for a in axes]
    click.echo(format_table(res.rows, labels))
    summary = seed_summary(res.rows, labels)
    if summary is not None:
        click.echo("\nmean ± sd across seeds:\n" + summary)
    click.echo(f"sweep directory: {res.directory} (table.md, tradeoff.png, points.jsonl, runs/)")


def _module_args(items):
    """``--module-arg k=v`` values: JSON scalars (``64``, ``0.5``, ``true``) or else strings."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            _fail(f"--module-arg {item!r}: expected NAME=VALUE, e.g. --module-arg hidden=64")
        if key in out:
            _fail(f"--module-arg {key} given twice")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out[key] = parsed if isinstance(parsed, (int, float, bool, str)) or parsed is None else value
    return out


@main.command("audit")
@click.option("--weights", default=None, type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="The target's state_dict (torch.save(model.state_dict(), FILE)), loaded with weights_only=True into "
                   "--model or --module; the model before any post-training defense you name.")
@click.option("--predictions", default=None, type=click.Path(dir_okay=False, path_type=str), metavar="FILE",
              help="The target's outputs on every record instead of its weights: .npz with an array logits, probs or "
                   "prediction ([N, C]; optional index of record ids), or .csv with columns logit_0.. / prob_0.. / "
                   "prediction (optional index). For models that are not torch.")
@click.option("--members", default=None, metavar="FILE|column=NAME",
              help="The target's training records: a file with one record id per line (row numbers, or the file "
                   "dataset's id= column), or column=NAME, a 0/1 column of the dataset file.")
@click.option("--model", default=None, metavar="NAME[:k=v,...]",
              help=f"The target's architecture as a model family [default: mlp]. Available: {_names_help('models')}.")
@click.option("--module", default=None, metavar="PKG.MODULE:CLASS",
              help="The target's architecture as an importable torch.nn.Module (the current directory is searched "
                   "first); the references are trained as this class too.")
@click.option("--module-arg", "module_args", multiple=True, metavar="NAME=VALUE",
              help="A keyword argument of --module's class; repeatable.")
@click.option("--n-models", default=16, show_default=True, type=int,
              help="Population size counted as in eval: the target, a stand-in partner and N-2 reference models that "
                   "miafw trains (each on a random half of the records) with the recipe you state.")
@click.option("--attack", "attacks", multiple=True, metavar="NAME[:k=v,...]",
              help="Attack to run; repeatable. Default: every registered attack the target can answer. "
                   f"Available: {_names_help('attacks')}.")
@_run_options("audit")
@_population_options
def audit_cmd(weights, predictions, members, model, module, module_args, out, as_json, fmt, config_file, budgets,
              **options):
    """Audit your own trained model before release: how well can an attacker tell its members?

    The target is your model (--weights or --predictions) with its training records (--members);
    miafw trains the reference models the attacks need with the recipe you state (--model or
    --module, --epochs, --lr, --batch-size, --defense ...), on random halves of the same data. The
    closer that recipe is to the target's, the more the numbers mean (see the README). With
    --budget the command is a release gate: exit status 3 when an attack breaks a limit.

    \b
    Examples:
      miafw audit --weights target.pt --members members.txt --budget tpr@1%<=0.05
      miafw audit --predictions preds.npz --members members.txt --attack lira --attack rmia
      miafw audit --dataset file:path=data.csv --members column=in_train --weights net.pt \\
          --module my_pkg.nets:Net --module-arg hidden=64 --defense prune:sparsity=0.9
    """
    import dataclasses

    from mia_core.engine.audit import AuditConfig, audit, resolve_audit
    from mia_core.engine.cache import PopulationCache, default_cache_dir
    from mia_core.engine.progress import TerminalReporter
    from mia_core.engine.stages import USAGE_ERRORS
    from mia_core.results import format_summary

    if model is not None and module is not None:
        _fail("give the architecture as --model or as --module, not both")
    as_json = as_json or fmt == "json"
    evaluation = _config_from({**options, "model": model, "budgets": budgets})
    # no --attack: every registered attack the target can answer (not eval's default of lira alone)
    evaluation = dataclasses.replace(evaluation, attacks=tuple(options["attacks"]))
    config = AuditConfig(evaluation=evaluation, members=members, weights=weights, predictions=predictions,
                         module=module, module_args=_module_args(module_args))
    if config_file is not None:
        base = _read_config("load_audit", config_file)
        given = _given_options()
        target = {k: getattr(config, k) for k in ("weights", "predictions") if k in given}
        if target:  # a target on the command line replaces the file's, whichever kind it is
            base = dataclasses.replace(base, weights=None, predictions=None, **target)
        config = dataclasses.replace(
            base, evaluation=_overlay(base.evaluation, evaluation, given),
            **{k: getattr(config, k) for k in ("members", "module", "module_args") if k in given})
    try:
        plan = resolve_audit(config)
    except USAGE_ERRORS as exc:
        _fail(str(exc))
    cache = PopulationCache(None if options["no_cache"] else (options["cache_dir"] or default_cache_dir()))
    quiet = options["quiet"] or as_json
    for name, why in plan.skipped:
        if not quiet:
            click.echo(f"skipping attack {name}: {why}", err=True)
    with _engine_errors(out):
        ev = audit(plan, out=out, cache=cache, reporter=TerminalReporter(quiet))
    if as_json:
        click.echo(json.dumps({**ev.metrics, "run_dir": str(ev.run_dir)}, indent=2, sort_keys=True))
    else:
        a = ev.metrics["audit"]
        src = a["source"]
        click.echo(f"target: {src['kind']} {Path(src['path']).name} (sha256 {src['sha256'][:12]}), "
                   f"{plan.model.label}; {a['members']} members, {a['non_members']} non-members; "
                   f"{plan.config.n_models - 2} reference models")
        click.echo(format_summary(ev.metrics))
        click.echo(f"run directory: {ev.run_dir}")
    _report_gate(ev.metrics, budgets)


@main.command("report")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the page [default: RUN_DIR/report.html].")
def report_cmd(run_dir, out):
    """Regenerate a run's report.html from its own files (config.json, metrics.json, scores.npz).

    The page is self-contained (figures embedded, no network): the question and its answer, every
    attack's ROC, TPRs with intervals, AUC, advantage and ε bound, score histograms, estimator
    bounds, per-class slices, the most exposed records, the defenses and their accuracy cost,
    warnings, the configuration and versions.
    """
    from mia_core.report import ReportError, write_report

    try:
        path = write_report(run_dir, out=out)
    except ReportError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"could not write the report: {exc}", EXIT_FAILURE)
    click.echo(f"report: {path}")


@main.command("compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--html", "html_out", default="compare.html", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Where to write the page with overlaid ROC curves.")
@click.option("--no-html", is_flag=True, help="Do not write the page.")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json"]),
              help="The terminal output: a table, or JSON for scripts.")
@click.option("--n-boot", default=200, show_default=True, type=click.IntRange(min=10),
              help="Bootstrap resamples for the differences' intervals.")
def compare_cmd(run_dirs, html_out, no_html, fmt, n_boot):
    """Compare runs: each attack's AUC and TPR at 1% and 0.1% FPR per run, and each run's
    difference from the first (the baseline) with a 95% bootstrap interval, paired over the
    records when the runs scored the same ones; compare.html overlays their ROC curves.

    \b
    Example:
      miafw compare runs/20261130-120000-aaaa runs/20261130-121500-bbbb
    """
    from mia_core.compare import compare_runs, format_table, to_json, write_html
    from mia_core.report import ReportError

    try:
        result = compare_runs(list(run_dirs), n_boot=n_boot)
    except ReportError as exc:
        _fail(str(exc))
    page = None
    if not no_html:
        try:
            page = write_html(result, html_out)
        except OSError as exc:
            _fail(f"could not write {html_out}: {exc}", EXIT_FAILURE)
    if fmt == "json":
        click.echo(json.dumps({**to_json(result), "html": None if page is None else str(page)}, indent=2))
    else:
        click.echo(format_table(result))
        if page is not None:
            click.echo(f"page: {page}")


@main.command("unlearn")
@click.option("--unlearner", "unlearners", multiple=True, metavar="NAME[:k=v,...]",
              help="Unlearning method; repeatable. Default: retrain, finetune, gradient-ascent, neggrad-plus, "
                   "random-labels. "
                   f"Available: {_names_help('unlearners')}.")
@click.option("--attack", "recipe_attacks", multiple=True, metavar="NAME[:k=v,...]",
              help="Attack of the common recipe (trained on retain vs unseen records, applied to the forget set); "
                   "repeatable. Default: loss.")
@click.option("--forget", default="random:fraction=0.05", show_default=True, metavar="SPEC",
              help="The forget set: random:fraction=F (of the records, so about F of each model's members), class=K, "
                   "or ids=FILE (one record id per line); each model forgets its members in it.")
@click.option("--n-models", default=16, show_default=True, type=int, help="Models in the population (even).")
@click.option("--model", default="mlp", show_default=True, metavar="NAME[:k=v,...]",
              help=f"Model family. Available: {_names_help('models')}.")
@click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory that receives the run directory.")
@click.option("--json", "as_json", is_flag=True, help="Print metrics.json to stdout instead of the table.")
@click.option("--config", "config_file", default=None, metavar="FILE.toml", type=click.Path(dir_okay=False, path_type=Path),
              help="Read the unlearning run from a TOML file (every unlearn run writes one: runs/<id>/config.toml); "
                   "flags given on the command line override it.")
@_population_options
def unlearn_cmd(unlearners, recipe_attacks, forget, out, as_json, config_file, **options):
    """Did the models forget? Apply unlearning methods to a trained population and measure them.

    Each model forgets its members in the forget set. Every unlearner is compared with the models
    retrained from scratch without the forget set: the share of the forget set each --attack
    still calls member (thresholded on retain vs unseen records), and U-LiRA (Hayes et al.
    2025), the AUC of telling each unlearned model from the retrained one (0.5: indistinguishable).
    The run directory holds metrics.json, ulira.npz and report.html.

    \b
    Examples:
      miafw unlearn
      miafw unlearn --unlearner finetune:epochs=10 --unlearner gradient-ascent:epochs=5 --forget class=3
      miafw unlearn --unlearner random-labels:retain=false --attack loss --attack lira
    """
    from mia_core.engine.cache import PopulationCache, default_cache_dir
    from mia_core.engine.progress import TerminalReporter
    from mia_core.engine.stages import USAGE_ERRORS
    from mia_core.engine.unlearn import DEFAULT_UNLEARNERS, UnlearnConfig, format_table, resolve_unlearn, unlearn

    if options["defenses"] or options["non_adaptive"]:
        _fail("unlearn evaluates unlearning methods on an undefended population: it takes no --defense or "
              "--non-adaptive")
    evaluation = _config_from({**options, "attacks": ("loss",), "model": options.get("model")})
    config = UnlearnConfig(evaluation=evaluation, forget=forget, attacks=tuple(recipe_attacks) or ("loss",),
                           unlearners=tuple(unlearners) or DEFAULT_UNLEARNERS)
    if config_file is not None:
        import dataclasses

        base = _read_config("load_unlearn", config_file)
        given = _given_options()
        config = dataclasses.replace(
            base, evaluation=_overlay(base.evaluation, evaluation, given),
            **{k: getattr(config, k) for k, option in (("unlearners", "unlearners"), ("forget", "forget"),
                                                       ("attacks", "recipe_attacks")) if option in given})
    try:
        plan = resolve_unlearn(config)
    except USAGE_ERRORS as exc:
        _fail(str(exc))
    cache = PopulationCache(None if options["no_cache"] else (options["cache_dir"] or default_cache_dir()))
    with _engine_errors(out):
        res = unlearn(plan, out=out, cache=cache, reporter=TerminalReporter(options["quiet"] or as_json))
    if as_json:
        click.echo(json.dumps({**res.document, "run_dir": str(res.run_dir)}, indent=2, sort_keys=True))
    else:
        click.echo(format_table(res.document))
        click.echo(f"run directory: {res.run_dir}")


@main.group("cache")
def cache_group() -> None:
    """The population cache: list, verify or clear trained populations.

    Entries live in --cache-dir (default $MIAFW_CACHE or ~/.cache/miafw); each holds its files'
    SHA-256 checksums, verified on every load (a damaged entry is never used: miafw retrains).
    """


def _cache_option(f):
    return click.option("--cache-dir", default=None, type=click.Path(file_okay=False, path_type=Path),
                        help="Population cache [default: $MIAFW_CACHE or ~/.cache/miafw].")(f)


def _open_cache(cache_dir):
    from mia_core.engine.cache import PopulationCache, default_cache_dir

    return PopulationCache(cache_dir or default_cache_dir())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@cache_group.command("ls")
@_cache_option
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def cache_ls(cache_dir, as_json):
    """List cached populations, newest first, with what trained them and their state."""
    import time

    cache = _open_cache(cache_dir)
    entries = cache.entries()
    if as_json:
        click.echo(json.dumps([{"key": e.key, "path": str(e.path), "bytes": e.size, "modified": e.modified,
                                "ok": e.problem is None, "problem": e.problem, "meta": e.meta}
                               for e in entries], indent=2, default=str))
        return
    if not entries:
        click.echo(f"no cached populations in {cache.root}")
        return
    for e in entries:
        m = e.meta
        what = (f"{m.get('dataset', {}).get('name', '?')}/{m.get('model', {}).get('name', '?')} "
                f"x{m.get('n_models', '?')} seed {m.get('seed', '?')}")
        if m.get("kind") == "shard":  # a finished shard of a population still being trained (or interrupted)
            ids = m.get("model_ids") or ["?"]
            what = f"shard: models {ids[0]}-{ids[-1]} of population {str(m.get('population', '?'))[:12]}"
        state = "ok" if e.problem is None else f"DAMAGED: {e.problem}"
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.modified))
        click.echo(f"{e.key[:12]}  {stamp}  {_size(e.size):>9}  {what}  {state}")
    click.echo(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
               f"{_size(sum(e.size for e in entries))} in {cache.root}")


@cache_group.command("verify")
@_cache_option
@click.option("--remove", is_flag=True, help="Delete the damaged entries.")
def cache_verify(cache_dir, remove):
    """Check every entry against its checksums; exit status 1 when any is damaged (and kept)."""
    cache = _open_cache(cache_dir)
    entries = cache.entries()
    bad = [e for e in entries if e.problem is not None]
    for e in bad:
        click.echo(f"{e.key[:12]}  DAMAGED: {e.problem}" + ("  (removed)" if remove else ""))
        if remove:
            cache.remove(e.key)
    click.echo(f"{len(entries) - len(bad)} of {len(entries)} entries verified in {cache.root}")
    if bad and not remove:
        sys.exit(EXIT_FAILURE)


@cache_group.command("clear")
@_cache_option
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def cache_clear(cache_dir, yes):
    """Delete every cached population."""
    cache = _open_cache(cache_dir)
    entries = cache.entries()
    if not entries:
        click.echo(f"no cached populations in {cache.root}")
        return
    total = _size(sum(e.size for e in entries))
    if not yes and not click.confirm(f"delete {len(entries)} cached populations ({total}) in {cache.root}?"):
        _fail("nothing deleted")
    for e in entries:
        cache.remove(e.key)
    click.echo(f"deleted {len(entries)} cached populations ({total})")


@main.command("runs")
@click.option("--out", default="runs", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="The directory whose runs to list.")
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(min=1), help="Newest runs shown.")
@click.option("--json", "as_json", is_flag=True, help="Print the index rows as JSON (the same as --format json).")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json"]))
@click.option("--dataset", default=None, help="Only runs on this dataset (its name, e.g. digits).")
@click.option("--attack", default=None, help="Only runs with this attack (its name or its full label).")
@click.option("--defense", default=None, help="Only runs with this defense (its name).")
@click.option("--status", default=None, type=click.Choice(["running", "complete", "failed", "interrupted"]),
              help="Only runs with this status.")
@click.option("--since", default=None, metavar="YYYY-MM-DD", help="Only runs started on or after this date.")
@click.option("--until", default=None, metavar="YYYY-MM-DD", help="Only runs started on or before this date.")
@click.option("--rebuild", is_flag=True, help="Rebuild the index from the run directories first.")
@click.option("--prune", is_flag=True,
              help="Remove the runs whose process died without finishing them (their row and .partial directory).")
def runs_cmd(out, limit, as_json, fmt, dataset, attack, defense, status, since, until, rebuild, prune):
    """List recorded runs (newest first) with their status and headline numbers.

    A run whose process is gone without recording its end (kill -9, a crash) shows as interrupted.
    The run directories are the record: a missing or corrupt index is rebuilt from them (a corrupt
    file is kept aside as index.sqlite.corrupt-<time>).
    """
    import re as _re

    from mia_core.runindex import RunIndex, filter_runs

    for name, value in (("--since", since), ("--until", until)):
        if value is not None and not _re.fullmatch(r"\d{4}-\d{2}-\d{2}(T\d{2}(:\d{2}(:\d{2})?)?)?", value):
            _fail(f"{name} {value!r}: expected a date YYYY-MM-DD (or YYYY-MM-DDTHH:MM:SS)")
    try:
        index = RunIndex(out)
        if rebuild:
            click.echo(f"rebuilt the index of {out}: {index.rebuild()} run(s)", err=True)
        if prune:
            removed = index.prune()
            click.echo(f"removed {len(removed)} interrupted run(s)" + "".join(f"\n  {r['id']}" for r in removed))
            return
        filtered = any(v is not None for v in (dataset, attack, defense, status, since, until))
        rows = index.list(limit=None if filtered else limit)
        rows = filter_runs(rows, dataset=dataset, attack=attack, defense=defense, status=status, since=since,
                           until=until)[:limit]
    except Exception as exc:  # a foreign index file
        _fail(f"cannot read the run index in {out}: {exc}")
    as_json = as_json or fmt == "json"
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no runs recorded in {out}")
        return
    for r in rows:
        head = f"{r['id']}  {r['status']:<8}  {r['dataset']}/{r['model']}  defenses: {r['defenses'] or 'none'}"
        click.echo(head)
        if r["summary"]:
            parts = [f"{k} AUC {v['auc']:.3f}" + (f", TPR@0.1% {100 * v['tpr_at_0.001']:.1f}%"
                                                  if v.get("tpr_at_0.001") is not None else "")
                     for k, v in r["summary"].items()]
            click.echo("    " + "; ".join(parts))
        if r["error"]:
            click.echo(f"    error: {r['error']}")


def _bench_names():
    from mia_core.kernels.bench import KERNELS

    return list(KERNELS)


@main.command("bench")
@click.option("--kernel", "kernels", multiple=True, metavar="NAME",
              help=f"Kernel family to benchmark; repeatable. Default: all of {', '.join(_bench_names())}.")
@click.option("--size", "sizes", multiple=True, metavar="N",
              help="Elements (or pairs) per call, e.g. 1e4 or 10000000; repeatable. Default: 1e4 and 1e7.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "float64"]),
              help="Element dtype; repeatable. Default: float32.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["native", "torch"]),
              help="Backends to time besides the torch baselines; repeatable. Default: both.")
@click.option("--repeat", default=21, show_default=True, type=click.IntRange(min=3),
              help="Timed repetitions per variant (the median is reported).")
@click.option("--format", "fmt", default="table", show_default=True, type=click.Choice(["table", "json"]))
def bench_cmd(kernels, sizes, dtypes, backends, repeat, fmt):
    """Benchmark the native kernels against their torch baselines and the memory bandwidth.

    Each case runs the native kernel, the torch baseline and a stream-copy probe in this one
    process and prints ratios (baseline time / variant time) and the fraction of the measured
    copy bandwidth. Numbers depend on the machine and on other load: run on an idle machine.
    """
    from mia_core import kernels as K
    from mia_core.kernels import bench

    names = list(kernels) or list(bench.KERNELS)
    bad = [k for k in names if k not in bench.KERNELS]
    if bad:
        _fail(f"unknown kernel {bad[0]!r}; valid: {', '.join(bench.KERNELS)}")
    parsed = []
    for text in sizes or ("1e4", "1e7"):
        try:
            value = float(text)
        except ValueError:
            _fail(f"--size {text!r} is not a number; use e.g. 1e4 or 10000000")
        if not (value >= 1 and value == int(value) and value <= 2e9):
            _fail(f"--size {text!r} must be a whole number between 1 and 2e9")
        parsed.append(int(value))
    if "native" in (backends or ("native",)) and not K.native_available():
        click.echo("Warning: the native extension is not available; only torch variants will run", err=True)
    rows = bench.run(names, sizes=parsed, dtypes=list(dtypes) or ["float32"],
                     backends=list(backends) or ["native", "torch"], repeat=repeat)
    if fmt == "json":
        import torch

        doc = {"machine": {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                           "native": K.backend_info()}, "results": [r.to_dict() for r in rows]}
        click.echo(json.dumps(doc, indent=2, default=str))
    else:
        click.echo(bench.format_table(rows))


@main.command("list")
@click.option("--kind", type=click.Choice(list(KINDS)), default=None, help="Only this kind of plugin.")
@click.option("-v", "--verbose", is_flag=True, help="Show distribution, version, API version and entry point.")
def list_cmd(kind, verbose):
    """List registered plugins; broken or incompatible ones are flagged with their error."""
    kinds = [kind] if kind else list(KINDS)
    problems = 0
    for k in kinds:
        infos = registry.inspect_group(k)
        click.echo(f"{k}:")
        if not infos:
            click.echo("  (none)")
        for info in infos:
            first = _summary_line(info.obj) if info.obj is not None else ""
            status = "" if info.status == "ok" else f"[{info.status.upper()}] "
            click.echo(f"  {info.name:<16} {status}{first if info.status == 'ok' else info.error}")
            if verbose:
                click.echo(f"  {'':<16} from {info.distribution or '?'} {info.version or ''}; "
                           f"api {info.api_version or 'undeclared'}; entry point {info.target}")
            problems += info.status != "ok"
    if problems:
        click.echo(f"{problems} plugin(s) could not be used; `miafw info NAME` shows why.", err=True)


def _summary_line(obj, width: int = 90) -> str:
    """The first paragraph of the docstring on one line, cut with an ellipsis past ``width``."""
    doc = inspect.getdoc(obj) or ""
    line = doc.strip().split("\n\n")[0].replace("\n", " ")
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


@main.command("info")
@click.argument("name")
@click.option("--kind", type=click.Choice(list(KINDS)), default=None,
              help="Plugin kind, when NAME is registered in several.")
def info_cmd(name, kind):
    """Show a plugin's parameters, defaults, access (threat model) and reference."""
    kinds = [kind] if kind else registry.find(name)
    if not kinds:
        every = sorted({n for k in KINDS for n in registry.names(k)})
        hint = registry.suggest(name, every)
        _fail(f"no plugin named {name!r}." + (f" Did you mean {hint!r}?" if hint else "")
              + " `miafw list` shows them all.")
    if len(kinds) > 1:
        _fail(f"{name!r} is registered as several kinds ({', '.join(kinds)}); pass --kind")
    k = kinds[0]
    try:
        cls = registry.load(k, name)
    except registry.PluginError as exc:
        _fail(str(exc))
    click.echo(f"{name}  ({k[:-1]}, {cls.__module__}.{cls.__qualname__})")
    doc = inspect.getdoc(cls) or "(no description)"
    click.echo(textwrap.indent(doc, "  "))
    click.echo("parameters:")
    sig = cls.param_signature()
    if not sig:
        click.echo("  (none)")
    for pname, p in sig.items():
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        default = "(required)" if p.default is inspect.Parameter.empty else repr(p.default)
        click.echo(f"  {pname}: {ann} = {default}")
    for attr, title in (("access", "access"), ("min_reference_models", "reference models needed"),
                        ("stage", "stage"), ("api_version", "plugin API")):
        if hasattr(cls, attr):
            click.echo(f"{title}: {getattr(cls, attr)}")
    if getattr(cls, "reference", ""):
        click.echo(f"reference: {cls.reference}")
    click.echo(f"usage: --{k[:-1]} {name}" + (":" + ",".join(f"{p}=..." for p in sig) if sig else ""))


if __name__ == "__main__":  # pragma: no cover
    main()
