"""Auditing the user's own trained model (``miafw audit``): the same stages as an evaluation,
with the target brought from outside.

An evaluation (:mod:`mia_core.engine.stages`) scores models miafw trained itself. An audit scores
*one* model the user trained: its membership comes from the user (``--members``), its outputs
from a checkpoint (``--weights``, loaded into a model family or an importable ``nn.Module``) or
from a file of its predictions on every record (``--predictions``). The reference models are a
population miafw trains with the recipe the user states, on random halves of the same records.

The seam: after the reference population is trained (or loaded from the cache, where it is the
same entry ``miafw eval`` would use), the target is put in front of it as model 0, with a
stand-in partner as model 1 whose keep row is the complement of the target's (never a reference,
never scored: it only keeps the complementary-pair layout, so the references of model 0 are
exactly the trained population, pairs intact). Everything after that is the evaluation's own
stages: post-training defenses, signals, attacks, metrics, the gate and the run directory.

So ``--n-models N`` counts the population as ``miafw eval`` does: ``N - 2`` reference models are
trained and every attack sees ``N - 2`` references, as it would against a target of
``miafw eval --n-models N``.

Defenses: with ``--weights`` the checkpoint is the model *before* its post-training defenses
(pruning, quantization, noise): miafw applies them to the target, and to the references unless
``--non-adaptive``. With ``--predictions`` the file is the released model's outputs, so the
defenses are applied to the references only (and ``--non-adaptive`` would leave them nothing to do:
refused). Train-time defenses always describe how the references are trained (the user's recipe).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import importlib
import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from mia_core import registry
from mia_core.base import PluginSpec
from mia_core.data import DataError, Records
from mia_core.engine.cache import PopulationCache
from mia_core.engine.population import ModelPopulation, scored_view
from mia_core.engine.progress import Reporter
from mia_core.engine.stages import (
    USAGE_ERRORS,
    Component,
    DefenseResult,
    EvalConfig,
    Evaluation,
    EvaluationWarning,
    Plan,
    PopulationResult,
    apply_defenses,
    check_defenses,
    check_resources,
    check_task,
    compute_metrics,
    compute_signals,
    load_records,
    resolve,
    run_attacks,
    train_population,
)
from mia_core.params import ParamError, instantiate, shown
from mia_core.results import RunDir, write_run
from mia_core.runindex import RunIndex

#: What each kind of target reveals (access levels, :data:`mia_core.base.ACCESS_LEVELS`).
WEIGHTS_ACCESS = ("label", "loss", "probs", "logits", "params")
PREDICTION_ACCESS = {"logits": ("label", "loss", "probs", "logits"), "probs": ("label", "loss", "probs"),
                     "prediction": ("label", "loss", "probs", "logits")}  # regression: the whole output

#: The target's index in the audited population, and its stand-in partner's.
TARGET, STAND_IN = 0, 1

#: Outside this fraction of the records as members the target's training set is not the size of the
#: references' (half the records), which weakens what they say about it: a warning.
MEMBER_FRACTION_WARN = (0.35, 0.65)

#: Probabilities are clipped here before their logarithm (a served API may round some to 0).
PROB_FLOOR = 1e-30


# ============================================================================ configuration
@dataclass(frozen=True)
class AuditConfig:
    """Everything that defines an audit (the CLI fills it from its options).

    Attributes:
        evaluation: the recipe, dataset, model family, defenses, attacks, population size, seed,
            intervals, device, adaptivity and budgets, as for ``miafw eval``. ``attacks`` empty:
            every registered attack the target can answer; ``targets`` and ``estimators`` are
            not used.
        members: ``"column=NAME"`` (a 0/1 column of the dataset, see
            :meth:`mia_core.base.DatasetSource.column`) or the path of a file with one record id
            per line (the records' ``index``: row numbers, or the ``file`` dataset's ``id=`` column).
        weights: a checkpoint (a ``state_dict`` saved with ``torch.save``), or
        predictions: an ``.npz`` or ``.csv`` file of the target's outputs on every record (see
            :func:`load_predictions`). Exactly one of the two.
        module: ``"package.module:Class"``, an ``nn.Module`` to load ``weights`` into (and to
            train the references as) instead of ``evaluation.model``; ``module_args`` are its
            keyword arguments.
    """

    evaluation: EvalConfig = field(default_factory=EvalConfig)
    members: str = ""
    weights: Optional[str] = None
    predictions: Optional[str] = None
    module: Optional[str] = None
    module_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetSource:
    """Where the target comes from (its provenance, recorded in ``config.json``).

    Attributes:
        kind: ``"weights"`` or ``"predictions"``.
        path: the file, absolute; sha256 and size: of its bytes when the audit was planned.
        outputs: predictions only: ``"logits"``, ``"probs"`` or ``"prediction"`` (regression).
        access: the access levels the target reveals.
    """

    kind: str
    path: str
    sha256: str
    size: int
    outputs: Optional[str]
    access: Tuple[str, ...]

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "sha256": self.sha256, "bytes": self.size,
                **({"outputs": self.outputs} if self.outputs else {}), "access": list(self.access)}


@dataclass(frozen=True)
class AuditPlan(Plan):
    """A resolved audit: the evaluation plan (target ``0`` of ``n_models``), the target's source,
    the members specification and the attacks left out of the default set (with why)."""

    source: Optional[TargetSource] = None
    members: str = ""
    skipped: Tuple[Tuple[str, str], ...] = ()

    @functools.cached_property
    def document(self) -> Dict[str, Any]:  # type: ignore[override]
        doc = dict(Plan.document.func(self))
        for key in ("targets", "n_targets", "estimators"):
            doc.pop(key, None)
        doc.update({"command": "audit", "reference_models": self.config.n_models - 2,
                    "target": {**self.source.to_dict(), "architecture": self.model.spec.to_dict(),
                               "members": self.members},
                    **({"skipped_attacks": dict(self.skipped)} if self.skipped else {})})
        return doc


# ============================================================================ the model: an import path
class ImportedModel:
    """A model family from an import path (``--module my_pkg.nets:Net``): ``build`` returns
    ``Net(**kwargs)``, plus ``n_features``/``n_classes`` when its constructor takes them and they
    were not given. The class's source text is hashed into the plugin's parameters, so a changed
    class never reuses a cached population."""

    def __init__(self, path: str, kwargs: Mapping[str, Any]):
        self.path = path
        self.kwargs = dict(kwargs)
        self.cls = import_module_class(path)
        try:
            source = inspect.getsource(self.cls)
        except (OSError, TypeError):
            source = repr(self.cls)
        self.source_sha256 = hashlib.sha256(source.encode()).hexdigest()

    def get_params(self) -> Dict[str, Any]:
        return {"path": self.path, "kwargs": dict(self.kwargs), "source_sha256": self.source_sha256}

    def build(self, n_features: int, n_classes: int) -> torch.nn.Module:
        kwargs = dict(self.kwargs)
        params = inspect.signature(self.cls).parameters
        for name, value in (("n_features", n_features), ("n_classes", n_classes)):
            if name in params and name not in kwargs:
                kwargs[name] = value
        module = self.cls(**kwargs)
        if not isinstance(module, torch.nn.Module):
            raise ParamError(f"--module {self.path}: {self.cls.__name__}(...) returned {type(module).__name__}, "
                             f"not a torch.nn.Module")
        return module


def import_module_class(path: str):
    """``"package.module:Class"`` imported (the current directory is searched first, as
    ``python -m`` does).

    Raises:
        ParamError: a malformed path, a module that fails to import, or no such class.
    """
    text = str(path).strip()
    mod_name, sep, attr = text.partition(":")
    if not sep or not mod_name or not attr:
        raise ParamError(f"--module {text!r}: expected package.module:Class, e.g. --module my_pkg.nets:Net")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:  # ModuleNotFoundError, or the module itself failing
        raise ParamError(f"--module {text!r}: cannot import {mod_name!r} ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ParamError(f"--module {text!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not (inspect.isclass(obj) and issubclass(obj, torch.nn.Module)):
        raise ParamError(f"--module {text!r}: {attr} is not a torch.nn.Module subclass")
    return obj


# ============================================================================ resolve
def _file(option: str, path: str) -> Tuple[Path, str, int]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ParamError(f"{option} {shown(path)}: no such file")
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return p.resolve(), digest.hexdigest(), p.stat().st_size


def prediction_outputs(path: Path) -> str:
    """Which outputs a predictions file holds (``logits``, ``probs`` or ``prediction``), read from
    its array names (npz) or column names (CSV) alone.

    Raises:
        DataError: an unreadable file, or not exactly one kind of output.
    """
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                names = list(z.files)
        except (ValueError, OSError) as exc:
            raise DataError(f"{path.name}: cannot read as a NumPy archive: {exc}") from None
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            header = next(csv.reader(fh), [])
        names = sorted({h.strip().rsplit("_", 1)[0] if h.strip().startswith(("logit_", "prob_")) else h.strip()
                        for h in header})
        names = ["logits" if n == "logit" else "probs" if n == "prob" else n for n in names]
    else:
        raise DataError(f"--predictions {path.name}: expected a .npz or .csv file")
    kinds = [k for k in ("logits", "probs", "prediction") if k in names]
    if len(kinds) != 1:
        raise DataError(f"--predictions {path.name}: expected exactly one of logits, probs or prediction "
                        f"(CSV: columns logit_0.. or prob_0.. or prediction), found {', '.join(names) or 'nothing'}")
    return kinds[0]


def resolve_audit(config: AuditConfig) -> AuditPlan:
    """Validate an audit before anything is read or trained beyond the files' headers.

    Raises:
        One of :data:`~mia_core.engine.stages.USAGE_ERRORS`, with a one-line message.
    """
    c = config.evaluation
    if (config.weights is None) == (config.predictions is None):
        raise ParamError("give the target as exactly one of --weights FILE or --predictions FILE")
    if not str(config.members).strip():
        raise ParamError("--members is required: a file of member record ids (one per line) or column=NAME")
    if config.module is not None and config.predictions is not None:
        raise ParamError("--module names the architecture to load --weights into; with --predictions the "
                         "references are trained as --model")
    if config.module_args and config.module is None:
        raise ParamError("--module-arg needs --module")
    if isinstance(c.n_models, bool) or not isinstance(c.n_models, int) or c.n_models < 4 or c.n_models % 2:
        raise ParamError(f"--n-models must be an even integer >= 4 (the target and its stand-in partner, plus at "
                         f"least one pair of reference models), got {c.n_models}")
    if c.estimators:
        raise ParamError("estimators measure a population miafw trains; an audit scores one model (use miafw eval)")
    if config.weights is not None:
        path, digest, size = _file("--weights", config.weights)
        source = TargetSource("weights", str(path), digest, size, None, WEIGHTS_ACCESS)
    else:
        path, digest, size = _file("--predictions", config.predictions)
        outputs = prediction_outputs(path)
        source = TargetSource("predictions", str(path), digest, size, outputs, PREDICTION_ACCESS[outputs])
        if not c.adaptive and c.defenses:
            raise ParamError("--non-adaptive with --predictions: the file already holds the defended model's "
                             "outputs and the references would stay undefended, so --defense would change nothing")
    model = None
    if config.module is not None:
        fam = ImportedModel(config.module, config.module_args)
        model = Component("model", f"module:{config.module}", PluginSpec("module", fam.get_params()), fam)
    attacks, skipped = tuple(c.attacks), []
    if not attacks:  # every registered attack the target can answer
        attacks = []
        for name in registry.names("attacks"):
            try:
                cls = registry.load("attacks", name)
                why = _unanswerable(cls(), source)
            except Exception as exc:  # a broken third-party plugin: left out, said so
                why = f"cannot be loaded ({type(exc).__name__})"
            if why:
                skipped.append((name, why))
            else:
                attacks.append(name)
        if not attacks:
            raise ParamError(f"no registered attack can run on this target: {'; '.join(f'{n} {w}' for n, w in skipped)}")
        attacks = tuple(attacks)
    plan = resolve(dataclasses.replace(c, attacks=attacks, targets=str(TARGET), estimators=()))
    for a in plan.attacks:
        why = _unanswerable(a.plugin, source)
        if why:
            raise ParamError(f"attack {a.label!r} {why}")
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(Plan)}
    if model is not None:
        fields["model"] = model
    members = str(config.members).strip()
    if members.startswith("column="):
        fields["dataset"] = _without_feature(plan.dataset, members[len("column="):].strip())
    else:  # recorded absolute, so the run's config.toml works from any directory
        members = str(Path(members).expanduser().resolve())
    return AuditPlan(**fields, source=source, members=members, skipped=tuple(skipped))


def _without_feature(dataset: Component, column: str) -> Component:
    """The dataset with the membership column left out of the features, for a dataset plugin
    that takes ``drop`` (the ``file`` dataset); others are returned as they are (their
    :meth:`~mia_core.base.DatasetSource.column` says whether they have such a column)."""
    params = dataset.plugin.get_params()
    if "drop" not in params or not column:
        return dataset
    dropped = [c.strip() for c in str(params["drop"]).split(",") if c.strip()]
    if column in dropped:
        return dataset
    spec = PluginSpec(dataset.name, {**params, "drop": ",".join(dropped + [column])})
    obj = instantiate(type(dataset.plugin), spec, label=f"dataset {dataset.name!r}")
    return dataclasses.replace(dataset, spec=PluginSpec(dataset.name, obj.get_params()), plugin=obj)


def _unanswerable(attack, source: TargetSource) -> Optional[str]:
    """Why a target of ``source`` cannot answer ``attack`` (``None``: it can)."""
    lacking = [a for a in attack.access if a not in source.access]
    if lacking:
        what = {"params": "the weights", "logits": "the logits"}.get(lacking[0], lacking[0])
        return (f"needs {', '.join(lacking)} access ({what}); the target is {source.kind} "
                f"{Path(source.path).name}" + (f" holding {source.outputs}" if source.outputs else "")
                + ", which gives " + ", ".join(source.access))
    if source.kind == "predictions" and attack.queries_target():
        return ("queries the target on inputs other than the records (e.g. augmented views), which a predictions "
                "file cannot answer: use --weights, or turn the queries off (lira: augment=none)")
    return None


# ============================================================================ the target's data
def resolve_members(plan: AuditPlan, records: Records) -> np.ndarray:
    """The target's membership, bool ``[N]`` over the dataset's records.

    Raises:
        DataError: unknown or repeated ids, a file that cannot be read, a column that is not 0/1,
            or no members or no non-members.
    """
    spec = plan.members
    if spec.startswith("column="):
        name = spec[len("column="):].strip()
        values = plan.dataset.plugin.column(name)
        if values.shape != (records.n,):
            raise DataError(f"--members column={name}: {values.shape[0]} values for {records.n} records")
        bad = ~np.isin(values, (0, 1))
        if bad.any():
            j = int(np.argmax(bad))
            raise DataError(f"--members column={name}: record {int(records.index[j])} has {values[j]!r}; the column "
                            f"must hold 0 (non-member) or 1 (member)")
        members = values == 1
        where = f"column {name!r}"
    else:
        members = _members_from_file(Path(spec).expanduser(), records)
        where = Path(spec).name
    k = int(members.sum())
    if k == 0 or k == records.n:
        raise DataError(f"--members {where}: {k} of {records.n} records are members; an audit needs both members "
                        f"and non-members")
    return members


def member_warning(members: np.ndarray) -> Optional[str]:
    """A warning when the target's training set is far from the references' size (half the records)."""
    lo, hi = MEMBER_FRACTION_WARN
    f = float(np.mean(members))
    if lo <= f <= hi:
        return None
    return (f"the target trained on {100 * f:.0f}% of the records, each reference model on 50%: references trained "
            f"on a different amount of data calibrate the attacks less well, so the audit may misjudge the leakage "
            f"(see the README, 'Audit your own model')")


def _members_from_file(path: Path, records: Records) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"--members {shown(str(path))}: no such file (expected one record id per line, or column=NAME)")
    ids = []
    with path.open() as fh:
        for lineno, line in enumerate(fh, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                ids.append(int(text))
            except ValueError:
                raise DataError(f"--members {path.name}: line {lineno}: {shown(text)} is not an integer record id") from None
    ids = np.asarray(ids, dtype=np.int64)
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise DataError(f"--members {path.name}: record id {int(unique[np.argmax(counts > 1)])} is listed "
                        f"{int(counts.max())} times")
    unknown = ids[~np.isin(ids, records.index)]
    if unknown.size:
        lo, hi = int(records.index.min()), int(records.index.max())
        raise DataError(f"--members {path.name}: {unknown.size} id(s) not in dataset {records.name!r} (first: "
                        f"{', '.join(map(str, unknown[:5].tolist()))}); its record ids run from {lo} to {hi}")
    return np.isin(records.index, ids)


def load_weights(plan: AuditPlan, records: Records) -> Dict[str, torch.Tensor]:
    """The checkpoint as a state dict that fits the plan's architecture (float tensors cast to
    float32), read with ``torch.load(..., weights_only=True)``.

    Accepted: a ``state_dict`` (``torch.save(model.state_dict(), path)``), or a dict holding one
    under ``state_dict`` or ``model_state_dict``; keys prefixed ``module.`` (DataParallel) or
    ``_module.`` (Opacus) throughout have the prefix removed.

    Raises:
        DataError: a file ``weights_only`` refuses or cannot read, or one line listing the
            missing, unexpected and mis-shaped keys.
    """
    path = Path(plan.source.path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"--weights {path.name}: cannot be loaded with torch.load(weights_only=True) "
                        f"({shown(first, 160)}); save the model's state_dict: torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise DataError(f"--weights {path.name}: expected a state_dict (names to tensors), got "
                        f"{type(state).__name__}; save it with torch.save(model.state_dict(), path)")
    for prefix in ("module.", "_module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    module = plan.model.plugin.build(records.n_features, records.n_classes)
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
        if unexpected:
            parts.append("unexpected " + ", ".join(unexpected[:6]) + (" ..." if len(unexpected) > 6 else ""))
        if misshaped:
            parts.append("mis-shaped " + ", ".join(f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
                                                   for k in misshaped[:4]) + (" ..." if len(misshaped) > 4 else ""))
        raise DataError(f"--weights {path.name} does not fit model {plan.model.label!r} on {records.n_features} "
                        f"features and {records.n_classes} classes: {'; '.join(parts)}")
    out = {}
    for k, v in state.items():
        v = v.detach()
        if v.is_floating_point():
            if not torch.isfinite(v).all():
                raise DataError(f"--weights {path.name}: tensor {k!r} holds NaN or inf values")
            v = v.to(torch.float32)
        out[k] = v
    return out


def load_predictions(plan: AuditPlan, records: Records) -> torch.Tensor:
    """The target's outputs on every record as float64 logits ``[N, C]`` in record order
    (probabilities become log-probabilities, which give the same softmax, so every signal but
    the raw ``logits`` is what the model's own logits would give; regression: the predictions
    ``[N, 1]``).

    Formats: ``.npz`` with one array ``logits`` or ``probs`` (``[N, C]``) or ``prediction``
    (``[N]``), read with ``allow_pickle=False``; ``.csv`` with a header and columns ``logit_0`` ..
    ``logit_{C-1}``, ``prob_0`` .. ``prob_{C-1}``, or ``prediction``. Optionally record ids (npz
    array or CSV column ``index``): rows are then matched to records by id; without them row
    ``i`` is record ``i`` of the dataset.

    Raises:
        DataError: a wrong shape, unknown or missing ids, non-finite values, probabilities that
            are not a distribution, or extra columns.
    """
    path = Path(plan.source.path)
    kind = plan.source.outputs
    ids = None
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            extra = sorted(set(z.files) - {kind, "index"})
            if extra:
                raise DataError(f"--predictions {path.name}: unexpected arrays {', '.join(extra)} (allowed: {kind}, index)")
            values = np.asarray(z[kind])
            ids = np.asarray(z["index"]) if "index" in z.files else None
        if not np.issubdtype(values.dtype, np.number):
            raise DataError(f"--predictions {path.name}: {kind} has dtype {values.dtype}, expected numbers")
        values = values.astype(np.float64)
    else:
        values, ids = _read_prediction_csv(path, kind, records)
    if kind == "prediction" and values.ndim == 1:
        values = values[:, None]
    c = 1 if kind == "prediction" else records.n_classes
    if kind == "prediction" and not records.is_regression:
        raise DataError(f"--predictions {path.name}: holds regression predictions, but dataset {records.name!r} is a "
                        f"classification task (give logits or probs)")
    if kind != "prediction" and records.is_regression:
        raise DataError(f"--predictions {path.name}: holds {kind}, but dataset {records.name!r} is a regression task "
                        f"(give one prediction per record)")
    if values.shape != (records.n, c):
        raise DataError(f"--predictions {path.name}: {kind} have shape {values.shape}; dataset {records.name!r} has "
                        f"{records.n} records and {c} output(s), so expected ({records.n}, {c})")
    if not np.isfinite(values).all():
        raise DataError(f"--predictions {path.name}: {kind} hold NaN or inf values (first at row "
                        f"{int(np.argmax(~np.isfinite(values).all(axis=1)))})")
    if ids is not None:
        values = values[_row_order(path, ids, records)]
    if kind == "probs":
        sums = values.sum(axis=1)
        bad = (values < 0).any(axis=1) | (values > 1).any(axis=1) | (np.abs(sums - 1) > 1e-3)
        if bad.any():
            j = int(np.argmax(bad))
            raise DataError(f"--predictions {path.name}: probs row {j} is not a distribution (sums to {sums[j]:.4g}; "
                            f"entries must be in [0, 1] and sum to 1); logits belong in an array named 'logits'")
        values = np.log(np.clip(values, PROB_FLOOR, None))
    return torch.from_numpy(values)


def _row_order(path: Path, ids, records: Records) -> np.ndarray:
    """For each record, the file row holding it (ids must list every record once)."""
    ids = np.asarray(ids)
    if ids.shape != (records.n,) or not np.issubdtype(ids.dtype, np.number) or not np.all(ids == np.round(ids)):
        raise DataError(f"--predictions {path.name}: index must hold one integer record id per row")
    ids = ids.astype(np.int64)
    unknown = ids[~np.isin(ids, records.index)]
    if unknown.size:
        raise DataError(f"--predictions {path.name}: {unknown.size} id(s) not in dataset {records.name!r} (first: "
                        f"{', '.join(map(str, unknown[:5].tolist()))})")
    if len(np.unique(ids)) != records.n:
        raise DataError(f"--predictions {path.name}: index repeats record ids; every record must appear once")
    order = np.argsort(ids)
    return order[np.searchsorted(ids[order], records.index)]


def _read_prediction_csv(path: Path, kind: str, records: Records) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    with path.open(newline="") as fh:
        rows = [r for r in csv.reader(fh) if any(c.strip() for c in r)]
    header = [h.strip() for h in rows[0]]
    if kind == "prediction":
        wanted = ["prediction"]
    else:
        prefix = "logit_" if kind == "logits" else "prob_"
        wanted = [f"{prefix}{k}" for k in range(records.n_classes)]
    extra = [h for h in header if h not in wanted and h != "index"]
    missing = [w for w in wanted if w not in header]
    if extra or missing:
        raise DataError(f"--predictions {path.name}: columns must be {wanted[0]}..{wanted[-1]} (dataset "
                        f"{records.name!r} has {records.n_classes} classes) and optionally index; "
                        + ("missing " + ", ".join(missing[:4]) if missing else "")
                        + ("; " if missing and extra else "") + ("unexpected " + ", ".join(extra[:4]) if extra else ""))
    body = rows[1:]
    cols = [header.index(w) for w in wanted]
    values = np.empty((len(body), len(cols)))
    ids = np.empty(len(body)) if "index" in header else None
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DataError(f"--predictions {path.name}: line {i + 2} has {len(row)} fields, the header {len(header)}")
        try:
            values[i] = [float(row[j]) for j in cols]
            if ids is not None:
                ids[i] = float(row[header.index("index")])
        except ValueError:
            raise DataError(f"--predictions {path.name}: line {i + 2} holds a value that is not a number") from None
    return values, ids


# ============================================================================ the audited population
def with_target(references: ModelPopulation, members: np.ndarray, *,
                weights: Optional[Dict[str, torch.Tensor]] = None,
                logits: Optional[torch.Tensor] = None) -> ModelPopulation:
    """The reference population with the target in front: model 0 the target (membership
    ``members``), model 1 its stand-in partner (membership ``~members``; never a reference, never
    scored), models ``2..`` the references in their pairs.

    Args:
        weights: the target's state dict (``--weights``): model 0 and the stand-in carry it.
        logits: the target's outputs ``[N, C]`` (``--predictions``): models 0 and 1 are known by
            these only (:attr:`ModelPopulation.external`); their parameter rows are NaN.
    """
    if (weights is None) == (logits is None):
        raise ValueError("give the target's weights or its logits")
    keep = np.concatenate([members[None], ~members[None], references.keep])
    device = references.device

    def stack(stacked: Dict[str, torch.Tensor], own: Optional[Dict[str, torch.Tensor]]):
        out = {}
        for name, rows in stacked.items():
            if own is not None:
                first = own[name].to(device=device, dtype=rows.dtype)[None].expand(2, *rows.shape[1:])
            elif rows.is_floating_point():
                first = torch.full((2, *rows.shape[1:]), float("nan"), dtype=rows.dtype, device=device)
            else:
                first = rows[:1].expand(2, *rows.shape[1:])
            out[name] = torch.cat([first, rows.detach()]).requires_grad_(rows.requires_grad)
        return out

    pop = ModelPopulation(records=references.records, keep=keep, base=references.base,
                          params=stack(references.params, weights), buffers=stack(references.buffers, weights),
                          recipe=references.recipe, seed=references.seed, training=references.training,
                          train_defenses=references.train_defenses,
                          reserved=None if references.reserved is None else references.reserved.copy())
    if logits is not None:
        pop.external = np.array([TARGET, STAND_IN])
        pop.external_logits = logits.to(torch.float64)[None].expand(2, *logits.shape).clone()
    return pop


def _reference_plan(plan: AuditPlan, *, defended: bool = True) -> AuditPlan:
    """The plan that trains the reference population: ``n_models - 2`` models (the cache entry
    ``miafw eval`` with that many models would use), without the train-time defenses when
    ``defended`` is false."""
    c = plan.config
    config = dataclasses.replace(c, n_models=c.n_models - 2, targets="all", shards=min(c.shards, c.n_models - 2))
    out = dataclasses.replace(plan, config=config, targets=tuple(range(c.n_models - 2)))
    return out if defended else dataclasses.replace(out, train_defenses=())


def run_audit_stages(plan: AuditPlan, records: Records, members: np.ndarray, target, *,
                     cache: Optional[PopulationCache] = None, reporter: Optional[Reporter] = None) -> Evaluation:
    """The audit's stages once its inputs are loaded (nothing written): train the references,
    put the target in front (:func:`with_target`), defend, signal, attack, measure."""
    reporter = reporter or Reporter()
    c = plan.config
    weights = target if plan.source.kind == "weights" else None
    logits = target if plan.source.kind == "predictions" else None
    trained = train_population(_reference_plan(plan), records, cache=cache, reporter=reporter)
    combined = with_target(trained.population, members, weights=weights, logits=logits)
    if weights is not None:  # the checkpoint is the model before its post-training defenses: defend it too
        defended = apply_defenses(plan, combined, reporter=reporter)
    elif c.adaptive and plan.post_defenses:  # the predictions are the released model's: defend the references only
        refs = apply_defenses(plan, trained.population, reporter=reporter)
        defended = DefenseResult(with_target(refs.population, members, logits=logits), refs.reports)
    else:
        defended = DefenseResult(combined, [])
    undefended_signals = compute_signals(combined)
    signals = compute_signals(defended.population) if defended.population is not combined else undefended_signals
    references = None
    if not c.adaptive and plan.defenses:  # the references carry no defense (train-time ones included)
        plain = trained.population
        if plan.train_defenses:
            reporter.message("the reference models without the train-time defenses (--non-adaptive):")
            plain = train_population(_reference_plan(plan, defended=False), records, cache=cache,
                                     reporter=reporter).population
        plain = with_target(plain, members, weights=weights, logits=logits)
        references = scored_view(plain, compute_signals(plain))
    target_pop, target_signals = scored_view(defended.population, signals)
    scores = run_attacks(plan, target_pop, target_signals, reporter=reporter, references=references)
    result = PopulationResult(combined, trained.key, trained.from_cache, trained.train_reports, trained.training)
    m = compute_metrics(plan, records=records, trained=result, defended=defended,
                        undefended_signals=undefended_signals, signals=signals, scores=scores, estimates={})
    doc = m.document
    note = member_warning(members)
    if note:
        warnings.warn(note, EvaluationWarning, stacklevel=2)
        doc["warnings"].append(note)
    scored = defended.population.scored_records
    doc["population"]["n_models"] = c.n_models - 2  # what was trained: the references
    doc["population"]["reference_models"] = c.n_models - 2
    doc["population"]["members_per_model_mean"] = float(trained.population.keep.sum(1).mean())
    doc["audit"] = {"source": plan.source.to_dict(), "architecture": plan.model.spec.to_dict(),
                    "members": int(members.sum()), "non_members": int((~members).sum()),
                    "scored_members": int(members[scored].sum()), "scored_non_members": int((~members[scored]).sum()),
                    "member_fraction": float(members.mean()),
                    **({"skipped_attacks": dict(plan.skipped)} if plan.skipped else {})}
    return Evaluation(plan=plan, metrics=doc, scores=scores, membership=members[scored][None],
                      targets=[TARGET], record_index=records.index[scored], estimates={}, curves=m.curves,
                      population=defended.population)


def load_target(plan: AuditPlan, records: Records):
    """The target's state dict (weights) or logits (predictions), checked against the records."""
    if plan.source.kind == "weights":
        return load_weights(plan, records)
    return load_predictions(plan, records)


