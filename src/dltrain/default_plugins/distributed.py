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
asks wherever it checks for a stop; the answer comes from
``StopAgreement`` (module ``_stop_agreement``): at check points
(every ``stop_check_every_n_steps`` optimizer steps, or about every 50 ms of
training) the ranks all-reduce, without waiting, whether any wants to stop, and
read the all-reduce started at the check point before (finished long since):
when it says yes, every rank stops at this step, with the reason of the lowest
rank that asked. No rank ever waits for another between epochs, and most steps
exchange nothing. At epoch boundaries and at fit start the answer is exact (a
blocking all-reduce). Nothing here runs inside a signal handler; signal
plugins must only record the signal and call ``request_stop`` from a hook.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import os
import weakref
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
from dltrain.default_plugins._stop_agreement import StopAgreement
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


def _destroy_kept_group_at_exit() -> None:
    """At exit, before the interpreter finalises: destroy the default group this plugin made and kept.

    Destroying it joins Gloo's worker threads while they can still take the GIL, so the tensors of
    the last collectives (the metrics', a checkpoint's) are released in time (see above).
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # a DDP wrapper left in a reference cycle holds the group
        dist.destroy_process_group()


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
        self._created_group = False  # the group is destroyed at teardown
        self._made_group = False  # this plugin made the default group (else the user did)
        self._own_flag_group = False  # the agreement's group is a Gloo side group of this run's
        self._agreement: StopAgreement | None = None  # the run's stop exchange, once the group is up
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
        self._setup_flag_group(config)
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
        self._made_group = True

    def _setup_flag_group(self, config: TrainerConfig) -> None:
        # Stop flags travel as CPU tensors: under NCCL on a Gloo side group, so agreeing costs no
        # GPU synchronisation. Under Gloo on the default group: an all-reduce left in flight
        # between two check points is matched by its sequence number, as every rank issues the
        # same collectives in the same order, so it cannot mix with the model's own.
        self._failed = False
        group: Any = dist.group.WORLD
        self._own_flag_group = "gloo" not in str(dist.get_backend()).lower()
        if self._own_flag_group:
            group = dist.new_group(backend="gloo", timeout=self._timeout or _timeout_from_env())
        self._agreement = StopAgreement(group, config.stop_check_every_n_steps)

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
        assert self._agreement is not None  # set up in select_device
        group, limit = self._agreement.group, trainer.config.limit_val_batches
        return _fsdp.EvenBatches(data if shard is None else shard, trainer, state, group, limit)

    # -- stop agreement -------------------------------------------------------------

    @hookimpl
    def agree_on_stop(self, trainer: Trainer, state: State, blocking: bool) -> bool | None:
        """Whether every rank stops here (see "Stop agreement" in the module docs).

        After an optimizer step (``blocking=False``): between check points it
        answers False at once; at a check point it reads the all-reduce started
        at the previous one, which has long finished, and starts the next: no
        rank waits for another, and all act on the same answer at the same
        step. It then sets ``state.stop_delay_steps``. At epoch boundaries it
        waits for an exact answer.
        """
        agreement = self._agreement
        if state.world_size < 2 or agreement is None:
            return None
        if blocking:
            wanting = agreement.count_now(state)
        elif state.global_step < agreement.next_check:
            return False  # between two check points: nothing to read or start (most steps)
        else:
            wanting = agreement.count_at_check(state)
        state.stop_delay_steps = agreement.delay_steps
        if not wanting:
            return False
        reasons: list[Any] = [None] * state.world_size
        dist.all_gather_object(reasons, state.stop_reason if state.stop_requested else None, agreement.group)
        if not state.stop_requested:
            first = next(r for r, reason in enumerate(reasons) if reason is not None)
            trainer.request_stop(f"{reasons[first]} (on rank {first})")
        return True

    @hookimpl
    def agree_on_max(self, state: State, values: list[int]) -> list[int] | None:
        """The elementwise maximum of ``values`` over the ranks (a blocking all-reduce, once in flight ended)."""
        agreement = self._agreement
        if state.world_size < 2 or agreement is None:
            return None
        agreement.finish()
        tensor = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=agreement.group)
        return [int(v) for v in tensor.tolist()]  # a CPU tensor: no device sync

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
        users_model, self._wrapped = self._wrapped, None
        wrapper = None
        if users_model is not None:
            wrapper = weakref.ref(trainer.model)  # the DDP module of on_setup (compile unwrapped already)
            trainer.model = users_model
        agreement, self._agreement = self._agreement, None
        try:
            pending = agreement is not None and agreement.in_flight is not None
            if agreement is not None and pending and dist.is_initialized() and not self._failed:
                agreement.finish()  # every rank started it: waiting is safe
                pending = False
            if self._created_group and not self._keep_group and dist.is_initialized():
                if wrapper is not None and wrapper() is not None:
                    # Still alive, held by reference cycles (a compiled wrapper's): free it while the group
                    # lives, or its reducer keeps the group until the interpreter exits (Gloo may abort).
                    gc.collect()
                dist.destroy_process_group()  # joins the group's threads
            elif agreement is not None:
                _BUFFERS_OF_KEPT_GROUPS.extend(agreement.buffers)  # the group's threads outlive this run
                if self._made_group:  # kept: destroyed at exit; not after a failure (a peer may be gone)
                    atexit.unregister(_destroy_kept_group_at_exit)
                    if not self._failed:
                        atexit.register(_destroy_kept_group_at_exit)
                if self._own_flag_group and dist.is_initialized() and not pending:  # not: work on a dead peer
                    dist.destroy_process_group(agreement.group)
        except Exception as exc:  # pragma: no cover - never hide the run's own error
            warn(f"dltrain: destroying the process group failed: {exc!r}")
        finally:
            self._created_group, self._own_flag_group = False, False


def make_plugin(config: TrainerConfig) -> DistributedPlugin | None:
    """The factory the plugin manager calls: a plugin only under torchrun or an initialised group."""
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and not (dist.is_available() and launched_by_torchrun()):
        return None
    return DistributedPlugin()
