"""Built-in plugin ``device``: choose the device, move the model and every batch there."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from dltrain._markers import hookimpl
from dltrain.errors import DeviceError

if TYPE_CHECKING:
    from dltrain.config import TrainerConfig
    from dltrain.state import State
    from dltrain.trainer import Trainer

__all__ = ["DevicePlugin", "available_devices", "move_to_device", "resolve_device"]


def available_devices() -> list[str]:
    """The device strings that work on this machine, e.g. ``["cpu", "cuda:0"]``."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def resolve_device(request: str) -> torch.device:
    """Turn a device request (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``) into a device.

    ``auto`` picks CUDA, then MPS, then CPU.

    Raises:
        DeviceError: the device is not on this machine; the message lists those that are.
    """
    available = available_devices()
    if request == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps" if "mps" in available else "cpu")
    device = torch.device(request)
    if device.type == "cuda":
        index = 0 if device.index is None else device.index
        if f"cuda:{index}" not in available:
            raise DeviceError(
                f"device {request!r} is not available on this machine; available: {available}. "
                f"Use device='auto' or one of those."
            )
        return torch.device("cuda", index)
    if device.type == "mps" and "mps" not in available:
        raise DeviceError(
            f"device 'mps' is not available on this machine; available: {available}. "
            f"Use device='auto' or one of those."
        )
    return device


def _all_tensors_on(batch: tuple[Any, ...], device: torch.device) -> bool:
    """Whether every item of the tuple is a plain tensor already on ``device``."""
    for b in batch:  # noqa: SIM110 - a loop, not all(...): no generator frame per batch
        if type(b) is not torch.Tensor or b.device != device:
            return False
    return True


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move every tensor inside ``batch`` to ``device``.

    Walks nested tuples, lists, dicts, named tuples and dataclass instances;
    any other value is returned as it is.
    """
    if isinstance(batch, torch.Tensor):
        if batch.device == device:
            return batch
        return batch.to(device, non_blocking=non_blocking and batch.is_pinned())
    if isinstance(batch, tuple):
        if _all_tensors_on(batch, device):
            return batch  # the usual case on the CPU, or data already on the device
        moved = [move_to_device(b, device, non_blocking) for b in batch]
        if hasattr(batch, "_fields"):  # named tuple
            return type(batch)(*moved)
        return tuple(moved)
    if isinstance(batch, list):
        return [move_to_device(b, device, non_blocking) for b in batch]
    if isinstance(batch, Mapping):
        items = {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: move_to_device(getattr(batch, f.name), device, non_blocking)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **changes)
    return batch


class DevicePlugin:
    """Places the model and the batches on the configured device.

    The model is moved in place with ``model.to(device)``, which keeps its
    Parameter objects: an optimizer created before the move keeps working,
    since optimizers hold the Parameters, not copies. (Optimizer *state*
    created before the move, e.g. after ``optimizer.load_state_dict`` on
    CPU, stays where it was; PyTorch moves it on the next load.)
    """

    name = "device"

    def __init__(self, config: TrainerConfig) -> None:
        self._request = config.device

    @hookimpl(trylast=True)
    def select_device(self) -> torch.device:
        """Resolve ``config.device`` (raises DeviceError if it is not there)."""
        return resolve_device(self._request)

    @hookimpl(tryfirst=True)
    def on_setup(self, trainer: Trainer, state: State) -> None:
        """Move the model to ``state.device`` before other plugins wrap it."""
        trainer.model.to(state.device)

    @hookimpl(trylast=True)
    def transfer_batch(self, batch: Any, device: torch.device) -> Any:
        """Move the batch to ``device``, non-blocking from pinned memory on CUDA."""
        if type(batch) is tuple and _all_tensors_on(batch, device):  # the usual batch, often there
            return batch
        return move_to_device(batch, device, non_blocking=device.type == "cuda")


def make_plugin(config: TrainerConfig) -> DevicePlugin:
    """The factory the plugin manager calls."""
    return DevicePlugin(config)
