"""Tune the MNIST example with Optuna: learning rate, batch size and hidden width.

Each trial trains the example's network for ``--epochs`` epochs on the first
``--train-samples`` training images, and validates after every epoch on the
last ``--val-samples`` training images (the test set stays out of the search).
With ``--activation relu`` (the default here) the network is the ReLU MLP
784 -> width -> width/2 -> 10 and the width is searched too; with ``none`` it
is the tutorial's linear network. The ``OptunaPruning`` plugin reports each
epoch's validation loss to the trial, and a median pruner stops a trial whose
loss is worse than the median of the finished trials at the same epoch.

    python examples/mnist/tune.py --data-dir ../shared/data                 # 20 trials of 3 epochs
    python examples/mnist/tune.py --data-dir ../shared/data --storage sqlite:///tune.db --study-name mnist
    # interrupted? The same command continues the study until it has --trials finished trials.

Needs the Optuna plugin and torchvision: ``pip install -e ".[vision]" -e plugins/dltrain-optuna``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from dltrain_optuna import OptunaPruning
from mnist_cli import _device, _positive_int, run_main
from mnist_data import default_data_dir, load_mnist
from mnist_model import ACTIVATIONS
from torch import nn

import dltrain
from dltrain.errors import DataError

#: The search space (the learning rate is drawn log-uniformly between the two bounds).
LR_RANGE = (1e-4, 0.5)
BATCH_SIZES = (32, 64, 128, 256)
WIDTHS = (64, 128, 256, 512)

#: The metric each trial reports after every epoch and the study minimizes.
MONITOR = "val_loss"


@dataclass(frozen=True)
class Split:
    """The training images of one study, split into a training part and a validation part."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor
    val_targets: torch.Tensor


def load_split(args: argparse.Namespace) -> Split:
    """Read MNIST's training images once, as tensors, and split them.

    Raises:
        DataError: The files are missing (see ``mnist_data``), or the two
            sizes add up to more images than there are.
    """
    images = load_mnist(args.data_dir, train=True, download=args.download)
    inputs, targets = dltrain.InMemoryLoader.from_dataset(images, batch_size=1000).tensors
    total = len(inputs)
    if args.train_samples + args.val_samples > total:
        raise DataError(
            f"--train-samples {args.train_samples} + --val-samples {args.val_samples} is more than "
            f"the {total} training images in {args.data_dir!r}; lower one of them"
        )
    return Split(
        inputs[: args.train_samples],
        targets[: args.train_samples],
        inputs[total - args.val_samples :],
        targets[total - args.val_samples :],
    )


