"""The JSON Schema of ``metrics.json``, shipped with the package, and a validator for it.

``mia_core/schemas/metrics.schema.json`` (JSON Schema draft 2020-12) describes the document every
run writes as ``metrics.json`` (:func:`mia_core.engine.stages.compute_metrics`, plus the
``audit`` section of :func:`mia_core.engine.audit.run_audit_stages`), at
:data:`mia_core.results.SCHEMA_VERSION`. ``docs/metrics-schema.md`` is its readable reference.

Validation needs the ``jsonschema`` package, a test dependency rather than a runtime one: it is
imported only when :func:`validate_metrics` is called.

Example::

    import json
    from mia_core.schema import validate_metrics

    validate_metrics(json.load(open("runs/20260101-120000-abcd1234/metrics.json")))
"""

from __future__ import annotations

import functools
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Dict

#: The schema file next to this module (``mia_core/schemas/metrics.schema.json``).
SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "metrics.schema.json"

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_MESSAGE = 200


@functools.lru_cache(maxsize=None)
def _schema_text(name: str = "metrics") -> str:
    return resources.files("mia_core").joinpath("schemas").joinpath(f"{name}.schema.json").read_text(encoding="utf-8")


def load_schema(name: str = "metrics") -> Dict[str, Any]:
    """The ``metrics.json`` schema of eval and audit runs (``name="metrics"``) or of unlearn runs
    (``"unlearn"``) as a dict (a fresh copy on every call: changing it changes nothing for later
    callers)."""
    return json.loads(_schema_text(name))


@functools.lru_cache(maxsize=None)
def _validator(name: str = "metrics"):
    try:
        import jsonschema
    except ImportError:
        raise ImportError("validating metrics.json needs the 'jsonschema' package (a test dependency of miafw, "
                          "not a runtime one): pip install jsonschema") from None
    return jsonschema.Draft202012Validator(load_schema(name))


def _json_path(parts) -> str:
    """A JSON path such as ``$.attacks['lira:online=false'].tpr_at_fpr['0.001']`` for the keys and
    indices ``parts`` (``$`` is the document itself)."""
    out = "$"
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _IDENTIFIER.match(str(p)):
            out += f".{p}"
        else:
            out += "['" + str(p).replace("\\", "\\\\").replace("'", "\\'") + "']"
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _describe(error) -> str:
    """One line saying where ``error`` (a ``jsonschema.ValidationError``) is and what is wrong."""
    parts = list(error.absolute_path)
    kind, expected, instance = error.validator, error.validator_value, error.instance
    if kind == "required" and isinstance(instance, dict):
        missing = next((k for k in expected if k not in instance), None)
        if missing is not None:
            return f"{_json_path(parts + [missing])}: required key missing"
    if kind == "type":
        wanted = " or ".join(expected) if isinstance(expected, list) else expected
        return f"{_json_path(parts)}: expected {wanted}, got {_json_type(instance)}"
    if kind == "const":
        return f"{_json_path(parts)}: expected {json.dumps(expected)}, got {_short(instance)}"
    if kind == "not" and expected == {}:  # a key forbidden here (e.g. *_mse keys in a classification run)
        return f"{_json_path(parts)}: key not allowed here"
    if kind is None and error.schema is False:
        return f"{_json_path(parts)}: value not allowed here"
    message = " ".join(str(error.message).split())
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return f"{_json_path(parts)}: {message}"


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def validate_metrics(doc: Any) -> None:
    """Check a ``metrics.json`` document (the parsed JSON) against the schema.

    Args:
        doc: the document, e.g. ``json.load(open(run_dir / "metrics.json"))`` or
            ``mia_core.evaluate(...).metrics``.

    Raises:
        ValueError: one line naming the JSON path of the most relevant error and what is wrong,
            e.g. ``metrics.json does not match schema version 2: $.attacks.lira.auc: 1.5 is
            greater than the maximum of 1``.
        ImportError: ``jsonschema`` is not installed.
    """
    _validate(doc, "metrics")


def validate_unlearn_metrics(doc: Any) -> None:
    """Check the ``metrics.json`` of a ``miafw unlearn`` run against
    ``mia_core/schemas/unlearn.schema.json`` (raises as :func:`validate_metrics`)."""
    _validate(doc, "unlearn")


def _validate(doc: Any, name: str) -> None:
    validator = _validator(name)  # raises the ImportError first when jsonschema is missing
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(doc))
    if error is not None:
        version = load_schema(name)["properties"]["schema_version"]["const"]
        what = "metrics.json" if name == "metrics" else f"{name} metrics.json"
        raise ValueError(f"{what} does not match schema version {version}: {_describe(error)}")


__all__ = ["SCHEMA_PATH", "load_schema", "validate_metrics", "validate_unlearn_metrics"]
