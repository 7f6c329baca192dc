"""miafw core: contracts, registry, model populations, metrics, kernels and the CLI.

Membership-inference evaluation framework. Members are always the positive class and every
attack score is oriented so that higher means "more likely a member".
"""

__version__ = "0.1.0"

#: Version of the plugin API (the contracts in :mod:`mia_core.base`). Plugins declare the
#: version they target; the major number must match.
API_VERSION = "1.0"

__all__ = ["__version__", "API_VERSION"]
