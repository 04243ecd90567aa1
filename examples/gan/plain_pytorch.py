"""The DCGAN of pytorch/examples (reduced for MNIST) with its own hand-written loop: the baseline.

``train.py`` trains the same networks through dltrain; with the same options
both end with the same weights, bit for bit (a test checks it).

    python examples/gan/plain_pytorch.py --data-dir ../shared/data --steps 300
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from gan_cli import build_parser, run_main
from gan_data import make_loader, mnist_images
from gan_model import DCGAN, NZ, make_optimizers
from torch import nn


def train(args: argparse.Namespace) -> dict[str, Any]:
    """The DCGAN loop: per batch, update D on real and fake images, then G; ``args.steps`` steps."""
    torch.manual_seed(args.seed)
    model = DCGAN(args.width)
    optimizers = make_optimizers(model, args.lr)
    opt_d, opt_g = optimizers["discriminator"], optimizers["generator"]
    netG, netD = model.generator, model.discriminator
    loader = make_loader(mnist_images(args.data_dir, args.subset), args.batch_size, args.seed)
    criterion = nn.BCELoss()
    step, sums = 0, {"loss_d": 0.0, "loss_g": 0.0}
    while step < args.steps:
        for (real,) in loader:
            n = real.size(0)
            ones, zeros = torch.ones(n), torch.zeros(n)
            # (1) Update D: maximize log(D(x)) + log(1 - D(G(z)))
            netD.zero_grad()
            err_real = criterion(netD(real), ones)
            err_real.backward()
            fake = netG(torch.randn(n, NZ, 1, 1))
            err_fake = criterion(netD(fake.detach()), zeros)
            err_fake.backward()
            opt_d.step()
            # (2) Update G: maximize log(D(G(z)))
            netG.zero_grad()
            err_g = criterion(netD(fake), ones)
            err_g.backward()
            opt_g.step()
            step += 1
            sums["loss_d"] += float((err_real + err_fake).detach())
            sums["loss_g"] += float(err_g.detach())
            if step % args.log_every == 0:
                print(f"step {step}: loss_d {sums['loss_d'] / args.log_every:.4f}  "
                      f"loss_g {sums['loss_g'] / args.log_every:.4f}", flush=True)  # fmt: skip
                sums = {"loss_d": 0.0, "loss_g": 0.0}
            if step == args.steps:
                break
    result = {"model": model.state_dict(), "optimizers": {k: o.state_dict() for k, o in optimizers.items()}}
    if args.save:
        torch.save(result, args.save)
    return result


if __name__ == "__main__":
    sys.exit(run_main(train, build_parser("The reduced MNIST DCGAN with a hand-written loop.")))
