"""Learning curves of a run folder, drawn to a PNG: ``dltrain plot RUN_DIR`` or :func:`plot_run`.

Reads the ``metrics.jsonl`` the ``metric_log`` plugin writes and draws one
panel per metric (loss first): the training and validation values per
epoch, the step-level training loss as a thin line behind them, the test
value (when the run was tested) as a star after the last epoch, and the
step metrics plugins add (``compute_step_metrics``), one panel per kind:
the learning rates (the Trainer's ``lr`` when it changed during the run,
and every series of :class:`~dltrain.callbacks.LearningRateMonitor`), the
momentum and betas, the gradient norms, and any other step metric. An epoch
metric that is also a step metric (``train_lr-default/group0``) is drawn from
the finer step rows.

Needs matplotlib (``pip install 'torch-dltrain[plot]'``), imported only when a
plot is drawn. It draws with the Agg canvas directly, so it works without a
display and leaves pyplot's global backend alone.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from dltrain.default_plugins.metric_log import METRICS_FILE, read_metrics
from dltrain.errors import ConfigError, DltrainError

__all__ = ["find_run", "plot_run", "step_panel", "step_series"]

_PREFIXES = ("train", "val", "test")
_STYLE = {
    "train": {"color": "tab:blue", "marker": "o", "label": "train"},
    "val": {"color": "tab:orange", "marker": "s", "label": "validation"},
}
_NOT_METRICS = frozenset({"kind", "epoch", "step", "time", "lr"})
_ROW_KEYS = frozenset({"kind", "epoch", "step", "time"})
LEARNING_RATE = "learning rate"


def step_panel(name: str) -> str:
    """The panel of a step metric: the learning rates together, momentum and betas together,
    else the metric's name up to its first ``-`` or ``/`` (``grad_norm_layer/fc1`` -> ``grad norm layer``)."""
    if name == "lr" or name.startswith(("lr_", "lr-")):
        return LEARNING_RATE
    if name.startswith(("momentum-", "beta1-", "beta2-")):
        return "momentum and betas"
    return re.split(r"[-/]", name, maxsplit=1)[0].replace("_", " ")


