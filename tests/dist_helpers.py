"""Running training in 2 processes (gloo, on the CPU) from a test: each rank joins a group through a file
store in a temporary folder (no port to race for) and calls ``models.training.loop.train`` as torchrun would have it
do; rank 0 saves what the test compares."""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, folder: str, model_config, train_config, data: bytes, extra) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    ended_well = False
    try:
        from models.training.loop import train

        result = train(model_config, train_config, data=data, progress=False, **extra)
        if rank == 0:
            summary = {
                "train_curve": result.train_curve,
                "val_curve": result.val_curve,
                "weights": result.model.state_dict(),
            }
            torch.save(summary, Path(folder) / "result.pt")
        ended_well = True
    finally:
        if ended_well:  # every rank done before any tears gloo down (a teardown under way aborted a rank once)
            dist.barrier()
        dist.destroy_process_group()


def train_on_ranks(
    tmp: Path, model_config, train_config, data: bytes, parallel: str, world: int = 2, name: str = "", **extra
) -> dict:
    """Train in ``world`` processes (``extra``: more arguments of ``train``, such as ``out`` or ``resume``);
    return rank 0's curves and final weights."""
    folder = tmp / f"run-{parallel}-{world}{name}"
    folder.mkdir()
    train_config = dataclasses.replace(train_config, sample_tokens=0, parallel=parallel)
    args = (world, str(folder), model_config, train_config, data, extra)
    mp.spawn(_worker, args=args, nprocs=world, join=True)
    return torch.load(folder / "result.pt", weights_only=False)
