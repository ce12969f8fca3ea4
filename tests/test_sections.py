"""Typed sections (pipeline_lib.schema), name registries (pipeline_lib.registry) and the
composition of the ``unlearn`` section from a method registry."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Literal

import pytest

from pipeline_lib.config import (
    ConfigError,
    Params,
    TrainConfig,
    UnlearnConfig,
    build_params,
    methods_section,
    parse_section,
    replace,
    to_dict,
)
from pipeline_lib.methods import METHODS, Method
from pipeline_lib.methods.fisher_diagonal import FisherDiagonalParams
from pipeline_lib.registry import Registry
from pipeline_lib.schema import Field, Float, Int, section


@section()
class _ToyParams:
    steps: Int = Field(3, gt=0)
    rate: Float = Field(0.5, gt=0, le=1)
    mode: Literal["a", "b"] = "a"


def test_construction_validates_and_names_the_dotted_key() -> None:
    with pytest.raises(ConfigError, match=r"^train\.lr: must be > 0, got -1$"):
        TrainConfig(lr=-1)
    with pytest.raises(
        ConfigError, match=r"^unlearn\.fisher_diagonal\.top_fraction: must be in \(0, 1\], got 2"
    ):
        FisherDiagonalParams(top_fraction=2)
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr; valid keys of train: epochs"):
        TrainConfig(lrr=1)  # type: ignore[call-arg]


def test_replace_is_a_validated_copy() -> None:
    t = TrainConfig()
    assert replace(t, epochs=3) == dataclasses.replace(t, epochs=3)
    assert replace(t, epochs=3).epochs == 3 and t.epochs == TrainConfig().epochs
    with pytest.raises(ConfigError, match=r"^train\.epochs: must be > 0, got 0"):
        replace(t, epochs=0)
    with pytest.raises(ConfigError, match=r"^train\.optimizer: 'rmsprop' is not one of"):
        replace(t, optimizer="rmsprop")


def test_parse_section_uses_the_declared_key_or_the_given_prefix() -> None:
    with pytest.raises(ConfigError, match=r"^train\.batch_size: must be > 0"):
        parse_section(TrainConfig, {"batch_size": 0})
    with pytest.raises(ConfigError, match=r"^x\.y\.batch_size: must be > 0"):
        parse_section(TrainConfig, {"batch_size": 0}, "x.y")
    assert parse_section(TrainConfig, {"lr": "1e-2"}).lr == 0.01


def test_hint_is_part_of_the_range_message() -> None:
    with pytest.raises(ConfigError, match=r"must be >= 4 \(the noise floor splits"):
        build_params({}, {"evaluate.n_models": 3})


def test_tuple_items_are_checked_with_their_index() -> None:
    with pytest.raises(
        ConfigError, match=r"^unlearn\.svd_projection\.alpha_r_grid\[1\]: must be > 0, got -1"
    ):
        build_params({}, {"unlearn.svd_projection.alpha_r_grid": [10, -1]})


def test_sections_are_hashable_equal_by_value_and_picklable() -> None:
    a, b = build_params({}), Params()
    assert a == b and hash(a) == hash(b)
    assert pickle.loads(pickle.dumps(a)) == a
    assert build_params(to_dict(a)) == a


def test_registry_lookup_check_and_duplicates() -> None:
    reg: Registry[int] = Registry("widget", key="thing.name")
    reg.add("b", 2)
    reg.register("a")(lambda: 1)
    assert list(reg) == ["b", "a"]  # registration order
    with pytest.raises(ConfigError, match=r"^thing\.name: unknown widget 'c'; valid: a, b$"):
        reg.lookup("c")
    with pytest.raises(ValueError, match="unknown name 'c'; valid: a, b"):
        reg.check("c")
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("a", 3)


def test_methods_section_is_composed_from_a_registry() -> None:
    """What adding a method amounts to: its params section and a registry entry; the
    ``unlearn`` section gets its sub-section with the declared defaults and checks."""
    reg: Registry[Method] = Registry("toy method")
    reg.add("toy", Method("toy", lambda m, i, p, s: (m, {}), _ToyParams, False, "a toy"))
    cls = methods_section("ToyUnlearn", reg, default="toy", module=__name__, doc="toy")
    assert [f.name for f in dataclasses.fields(cls)] == ["method", "seed", "toy"]
    assert cls().method_params() == _ToyParams()
    parsed = parse_section(cls, {"method": "toy", "toy": {"steps": 7}}, "unlearn")
    assert parsed.toy == _ToyParams(steps=7)
    with pytest.raises(ConfigError, match=r"^unlearn\.toy\.rate: must be in \(0, 1\], got 2"):
        parse_section(cls, {"toy": {"rate": 2}}, "unlearn")
    with pytest.raises(ConfigError, match=r"^unlearn\.method: unknown name 'nope'; valid: toy$"):
        parse_section(cls, {"method": "nope"}, "unlearn")


def test_unlearn_section_has_one_sub_section_per_registered_method_in_order() -> None:
    names = [f.name for f in dataclasses.fields(UnlearnConfig)]
    assert names == ["method", "seed", "preset", *METHODS]
    for name, m in METHODS.items():
        assert type(UnlearnConfig().method_params(name)) is m.params_type
