"""The DCGAN of pytorch/examples (reduced for MNIST), trained through dltrain with manual optimization.

Two networks, two optimizers: each batch updates the discriminator on real
and generated images, then the generator. The step drives those updates
itself (``manual_optimization=True``) through ``trainer.backward`` and
``trainer.optimizer_step``, so the Trainer still applies precision scaling,
accumulation, clipping and the non-finite policy, and checkpoints both
networks and both optimizers: a run stopped at any moment resumes bit for
bit. ``plain_pytorch.py`` is the same loop by hand; both end with the same
weights.

    python examples/gan/train.py --data-dir ../shared/data --steps 300
    python examples/gan/train.py --checkpoint-dir ckpt --checkpoint-every 50   # Ctrl-C, then:
    python examples/gan/train.py --checkpoint-dir ckpt --checkpoint-every 50 --resume last
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

import torch
from gan_cli import build_parser, run_main
from gan_data import make_loader, mnist_images
from gan_model import DCGAN, NZ, make_optimizers
from torch import nn

import dltrain


class DCGANStep:
    """The DCGAN's training step: update D on real and fake images, then G.

    A plugin implementing ``training_step``; with ``manual_optimization=True``
    it calls ``trainer.backward(loss, name)`` instead of ``loss.backward()`` and
    ``trainer.optimizer_step(name)`` instead of ``optimizer.step()``, and
    returns its losses, which become the metrics ``train_loss_d`` and ``train_loss_g``.
    """

    def __init__(self) -> None:
        self.criterion = nn.BCELoss()

    @dltrain.hookimpl
    def training_step(self, trainer: dltrain.Trainer, model: DCGAN, batch: Any) -> dict[str, torch.Tensor]:
        (real,) = batch
        n = real.size(0)
        netG, netD = model.generator, model.discriminator
        ones, zeros = torch.ones(n, device=real.device), torch.zeros(n, device=real.device)
        # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
        netD.zero_grad()
        err_real = self.criterion(netD(real), ones)
        trainer.backward(err_real, "discriminator")
        fake = netG(torch.randn(n, NZ, 1, 1, device=real.device))
        err_fake = self.criterion(netD(fake.detach()), zeros)
        trainer.backward(err_fake, "discriminator")
        trainer.optimizer_step("discriminator")
        # (2) Update G: maximize log(D(G(z)))
        netG.zero_grad()
        err_g = self.criterion(netD(fake), ones)
        trainer.backward(err_g, "generator")
        trainer.optimizer_step("generator")
        return {"loss_d": err_real + err_fake, "loss_g": err_g}


class PrintLosses:
    """Prints the interval's mean losses every ``log_every_n_steps`` steps (rank 0)."""

    @dltrain.hookimpl
    def on_step_metrics(self, state: dltrain.State, metrics: Mapping[str, float]) -> None:
        if state.is_global_zero:
            print(f"step {state.global_step}: loss_d {metrics['train_loss_d']:.4f}  "
                  f"loss_g {metrics['train_loss_g']:.4f}", flush=True)  # fmt: skip


def add_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of this script beyond those it shares with the plain loop."""
    parser.add_argument(
        "--checkpoint-dir", default=None, help="save checkpoints here (and on Ctrl-C or SIGTERM)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=None, help="save every N steps (with --checkpoint-dir)"
    )
    parser.add_argument("--resume", default=None, help="'last', 'best', 'auto' or a checkpoint path")
    return parser


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train the DCGAN through dltrain for ``args.steps`` steps; its state (networks, optimizers)."""
    torch.manual_seed(args.seed)
    model = DCGAN(args.width)
    optimizers = make_optimizers(model, args.lr)
    loader = make_loader(mnist_images(args.data_dir, args.subset), args.batch_size, args.seed)
    checkpoint = None
    if getattr(args, "checkpoint_dir", None):
        checkpoint = {
            "dir": args.checkpoint_dir,
            "every_n_steps": args.checkpoint_every,
            "every_n_epochs": None,
        }
    trainer = dltrain.Trainer(
        max_steps=args.steps,
        max_epochs=None,
        manual_optimization=True,
        log_every_n_steps=args.log_every,
        device="cpu",
        progress="off",
        run_dir=None,
        checkpoint=checkpoint,
        plugins=[DCGANStep(), PrintLosses()],
    )
    trainer.fit(model, loader, optimizer=optimizers, resume=getattr(args, "resume", None))
    result = {"model": model.state_dict(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}
    if args.save:
        torch.save(result, args.save)
    return result


if __name__ == "__main__":
    sys.exit(run_main(train, add_options(build_parser("The reduced MNIST DCGAN, trained through dltrain."))))
