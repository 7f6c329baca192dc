"""The evaluation engine: populations, their training, signals, the cache and the stages.

The public door for running an evaluation is :func:`mia_core.evaluate` (see
:mod:`mia_core.engine.stages`); this package also exports the pieces plugins and tests use:
the contexts handed to plugins, :class:`ModelPopulation`, the trainer and its recipe.
"""

from mia_core.engine.contexts import (
    AccessError,
    AttackContext,
    DefenseContext,
    EstimatorContext,
    SignalContext,
    TargetView,
)
from mia_core.engine.population import ModelPopulation
from mia_core.engine.signals import SIGNAL_ACCESS, Signals, compute_signals
from mia_core.engine.trainer import TrainingRecipe

__all__ = [
    "AccessError",
    "AttackContext",
    "DefenseContext",
    "EstimatorContext",
    "ModelPopulation",
    "SIGNAL_ACCESS",
    "SignalContext",
    "Signals",
    "TargetView",
    "TrainingRecipe",
    "compute_signals",
]
