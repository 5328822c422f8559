"""Run by tests/test_integrations.py as ``python lightning_ddp_job.py OUT_FOLDER``: the Lightning
recipe on 2 CPU processes (strategy "ddp", gloo) with accumulate_grad_batches=2, first topk at
ratio 1.0, then tinypropv2; each rank writes its weights, trained counts and tinyprop's warnings
as JSON (Lightning starts rank 1 by running this script again).

The ranks meet through a file in OUT_FOLDER (:class:`FileStoreDDP`), not through the TCP port
Lightning picks as free (MASTER_PORT) before rank 0 binds it: a job running at the same time
could take that port, or join the group."""

import datetime
import faulthandler
import json
import os
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.strategies import DDPStrategy
from torch import nn

import tinyprop
from tinyprop.integrations.lightning import TinyPropCallback

LOSS = nn.CrossEntropyLoss(reduction="none")
SAMPLES, BATCH, ACCUMULATE = 96, 4, 2
# seconds rank 0 waits for rank 1 in the rendezvous (and either waits in a collective): rank 0
# enters it as soon as it has started rank 1, which first imports torch, Lightning and
# tinyprop: 37-90 s on 2 cores under load 9-10 (8 s of CPU), leaving 120 s a margin of 30 s
# (past it rank 0 fails with "Wait timeout"). Below the test's 600 s, so that a hang shows as
# a rank's own timeout in its log
TIMEOUT = 240


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).double()


def data():
    x = torch.randn(SAMPLES, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x, x[:, :5].argmax(1)


class FileStoreDDP(DDPStrategy):
    """Lightning's DDP strategy, its process group made through a FileStore in the output
    folder (Lightning then finds it made and uses it)."""

    def setup_distributed(self) -> None:
        self.set_world_ranks()
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo",
                init_method="file://" + os.path.join(os.path.abspath(sys.argv[1]), "store"),
                rank=self.global_rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=TIMEOUT),
            )
        super().setup_distributed()


class Classifier(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model
        self.trained = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return tinyprop.loss(self.model, LOSS(self.model(x), y))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.trained.append(tinyprop.step_stats(self.model).trained)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def fit(config) -> dict:
    module = Classifier(tinyprop.apply(mlp(), config))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data()), batch_size=BATCH)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy=FileStoreDDP(), logger=False,
        accumulate_grad_batches=ACCUMULATE, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[TinyPropCallback()],
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader)
    return {
        "rank": trainer.global_rank,
        "steps": trainer.global_step,
        "trained": module.trained,
        "weights": [p.detach().flatten().tolist() for p in module.model.parameters()],
        "warnings": sorted({str(w.message) for w in caught if "tinyprop" in str(w.message)}),
    }


def log_to_file(folder: str) -> None:
    """This rank's stderr to ``rank{LOCAL_RANK}.log`` in the output folder (Lightning starts
    rank 1 with LOCAL_RANK set and rank 0's stderr, so a crash of rank 1 would otherwise show
    only as rank 0 killed by Lightning), with Python's stacks on a fatal signal."""
    rank = os.environ.get("LOCAL_RANK", "0")
    log = os.open(os.path.join(folder, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT, 0o600)
    os.dup2(log, sys.stderr.fileno())
    faulthandler.enable()


if __name__ == "__main__":
    log_to_file(sys.argv[1])
    runs = {
        "topk": fit(tinyprop.TinyPropConfig(policy="topk", ratio=1.0)),
        "tinypropv2": fit(tinyprop.TinyPropConfig(policy="tinypropv2", skip_threshold=0.95)),
    }
    rank = runs["topk"]["rank"]
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(runs))
    # Lightning leaves the gloo group to the interpreter's exit; gloo's worker threads outlive
    # even destroy_process_group, and one freeing a collective's tensor while the interpreter
    # finalizes aborts the process (see test_distributed.end_without_finalizing)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
