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
from types import UnionType
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from dltrain.errors import ConfigError

if TYPE_CHECKING:  # names of newer pydantic releases than the lowest this supports: for types only
    from pydantic import ModelWrapValidatorHandler, ValidatorFunctionWrapHandler
    from pydantic_core import InitErrorDetails

__all__ = ["CheckpointConfig", "CompileOptions", "DuplicateKeyError", "TrainerConfig", "load_config_file"]

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")

# Numbers and switches are strict: from Python, True is not 1 and "3" is not 3 (pydantic's lax
# mode would take both). Files give typed values already: JSON, TOML, and YAML as read by
# yaml12_loader (whose 1e-3 is a float, as in YAML 1.2 and JSON).
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0)]  # an int is a number too: 1 is 1.0
StrictBool = Annotated[bool, Strict()]

#: Strings people mean as a bool, answered with how to write one.
_BOOL_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "1", "0"})

#: Pydantic's messages for a value of the wrong type, which the config rewrites to name what is allowed.
_TYPE_ERRORS = frozenset({"int_type", "float_type", "bool_type"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, defer_build=True)

    @model_validator(mode="wrap")
    @classmethod
    def _explain_errors(cls, data: Any, handler: ModelWrapValidatorHandler[Any]) -> Any:
        """Make pydantic's errors say what to do: "did you mean ...?" for an unknown setting; what
        the field allows, and why the value given is not it, for a value of the wrong type."""
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
                elif error["type"] in _TYPE_ERRORS and message.startswith("Input should be a valid"):
                    message = _wrong_type_message(cls, error["loc"], error["input"]) or message
                changed = changed or message != error["msg"]
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
    save_on_fit_end: StrictBool = Field(default=True, description="Save when fit ends.")
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
    fullgraph: StrictBool = Field(
        default=False,
        description="Fail at the first step if the forward cannot be captured as one graph, "
        "instead of splitting it at the unsupported code.",
    )
    dynamic: StrictBool | None = Field(
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
    manual_optimization: StrictBool = Field(
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
    stop_check_every_n_steps: PositiveInt | None = Field(
        default=None,
        description="Under torchrun: every how many optimizer steps the processes exchange stop requests "
        "(without waiting for each other), so that all stop at the same step. None: about every 50 ms "
        "of training, every step when steps are slower; a stop then lands at most 3 check intervals "
        "later. A number: exactly that cadence, so a stop lands at a step that depends only on when it "
        "was asked (at most 2n-1 steps later).",
    )
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        default="32",
        description="'32' (float32), 'bf16-mixed' (autocast to bfloat16; CPU or CUDA), "
        "'16-mixed' (autocast to float16 with a GradScaler; CUDA only).",
    )
    compile: StrictBool | CompileOptions = Field(
        default=False,
        description="Run the model through torch.compile: true (the defaults), false, or CompileOptions "
        "(backend, mode, fullgraph, dynamic).",
    )
    seed: Annotated[int, Strict()] | None = Field(
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
    train_accuracy: StrictBool = Field(
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

    preemption_signals: tuple[str, ...] = Field(
        default=("SIGTERM",),
        description="Signals that mean 'this job is being preempted': each stops the fit cleanly at the "
        "next step, saves a checkpoint, and exits with status 128 + its number (143 for SIGTERM). Add "
        "'SIGUSR1' for SLURM's --signal=USR1@90; () leaves every signal but Ctrl-C to its default.",
    )

    # --- plugins --------------------------------------------------------------
    disable_plugins: tuple[str, ...] = Field(
        default=(), description="Names of plugins not to register, built-ins included."
    )
    autoload_plugins: StrictBool = Field(
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

    @field_validator("preemption_signals")
    @classmethod
    def _check_signals(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        import signal

        names: list[str] = []
        for given in value:
            name = given.strip().upper()
            name = name if name.startswith("SIG") else "SIG" + name
            if name in ("SIGINT", "SIGKILL", "SIGSTOP"):
                why = (
                    "Ctrl-C has its own handling (stop, save, KeyboardInterrupt)"
                    if name == "SIGINT"
                    else "it cannot be handled"
                )
                raise ValueError(f"preemption_signals cannot hold {given!r}: {why}")
            if name not in signal.Signals.__members__:
                choices = ", ".join(
                    n for n in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP") if n in signal.Signals.__members__
                )
                raise ValueError(f"{given!r} is not a signal of this platform; use a name such as {choices}")
            names.append(name)
        return tuple(dict.fromkeys(names))

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


def _field_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> Any:
    """The FieldInfo of the (nested) field at ``loc``, or None."""
    if not loc:
        return None
    owner = model
    for part in loc[:-1]:
        fields = _fields_at(owner, (part,))
        field = owner.model_fields.get(str(part))
        if not fields or field is None:
            return None
        nested = [a for a in (field.annotation, *get_args(field.annotation)) if isinstance(a, type)]
        owner = next(a for a in nested if issubclass(a, BaseModel))
    return owner.model_fields.get(str(loc[-1]))


def _allowed(annotation: Any, metadata: list[Any]) -> str | None:
    """What a numeric or boolean field allows, in words ("a positive integer or None"), else None.

    ``metadata``: the field's own constraints (pydantic moves those of a top-level
    ``Annotated`` there; inside ``X | None`` they stay in the annotation).
    """
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    optional = type(None) in members
    described: list[str] = []
    for member in members:
        if member is type(None):
            continue
        base, *extras = get_args(member) if get_origin(member) is Annotated else (member,)
        constraints = [c for e in (*extras, *metadata) for c in (getattr(e, "metadata", None) or [e])]
        positive = any(getattr(c, "gt", None) == 0 for c in constraints)
        non_negative = any(getattr(c, "ge", None) == 0 for c in constraints)
        if base is bool:
            described.append("True or False")
        elif base is int:
            described.append(
                "a positive integer" if positive else "an integer >= 0" if non_negative else "an integer"
            )
        elif base is float:
            described.append("a positive number" if positive else "a number")
        else:
            return None
    if not described:
        return None
    return " or ".join(described + (["None"] if optional else []))


def _wrong_type_message(model: type[BaseModel], loc: tuple[int | str, ...], value: Any) -> str | None:
    """ "Input should be a positive integer or None, not the bool True" for a strict field given a
    value of another type; None when the field is not one of the config's numbers or switches."""
    field = _field_at(model, loc)
    allowed = _allowed(field.annotation, field.metadata) if field is not None else None
    if allowed is None:
        return None
    if isinstance(value, bool):
        what = f"the bool {value!r}: a bool is not a number here" if "True" not in allowed else f"{value!r}"
    elif isinstance(value, str):
        what = f"the string {value!r}"
        if "True" not in allowed and _looks_numeric(value):
            what += f": write the number without quotes ({value.strip()})"
        elif "True" in allowed and value.strip().lower() in _BOOL_WORDS:
            what += ": write True or False (true or false in a file), without quotes"
    else:
        what = f"the {type(value).__name__} {value!r}"
    return f"Input should be {allowed}, not {what}"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class DuplicateKeyError(ConfigError):
    """A key given twice in one mapping of a config file (JSON, TOML or YAML) or override.

    Attributes:
        key: The key.
        lines: The 1-based lines of its occurrences, when the format tells them.
    """

    def __init__(self, key: str, lines: tuple[int, ...] = (), source: str | None = None) -> None:
        self.key, self.lines = key, lines
        where = f"config file {source!r}" if source else "the YAML value"
        if len(lines) > 1:
            at = f" (lines {' and '.join(map(str, lines))})"
        else:
            at = f" (the second time at line {lines[0]})" if lines else ""
        super().__init__(
            f"{where} sets the key {key!r} twice{at}; a key may appear once in a mapping: remove one of them"
        )


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of :func:`json.loads`: a dict, refusing a key given twice."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise DuplicateKeyError(key)
        data[key] = value
    return data


_TOML_DUPLICATE = re.compile(
    r"^(?:Cannot overwrite a value|Cannot declare \((?P<table>.*)\) twice|"
    r"Duplicate inline table key '(?P<inline>[^']*)') \(at line (?P<line>\d+), column \d+\)$"
)


def _toml_duplicate(message: str, text: str, source: str) -> DuplicateKeyError | None:
    """The duplicate key a ``tomllib`` error is about (its messages name a line, not always the key)."""
    match = _TOML_DUPLICATE.match(message)
    if match is None:
        return None
    line = int(match["line"])
    if match["inline"] is not None:
        key = match["inline"]
    elif match["table"] is not None:
        key = ".".join(part.strip().strip("'\"") for part in match["table"].split(",") if part.strip())
    else:
        here = text.splitlines()[line - 1].strip() if line <= len(text.splitlines()) else ""
        key = here.strip("[]").strip() if here.startswith("[") else here.partition("=")[0].strip()
    return DuplicateKeyError(key, (line,), source)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON, TOML or YAML file into a dict, with errors that name the file.

    Raises:
        ConfigError: the file is missing, has another suffix, is not valid in its
            format, sets a key twice in one mapping (:class:`DuplicateKeyError`),
            or does not hold a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist; pass the path of a .json, .toml or .yaml file"
        )
    suffix = p.suffix.lower()
    text = p.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            data: Any = json.loads(text, object_pairs_hook=_json_object)
        elif suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - Python 3.10
                import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]
            try:
                data = tomllib.loads(text)
            except tomllib.TOMLDecodeError as exc:
                duplicate = _toml_duplicate(str(exc), text, str(p))
                if duplicate is not None:
                    raise duplicate from None
                raise
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
    except DuplicateKeyError as exc:
        raise DuplicateKeyError(exc.key, exc.lines, str(p)) from None
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
    """PyYAML's safe loader, read as YAML 1.2 where 1.1 surprises, and without duplicate keys.

    - Booleans are only true/false, so ``progress: off`` stays a string (YAML 1.1,
      PyYAML's default, reads ``off``, ``on``, ``yes`` and ``no`` as booleans).
    - ``1e-3`` and ``1e3`` are floats, as in YAML 1.2 and JSON (YAML 1.1 wants a
      dot and a signed exponent, ``1.0e-3``, and reads ``1e-3`` as a string).
    - A key given twice in one mapping raises :class:`DuplicateKeyError` (PyYAML
      keeps the last silently); keys merged in with ``<<`` may be overridden.
    """
    import yaml

    class Yaml12SafeLoader(yaml.SafeLoader):  # type: ignore[misc,unused-ignore]  # PyYAML has no type hints
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                first_line: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        if key in first_line:
                            raise DuplicateKeyError(str(key), (first_line[key], line))
                        first_line[key] = line
                    except TypeError:  # an unhashable key: PyYAML's own error follows
                        break
            return super().construct_mapping(node, deep=deep)

    loader: Any = Yaml12SafeLoader
    bool_tag, float_tag = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"
    loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    loader.add_implicit_resolver(
        bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
    )
    loader.add_implicit_resolver(
        float_tag,
        re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+.0123456789"),
    )
    return loader
