"""The learning-rate range test: ``dltrain.callbacks.lr_find``.

A user sweeps the learning rate of a small model before training it; the
sweep must suggest a sensible rate, stop when the loss diverges, and leave
the model, the optimizer, the random generators and the data exactly as they
were (compared bit for bit), without writing any file.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import dltrain
import dltrain.callbacks
from dltrain.callbacks import lr_find
from dltrain.callbacks.lr_finder import LRFindResult
from dltrain.errors import ConfigError, DltrainError, StepError
from dltrain.testing import HookRecorder, tiny_loader, tiny_model

ROOT = Path(__file__).resolve().parents[1]


def _sweep(optimizer: str = "sgd", **kwargs: Any) -> tuple[LRFindResult, torch.optim.Optimizer]:
    model = tiny_model()
    opt: torch.optim.Optimizer = (
        torch.optim.SGD(model.parameters(), lr=0.1)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-3)
    )
    trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None)
    result = lr_find(
        trainer,
        model,
        tiny_loader(shuffle=True),
        optimizer=opt,
        loss_fn=torch.nn.CrossEntropyLoss(),
        **kwargs,
    )
    return result, opt


def _falls_from(result: LRFindResult) -> float:
    """The first learning rate at which the smoothed loss is 2 % below its starting plateau."""
    plateau = result.losses[len(result.losses) // 10]
    return next(lr for lr, loss in zip(result.lrs, result.losses, strict=True) if loss < 0.98 * plateau)


@pytest.mark.parametrize(("optimizer", "max_lr"), [("sgd", 100.0), ("adam", 10.0)])
def test_the_suggestion_lies_where_the_loss_falls_before_it_diverges(optimizer: str, max_lr: float) -> None:
    result, _ = _sweep(optimizer, max_lr=max_lr)
    assert "exceeded diverge=4" in result.stop_reason  # the sweep diverged and stopped itself
    assert 10 < len(result.lrs) < 100
    ratios = [b / a for a, b in zip(result.lrs, result.lrs[1:], strict=False)]
    assert result.lrs[0] == pytest.approx(1e-7)
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)  # exponential: a constant ratio
    assert ratios[0] == pytest.approx((max_lr / 1e-7) ** (1 / 99))
    assert result.suggestion_rule == "steepest"
    assert result.suggestion is not None and result.lr_at_min_loss is not None
    assert _falls_from(result) <= result.suggestion <= result.lr_at_min_loss < result.lrs[-1]
    # The smoothed curve is the bias-corrected moving average of the raw one.
    average = 0.0
    for i, (raw, smoothed) in enumerate(zip(result.raw_losses, result.losses, strict=True)):
        average = 0.98 * average + 0.02 * raw
        assert smoothed == pytest.approx(average / (1 - 0.98 ** (i + 1)))


def test_a_sweep_that_never_diverges_runs_num_steps() -> None:
    result, _ = _sweep(min_lr=1e-5, max_lr=1e-2, num_steps=30)
    assert result.stop_reason == "max_steps reached"
    assert len(result.lrs) == 30
    assert result.lrs[-1] == pytest.approx(1e-2)


def test_a_non_finite_loss_ends_the_sweep_without_an_error() -> None:
    result, _ = _sweep(max_lr=1e12, diverge=None)  # the user's Trainer says on_nonfinite="raise"
    assert "the loss became" in result.stop_reason
    assert len(result.lrs) < 100
    assert all(math.isfinite(v) for v in result.raw_losses + result.losses)


def _noisy_model() -> torch.nn.Module:
    """Dropout (draws random numbers), batch norm (buffers), a submodule left in eval mode."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 3),
    )
    model[1].eval()
    return model


def _state(model: torch.nn.Module, opt: torch.optim.Optimizer, loader: Any) -> dict[str, Any]:
    return {
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "objects": [id(t) for t in [*model.parameters(), *model.buffers()]],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "modes": [m.training for m in model.modules()],
        "optimizer": _deepcopy(opt.state_dict()),
        "optimizer_params": [id(p) for g in opt.param_groups for p in g["params"]],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "loader": loader.generator.get_state(),
    }


