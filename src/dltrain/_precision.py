"""Mixed precision (``precision``): autocast and, for float16, a GradScaler."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from dltrain.errors import DeviceError

__all__ = ["Precision"]


class Precision:
    """The autocast context and grad scaler of one run.

    Attributes:
        autocast: A factory of the autocast context, or None for float32.
        scaler: A ``torch.amp.GradScaler`` for ``"16-mixed"``, else None.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.autocast: Callable[[], AbstractContextManager[Any]] | None = None
        self.scaler: Any = None
        if precision == "32":
            return
        if precision == "16-mixed" and device.type != "cuda":
            raise DeviceError(
                f"precision='16-mixed' needs a CUDA device, but the run uses {device}; "
                f"use precision='bf16-mixed' on {device.type}"
            )
        dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
        device_type = device.type
        self.autocast = lambda: torch.autocast(device_type=device_type, dtype=dtype)
        if precision == "16-mixed":
            self.scaler = torch.amp.GradScaler(device_type)
