"""Writing, registering, discovering and disabling plugins, as a user would."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import dltrain
from dltrain import PluginError, hookimpl
from dltrain.testing import tiny_loader, tiny_model


def make_trainer(**kw: Any) -> dltrain.Trainer:
    kw.setdefault("progress", "off")
    kw.setdefault("run_dir", None)
    kw.setdefault("device", "cpu")
    return dltrain.Trainer(**kw)


def fit(trainer: dltrain.Trainer, epochs_data: int = 32) -> dltrain.History:
    model = tiny_model()
    return trainer.fit(
        model,
        tiny_loader(samples=epochs_data),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
    )


class Counter:
    def __init__(self) -> None:
        self.steps = 0

    @hookimpl
    def on_train_batch_end(self) -> None:
        self.steps += 1


def test_a_user_plugin_is_called() -> None:
    counter = Counter()
    fit(make_trainer(plugins=[counter], max_epochs=2))
    assert counter.steps == 4


def test_registering_a_class_instead_of_an_instance_says_forgot_parens() -> None:
    with pytest.raises(PluginError, match=r"Counter.*class, not an instance.*Counter\(\).*forgot the \(\)"):
        make_trainer(plugins=[Counter])


def test_a_misspelled_hook_fails_at_construction_with_a_suggestion() -> None:
    class Typo:
        @hookimpl
        def on_train_batch_ned(self) -> None: ...

    with pytest.raises(PluginError, match=r"'Typo'.*'on_train_batch_ned'.*did you mean 'on_train_batch_end'"):
        make_trainer(plugins=[Typo()])


def test_an_argument_the_hook_does_not_have_is_named() -> None:
    class WrongArg:
        @hookimpl
        def on_train_batch_end(self, trainer: Any, loss: Any) -> None: ...

    with pytest.raises(PluginError) as info:
        make_trainer(plugins=[WrongArg()])
    message = str(info.value)
    assert "'WrongArg'" in message and "'on_train_batch_end'" in message and "['loss']" in message
    assert "'output'" in message  # lists what the hook is called with


def test_an_exception_in_a_plugin_names_the_plugin_and_hook_and_keeps_the_cause() -> None:
    class Boom:
        name = "boom"

        @hookimpl
        def on_train_batch_end(self, state: dltrain.State) -> None:
            if state.global_step == 2:
                raise ValueError("kaput")

    with pytest.raises(
        PluginError, match=r"plugin 'boom' raised ValueError in hook 'on_train_batch_end'"
    ) as info:
        fit(make_trainer(plugins=[Boom()], max_epochs=2))
    assert "global step 2" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.__cause__.__traceback__ is not None


def test_on_exception_and_teardown_run_when_a_run_fails() -> None:
    seen: list[str] = []

    class Watcher:
        @hookimpl
        def on_exception(self, exception: BaseException) -> None:
            seen.append(f"exception:{type(exception).__name__}")

        @hookimpl
        def on_teardown(self) -> None:
            seen.append("teardown")

        @hookimpl
        def on_train_batch_start(self) -> None:
            raise RuntimeError("x")

    with pytest.raises(PluginError):
        fit(make_trainer(plugins=[Watcher()]))
    assert seen == ["exception:PluginError", "teardown"]


def test_duplicate_plugin_names_are_an_error() -> None:
    with pytest.raises(PluginError, match="two plugins are named 'Counter'"):
        make_trainer(plugins=[Counter(), Counter()])


def test_builtins_can_be_disabled_by_name() -> None:
    trainer = make_trainer(disable_plugins=["metrics"])
    assert trainer.plugin_manager.get_plugin("metrics") is None
    history = fit(trainer)
    assert history.epochs == [{"epoch": 1}]


def test_two_trainers_never_share_plugin_state() -> None:
    a, b = make_trainer(), make_trainer()
    assert a.plugin_manager.get_plugin("metrics") is not b.plugin_manager.get_plugin("metrics")
    fit(a)
    assert b.history.epochs == []


def test_a_wrapper_hook_times_every_training_step() -> None:
    class StepTimer:
        def __init__(self) -> None:
            self.durations: list[float] = []

        @hookimpl(wrapper=True)
        def training_step(self) -> Any:
            start = time.perf_counter()
            result = yield
            self.durations.append(time.perf_counter() - start)
            return result

    timer = StepTimer()
    fit(make_trainer(plugins=[timer], max_epochs=3))
    assert len(timer.durations) == 6
    assert all(d > 0 for d in timer.durations)


def test_tryfirst_runs_before_other_implementations() -> None:
    order: list[str] = []

    class First:
        @hookimpl(tryfirst=True)
        def on_fit_start(self) -> None:
            order.append("first")

    class Plain:
        @hookimpl
        def on_fit_start(self) -> None:
            order.append("plain")

    fit(make_trainer(plugins=[First(), Plain()]))
    assert order == ["first", "plain"]


def test_explain_hooks_lists_implementers_in_call_order() -> None:
    trainer = make_trainer(plugins=[Counter()])
    table = trainer.explain_hooks()
    line = next(line for line in table.splitlines() if line.startswith("on_train_batch_end"))
    assert line.split(None, 1)[1] == "Counter, metrics"
    assert trainer.plugin_manager.implementers("transfer_batch") == ["device"]


def test_metric_names_reported_twice_name_both_plugins() -> None:
    class Loss:
        @hookimpl
        def compute_metrics(self) -> dict[str, float]:
            return {"loss": 1.0}

    with pytest.raises(PluginError, match=r"'train_loss' is reported by two plugins, 'Loss' and 'metrics'"):
        fit(make_trainer(plugins=[Loss()]))


# -- entry points: a real distribution's metadata on sys.path ------------------------


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake installed distribution 'dltrain-hello' exposing entry point 'hello'."""
    site = tmp_path / "site"
    (site / "dltrain_hello").mkdir(parents=True)
    (site / "dltrain_hello" / "__init__.py").write_text(
        textwrap.dedent(
            """
            import dltrain

            class HelloPlugin:
                instances = 0

                def __init__(self):
                    HelloPlugin.instances += 1
                    self.epochs = 0

                @dltrain.hookimpl
                def on_train_epoch_end(self):
                    self.epochs += 1
            """
        )
    )
    dist = site / "dltrain_hello-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dltrain-hello\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dltrain]\nhello = dltrain_hello:HelloPlugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("DLTRAIN_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield site
    sys.modules.pop("dltrain_hello", None)


