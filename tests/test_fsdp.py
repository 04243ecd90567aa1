"""Sharded training (``strategy="fsdp"``, FSDP2 ``fully_shard``): 2 processes, Gloo, on the CPU.

The runs of ``tests/_dist_scripts/fsdp_runs.py`` go through one real
``torchrun`` job (hard timeout) and are compared with the same runs in this
process, where ``strategy="fsdp"`` trains as usual. The pure parts (the
sharding policy, the optimizer's parameter swap, the optimizer-state
conversions) are tested here without processes. NCCL and GPUs are not tested.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Any

import pydantic
import pytest
import torch
from test_distributed import SCRIPTS, _close, _metrics_close, needs_distributed, torchrun
from torch import nn

import dltrain
from dltrain.checkpoint import list_checkpoints, load_checkpoint
from dltrain.default_plugins import _fsdp
from dltrain.default_plugins.distributed import DistributedPlugin
from dltrain.testing import tiny_loader, tiny_model

if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
import fsdp_runs as runs  # (needs SCRIPTS on sys.path)


def _has_fully_shard() -> bool:
    try:
        _fsdp.fully_shard_function()
    except dltrain.ConfigError:
        return False
    return True


needs_fully_shard = pytest.mark.skipif(not _has_fully_shard(), reason="this torch has no FSDP2 fully_shard")


# -- the runs, once for the whole file --------------------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The runs in this one process (strategy "fsdp": nothing to shard), and checkpoints to resume from."""
    directory = tmp_path_factory.mktemp("fsdp_single")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs.fit_clipped(epochs=1, checkpoint_dir=str(directory / "checkpoints"))
        runs.fit_accumulating(save_dir=str(directory / "mid_group"))
    return {
        "clipped": runs.fit_clipped(),
        "accumulating": runs.fit_accumulating(),
        "checkpoint": list_checkpoints(directory / "checkpoints")[-1].payload_path,
        "mid_group": directory / "mid_group" / "step-000000002.ckpt",
    }


