"""Helpers that register throw-away plugins through real entry points (a fake installed
distribution on sys.path), the way a third-party package would."""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path
from typing import Dict, Iterator


def make_distribution(root: Path, name: str, modules: Dict[str, str], entry_points: Dict[str, Dict[str, str]],
                      version: str = "0.0.1") -> Path:
    """Write ``modules`` and a ``<name>-<version>.dist-info`` with ``entry_points`` under ``root``.

    Adding ``root`` to ``sys.path`` (or ``PYTHONPATH``) makes importlib.metadata see it as installed.
    """
    root.mkdir(parents=True, exist_ok=True)
    for mod, src in modules.items():
        (root / f"{mod}.py").write_text(textwrap.dedent(src))
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, eps in entry_points.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in eps.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    return root


GOOD_ATTACK = '''
import numpy as np
from mia_core.base import Attack

class Confidence(Attack):
    """Score = the target's logit-scaled confidence (a global threshold, no references)."""
    access = ("probs",)

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def fit(self, ctx):
        self.ctx_ = ctx
        return self

    def score(self, target, records):
        return self.scale * self.ctx_.for_target(target).target_signal("confidence")[records]
'''

BROKEN = '''
raise ImportError("this plugin needs libfoo, which is not installed")
'''

WRONG_API = '''
from mia_core.base import Attack

class Future(Attack):
    api_version = "99.0"
    def __init__(self):
        pass
    def fit(self, ctx):
        return self
    def score(self, target, records):
        return records * 0.0
'''

NOT_A_PLUGIN = '''
class Plain:
    pass
'''


@contextlib.contextmanager
def installed(site: Path, monkeypatch) -> Iterator[Path]:
    """Make the fake distribution under ``site`` visible to the registry for the block (and forget
    it afterwards: ``monkeypatch`` restores ``sys.path``, the registry is refreshed both ways)."""
    from mia_core import registry

    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    try:
        yield site
    finally:
        registry.refresh()


def third_party(root: Path) -> Path:
    return make_distribution(
        root, "miafw-testplugins",
        {"tp_good": GOOD_ATTACK, "tp_broken": BROKEN, "tp_future": WRONG_API, "tp_plain": NOT_A_PLUGIN},
        {"miafw.attacks": {"tp-confidence": "tp_good:Confidence", "broken": "tp_broken:Whatever",
                           "future": "tp_future:Future", "plain": "tp_plain:Plain"}},
    )


FAULTY = '''
import numpy as np
import torch
from mia_core.base import Attack, Defense, ModelFamily


class _Base(Attack):
    access = ("loss",)
    api_version = "1.0"

    def __init__(self):
        pass

    def fit(self, ctx):
        self.ctx_ = ctx
        return self

    def score(self, target, records):
        return -self.ctx_.for_target(target).target_signal("loss")[records]


class FailFit(_Base):
    def fit(self, ctx):
        raise RuntimeError("boom in fit")


class FailScore(_Base):
    def score(self, target, records):
        raise ZeroDivisionError("boom in score")


class NaNScore(_Base):
    def score(self, target, records):
        out = super().score(target, records)
        out[3] = np.nan
        return out


class WrongShape(_Base):
    def score(self, target, records):
        return np.zeros(len(records) + 1)


class Interrupt(_Base):
    def score(self, target, records):
        raise KeyboardInterrupt


class SneakyAccess(_Base):
    access = ("label",)


class FailDefense(Defense):
    api_version = "1.0"

    def __init__(self):
        pass

    def apply(self, ctx):
        for p in ctx.params.values():
            p.mul_(0.5)  # half-done work that must never reach a cache or a results directory
        raise ValueError("boom in apply")


class FailModel(ModelFamily):
    api_version = "1.0"

    def __init__(self):
        pass

    def build(self, n_features, n_classes):
        raise MemoryError("boom in build")
'''


def faulty(root: Path) -> Path:
    attacks = {n: f"tp_faulty:{c}" for n, c in [("fail-fit", "FailFit"), ("fail-score", "FailScore"),
                                                 ("nan-score", "NaNScore"), ("wrong-shape", "WrongShape"),
                                                 ("interrupt", "Interrupt"), ("sneaky", "SneakyAccess")]}
    return make_distribution(root, "miafw-faulty", {"tp_faulty": FAULTY},
                             {"miafw.attacks": attacks, "miafw.defenses": {"fail-defense": "tp_faulty:FailDefense"},
                              "miafw.models": {"fail-model": "tp_faulty:FailModel"}})


