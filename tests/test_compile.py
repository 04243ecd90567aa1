"""``compile``: real ``torch.compile`` runs, no fakes.

Most runs use the ``aot_eager`` backend: dynamo captures the forward, AOT
autograd traces forward and backward, and the graphs run eagerly, so a run
compiles in about a second and computes what eager mode computes. One test
compiles with inductor, the default backend, on the MNIST-shaped MLP.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

import dltrain
from dltrain import CompileOptions, ConfigError, TrainerConfig, hookimpl
from dltrain.checkpoint import list_checkpoints, load_checkpoint
from dltrain.cli import main
from dltrain.run_config import load_run_config, parse_overrides
from dltrain.testing import HookRecorder, tiny_loader, tiny_model

AOT_EAGER = {"backend": "aot_eager"}


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    """Each test compiles from scratch, and its compile counters start at zero."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def frames_compiled() -> int:
    """How many frames dynamo compiled since the test started (0: nothing was compiled)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


class ModelSeen:
    """Records ``trainer.model`` at every training and evaluation batch."""

    def __init__(self) -> None:
        self.models: list[torch.nn.Module] = []

    @hookimpl
    def on_train_batch_end(self, trainer: dltrain.Trainer) -> None:
        self.models.append(trainer.model)

    @hookimpl
    def on_eval_batch_end(self, trainer: dltrain.Trainer) -> None:
        self.models.append(trainer.model)


def fit(
    compile: Any, *, epochs: int = 2, plugins: tuple[object, ...] = (), **settings: Any
) -> tuple[dltrain.Trainer, torch.nn.Module, dltrain.History]:
    """A fit of the tiny model with momentum (so optimizer state matters), validating each epoch."""
    model = tiny_model()
    trainer = dltrain.Trainer(
        max_epochs=epochs,
        device="cpu",
        progress="off",
        run_dir=None,
        seed=0,
        compile=compile,
        plugins=plugins,
        **settings,
    )
    history = trainer.fit(
        model,
        tiny_loader(samples=64, batch_size=16),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=40, batch_size=16, seed=1),  # a smaller last batch too
    )
    return trainer, model, history


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=atol, msg=f"weights differ in {key!r}")


def assert_same_history(a: dltrain.History, b: dltrain.History, tol: float = 1e-6) -> None:
    assert len(a.epochs) == len(b.epochs)
    for row_a, row_b in zip(a.epochs, b.epochs, strict=True):
        assert row_a.keys() == row_b.keys()
        for key in row_a:
            assert row_a[key] == pytest.approx(row_b[key], rel=tol, abs=tol), (key, row_a, row_b)


# -- training ----------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["32", "bf16-mixed"])
def test_a_compiled_fit_trains_like_eager_and_gives_the_model_back_uncompiled(precision: str) -> None:
    _, eager_model, eager_history = fit(False, precision=precision)
    seen = ModelSeen()
    trainer, model, history = fit(AOT_EAGER, plugins=(seen,), precision=precision)

    assert frames_compiled() > 0, "dynamo compiled nothing"
    assert_same_history(history, eager_history)
    assert_same_weights(model, eager_model)
    wrappers = {id(m) for m in seen.models}
    assert len(wrappers) == 1, "one compiled wrapper for the whole run"
    assert seen.models[0] is not model and seen.models[0]._orig_mod is model
    assert trainer.model is model  # after the run: the module passed in


def test_compile_true_is_inductor_with_the_defaults() -> None:
    assert TrainerConfig(compile=True).compile_options() == CompileOptions()
    assert CompileOptions().backend == "inductor"
    assert TrainerConfig().compile_options() is None
    options = TrainerConfig(compile=AOT_EAGER).compile_options()
    assert options == CompileOptions(backend="aot_eager")


def test_evaluation_after_fit_runs_compiled_and_matches_eager() -> None:
    data = tiny_loader(samples=40, batch_size=16, seed=2)

    def evaluate(trainer: dltrain.Trainer, model: torch.nn.Module) -> tuple[Any, Any, torch.Tensor]:
        return (
            trainer.validate(model, data),
            trainer.test(model, data),
            torch.cat(trainer.predict(model, data)),
        )

    eager_trainer, eager_model, _ = fit(False)
    eager = evaluate(eager_trainer, eager_model)
    seen = ModelSeen()
    trainer, model, _ = fit(AOT_EAGER, plugins=(seen,))
    wrapper = seen.models[0]
    validated, tested, predicted = evaluate(trainer, model)

    assert validated == pytest.approx(eager[0], rel=1e-6)
    assert tested == pytest.approx(eager[1], rel=1e-6)
    torch.testing.assert_close(predicted, eager[2], rtol=0, atol=1e-6)
    assert all(m is wrapper for m in seen.models), "evaluation reuses the wrapper of the fit"
    assert trainer.model is model


def test_a_second_fit_reuses_the_wrapper_and_never_wraps_twice() -> None:
    seen = ModelSeen()
    trainer, model, _ = fit(AOT_EAGER, epochs=1, plugins=(seen,))
    first = seen.models[0]
    seen.models.clear()
    trainer.fit(
        model,
        tiny_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    assert all(m is first for m in seen.models)
    assert first._orig_mod is model and not hasattr(first._orig_mod, "_orig_mod")
    assert trainer.model is model


class WrapsForTheRun:
    """Wraps the model for the run and gives it back at teardown, as the distributed plugin does with DDP."""

    def __init__(self) -> None:
        self.wrapper: Any = None

    @hookimpl
    def on_setup(self, trainer: dltrain.Trainer) -> None:
        self.wrapper = torch.nn.Sequential(trainer.model)
        trainer.model = self.wrapper

    @hookimpl
    def on_teardown(self, trainer: dltrain.Trainer) -> None:
        trainer.model = self.wrapper[0]


def test_a_wrapper_compiled_for_one_run_is_not_kept_after_it() -> None:
    """Under DDP the compiled module is the run's DDP wrapper, whose reducer holds the process group:
    kept for reuse (no later run can reuse it), it would outlive the group until the interpreter exits."""
    import gc
    import weakref

    plugin = WrapsForTheRun()
    trainer, model, _ = fit(AOT_EAGER, epochs=1, plugins=(plugin,))
    wrapper = weakref.ref(plugin.wrapper)
    plugin.wrapper = None
    gc.collect()
    assert trainer.model is model
    assert wrapper() is None, "the trainer still holds the run's wrapper"


def test_a_model_compiled_by_the_user_is_not_compiled_again() -> None:
    seen = ModelSeen()
    model = tiny_model()
    compiled = torch.compile(model, backend="aot_eager")
    trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None, compile=True, plugins=[seen])
    trainer.fit(
        compiled,  # type: ignore[arg-type]
        tiny_loader(),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )
    assert all(m is compiled for m in seen.models)
    assert trainer.model is compiled


def test_another_model_gets_its_own_wrapper() -> None:
    seen = ModelSeen()
    trainer, model, _ = fit(AOT_EAGER, epochs=1, plugins=(seen,))
    assert seen.models[0]._orig_mod is model
    other = tiny_model(seed=1)
    seen.models.clear()
    trainer.validate(other, tiny_loader(), loss_fn=torch.nn.CrossEntropyLoss())
    assert seen.models[0]._orig_mod is other
    assert trainer.model is other


class BreaksTheGraph(torch.nn.Module):
    """A model dynamo cannot capture as one graph."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x).relu()
        torch._dynamo.graph_break()
        return self.out(h)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_fullgraph_reaches_torch_compile(fullgraph: bool) -> None:
    model = BreaksTheGraph()
    trainer = dltrain.Trainer(
        device="cpu", progress="off", run_dir=None, compile={"backend": "aot_eager", "fullgraph": fullgraph}
    )

    def run() -> None:
        trainer.fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=torch.nn.CrossEntropyLoss(),
        )

    if fullgraph:
        with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break") as info:
            run()
        assert "raised in hook 'training_step'" in "".join(getattr(info.value, "__notes__", []))
        assert trainer.model is model
    else:
        run()
        assert frames_compiled() >= 2  # the forward, split in two


