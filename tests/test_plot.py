"""Learning curves of a run folder, drawn to a PNG."""

from __future__ import annotations

import builtins
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import dltrain
from dltrain import ConfigError, DltrainError
from dltrain.plot import find_run, plot_run
from dltrain.testing import tiny_loader, tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_a_run(epochs: int = 3, **config: Any) -> Path:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    trainer = dltrain.Trainer(max_epochs=epochs, device="cpu", progress="off", log_every_n_steps=2, **config)
    trainer.fit(
        model,
        tiny_loader(samples=64, batch_size=8),
        optimizer=optimizer,
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1),
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5),
    )
    trainer.test(model, tiny_loader(samples=32, seed=2))
    path = trainer.plugin_manager.get_plugin("metric_log").run_path  # type: ignore[union-attr]
    assert isinstance(path, Path)
    return path


def test_a_run_is_drawn_to_a_png_in_its_folder() -> None:
    pytest.importorskip("matplotlib")
    run = train_a_run()
    out = plot_run(run)
    assert out == run / "curves.png"
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000


def test_the_folder_of_runs_draws_the_newest_and_out_chooses_the_file(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    older = train_a_run(epochs=1)
    newer = train_a_run(epochs=2)
    now = time.time()
    os.utime(older / "metrics.jsonl", (now - 100, now - 100))
    assert find_run(tmp_path / "runs") == newer
    out = plot_run(tmp_path / "runs", tmp_path / "pictures" / "curves.png")
    assert out == tmp_path / "pictures" / "curves.png" and out.read_bytes()[:8] == PNG_MAGIC


def test_a_run_with_step_rows_only_is_drawn() -> None:
    pytest.importorskip("matplotlib")
    run = train_a_run(epochs=1)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(line for line in lines if '"step"' in line[:20]) + "\n")
    assert plot_run(run).is_file()


def test_no_run_is_an_error_that_says_what_a_run_folder_is(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        plot_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holds no metrics\.jsonl"):
        plot_run(tmp_path / "empty")
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match="has no metrics yet"):
        plot_run(tmp_path / "empty")


def test_without_matplotlib_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(DltrainError, match=r"pip install 'torch-dltrain\[plot\]'"):
        plot_run(tmp_path)
