"""The NAME:key=value parser: typing against __init__ signatures, and its errors."""

from __future__ import annotations

from typing import Literal, Optional

import numpy as np
import pytest

from mia_core.base import Attack
from mia_core.params import ParamError, instantiate, parse_spec, split_spec


class Dummy(Attack):
    def __init__(self, k: int = 3, rate: float = 0.5, online: bool = True,
                 mode: Literal["a", "b"] = "a", name: str = "x", limit: Optional[int] = None, untyped=1.5):
        self.k = k
        self.rate = rate
        self.online = online
        self.mode = mode
        self.name = name
        self.limit = limit
        self.untyped = untyped

    def validate(self):
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")

    def fit(self, ctx):
        return self

    def score(self, target, records):
        return records * 0.0


def test_split_spec():
    assert split_spec("lira") == ("lira", {})
    assert split_spec(" prune:sparsity=0.9, scope=layer ") == ("prune", {"sparsity": "0.9", "scope": "layer"})


@pytest.mark.parametrize("text,match", [
    ("", "empty plugin name"),
    (":k=1", "empty plugin name"),
    ("lira:", "no parameters"),
    ("lira:k", "malformed parameter 'k'"),
    ("lira:=3", "malformed parameter"),
    ("lira:k=1,k=2", "given twice"),
])
def test_split_spec_errors(text, match):
    with pytest.raises(ParamError, match=match):
        split_spec(text)


def test_types_follow_annotations_and_defaults():
    spec = parse_spec("d:k=7,rate=1e-3,online=no,mode=B,name=abc,limit=none,untyped=2", Dummy, label="attack 'd'")
    assert spec.params == {"k": 7, "rate": 0.001, "online": False, "mode": "b", "name": "abc",
                           "limit": None, "untyped": 2.0}
    assert parse_spec("d:limit=4", Dummy, label="x").params == {"limit": 4}


@pytest.mark.parametrize("text,match", [
    ("d:kk=1", r"unknown parameter 'kk' \(did you mean 'k'\?\); valid parameters: k, rate"),
    ("d:k=1.5", r"k='1.5' must be an integer"),
    ("d:rate=fast", r"rate='fast' must be a number"),
    ("d:rate=nan", "must be a finite number"),
    ("d:online=maybe", "must be a boolean"),
    ("d:mode=c", "must be one of a, b"),
    ("d:name=", "must not be empty"),
])
def test_parse_errors_name_the_value(text, match):
    with pytest.raises(ParamError, match=match) as info:
        parse_spec(text, Dummy, label="attack 'd'")
    assert str(info.value).startswith("attack 'd'")
    assert "\n" not in str(info.value)


def test_instantiate_runs_validate():
    spec = parse_spec("d:k=0", Dummy, label="attack 'd'")
    with pytest.raises(ParamError, match="attack 'd': k must be >= 1, got 0"):
        instantiate(Dummy, spec, label="attack 'd'")
    obj = instantiate(Dummy, parse_spec("d:k=2", Dummy, label="x"), label="x")
    assert obj.get_params()["k"] == 2


def test_builtin_ranges_are_checked():
    from mia_plugins.defenses.prune import Prune

    for bad in ("prune:sparsity=1.5", "prune:sparsity=-0.1", "prune:finetune_epochs=-1", "prune:scope=row"):
        with pytest.raises(ParamError):
            instantiate(Prune, parse_spec(bad, Prune, label="defense 'prune'"), label="defense 'prune'")


def test_quoted_values_may_hold_commas():
    from mia_core.params import split_spec

    assert split_spec('file:path="my,data.csv",label=y') == ("file", {"path": "my,data.csv", "label": "y"})
    assert split_spec("file:path='a,b'") == ("file", {"path": "a,b"})
    with pytest.raises(ParamError, match="unclosed \" quote"):
        split_spec('file:path="abc')


@pytest.mark.parametrize("value, even, online_option, match", [
    (0, False, False, r"n_references must be a positive integer \(or unset for all\), got 0"),
    (True, True, True, r"must be a positive integer \(or unset for all\), got True"),
    (1.5, False, False, r"got 1.5"),
    (3, True, True, r"n_references=3: an online attack needs as many IN as OUT references, so an even number "
                    r"\(or online=false\)"),
    (3, True, False, r"n_references must be a positive even integer \(as many IN as OUT reference models per "
                     r"record\) or unset for all, got 3"),
    (0, True, False, r"positive even integer .* got 0"),
])
def test_one_rule_for_every_attacks_reference_budget(value, even, online_option, match):
    from mia_core.params import check_n_references

    with pytest.raises(ValueError, match=match):
        check_n_references(value, even=even, online_option=online_option)


@pytest.mark.parametrize("value, even", [(None, True), (1, False), (3, False), (2, True), (np.int64(4), True)])
def test_budgets_the_rule_allows(value, even):
    from mia_core.params import check_n_references

    check_n_references(value, even=even, online_option=True)
