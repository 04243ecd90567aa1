"""Every stateful built-in plugin round-trips: state_dict -> load_state_dict -> state_dict is equal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import dltrain
from dltrain import hookimpl
from dltrain.testing import tiny_loader, tiny_model


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class RoundTrip:
    """Mid-epoch, puts every plugin's state through load_state_dict and reads it back."""

    def __init__(self) -> None:
        self.checked: dict[str, bool] = {}

    @hookimpl
    def on_train_batch_end(self, trainer: dltrain.Trainer, state: dltrain.State) -> None:
        if state.global_step != 3 or self.checked:
            return
        manager = trainer.plugin_manager
        for name, first in list(manager.call_each("state_dict", trainer=trainer)):
            if first is None or name == "RoundTrip":
                continue
            load = dict(manager.each_impl("load_state_dict"))[name]
            load(trainer=trainer, state_dict=first)
            again = dict(manager.call_each("state_dict", trainer=trainer))[name]
            self.checked[name] = same(first, again)


def test_every_stateful_builtin_round_trips(tmp_path: Path) -> None:
    probe = RoundTrip()
    model = tiny_model()
    trainer = dltrain.Trainer(
        max_epochs=2,
        device="cpu",
        progress="line",
        run_dir=tmp_path / "runs",
        checkpoint={"dir": tmp_path / "ckpt", "every_n_steps": 2},
        plugins=[probe],
    )
    trainer.fit(
        model,
        tiny_loader(samples=96, batch_size=16),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    assert {"metrics", "checkpoint", "metric_log"} <= set(probe.checked)
    assert all(probe.checked.values()), probe.checked
