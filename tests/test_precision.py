"""Mixed precision on CPU (bf16) and its errors; fp16 with a GradScaler needs CUDA."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import dltrain
from dltrain import hookimpl
from dltrain.testing import tiny_loader, tiny_model


def test_bf16_autocast_runs_the_step_in_bfloat16_and_learns() -> None:
    dtypes: list[torch.dtype] = []

    class Probe:
        @hookimpl
        def on_train_batch_end(self, output: dltrain.StepOutput) -> None:
            dtypes.append(output.outputs.dtype)

    model = tiny_model()
    history = dltrain.Trainer(
        max_epochs=8,
        precision="bf16-mixed",
        device="cpu",
        progress="off",
        run_dir=None,
        train_accuracy=True,
        plugins=[Probe()],
    ).fit(
        model,
        tiny_loader(samples=256),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    assert set(dtypes) == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.float32  # weights stay float32
    assert history["train_accuracy"][-1] > 0.85


def test_fp16_on_cpu_is_refused_with_the_alternative() -> None:
    model = tiny_model()
    trainer = dltrain.Trainer(precision="16-mixed", device="cpu", progress="off", run_dir=None)
    with pytest.raises(
        dltrain.DltrainError, match=r"'16-mixed' needs a CUDA device.*use precision='bf16-mixed'"
    ):
        trainer.fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=torch.nn.CrossEntropyLoss(),
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_with_grad_scaler_on_cuda() -> None:
    model = tiny_model()
    history = dltrain.Trainer(
        max_epochs=5,
        precision="16-mixed",
        device="cuda",
        gradient_clip_val=1.0,
        progress="off",
        run_dir=None,
        train_accuracy=True,
    ).fit(
        model,
        tiny_loader(samples=256),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    assert history["train_accuracy"][-1] > 0.8


@pytest.mark.slow
def test_bf16_trains_the_mnist_mlp_to_the_float32_accuracy_band(mnist_real_dir: Any) -> None:
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "mnist"
    sys.path.insert(0, str(example))
    try:
        from mnist_data import make_loaders
        from mnist_model import Net
    finally:
        sys.path.remove(str(example))

    accuracy = {}
    for precision in ("32", "bf16-mixed"):
        dltrain.seed_everything(0)
        model = Net()
        loaders = make_loaders(mnist_real_dir, download=False, loader="memory", batch_size=100, seed=0)
        trainer = dltrain.Trainer(
            max_epochs=2, device="cpu", precision=precision, progress="off", run_dir=None
        )
        trainer.fit(
            model,
            loaders.train,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
            loss_fn=torch.nn.CrossEntropyLoss(),
        )
        accuracy[precision] = trainer.test(model, loaders.test)["test_accuracy"]
    assert accuracy["32"] > 0.86  # the tutorial's model after 2 epochs: 86.8 %
    assert abs(accuracy["bf16-mixed"] - accuracy["32"]) < 0.005
