"""FSDP2 (``fully_shard``) for the ``distributed`` plugin: sharding, the optimizer, checkpoints, evaluation.

Used when ``TrainerConfig.strategy == "fsdp"`` and several processes train.
Each part is one job:

* :func:`shard`: ``fully_shard`` on the chosen submodules, bottom-up, then on
  the root; :func:`shard_units` is the policy that chooses them.
* :func:`swap_optimizer_params`: sharding makes new Parameter objects (DTensors),
  so the optimizer built on the old ones is pointed at the new ones, in place.
* :func:`gather_full_state` / :func:`load_full_state`: checkpoints hold the
  plain model's full tensors and the optimizer state in the index form of
  ``Optimizer.state_dict()``, whatever wrote them; the conversions to and from
  the parameter-name form of ``torch.distributed.checkpoint`` are
  :func:`optimizer_state_to_index` and :func:`optimizer_state_to_names`.
* :class:`EvenBatches`: evaluation shards may differ by a batch, but an FSDP
  forward is a collective; a process that runs out of batches runs its last one
  again (results discarded) until every process is done.

``torch.distributed.fsdp`` and DTensor are imported only when used.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dltrain.errors import CheckpointError, ConfigError, DataError, StepError

if TYPE_CHECKING:
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = [
    "EvenBatches",
    "ShardModules",
    "check_swappable",
    "fully_shard_function",
    "gather_full_state",
    "is_sharded",
    "load_full_state",
    "optimizer_param_names",
    "optimizer_state_to_index",
    "optimizer_state_to_names",
    "shard",
    "shard_units",
    "swap_optimizer_params",
]

#: Which submodules become FSDP units: module classes, or a function of the model returning modules.
ShardModules = type[torch.nn.Module] | Iterable[type[torch.nn.Module]] | Callable[[torch.nn.Module], Any]

_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)  # no forward: never a unit of their own


def fully_shard_function() -> Callable[..., Any]:
    """FSDP2's ``fully_shard``.

    Raises:
        ConfigError: this torch does not have it (it is public from torch 2.6).
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as exc:
        raise ConfigError(
            f"strategy='fsdp' needs FSDP2's torch.distributed.fsdp.fully_shard, which torch "
            f"{torch.__version__} does not have (it is there from torch 2.6): upgrade torch, or use "
            f"strategy='ddp'"
        ) from exc
    return fully_shard


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or one of its submodules."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing can be sharded
    module_type = getattr(fsdp, "FSDPModule", None)
    return module_type is not None and any(isinstance(m, module_type) for m in model.modules())


# -- sharding -------------------------------------------------------------------------


def _default_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's children that hold parameters, looking inside ModuleList/ModuleDict."""
    units: list[torch.nn.Module] = []
    for child in model.children():
        if isinstance(child, _CONTAINERS):
            units.extend(_default_units(child))
        elif any(True for _ in child.parameters()):
            units.append(child)
    return units


def shard_units(model: torch.nn.Module, shard_modules: ShardModules | None = None) -> list[torch.nn.Module]:
    """The submodules to shard as units of their own, deepest first (the root comes after them).

    Args:
        model: The model.
        shard_modules: None: each child of the model that holds parameters (the
            items of a ``ModuleList`` or ``ModuleDict`` child count as children).
            A module class or classes: every submodule of that class. A function:
            called with the model, returns the submodules.

    Raises:
        ConfigError: a chosen module is not a submodule of ``model``, or is a
            ``ModuleList``/``ModuleDict`` (it has no forward to gather its parameters in).
    """
    if shard_modules is None:
        chosen = _default_units(model)
    elif isinstance(shard_modules, type) or (
        isinstance(shard_modules, Iterable) and not callable(shard_modules)
    ):
        classes = (shard_modules,) if isinstance(shard_modules, type) else tuple(shard_modules)
        chosen = [m for m in model.modules() if isinstance(m, classes) and m is not model]
    else:
        chosen = list(shard_modules(model))
    depth = {id(m): name.count(".") + 1 for name, m in model.named_modules() if name}
    for module in chosen:
        if id(module) not in depth:
            raise ConfigError(
                f"shard_modules chose a {type(module).__name__} that is not a submodule of the model; "
                f"return modules of the model given (the root is always sharded last)"
            )
        if isinstance(module, _CONTAINERS):
            raise ConfigError(
                f"shard_modules chose a {type(module).__name__}, which has no forward, so its parameters "
                f"would never be gathered; choose the modules inside it"
            )
    unique = list({id(m): m for m in chosen}.values())
    return sorted(unique, key=lambda m: -depth[id(m)])