# -- checkpoints -------------------------------------------------------------------------


def test_checkpoints_of_a_compiled_run_hold_the_plain_model(tmp_path: Path) -> None:
    _, model, _ = fit(AOT_EAGER, epochs=1, checkpoint={"dir": tmp_path / "ckpt"})
    payload = load_checkpoint(list_checkpoints(tmp_path / "ckpt")[-1].payload_path)
    assert not any("_orig_mod" in key for key in payload["model"])
    assert payload["model"].keys() == model.state_dict().keys()
    tiny_model(seed=5).load_state_dict(payload["model"])  # loads into a plain model


@pytest.mark.parametrize(
    ("first", "then"),
    [(AOT_EAGER, False), (False, AOT_EAGER)],
    ids=["compiled-then-eager", "eager-then-compiled"],
)
def test_resume_across_compiled_and_eager_runs_continues_the_same_run(
    first: Any, then: Any, tmp_path: Path
) -> None:
    _, straight_model, straight = fit(False, epochs=2)
    fit(first, epochs=1, checkpoint={"dir": tmp_path / "ckpt"})

    model = tiny_model(seed=7)  # a fresh process would build other weights: the checkpoint restores them
    trainer = dltrain.Trainer(
        max_epochs=2,
        device="cpu",
        progress="off",
        run_dir=None,
        seed=0,
        compile=then,
        checkpoint={"dir": tmp_path / "ckpt"},
    )
    history = trainer.fit(
        model,
        tiny_loader(samples=64, batch_size=16),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=40, batch_size=16, seed=1),
        resume="last",
    )
    assert frames_compiled() > 0
    assert_same_history(history, straight)
    assert_same_weights(model, straight_model)


