"""Data-parallel training on ``torch.distributed``: the process group torchrun describes, DDP or FSDP2.

``torchrun --nproc_per_node N -m models.cli train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; ``setup`` joins them into one group (``gloo`` on CPUs,
``nccl`` on CUDA devices, each rank on its own GPU). Without those variables it is one process and nothing is
initialised, so the same training code runs in both.

``wrap`` applies the parallelism as PyTorch documents it:

- ``"ddp"``: ``DistributedDataParallel``; gradients are averaged over the ranks in the backward pass.
- ``"fsdp"``: FSDP2's ``fully_shard`` on every block, then on the root (the embedding, final norm and head), as
  torchtitan does; parameters, gradients and the optimizer state are sharded over the ranks, and with
  ``precision="bf16"`` a ``MixedPrecisionPolicy`` computes in bf16 with fp32 gradient reduction. The optimizer
  must be built after ``wrap`` (it holds the sharded parameters).

Both average gradients over the ranks; the trainer scales each rank's loss so that the average is the gradient
of the global batch's loss (see ``models.train``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from models.config import ConfigError

PARALLEL = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # this process initialised the group (and ends it in ``teardown``)

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, logs and writes single files."""
        return self.rank == 0


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: str | torch.device = "cpu") -> World:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    ``device``: ``"cpu"`` (gloo) or ``"cuda"`` (nccl; rank r on ``cuda:LOCAL_RANK``). Already initialised
    groups (a test's, or the caller's) are used as they are."""
    device = torch.device(device)
    if not launched() and not dist.is_initialized():
        return World(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device, started)


def teardown(world: World) -> None:
    """End the group if ``setup`` started it."""
    if world.started_here and dist.is_initialized():
        dist.destroy_process_group()


def check_parallel(parallel: str, world: World, context_parallel: int = 1) -> None:
    """Refuse a parallelism that this process's group cannot run (``ConfigError``, saying how to launch it)."""
    if parallel not in PARALLEL:
        raise ConfigError(f"parallel must be one of {PARALLEL}, got {parallel!r}")
    if parallel == "none" and world.size > 1 and context_parallel == 1:
        raise ConfigError(
            f"this process is one of {world.size} (started by torchrun): choose --parallel ddp or fsdp, or "
            f"--context-parallel {world.size}; got --parallel none"
        )
    if parallel != "none" and world.size == 1 and not dist.is_initialized():
        raise ConfigError(
            f"--parallel {parallel} trains over several processes, and this is one process: start them with "
            f"torchrun, e.g. torchrun --nproc_per_node 2 -m models.cli train --parallel {parallel} ... "
            f"(see docs/distributed.md); or train in this one process with --parallel none"
        )


def wrap(model: nn.Module, parallel: str, world: World, *, precision: str = "fp32") -> nn.Module:
    """``model`` made data-parallel over the group (``"none"``: as it is)."""
    if parallel == "none":
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {}
    if precision == "bf16":  # bf16 parameters in the forward and backward passes, gradients reduced in fp32
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model


def unwrapped(model: nn.Module) -> nn.Module:
    """The language model inside a DDP wrapper (FSDP2 shards the model in place: it is its own)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: nn.Module, parallel: str) -> dict[str, torch.Tensor] | None:
    """The whole model's weights as plain CPU tensors, on rank 0 (``None`` on the others). Under FSDP every rank
    must call it: the shards are gathered."""
    if parallel != "fsdp":
        return {k: v.detach().cpu() for k, v in unwrapped(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


def all_sums(values: list[float | int], world: World) -> list[float]:
    """Each of ``values`` summed over the ranks, in one collective (themselves in one process)."""
    if world.size == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum(value: float | int, world: World) -> float:
    """``value`` summed over the ranks (itself in one process)."""
    return all_sums([value], world)[0]


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
