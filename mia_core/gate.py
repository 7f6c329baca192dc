"""Release gates: ``--budget`` limits on every attack's leakage, checked against the upper end of
each interval, so a gate passes only when the evidence says the leakage is within the limit.

A budget is ``METRIC<=LIMIT`` (or ``<``) with METRIC one of

``auc``          the AUC; checked: the upper end of its bootstrap interval;
``advantage``    max TPR - FPR; checked: the upper end of its bootstrap interval;
``tpr@P%``       the TPR at P% FPR (e.g. ``tpr@0.1%``); checked: the upper end of its
                 Clopper-Pearson interval. A TPR backed by fewer than 100/P non-members cannot be
                 resolved and fails the gate (the evidence cannot say it is within the limit).

and LIMIT a number in [0, 1]. Every attack must meet every budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from mia_core.metrics import _fpr_key  # the key summarize() files each TPR under
from mia_core.params import ParamError

_PATTERN = re.compile(r"^\s*(auc|advantage|tpr@([0-9]*\.?[0-9]+)%)\s*(<=|<)\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*$")
_FORMAT = "expected auc<=X, advantage<=X or tpr@P%<=X with X in [0, 1] (e.g. --budget tpr@0.1%<=0.005)"


@dataclass(frozen=True)
class Budget:
    """One parsed budget: ``metric`` (``auc``, ``advantage`` or ``tpr``), ``fpr`` (for ``tpr``),
    ``limit`` and whether the comparison is ``strict`` (``<``)."""

    text: str
    metric: str
    fpr: Optional[float]
    limit: float
    strict: bool

    def allows(self, value: float) -> bool:
        return value < self.limit if self.strict else value <= self.limit


def parse_budget(text: str) -> Budget:
    """Parse ``auc<=0.55``, ``advantage<0.1``, ``tpr@0.1%<=0.005``.

    Raises:
        ParamError: one line naming the bad budget and what is allowed.
    """
    m = _PATTERN.match(str(text))
    if not m:
        raise ParamError(f"--budget {text!r}: {_FORMAT}")
    name, pct, op, limit = m.group(1), m.group(2), m.group(3), float(m.group(4))
    if not 0.0 <= limit <= 1.0:
        raise ParamError(f"--budget {text!r}: the limit must be in [0, 1], got {limit:g}")
    fpr = None
    if pct is not None:
        fpr = float(pct) / 100.0
        if not 0.0 < fpr < 1.0:
            raise ParamError(f"--budget {text!r}: the FPR must be in (0%, 100%), got {pct}%")
        name = "tpr"
    return Budget(text=str(text).strip(), metric=name, fpr=fpr, limit=limit, strict=op == "<")


def parse_budgets(texts: Sequence[str]) -> List[Budget]:
    return [parse_budget(t) for t in texts]


def check_budgets(attacks: Dict[str, Dict[str, Any]], budgets: Sequence[Budget]) -> Dict[str, Any]:
    """Check every attack's metrics (``metrics.json``'s ``attacks``) against every budget.

    Returns:
        ``{"passed": bool, "checks": [{"attack", "budget", "checked", "value", "limit", "passed",
        "why"}]}``: ``checked`` names the quantity compared with the limit (an interval's upper end).
    """
    checks = []
    for label, m in attacks.items():
        for b in budgets:
            why = ""
            if b.metric == "auc":
                value, what = (m.get("auc_ci") or [float("nan")] * 2)[1], "upper end of the AUC's 95% interval"
            elif b.metric == "advantage":
                value, what = (m.get("advantage_ci") or [float("nan")] * 2)[1], \
                    "upper end of the advantage's 95% interval"
            else:
                t = m["tpr_at_fpr"][_fpr_key(b.fpr)]
                value, what = t["ci_high"], f"upper end of the TPR's interval at {100 * b.fpr:g}% FPR"
                if not t["resolvable"]:
                    why = (f"only {t['n_nonmembers']} non-members: {100 * b.fpr:g}% FPR cannot be resolved, so "
                           f"the budget cannot be shown to hold")
            ok = not why and value == value and b.allows(value)  # nan (no interval) never passes
            checks.append({"attack": label, "budget": b.text, "checked": what, "value": value, "limit": b.limit,
                           "passed": bool(ok), "why": why})
    return {"passed": all(c["passed"] for c in checks), "checks": checks}


def violations(report: Dict[str, Any]) -> List[str]:
    """One line per broken budget, for the terminal."""
    out = []
    for c in report["checks"]:
        if not c["passed"]:
            reason = c["why"] or f"{c['checked']} is {c['value']:.4g}, over the limit {c['limit']:g}"
            out.append(f"budget {c['budget']!r} broken by attack {c['attack']!r}: {reason}")
    return out


__all__ = ["Budget", "check_budgets", "parse_budget", "parse_budgets", "violations"]
