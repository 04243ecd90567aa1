"""Checkpoints of earlier versions still resume, and a resume with other optimizers is refused up front."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import dltrain
from dltrain.checkpoint import load_checkpoint
from dltrain.testing import tiny_loader, tiny_model

FORMAT1 = Path(__file__).resolve().parent / "data" / "format1"


def run(
    directory: Path | None,
    *,
    max_steps: int | None = None,
    resume: str | None = None,
    optimizer_class: type[torch.optim.Optimizer] = torch.optim.SGD,
    with_scheduler: bool = True,
) -> tuple[torch.nn.Module, dltrain.Trainer]:
    """The run that wrote tests/data/format1 (see its README), with today's code."""
    torch.manual_seed(0)
    model = tiny_model(seed=1)
    if optimizer_class is torch.optim.SGD:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = optimizer_class(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if with_scheduler else None
    checkpoint = {"dir": str(directory), "every_n_steps": 3, "keep_last": 1} if directory else None
    trainer = dltrain.Trainer(
        max_epochs=3,
        max_steps=max_steps,
        progress="off",
        run_dir=None,
        device="cpu",
        seed=3,
        checkpoint=checkpoint,
    )
    trainer.fit(
        model,
        tiny_loader(samples=64, batch_size=16, shuffle=True, seed=2),
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, batch_size=16, seed=5),
        resume=resume,
    )
    return model, trainer


def format1_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "format1"
    directory.mkdir()
    for name in ("step-000000006-1.ckpt", "step-000000006-1.json"):
        shutil.copy(FORMAT1 / name, directory / name)
    return directory


def test_the_format1_fixture_is_what_the_reader_is_tested_on() -> None:
    payload = load_checkpoint(FORMAT1 / "step-000000006-1.ckpt")
    assert payload["format"] == 1 and "optimizer" in payload and "optimizers" not in payload
    assert payload["loop"]["global_step"] == 6 and payload["loop"]["stage"] == "train"


def test_a_format1_checkpoint_resumes_to_the_weights_its_version_computed(tmp_path: Path) -> None:
    directory = format1_copy(tmp_path)
    model, trainer = run(directory, resume="last")
    expected = torch.load(FORMAT1 / "expected_final_weights.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    history = json.loads((FORMAT1 / "expected_history.json").read_text())
    assert trainer.history.epochs == history


def test_today_an_uninterrupted_run_computes_what_version_0_1_computed() -> None:
    model, _ = run(None)
    expected = torch.load(FORMAT1 / "expected_final_weights.pt", weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_resuming_a_format1_checkpoint_with_another_optimizer_class_is_refused_before_loading(
    tmp_path: Path,
) -> None:
    directory = format1_copy(tmp_path)
    with pytest.raises(dltrain.ConfigError) as info:
        run(directory, resume="last", optimizer_class=torch.optim.Adam)
    message = str(info.value)
    assert "optimizer 'default'" in message and "'momentum'" in message and "Adam" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("adam", r"optimizer 'default': SGD in the checkpoint, Adam now"),
        ("no scheduler", r"scheduler of 'default': StepLR in the checkpoint, none now"),
    ],
)
def test_resuming_with_other_optimizers_or_schedulers_lists_the_differences_before_loading(
    tmp_path: Path, change: str, expected: str
) -> None:
    directory = tmp_path / "ckpt"
    run(directory, max_steps=3)
    before = {k: v.clone() for k, v in tiny_model(seed=1).state_dict().items()}
    kwargs: dict[str, object] = (
        {"optimizer_class": torch.optim.Adam} if change == "adam" else {"with_scheduler": False}
    )
    with pytest.raises(dltrain.ConfigError, match=expected):
        run(directory, resume="last", **kwargs)  # type: ignore[arg-type]
    assert all(torch.equal(v, before[k]) for k, v in tiny_model(seed=1).state_dict().items())


def test_several_named_optimizers_are_saved_and_a_renamed_one_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"

    def fit(names: tuple[str, str], resume: str | None = None) -> dltrain.Trainer:
        model = tiny_model(seed=1)
        first, second = model[0], model[2]
        optimizers = {
            names[0]: torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9),
            names[1]: torch.optim.Adam(second.parameters(), lr=0.01),
        }
        trainer = dltrain.Trainer(
            max_steps=3, progress="off", run_dir=None, device="cpu", checkpoint={"dir": str(directory)}
        )
        trainer.fit(
            model, tiny_loader(), optimizer=optimizers, loss_fn=torch.nn.CrossEntropyLoss(), resume=resume
        )
        return trainer

    fit(("body", "head"))
    payload = load_checkpoint(sorted(directory.glob("*.ckpt"))[-1])
    assert set(payload["optimizers"]) == {"body", "head"}
    assert payload["optimizers"]["head"]["state"][0]["step"] == 3  # Adam's own count
    with pytest.raises(
        dltrain.ConfigError, match=r"optimizers: \['body', 'head'\] in the checkpoint, \['x', 'y'\] now"
    ):
        fit(("x", "y"), resume="last")