# -- errors ------------------------------------------------------------------------------


def test_an_unknown_backend_is_a_config_error_before_anything_runs() -> None:
    recorder = HookRecorder()
    model = tiny_model()
    trainer = dltrain.Trainer(
        device="cpu", progress="off", compile={"backend": "aot_eagr"}, plugins=[recorder]
    )
    with pytest.raises(ConfigError) as info:
        trainer.fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=torch.nn.CrossEntropyLoss(),
        )
    message = str(info.value)
    assert "compile.backend 'aot_eagr' is not a torch.compile backend" in message
    assert "did you mean 'aot_eager'?" in message
    assert "inductor" in message
    assert "on_setup" not in recorder.calls and "on_train_batch_start" not in recorder.calls
    assert recorder.calls[-1] == "on_teardown"
    assert not Path("runs").exists(), "no run folder for a run that never started"
    assert frames_compiled() == 0
    assert trainer.model is model


GRAPHS: list[torch.fx.GraphModule] = []


def counting_backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
    """A torch.compile backend that records each graph and runs it as it is."""
    GRAPHS.append(graph)
    return graph.forward


def test_a_registered_backend_is_accepted() -> None:
    from torch._dynamo import list_backends, register_backend

    if "dltrain_tests_counting" not in list_backends(exclude_tags=()):
        register_backend(counting_backend, name="dltrain_tests_counting")
    GRAPHS.clear()
    fit({"backend": "dltrain_tests_counting"}, epochs=1)
    assert GRAPHS


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".yaml", ".toml", ".json"])
def test_compile_options_load_from_config_files(suffix: str, tmp_path: Path) -> None:
    texts = {
        ".yaml": "compile:\n  backend: aot_eager\n  mode: max-autotune\n  dynamic: false\n",
        ".toml": '[compile]\nbackend = "aot_eager"\nmode = "max-autotune"\ndynamic = false\n',
        ".json": json.dumps({"compile": {"backend": "aot_eager", "mode": "max-autotune", "dynamic": False}}),
    }
    path = tmp_path / f"c{suffix}"
    path.write_text(texts[suffix])
    config = TrainerConfig.from_file(path)
    assert config.compile == CompileOptions(backend="aot_eager", mode="max-autotune", dynamic=False)
    assert TrainerConfig.model_validate(config.to_json_dict()) == config  # round trip