def audit(config: Union[AuditConfig, AuditPlan], *, out: Optional[Union[str, Path]] = None,
          cache: Optional[Union[PopulationCache, str, Path]] = None,
          reporter: Optional[Reporter] = None) -> Evaluation:
    """Audit the user's model end to end (the public entry point, ``mia_core.audit``).

    Every input is read and checked before anything trains: the members, the checkpoint (against
    the architecture) or the predictions (against the records), and the files' hashes recorded.

    Args:
        config: an :class:`AuditConfig` (or an :class:`AuditPlan` resolved from one).
        out, cache, reporter: as for :func:`mia_core.evaluate`.

    Returns:
        An :class:`~mia_core.engine.stages.Evaluation` with one target (model 0);
        ``metrics["audit"]`` holds the provenance and member counts, ``metrics["budget"]`` the gate.

    Raises:
        As :func:`mia_core.evaluate`: a usage error (nothing trained, nothing written) or
        :class:`~mia_core.engine.stages.PluginRuntimeError`.

    Example::

        import mia_core
        from mia_core.engine.audit import AuditConfig
        ev = mia_core.audit(AuditConfig(mia_core.EvalConfig(attacks=["lira"]), members="members.txt",
                                        weights="target.pt"))
        print(ev.metrics["attacks"]["lira"]["auc_ci"])
    """
    plan = config if isinstance(config, AuditPlan) else resolve_audit(config)
    if not isinstance(cache, PopulationCache):
        cache = PopulationCache(None if cache is None else Path(cache).expanduser())
    out = None if out is None else Path(out).expanduser()
    records = load_records(plan)
    check_task(plan, records)
    check_defenses(plan, records)
    members = resolve_members(plan, records)
    target = load_target(plan, records)
    _check_hash(plan)
    check_resources(_reference_plan(plan), records, out=out)
    if out is None:
        return run_audit_stages(plan, records, members, target, cache=cache, reporter=reporter)
    run = RunDir(out, plan.document, index=RunIndex(out), discard_on=USAGE_ERRORS)
    with run:
        from mia_core import configfile

        (run.path / "config.toml").write_text(configfile.dump_audit(config_of(plan)))  # `audit --config` repeats it
        ev = run_audit_stages(plan, records, members, target, cache=cache, reporter=reporter)
        write_run(run, ev)
    ev.run_dir = run.final
    return ev