def _deepcopy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _deepcopy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_deepcopy(v) for v in value)
    return value


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (so -0.0 differs from 0.0, and NaNs compare)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _assert_identical(a: Any, b: Any, where: str = "") -> None:
    """Equal bit for bit: tensors of the same dtype, device and bytes; other values ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape), where
        assert torch.equal(_bits(a), _bits(b)), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b or (a != a and b != b), where  # NaN == NaN here


def _trained_setup() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    """A model and an Adam optimizer that have taken steps (so it has state), gradients left over."""
    model = _noisy_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = tiny_loader(shuffle=True)  # a loader with its own generator
    dltrain.Trainer(device="cpu", progress="off", run_dir=None, max_steps=3).fit(
        model, loader, optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss()
    )
    model[1].eval()
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()  # gradients the sweep must not lose
    return model, opt, loader


def test_the_sweep_leaves_model_optimizer_and_every_generator_bit_for_bit() -> None:
    model, opt, loader = _trained_setup()
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    before = _state(model, opt, loader)
    # The config's seed makes the sweep reseed every generator; dropout and shuffling draw from them.
    trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None, seed=123)
    result = lr_find(trainer, model, loader, optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(), num_steps=20)
    assert len(result.lrs) == 20
    _assert_identical(before, _state(model, opt, loader))
    assert opt.param_groups[0]["lr"] == 3e-3
    assert "initial_lr" not in opt.param_groups[0]


class _Broken(Exception):
    pass


def test_the_sweep_restores_everything_when_it_raises() -> None:
    model, opt, loader = _trained_setup()
    before = _state(model, opt, loader)
    calls = 0

    def failing_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise _Broken("loss broke")
        return torch.nn.functional.cross_entropy(outputs, targets)

    trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None, seed=1)
    with pytest.raises(_Broken, match="loss broke"):
        lr_find(trainer, model, loader, optimizer=opt, loss_fn=failing_loss)
    _assert_identical(before, _state(model, opt, loader))


def test_the_sweep_restores_a_stateful_loader() -> None:
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    loader = dltrain.InMemoryLoader(x, y, batch_size=16, shuffle=True, seed=0)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None)
    lr_find(trainer, model, loader, optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(), num_steps=10)
    assert loader.epoch == 0  # the sweep ran 2.5 epochs of it


def test_the_sweep_writes_no_file_and_the_users_plugins_do_not_see_it(tmp_path: Path) -> None:
    user_recorder = HookRecorder("user")
    trainer = dltrain.Trainer(
        device="cpu",
        precision="bf16-mixed",
        accumulate_grad_batches=2,
        seed=7,
        max_epochs=3,
        checkpoint={"dir": "checkpoints", "every_n_steps": 1},  # run_dir stays at its default, "runs"
        plugins=[user_recorder],
    )
    sweep_recorder = HookRecorder("sweep", skip=("transfer_batch",))
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    result = lr_find(
        trainer,
        model,
        tiny_loader(),
        optimizer=opt,
        loss_fn=torch.nn.CrossEntropyLoss(),
        num_steps=6,
        plugins=[sweep_recorder],
    )
    assert list(tmp_path.iterdir()) == []  # the working directory of this test
    assert user_recorder.calls == []
    assert len(result.lrs) == 6
    assert sweep_recorder.calls.count("on_before_optimizer_step") == 6
    assert sweep_recorder.calls.count("training_step") == 12  # two micro-batches a step
    sweep = next(kw["trainer"] for name, _, kw in sweep_recorder.events if name == "on_fit_start")
    config = sweep.config
    assert (config.precision, config.accumulate_grad_batches, config.seed) == ("bf16-mixed", 2, 7)
    assert (config.run_dir, config.checkpoint, config.progress, config.max_epochs, config.max_steps) == (
        None,
        None,
        "off",
        None,
        6,
    )
    assert sweep is not trainer and trainer.state is None  # the given Trainer never ran


def test_the_result_plots_its_curve_and_suggestion(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    result, _ = _sweep(max_lr=100.0)
    figure = result.plot(tmp_path / "plots" / "lr.png")
    assert (tmp_path / "plots" / "lr.png").stat().st_size > 1000
    (ax,) = figure.axes
    assert ax.get_xscale() == "log"
    assert any("suggestion" in text.get_text() for text in ax.get_legend().get_texts())
    from matplotlib.figure import Figure

    mine = Figure().add_subplot()
    assert result.plot(ax=mine) is mine.figure
    assert len(mine.lines) == 3


def test_plotting_without_matplotlib_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    result = LRFindResult((1e-3, 1e-2, 1e-1), (1.0, 0.9, 0.8), (1.0, 0.8, 0.7), "max_steps reached")
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DltrainError, match=r"pip install 'torch-dltrain\[plot\]'"):
        result.plot()


def test_a_short_or_flat_curve_falls_back_to_a_tenth_of_the_minimum() -> None:
    falling = LRFindResult((1e-3, 1e-2, 1e-1), (1.0, 0.9, 0.8), (1.0, 0.8, 0.7), "max_steps reached")
    assert (falling.suggestion, falling.suggestion_rule) == (pytest.approx(1e-2), "minimum/10")
    empty = LRFindResult((), (), (), "lr_find: the loss became nan at lr 1e-07")
    assert (empty.suggestion, empty.suggestion_rule, empty.lr_at_min_loss) == (None, "none", None)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"min_lr": 1.0, "max_lr": 0.1}, ConfigError, "0 < min_lr < max_lr"),
        ({"min_lr": 0.0}, ConfigError, "0 < min_lr < max_lr"),
        ({"num_steps": 1}, ConfigError, "num_steps >= 2"),
        ({"smooth": 1.0}, ConfigError, "0 <= smooth < 1"),
        ({"diverge": 0.5}, ConfigError, "diverge > 1 or None"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(
    kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=re.escape(message)):
        lr_find(
            dltrain.Trainer(device="cpu"),
            model,
            tiny_loader(),
            optimizer=opt,
            loss_fn=torch.nn.CrossEntropyLoss(),
            **kwargs,
        )
    _assert_identical(before, model.state_dict())


def test_a_config_is_not_a_trainer() -> None:
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="takes the Trainer whose config the sweep uses, got TrainerConfig"):
        lr_find(dltrain.TrainerConfig(), model, tiny_loader(), optimizer=opt)  # type: ignore[arg-type]


def test_several_optimizers_are_refused() -> None:
    model = tiny_model()
    opts = {
        "a": torch.optim.SGD(model[0].parameters(), lr=0.1),
        "b": torch.optim.SGD(model[2].parameters(), lr=0.1),
    }
    with pytest.raises(StepError, match="sweeps one optimizer"):
        lr_find(
            dltrain.Trainer(device="cpu"),
            model,
            tiny_loader(),
            optimizer=opts,
            loss_fn=torch.nn.CrossEntropyLoss(),
        )  # type: ignore[arg-type]


def test_the_package_name_is_the_function_also_after_its_module_is_imported() -> None:
    from dltrain.callbacks import lr_find as function
    from dltrain.callbacks.lr_finder import LRFindResult as result_class  # imports the module by name

    module = sys.modules["dltrain.callbacks.lr_finder"]
    assert function is module.lr_find and dltrain.callbacks.lr_find is function
    assert result_class is LRFindResult


# -- under torchrun ------------------------------------------------------------------------

_DIST_SCRIPT = """
import json, os, sys
import torch
import dltrain
from dltrain.callbacks import lr_find
from dltrain.testing import tiny_loader, tiny_model

