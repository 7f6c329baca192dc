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