def test_an_installed_plugin_is_discovered_and_called(installed_plugin: Path) -> None:
    trainer = make_trainer(max_epochs=2)
    plugin = trainer.plugin_manager.get_plugin("hello")
    assert plugin is not None
    info = {p.name: p for p in trainer.plugin_manager.plugins()}["hello"]
    assert info.source == "entrypoint" and "dltrain_hello:HelloPlugin" in info.origin
    fit(trainer)
    assert plugin.epochs == 2  # type: ignore[attr-defined]
    other = make_trainer()
    assert other.plugin_manager.get_plugin("hello") is not plugin  # a fresh instance per Trainer


def test_an_installed_plugin_can_be_disabled_by_name(installed_plugin: Path) -> None:
    assert make_trainer(disable_plugins=["hello"]).plugin_manager.get_plugin("hello") is None


def test_autoload_off_skips_entry_points(installed_plugin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_trainer(autoload_plugins=False).plugin_manager.get_plugin("hello") is None
    monkeypatch.setenv("DLTRAIN_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert make_trainer().plugin_manager.get_plugin("hello") is None


def test_a_wrapper_on_a_per_plugin_hook_is_refused() -> None:
    class WrapsMetrics:
        @hookimpl(wrapper=True)
        def compute_metrics(self) -> Any:
            return (yield)

    with pytest.raises(PluginError, match=r"'compute_metrics' as a wrapper.*would never run"):
        make_trainer(plugins=[WrapsMetrics()])


def test_keyword_only_hook_arguments_are_refused_with_the_fix() -> None:
    class KeywordOnly:
        @hookimpl
        def on_fit_start(self, *, state: Any) -> None: ...

    with pytest.raises(PluginError, match=r"keyword-only.*\['state'\].*def on_fit_start\(self, state\)"):
        make_trainer(plugins=[KeywordOnly()])


def test_get_plugin_finds_builtins_by_name() -> None:
    trainer = make_trainer()
    assert trainer.get_plugin("metrics") is trainer.plugin_manager.get_plugin("metrics")
    assert trainer.get_plugin("nope") is None


def test_your_own_instance_of_an_installed_plugin_replaces_the_autoloaded_one(installed_plugin: Path) -> None:
    import dltrain_hello  # type: ignore[import-not-found]

    mine = dltrain_hello.HelloPlugin()
    mine.name = "hello"
    trainer = make_trainer(plugins=[mine])
    assert trainer.get_plugin("hello") is mine
    assert {p.name: p.source for p in trainer.plugin_manager.plugins()}["hello"] == "user"


def test_plain_hook_implementations_are_called_directly_with_pluggys_semantics() -> None:
    """The loop's direct calls give what pluggy's dispatch gives: order, results, first result."""
    seen: list[str] = []

    def plugin(name: str, answer: Any, **marks: bool) -> Any:
        class Impl:
            @hookimpl(**marks)
            def on_train_epoch_start(self) -> None:
                seen.append(name)

            @hookimpl(**marks)
            def compute_metrics(self) -> Any:
                return {f"m_{name}": 1.0} if answer else None

            @hookimpl(**marks)
            def transfer_batch(self, batch: Any) -> Any:
                seen.append(f"transfer:{name}")
                return answer

        impl = Impl()
        impl.name = name  # type: ignore[attr-defined]
        return impl

    plugins = [plugin("a", "A"), plugin("b", None), plugin("c", "C", tryfirst=True), plugin("d", None)]
    trainer = dltrain.Trainer(progress="off", run_dir=None, autoload_plugins=False, plugins=plugins)
    manager = trainer.plugin_manager
    trainer._hooks.refresh()
    relay = manager.hook
    state = dltrain.State(run=dltrain.RunKind.FIT)
    for name, kwargs in [
        ("on_train_epoch_start", {"trainer": trainer, "state": state}),
        ("compute_metrics", {"trainer": trainer, "state": state}),
        ("transfer_batch", {"trainer": trainer, "state": state, "batch": 1, "device": torch.device("cpu")}),
    ]:
        seen.clear()
        caller = trainer._hooks.get(name)
        assert caller is not getattr(relay, name)  # no wrappers here: called without pluggy
        direct = caller(**kwargs)
        direct_order = list(seen)
        seen.clear()
        through_pluggy = getattr(relay, name)(**kwargs)
        if name == "compute_metrics":  # built-in metrics and distributed may answer too
            through_pluggy = [r for r in through_pluggy if r]
            direct = [r for r in direct if r]
        assert direct == through_pluggy and direct_order == seen, name
    seen.clear()
    assert (
        trainer._hooks.call_first("transfer_batch", trainer=trainer, state=None, batch=1, device=None) == "C"
    )
    assert seen == ["transfer:c"]  # tryfirst answers first and stops the rest


def test_a_traceback_through_a_direct_hook_call_shows_the_calling_line() -> None:
    """The generated hook callers have their source in linecache, so tracebacks read normally."""
    import traceback

    class Boom:
        name = "boom"

        @hookimpl
        def on_train_epoch_start(self, state: Any) -> None:
            raise RuntimeError("boom")

    model = tiny_model()
    trainer = dltrain.Trainer(
        max_epochs=1, progress="off", run_dir=None, autoload_plugins=False, plugins=[Boom()]
    )
    with pytest.raises(PluginError) as info:
        trainer.fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=torch.nn.CrossEntropyLoss(),
        )
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError)
    frames = traceback.extract_tb(cause.__traceback__)
    caller = next(f for f in frames if f.filename.startswith("<dltrain hook caller on_train_epoch_start"))
    assert caller.line == "result = _impl0(state)"