def make_model(activation: str, width: int) -> nn.Module:
    """The tutorial's three linear layers; with ReLU between them, ``width`` and ``width // 2`` wide."""
    act: type[nn.Module] = nn.ReLU if activation == "relu" else nn.Identity
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, width),
        act(),
        nn.Linear(width, width // 2),
        act(),
        nn.Linear(width // 2, 10),
    )


def objective(trial: optuna.Trial, args: argparse.Namespace, split: Split) -> float:
    """Train one configuration; the last epoch's validation loss (or ``TrialPruned``)."""
    lr = trial.suggest_float("lr", *LR_RANGE, log=True)
    batch_size = trial.suggest_categorical("batch_size", BATCH_SIZES)
    # Without activations the network is linear whatever its width: keep the tutorial's 128.
    width = trial.suggest_categorical("width", WIDTHS) if args.activation == "relu" else 128

    # Every trial starts from the same seed, so trials differ by their parameters alone.
    dltrain.seed_everything(args.seed)
    model = make_model(args.activation, width)
    train = dltrain.InMemoryLoader(
        split.train_inputs, split.train_targets, batch_size=batch_size, shuffle=True, seed=args.seed
    )
    val = dltrain.InMemoryLoader(split.val_inputs, split.val_targets, batch_size=1000)
    pruning = OptunaPruning(trial, monitor=MONITOR)
    trainer = dltrain.Trainer(
        max_epochs=args.epochs,
        device=args.device,
        seed=None,
        progress="off",
        run_dir=None,
        on_nonfinite="stop",  # a learning rate that diverges ends its trial, not the study
        plugins=[pruning],
    )
    history = trainer.fit(
        model,
        train,
        optimizer=torch.optim.SGD(model.parameters(), lr=lr),
        loss_fn=nn.CrossEntropyLoss(),
        val_data=val,
    )
    if "val_accuracy" in history:
        trial.set_user_attr("val_accuracy", history["val_accuracy"][-1])
    pruning.check_pruned()  # raises optuna.TrialPruned: the trial ends as PRUNED
    value = history[MONITOR][-1] if MONITOR in history else math.nan
    # A NaN ends the trial as FAILED (Optuna's rule), which the search then avoids.
    return value if math.isfinite(value) else math.nan


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _accuracy(trial: optuna.trial.FrozenTrial) -> str:
    accuracy = trial.user_attrs.get("val_accuracy")
    return f" (val_accuracy {100 * accuracy:.2f} %)" if accuracy is not None else ""


def print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna callback: one line per finished trial."""
    state = trial.state
    if state is optuna.trial.TrialState.COMPLETE:
        result = f"{MONITOR} {trial.value:.4f}{_accuracy(trial)}"
    elif state is optuna.trial.TrialState.PRUNED and trial.intermediate_values:
        epoch = max(trial.intermediate_values)
        result = f"pruned after epoch {epoch}, {MONITOR} {trial.intermediate_values[epoch]:.4f}"
    else:
        result = state.name.lower()
    print(f"trial {trial.number}: {result}; {_params(trial.params)}", flush=True)


def run(args: argparse.Namespace) -> optuna.Study:
    """Create or continue the study, run the trials it still lacks, print the best one."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this script prints one line per trial
    study = optuna.create_study(
        study_name=args.study_name,
        storage=args.storage,
        load_if_exists=True,
        direction="minimize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=args.startup_trials, n_warmup_steps=0),
    )
    # Seeded, and differently when continuing a stored study: the same seed again would
    # draw the first trials' parameters again.
    study.sampler = optuna.samplers.TPESampler(seed=args.seed + len(study.trials))
    finished = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    done = len(study.get_trials(deepcopy=False, states=finished))
    todo = max(0, args.trials - done)
    if done:
        print(f"study {study.study_name!r}: {done} trials finished before; running {todo} more", flush=True)
    if todo:
        split = load_split(args)
        study.optimize(lambda trial: objective(trial, args, split), n_trials=todo, callbacks=[print_trial])
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        print("no trial finished: nothing to report", flush=True)
        return study
    best = study.best_trial
    print(f"best trial {best.number}: {MONITOR} {best.value:.4f}{_accuracy(best)}")
    for name, value in best.params.items():
        print(f"  {name}: {value}")
    return study


def build_tune_parser() -> argparse.ArgumentParser:
    """The options of tune.py."""
    parser = argparse.ArgumentParser(
        description="Tune the MNIST example's learning rate, batch size and width with Optuna.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data-dir",
        default=default_data_dir(),
        help="directory that holds MNIST/raw/ (default from $DLTRAIN_DATA_DIR, else ./data)",
    )
    data.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing")
    data.add_argument(
        "--train-samples", type=_positive_int, default=50_000, help="train on the first N training images"
    )
    data.add_argument(
        "--val-samples", type=_positive_int, default=10_000, help="validate on the last N training images"
    )
    search = parser.add_argument_group("search")
    search.add_argument(
        "--trials", type=_positive_int, default=20, help="finished trials the study should have"
    )
    search.add_argument("--epochs", type=_positive_int, default=3, help="epochs per trial")
    search.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        default="relu",
        help="relu: search the hidden width too; none: the tutorial's linear network",
    )
    search.add_argument(
        "--startup-trials",
        type=_positive_int,
        default=5,
        help="trials that finish before the pruner prunes any",
    )
    search.add_argument(
        "--seed", type=int, default=0, help="seeds the sampler, the weights and the shuffling"
    )
    search.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N, mps")
    study = parser.add_argument_group("study")
    study.add_argument(
        "--storage",
        default=None,
        help="where the study lives, e.g. sqlite:///tune.db (continue it by running again); default: memory",
    )
    study.add_argument("--study-name", default="mnist", help="the study's name in --storage")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options and tune; the exit status (2 for missing data, a bad device, ...)."""
    return run_main(run, build_tune_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