world = int(os.environ.get("WORLD_SIZE", "1"))
model = tiny_model()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
before = {k: v.clone() for k, v in model.state_dict().items()}
trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None)
# The same global batch of 32 in one process or two.
result = lr_find(trainer, model, tiny_loader(samples=128, batch_size=32 // world), optimizer=opt,
                 loss_fn=torch.nn.CrossEntropyLoss(), max_lr=100.0)
restored = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
rank = int(os.environ.get("RANK", "0"))
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"lrs": result.lrs, "raw": result.raw_losses, "suggestion": result.suggestion,
               "stop": result.stop_reason, "restored": restored}, f)
"""


@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with Gloo",
)
def test_under_torchrun_every_rank_gets_the_curve_of_the_global_batch(tmp_path: Path) -> None:
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent(_DIST_SCRIPT), encoding="utf-8")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DLTRAIN_DISABLE_PLUGIN_AUTOLOAD": "1",
        "DLTRAIN_DIST_TIMEOUT": "60",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*command, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    stops = rank0.pop("stop"), rank1.pop("stop")  # each rank's own reason (its own shard's loss)
    assert all("exceeded diverge" in stop for stop in stops)
    assert rank0 == rank1  # one curve, one suggestion: averaged over the ranks, stopped at one step
    assert rank0["restored"]
    (tmp_path / "single").mkdir()
    single = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "single")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((tmp_path / "single" / "rank0.json").read_text())
    common = min(len(one["raw"]), len(rank0["raw"]))
    assert common > 50
    assert rank0["lrs"][:common] == pytest.approx(one["lrs"][:common], rel=1e-12)
    assert rank0["raw"][:common] == pytest.approx(one["raw"][:common], rel=1e-4)


# -- on a GPU (skipped without CUDA) -----------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_sweep_on_cuda_gives_the_model_back_on_the_cpu_and_the_cuda_generators_unchanged() -> None:
    model = _noisy_model()  # on the CPU
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # no state yet: it would be on the CPU
    loader = tiny_loader(shuffle=True)
    torch.cuda.manual_seed_all(11)
    before = _state(model, opt, loader)
    cuda_rng = torch.cuda.get_rng_state_all()
    trainer = dltrain.Trainer(device="cuda", progress="off", run_dir=None, seed=5)
    result = lr_find(trainer, model, loader, optimizer=opt, loss_fn=torch.nn.CrossEntropyLoss(), num_steps=20)
    assert len(result.lrs) == 20
    assert all(p.device.type == "cpu" for p in model.parameters())
    _assert_identical(before, _state(model, opt, loader))
    _assert_identical(cuda_rng, torch.cuda.get_rng_state_all())
