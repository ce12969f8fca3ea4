"""params.yaml parsing: strict keys, strict types, registry names, dotted overrides."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline_lib.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    Params,
    TrainConfig,
    UnlearnConfig,
    build_params,
    flatten,
    load_params,
    to_dict,
)
from pipeline_lib.methods import METHODS
from pipeline_lib.methods.fisher_diagonal import FisherDiagonalParams

REPO = Path(__file__).resolve().parents[1]
PARAMS_YAML = REPO / "params.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(PARAMS_YAML.read_text())


def test_repo_params_yaml_parses(raw: dict) -> None:
    params = load_params(PARAMS_YAML)
    assert isinstance(params, Params)
    # Spot-check that the file's values (not just defaults) were read, with canonical types.
    assert params.data.name == raw["data"]["name"]
    assert params.model.hidden == tuple(raw["model"]["hidden"])
    assert isinstance(params.model.hidden, tuple)
    assert params.train.epochs == raw["train"]["epochs"]
    assert params.unlearn.method == raw["unlearn"]["method"]
    assert params.unlearn.fisher_diagonal.eps == pytest.approx(1e-8)
    assert isinstance(params.unlearn.fisher_diagonal, FisherDiagonalParams)
    # The round trip through to_dict gives back the same params.
    assert build_params(to_dict(params)) == params


@pytest.mark.parametrize(
    ("overrides", "dotted", "valid"),
    [
        ({"trian": {"epochs": 3}}, "trian", ["data", "model", "train", "unlearn", "ray"]),
        ({"train.lrr": 0.1}, "train.lrr", ["epochs", "batch_size", "lr", "weight_decay"]),
        (
            {"unlearn.fisher_diagonal.gama": 2.0},
            "unlearn.fisher_diagonal.gama",
            ["threshold", "top_fraction", "eps", "reset"],
        ),
    ],
)
def test_unknown_key_names_dotted_key_and_valid_keys(
    raw: dict, overrides: dict, dotted: str, valid: list[str]
) -> None:
    flat_overrides = {k: v for k, v in overrides.items() if "." in k}
    tree = {**raw, **{k: v for k, v in overrides.items() if "." not in k}}
    with pytest.raises(ConfigError) as info:
        build_params(tree, flat_overrides)
    msg = str(info.value)
    assert f"unknown key {dotted}" in msg
    assert "valid keys" in msg
    for key in valid:
        assert key in msg


def test_unknown_key_in_yaml_file(tmp_path: Path, raw: dict) -> None:
    raw = {**raw, "train": {**raw["train"], "lrr": 0.5}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"unknown key train\.lrr; valid keys of train: epochs"):
        load_params(path)


@pytest.mark.parametrize(
    ("dotted", "value", "expect"),
    [
        ("train.epochs", "ten", "expected an integer"),
        ("train.epochs", 3.0, "expected an integer"),
        ("train.epochs", True, "expected an integer"),
        ("train.lr", True, "expected a number"),
        ("train.lr", "fast", "expected a number"),
        ("model.hidden", 5, "expected a list"),
        ("data.seed", None, "expected an integer"),
        ("data.out_dir", 3, "expected a string"),
        ("unlearn.fisher_diagonal.threshold", "high", "expected a number"),
        ("unlearn.fisher_diagonal", 3, "expected a mapping"),
    ],
)
def test_wrong_type_names_key(raw: dict, dotted: str, value: object, expect: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_params(raw, {dotted: value})
    msg = str(info.value)
    assert msg.startswith(f"{dotted}:"), msg
    assert expect in msg


def test_wrong_type_inside_list_names_index(raw: dict) -> None:
    with pytest.raises(ConfigError, match=r"model\.hidden\[1\]: expected an integer"):
        build_params(raw, {"model.hidden": [64, "wide"]})


@pytest.mark.parametrize(
    ("dotted", "value", "choices"),
    [
        ("train.optimizer", "adamw", ["'adam'", "'sgd'"]),
        ("train.device", "tpu", ["'auto'", "'cpu'", "'cuda'"]),
        ("fisher.kind", "diagonal", ["'true_expected'", "'true_sampled'", "'empirical'"]),
        ("unlearn.fisher_diagonal.reset", "random", ["'zero'", "'reinit'"]),
    ],
)
def test_literal_rejects_bad_value_listing_choices(
    raw: dict, dotted: str, value: str, choices: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        build_params(raw, {dotted: value})
    msg = str(info.value)
    assert msg.startswith(f"{dotted}: {value!r} is not one of")
    for choice in choices:
        assert choice in msg


@pytest.mark.parametrize(
    ("dotted", "value", "valid"),
    [
        ("data.name", "cifar10", ["digits", "fashion-mnist", "parquet"]),
        ("model.name", "resnet", ["cnn", "mlp", "vit"]),
        (
            "unlearn.method",
            "nope",
            sorted(METHODS),
        ),
    ],
)
def test_unknown_registry_name_lists_valid(
    raw: dict, dotted: str, value: str, valid: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        build_params(raw, {dotted: value})
    msg = str(info.value)
    assert dotted in msg and repr(value) in msg
    assert f"valid: {', '.join(valid)}" in msg


def test_dotted_overrides(raw: dict) -> None:
    params = load_params(
        PARAMS_YAML,
        {
            "unlearn.method": "finetune",
            "train.epochs": 2,
            "unlearn.fisher_diagonal.top_fraction": 0.05,
            "model.hidden": [8, 4],
        },
    )
    assert params.unlearn.method == "finetune"
    assert params.train.epochs == 2
    assert params.unlearn.fisher_diagonal.top_fraction == 0.05
    assert params.model.hidden == (8, 4)
    assert params.unlearn.method_params() == params.unlearn.finetune
    # Untouched keys keep the file's values.
    assert params.train.batch_size == raw["train"]["batch_size"]
    # The raw mapping given to build_params is not mutated by overrides.
    before = yaml.safe_dump(raw)
    build_params(raw, {"train.epochs": 1, "unlearn.fisher_diagonal.eps": 0.5})
    assert yaml.safe_dump(raw) == before


def test_override_into_leaf_is_an_error(raw: dict) -> None:
    with pytest.raises(ConfigError, match=r"override train\.lr\.x: lr is not a section"):
        build_params(raw, {"train.lr.x": 1})


def test_override_creates_missing_section() -> None:
    params = build_params({}, {"unlearn.retrain.seed": 7})
    assert params.unlearn.retrain.seed == 7
    assert params.train == TrainConfig()


@pytest.mark.parametrize(
    "obj", [Params(), DataConfig(), TrainConfig(), UnlearnConfig(), FisherDiagonalParams()]
)
def test_dataclasses_are_frozen(obj: object) -> None:
    field = dataclasses.fields(obj)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, None)


def test_nested_config_is_frozen() -> None:
    params = build_params({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.unlearn.fisher_diagonal.top_fraction = 0.9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.model.hidden = (1,)  # type: ignore[misc]


def test_yaml_exponent_string_is_accepted_as_float(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(
        "train:\n  lr: 1e-3\n  weight_decay: 5e-4\nunlearn:\n  fisher_diagonal:\n    eps: 1e-12\n"
    )
    assert isinstance(yaml.safe_load(path.read_text())["train"]["lr"], str)  # YAML 1.1 quirk
    params = load_params(path)
    assert params.train.lr == 1e-3 and isinstance(params.train.lr, float)
    assert params.train.weight_decay == 5e-4
    assert params.unlearn.fisher_diagonal.eps == 1e-12


def test_int_is_accepted_for_float_and_canonicalised(raw: dict) -> None:
    params = build_params(raw, {"train.lr": 1})
    assert params.train.lr == 1.0 and type(params.train.lr) is float


def test_optional_fields_accept_null_and_values(raw: dict) -> None:
    params = build_params(raw, {"data.max_train": 100, "unlearn.fisher_diagonal.threshold": None})
    assert params.data.max_train == 100
    assert params.unlearn.fisher_diagonal.threshold is None
    params = build_params(raw, {"unlearn.fisher_diagonal.threshold": 2})
    assert params.unlearn.fisher_diagonal.threshold == 2.0


def test_missing_or_invalid_params_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(broken)


def test_flatten_uses_dotted_keys() -> None:
    flat = flatten(build_params({}, {"model.hidden": [3]}))
    assert flat["train.lr"] == TrainConfig().lr
    assert flat["unlearn.fisher_diagonal.top_fraction"] == FisherDiagonalParams().top_fraction
    assert flat["model.hidden"] == [3]
    assert ModelConfig().name == flat["model.name"]


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.batch_size", 0, "train.batch_size: must be > 0, got 0"),
        ("data.test_fraction", 1.0, "data.test_fraction: must be in (0, 1)"),
        ("unlearn.fisher_diagonal.top_fraction", 0.0, "top_fraction: must be in (0, 1]"),
        ("evaluate.mia_folds", 1, "evaluate.mia_folds: must be >= 2"),
        ("data.max_train", -5, "data.max_train: must be > 0"),
    ],
)
def test_out_of_range_values_name_the_key(key, value, expected):
    from pipeline_lib.config import build_params

    with pytest.raises(ConfigError, match=re.escape(expected)):
        build_params({}, {key: value})
