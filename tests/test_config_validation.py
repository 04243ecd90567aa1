"""Property: every invalid configuration is a ``pydantic.ValidationError``, and nothing touches the disk first.

Hypothesis draws, for each ``TrainerConfig`` field, nothing, a valid value or an
invalid one (plus unknown keys and non-mapping ``config`` arguments), builds a
``Trainer`` in an empty working directory whose run and checkpoint
directories point inside it, and checks:

- the configuration is rejected exactly when something invalid was drawn,
  and then with a ``ValidationError`` that names the field (no ``TypeError``,
  ``ValueError`` or other exception type escapes);
- the working directory is still empty (validation comes before any file,
  and building a Trainer creates nothing; runs do, when they start).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import dltrain
from dltrain import TrainerConfig

MISSING = object()

# A value that no field of any type accepts.
JUNK = st.sampled_from([object(), [object()], {"nested": object()}, b"\xff", complex(1, 2)])


def positive_int(optional: bool) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    valid = st.integers(1, 10_000) | (st.none() if optional else st.nothing())
    invalid = (
        st.integers(max_value=0)
        | st.floats(allow_nan=True).filter(lambda f: not (math.isfinite(f) and f.is_integer() and f > 0))
        | st.sampled_from(["ten", "", "1e", "-3", "3", True, False, 3.0])  # strict: no bool, str or float
        | JUNK
        | (st.nothing() if optional else st.none())
    )
    return valid, invalid


def literal(*choices: str) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    valid = st.sampled_from(choices)
    invalid = st.text(max_size=12).filter(lambda s: s not in choices) | st.integers() | st.none() | JUNK
    return valid, invalid


def boolean() -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    return st.booleans(), st.sampled_from(["maybe", "2", 2, -1, 0.5, None, 1, 0, "true"]) | JUNK


def text() -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    return st.text(max_size=20), st.integers() | st.none() | st.lists(st.text(), max_size=2) | JUNK


def inside_cwd_path(optional: bool) -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    names = st.sampled_from(["runs", "out/runs", "a b", "ckpt/run1"])
    valid = names | names.map(Path) | (st.none() if optional else st.nothing())
    invalid = st.integers() | st.lists(st.integers(), min_size=1, max_size=2) | JUNK
    return valid, invalid


def compile_setting() -> tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]:
    """``compile``: a bool, or a mapping of CompileOptions fields (the backend is checked at run start)."""
    options = st.fixed_dictionaries(
        {},
        optional={
            "backend": st.sampled_from(["inductor", "aot_eager", "not-checked-until-a-run"]),
            "mode": st.sampled_from([None, "default", "reduce-overhead", "max-autotune"]),
            "fullgraph": st.booleans(),
            "dynamic": st.none() | st.booleans(),
        },
    )
    bad_options = st.sampled_from(
        [{"backend": 1}, {"mode": "fast"}, {"fullgraph": "maybe"}, {"backnd": "inductor"}]
    )
    return st.booleans() | options, boolean()[1] | bad_options


DEVICES_OK = ["auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps"]
DEVICES_BAD = ["tpu", "CPU", "cuda:", "cuda:x", "gpu", "", "cuda:0 ", "xla:0", "mps:0"]

FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "max_epochs": positive_int(optional=True),
    "max_steps": positive_int(optional=True),
    "limit_train_batches": positive_int(optional=True),
    "limit_val_batches": positive_int(optional=True),
    "val_every_n_epochs": positive_int(optional=False),
    "accumulate_grad_batches": positive_int(optional=False),
    "log_every_n_steps": positive_int(optional=False),
    "stop_check_every_n_steps": positive_int(optional=True),
    "gradient_clip_val": (
        st.floats(min_value=1e-6, max_value=1e6) | st.none(),
        st.floats(max_value=0.0) | st.just(math.nan) | st.sampled_from(["big", "", "1e-3", True]) | JUNK,
    ),
    "gradient_clip_algorithm": literal("norm", "value"),
    "scheduler_interval": literal("epoch", "step"),
    "scheduler_monitor": text(),
    "on_nonfinite": literal("raise", "skip", "stop"),
    "device": (st.sampled_from(DEVICES_OK), st.sampled_from(DEVICES_BAD) | st.integers() | st.none() | JUNK),
    "precision": literal("32", "bf16-mixed", "16-mixed"),
    "compile": compile_setting(),
    "seed": (st.integers(0, 2**32) | st.none(), st.sampled_from(["seed", 1.5, "", "0", True]) | JUNK),
    "accuracy": literal("auto", "always", "never"),
    "progress": literal("auto", "bar", "line", "off"),
    "run_dir": inside_cwd_path(optional=True),
    "disable_plugins": (
        st.lists(st.sampled_from(["metrics", "progress", "nope"]), max_size=3).map(tuple),
        st.sampled_from(["metrics"]) | st.lists(st.integers(), min_size=1, max_size=2) | JUNK,
    ),
    "autoload_plugins": boolean(),
}

CHECKPOINT_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "every_n_steps": positive_int(optional=True),
    "every_n_epochs": positive_int(optional=True),
    "save_on_fit_end": boolean(),
    "keep_last": positive_int(optional=False),
    "monitor": (st.none() | st.sampled_from(["val_loss", "train_accuracy"]), st.integers() | JUNK),
    "mode": literal("min", "max"),
    "keep_best": (
        st.integers(0, 10),
        st.integers(max_value=-1) | st.sampled_from(["all", 1.5, "1", False]) | JUNK,
    ),
}


@st.composite
def settings_for(
    draw: st.DrawFn, fields: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]
) -> tuple[dict[str, Any], list[str]]:
    """A mapping of some fields to valid or invalid values, and the names of the invalid ones."""
    chosen: dict[str, Any] = {}
    bad: list[str] = []
    for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=5)):
        valid, invalid = fields[name]
        if draw(st.integers(0, 3)) == 0:
            chosen[name] = draw(invalid)
            bad.append(name)
        else:
            chosen[name] = draw(valid)
    return chosen, bad


@st.composite
def configurations(draw: st.DrawFn) -> tuple[Any, dict[str, Any], list[str]]:
    """``(config argument, keyword fields, invalid field names)`` for ``Trainer(config, **fields)``."""
    fields, bad = draw(settings_for(FIELDS))
    fields.setdefault("progress", "off")
    kind = draw(st.sampled_from(["none", "kwargs", "checkpoint", "unknown", "not-a-mapping", "model"]))
    if kind == "checkpoint":
        ckpt, ckpt_bad = draw(settings_for(CHECKPOINT_FIELDS))
        if draw(st.booleans()):
            ckpt["dir"] = draw(inside_cwd_path(optional=False)[0])
        else:
            ckpt_bad.append("dir")  # required
        fields["checkpoint"] = ckpt
        bad += [f"checkpoint.{name}" for name in ckpt_bad]
    if kind == "unknown":
        typo = draw(st.sampled_from(["max_epoch", "lr", "checkpoint_dir", "Device"]))
        fields[typo] = 1
        bad.append(typo)
    if kind == "not-a-mapping":
        return (
            draw(st.sampled_from(["max_epochs=3", 3, [("max_epochs", 3)], None, 1.5])),
            fields,
            [*bad, "config"],
        )
    if kind == "model" and not bad:
        return TrainerConfig(max_epochs=2), fields, bad
    if kind == "none":
        return None, fields, bad
    return dict(fields), {}, bad


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=configurations())
def test_invalid_settings_are_a_validation_error_and_nothing_is_written(
    case: tuple[Any, dict[str, Any], list[str]], tmp_path: Path
) -> None:
    config, fields, bad = case
    if config is None and "config" in bad:  # ``Trainer(None)`` is the defaults: not an invalid config
        bad = [b for b in bad if b != "config"]
    if bad:
        with pytest.raises(ValidationError) as info:
            dltrain.Trainer(config, **fields)
        message = str(info.value)
        if "config" in bad:  # the config argument itself is checked first
            assert "Input should be a valid dictionary or instance of TrainerConfig" in message
        else:
            assert any(name.split(".")[0] in message for name in bad), message
    else:
        trainer = dltrain.Trainer(config, **fields)
        assert isinstance(trainer.config, TrainerConfig)
    assert list(tmp_path.iterdir()) == [], "something was written before a run started"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"max_epochs": 0}, "max_epochs"),
        ({"device": "tpu"}, "device"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
        ({"checkpoint": {"keep_last": 2}}, "checkpoint.dir"),
        ({"gradient_clip_val": float("nan")}, "gradient_clip_val"),
    ],
)
def test_examples_of_the_property(fields: dict[str, Any], field: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        dltrain.Trainer(**fields)
    assert list(tmp_path.iterdir()) == []


def test_a_config_argument_that_is_not_a_mapping_is_a_validation_error_naming_its_type() -> None:
    with pytest.raises(
        ValidationError, match="Input should be a valid dictionary or instance of TrainerConfig"
    ):
        dltrain.Trainer("max_epochs=3")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [-(2**63) - 1, 2**64])
def test_a_seed_torch_cannot_use_is_rejected_by_the_config(seed: int) -> None:
    with pytest.raises(ValidationError, match="seed"):
        TrainerConfig(seed=seed)