def shard(
    model: torch.nn.Module,
    device: torch.device,
    *,
    shard_modules: ShardModules | None = None,
    fsdp_kwargs: Mapping[str, Any] | None = None,
) -> None:
    """Apply ``fully_shard`` to the units of :func:`shard_units`, deepest first, then to ``model``.

    The mesh spans every process of the default group, on ``device``'s type,
    unless ``fsdp_kwargs`` holds a ``mesh``. ``fully_shard`` moves each
    process's shard to the mesh's device.
    """
    fully_shard = fully_shard_function()
    kwargs = dict(fsdp_kwargs or {})
    if "mesh" not in kwargs:
        from torch.distributed.device_mesh import init_device_mesh

        kwargs["mesh"] = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in shard_units(model, shard_modules):
        fully_shard(unit, **kwargs)
    fully_shard(model, **kwargs)


def check_swappable(optimizer: torch.optim.Optimizer, before: Mapping[str, torch.Tensor]) -> None:
    """Check, before sharding, that :func:`swap_optimizer_params` can move ``optimizer`` over.

    Args:
        optimizer: The optimizer the user built on the unsharded model.
        before: The model's parameters by name, before sharding.

    Raises:
        StepError: the optimizer already has state (it would stay with the old
            parameters), or holds a parameter that is not the model's.
    """
    if optimizer.state:
        raise StepError(
            f"strategy='fsdp' replaces the model's parameters with sharded ones, but the optimizer "
            f"({type(optimizer).__name__}) already has state for {len(optimizer.state)} parameter(s) (it "
            f"has stepped, or loaded a state dict), which would stay with the old parameters. Create the "
            f"optimizer fresh before fit; to continue a run, use fit(..., resume=...)"
        )
    known = {id(p) for p in before.values()}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in known:
                raise StepError(
                    f"the optimizer's param group {index} holds a parameter of shape {tuple(p.shape)} that "
                    f"is not the model's, so it cannot be sharded with it; create the optimizer from the "
                    f"model passed to fit: optimizer = SGD(model.parameters(), ...)"
                )


def swap_optimizer_params(
    optimizer: torch.optim.Optimizer,
    before: Mapping[str, torch.Tensor],
    after: Mapping[str, torch.Tensor],
) -> None:
    """Point ``optimizer`` at the sharded parameters: each old one is replaced by the new one of its name.

    In place: the same optimizer, param group dicts and ``params`` lists, so an
    LR scheduler built on the optimizer stays valid.

    Args:
        optimizer: The optimizer the user built on the unsharded model.
        before: The model's parameters by name before sharding.
        after: The model's parameters by name after sharding.

    Raises:
        StepError: as :func:`check_swappable`.
    """
    check_swappable(optimizer, before)
    name_of = {id(p): name for name, p in before.items()}
    swapped = [[after[name_of[id(p)]] for p in group["params"]] for group in optimizer.param_groups]
    for group, params in zip(optimizer.param_groups, swapped, strict=True):
        group["params"][:] = params  # the same list: code holding it (LBFGS) sees the new parameters


# -- checkpoints ------------------------------------------------------------------------


def optimizer_param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in the order of their state-dict index."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in name_of:
                raise StepError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not the model's; "
                    f"create it from the model passed to fit"
                )
            names.append(name_of[id(p)])
    return names