def step_series(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """The step metrics of ``rows`` other than the losses, grouped by panel (see :func:`step_panel`).

    The Trainer's own ``lr``/``lr_<optimizer>`` (the first group's) are left out when a
    learning-rate monitor's series are there, and when they never changed.
    """
    names: dict[str, None] = {}
    for row in rows:
        if row.get("kind") != "step":
            continue
        for name, value in row.items():
            if name in _ROW_KEYS or _split(name) is not None or not isinstance(value, (int, float)):
                continue
            names[name] = None
    panels: dict[str, list[str]] = {}
    for name in names:
        panels.setdefault(step_panel(name), []).append(name)
    own = [n for n in panels.get(LEARNING_RATE, []) if n == "lr" or n.startswith("lr_")]
    if own and len(own) < len(panels[LEARNING_RATE]):  # a monitor's series say it all, per group
        panels[LEARNING_RATE] = [n for n in panels[LEARNING_RATE] if n not in own]
    elif own:
        changed = any(len({r[n] for r in rows if r.get("kind") == "step" and n in r}) > 1 for n in own)
        if not changed:
            del panels[LEARNING_RATE]
    return panels


def find_run(run_dir: str | Path) -> Path:
    """The run folder ``run_dir`` names: itself if it holds ``metrics.jsonl``, else its newest run.

    Raises:
        ConfigError: ``run_dir`` does not exist or holds no run.
    """
    path = Path(run_dir)
    if (path / METRICS_FILE).is_file():
        return path
    if not path.is_dir():
        raise ConfigError(
            f"run folder {str(path)!r} does not exist; pass a folder written by a run "
            f"(e.g. runs/2026-11-28_13-05-12) or the folder that holds them (runs)"
        )
    runs = [p for p in path.iterdir() if (p / METRICS_FILE).is_file()]
    if not runs:
        raise ConfigError(
            f"{str(path)!r} holds no {METRICS_FILE}, and no run folder with one; runs write it "
            f"when TrainerConfig.run_dir is set (the default, 'runs')"
        )
    return max(runs, key=lambda p: ((p / METRICS_FILE).stat().st_mtime, p.name))


def _split(name: str) -> tuple[str, str] | None:
    prefix, _, base = name.partition("_")
    return (prefix, base) if prefix in _PREFIXES and base else None


def _step_to_epoch(epoch_rows: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Points (step, epoch) to place step rows on the epoch axis."""
    steps: list[float] = []
    epochs: list[float] = []
    for row in epoch_rows:
        if isinstance(row.get("step"), int) and isinstance(row.get("epoch"), int):
            if not steps and row["epoch"] == 1:
                steps.append(0.0)
                epochs.append(0.0)
            if not steps or row["step"] > steps[-1]:
                steps.append(float(row["step"]))
                epochs.append(float(row["epoch"]))
    return steps, epochs


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return ys[0] if ys else x
    for i in range(1, len(xs)):
        if x <= xs[i] or i == len(xs) - 1:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]  # pragma: no cover


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw a run's learning curves to a PNG and return its path.

    Args:
        run_dir: A run folder (``runs/2026-11-28_13-05-12``), or the folder
            that holds the run folders (its newest run is drawn).
        out: The PNG to write; default ``<run folder>/curves.png``.

    Raises:
        ConfigError: there is no run at ``run_dir``, or it has no metrics yet.
        DltrainError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise DltrainError(
            "plotting needs matplotlib, which is not installed: pip install 'torch-dltrain[plot]'"
        ) from exc

    run = find_run(run_dir)
    rows = read_metrics(run)
    # A resumed run may repeat an epoch: keep its last row.
    by_epoch = {r.get("epoch"): r for r in rows if r.get("kind") == "epoch"}
    epoch_rows = sorted(by_epoch.values(), key=lambda r: (r.get("step", 0), r.get("epoch", 0)))
    step_rows = [r for r in rows if r.get("kind") == "step" and isinstance(r.get("train_loss"), float)]
    test_rows = [r for r in rows if r.get("kind") in ("test", "validate")]
    if not epoch_rows and not step_rows:
        failed = [r for r in rows if r.get("kind") == "failed"]
        if failed:
            raise ConfigError(
                f"run {str(run)!r} failed at epoch {failed[-1].get('epoch')}, step {failed[-1].get('step')} "
                f"before it logged any metrics ({failed[-1].get('error')}); there is nothing to plot"
            )
        raise ConfigError(f"run {str(run)!r} has no metrics yet: {METRICS_FILE} holds no epoch or step rows")

    panels = step_series(rows)
    from_steps = {name for names in panels.values() for name in names}
    # base metric name -> prefix -> [(epoch, value)]
    curves: dict[str, dict[str, list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for row in epoch_rows:
        for name, value in row.items():
            split = _split(name)
            if split is None or name in _NOT_METRICS or not isinstance(value, (int, float)):
                continue
            if split[0] == "train" and split[1] in from_steps:
                continue  # drawn from the step rows
            curves[split[1]][split[0]].append((float(row["epoch"]), float(value)))
    finals: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for row in test_rows:
        for name, value in row.items():
            split = _split(name)
            if split is not None and isinstance(value, (int, float)):
                finals[split[1]].append((split[0], float(value)))
    if step_rows and "loss" not in curves:
        curves["loss"] = defaultdict(list)
    names = sorted(curves, key=lambda n: (n != "loss", n))
    titles = sorted(panels, key=lambda t: (t != LEARNING_RATE, t))
    count = len(names) + len(titles)
    cols = min(count, 3)
    nrows = (count + cols - 1) // cols
    fig = Figure(figsize=(4.8 * cols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, cols, i + 1) for i in range(count)]
    xs, ys = _step_to_epoch(epoch_rows)
    last_epoch = max((float(r["epoch"]) for r in epoch_rows), default=1.0)

    for ax, name in zip(axes, names, strict=False):
        if name == "loss" and step_rows:
            steps_x = [_interp(float(r["step"]), xs, ys) if xs else float(r["step"]) for r in step_rows]
            ax.plot(
                steps_x,
                [r["train_loss"] for r in step_rows],
                color=_STYLE["train"]["color"],
                alpha=0.35,
                linewidth=1,
                label="train (per step)" if xs else "train (per step; x = step)",
            )
        for prefix, points in curves[name].items():
            style = _STYLE.get(prefix, {"color": "tab:gray", "marker": "^", "label": prefix})
            ax.plot(
                [p[0] for p in points],
                [p[1] for p in points],
                color=style["color"],
                marker=style["marker"],
                markersize=4,
                linewidth=1.8,
                label=style["label"],
            )
        for prefix, value in finals.get(name, []):
            ax.plot(
                [last_epoch],
                [value],
                linestyle="none",
                marker="*",
                markersize=12,
                color="tab:green" if prefix == "test" else "tab:red",
                label=f"{prefix} {value:.4g}",
            )
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if epoch_rows and last_epoch <= 20:
            ax.set_xticks(range(0, int(last_epoch) + 1))
        ax.legend(fontsize="small")
    every_step = [r for r in rows if r.get("kind") == "step" and isinstance(r.get("step"), int)]
    for ax, title in zip(axes[len(names) :], titles, strict=True):
        for name in panels[title]:
            logged = [r for r in every_step if isinstance(r.get(name), (int, float))]
            ax.plot(
                [_interp(float(r["step"]), xs, ys) if xs else float(r["step"]) for r in logged],
                [float(r[name]) for r in logged],
                linewidth=1.2,
                label=name,
            )
        ax.set_title(title)
        ax.set_xlabel("epoch" if xs else "step")
        ax.grid(True, alpha=0.3)
        if len(panels[title]) > 1:
            ax.legend(fontsize="x-small", ncol=1 + len(panels[title]) // 8)
    fig.suptitle(f"run {run.name}")

    target = Path(out) if out is not None else run / "curves.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    return target
