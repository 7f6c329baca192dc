"""The verified population cache: every file checksummed, every load verified, damage never used."""

from __future__ import annotations

import json

import pytest

import mia_core
from mia_core.engine.cache import CHECKSUM_FILE, ENTRY_FILE, META_FILE, PopulationCache, verify_entry
from mia_core.engine.stages import EvalConfig
from mia_core.engine.trainer import TrainingRecipe

SMALL = dict(dataset="digits:n_records=300", model="mlp:width=32", n_models=6, targets="first:2",
             recipe=TrainingRecipe(epochs=8), attacks=("lira", "loss"))


def _entry(cache_dir):
    (entry,) = (cache_dir / "populations").iterdir()
    return entry


def _flip_byte(path, at=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage,problem", [
    (lambda e: _flip_byte(e / ENTRY_FILE), "population.pt does not match its checksum"),
    (lambda e: _flip_byte(e / ENTRY_FILE, at=0.99), "population.pt does not match its checksum"),
    (lambda e: (e / META_FILE).write_text("{not json"), "meta.json does not match its checksum"),
    (lambda e: (e / META_FILE).write_text(json.dumps({"n_models": 4})), "meta.json does not match its checksum"),
    (lambda e: (e / CHECKSUM_FILE).unlink(), "no checksums.json"),
    (lambda e: (e / CHECKSUM_FILE).write_text("[]"), "does not list"),
])
def test_a_damaged_entry_is_reported_and_retrained_never_used(tmp_path, damage, problem):
    first = mia_core.evaluate(EvalConfig(**SMALL), cache=tmp_path / "cache")
    entry = _entry(tmp_path / "cache")
    assert verify_entry(entry) is None
    damage(entry)
    assert problem in verify_entry(entry)
    with pytest.warns(UserWarning, match=f"cache entry {entry.name[:12]} is damaged \\(.*{problem}"):
        second = mia_core.evaluate(EvalConfig(**SMALL), cache=tmp_path / "cache")
    assert second.metrics == first.metrics  # retrained: the damaged weights were never evaluated
    assert verify_entry(entry) is None  # and the entry was replaced by a sound one


def test_entries_lists_sizes_and_problems(tmp_path):
    cache = PopulationCache(tmp_path / "cache")
    assert cache.entries() == []
    mia_core.evaluate(EvalConfig(**SMALL), cache=cache)
    (e,) = cache.entries()
    assert e.problem is None and e.size > 0 and e.meta["n_models"] == 6
    _flip_byte(e.path / ENTRY_FILE)
    assert cache.entries()[0].problem == "population.pt does not match its checksum"
    cache.remove(e.key)
    assert cache.entries() == []
