"""miafw core: contracts, registry, model populations, metrics, kernels and the CLI.

Membership-inference evaluation framework. Members are always the positive class and every
attack score is oriented so that higher means "more likely a member".
"""

__version__ = "0.1.0"

#: Version of the plugin API (the contracts in :mod:`mia_core.base`). Plugins declare the
#: version they target; the major number must match.
API_VERSION = "1.0"

#: The public Python API, imported on first use so that ``import mia_core`` (which every plugin
#: does) stays light.
_LAZY = {"evaluate": "mia_core.engine.stages", "EvalConfig": "mia_core.engine.stages",
         "Evaluation": "mia_core.engine.stages", "TrainingRecipe": "mia_core.engine.trainer",
         "audit": "mia_core.engine.audit", "AuditConfig": "mia_core.engine.audit",
         "unlearn": "mia_core.engine.unlearn", "UnlearnConfig": "mia_core.engine.unlearn"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mia_core' has no attribute {name!r}")


__all__ = ["__version__", "API_VERSION", "AuditConfig", "EvalConfig", "Evaluation", "TrainingRecipe", "UnlearnConfig",
           "audit", "evaluate", "unlearn"]
