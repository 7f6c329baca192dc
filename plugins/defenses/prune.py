"""Magnitude pruning after training, with optional mask-preserving fine-tuning and Wang et al.'s
MIA-Pruning search over the sparsity (scored by an attack on held-out models)."""

from __future__ import annotations

import math
from typing import Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch

from mia_core import kernels
from mia_core.base import Defense
from mia_core.engine.probe import check_probe, load_attack, models_needed, probe


def magnitude_masks(weights: List[torch.Tensor], sparsity: float, *, scope: str) -> List[torch.Tensor]:
    """Keep-masks that zero the smallest-magnitude weights of every model.

    A thin wrapper over :func:`mia_core.kernels.magnitude_masks` with ``stacked=True`` (native
    O(n) selection, bit-identical to the stable-argsort reference
    :func:`mia_core.kernels.magnitude_masks_reference`).

    Args:
        weights: stacked tensors ``[M, ...]``, one per prunable parameter.
        sparsity: fraction in ``[0, 1)`` of the weights to remove, per model.
        scope: ``"global"`` ranks all of a model's prunable weights together (one threshold per
            model); ``"layer"`` prunes each tensor of each model to ``sparsity`` on its own.

    Returns:
        bool masks with the shapes of ``weights`` (True = kept). Exactly
        ``round(sparsity * count)`` weights are removed per model (per tensor for ``layer``);
        magnitude ties are broken by position (lower position removed first) and NaN counts as
        the largest magnitude, so the result is deterministic.
    """
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    return kernels.magnitude_masks(
        weights, sparsity, scope="global" if scope == "global" else "tensor", stacked=True
    )


#: Selection rules of the search (see :func:`select_point`).
SELECT_RULES = ("least-leaking", "sparsest")
#: Leakage measures the search minimises with ``select=least-leaking``.
LEAKAGE_MEASURES = ("advantage", "auc")
#: Slack on the accuracy budget, so a drop that equals the budget up to float rounding (accuracy
#: is a ratio of counts) is within it.
BUDGET_SLACK = 1e-9


def parse_grid(text: str) -> Tuple[float, ...]:
    """The search grid: ``"0.5,0.8,0.9"`` -> ``(0.5, 0.8, 0.9)``.

    Args:
        text: comma-separated sparsities, each in ``[0, 1)``, distinct (any order; spaces allowed).

    Returns:
        the sparsities in increasing order.

    Raises:
        ValueError: an empty list, a value that is not a number in ``[0, 1)``, or a repeated one.
    """
    if not isinstance(text, str):
        raise ValueError(f"grid must be a string of comma-separated sparsities in [0, 1), got {text!r}")
    items = [t.strip() for t in text.split(",")]
    if not any(items):
        raise ValueError(f"grid must list at least one sparsity in [0, 1), got {text!r}")
    out = []
    for t in items:
        try:
            v = float(t)
        except ValueError:
            v = float("nan")
        if not (0.0 <= v < 1.0):
            raise ValueError(f"grid must be comma-separated sparsities in [0, 1) (quote it on the command line: "
                             f"grid=\"0.5,0.9\"), got {t!r} in {text!r}")
        out.append(v)
    if len(set(out)) != len(out):
        raise ValueError(f"grid lists a sparsity twice: {text!r}")
    return tuple(sorted(out))


def select_point(*, sparsity: Sequence[float], accuracy_drop: Sequence[float], leakage: Sequence[float],
                 budget: float, rule: str) -> Optional[int]:
    """The grid point MIA-Pruning keeps (Wang et al. 2021, Sec. 4.1 and Algorithm 1, line 14).

    Only points whose test-accuracy drop is at most ``budget`` (plus :data:`BUDGET_SLACK`) are
    candidates. Among them:

    * ``least-leaking`` — the paper's rule: "choose n_i that can achieve the minimum
      G_f(f_A*)" (line 14: ``min(G_f(f_A))``), with the attack's leakage standing in for the gain;
      equal leakage goes to the sparser point (the paper's other objective, fewer weights).
    * ``sparsest`` — the largest sparsity (compression first, as Han et al. prune "as much as
      accuracy allows"; leakage is reported, not used).

    Args:
        sparsity, accuracy_drop, leakage: float ``[G]``, one entry per grid point; sparsities distinct.
        budget: the largest allowed accuracy drop (absolute).
        rule: ``"least-leaking"`` or ``"sparsest"``.

    Returns:
        the chosen point's index, or ``None`` when no point is within the budget (the caller then
        leaves the models unpruned: pruning past the budget is what the user ruled out).

    Raises:
        ValueError: unequal lengths, an unknown rule, or a NaN.
    """
    s = np.asarray(sparsity, dtype=np.float64)
    d = np.asarray(accuracy_drop, dtype=np.float64)
    g = np.asarray(leakage, dtype=np.float64)
    if not (s.shape == d.shape == g.shape) or s.ndim != 1:
        raise ValueError(f"sparsity, accuracy_drop and leakage must be 1-D of one length, got "
                         f"{s.shape}, {d.shape}, {g.shape}")
    if rule not in SELECT_RULES:
        raise ValueError(f"rule must be one of {', '.join(SELECT_RULES)}, got {rule!r}")
    if np.isnan(s).any() or np.isnan(d).any() or np.isnan(g).any():
        raise ValueError("select_point got NaN")
    ok = np.flatnonzero(d <= budget + BUDGET_SLACK)
    if ok.size == 0:
        return None
    if rule == "sparsest":
        return int(ok[np.argmax(s[ok])])
    # lexicographic (leakage ascending, sparsity descending); sparsities are distinct, so unique
    best = min(ok.tolist(), key=lambda i: (g[i], -s[i]))
    return int(best)