def optimizer_state_to_index(state_dict: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """An optimizer state dict keyed by parameter name, in the index form of ``Optimizer.state_dict()``.

    Args:
        state_dict: ``{"state": {name: {...}}, "param_groups": [{"params": [name, ...], ...}]}``.
        names: :func:`optimizer_param_names`: parameter ``i`` of the index form is ``names[i]``.
    """
    index = {name: i for i, name in enumerate(names)}
    return _rekey(state_dict, index, "the optimizer of this run")


def optimizer_state_to_names(state_dict: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_to_index`: index keys become parameter names."""
    return _rekey(state_dict, dict(enumerate(names)), "the checkpoint")


def _rekey(state_dict: Mapping[str, Any], key: Mapping[Any, Any], where: str) -> dict[str, Any]:
    listed = [*(k for g in state_dict["param_groups"] for k in g["params"]), *state_dict["state"]]
    unknown = list(dict.fromkeys(k for k in listed if k not in key))
    if unknown:
        raise CheckpointError(
            f"the optimizer state names parameter(s) {unknown[:5]} that {where} does not have "
            f"({len(key)} parameters); resume with the optimizer (and param groups) the checkpoint was made with"
        )
    return {
        "state": {key[k]: v for k, v in state_dict["state"].items()},
        "param_groups": [{**g, "params": [key[k] for k in g["params"]]} for g in state_dict["param_groups"]],
    }


def gather_full_state(
    model: torch.nn.Module, optimizers: Mapping[str, torch.optim.Optimizer], *, grads: bool
) -> dict[str, Any]:
    """The full model state dict, each optimizer's state (index form) and, if ``grads``, the gradients,
    on rank 0's CPU.

    A collective: every process must call it. Other ranks get empty dicts.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    parts: dict[str, Any] = {"model": get_model_state_dict(model, options=options), "optimizers": {}}
    for name, optimizer in optimizers.items():
        if not optimizer.state:
            # Nothing sharded to gather; and get_optimizer_state_dict would make the state
            # with a zero-learning-rate step (Adam would then count one step more).
            parts["optimizers"][name] = optimizer.state_dict()
        else:
            by_name = get_optimizer_state_dict(model, optimizer, options=options)
            names = optimizer_param_names(model, optimizer)
            parts["optimizers"][name] = optimizer_state_to_index(by_name, names) if by_name else {}
    if grads:
        parts["grads"] = _full_grads(model)
    return parts


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    keep = dist.get_rank() == 0
    full: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        grad = p.grad
        if grad is None:
            continue
        to_full = getattr(grad, "full_tensor", None)
        whole = to_full() if callable(to_full) else grad  # a DTensor: an all-gather
        if keep:
            full[name] = whole.detach().to("cpu", copy=True)
    return full


def load_full_state(
    model: torch.nn.Module, optimizers: Mapping[str, torch.optim.Optimizer], payload: Mapping[str, Any]
) -> None:
    """Load a checkpoint's full model, optimizer states (index form) and gradients into a sharded run.

    Every process calls it with the whole payload; each keeps its shard.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, payload["model"], options=options)
    for name, optimizer in optimizers.items():
        saved = (payload.get("optimizers") or {}).get(name)
        if saved is None:
            continue
        if saved.get("state"):
            by_name = optimizer_state_to_names(saved, optimizer_param_names(model, optimizer))
            set_optimizer_state_dict(model, optimizer, by_name, options=options)
        else:  # no per-parameter state (plain SGD, or saved before the first step): the groups only
            optimizer.load_state_dict(saved)
    grads = payload.get("grads") or {}
    for name, p in model.named_parameters():
        p.grad = _shard_like(grads[name], p) if name in grads else None


def _shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` split as ``param`` is (this process's part, no communication), on its device."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return full.to(param.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), mesh, param.placements, src_data_rank=None)  # type: ignore[attr-defined]


# -- evaluation ---------------------------------------------------------------------------

_END = object()


class EvenBatches:
    """Evaluation batches that end at the same time in every process.

    Before each batch the processes all-reduce whether each still has one.
    While any has, a process that ran out runs the model on its last batch
    again (``transfer_batch`` and ``eval_step``, the output discarded: no batch
    hooks, no metrics), so every process joins every all-gather of the
    sharded forward. ``limit`` (``limit_val_batches``) is applied here, so all
    processes stop at it together.

    Raises:
        DataError: (when iterated, in every process) a process has no batch at
            all while others have some: it has nothing to run the model on.
    """

    def __init__(self, data: Any, trainer: Trainer, state: State, group: Any, limit: int | None) -> None:
        self.data, self.trainer, self.state, self.group, self.limit = data, trainer, state, group, limit

    def __len__(self) -> int:
        n = len(self.data)
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self) -> Iterator[Any]:
        flags = torch.zeros(2, dtype=torch.int64)
        batches = iter(self.data)
        last: Any = _END
        on_device: Any = _END
        count = 0
        while self.limit is None or count < self.limit:
            batch = next(batches, _END)
            mine = batch is not _END
            flags[0], flags[1] = int(mine), int(not mine and last is _END)
            dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=self.group)
            if int(flags[0]) == 0:
                return
            if int(flags[1]):
                raise DataError(
                    f"under strategy='fsdp' every process must run the model as often as the others, but "
                    f"{int(flags[1])} process(es) have no {self.state.phase.value} batch while others have "
                    f"some; use a smaller batch size, drop_last=False, or more samples"
                )
            count += 1
            if mine:
                last, on_device = batch, _END
                yield batch
            else:
                if on_device is _END:
                    on_device = self._transfer(last)
                self._forward(on_device)

    def _transfer(self, batch: Any) -> Any:
        trainer, state = self.trainer, self.state
        moved = trainer.plugin_manager.hook.transfer_batch(
            trainer=trainer, state=state, batch=batch, device=state.device
        )
        return batch if moved is None else moved

    def _forward(self, batch: Any) -> None:
        trainer = self.trainer
        trainer.plugin_manager.hook.eval_step(
            trainer=trainer, state=self.state, model=trainer.model, batch=batch
        )