# --- blame: the (plugin, hook) as called, whatever the code objects --------------------------------


def _logged(fn: Any) -> Any:
    """A decorator a user might put on hook implementations: every decorated hook shares its code."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("failing", ["on_fit_start", "on_train_epoch_end", "on_train_batch_end"])
def test_an_error_in_one_of_several_decorated_hooks_names_that_hook(failing: str) -> None:
    class Decorated:
        name = "decorated"

        def _maybe_fail(self, hook: str) -> None:
            if hook == failing:
                raise RuntimeError(f"boom in {hook}")

        @hookimpl
        @_logged
        def on_fit_start(self) -> None:
            self._maybe_fail("on_fit_start")

        @hookimpl
        @_logged
        def on_train_batch_end(self) -> None:
            self._maybe_fail("on_train_batch_end")

        @hookimpl
        @_logged
        def on_train_epoch_end(self) -> None:
            self._maybe_fail("on_train_epoch_end")

    with pytest.raises(PluginError, match=rf"plugin 'decorated' raised RuntimeError in hook '{failing}'"):
        fit(make_trainer(plugins=[Decorated()], max_epochs=1))


def _logged_wrapper(fn: Any) -> Any:
    """The same for hook wrappers (generator functions)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return (yield from fn(*args, **kwargs))

    return wrapper


