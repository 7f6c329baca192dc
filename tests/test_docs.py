"""The plugin examples printed in the README and docs/plugins.md really work."""

from __future__ import annotations

import re
import types
from pathlib import Path

from mia_core.testing import check_attack

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path: Path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def _module_from(code: str, name: str):
    mod = types.ModuleType(name)
    exec(compile(code, f"<{name}>", "exec"), mod.__dict__)
    return mod


def test_docs_minimal_attack_passes_the_kit():
    block = next(b for b in _python_blocks(ROOT / "docs" / "plugins.md") if "class LossGap" in b)
    mod = _module_from(block, "miafw_gap")
    assert check_attack(mod.LossGap)["auc"] > 0.6
    check_attack(mod.LossGap, params={"shrink": 0.5})


def test_readme_attack_passes_the_kit():
    block = next(b for b in _python_blocks(ROOT / "README.md") if "class ConfidenceThreshold" in b)
    mod = _module_from(block, "my_attack")
    check_attack(mod.ConfidenceThreshold)


def test_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    """The README's `mia_core.evaluate` example, on a smaller population (same code path)."""
    block = next(b for b in _python_blocks(ROOT / "README.md") if "mia_core.evaluate(" in b)
    small = 'dataset="digits:n_records=300", model="mlp:width=32", n_models=6, targets="first:2", '
    code = block.replace("mia_core.EvalConfig(", "mia_core.EvalConfig(" + small, 1)
    code = code.replace('"~/.cache/miafw"', repr(str(tmp_path / "cache")))
    assert code != block
    monkeypatch.chdir(tmp_path)
    _module_from(code, "readme_api")
    out = capsys.readouterr().out
    assert "LiRA AUC" in out and "(2, 300) (2, 300)" in out and "runs/" in out


def test_docs_train_time_defense_passes_the_kit():
    from mia_core.testing import check_defense

    block = next(b for b in _python_blocks(ROOT / "docs" / "plugins.md") if "class GradientNoise" in b)
    mod = _module_from(block, "miafw_noise")
    rep = check_defense(mod.GradientNoise)
    assert rep["sigma"] == 0.1 and rep["noisy_steps"] > 0