def config_of(plan: AuditPlan) -> AuditConfig:
    """The :class:`AuditConfig` that resolves to ``plan`` (the attacks as resolved, the target file
    by its absolute path), as written to the run's ``config.toml``."""
    c = dataclasses.replace(plan.config, targets="all", estimators=())
    module, module_args = None, {}
    if isinstance(plan.model.plugin, ImportedModel):
        module, module_args = plan.model.plugin.path, dict(plan.model.plugin.kwargs)
        c = dataclasses.replace(c, model="mlp")  # not used: the module is the architecture
    kind = plan.source.kind
    return AuditConfig(evaluation=c, members=plan.members, module=module, module_args=module_args,
                       **{kind: plan.source.path})


def _check_hash(plan: AuditPlan) -> None:
    """The target file read is the one whose hash the plan records (it did not change meanwhile)."""
    _, digest, _ = _file(f"--{plan.source.kind}", plan.source.path)
    if digest != plan.source.sha256:
        raise DataError(f"--{plan.source.kind} {Path(plan.source.path).name} changed while the audit was being "
                        f"planned (sha256 {digest[:12]} != {plan.source.sha256[:12]}); run it again")


__all__ = [
    "AuditConfig",
    "AuditPlan",
    "ImportedModel",
    "TargetSource",
    "audit",
    "config_of",
    "import_module_class",
    "load_predictions",
    "load_target",
    "load_weights",
    "member_warning",
    "resolve_audit",
    "resolve_members",
    "run_audit_stages",
    "with_target",
]