def test_an_error_in_a_wrapper_or_after_its_yield_names_that_wrapper() -> None:
    class Wrapping:
        name = "wrapping"

        @hookimpl(wrapper=True)
        @_logged_wrapper
        def on_train_epoch_start(self) -> Any:
            return (yield)

        @hookimpl(wrapper=True)
        @_logged_wrapper
        def on_train_epoch_end(self) -> Any:
            yield
            raise RuntimeError("after the yield")

    with pytest.raises(
        PluginError, match=r"plugin 'wrapping' raised RuntimeError in hook 'on_train_epoch_end'"
    ):
        fit(make_trainer(plugins=[Wrapping()], max_epochs=1))


def test_the_hook_recorder_is_blamed_for_the_hook_it_was_recording() -> None:
    from dltrain.testing import HookRecorder

    class Failing(HookRecorder):
        def record(self, hook_name: str, kwargs: dict[str, Any]) -> None:
            if hook_name == "select_device":
                raise RuntimeError("no device for you")
            super().record(hook_name, kwargs)

    with pytest.raises(PluginError, match=r"plugin 'recorder' raised RuntimeError in hook 'select_device'"):
        fit(make_trainer(plugins=[Failing()]))


def test_an_error_in_a_per_plugin_hook_names_the_plugin_and_hook() -> None:
    class BadState:
        name = "bad_state"

        @hookimpl
        @_logged
        def compute_metrics(self) -> dict[str, float]:
            raise ValueError("no metrics")

    with pytest.raises(PluginError, match=r"plugin 'bad_state' raised ValueError in hook 'compute_metrics'"):
        fit(make_trainer(plugins=[BadState()]))


# --- tracing: pluggy's monitors see every call ----------------------------------------------------


def test_pluggy_tracing_sees_every_hook_call_of_a_run() -> None:
    from dltrain.testing import HookRecorder

    recorder = HookRecorder()
    trainer = make_trainer(plugins=[recorder], max_epochs=1)
    traced: list[str] = []
    undo = trainer.plugin_manager.pluggy_manager.add_hookcall_monitoring(
        lambda hook_name, impls, kwargs: traced.append(hook_name), lambda *args: None
    )
    fit(trainer)
    # The recorder implements every hook, so both list every call; compute_metrics and on_teardown are
    # called on each plugin separately (the recorder and built-ins), and each call is traced.
    assert traced.count("compute_metrics") == 2
    per_plugin = {"compute_metrics", "on_teardown"}
    once = [h for i, h in enumerate(traced) if not (h in per_plugin and traced[i - 1] == h)]
    assert once == recorder.calls
    assert traced.count("on_train_batch_end") == 2
    undo()
    traced.clear()
    fit(trainer)
    assert traced == []  # undone: the fast callers again
