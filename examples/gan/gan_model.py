"""The DCGAN of pytorch/examples, reduced for MNIST: 28x28 grey images, small widths.

The generator maps a noise vector to an image through transposed
convolutions with batch norm; the discriminator maps an image to the
probability that it is real. Both are initialised as the DCGAN paper does
(``weights_init``). ``DCGAN`` holds the two, so one ``nn.Module`` carries
both networks' weights (and batch-norm statistics) into a checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

#: Size of the generator's noise vector.
NZ = 32


def weights_init(module: nn.Module) -> None:
    """The DCGAN initialisation: convolutions N(0, 0.02), batch norm weights N(1, 0.02), biases 0."""
    name = type(module).__name__
    if "Conv" in name:
        nn.init.normal_(module.weight, 0.0, 0.02)  # type: ignore[arg-type]
    elif "BatchNorm" in name:
        nn.init.normal_(module.weight, 1.0, 0.02)  # type: ignore[arg-type]
        nn.init.zeros_(module.bias)  # type: ignore[arg-type]


class Generator(nn.Module):
    """Noise ``(N, NZ, 1, 1)`` to images ``(N, 1, 28, 28)`` in [-1, 1]."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(NZ, width * 4, 7, 1, 0, bias=False),  # 7x7
            nn.BatchNorm2d(width * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(width * 4, width * 2, 4, 2, 1, bias=False),  # 14x14
            nn.BatchNorm2d(width * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(width * 2, 1, 4, 2, 1, bias=False),  # 28x28
            nn.Tanh(),
        )

    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        return self.main(noise)  # type: ignore[no-any-return]


class Discriminator(nn.Module):
    """Images ``(N, 1, 28, 28)`` to the probability that each is real, ``(N,)``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(1, width, 4, 2, 1, bias=False),  # 14x14
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),  # 7x7
            nn.BatchNorm2d(width * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width * 2, 1, 7, 1, 0, bias=False),  # 1x1
            nn.Sigmoid(),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images).view(-1)  # type: ignore[no-any-return]


class DCGAN(nn.Module):
    """Both networks in one module: ``generator`` and ``discriminator``."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.generator = Generator(width)
        self.discriminator = Discriminator(width)
        self.apply(weights_init)


def make_optimizers(model: DCGAN, lr: float = 2e-4) -> dict[str, torch.optim.Optimizer]:
    """The DCGAN's optimizers: Adam with beta1 0.5 for each network."""
    return {
        "discriminator": torch.optim.Adam(model.discriminator.parameters(), lr=lr, betas=(0.5, 0.999)),
        "generator": torch.optim.Adam(model.generator.parameters(), lr=lr, betas=(0.5, 0.999)),
    }
