"""``on_nonfinite="rollback"``: back to the newest checkpoint before a non-finite value, and on.

When the non-finite check (every ``log_every_n_steps`` steps and at each
epoch's end) finds a NaN or infinite loss or weight, every process restores
the newest committed checkpoint saved before the checked window began (the
same one in all processes), scales the learning rates by
``rollback_lr_scale`` (cumulatively: ``scale ** rollbacks``), marks the batch
whose loss was first non-finite to be skipped from then on, and training goes
on from the checkpoint's position, in memory, without leaving the process.
After ``max_rollbacks`` rollbacks the next one restores the checkpoint and
raises :class:`~dltrain.NonFiniteError`: the model holds the last finite state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dltrain._nonfinite import Problem
from dltrain._warnings import warn
from dltrain.errors import CheckpointError, NonFiniteError

if TYPE_CHECKING:
    from dltrain._loop import Driver

__all__ = ["roll_back"]


def roll_back(driver: Driver, problem: Problem) -> None:
    """Restore the newest checkpoint from before ``problem``; skip its culprit batch from now on.

    Raises:
        NonFiniteError: the rollbacks are used up (after restoring the checkpoint).
        CheckpointError: there is no committed checkpoint from before the problem.
    """
    from dltrain.checkpoint import list_checkpoints, load_checkpoint

    trainer, state, config = driver.trainer, driver.state, driver.config
    assert config.checkpoint is not None  # the config requires it with this policy
    directory = config.checkpoint.dir
    saver = trainer.get_plugin("checkpoint")
    if saver is not None and hasattr(saver, "wait"):
        saver.wait()  # an asynchronous save in flight may be the checkpoint to restore
    eligible = [i for i in list_checkpoints(directory) if i.global_step <= problem.since]
    if len(eligible) > 1 and eligible[-1].global_step == driver.last_restored_step:
        # Failed again from the checkpoint the last rollback restored: its weights are finite but
        # already on their way out (a run diverging at too high a learning rate): go further back.
        eligible = [i for i in eligible if i.global_step < driver.last_restored_step] or eligible
    # Every process restores the same checkpoint: the newest that all of them see (a save may
    # still be committing in rank 0 while another process lists the directory).
    newest = eligible[-1].global_step if eligible else -1
    agreed = trainer._hooks.call_first("agree_on_max", trainer=trainer, state=state, values=[-newest])
    step = newest if agreed is None else -agreed[0]
    # Listed again: the agreement above waited for every process, so a save that rank 0 was committing
    # when another process listed (an epoch-end checkpoint replacing the step's, under another name)
    # is on disk now, and the other's first listing may name a file that is gone.
    chosen = [i for i in list_checkpoints(directory) if i.global_step == step] if step >= 0 else []
    if step < 0 or not chosen:
        raise CheckpointError(
            f"on_nonfinite='rollback': {problem.text}, but {str(directory)!r} holds no committed checkpoint "
            f"from before global step {problem.since} to roll back to; save more often "
            f"(checkpoint every_n_steps) or from the start of the run"
        )
    info = chosen[-1]
    payload = load_checkpoint(info.payload_path)
    trainer.load_state_dict(payload)
    driver.after_rollback()
    driver.last_restored_step = info.global_step
    state.rollbacks += 1
    scale = config.rollback_lr_scale**state.rollbacks
    if scale != 1.0:
        _scale_learning_rates(trainer, scale)
    if problem.culprit is not None:
        driver.skip_batches.add(problem.culprit)
    where = f"checkpoint {info.name} (global step {info.global_step})"
    if state.rollbacks > config.max_rollbacks:
        raise NonFiniteError(
            f"gave up after {config.max_rollbacks} rollback(s): {problem.text}. The model and optimizers are "
            f"back at {where}, the newest finite state in {str(directory)!r}; lower the learning rate "
            f"(rollback_lr_scale), clip gradients, or check the data, and resume from it"
        )
    skipped = (
        f"; batch {problem.culprit[1]} of epoch {problem.culprit[0] + 1} will be skipped"
        if problem.culprit is not None
        else ""
    )
    lr = f"; learning rates scaled by {scale:g}" if scale != 1.0 else ""
    reason = f"{problem.text}: rolled back to {where} (rollback {state.rollbacks} of {config.max_rollbacks}){skipped}{lr}"
    if state.is_global_zero:
        warn(f"on_nonfinite='rollback': {reason}")
    trainer._hooks.call(
        "on_rollback", trainer=trainer, state=state, checkpoint=str(info.payload_path), reason=reason
    )


def _scale_learning_rates(trainer: Any, scale: float) -> None:
    """Scale every parameter group's learning rate, and the base rates schedulers compute from."""
    for optimizer in trainer.optimizers.values():
        for group in optimizer.param_groups:
            for key in ("lr", "initial_lr"):
                if isinstance(group.get(key), (int, float)):
                    group[key] = group[key] * scale
    for spec in trainer.optimizers.schedules.values():
        base = getattr(spec.scheduler, "base_lrs", None)
        if isinstance(base, list):
            spec.scheduler.base_lrs = [b * scale for b in base]
