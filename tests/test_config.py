"""TrainerConfig: validated before anything happens, loadable from files, with a schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

import dltrain
from dltrain import ConfigError, TrainerConfig


@pytest.mark.parametrize(
    ("fields", "field_name", "hint"),
    [
        ({"max_epochs": 0}, "max_epochs", "greater than 0"),
        ({"accumulate_grad_batches": 0}, "accumulate_grad_batches", "greater than 0"),
        ({"gradient_clip_val": -1.0}, "gradient_clip_val", "greater than 0"),
        ({"device": "tpu"}, "device", "'auto', 'cpu', 'cuda', 'cuda:N'"),
        ({"precision": "8"}, "precision", "'32', 'bf16-mixed' or '16-mixed'"),
        ({"max_epoch": 3}, "max_epoch", "did you mean 'max_epochs'"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite", "'raise', 'skip', 'stop' or 'rollback'"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(fields: dict, field_name: str, hint: str) -> None:
    with pytest.raises(ValidationError) as info:
        dltrain.Trainer(**fields)
    message = str(info.value)
    assert field_name in message and hint in message


def test_defaults_train_one_epoch() -> None:
    assert TrainerConfig().max_epochs == 1
    assert TrainerConfig(max_steps=10).max_epochs is None


def test_a_config_object_and_keyword_overrides_combine() -> None:
    trainer = dltrain.Trainer(TrainerConfig(max_epochs=3, device="cpu"), max_epochs=5)
    assert trainer.config.max_epochs == 5 and trainer.config.device == "cpu"
    with pytest.raises(ValidationError):
        dltrain.Trainer(TrainerConfig(), max_epochs=0)


def test_config_is_loaded_from_json_toml_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"max_epochs": 4, "device": "cpu"}))
    (tmp_path / "c.toml").write_text('[trainer]\nmax_epochs = 4\ndevice = "cpu"\n')
    (tmp_path / "c.yaml").write_text("max_epochs: 4\ndevice: cpu\n")
    for name in ("c.json", "c.toml", "c.yaml"):
        config = TrainerConfig.from_file(tmp_path / name)
        assert (config.max_epochs, config.device) == (4, "cpu")
    assert TrainerConfig.from_file(tmp_path / "c.yaml", max_epochs=2).max_epochs == 2


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'missing.yaml' does not exist"):
        TrainerConfig.from_file("missing.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.json' is not valid JSON"):
        TrainerConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match=r"suffix '.ini'; use .json, .toml, .yaml"):
        TrainerConfig.from_file(tmp_path / "c.ini")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="holds a list"):
        TrainerConfig.from_file(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("max_epoch: 1\n")
    with pytest.raises(ValidationError, match="max_epoch"):
        TrainerConfig.from_file(tmp_path / "typo.yaml")


def test_json_schema_lists_every_field_with_its_description() -> None:
    schema = TrainerConfig.model_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == set(TrainerConfig.model_fields)
    assert all(prop.get("description") for prop in schema["properties"].values())


# -- strict values from Python; typed values from files ------------------------------------


@pytest.mark.parametrize(
    ("fields", "loc", "message"),
    [
        ({"max_epochs": True}, "max_epochs", "a positive integer or None, not the bool True"),
        ({"max_epochs": "3"}, "max_epochs", "not the string '3': write the number without quotes (3)"),
        ({"max_steps": 3.0}, "max_steps", "a positive integer or None, not the float 3.0"),
        ({"accumulate_grad_batches": False}, "accumulate_grad_batches", "a positive integer, not the bool"),
        ({"gradient_clip_val": "1e-3"}, "gradient_clip_val", "a positive number or None, not the string"),
        ({"seed": "0"}, "seed", "an integer or None, not the string '0'"),
        ({"train_accuracy": "yes"}, "train_accuracy", "True or False, not the string 'yes'"),
        ({"train_accuracy": 1}, "train_accuracy", "True or False, not the int 1"),
        ({"checkpoint": {"dir": "c", "keep_last": "2"}}, "checkpoint.keep_last", "a positive integer, not"),
        (
            {"checkpoint": {"dir": "c", "keep_best": True}},
            "checkpoint.keep_best",
            "an integer >= 0, not the bool",
        ),
        (
            {"checkpoint": {"dir": "c", "save_on_fit_end": "no"}},
            "checkpoint.save_on_fit_end",
            "True or False",
        ),
    ],
)
def test_from_python_a_bool_or_a_string_is_not_a_number(fields: dict, loc: str, message: str) -> None:
    """Pydantic's lax mode would take True as 1 and "3" as 3: the config is strict about types."""
    with pytest.raises(ValidationError) as info:
        TrainerConfig(**fields)
    (error,) = info.value.errors()
    assert ".".join(map(str, error["loc"])) == loc
    assert message in error["msg"]
    value = fields[loc.split(".")[0]]
    given = value[loc.split(".")[1]] if isinstance(value, dict) else value
    assert error["input"] == given and f"input_value={given!r}" in str(info.value)