def search_models(n_models: int, requested: Optional[int], need: int) -> np.ndarray:
    """The models the search probes: the last ``S`` of the population (whole pairs).

    Args:
        n_models: ``M`` (even).
        requested: ``S`` as given (even, >= 2), or ``None``: half the population rounded up to
            whole pairs, and at least ``need``.
        need: the fewest models the search attack can score (its references plus the target's pair).

    Returns:
        int64 ``[S]``: ``M - S .. M - 1``.

    Raises:
        ValueError: ``S`` larger than the population, or too small for the attack.
    """
    if requested is None:
        s = max(2 * math.ceil(n_models / 4), need)
        if s > n_models:
            raise ValueError(f"the search attack needs a population of at least {need} models, the population "
                             f"has {n_models}; use a lighter search_attack or more --n-models")
    else:
        s = int(requested)
        if s > n_models:
            raise ValueError(f"search_models={s} exceeds the population's {n_models} models")
        if s < need:
            raise ValueError(f"search_models={s} is too few for the search attack, which needs at least {need} "
                             f"models (its reference models besides the target's pair)")
    return np.arange(n_models - s, n_models, dtype=np.int64)


class Prune(Defense):
    """Magnitude pruning of every model after training (Han, Pool, Tran, Dally, NeurIPS 2015),
    the defense Wang et al. evaluate against membership inference (IJCAI 2021, "Against
    Membership Inference Attack: Pruning is All You Need", eq. 6: g(x) uses P_i ⊙ W_i, a binary
    mask P_i per layer), optionally with their MIA-Pruning search over the sparsity (Algorithm 1).

    The smallest-magnitude weights of each model are set to zero so that a fraction
    ``sparsity`` of its prunable weights is removed; with ``finetune_epochs > 0`` every model
    then continues training on its own training half while the mask is re-applied after each
    step, so pruned weights stay zero.

    **MIA-Pruning search** (``search=true``; Wang et al., Sec. 4.1 and Algorithm 1). For every
    sparsity of ``grid`` the models are pruned from the same trained weights and fine-tuned with
    the mask (lines 2-10), the attack ``search_attack`` is fitted to and scored against the pruned
    models (lines 5 and 11: the adversary's gain at that point), and one point is kept (line 14).
    The paper keeps the point of least gain, "choose n_i that can achieve the minimum
    G_f(f_A*)" (``select=least-leaking``, the default); ``select=sparsest`` keeps the sparsest
    point instead. Either way a candidate may lose at most ``accuracy_budget`` of test accuracy
    against the unpruned models (the paper only asks for "competitive accuracy"). The chosen
    point's weights, exactly as scored, become the population's (not re-pruned). If no point is
    within the budget the models are left as trained, unpruned: pruning past the budget is what
    the budget rules out (the report says so, with the smallest drop seen).

    Deviations from the paper: one sparsity per point (``scope=global``: one magnitude threshold
    per model, from which the per-layer n_i follow; ``layer``: every layer at that fraction), not
    per-layer cardinalities searched jointly; magnitude pruning with masked fine-tuning, not ADMM;
    leakage measured as the attack's pooled membership advantage ``max(TPR - FPR)`` (the paper's
    attack accuracy on balanced members and non-members is ``(1 + advantage) / 2``, so both rank
    points alike) or AUC, not the log-likelihood gain of eq. 1, since miafw's attacks return
    scores, not calibrated probabilities; the attack is any registered one (the paper trains
    Nasr et al.'s inference network), adaptive: its reference models are pruned like the target.

    Where the search's numbers come from, so that the choice does not contaminate the
    evaluation: the search probes only the *last* ``search_models`` models (whole complementary
    pairs; default half the population) as a population of their own: each is a target, its
    references are the other probed models, and its test accuracy is its accuracy on the records
    it did not train on. The choice depends on the probed models' weights and membership alone;
    the other models are pruned and fine-tuned identically but never inform it (the pairs'
    memberships are independent), so an evaluation whose targets avoid the probed models
    (``--targets first:K`` with ``K = M - search_models``; the report gives it) measures the
    chosen setting on fresh targets. With ``--targets all`` (the default) the probed models are
    targets too, and their measured leakage is biased low by the selection.

    Cost: each grid point fine-tunes the whole population and fits the attack once on the probed
    models; two extra copies of the parameters are held (the trained weights and the best point).

    Args:
        sparsity: fraction of prunable weights removed, in [0, 1) (unused with ``search``).
        scope: ``global`` (one magnitude threshold per model across all layers) or ``layer``
            (each layer pruned to ``sparsity``).
        finetune_epochs: epochs of mask-preserving fine-tuning (0 = none; the default 10 retrains
            as Han et al. do, so the pruned model keeps its accuracy).
        finetune_lr: learning rate for fine-tuning (default: the recipe's).
        include_bias: also prune biases and other 1-D parameters (default: weight matrices only).
        search: run the MIA-Pruning search over ``grid`` instead of pruning to ``sparsity``.
        grid: the sparsities to try, comma-separated in one string (quote it on the command line:
            ``prune:search=true,grid="0.5,0.9"``).
        accuracy_budget: the largest allowed drop of the probed models' mean test accuracy against
            the same models unpruned, absolute (0.02 = 2 percentage points), in [0, 1].
        search_attack: the attack that scores each point, a registry specification (``loss``,
            ``lira``; quote one with parameters: ``search_attack="lira:online=false"``).
        select: ``least-leaking`` (the paper's rule; ties to the sparser point) or ``sparsest``.
        leakage: what ``least-leaking`` minimises: ``advantage`` or ``auc`` (both are reported).
        search_models: how many models the search probes (even; the population's last ones);
            ``None``: half the population in whole pairs, at least what ``search_attack`` needs.
    """

    api_version = "1.0"
    stage = "post"
    reference = (
        "Y. Wang et al. Against Membership Inference Attack: Pruning is All You Need. IJCAI 2021; "
        "S. Han, J. Pool, J. Tran, W. Dally. Learning both Weights and Connections for Efficient "
        "Neural Networks. NeurIPS 2015"
    )

    def __init__(
        self,
        sparsity: float = 0.8,
        scope: Literal["global", "layer"] = "global",
        finetune_epochs: int = 10,
        finetune_lr: Optional[float] = None,
        include_bias: bool = False,
        search: bool = False,
        grid: str = "0.5,0.7,0.8,0.9,0.95",
        accuracy_budget: float = 0.02,
        search_attack: str = "loss",
        select: Literal["least-leaking", "sparsest"] = "least-leaking",
        leakage: Literal["advantage", "auc"] = "advantage",
        search_models: Optional[int] = None,
    ):
        self.sparsity = sparsity
        self.scope = scope
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.include_bias = include_bias
        self.search = search
        self.grid = grid
        self.accuracy_budget = accuracy_budget
        self.search_attack = search_attack
        self.select = select
        self.leakage = leakage
        self.search_models = search_models

    def validate(self) -> None:
        if not (isinstance(self.sparsity, (int, float)) and 0.0 <= self.sparsity < 1.0):
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if self.scope not in ("global", "layer"):
            raise ValueError(f"scope must be 'global' or 'layer', got {self.scope!r}")
        if not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be an integer >= 0, got {self.finetune_epochs!r}")
        if self.finetune_lr is not None and not (self.finetune_lr > 0 and math.isfinite(self.finetune_lr)):
            raise ValueError(f"finetune_lr must be a positive number, got {self.finetune_lr!r}")
        if not isinstance(self.search, bool):
            raise ValueError(f"search must be true or false, got {self.search!r}")
        parse_grid(self.grid)
        b = self.accuracy_budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 <= b <= 1.0:
            raise ValueError(f"accuracy_budget must be a number in [0, 1] (an absolute drop of test accuracy), "
                             f"got {b!r}")
        if self.select not in SELECT_RULES:
            raise ValueError(f"select must be one of {', '.join(SELECT_RULES)}, got {self.select!r}")
        if self.leakage not in LEAKAGE_MEASURES:
            raise ValueError(f"leakage must be one of {', '.join(LEAKAGE_MEASURES)}, got {self.leakage!r}")
        k = self.search_models
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 2 or k % 2):
            raise ValueError(f"search_models must be none (half the population) or an even integer >= 2 (whole "
                             f"model pairs), got {k!r}")
        try:
            attack = load_attack(self.search_attack)
        except ValueError as exc:
            raise ValueError(f"search_attack={self.search_attack!r}: {exc}") from None
        if k is not None and k < models_needed(attack):
            raise ValueError(f"search_models={k} is too few for search_attack={self.search_attack!r}, which needs "
                             f"at least {models_needed(attack)} models")

    def prunable(self, params: Dict[str, torch.Tensor]) -> List[str]:
        """Names of the parameters this defense prunes (``[M, ...]`` stacked: ndim > 2 means a
        weight matrix or kernel per model)."""
        return [n for n, p in params.items() if self.include_bias or p.ndim > 2]

    def apply(self, ctx) -> Dict[str, object]:
        self.validate()
        names = self.prunable(ctx.params)
        if not names:
            raise ValueError("the model has no prunable parameters (set include_bias=true to prune 1-D ones)")
        if self.search:
            return self._search(ctx, names)
        masks, backend = self._prune(ctx, names, self.sparsity)
        ctx.changed()
        return self._report(ctx.params, names, masks, backend)

    def _prune(self, ctx, names: List[str], sparsity: float):
        """Prune ``ctx.params`` in place to ``sparsity`` and fine-tune with the mask kept:
        ``(masks, kernel backend)``."""
        tensors = [ctx.params[n] for n in names]
        masks = magnitude_masks(tensors, sparsity, scope=self.scope)
        # Validated once and re-applied after every fine-tuning step with one cheap call: the
        # optimizer updates the stacked parameters in place, so the plan stays valid (a plan whose
        # tensors were reallocated raises StaleMaskPlanError rather than mask stale memory).
        plan = kernels.MaskPlan(tensors, masks)
        with torch.no_grad():
            backend = plan.apply()
        if self.finetune_epochs:
            ctx.finetune(self.finetune_epochs, lr=self.finetune_lr, post_step=lambda params: plan.apply())
        return masks, backend

    def _search(self, ctx, names: List[str]) -> Dict[str, object]:
        """Wang et al.'s Algorithm 1 over ``grid`` (see the class docstring)."""
        grid = parse_grid(self.grid)
        m = next(iter(ctx.params.values())).shape[0]
        probed = search_models(m, self.search_models, models_needed(load_attack(self.search_attack)))
        # fails here, before any fine-tuning, when the attack cannot score the probed population
        check_probe(load_attack(self.search_attack), len(probed))
        trained = _copy(ctx.params)
        base = probe(ctx, load_attack(self.search_attack), models=probed)  # the unpruned models
        base_acc = float(base.test_accuracy.mean())
        rows: List[Dict[str, object]] = []
        best, best_params, best_backend = None, None, None
        for s in grid:
            _restore(ctx.params, trained)
            _, backend = self._prune(ctx, names, s)
            p = probe(ctx, load_attack(self.search_attack), models=probed)  # a fresh attack per point
            acc = float(p.test_accuracy.mean())
            rows.append({
                "sparsity": float(s),
                "achieved_sparsity": float(_zero_fraction(ctx.params, names).mean()),
                "train_accuracy": float(p.train_accuracy.mean()),
                "test_accuracy": acc,
                "accuracy_drop": base_acc - acc,
                "auc": p.auc,
                "advantage": p.advantage,
                "within_budget": bool(base_acc - acc <= self.accuracy_budget + BUDGET_SLACK),
            })
            # the choice over the points so far: keep the weights of the one chosen (one copy held)
            i = self._choose(rows)
            if i == len(rows) - 1:
                best, best_params, best_backend = i, _copy(ctx.params), backend
        chosen = self._choose(rows)
        assert chosen == best, (chosen, best)  # a total order: the prefix choice is the final one
        _restore(ctx.params, trained if chosen is None else best_params)
        del trained, best_params
        ctx.changed()
        target = 0.0 if chosen is None else grid[chosen]
        report = self._report(ctx.params, names, None, best_backend or "none", target=target)
        report.update(self._search_report(rows, chosen, base, base_acc, probed, m))
        return report

    def _choose(self, rows) -> Optional[int]:
        return select_point(sparsity=[r["sparsity"] for r in rows], accuracy_drop=[r["accuracy_drop"] for r in rows],
                            leakage=[r[self.leakage] for r in rows], budget=float(self.accuracy_budget),
                            rule=self.select)

    def _search_report(self, rows, chosen, base, base_acc, probed, m) -> Dict[str, object]:
        ok = [r for r in rows if r["within_budget"]]
        budget = f"{float(self.accuracy_budget):g}"
        if chosen is None:
            low = min(rows, key=lambda r: r["accuracy_drop"])
            reason = (f"no grid point within the accuracy budget {budget} (smallest drop {low['accuracy_drop']:.4f} "
                      f"at sparsity {low['sparsity']:g}); models left unpruned")
        elif self.select == "sparsest":
            reason = f"sparsest of the {len(ok)} of {len(rows)} points within the accuracy budget {budget}"
        else:
            reason = (f"least {self.leakage} ({rows[chosen][self.leakage]:.4f}) of the {len(ok)} of {len(rows)} "
                      f"points within the accuracy budget {budget}")
        fresh = int(m - len(probed))
        if fresh:
            caveat = (f"models {int(probed[0])}-{int(probed[-1])} chose the sparsity: evaluate with --targets "
                      f"first:{fresh} for leakage measured without that selection")
        else:
            caveat = ("every model chose the sparsity (the population is too small to hold some out): the "
                      "evaluation's leakage is biased low by that selection")
        table = " | ".join(
            f"{r['sparsity']:g}: acc {100 * r['test_accuracy']:.1f}% ({-100 * r['accuracy_drop']:+.1f} pt), "
            f"AUC {r['auc']:.3f}, adv {r['advantage']:.3f}{'' if r['within_budget'] else ', over budget'}"
            for r in rows)
        return {
            "chosen_sparsity": None if chosen is None else float(rows[chosen]["sparsity"]),
            "search_choice": reason,
            "search_grid": (f"unpruned: acc {100 * base_acc:.1f}%, AUC {base.auc:.3f}, adv {base.advantage:.3f} | "
                            + table),
            "search_caveat": caveat,
            "search": {
                "attack": self.search_attack,
                "select": self.select,
                "leakage": self.leakage,
                "accuracy_budget": float(self.accuracy_budget),
                "probed_models": [int(i) for i in probed],
                "fresh_targets": f"first:{fresh}" if fresh else None,
                "unpruned": {"train_accuracy": float(base.train_accuracy.mean()), "test_accuracy": base_acc,
                             "auc": base.auc, "advantage": base.advantage},
                "grid": rows,
                "chosen_sparsity": None if chosen is None else float(rows[chosen]["sparsity"]),
                "chosen_index": chosen,
                "reason": reason,
            },
        }

    def _report(self, params, names, masks, backend, *, target: Optional[float] = None) -> Dict[str, object]:
        m = params[names[0]].shape[0]
        total = sum(params[n][0].numel() for n in names)
        achieved = _zero_fraction(params, names)
        all_params = sum(p[0].numel() for p in params.values())
        all_zero = sum((p.reshape(m, -1) == 0).sum(dim=1).to("cpu", torch.float64) for p in params.values())
        return {
            "target_sparsity": float(self.sparsity if target is None else target),
            "achieved_sparsity": float(achieved.mean()),
            "achieved_sparsity_min": float(achieved.min()),
            "achieved_sparsity_max": float(achieved.max()),
            "overall_sparsity": float((all_zero / all_params).mean()),
            "pruned_tensors": names,
            "prunable_parameters_per_model": int(total),
            "parameters_per_model": int(all_params),
            "scope": self.scope,
            "finetune_epochs": int(self.finetune_epochs),
            "kernel_backend": backend,
        }


def _zero_fraction(params: Dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """float64 ``[M]``: each model's fraction of zeros among the ``names`` tensors (on the CPU)."""
    m = params[names[0]].shape[0]
    zeros = torch.zeros(m, dtype=torch.float64)
    total = 0
    for n in names:
        zeros += (params[n].reshape(m, -1) == 0).sum(dim=1).to("cpu", torch.float64)  # any device
        total += params[n][0].numel()
    return zeros / total


def _copy(params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


@torch.no_grad()
def _restore(params: Dict[str, torch.Tensor], saved: Dict[str, torch.Tensor]) -> None:
    """Copy ``saved`` into ``params`` in place (the tensors keep their identity, so mask plans and
    the population stay bound to them)."""
    for k, v in params.items():
        v.copy_(saved[k])
