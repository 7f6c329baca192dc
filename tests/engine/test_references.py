"""Reference budgets (``n_references``): whole complementary pairs, nested, fair, reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mia_core.engine.trainer import make_keep_matrix, partner, references, select_references


@settings(max_examples=60, deadline=None, derandomize=True)
@given(pairs=st.integers(2, 12), target=st.integers(0, 23), seed=st.integers(0, 2**32), online=st.booleans())
def test_budgets_are_whole_pairs_nested_and_exclude_the_target_pair(pairs, target, seed, online):
    m = 2 * pairs
    target %= m
    avail = pairs - 1
    budgets = [k for k in range(1, 2 * avail + 1) if (k % 2 == 0 if online else k <= avail)]
    prev = set()
    for k in budgets:
        refs = select_references(target=target, n_models=m, n_references=k, online=online, seed=seed)
        assert len(refs) == (k if online else 2 * k)
        assert target not in refs and partner(target) not in refs
        assert set(partner(r) for r in refs) == set(refs)  # whole pairs
        assert prev <= set(refs)  # nested budgets
        prev = set(refs)
        again = select_references(target=target, n_models=m, n_references=k, online=online, seed=seed)
        assert np.array_equal(refs, again)
    full = select_references(target=target, n_models=m, n_references=None, online=online, seed=seed)
    assert np.array_equal(full, references(target, m))


def test_every_record_has_k_out_references_whatever_the_targets_membership():
    keep = make_keep_matrix(12, 500, np.random.default_rng(3))
    for k in (1, 2, 4):
        refs = select_references(target=4, n_models=12, n_references=k, online=False, seed=9)
        ref_keep = keep[refs]
        assert ((~ref_keep).sum(axis=0) == k).all() and (ref_keep.sum(axis=0) == k).all()
    refs = select_references(target=4, n_models=12, n_references=4, online=True, seed=9)
    assert (keep[refs].sum(axis=0) == 2).all()


def test_subsets_differ_between_targets_and_seeds():
    draws = {tuple(select_references(target=t, n_models=40, n_references=2, online=False, seed=s))
             for t in (0, 2, 4) for s in (0, 1)}
    assert len(draws) > 3


@pytest.mark.parametrize("k,online,match", [
    (0, False, "positive integer"),
    (-2, True, "positive integer"),
    (1.5, False, "positive integer"),
    (True, False, "positive integer"),
    (3, True, "even number"),
    (3, False, "needs 3 reference pairs but a population of 6 models has 2"),
    (6, True, "use n_references <= 4"),
])
def test_unusable_budgets_say_what_is_allowed(k, online, match):
    with pytest.raises(ValueError, match=match):
        select_references(target=0, n_models=6, n_references=k, online=online, seed=0)