def test_numbers_that_are_numbers_still_pass() -> None:
    config = TrainerConfig(max_epochs=3, gradient_clip_val=1, seed=0, checkpoint={"dir": "c", "keep_best": 0})
    assert config.gradient_clip_val == 1.0 and isinstance(config.gradient_clip_val, float)
    assert config.checkpoint is not None and config.checkpoint.keep_best == 0


def test_run_files_in_every_format_keep_their_types(tmp_path: Path) -> None:
    """A number in a file is a number (YAML's 1e-3 too, as in YAML 1.2 and JSON); quoted, it is not."""
    (tmp_path / "c.json").write_text(json.dumps({"max_epochs": 4, "gradient_clip_val": 1e-3, "seed": 0}))
    (tmp_path / "c.toml").write_text("[trainer]\nmax_epochs = 4\ngradient_clip_val = 1e-3\nseed = 0\n")
    (tmp_path / "c.yaml").write_text("max_epochs: 4\ngradient_clip_val: 1e-3\nseed: 0\n")
    for name in ("c.json", "c.toml", "c.yaml"):
        config = TrainerConfig.from_file(tmp_path / name, train_accuracy=True)
        assert (config.max_epochs, config.gradient_clip_val, config.seed) == (4, 1e-3, 0), name
    (tmp_path / "quoted.yaml").write_text("max_epochs: '4'\n")
    with pytest.raises(ValidationError, match="not the string '4': write the number without quotes"):
        TrainerConfig.from_file(tmp_path / "quoted.yaml")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("run.json", '{"trainer": {"max_epochs": 1, "max_epochs": 2}}', "sets the key 'max_epochs' twice"),
        (
            "run.toml",
            "[trainer]\nmax_epochs = 1\nmax_epochs = 2\n",
            "sets the key 'max_epochs' twice (the second time at line 3)",
        ),
        ("run.toml", "[trainer]\nseed = 1\n[trainer]\nseed = 2\n", "sets the key 'trainer' twice"),
        ("run.toml", "[trainer]\ncompile = {backend = 'a', backend = 'b'}\n", "sets the key 'backend' twice"),
        (
            "run.yaml",
            "trainer:\n  max_epochs: 1\n  device: cpu\n  max_epochs: 2\n",
            "sets the key 'max_epochs' twice (lines 2 and 4)",
        ),
        ("run.yml", "seed: 1\ntrainer: {}\nseed: 2\n", "sets the key 'seed' twice (lines 1 and 3)"),
    ],
)
def test_a_key_given_twice_is_an_error_naming_the_key_and_the_file(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    from dltrain.config import DuplicateKeyError

    (tmp_path / name).write_text(text)
    with pytest.raises(DuplicateKeyError) as info:
        TrainerConfig.from_file(tmp_path / name)
    assert str(info.value).startswith(f"config file {str(tmp_path / name)!r} {message}")
    assert isinstance(info.value, ConfigError)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "base: &base {max_epochs: 1, device: cpu}\ntrainer:\n  <<: *base\n  max_epochs: 2\n"
    )
    assert TrainerConfig.from_file(tmp_path / "c.yaml").max_epochs == 2
