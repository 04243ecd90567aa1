"""One Optuna trial trained by 2 processes under torchrun; rank 0's trial is pruned after epoch 2.

Started by ``test_optuna.py`` as users start it::

    torchrun --standalone --nproc-per-node=2 _dist_prune.py --out DIR

Rank 0 owns the study and runs ``study.optimize``; the other rank runs the
same objective with no trial, as in Optuna's distributed examples. Each rank
writes ``DIR/rank<r>.json``: where its fit stopped, and what ``check_pruned``
raised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import optuna
import torch
from dltrain_optuna import OptunaPruning

import dltrain
from dltrain.testing import tiny_loader, tiny_model


def objective(trial: optuna.Trial | None, result: dict[str, Any]) -> float:
    plugin = OptunaPruning(trial, monitor="val_loss")
    model = tiny_model()
    trainer = dltrain.Trainer(max_epochs=6, device="cpu", progress="off", run_dir=None, plugins=[plugin])
    history = trainer.fit(
        model,
        tiny_loader(samples=64, batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1),
    )
    assert trainer.state is not None
    result.update(
        global_step=trainer.state.global_step,
        epochs=len(history.epochs),
        stop_reason=trainer.state.stop_reason,
        pruned_epoch=plugin.pruned_epoch,
        reported=[str(epoch) for epoch in plugin.reported],
        raised=None,
    )
    try:
        plugin.check_pruned()
    except optuna.TrialPruned as exc:
        result["raised"] = str(exc)
        raise
    return history["val_loss"][-1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    rank = int(os.environ["RANK"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    result: dict[str, Any] = {"rank": rank}
    if rank == 0:
        # Prunes every trial whose val_loss is above 0 once it has reported 2 epochs.
        study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0, n_warmup_steps=2))
        study.optimize(lambda trial: objective(trial, result), n_trials=1)
        result["trial_state"] = study.trials[0].state.name
    else:
        with contextlib.suppress(optuna.TrialPruned):  # as study.optimize records a pruned trial
            objective(None, result)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
