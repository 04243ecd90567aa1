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
