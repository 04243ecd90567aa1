"""A fit by 2 processes under torchrun with the W&B plugin on every rank (``WANDB_MODE=offline``).

Started by ``test_wandb.py``::

    WANDB_MODE=offline torchrun --standalone --nproc-per-node=2 _dist_wandb.py --out DIR

Each rank writes ``DIR/rank<r>.json`` with the W&B run id its plugin used (None: no run).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from dltrain_wandb import WandbPlugin

import dltrain
from dltrain.testing import tiny_loader, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = Path(parser.parse_args().out)
    plugin = WandbPlugin()  # turned on by $WANDB_MODE, as an installed one would be
    trainer = dltrain.Trainer(max_epochs=2, device="cpu", progress="off", run_dir=None, plugins=[plugin])
    model = tiny_model()
    trainer.fit(
        model,
        tiny_loader(samples=64, batch_size=8),
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        val_data=tiny_loader(samples=32, seed=1),
    )
    rank = int(os.environ["RANK"])
    (out / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "run_id": plugin.run_id}))


if __name__ == "__main__":
    main()
