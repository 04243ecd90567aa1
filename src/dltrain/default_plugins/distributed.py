"""Built-in plugin ``distributed``: data-parallel or sharded training under ``torchrun``, no code change.

Registered only when the process was started by ``torchrun`` (the
``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and ``MASTER_ADDR`` environment
variables are set) or a ``torch.distributed`` process group is already
initialised, so single-process runs pay nothing. In each run it:

* ``select_device`` (a wrapper, entered first): initialises the process group
  from the environment unless one exists (NCCL when the run uses CUDA, else
  Gloo; with a timeout, so no collective waits forever), and gives each
  process the GPU of its local rank. The Trainer then reads ``state.rank``
  and ``state.world_size`` from the group.
* ``on_setup`` (a wrapper): for fit, by ``TrainerConfig.strategy``. ``"fsdp"``:
  first, before any other plugin (the ``device`` plugin included), shards the
  model with FSDP2 ``fully_shard`` (see :mod:`dltrain.default_plugins._fsdp`),
  so each process moves only its shard to its device, and points the optimizer
  at the sharded parameters. ``"auto"``/``"ddp"``: last, after every other
  plugin changed the model, wraps it in ``DistributedDataParallel``.
* ``prepare_data``: gives each process its shard. A plain ``DataLoader`` is
  rebuilt with a ``DistributedSampler`` for training (every sample once per
  epoch, shuffled per epoch when the original shuffled) and a
  :class:`ShardSampler` for evaluation (no padding, so metrics are exact);
  an :class:`~dltrain.data.InMemoryLoader` is re-sharded the same way. With a
  sharded (FSDP) model, evaluation batches end together in every process
  (:class:`~dltrain.default_plugins._fsdp.EvenBatches`).
* ``gather_model_state`` / ``restore_model_state``: under FSDP, checkpoints
  hold the full model and optimizer state, as one process writes them.
* ``agree_on_stop``: keeps every stop decision the same on all ranks (see below).
* ``on_teardown`` (last): unwraps the model and destroys the process group
  if this plugin created it (kept once it sharded a model: the model's
  parameters live on it).

**Stop agreement** (the ``agree_on_stop`` hook). A stop (early stopping, a
signal, ``on_nonfinite="stop"``, any plugin's ``request_stop``) may be
requested on one rank only, but all ranks must leave the loop at the same
step, or one waits forever in a collective the others never join. The loop
asks wherever it checks for a stop. After each optimizer step the ranks
all-reduce, without waiting, the count of ranks that want to stop, and read
the count started one step earlier (finished long since): when it is
nonzero, every rank stops at this step, with the reason of the lowest rank
that asked. So a stop takes effect one step after it is requested, at the
same step everywhere, and no rank ever waits for another per step (one
non-blocking Gloo all-reduce of a CPU tensor a step: under NCCL no GPU
synchronisation). At epoch boundaries and at fit start the count is exact
(a blocking all-reduce). Nothing here runs inside a signal handler; signal
plugins must only record the signal and call ``request_stop`` from a hook.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Generator, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore
from torch.distributed.rendezvous import rendezvous

from dltrain._loop import unwrap_model
from dltrain._markers import hookimpl
from dltrain._warnings import warn
from dltrain.default_plugins import _fsdp
from dltrain.default_plugins._sharding import ShardSampler, shard_data
from dltrain.errors import ConfigError, DeviceError
from dltrain.state import Phase, RunKind

if TYPE_CHECKING:
    from dltrain.config import TrainerConfig
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = [
    "DEFAULT_TIMEOUT",
    "TIMEOUT_ENV",
    "TORCHRUN_ENV",
    "DistributedPlugin",
    "ShardSampler",
    "launched_by_torchrun",
    "make_plugin",
]

#: Environment variables ``torchrun`` sets in every process it starts.
TORCHRUN_ENV: tuple[str, ...] = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")

#: Environment variable overriding :data:`DEFAULT_TIMEOUT`, in seconds.
TIMEOUT_ENV = "DLTRAIN_DIST_TIMEOUT"

#: How long a collective (and the start-up rendezvous) may wait for the other ranks.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


def launched_by_torchrun() -> bool:
    """True when every variable of :data:`TORCHRUN_ENV` is set (the process was started by torchrun)."""
    return all(os.environ.get(name) for name in TORCHRUN_ENV)


def _timeout_from_env() -> datetime.timedelta:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise DeviceError(
            f"{TIMEOUT_ENV}={value!r} is not a positive number of seconds; e.g. {TIMEOUT_ENV}=600"
        )
    return datetime.timedelta(seconds=seconds)


#: Stop-flag buffers of runs whose process group outlives them, kept for the life of the process.
#: A Gloo worker thread may drop its reference to a finished collective's tensor a moment after the
#: collective ends; when that is the last reference to a tensor Python made, it needs the GIL, and
#: once the interpreter is finalising a thread that asks for the GIL is ended, which aborts the
#: process ("terminate called without an active exception"). A group this plugin destroys joins its
#: threads first; one it keeps (or the user's) runs until the process exits, so its buffers stay here.
_BUFFERS_OF_KEPT_GROUPS: list[torch.Tensor] = []


class DistributedPlugin:
    """Data-parallel (DDP) or sharded (FSDP) training across the processes of a ``torchrun`` job.

    Args:
        seed: Base seed of the training ``DistributedSampler`` (epoch ``e``
            shuffles with ``seed + e``). None: ``config.seed``, or 0 when unset.
        timeout: How long a collective may wait for the other ranks before
            failing. None: ``$DLTRAIN_DIST_TIMEOUT`` seconds, else 10 minutes.
        ddp_kwargs: Extra arguments for ``DistributedDataParallel``, e.g.
            ``{"find_unused_parameters": True}`` (used by strategy ``"auto"``/``"ddp"``).
        fsdp_kwargs: Extra arguments for every ``fully_shard`` call, e.g.
            ``{"mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16)}``
            or ``{"reshard_after_forward": False}`` (used by strategy ``"fsdp"``).
            Without ``mesh``, the mesh spans all processes on the run's device type.
        shard_modules: Which submodules become FSDP units of their own (each is
            gathered for its forward and backward only), before the root. None:
            each child of the model that holds parameters, the items of a
            ``ModuleList``/``ModuleDict`` child counting as children (so each
            block of ``self.blocks = nn.ModuleList(...)`` is a unit). A module
            class or classes (e.g. your transformer block): every submodule of
            those classes. A function: called with the model, returns the modules.
        name: Plugin name. ``disable_plugins`` blocks a name, so an instance
            replacing the built-in needs another one.

    To change these, disable the built-in and register your own, e.g.
    ``Trainer(disable_plugins=["distributed"], plugins=[DistributedPlugin(name="ddp", ddp_kwargs=...)])``.
    """

    def __init__(
        self,
        *,
        seed: int | None = None,
        timeout: datetime.timedelta | None = None,
        ddp_kwargs: Mapping[str, Any] | None = None,
        fsdp_kwargs: Mapping[str, Any] | None = None,
        shard_modules: _fsdp.ShardModules | None = None,
        name: str = "distributed",
    ) -> None:
        self.name = name
        self._seed = seed
        self._timeout = timeout
        self._ddp_kwargs = dict(ddp_kwargs or {})
        self._fsdp_kwargs = dict(fsdp_kwargs or {})
        self._shard_modules = shard_modules
        self._keep_group = False  # a model sharded on the group outlives the run
        self._even_eval: Trainer | None = None  # set while a sharded model runs on several processes
        self._created_group = False
        self._flag_group: Any = None
        self._own_flag_group = False
        # Two stop-flag buffers, used in turn: one may be in an all-reduce still in flight.
        self._flags = (torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
        self._next_flag = 0
        self._in_flight: tuple[Any, torch.Tensor] | None = None
        self._failed = False  # the run raised: a rank may be gone, never wait for it
        self._wrapped: torch.nn.Module | None = None
        self._run_seed = 0

    # -- setup ------------------------------------------------------------------

    @hookimpl(wrapper=True, tryfirst=True)
    def select_device(self, config: TrainerConfig) -> Generator[None, Any, Any]:
        """Initialise the process group first; then put each process on its local rank's GPU."""
        self._run_seed = self._seed if self._seed is not None else (config.seed or 0)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        request = config.device
        cuda = request.startswith("cuda") or (request == "auto" and torch.cuda.is_available())
        if cuda and request in ("auto", "cuda"):
            count = torch.cuda.device_count()
            if local_rank >= count:
                raise DeviceError(
                    f"LOCAL_RANK={local_rank} but this machine shows {count} CUDA device(s): start at most "
                    f"{count} processes per node (torchrun --nproc-per-node={count}), or pass device='cpu'"
                )
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            self._init_group("nccl" if cuda else "gloo")
        self._setup_flag_group()
        device = yield
        if isinstance(device, torch.device) and dist.get_world_size() > 1:
            if device.type == "cuda" and request in ("auto", "cuda"):
                device = torch.device("cuda", local_rank)
            elif device.type == "mps":
                raise DeviceError(
                    "distributed training does not support device 'mps'; pass device='cpu' "
                    "(or run a single process)"
                )
        return device

    def _init_group(self, backend: str) -> None:
        timeout = self._timeout or _timeout_from_env()
        store, rank, world_size = next(rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        # A fresh key prefix per group: a rank that starts its next run (and group)
        # while another still works in the previous one must not read the old
        # group's addresses from the shared store. Every rank makes the same
        # sequence of groups, so its own counter names the same generation.
        generation = store.add(f"dltrain/groups_made_by_rank_{rank}", 1)
        dist.init_process_group(
            backend,
            store=PrefixStore(f"dltrain/group_{generation}/", store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
        )
        # Under torchrun the rendezvous store is torchrun's and outlives the group, so
        # the group can end with the run and the next run can make a new one. Without
        # it (a launcher that only sets the variables), rank 0's group hosts the store;
        # a new one could race with ranks still connected to the old, so it is kept.
        self._created_group = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"

    def _setup_flag_group(self) -> None:
        # Stop flags travel as CPU tensors: under NCCL on a Gloo side group, so agreeing costs no
        # GPU synchronisation. Under Gloo on the default group: an all-reduce left in flight
        # between two steps is matched by its sequence number, as every rank issues the same
        # collectives in the same order, so it cannot mix with the model's own.
        self._in_flight, self._next_flag, self._failed = None, 0, False
        if "gloo" in str(dist.get_backend()).lower():
            self._flag_group, self._own_flag_group = dist.group.WORLD, False
        else:
            timeout = self._timeout or _timeout_from_env()
            self._flag_group = dist.new_group(backend="gloo", timeout=timeout)
            self._own_flag_group = True

    @hookimpl(wrapper=True, tryfirst=True)
    def on_setup(self, trainer: Trainer, state: State) -> Generator[None, Any, Any]:
        """For fit: shard the model first (strategy "fsdp"), or wrap it in DDP last ("auto", "ddp").

        Sharding comes before every other plugin's ``on_setup``, the ``device``
        plugin's move included, so no process ever holds the whole model on its
        device; the optimizer is then pointed at the sharded parameters. DDP
        wraps the model after every other plugin changed it, and broadcasts
        rank 0's parameters and buffers, so all ranks start equal. Evaluation
        runs (validate, test, predict) need neither; a model sharded by an
        earlier fit stays sharded, and its evaluation batches are evened out.

        Raises:
            ConfigError: strategy "fsdp" on a torch without ``fully_shard``, or
                strategy "ddp" with a model sharded already.
        """
        self._wrapped, self._even_eval = None, None
        fit = state.run is RunKind.FIT and state.world_size >= 2
        model = unwrap_model(trainer.model)
        sharded = _fsdp.is_sharded(model)
        if fit and sharded and trainer.config.strategy == "ddp":
            raise ConfigError(
                "strategy='ddp', but the model is already sharded with fully_shard (by an earlier fit with "
                "strategy='fsdp', or by you), so it cannot be wrapped in DistributedDataParallel; use "
                "strategy='fsdp', or pass a model that is not sharded"
            )
        if fit and not sharded and trainer.config.strategy == "fsdp":
            self._shard(trainer, state, model)
            sharded = True
        result = yield
        if sharded:
            self._keep_group = True
            if state.world_size >= 2:
                self._even_eval = trainer
        elif fit and not isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel):
            model = trainer.model
            device_ids = [state.device.index] if state.device.type == "cuda" else None
            trainer.model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=device_ids, **self._ddp_kwargs
            )
            self._wrapped = model
        return result

    def _shard(self, trainer: Trainer, state: State, model: torch.nn.Module) -> None:
        before = dict(model.named_parameters())
        optimizers = list(trainer.optimizers.values())
        for optimizer in optimizers:  # refuse before the model is touched
            _fsdp.check_swappable(optimizer, before)
        _fsdp.shard(model, state.device, shard_modules=self._shard_modules, fsdp_kwargs=self._fsdp_kwargs)
        after = dict(model.named_parameters())
        for optimizer in optimizers:
            _fsdp.swap_optimizer_params(optimizer, before, after)

    # -- checkpoints (FSDP) -----------------------------------------------------------

    @hookimpl
    def gather_model_state(self, trainer: Trainer, state: State) -> dict[str, Any] | None:
        """For a sharded model: the full model, optimizer and (mid group) gradients on rank 0; else None."""
        model = unwrap_model(trainer.model)
        if not _fsdp.is_sharded(model):
            return None
        grads = state.micro_step > 0 or trainer.config.manual_optimization  # as Trainer.state_dict keeps them
        return _fsdp.gather_full_state(model, trainer.optimizers, grads=grads)

    @hookimpl
    def restore_model_state(self, trainer: Trainer, payload: Mapping[str, Any]) -> bool | None:
        """For a sharded model: load the checkpoint's full tensors, each process keeping its shard."""
        model = unwrap_model(trainer.model)
        if not _fsdp.is_sharded(model):
            return None
        _fsdp.load_full_state(model, trainer.optimizers, payload)
        return True

    # -- data -------------------------------------------------------------------

    @hookimpl
    def prepare_data(self, state: State, data: Any, phase: Phase) -> Any:
        """This rank's shard of ``data`` (a rebuilt loader), or None to keep ``data`` as it is.

        Training data is split into equal shards (so every rank makes the
        same number of steps); evaluation data into unpadded shards (so
        metrics are exact). Predict keeps all data on every rank. With a
        sharded model, evaluation data is wrapped in :class:`~dltrain.default_plugins._fsdp.EvenBatches`.
        """
        shard = shard_data(data, state.rank, state.world_size, phase, seed=self._run_seed)
        if self._even_eval is None or phase is Phase.TRAIN:
            return shard
        trainer = self._even_eval
        group, limit = self._flag_group, trainer.config.limit_val_batches
        return _fsdp.EvenBatches(data if shard is None else shard, trainer, state, group, limit)

    # -- stop agreement -------------------------------------------------------------

    @hookimpl
    def agree_on_stop(self, trainer: Trainer, state: State, blocking: bool) -> bool | None:
        """Whether every rank stops here (see "Stop agreement" in the module docs).

        After an optimizer step (``blocking=False``) it reads the all-reduce
        started at the previous step, which has long finished, and starts this
        step's: no rank waits for another, and all act on the same count at
        the same step. At epoch boundaries it waits for an exact count.
        """
        if state.world_size < 2 or self._flag_group is None:
            return None
        wanting = self._count_now(state) if blocking else self._count_one_step_late(state)
        if not wanting:
            return False
        reasons: list[Any] = [None] * state.world_size
        dist.all_gather_object(reasons, state.stop_reason if state.stop_requested else None, self._flag_group)
        if not state.stop_requested:
            first = next(r for r, reason in enumerate(reasons) if reason is not None)
            trainer.request_stop(f"{reasons[first]} (on rank {first})")
        return True

    @hookimpl
    def agree_on_max(self, state: State, values: list[int]) -> list[int] | None:
        """The elementwise maximum of ``values`` over the ranks (a blocking all-reduce, once in flight ended)."""
        if state.world_size < 2 or self._flag_group is None:
            return None
        self._finish_count()
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self._flag_group)
        return [int(v) for v in tensor.tolist()]  # a CPU tensor: no device sync

    def _count_one_step_late(self, state: State) -> int:
        """The number of ranks that wanted to stop at the previous step; starts this step's count."""
        wanting = self._finish_count()
        buffer = self._flags[self._next_flag]
        self._next_flag ^= 1
        buffer.fill_(1 if state.stop_requested else 0)
        self._in_flight = (
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self._flag_group, async_op=True),
            buffer,
        )
        return wanting

    def _count_now(self, state: State) -> int:
        """The number of ranks that want to stop now (a blocking all-reduce, once any in flight ended)."""
        self._finish_count()
        buffer = self._flags[0]
        buffer.fill_(1 if state.stop_requested else 0)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self._flag_group)
        return int(buffer.item())  # a CPU tensor: no device sync

    def _finish_count(self) -> int:
        """Wait for the all-reduce in flight, if any (started a step ago: done by now); its count."""
        if self._in_flight is None:
            return 0
        work, buffer = self._in_flight
        self._in_flight = None
        work.wait()
        return int(buffer.item())

    # -- teardown ---------------------------------------------------------------

    @hookimpl
    def on_exception(self) -> None:
        """Remember that the run failed: teardown then waits for no other rank."""
        self._failed = True

    @hookimpl(trylast=True)
    def on_teardown(self, trainer: Trainer) -> None:
        """Give ``trainer.model`` back unwrapped; destroy the groups this plugin created.

        Once this plugin sharded a model (FSDP), the default group is kept for
        the rest of the process: the model's parameters live on it.
        """
        self._even_eval = None
        if self._wrapped is not None:
            trainer.model, self._wrapped = self._wrapped, None
        try:
            if self._in_flight is not None and dist.is_initialized() and not self._failed:
                self._finish_count()  # every rank started it: waiting is safe
            if self._created_group and not self._keep_group and dist.is_initialized():
                dist.destroy_process_group()  # joins the group's threads
                return
            _BUFFERS_OF_KEPT_GROUPS.extend(self._flags)  # the group's threads outlive this run
            if (
                self._own_flag_group
                and self._flag_group is not None
                and dist.is_initialized()
                and not (self._failed and self._in_flight is not None)  # pending work on a dead peer
            ):
                dist.destroy_process_group(self._flag_group)
        except Exception as exc:  # pragma: no cover - never hide the run's own error
            warn(f"dltrain: destroying the process group failed: {exc!r}")
        finally:
            self._created_group, self._own_flag_group, self._flag_group = False, False, None
            self._in_flight = None


def make_plugin(config: TrainerConfig) -> DistributedPlugin | None:
    """The factory the plugin manager calls: a plugin only under torchrun or an initialised group."""
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and not (dist.is_available() and launched_by_torchrun()):
        return None
    return DistributedPlugin()