def test_compile_true_loads_from_yaml_and_round_trips(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("compile: true\n")
    config = TrainerConfig.from_file(tmp_path / "c.yaml")
    assert config.compile is True and config.to_json_dict()["compile"] is True
    assert TrainerConfig.model_validate(config.to_json_dict()) == config


def test_the_json_schema_describes_compile_and_its_options() -> None:
    schema = TrainerConfig.model_json_schema()
    compile_schema = schema["properties"]["compile"]
    assert compile_schema["anyOf"] == [{"type": "boolean"}, {"$ref": "#/$defs/CompileOptions"}]
    assert compile_schema["default"] is False and compile_schema["description"]
    options = schema["$defs"]["CompileOptions"]
    assert options["additionalProperties"] is False
    assert set(options["properties"]) == {"backend", "mode", "fullgraph", "dynamic"}
    assert all(prop.get("description") for prop in options["properties"].values())
    assert options["properties"]["mode"]["anyOf"][0]["enum"] == [
        "default",
        "reduce-overhead",
        "max-autotune",
        "max-autotune-no-cudagraphs",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"backnd": "aot_eager"}, r"compile\.backnd\n.*did you mean 'backend'\?"),
        ({"mode": "fast"}, r"compile\.mode\n.*'default', 'reduce-overhead', 'max-autotune' or"),
        ({"fullgraph": "sometimes"}, r"compile\.fullgraph\n.*True or False, not the string 'sometimes'"),
        ("maybe", r"compile\n.*true, false or a mapping of CompileOptions fields"),
        (None, r"compile\n.*true, false or a mapping of CompileOptions fields"),
    ],
)
def test_bad_compile_settings_are_one_clear_error_each(value: Any, expected: str) -> None:
    with pytest.raises(ValidationError, match=expected) as info:
        TrainerConfig(compile=value)
    assert info.value.error_count() == 1, str(info.value)


def test_dotted_overrides_set_compile_options(tmp_path: Path) -> None:
    overrides = parse_overrides(
        ["--trainer.compile.backend", "aot_eager", "--trainer.compile.fullgraph=true"]
    )
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "trainer: {compile: true}\nmodel: {class_path: dltrain.testing:tiny_model}\n"
        "optimizer: {class_path: torch.optim:SGD, init_args: {lr: 0.1}}\n"
        "data: {train: {class_path: dltrain.testing:tiny_loader}}\n"
    )
    run = load_run_config(run_file, overrides)
    assert run.trainer.compile == CompileOptions(backend="aot_eager", fullgraph=True)
    with pytest.raises(
        ConfigError, match=r"unknown key 'trainer.compile.backnd'; did you mean 'trainer.compile.backend'"
    ):
        parse_overrides(["--trainer.compile.backnd", "aot_eager"])
    with pytest.raises(ConfigError, match=r"trainer\.compile\.mode: Input should be 'default'"):
        load_run_config(run_file, parse_overrides(["--trainer.compile.mode", "fast"]))


def test_the_command_line_trains_compiled_and_refuses_an_unknown_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_file = tmp_path / "run.yaml"
    run_file.write_text(
        "trainer: {max_epochs: 1, device: cpu, progress: off}\n"
        "model: {class_path: dltrain.testing:tiny_model}\n"
        "optimizer: {class_path: torch.optim:SGD, init_args: {lr: 0.1}}\n"
        "loss: {class_path: torch.nn:CrossEntropyLoss}\n"
        "data: {train: {class_path: dltrain.testing:tiny_loader}}\n"
    )
    assert main(["fit", "-c", str(run_file), "--trainer.compile.backend", "aot_eager"]) == 0
    assert frames_compiled() > 0
    (run,) = (tmp_path / "runs").iterdir()
    saved = json.loads((run / "config.json").read_text())["compile"]
    assert saved == {"backend": "aot_eager", "mode": None, "fullgraph": False, "dynamic": None}
    capsys.readouterr()

    assert main(["fit", "-c", str(run_file), "--trainer.compile.backend", "nope"]) == 2
    err = capsys.readouterr().err
    assert "dltrain fit: error: compile.backend 'nope' is not a torch.compile backend" in err


