"""Checks of user input, run before training starts so no work is lost."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from dltrain.errors import DataError, StepError

__all__ = ["check_data", "check_model", "check_optimizer"]


def check_model(model: Any) -> torch.nn.Module:
    """The model must be an ``nn.Module`` instance."""
    if isinstance(model, type):
        raise StepError(
            f"model is the class {model.__name__}, not an instance: create it first, "
            f"e.g. model = {model.__name__}(...), and pass model"
        )
    if not isinstance(model, torch.nn.Module):
        raise StepError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; "
            f"wrap your function in an nn.Module subclass"
        )
    return model


def check_optimizer(optimizer: Any, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer must be a torch optimizer over the model's own parameters."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        hint = (
            " (a class: did you mean SGD(model.parameters(), lr=...)?)" if isinstance(optimizer, type) else ""
        )
        raise StepError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}{hint}")
    model_params = {id(p) for p in model.parameters()}
    foreign = [
        tuple(p.shape)
        for group in optimizer.param_groups
        for p in group["params"]
        if id(p) not in model_params
    ]
    if foreign:
        raise StepError(
            f"the optimizer holds {len(foreign)} parameter(s) that are not the model's "
            f"(shapes {foreign[:3]}{'...' if len(foreign) > 3 else ''}); create it from this model: "
            f"optimizer = SGD(model.parameters(), ...)"
        )
    return optimizer


def check_data(data: Any, argument: str) -> Iterable[Any]:
    """The data must be a re-iterable of batches and not known to be empty."""
    if data is None:
        raise DataError(f"{argument} is None; pass a DataLoader or any iterable of batches")
    if isinstance(data, torch.utils.data.Dataset) and not hasattr(data, "__iter__"):
        raise DataError(
            f"{argument} is a Dataset, not batches; wrap it: DataLoader({argument}, batch_size=...)"
        )
    if not hasattr(data, "__iter__"):
        raise DataError(
            f"{argument} must be iterable (a DataLoader, a list of batches), got {type(data).__name__}"
        )
    # Never call iter() here: a DataLoader draws from its generator when iterated.
    if isinstance(data, Iterator):
        raise DataError(
            f"{argument} is an iterator, which is exhausted after one epoch; pass something that can be "
            f"iterated again (a DataLoader, a list), or a function's result wrapped in a list"
        )
    try:
        n = len(data)
    except TypeError:
        return data  # type: ignore[no-any-return]
    if n == 0:
        raise DataError(
            f"{argument} is empty (len 0); check the dataset path and that batch_size <= the number of "
            f"samples when drop_last=True"
        )
    return data  # type: ignore[no-any-return]
