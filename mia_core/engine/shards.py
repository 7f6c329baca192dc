"""Training a population in shards, on any executor, with the same models as one ensemble.

Model ``m``'s initialisation, batch order and noise come from its own random stream, derived
from the run seed and ``m`` (:func:`~mia_core.engine.trainer.model_seeds`,
:mod:`mia_core.engine.samplers`), and every shard walks the whole population's epoch length, so
models ``a..b`` trained as a shard are the models ``a..b`` of the single ensemble: bitwise with
fixed-size batches, to a few ulps with Poisson batches (a step is padded to the widest batch of
the models trained together, which reorders a float sum; ``tests/engine/test_trainer.py``).

A shard is a :class:`ShardJob` (picklable: the records, the plugin specifications, the recipe, the
seed and the model indices), run by :func:`run_shard` wherever the executor puts it; the client
verifies each returned shard (its models, its keep rows against the ones the seed draws, finite
weights) and stores it in the population cache under its own key, so a run that is killed
resumes from the shards already finished. When every shard is in, the population is assembled
in model order; the caller caches it whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mia_core.data import Records
from mia_core.engine.cache import PopulationCache, cache_key
from mia_core.engine.executors import Executor
from mia_core.engine.population import ModelPopulation, draw_membership
from mia_core.engine.trainer import TrainingRecipe, TrainingResult


def shard_ids(n_models: int, shards: int) -> List[List[int]]:
    """``n_models`` indices in ``shards`` contiguous, nearly equal groups (whole pairs when the
    sizes allow), in order."""
    if not 1 <= shards <= n_models:
        raise ValueError(f"shards must be in [1, {n_models}], got {shards}")
    bounds = np.linspace(0, n_models, shards + 1)
    cuts = [int(round(b)) for b in bounds]
    if n_models % 2 == 0 and n_models // 2 >= shards:  # keep complementary pairs together
        pairs = np.linspace(0, n_models // 2, shards + 1)
        cuts = [2 * int(round(p)) for p in pairs]
    return [list(range(a, b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


@dataclass(frozen=True)
class ShardJob:
    """Everything a worker needs to train models ``model_ids`` of a population.

    Attributes:
        records: the population's records.
        model: ``(name, params)`` of the model family (``("module", {...})``: an import path).
        defenses: ``(name, params)`` of each train-time defense, in order.
        recipe, seed, n_models, reserve, device: as for :meth:`ModelPopulation.train`.
    """

    index: int
    model_ids: Tuple[int, ...]
    records: Records
    model: Tuple[str, Dict[str, Any]]
    defenses: Tuple[Tuple[str, Dict[str, Any]], ...]
    recipe: TrainingRecipe
    seed: int
    n_models: int
    reserve: float
    device: str


def build_family(name: str, params: Dict[str, Any]):
    """A model family from its specification (registered plugin, or ``module`` import path)."""
    from mia_core import registry

    if name == "module":
        from mia_core.engine.audit import ImportedModel

        return ImportedModel(params["path"], params.get("kwargs", {}))
    fam = registry.load("models", name)(**params)
    fam.validate()
    return fam


def run_shard(job: ShardJob) -> Dict[str, Any]:
    """Train one shard (on a worker, or here); returns its state (CPU tensors) and training record."""
    from mia_core import registry

    fam = build_family(*job.model)
    defenses = []
    for name, params in job.defenses:
        d = registry.load("defenses", name)(**params)
        d.validate()
        defenses.append(d)
    r = job.records
    pop = ModelPopulation.train(r, lambda: fam.build(r.n_features, r.n_classes), job.recipe, n_models=job.n_models,
                                seed=job.seed, defenses=defenses, device=torch.device(job.device),
                                reserve=job.reserve, model_ids=job.model_ids)
    return {"index": job.index, "model_ids": list(job.model_ids), "state": pop.state(),
            "training": pop.training.to_dict()}


def merge_training(parts: Sequence[Dict[str, Any]], sizes: Sequence[int]) -> TrainingResult:
    """One :class:`TrainingResult` from the shards': per-epoch losses averaged with the shards'
    model counts as weights (equal to the single ensemble's up to float rounding), the largest
    sampling rate, and the defenses' reports (the first shard's when all agree, else each
    shard's under ``per_shard``)."""
    first = parts[0]
    total = float(sum(sizes))
    losses = [sum(n * p["losses"][e] for n, p in zip(sizes, parts)) / total for e in range(len(first["losses"]))]
    reports = [p.get("defenses", []) for p in parts]
    same = all(json.dumps(r, sort_keys=True, default=str) == json.dumps(reports[0], sort_keys=True, default=str)
               for r in reports)
    defenses = reports[0] if same else [{"per_shard": [r[i] for r in reports]} for i in range(len(reports[0]))]
    return TrainingResult(losses=losses, steps=first["steps"], epochs=first["epochs"],
                          steps_per_epoch=first["steps_per_epoch"],
                          sampling_rate=max(p["sampling_rate"] for p in parts), sampler=first["sampler"],
                          forward=first["forward"], backward=first["backward"],
                          per_sample_gradients=first["per_sample_gradients"], defenses=defenses)


def _shard_population(result: Dict[str, Any], *, records, build, recipe, seed, device, expected_keep: np.ndarray,
                      ids: Sequence[int]) -> ModelPopulation:
    """A returned (or cached) shard, verified: its model indices, keep rows and finite weights."""
    if list(result.get("model_ids", [])) != list(ids):
        raise ValueError(f"shard holds models {result.get('model_ids')}, expected {list(ids)}")
    pop = ModelPopulation.from_state(result["state"], records=records, build=build, recipe=recipe, seed=seed,
                                     device=device)
    if pop.keep.shape != expected_keep.shape or not np.array_equal(pop.keep, expected_keep):
        raise ValueError(f"shard of models {ids[0]}-{ids[-1]} has a keep matrix the seed does not draw")
    for name, p in pop.params.items():
        if not torch.isfinite(p).all():
            raise ValueError(f"shard of models {ids[0]}-{ids[-1]} holds non-finite weights in {name!r}")
    return pop


def train_sharded(*, records: Records, model: Tuple[str, Dict[str, Any]], build: Callable[[], torch.nn.Module],
                  defenses: Sequence[Tuple[str, Dict[str, Any]]], defense_plugins: Sequence[Any],
                  recipe: TrainingRecipe, n_models: int, seed: int, reserve: float, device: torch.device,
                  shards: int, executor: Executor, cache: Optional[PopulationCache] = None,
                  population_key: str = "", on_shard: Optional[Callable[[int, bool], None]] = None,
                  on_plan: Optional[Callable[[int, int], None]] = None) -> ModelPopulation:
    """Train ``n_models`` models in ``shards`` shards on ``executor`` and assemble the population.

    Shards already in ``cache`` (under ``population_key`` and their model indices) are loaded, not
    retrained; each shard trained is stored there as soon as it returns. ``on_plan(cached, total)``
    is called once before any training; ``on_shard(i, cached)`` once per shard as it is ready.
    """
    keep, reserved = draw_membership(n_records=records.n, n_models=n_models, seed=seed, reserve=reserve)
    groups = shard_ids(n_models, shards)
    cache = cache or PopulationCache(None)
    ready: Dict[int, ModelPopulation] = {}
    parts: Dict[int, Dict[str, Any]] = {}
    keys = [cache_key({"kind": "shard", "population": population_key, "model_ids": ids}) for ids in groups]

    def accept(i: int, result: Dict[str, Any], cached: bool) -> None:
        ids = groups[i]
        ready[i] = _shard_population(result, records=records, build=build, recipe=recipe, seed=seed, device=device,
                                     expected_keep=keep[ids], ids=ids)
        parts[i] = result["training"]
        if not cached:
            cache.store(keys[i], result["state"], {"kind": "shard", "population": population_key, "model_ids": ids,
                                                   "training": result["training"]})
        if on_shard is not None:
            on_shard(i, cached)

    jobs = []
    for i, ids in enumerate(groups):
        entry = cache.load(keys[i]) if population_key else None
        if entry is not None:
            state, meta = entry
            try:
                accept(i, {"model_ids": meta["model_ids"], "state": state, "training": meta["training"]}, True)
                continue
            except (KeyError, ValueError, TypeError):
                ready.pop(i, None)
        jobs.append(ShardJob(index=i, model_ids=tuple(ids), records=records, model=model, defenses=tuple(defenses),
                             recipe=recipe, seed=seed, n_models=n_models, reserve=reserve, device=str(device)))
    if on_plan is not None:
        on_plan(len(groups) - len(jobs), len(groups))
    if jobs:
        executor.map(run_shard, jobs, on_done=lambda j, result: accept(jobs[j].index, result, False))
    shards_in_order = [ready[i] for i in range(len(groups))]
    pop = ModelPopulation.concat(shards_in_order, training=merge_training([parts[i] for i in range(len(groups))],
                                                                          [len(g) for g in groups]))
    pop.train_defenses = tuple(defense_plugins)
    if reserved is not None and pop.reserved is None:
        pop.reserved = reserved
    return pop


def forget_shards(cache: PopulationCache, population_key: str, n_models: int, shards: int) -> None:
    """Remove the shard entries of a population once it is cached whole."""
    if not cache.enabled:
        return
    for ids in shard_ids(n_models, shards):
        cache.remove(cache_key({"kind": "shard", "population": population_key, "model_ids": ids}))


__all__ = ["ShardJob", "build_family", "forget_shards", "merge_training", "run_shard", "shard_ids", "train_sharded"]