ESTIMATORS = '''
import numpy as np
from mia_core.base import Estimator


class LossTV(Estimator):
    """Test estimator: total variation between the member and non-member loss histograms, pooled
    over every model (a plug-in estimate on shared quantile bins), with a seeded bootstrap
    interval over records. TV bounds the advantage of any attack that thresholds the loss."""

    access = ("loss",)
    api_version = "1.0"

    def __init__(self, bins: int = 20, n_boot: int = 50):
        self.bins = bins
        self.n_boot = n_boot

    def validate(self):
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2, got {self.bins}")

    @staticmethod
    def _tv(loss, keep, edges):
        a = np.histogram(loss[keep], edges)[0] / max(1, keep.sum())
        b = np.histogram(loss[~keep], edges)[0] / max(1, (~keep).sum())
        return 0.5 * float(np.abs(a - b).sum())

    def estimate(self, ctx):
        self.validate()
        loss, keep = ctx.signal("loss"), ctx.keep
        edges = np.unique(np.quantile(loss, np.linspace(0, 1, self.bins + 1)))
        edges[0], edges[-1] = -np.inf, np.inf
        tv = self._tv(loss, keep, edges)
        rng = np.random.default_rng(ctx.seed)
        boots = []
        for _ in range(self.n_boot):
            cols = rng.integers(0, loss.shape[1], loss.shape[1])
            boots.append(self._tv(loss[:, cols], keep[:, cols], edges))
        lo, hi = np.quantile(boots, [0.025, 0.975])
        return {"value": tv, "interval": [min(lo, tv), max(hi, tv)], "advantage_bound": tv, "bins": len(edges) - 1}


class _Fixed(Estimator):
    access = ("loss",)
    api_version = "1.0"
    result = {}

    def __init__(self):
        pass

    def estimate(self, ctx):
        ctx.signal("loss")
        return dict(self.result)


class NaNValue(_Fixed):
    result = {"value": float("nan")}


class ReversedInterval(_Fixed):
    result = {"value": 0.2, "interval": [0.3, 0.1]}


class BadBound(_Fixed):
    result = {"value": 0.2, "advantage_bound": 2.0}


class TinyBound(_Fixed):
    result = {"value": 0.0, "interval": [0.0, 0.0], "advantage_bound": 0.0}
'''


def estimators(root: Path) -> Path:
    """A distribution with a working test estimator (``test-tv``) and estimators whose output the
    engine must refuse (``nan-value``, ``reversed-interval``, ``bad-bound``) or flag (``tiny-bound``)."""
    eps = {"test-tv": "tp_estimators:LossTV", "nan-value": "tp_estimators:NaNValue",
           "reversed-interval": "tp_estimators:ReversedInterval", "bad-bound": "tp_estimators:BadBound",
           "tiny-bound": "tp_estimators:TinyBound"}
    return make_distribution(root, "miafw-test-estimators", {"tp_estimators": ESTIMATORS}, {"miafw.estimators": eps})


SMALL_EVAL = ("--dataset", "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6", "--epochs", "3",
              "--targets", "first:2", "-q")


def eval_attacks(tmp_path, *specs):
    """``miafw eval`` with ``specs`` as attacks on a small digits population (300 records, 6 models,
    2 targets), end to end through the CLI; returns ``metrics.json``'s ``attacks`` after checking
    that the run succeeded and scored every attack on every record of both targets."""
    import json

    from click.testing import CliRunner

    from mia_core.cli import main

    args = ["eval", *SMALL_EVAL, "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    for spec in specs:
        args += ["--attack", spec]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    run = next(d for d in (tmp_path / "runs").iterdir() if d.is_dir() and not d.name.startswith("."))
    attacks = json.loads((run / "metrics.json").read_text())["attacks"]
    assert set(attacks) == set(specs)
    for spec in specs:
        assert 0.0 <= attacks[spec]["auc"] <= 1.0
        assert attacks[spec]["n_members"] + attacks[spec]["n_nonmembers"] == 2 * 300
    return attacks