@pytest.fixture(scope="module")
def fsdp(single: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same runs under torchrun, 2 processes; the results of rank 0 and rank 1."""
    out = tmp_path_factory.mktemp("fsdp")
    args = ("--from-single", str(single["checkpoint"]), "--mid-group-from-single", str(single["mid_group"]))
    proc, seconds = torchrun(SCRIPTS / "fsdp_runs.py", "--out", str(out), *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    return {"ranks": ranks, "out": out, "seconds": seconds, "stderr": proc.stderr}


# -- what users see ----------------------------------------------------------------------


@needs_distributed
@needs_fully_shard
def test_two_sharded_processes_end_with_the_weights_and_metrics_of_one_process(
    fsdp: dict[str, Any], single: dict[str, Any]
) -> None:
    expected = single["clipped"]
    for result in (r["fsdp"] for r in fsdp["ranks"]):
        _close(result["weights"], expected["weights"])
        assert len(result["history"]) == len(expected["history"]) == 2
        for row, row_expected in zip(result["history"], expected["history"], strict=True):
            _metrics_close(row, row_expected)  # validation: 4 batches on rank 0, 3 on rank 1
        _metrics_close(result["test"], expected["test"])  # a test run on the sharded model, uneven too
        torch.testing.assert_close(result["predictions"], expected["predictions"], rtol=0, atol=1e-5)
        assert result["lr"] == expected["lr"] == pytest.approx([0.05 * 0.5**3])


@needs_distributed
@needs_fully_shard
def test_gradient_accumulation_under_fsdp_matches_one_process(
    fsdp: dict[str, Any], single: dict[str, Any]
) -> None:
    for result in (r["accumulating"] for r in fsdp["ranks"]):
        _close(result["weights"], single["accumulating"]["weights"])
        for row, row_expected in zip(result["history"], single["accumulating"]["history"], strict=True):
            _metrics_close(row, row_expected)


@needs_distributed
@needs_fully_shard
def test_the_model_stays_sharded_and_the_optimizer_is_the_users(fsdp: dict[str, Any]) -> None:
    for result in (r["fsdp"] for r in fsdp["ranks"]):
        assert result["model_after_fit"] == "FSDPSequential"
        assert result["optimizer_is_the_users"]


@needs_distributed
@needs_fully_shard
def test_a_checkpoint_written_under_fsdp_holds_the_plain_model_and_index_form_optimizer(
    fsdp: dict[str, Any], single: dict[str, Any]
) -> None:
    payload = load_checkpoint(fsdp["out"] / "checkpoints" / "step-000000012.ckpt")
    plain = load_checkpoint(single["checkpoint"])
    assert payload["world_size"] == 2 and payload["config"]["strategy"] == "fsdp"
    _close(payload["model"], fsdp["ranks"][0]["fsdp"]["weights"], atol=0)
    assert {k: v.shape for k, v in payload["model"].items()} == {
        k: v.shape for k, v in plain["model"].items()
    }
    assert payload["optimizers"]["default"]["param_groups"][0]["params"] == [0, 1, 2, 3, 4, 5]
    assert sorted(payload["optimizers"]["default"]["state"]) == [0, 1, 2, 3, 4, 5]
    weight = payload["optimizers"]["default"]["state"][0]["momentum_buffer"]
    assert type(weight) is torch.Tensor and weight.shape == (128, 784)


@needs_distributed
@needs_fully_shard
def test_a_checkpoint_written_under_fsdp_resumes_under_fsdp_exactly(fsdp: dict[str, Any]) -> None:
    # resume_strict=True: the sharded model's shapes compare as full shapes.
    for result in fsdp["ranks"]:
        _close(result["fsdp_resumed"]["weights"], result["fsdp"]["weights"], atol=0)
        _metrics_close(result["fsdp_resumed"]["history"][1], result["fsdp"]["history"][1])
        _close(result["accumulating_resumed"]["weights"], result["accumulating"]["weights"], atol=0)


@needs_distributed
@needs_fully_shard
def test_a_checkpoint_written_under_fsdp_resumes_in_one_process_and_under_ddp(
    fsdp: dict[str, Any], single: dict[str, Any]
) -> None:
    epoch_1 = fsdp["out"] / "checkpoints" / "step-000000006.ckpt"
    with pytest.warns(UserWarning, match="world_size: 2 in the checkpoint, 1 now"):
        resumed = runs.fit_clipped(resume=str(epoch_1))
    _close(resumed["weights"], single["clipped"]["weights"])
    _metrics_close(resumed["history"][1], single["clipped"]["history"][1])
    for result in fsdp["ranks"]:
        _close(result["ddp_from_fsdp"]["weights"], single["clipped"]["weights"])


@needs_distributed
@needs_fully_shard
def test_a_checkpoint_saved_mid_accumulation_group_carries_full_gradients_across_process_counts(
    fsdp: dict[str, Any], single: dict[str, Any]
) -> None:
    mid = load_checkpoint(fsdp["out"] / "mid_group" / "step-000000002.ckpt")
    assert mid["loop"]["micro_step"] == 1
    assert {k: v.shape for k, v in mid["grads"].items()} == {k: v.shape for k, v in mid["model"].items()}
    assert fsdp["ranks"][0]["accumulating"]["saved_grads"] == sorted(mid["model"])
    with pytest.warns(UserWarning, match="world_size: 2 in the checkpoint, 1 now"):
        resumed = runs.fit_accumulating(resume=str(fsdp["out"] / "mid_group" / "step-000000002.ckpt"))
    _close(resumed["weights"], single["accumulating"]["weights"])
    for result in fsdp["ranks"]:
        _close(result["accumulating_from_single"]["weights"], single["accumulating"]["weights"])


@needs_distributed
@needs_fully_shard
def test_a_checkpoint_written_by_one_process_resumes_under_fsdp(
    fsdp: dict[str, Any], single: dict[str, Any]
) -> None:
    assert "world_size: 1 in the checkpoint, 2 now" in fsdp["stderr"]
    for result in fsdp["ranks"]:
        _close(result["fsdp_from_single"]["weights"], single["clipped"]["weights"])


@needs_distributed
@needs_fully_shard
def test_an_optimizer_that_already_has_state_is_refused_before_the_model_is_sharded(
    fsdp: dict[str, Any],
) -> None:
    for result in fsdp["ranks"]:
        message = result["stateful_optimizer"]
        assert message.startswith("StepError: strategy='fsdp' replaces the model's parameters"), message
        assert "already has state for 6 parameter(s)" in message
        assert message.endswith("[model sharded: False]")


@needs_distributed
@needs_fully_shard
def test_nan_weights_in_one_ranks_shard_stop_every_rank_saving(fsdp: dict[str, Any]) -> None:
    assert [r["nan_weights"] for r in fsdp["ranks"]] == [[], []]


@needs_distributed
@needs_fully_shard
def test_the_default_nonfinite_policy_trains_under_fsdp(fsdp: dict[str, Any]) -> None:
    assert [r["default_policy"] for r in fsdp["ranks"]] == ["", ""]


@needs_distributed
@needs_fully_shard
def test_a_nan_loss_on_one_rank_stops_every_rank_under_fsdp(fsdp: dict[str, Any]) -> None:
    results = [r["stop_on_nan_loss"] for r in fsdp["ranks"]]
    assert all("error" not in r for r in results), results
    # Requested at the NaN check of step 2; checked every step (stop_check_every_n_steps=1), so
    # agreed without a blocking collective at step 3.
    assert [r["global_step"] for r in results] == [3, 3]


@needs_distributed
@needs_fully_shard
def test_the_job_stays_fast(fsdp: dict[str, Any]) -> None:
    assert fsdp["seconds"] < 90, f"the torchrun job took {fsdp['seconds']:.0f} s"


# -- configuration ---------------------------------------------------------------------------


def test_strategy_is_validated_and_defaults_to_auto() -> None:
    assert dltrain.TrainerConfig().strategy == "auto"
    assert dltrain.TrainerConfig(strategy="fsdp").strategy == "fsdp"
    with pytest.raises(pydantic.ValidationError, match="'auto', 'ddp' or 'fsdp'"):
        dltrain.TrainerConfig(strategy="zero3")


def test_one_process_trains_as_usual_with_any_strategy() -> None:
    weights = []
    for strategy in ("auto", "ddp", "fsdp"):
        model = tiny_model()
        dltrain.Trainer(device="cpu", progress="off", run_dir=None, strategy=strategy).fit(
            model,
            tiny_loader(),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            loss_fn=nn.CrossEntropyLoss(),
        )
        assert not _fsdp.is_sharded(model)
        weights.append(model.state_dict())
    _close(weights[0], weights[2], atol=0)


def test_fsdp_on_a_torch_without_fully_shard_is_an_error_naming_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", types.ModuleType("torch.distributed.fsdp"))
    with pytest.raises(dltrain.ConfigError, match=r"strategy='fsdp' needs FSDP2.*use strategy='ddp'"):
        _fsdp.fully_shard_function()


# -- the pure parts, in this process -------------------------------------------------------------


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3)])
        self.act = nn.ReLU()
        self.head = nn.ModuleDict({"out": nn.Linear(8, 2)})


def test_the_default_policy_shards_each_child_with_parameters_looking_into_module_lists() -> None:
    model = Blocks()
    units = _fsdp.shard_units(model)
    names = {id(m): n for n, m in model.named_modules()}
    # Deepest first: the blocks and the head's Linear (depth 2), then the embedding.
    assert [names[id(m)] for m in units] == ["blocks.0", "blocks.1", "blocks.2", "head.out", "embed"]


def test_a_policy_by_class_or_function_and_its_errors() -> None:
    model = Blocks()
    names = {id(m): n for n, m in model.named_modules()}
    by_class = _fsdp.shard_units(model, nn.Linear)
    assert [names[id(m)] for m in by_class][:3] == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]
    assert len(by_class) == 5
    by_function = _fsdp.shard_units(model, lambda m: [m.blocks[1], m.embed])
    assert [names[id(m)] for m in by_function] == ["blocks.1", "embed"]
    with pytest.raises(dltrain.ConfigError, match="ModuleList, which has no forward"):
        _fsdp.shard_units(model, lambda m: [m.blocks])
    with pytest.raises(dltrain.ConfigError, match="not a submodule of the model"):
        _fsdp.shard_units(model, lambda m: [nn.Linear(1, 1)])


def _sharded_copy(model: nn.Module) -> dict[str, nn.Parameter]:
    """New Parameter objects under the same names, as fully_shard makes them."""
    return {name: nn.Parameter(p.detach().clone()) for name, p in model.named_parameters()}


def test_the_optimizer_is_pointed_at_the_new_parameters_in_place() -> None:
    model = tiny_model()
    before = dict(model.named_parameters())
    optimizer = torch.optim.SGD(
        [{"params": [before["0.weight"], before["2.weight"]]}, {"params": [before["0.bias"]], "lr": 0.5}],
        lr=0.1,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    groups, lists = list(optimizer.param_groups), [g["params"] for g in optimizer.param_groups]
    after = _sharded_copy(model)
    _fsdp.swap_optimizer_params(optimizer, before, after)
    assert [g["params"] for g in optimizer.param_groups] == [
        [after["0.weight"], after["2.weight"]],
        [after["0.bias"]],
    ]
    assert optimizer.param_groups == groups and all(
        g["params"] is lst for g, lst in zip(optimizer.param_groups, lists, strict=True)
    )
    assert scheduler.optimizer is optimizer and optimizer.param_groups[1]["lr"] == 0.5


def test_an_optimizer_with_state_or_a_foreign_parameter_cannot_be_swapped() -> None:
    model = tiny_model()
    before = dict(model.named_parameters())
    stepped = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    stepped.step()
    with pytest.raises(dltrain.StepError, match=r"already has state for 4 parameter\(s\)"):
        _fsdp.swap_optimizer_params(stepped, before, _sharded_copy(model))
    foreign = torch.optim.SGD([*model.parameters(), nn.Parameter(torch.zeros(5, 5))], lr=0.1)
    with pytest.raises(dltrain.StepError, match=r"param group 0 holds a parameter of shape \(5, 5\)"):
        _fsdp.check_swappable(foreign, before)


def test_optimizer_state_converts_between_index_and_name_forms() -> None:
    model = tiny_model()
    optimizer = torch.optim.Adam(
        [{"params": [model[2].weight, model[0].weight]}, {"params": [model[0].bias], "lr": 0.01}]
    )
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    by_index = optimizer.state_dict()
    names = _fsdp.optimizer_param_names(model, optimizer)
    assert names == ["2.weight", "0.weight", "0.bias"]
    by_name = _fsdp.optimizer_state_to_names(by_index, names)
    assert [g["params"] for g in by_name["param_groups"]] == [["2.weight", "0.weight"], ["0.bias"]]
    assert by_name["state"]["0.bias"]["exp_avg"] is by_index["state"][2]["exp_avg"]
    back = _fsdp.optimizer_state_to_index(by_name, names)
    assert back["param_groups"] == by_index["param_groups"]
    assert back["state"].keys() == by_index["state"].keys()
    fresh = torch.optim.Adam(
        [{"params": [model[2].weight, model[0].weight]}, {"params": [model[0].bias], "lr": 0.01}]
    )
    fresh.load_state_dict(back)  # the index form loads into a plain optimizer
    with pytest.raises(dltrain.CheckpointError, match=r"names parameter\(s\) \['2.bias'\]"):
        _fsdp.optimizer_state_to_index(
            {"state": {"2.bias": {}}, "param_groups": [{"params": ["2.bias"]}]}, names
        )


def test_the_plugin_takes_fsdp_settings() -> None:
    plugin = DistributedPlugin(fsdp_kwargs={"reshard_after_forward": False}, shard_modules=nn.Linear)
    assert plugin._fsdp_kwargs == {"reshard_after_forward": False}
    assert plugin._shard_modules is nn.Linear


def test_the_plugin_leaves_the_checkpoints_of_an_unsharded_model_to_the_trainer() -> None:
    trainer = dltrain.Trainer(device="cpu", progress="off", run_dir=None)
    trainer.model = tiny_model()
    plugin = DistributedPlugin()
    assert not _fsdp.is_sharded(trainer.model)
    assert plugin.gather_model_state(trainer=trainer, state=dltrain.State(run=dltrain.RunKind.FIT)) is None
    assert plugin.restore_model_state(trainer=trainer, payload={}) is None
