"""Shared fixtures: every test is seeded and uses a private cache and run directory."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_isolate(tmp_path, monkeypatch):
    np.random.seed(0)
    torch.manual_seed(0)
    monkeypatch.setenv("MIAFW_CACHE", str(tmp_path / "cache"))
    yield
