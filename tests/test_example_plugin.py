"""The example third-party distribution (examples/miafw-plugin-example), installed for real.

The example is built and installed with pip into a temporary directory (no index, no network,
no dependencies), then used the way a user would: through ``PYTHONPATH`` by the ``miafw``
command line, and in-process after :func:`mia_core.registry.refresh`.

pip builds in the source tree (``build/``, ``*.egg-info``), so the example is copied into the
temporary directory first and installed from the copy: the repository is never written to, and
concurrent test runs cannot trip over each other's build directories.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mia_core import registry
from mia_core.testing import check_attack, check_defense

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "miafw-plugin-example"
DIST, VERSION, PACKAGE = "miafw-plugin-example", "0.1.0", "miafw_plugin_example"
TIMEOUT = 180


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(site, tmp)``: the example installed with pip into ``tmp/site``."""
    if importlib.util.find_spec("pip") is None:
        pytest.skip(f"pip is not available in {sys.executable}; cannot install the example distribution")
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools (the example's build backend, needed with --no-build-isolation) is not installed")
    tmp = tmp_path_factory.mktemp("example_plugin")
    src = tmp / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))
    site = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check", "--no-cache-dir",
           "--no-input", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp)
    if proc.returncode != 0:
        pytest.fail(f"pip could not install {EXAMPLE}:\n{proc.stdout}\n{proc.stderr}", pytrace=False)
    assert (site / f"{PACKAGE}-{VERSION}.dist-info" / "entry_points.txt").is_file()
    return site, tmp


def _miafw(installed, *args):
    """Run ``python -m mia_core.cli *args`` with the installed example on ``PYTHONPATH``."""
    site, tmp = installed
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    env["XDG_CACHE_HOME"] = str(tmp / "xdg-cache")  # stevedore's on-disk entry-point cache stays private
    return subprocess.run([sys.executable, "-m", "mia_core.cli", *args], capture_output=True, text=True,
                          env=env, cwd=tmp, timeout=TIMEOUT)


@pytest.mark.parametrize("kind, name, target", [
    ("attacks", "demo-mentr", "miafw_plugin_example.mentr:Mentr"),
    ("defenses", "temperature", "miafw_plugin_example.temperature:Temperature"),
])
def test_list_shows_the_installed_plugin(installed, kind, name, target):
    proc = _miafw(installed, "list", "-v", "--kind", kind)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "could not be used" not in proc.stderr, proc.stderr
    lines = proc.stdout.splitlines()
    rows = [i for i, line in enumerate(lines) if line.split()[:1] == [name]]
    assert len(rows) == 1, proc.stdout
    row, detail = lines[rows[0]], lines[rows[0] + 1]
    assert not re.search(r"\[(BROKEN|INCOMPATIBLE)\]", row), row
    assert f"from {DIST} {VERSION}; api 1.0; entry point {target}" in detail, proc.stdout
    assert "from miafw " in proc.stdout  # the built-ins are still listed next to it


@pytest.mark.slow
def test_eval_runs_the_installed_plugins(installed):
    _, tmp = installed
    out, cache = tmp / "runs", tmp / "cache"
    proc = _miafw(installed, "eval", "--attack", "demo-mentr", "--defense", "temperature:T=4",
                  "--dataset", "digits:n_records=300", "--model", "mlp:width=32", "--n-models", "6",
                  "--epochs", "8", "--targets", "first:2", "-q", "--out", str(out), "--cache-dir", str(cache))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^demo-mentr\s+\d\.\d{3}\s", proc.stdout, re.M), proc.stdout
    assert "defense temperature" in proc.stdout, proc.stdout
    found = re.search(r"^run directory: (.+)$", proc.stdout, re.M)
    assert found, proc.stdout
    run = Path(found.group(1).strip())
    assert run.parent == out
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["attacks"]) == {"demo-mentr"}
    mentr = m["attacks"]["demo-mentr"]
    assert mentr["name"] == "demo-mentr" and 0.0 <= mentr["auc"] <= 1.0
    assert mentr["n_members"] + mentr["n_nonmembers"] == 2 * 300
    assert len(m["defenses"]) == 1
    defense = m["defenses"][0]
    assert defense["name"] == "temperature" and defense["params"] == {"T": 4.0}
    assert defense["report"] == {"T": 4.0, "layer": "2", "scaled_parameters": ["2.weight", "2.bias"]}
    # dividing the logits by T keeps every prediction, so the accuracy is exactly unchanged
    target = m["target"]
    assert target["train_accuracy"] == target["undefended_train_accuracy"]
    assert target["test_accuracy"] == target["undefended_test_accuracy"]


@pytest.fixture
def fresh_modules(monkeypatch):
    """Import the example from scratch in this test and forget it afterwards."""
    for mod in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        monkeypatch.delitem(sys.modules, mod)  # restored when monkeypatch undoes
    yield
    for mod in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[mod]


def test_refresh_makes_a_plugin_added_at_run_time_visible(installed, monkeypatch, fresh_modules):
    site, _ = installed
    registry.refresh()
    # scan both groups before the plugin appears (stevedore caches each group on first use)
    if "demo-mentr" in registry.names("attacks") or "temperature" in registry.names("defenses"):
        pytest.skip(f"{DIST} is installed in this environment, so it is visible without the test's copy")
    try:
        monkeypatch.syspath_prepend(str(site))
        # stevedore keeps the entry points it scanned above, per group, for the process's lifetime
        assert "demo-mentr" not in registry.names("attacks")
        assert "temperature" not in registry.names("defenses")
        registry.refresh()
        assert "demo-mentr" in registry.names("attacks")
        assert "temperature" in registry.names("defenses")
    finally:
        registry.refresh()  # the next lookup rescans with the restored sys.path


def test_installed_plugins_pass_the_conformance_kit(installed, monkeypatch, fresh_modules):
    site, _ = installed
    monkeypatch.syspath_prepend(str(site))
    registry.refresh()
    try:
        attack = registry.load("attacks", "demo-mentr")
        defense = registry.load("defenses", "temperature")
        for cls in (attack, defense):
            assert Path(inspect.getfile(cls)).resolve().is_relative_to(site.resolve()), inspect.getfile(cls)
        infos = {i.name: i for i in registry.inspect_group("attacks")}
        assert infos["demo-mentr"].status == "ok"
        assert (infos["demo-mentr"].distribution, infos["demo-mentr"].version) == (DIST, VERSION)
        report = check_attack(attack)
        assert report["auc"] > 0.8 and report["params"] == {"eps": 1e-12}
        assert check_defense(defense) == {"T": 2.0, "layer": "2", "scaled_parameters": ["2.weight", "2.bias"]}
        check_defense(defense, params={"T": 4.0})
    finally:
        registry.refresh()
