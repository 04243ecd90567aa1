"""Helpers for testing plugins and training code: a hook recorder, a tiny model and data.

```python
from dltrain.testing import HookRecorder, tiny_loader, tiny_model

recorder = HookRecorder()
model = tiny_model()
Trainer(plugins=[recorder], progress="off", run_dir=None).fit(
    model, tiny_loader(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
    loss_fn=torch.nn.CrossEntropyLoss(),
)
assert recorder.calls[0] == "select_device"
```
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from dltrain import hookspecs
from dltrain._markers import hookimpl
from dltrain._plugin_manager import hookspecs_in_order

__all__ = ["HookRecorder", "tiny_loader", "tiny_model"]


def _recording_impl(hook_name: str) -> Callable[..., None]:
    """A real method ``def <hook>(self, <the hook's arguments>)`` that records its call.

    Generated from source, as :mod:`dataclasses` generates ``__init__``: pluggy
    reads which arguments an implementation takes from its code object, so the
    parameters must be real, not a faked ``__signature__``.
    """
    names = list(inspect.signature(getattr(hookspecs, hook_name)).parameters)
    args = ", ".join(["self", *names])
    kwargs = ", ".join(f"{name!r}: {name}" for name in names)
    source = f"def {hook_name}({args}):\n    self.record({hook_name!r}, {{{kwargs}}})\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, f"<dltrain.testing HookRecorder.{hook_name}>", "exec"), namespace)
    impl: Callable[..., None] = namespace[hook_name]
    impl.__qualname__ = f"HookRecorder.{hook_name}"
    impl.__module__ = __name__
    impl.__doc__ = f"Record a call of ``{hook_name}``."
    return hookimpl(impl)


class HookRecorder:
    """A plugin that implements every hook and records each call, in order.

    Attributes:
        calls: Hook names in call order.
        events: ``(hook name, phase value or None, kwargs)`` per call.

    Args:
        name: Plugin name (give two recorders different names).
        skip: Hook names not to record (they are still implemented).
    """

    def __init__(self, name: str = "recorder", skip: tuple[str, ...] = ()) -> None:
        self.name = name
        self.skip = frozenset(skip)
        self.calls: list[str] = []
        self.events: list[tuple[str, str | None, dict[str, Any]]] = []

    def record(self, hook_name: str, kwargs: dict[str, Any]) -> None:
        """Store one call (called by the generated hook implementations)."""
        if hook_name in self.skip:
            return
        state = kwargs.get("state")
        phase = state.phase.value if state is not None else None
        self.calls.append(hook_name)
        self.events.append((hook_name, phase, kwargs))

    def compressed(self) -> list[str]:
        """The calls with runs of the same hook folded: ``["a", "b x3", "c"]``."""
        out: list[str] = []
        count = 0
        for i, name in enumerate(self.calls):
            count += 1
            if i + 1 == len(self.calls) or self.calls[i + 1] != name:
                out.append(name if count == 1 else f"{name} x{count}")
                count = 0
        return out


for _hook in hookspecs_in_order():
    setattr(HookRecorder, _hook, _recording_impl(_hook))
del _hook


def tiny_model(in_features: int = 8, classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """A small MLP classifier with deterministic initial weights."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(in_features, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
    )
    torch.random.set_rng_state(gen_state)
    return model


def tiny_loader(
    samples: int = 64,
    batch_size: int = 16,
    in_features: int = 8,
    classes: int = 3,
    seed: int = 0,
    shuffle: bool = False,
) -> torch.utils.data.DataLoader[tuple[torch.Tensor, ...]]:
    """A DataLoader over a learnable synthetic classification task."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, in_features, generator=gen)
    w = torch.randn(in_features, classes, generator=gen)
    y = (x @ w).argmax(dim=1)
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed)
    )
