"""Running training in 2 processes (gloo, on the CPU) from a test: each rank joins a group through a file
store in a temporary folder (no port to race for) and calls ``models.train.train`` as torchrun would have it
do; rank 0 saves what the test compares."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, folder: str, model_config, train_config, data: bytes, parallel: str, extra) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        from models.train import train

        result = train(model_config, train_config, data=data, progress=False, parallel=parallel, **extra)
        if rank == 0:
            summary = {
                "train_curve": result.train_curve,
                "val_curve": result.val_curve,
                "weights": result.model.state_dict(),
            }
            torch.save(summary, Path(folder) / "result.pt")
    finally:
        dist.destroy_process_group()


def train_on_ranks(
    tmp: Path, model_config, train_config, data: bytes, parallel: str, world: int = 2, name: str = "", **extra
) -> dict:
    """Train in ``world`` processes (``extra``: more arguments of ``train``, such as ``out`` or ``resume``);
    return rank 0's curves and final weights."""
    folder = tmp / f"run-{parallel}-{world}{name}"
    folder.mkdir()
    train_config = dataclasses.replace(train_config, sample_tokens=0)
    args = (world, str(folder), model_config, train_config, data, parallel, extra)
    mp.spawn(_worker, args=args, nprocs=world, join=True)
    return torch.load(folder / "result.pt", weights_only=False)
