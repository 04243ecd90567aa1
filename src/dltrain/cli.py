"""The ``dltrain`` command.

```
dltrain fit --config run.yaml [--trainer.max_epochs 3 ...] [--print-config]
dltrain plugins [--config run.yaml]
dltrain verify-resume --config run.yaml [--steps 20] [--interrupt-at 10] [--fresh-process] [overrides]
dltrain config-schema
dltrain plot RUN_DIR [--out curves.png]
```

``fit`` trains what a run file names (see :mod:`dltrain.run_config`);
overrides are dotted keys of that file and may come before or after
``--config``. ``plugins`` lists the registered plugins and the hooks each
implements; ``verify-resume`` checks that the run file's program resumes from
a checkpoint bit for bit (see :mod:`dltrain.verify`); ``config-schema`` prints the JSON schema of the run file;
``plot`` draws a run folder's learning curves to a PNG.

Exit status: 0 on success, 2 for a configuration error (the message names
the key), 1 when training failed with a dltrain error, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dltrain._markers import DISTRIBUTION, hookimpl
from dltrain.errors import ConfigError, DltrainError

if TYPE_CHECKING:
    from dltrain.run_config import RunConfig
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["main"]

_EPILOG_FIT = """\
overrides: any key of the run file as --dotted.key VALUE or --dotted.key=VALUE, before
or after --config; VALUE is read as YAML (3, 0.1, null, true, [1, 2], {a: 1}). Examples:
  dltrain fit --config run.yaml --trainer.max_epochs 3 --optimizer.init_args.lr 0.1
  dltrain fit --trainer.device=cpu --config run.yaml --print-config
  dltrain fit --config run.yaml --resume last       # continue from the newest checkpoint
  dltrain fit --config run.yaml --trainer.checkpoint.dir ckpt --resume auto   # a requeued job
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dltrain",
        description="Train PyTorch models from a config file; inspect plugins; plot runs.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    fit = commands.add_parser(
        "fit",
        help="train (and test) what a run file names",
        description="Build the model, optimizer, loss and data a run file names, then fit "
        "(and test, when data.test is given).",
        epilog=_EPILOG_FIT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    fit.add_argument("--config", "-c", metavar="FILE", help="the run file (.yaml, .json or .toml)")
    fit.add_argument(
        "--print-config",
        action="store_true",
        help="print the validated run configuration (file plus overrides) and exit",
    )
    plugins = commands.add_parser(
        "plugins",
        help="list the plugins a Trainer registers and the hooks each implements",
        allow_abbrev=False,
    )
    plugins.add_argument("--config", "-c", metavar="FILE", help="use the trainer section of this run file")
    verify = commands.add_parser(
        "verify-resume",
        help="check that a run file's program resumes from a checkpoint bit for bit",
        description="Train the run file's program N steps straight; then K steps, a checkpoint and a "
        "resume; compare everything both runs end with, and name the first difference.",
        allow_abbrev=False,
    )
    verify.add_argument("--config", "-c", metavar="FILE", required=True, help="the run file")
    verify.add_argument("--steps", type=int, default=20, help="optimizer steps of the straight run (20)")
    verify.add_argument("--interrupt-at", type=int, default=None, help="the step to interrupt after (half)")
    verify.add_argument("--fresh-process", action="store_true", help="resume in a new process")
    commands.add_parser("config-schema", help="print the JSON schema of the run file", allow_abbrev=False)
    plot = commands.add_parser(
        "plot", help="draw a run folder's learning curves to a PNG", allow_abbrev=False
    )
    plot.add_argument(
        "run_dir",
        metavar="RUN_DIR",
        help="a run folder (runs/2026-11-28_13-05-12) or the folder of runs (newest is used)",
    )
    plot.add_argument("--out", "-o", metavar="PNG", help="where to write (default: RUN_DIR/curves.png)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dltrain`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if args.version:
        from importlib.metadata import version

        print(f"dltrain {version(DISTRIBUTION)}")
        return 0
    if args.command is None:
        parser.print_help()
        return 2
    if extra and args.command not in ("fit", "verify-resume"):
        parser.error(f"unrecognized arguments for {args.command!r}: {' '.join(extra)}")
    try:
        if args.command == "fit":
            return _fit(args.config, extra, print_config=args.print_config)
        if args.command == "plugins":
            return _plugins(args.config)
        if args.command == "verify-resume":
            return _verify_resume(args.config, extra, args.steps, args.interrupt_at, fresh=args.fresh_process)
        if args.command == "config-schema":
            return _config_schema()
        return _plot(args.run_dir, args.out)
    except ConfigError as exc:
        _error(args.command, exc)
        return 2
    except DltrainError as exc:
        _error(args.command, exc)
        return 1
    except KeyboardInterrupt:
        print(f"dltrain {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _error(command: str, exc: BaseException, stream: TextIO | None = None) -> None:
    print(f"dltrain {command}: error: {exc}", file=stream or sys.stderr)


# ---------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------


class _RunFileWriter:
    """Stores the whole run configuration as ``run.json`` in the metric log's run folder."""

    name = "cli_run_file"

    def __init__(self, run: RunConfig) -> None:
        self._data = run.model_dump(mode="json")

    @hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Write ``run.json`` next to ``config.json`` (metric_log creates the folder first)."""
        run_path = getattr(trainer.plugin_manager.get_plugin("metric_log"), "run_path", None)
        if run_path is not None and state.is_global_zero:
            (Path(run_path) / "run.json").write_text(json.dumps(self._data, indent=2) + "\n", "utf-8")


def _dump(data: Any) -> str:
    try:
        import yaml
    except ImportError:  # pragma: no cover - pyyaml is a dev dependency
        return json.dumps(data, indent=2)
    return str(yaml.safe_dump(data, sort_keys=False))


def _fit(config: str | None, override_tokens: Sequence[str], *, print_config: bool) -> int:
    from dltrain.run_config import add_import_dirs, load_run_config, parse_overrides

    if config is None and not override_tokens:
        raise ConfigError("no run to fit: pass --config FILE (a .yaml, .json or .toml run file)")
    overrides = parse_overrides(override_tokens)
    run = load_run_config(config, overrides)
    if print_config:
        print(_dump(run.model_dump(mode="json")), end="")
        return 0
    add_import_dirs(config)
    trainer, result = _build_and_fit(run)
    metric_log = trainer.plugin_manager.get_plugin("metric_log")
    run_path = getattr(metric_log, "run_path", None)
    if result is not None:
        print("test: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if isinstance(run_path, Path):
        shown = run_path.relative_to(Path.cwd()) if run_path.is_relative_to(Path.cwd()) else run_path
        print(f"run folder: {shown}  (plot it: dltrain plot {shown})")
    return 0


def _build_and_fit(run: RunConfig) -> tuple[Trainer, dict[str, float] | None]:
    import torch

    from dltrain._rng import seed_everything
    from dltrain.run_config import build, build_plugins
    from dltrain.trainer import Trainer

    if run.seed is not None:
        seed_everything(run.seed)
    model = build(run.model, "model")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(
            f"model.class_path: {run.model.class_path!r} returned a {type(model).__name__}, "
            f"not a torch.nn.Module"
        )
    optimizer = build(run.optimizer, "optimizer", model.parameters())
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer.class_path: {run.optimizer.class_path!r} returned a {type(optimizer).__name__}, "
            f"not a torch.optim.Optimizer"
        )
    scheduler = build(run.scheduler, "scheduler", optimizer) if run.scheduler is not None else None
    loss_fn = build(run.loss, "loss", as_is_if_function=True) if run.loss is not None else None
    train = build(run.data.train, "data.train")
    val = build(run.data.val, "data.val") if run.data.val is not None else None
    test = build(run.data.test, "data.test") if run.data.test is not None else None
    plugins = build_plugins(run.plugins)
    trainer = Trainer(run.trainer, plugins=[*plugins, _RunFileWriter(run)])
    trainer.fit(
        model,
        train,
        optimizer=optimizer,
        loss_fn=loss_fn,
        val_data=val,
        scheduler=scheduler,
        resume=run.resume,
    )
    result = trainer.test(model, test) if test is not None else None
    return trainer, result


class RunFileParts:
    """Builds the parts of a run file anew each call: what :func:`dltrain.verify.verify_resume` needs.

    Picklable (it holds the validated run file), so a resume in a fresh process can rebuild them.
    """

    def __init__(self, run: RunConfig, config_path: str) -> None:
        self.run, self.config_path = run, config_path

    def model(self) -> Any:
        """The model the run file names."""
        from dltrain.run_config import add_import_dirs, build

        add_import_dirs(self.config_path)
        return build(self.run.model, "model")

    def optimizer(self, model: Any) -> Any:
        """The optimizer the run file names, over ``model``'s parameters."""
        from dltrain.run_config import build

        return build(self.run.optimizer, "optimizer", model.parameters())

    def scheduler(self, optimizer: Any) -> Any:
        """The scheduler the run file names, of ``optimizer``."""
        from dltrain.run_config import build

        return build(self.run.scheduler, "scheduler", optimizer) if self.run.scheduler is not None else None


def _verify_resume(
    config: str, override_tokens: Sequence[str], steps: int, interrupt_at: int | None, *, fresh: bool
) -> int:
    from dltrain.run_config import add_import_dirs, build, load_run_config, parse_overrides
    from dltrain.trainer import Trainer

    run = load_run_config(config, parse_overrides(override_tokens))
    add_import_dirs(config)
    parts = RunFileParts(run, config)
    trainer_config = run.trainer.model_copy(
        update={"seed": run.seed if run.seed is not None else run.trainer.seed}
    )
    loss_fn = build(run.loss, "loss", as_is_if_function=True) if run.loss is not None else None
    train = build(run.data.train, "data.train")
    val = build(run.data.val, "data.val") if run.data.val is not None else None
    report = Trainer(trainer_config).verify_resume(
        parts.model, train, optimizer_factory=parts.optimizer, loss_fn=loss_fn,
        scheduler_factory=parts.scheduler if run.scheduler is not None else None, val_data=val,
        steps=steps, interrupt_at=interrupt_at, fresh_process=fresh,
    )  # fmt: skip
    print(report)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------
# plugins, config-schema, plot
# ---------------------------------------------------------------------------


def _plugins(config: str | None) -> int:
    from pydantic import TypeAdapter, ValidationError

    from dltrain._plugin_manager import hookspecs_in_order
    from dltrain.config import TrainerConfig
    from dltrain.run_config import (
        ComponentSpec,
        add_import_dirs,
        build_plugins,
        format_validation_error,
        read_run_file,
    )
    from dltrain.trainer import Trainer

    section: dict[str, Any] = {}
    plugin_specs: Any = []
    if config is not None:
        data = read_run_file(config)
        # A run file: its trainer section (possibly absent) and its plugins; else a TrainerConfig file.
        is_run_file = bool(set(data) & {"trainer", "model", "optimizer", "data", "plugins"})
        section = dict(data.get("trainer") or {}) if is_run_file else data
        plugin_specs = (data.get("plugins") or []) if is_run_file else []
    try:
        trainer_config = TrainerConfig.model_validate(section)
        specs = TypeAdapter(list[ComponentSpec]).validate_python(plugin_specs)
    except ValidationError as exc:
        prefix = "trainer" if exc.title == TrainerConfig.__name__ else "plugins"
        message = format_validation_error(exc, repr(config), prefix=prefix)
        raise ConfigError(f"invalid run configuration:\n{message}") from None
    add_import_dirs(config)
    plugins = build_plugins(specs)
    manager = Trainer(trainer_config, plugins=plugins).plugin_manager
    order = {name: i for i, name in enumerate(hookspecs_in_order())}
    infos = manager.plugins()
    width = max([len(i.name) for i in infos] + [4])
    print("Plugins, in registration order (within a hook, the newest runs first):")
    for info in infos:
        print(f"  {info.name:<{width}}  {info.source:<10}  {info.origin}")
        hooks = sorted(info.hooks, key=lambda h: order.get(h, len(order)))
        print(f"  {'':<{width}}  hooks: {', '.join(hooks) or '-'}")
    print()
    print("Hooks, as declared in dltrain.hookspecs, each with its implementations in call order:")
    for line in manager.explain().splitlines():
        print(f"  {line}")
    return 0


def _config_schema() -> int:
    from dltrain.run_config import RunConfig

    print(json.dumps(RunConfig.model_json_schema(), indent=2))
    return 0


def _plot(run_dir: str, out: str | None) -> int:
    from dltrain.plot import plot_run

    path = plot_run(run_dir, out)
    print(path)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
