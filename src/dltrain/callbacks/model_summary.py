"""``ModelSummary``: the model's parameters per module, printed when fit starts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from dltrain._loop import unwrap_model
from dltrain._markers import hookimpl
from dltrain.errors import ConfigError

if TYPE_CHECKING:
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["ModelSummary"]


class ModelSummary:
    """Prints a table of the model's parameters when fit starts (on rank 0).

    One row per module down to ``max_depth`` (1: the top-level modules,
    ``model.named_children()``; 2: their children too), each with its type,
    its trainable and frozen parameter counts and their size in MB (10⁶
    bytes, at each parameter's own element size), then the totals. A
    parameter shared by two modules counts in both rows and once in the
    totals; parameters not materialized yet (lazy modules) count as 0 until
    their first forward. ``summarize(model)`` returns the same table as text.

    Args:
        max_depth: How deep to list modules; 0 prints the totals alone.
    """

    name = "model_summary"

    def __init__(self, max_depth: int = 1) -> None:
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
            raise ConfigError(f"ModelSummary: max_depth must be an integer >= 0, got {max_depth!r}")
        self.max_depth = max_depth

    def summarize(self, model: torch.nn.Module) -> str:
        """The table of ``model``'s parameters, as printed at fit start."""
        rows = [["", "Name", "Type", "Trainable", "Frozen", "Size (MB)"]]
        for i, (name, module) in enumerate(_modules(model, self.max_depth)):
            trainable, frozen, size = _count(module.parameters())
            rows.append([str(i), name, type(module).__name__, _n(trainable), _n(frozen), f"{size / 1e6:.3f}"])
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        right = {0, 3, 4, 5}
        lines = []
        if len(rows) > 1:
            for r, row in enumerate(rows):
                cells = [
                    c.rjust(w) if i in right else c.ljust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                ]
                lines.append(" | ".join(cells).rstrip())
                if r == 0:
                    lines.append("-+-".join("-" * w for w in widths))
            lines.append("")
        trainable, frozen, size = _count(model.parameters())
        totals = [
            (_n(trainable), "trainable parameters"),
            (_n(frozen), "frozen parameters"),
            (_n(trainable + frozen), "total parameters"),
            (f"{size / 1e6:.3f}", "total size of the parameters (MB)"),
        ]
        width = max(len(value) for value, _ in totals)
        lines += [f"{value.rjust(width)}  {label}" for value, label in totals]
        return "\n".join(lines)

    @hookimpl
    def on_fit_start(self, trainer: Trainer, state: State) -> None:
        """Print the table (rank 0 only)."""
        if state.is_global_zero:
            print(self.summarize(unwrap_model(trainer.model)), flush=True)


def _modules(model: torch.nn.Module, max_depth: int) -> list[tuple[str, torch.nn.Module]]:
    """``(qualified name, module)`` of every module at depth 1 to ``max_depth``, in definition order."""
    found: list[tuple[str, torch.nn.Module]] = []

    def visit(prefix: str, module: torch.nn.Module, depth: int) -> None:
        if depth > max_depth:
            return
        for name, child in module.named_children():
            qualified = f"{prefix}.{name}" if prefix else name
            found.append((qualified, child))
            visit(qualified, child, depth + 1)

    visit("", model, 1)
    return found


def _count(parameters: Iterable[torch.nn.Parameter]) -> tuple[int, int, int]:
    """Trainable and frozen parameter counts and their bytes, each parameter once."""
    seen: set[int] = set()
    trainable = frozen = size = 0
    for p in parameters:
        if id(p) in seen or isinstance(p, torch.nn.parameter.UninitializedParameter):
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
        size += p.numel() * p.element_size()
    return trainable, frozen, size


def _n(count: int) -> str:
    """A parameter count as people read it: 109 K, 1.2 M, 7.0 B (exact below 1,000)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return str(count)
