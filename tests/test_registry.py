"""Plugin discovery: metadata-only listing, loading by name, unknown and broken plugins."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mia_core import registry
from plugin_fixtures import third_party


@pytest.fixture
def with_third_party(tmp_path, monkeypatch):
    root = third_party(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    registry.refresh()
    yield root
    registry.refresh()


def test_builtins_are_registered_through_entry_points():
    assert {"lira", "loss"} <= set(registry.names("attacks"))
    assert "prune" in registry.names("defenses")
    assert {"digits", "breast-cancer"} <= set(registry.names("datasets"))
    assert {"mlp", "logreg"} <= set(registry.names("models"))


def test_names_do_not_import_plugins():
    code = (
        "import sys; from mia_core import registry; "
        "n = registry.names('attacks'); "
        "bad = [m for m in sys.modules if m.startswith('mia_plugins.')]; "
        "print(n, bad); assert 'lira' in n and not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_by_name():
    from mia_plugins.attacks.lira import LiRA

    assert registry.load("attacks", "lira") is LiRA


def test_unknown_name_lists_valid_and_suggests():
    with pytest.raises(registry.UnknownPluginError) as info:
        registry.load("attacks", "lirra")
    msg = str(info.value)
    assert "unknown attack 'lirra'" in msg and "Did you mean 'lira'?" in msg and "loss" in msg


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown plugin kind 'attack'"):
        registry.names("attack")


def test_broken_plugin_is_isolated(with_third_party):
    infos = {i.name: i for i in registry.inspect_group("attacks")}
    assert infos["broken"].status == "broken"
    assert "libfoo" in infos["broken"].error
    assert infos["future"].status == "incompatible" and "99.0" in infos["future"].error
    assert infos["plain"].status == "incompatible" and "not a subclass" in infos["plain"].error
    # every other plugin keeps working
    assert infos["tp-confidence"].status == "ok" and infos["tp-confidence"].distribution == "miafw-testplugins"
    assert infos["lira"].status == "ok"
    with pytest.raises(registry.BrokenPluginError, match="libfoo"):
        registry.load("attacks", "broken")
    with pytest.raises(registry.BrokenPluginError, match="incompatible"):
        registry.load("attacks", "future")
    assert registry.load("attacks", "tp-confidence").__name__ == "Confidence"
