"""Validated configuration: :class:`TrainerConfig`, :class:`CheckpointConfig` and :class:`CompileOptions`.

Every knob of a run lives here, checked by pydantic before anything happens:
an unknown field, ``max_epochs=0`` or ``device="tpu"`` raise a
``pydantic.ValidationError`` that names the field and what it allows, before
any file is written or any model is touched.
"""

from __future__ import annotations

import difflib
import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dltrain.errors import ConfigError

if TYPE_CHECKING:  # names of newer pydantic releases than the lowest this supports: for types only
    from pydantic import ModelWrapValidatorHandler, ValidatorFunctionWrapHandler
    from pydantic_core import InitErrorDetails

__all__ = ["CheckpointConfig", "CompileOptions", "TrainerConfig", "load_config_file"]

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, defer_build=True)

    @model_validator(mode="wrap")
    @classmethod
    def _suggest_field(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        """Add "did you mean ...?" to pydantic's error for an unknown setting."""
        try:
            return handler(data)
        except ValidationError as exc:
            errors: list[InitErrorDetails] = []
            changed = False
            for error in exc.errors():
                message = error["msg"]
                if error["type"] == "extra_forbidden" and "did you mean" not in message:
                    fields = _fields_at(cls, error["loc"][:-1])
                    close = difflib.get_close_matches(str(error["loc"][-1]), fields, n=1)
                    if close:
                        message += f"; did you mean {close[0]!r}?"
                        changed = True
                errors.append(
                    {
                        "type": PydanticCustomError(error["type"], message),
                        "loc": error["loc"],
                        "input": error["input"],
                    }
                )
            if not changed:
                raise
            raise ValidationError.from_exception_data(exc.title, errors) from None


class CheckpointConfig(_Strict):
    """Where and when the built-in checkpoint plugin saves.

    Checkpointing is on when ``TrainerConfig.checkpoint`` is set.
    """

    dir: Path = Field(description="Directory that holds the checkpoints (created if missing).")
    every_n_steps: PositiveInt | None = Field(
        default=None, description="Save every N optimizer steps; None: not by steps."
    )
    every_n_epochs: PositiveInt | None = Field(
        default=1, description="Save at the end of every N epochs; None: not by epochs."
    )
    save_on_fit_end: bool = Field(default=True, description="Save when fit ends.")
    keep_last: PositiveInt = Field(default=2, description="How many of the newest to keep.")
    monitor: str | None = Field(
        default=None, description="Metric that ranks checkpoints for 'best' (e.g. 'val_loss')."
    )
    mode: Literal["min", "max"] = Field(
        default="min", description="Whether a smaller ('min') or larger ('max') metric is better."
    )
    keep_best: NonNegativeInt = Field(
        default=1, description="How many of the best (by `monitor`) to keep as well."
    )
    async_save: bool = Field(
        default=True,
        description="Write checkpoints in a background thread: training goes on once the state is "
        "copied to CPU memory (one extra copy of the model and optimizer state, kept between saves). "
        "False: training waits for each save to be written.",
    )


class CompileOptions(_Strict):
    """How ``torch.compile`` compiles the model (``TrainerConfig.compile``).

    The arguments of the same names of ``torch.compile``; ``compile=True``
    means these defaults. The backend is checked when a run starts, not here
    (listing the backends imports ``torch._dynamo``, which takes seconds): an
    unknown one raises :class:`~dltrain.ConfigError` naming the available ones.
    """

    backend: str = Field(
        default="inductor",
        description="The torch.compile backend: 'inductor' (generates C++/Triton kernels), 'aot_eager' "
        "(traces forward and backward, runs them eagerly: checks that the model compiles), or any "
        "registered one (torch._dynamo.list_backends(exclude_tags=())).",
    )
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = Field(
        default=None,
        description="Inductor's trade-off: 'reduce-overhead' and 'max-autotune' use CUDA graphs; "
        "'max-autotune*' spend longer compiling for faster kernels. None: torch's default. "
        "Backends other than inductor may ignore it.",
    )
    fullgraph: bool = Field(
        default=False,
        description="Fail at the first step if the forward cannot be captured as one graph, "
        "instead of splitting it at the unsupported code.",
    )
    dynamic: bool | None = Field(
        default=None,
        description="Compile for dynamic shapes: True from the start, False never (recompile for each "
        "new shape), None when a shape changes (such as a smaller last batch).",
    )


class TrainerConfig(_Strict):
    """Every setting of a :class:`dltrain.Trainer`, validated.

    Pass it whole (``Trainer(TrainerConfig(...))``) or as keywords
    (``Trainer(max_epochs=3)``); load it from a file with
    :meth:`from_file`; export its JSON schema with ``TrainerConfig.model_json_schema()``.
    """

    # --- how long ---------------------------------------------------------
    max_epochs: PositiveInt | None = Field(
        default=None,
        description="Stop after this many epochs. With max_steps also unset, 1.",
    )
    max_steps: PositiveInt | None = Field(default=None, description="Stop after this many optimizer steps.")
    limit_train_batches: PositiveInt | None = Field(
        default=None, description="Use at most this many training batches per epoch."
    )
    limit_val_batches: PositiveInt | None = Field(
        default=None, description="Use at most this many batches per evaluation."
    )
    val_every_n_epochs: PositiveInt = Field(
        default=1, description="Validate after every N training epochs (and after the last)."
    )

    # --- how each step runs -------------------------------------------------
    accumulate_grad_batches: PositiveInt = Field(
        default=1, description="Micro-batches whose gradients are summed per optimizer step."
    )
    gradient_clip_val: PositiveFloat | None = Field(
        default=None, description="Clip gradients to this norm or value before each step."
    )
    gradient_clip_algorithm: Literal["norm", "value"] = Field(
        default="norm", description="Clip by total norm ('norm') or elementwise ('value')."
    )
    scheduler_interval: Literal["epoch", "step"] = Field(
        default="epoch",
        description="Step the LR scheduler after every epoch or every optimizer step.",
    )
    scheduler_monitor: str = Field(
        default="val_loss",
        description="Metric passed to ReduceLROnPlateau-style schedulers.",
    )
    manual_optimization: bool = Field(
        default=False,
        description="The training_step drives the update itself, through trainer.backward(loss) and "
        "trainer.optimizer_step(name) (GANs, custom update rules); False: the Trainer does backward and "
        "steps every optimizer.",
    )
    on_nonfinite: Literal["raise", "skip", "stop", "rollback"] = Field(
        default="raise",
        description="What a NaN/inf loss or weight does: raise, skip the step, stop the run, or roll back "
        "to the newest checkpoint, skip the batch that caused it and go on (needs checkpoint).",
    )
    rollback_lr_scale: PositiveFloat = Field(
        default=1.0,
        description="With on_nonfinite='rollback': multiply every learning rate by this at each rollback "
        "(e.g. 0.5); 1.0 keeps them.",
    )
    max_rollbacks: PositiveInt = Field(
        default=3,
        description="With on_nonfinite='rollback': give up (a NonFiniteError, the model left at the newest "
        "checkpoint) at the rollback after this many.",
    )

    # --- where --------------------------------------------------------------
    device: str = Field(
        default="auto",
        description="'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:N', 'mps'.",
    )
    strategy: Literal["auto", "ddp", "fsdp"] = Field(
        default="auto",
        description="How several processes (under torchrun) train: 'auto' and 'ddp' replicate the model "
        "(DistributedDataParallel); 'fsdp' shards parameters, gradients and optimizer state (FSDP2 "
        "fully_shard). One process trains as usual with any value.",
    )
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        default="32",
        description="'32' (float32), 'bf16-mixed' (autocast to bfloat16; CPU or CUDA), "
        "'16-mixed' (autocast to float16 with a GradScaler; CUDA only).",
    )
    compile: bool | CompileOptions = Field(
        default=False,
        description="Run the model through torch.compile: true (the defaults), false, or CompileOptions "
        "(backend, mode, fullgraph, dynamic).",
    )
    seed: int | None = Field(
        default=None,
        ge=-(2**63),
        lt=2**64,
        description="Seed Python, NumPy and torch before the run starts.",
    )

    # --- what people see and keep --------------------------------------------
    accuracy: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Report accuracy: when outputs look like class scores ('auto'), always, never.",
    )
    train_accuracy: bool = Field(
        default=False,
        description=(
            "Report accuracy for training epochs too (validation and test report it by default); "
            "costs a few small tensor operations per step."
        ),
    )
    progress: Literal["auto", "bar", "line", "off"] = Field(
        default="auto",
        description="Progress display: a live bar in a terminal, one line per epoch, or none.",
    )
    log_every_n_steps: PositiveInt = Field(
        default=50, description="Interval, in optimizer steps, of step-level metric logging."
    )
    run_dir: Path | None = Field(
        default=Path("runs"),
        description="Where each run writes its metric log (a new subfolder per run); None: none.",
    )
    checkpoint: CheckpointConfig | None = Field(
        default=None, description="Checkpointing settings; None turns checkpointing off."
    )

    # --- plugins --------------------------------------------------------------
    disable_plugins: tuple[str, ...] = Field(
        default=(), description="Names of plugins not to register, built-ins included."
    )
    autoload_plugins: bool = Field(
        default=True,
        description="Load plugins installed under the 'dltrain' entry-point group.",
    )

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError(
                f"device {value!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N' (N a number), 'mps'"
            )
        return value

    @field_validator("compile", mode="wrap")
    @classmethod
    def _one_compile_error(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Report the errors of the form given (a mapping: its fields; else: not a bool), not both."""
        try:
            return handler(value)
        except ValidationError as exc:
            if not isinstance(value, (Mapping, CompileOptions)):
                raise PydanticCustomError(
                    "compile_type", "Input should be true, false or a mapping of CompileOptions fields"
                ) from None
            errors: list[InitErrorDetails] = [
                {
                    "type": PydanticCustomError(error["type"], error["msg"]),
                    "loc": error["loc"][1:],  # without the tag of the union member
                    "input": error["input"],
                }
                for error in exc.errors()
                if error["loc"][:1] != ("bool",)
            ]
            if not errors:
                raise
            raise ValidationError.from_exception_data(exc.title, errors) from None

    def compile_options(self) -> CompileOptions | None:
        """The :class:`CompileOptions` of this run (``compile=True``: the defaults), or None."""
        if isinstance(self.compile, CompileOptions):
            return self.compile
        return CompileOptions() if self.compile else None

    @model_validator(mode="after")
    def _rollback_needs_checkpoints(self) -> TrainerConfig:
        if self.on_nonfinite == "rollback" and self.checkpoint is None:
            raise ValueError(
                "on_nonfinite='rollback' restores the newest checkpoint, but checkpointing is off: set "
                "checkpoint={'dir': ..., 'every_n_steps': N} (a rollback goes back at most N steps)"
            )
        return self

    @model_validator(mode="after")
    def _default_length(self) -> TrainerConfig:
        if self.max_epochs is None and self.max_steps is None:
            object.__setattr__(self, "max_epochs", 1)
        return self

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainerConfig:
        """Load a config from a JSON, TOML or YAML file.

        ``overrides`` replace keys of the file. A top-level ``trainer`` table,
        when present, is used (so one file can also hold other sections).
        """
        data = load_config_file(path)
        if isinstance(data.get("trainer"), dict):
            data = data["trainer"]
        return cls.model_validate({**data, **overrides})

    def to_json_dict(self) -> dict[str, Any]:
        """The config as JSON-compatible data (paths as strings)."""
        data: dict[str, Any] = json.loads(self.model_dump_json())
        return data


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the (nested) model at ``loc``; empty when it is not a model."""
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        nested = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type)]
        models = [a for a in nested if issubclass(a, BaseModel)]
        if not models:
            return []
        model = models[0]
    return list(model.model_fields)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON, TOML or YAML file into a dict, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist; pass the path of a .json, .toml or .yaml file"
        )
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            data: Any = json.loads(text)
        elif suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise ConfigError(
                    f"reading {str(p)!r} needs PyYAML: pip install 'torch-dltrain[yaml]'"
                ) from exc
            data = yaml.load(text, Loader=yaml12_loader())  # a SafeLoader subclass
        else:
            raise ConfigError(
                f"config file {str(p)!r} has suffix {suffix!r}; use .json, .toml, .yaml or .yml"
            )
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid {suffix[1:].upper()}: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(p)!r} holds a {type(data).__name__}; it must hold a mapping of settings"
        )
    return dict(data)


def yaml12_loader() -> Any:
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false, so ``progress: off`` stays a string.

    (YAML 1.1, PyYAML's default, reads ``off``, ``on``, ``yes`` and ``no`` as booleans.)
    """
    import yaml

    loader: Any = type("Yaml12SafeLoader", (yaml.SafeLoader,), {})
    bool_tag = "tag:yaml.org,2002:bool"
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver(
        bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    return loader
