"""Saves that do not stall training: snapshot the payload now, write it in another thread.

:class:`Snapshot` copies a payload: every tensor into a CPU buffer that the
next snapshot reuses (page-locked, "pinned", when the tensor is on a GPU, so
the copy runs asynchronously on the tensor's stream), every container rebuilt,
so nothing the training thread changes afterwards reaches the file.
:class:`BackgroundSave` runs one save in a worker thread and keeps its result
or error for the training thread to collect.

Whoever uses them keeps at most one save in flight: a snapshot's buffers are
reused by the next one, so the next snapshot waits until the previous save
has finished.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import torch

__all__ = ["BackgroundSave", "Snapshot"]

T = TypeVar("T")

_Path = tuple[Any, ...]


class Snapshot:
    """A reusable copy of a payload's tensors in CPU memory.

    Storages are copied whole and tensors rebuilt as views of the copies, so
    tensors that share storage (tied weights, views) still share it in the
    copy, and ``torch.save`` writes the same file as from the originals.

    Attributes:
        nbytes: Bytes of CPU memory the buffers hold (kept between saves).
    """

    def __init__(self) -> None:
        self._pool: dict[_Path, torch.UntypedStorage] = {}
        self.nbytes = 0

    def take(self, payload: Mapping[str, Any]) -> tuple[dict[str, Any], list[torch.cuda.Event]]:
        """Copy ``payload``; reuse the buffers of the previous call.

        Must not be called while the previous copy may still be read.

        Returns:
            The copy, and the CUDA events that mark the end of its
            device-to-host copies (wait on them before reading it; empty
            when every tensor was on the CPU).
        """
        copied: dict[tuple[int, int, str], torch.UntypedStorage] = {}
        used: dict[_Path, torch.UntypedStorage] = {}
        devices: set[torch.device] = set()
        result = self._copy(payload, (), copied, used, devices)
        self._pool = used  # buffers of tensors that are gone are freed
        self.nbytes = sum(s.nbytes() for s in used.values())
        events = []
        for device in devices:
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(torch.cuda.current_stream(device))
            events.append(event)
        return dict(result), events

    def _copy(
        self,
        value: Any,
        path: _Path,
        copied: dict[tuple[int, int, str], torch.UntypedStorage],
        used: dict[_Path, torch.UntypedStorage],
        devices: set[torch.device],
    ) -> Any:
        if isinstance(value, torch.Tensor):
            return self._copy_tensor(value, path, copied, used, devices)
        if isinstance(value, (dict, OrderedDict)):
            items = ((k, self._copy(v, (*path, k), copied, used, devices)) for k, v in value.items())
            if not isinstance(value, OrderedDict):
                return dict(items)
            ordered = OrderedDict(items)
            metadata = getattr(value, "_metadata", None)  # a module state_dict's versions: saved too
            if metadata is not None:
                ordered._metadata = self._copy(metadata, (), {}, {}, set())  # type: ignore[attr-defined]
            return ordered
        if isinstance(value, list):
            return [self._copy(v, (*path, i), copied, used, devices) for i, v in enumerate(value)]
        if type(value) is tuple:
            return tuple(self._copy(v, (*path, i), copied, used, devices) for i, v in enumerate(value))
        if isinstance(value, (set, frozenset)):
            return type(value)(self._copy(v, (*path, i), copied, used, devices) for i, v in enumerate(value))
        if isinstance(value, bytearray):
            return bytearray(value)
        return value  # immutable: numbers, strings, bytes, None, torch.Size, dtypes

    def _copy_tensor(
        self,
        tensor: torch.Tensor,
        path: _Path,
        copied: dict[tuple[int, int, str], torch.UntypedStorage],
        used: dict[_Path, torch.UntypedStorage],
        devices: set[torch.device],
    ) -> torch.Tensor:
        tensor = tensor.detach()
        if (
            type(tensor) is not torch.Tensor
            or tensor.layout is not torch.strided
            or tensor.is_quantized
            or tensor.device.type not in ("cpu", "cuda")
        ):
            return tensor.to("cpu", copy=True)  # rare kinds: a plain copy, no reuse
        source = tensor.untyped_storage()
        key = (source.data_ptr(), source.nbytes(), str(source.device))
        buffer = copied.get(key) if source.nbytes() else None
        if buffer is None:
            on_gpu = source.device.type == "cuda"
            buffer = self._pool.get(path)
            if buffer is None or buffer.nbytes() != source.nbytes() or buffer.is_pinned() != on_gpu:
                buffer = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=on_gpu).untyped_storage()
            _bytes_of(buffer).copy_(_bytes_of(source), non_blocking=on_gpu)
            if on_gpu:
                devices.add(source.device)
            copied[key] = buffer
            used[path] = buffer
        view = torch.empty(0, dtype=tensor.dtype)
        view.set_(buffer, tensor.storage_offset(), tensor.size(), tensor.stride())
        return view


def _bytes_of(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over all of ``storage``."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class BackgroundSave(Generic[T]):
    """One save running in a worker thread.

    The thread is not a daemon: should the interpreter exit without waiting
    for it, Python still lets the save finish first.

    Args:
        work: The save; its return value is kept as :attr:`result`.
        events: CUDA events to wait for before ``work`` reads its data.
        name: The thread's name (shown by debuggers and ``py-spy``).
    """

    def __init__(
        self, work: Callable[[], T], *, events: list[torch.cuda.Event] | None = None, name: str = "save"
    ) -> None:
        self._work = work
        self._events = list(events or [])
        self.result: T | None = None
        self.error: BaseException | None = None
        #: Seconds the worker took, from start to finish (set when done).
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name=f"dltrain-{name}", daemon=False)

    def start(self) -> None:
        """Start the worker."""
        self._thread.start()

    @property
    def done(self) -> bool:
        """Whether the worker has finished (cheap: no waiting)."""
        return not self._thread.is_alive()

    def wait(self) -> float:
        """Wait for the worker to finish.

        Returns:
            The seconds spent waiting (0.0 when it had already finished).
        """
        if self.done:
            self._thread.join()
            return 0.0
        start = time.perf_counter()
        self._thread.join()
        return time.perf_counter() - start

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            for event in self._events:
                event.synchronize()
            self.result = self._work()
        except BaseException as exc:  # kept for the training thread, which raises it
            self.error = exc
        finally:
            self.seconds = time.perf_counter() - start
