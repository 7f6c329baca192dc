"""Make the example importable from its source tree when it is not installed.

The package's parent directory (``examples/miafw-plugin-example``) goes first on ``sys.path``,
so these tests always exercise the source next to them, installed copy or not.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