# -- distributed -------------------------------------------------------------------------

DDP_SCRIPT = """
import os, sys, weakref
import torch
from torch import nn
import dltrain

world = int(os.environ.get("WORLD_SIZE", "1"))
gen = torch.Generator().manual_seed(0)
x, y = torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
chains, run_wrappers = [], []


class Wrapping:
    @dltrain.hookimpl
    def on_train_batch_end(self, trainer):
        chain, m = [], trainer.model
        while m is not None:
            chain.append(type(m).__name__)
            if m is not model:
                run_wrappers.append(weakref.ref(m))
            m = getattr(m, "_orig_mod", None) or getattr(m, "module", None)
        chains.append(chain)


trainer = dltrain.Trainer(
    max_epochs=2, device="cpu", progress="off", run_dir=None, compile={"backend": "aot_eager"},
    plugins=[Wrapping()],
)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16 // world)
trainer.fit(
    model, data, optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
    loss_fn=nn.CrossEntropyLoss(),
)
result = {
    "weights": model.state_dict(), "chains": chains, "given_back": trainer.model is model,
    "wrappers_freed": all(ref() is None for ref in run_wrappers),  # the DDP module too, with its group
}
torch.save(result, os.path.join(sys.argv[1], "rank" + os.environ.get("RANK", "0") + ".pt"))
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no torch.distributed with Gloo",
)
def test_under_ddp_the_compiled_wrapper_holds_the_ddp_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two processes under torchrun (about 20 s): compile wraps DDP, and trains like one process."""
    script = tmp_path / "ddp_compile.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DLTRAIN_DIST_TIMEOUT": "60"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [*command, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    single = tmp_path / "single"
    single.mkdir()
    monkeypatch.setattr(sys, "argv", [str(script), str(single)])
    runpy.run_path(str(script), run_name="__main__")  # the same run in this process, global batch
    reference = torch.load(single / "rank0.pt", weights_only=True)

    assert reference["chains"][0] == ["OptimizedModule", "Sequential"]
    for rank in ranks:
        assert {tuple(c) for c in rank["chains"]} == {
            ("OptimizedModule", "DistributedDataParallel", "Sequential")
        }
        assert rank["given_back"]
        assert rank["wrappers_freed"], "the compiled wrapper or the DDP module outlived the run"
        for key, value in reference["weights"].items():
            torch.testing.assert_close(rank["weights"][key], value, rtol=0, atol=1e-5, msg=key)


# -- inductor ----------------------------------------------------------------------------


@pytest.mark.slow
def test_inductor_trains_the_mnist_mlp_like_eager() -> None:
    """The default backend, generating and compiling C++ for the CPU: about 25 s here."""
    example = Path(__file__).resolve().parents[1] / "examples" / "mnist"
    sys.path.insert(0, str(example))
    try:
        from mnist_model import Net
    finally:
        sys.path.remove(str(example))

    gen = torch.Generator().manual_seed(0)
    images = torch.randn(256, 1, 28, 28, generator=gen)
    labels = torch.randint(0, 10, (256,), generator=gen)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=64)

    results = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = Net(activation="relu")
        trainer = dltrain.Trainer(max_epochs=2, device="cpu", progress="off", run_dir=None, compile=compile)
        history = trainer.fit(
            model,
            data,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            loss_fn=torch.nn.CrossEntropyLoss(),
        )
        results[compile] = (model, history, trainer.test(model, data))
        assert trainer.model is model
    assert frames_compiled() > 0
    (eager, eager_history, eager_test), (compiled, history, test) = results[False], results[True]
    # Inductor fuses and reorders float32 arithmetic: equal up to rounding.
    assert_same_weights(compiled, eager, atol=1e-5)
    assert_same_history(history, eager_history, tol=1e-5)
    assert test == pytest.approx(eager_test, rel=1e-5)
