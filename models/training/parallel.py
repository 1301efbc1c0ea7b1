"""How the processes of a run share it: the torchrun process group, data parallelism (DDP or FSDP2) and context
parallelism, and what every rank must agree on.

``torchrun --nproc_per_node N -m models.cli train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; ``setup`` joins them into one group (``gloo`` on CPUs,
``nccl`` on CUDA devices, each rank on its own GPU). Without those variables it is one process and nothing is
initialised, so the same training code runs in both.

``Layout.wrap`` applies the data parallelism as PyTorch documents it:

- ``"ddp"``: ``DistributedDataParallel``; gradients are averaged over the ranks in the backward pass.
- ``"fsdp"``: FSDP2's ``fully_shard`` on every block, then on the root (the embedding, final norm and head), as
  torchtitan does; parameters, gradients and the optimizer state are sharded over the ranks, and with
  ``precision="bf16"`` a ``MixedPrecisionPolicy`` computes in bf16 with fp32 gradient reduction. The optimizer
  must be built after ``wrap`` (it holds the sharded parameters).

With context parallelism over K ranks (``mixers.context_parallel``) every rank takes every row of a batch and its
K-th of each sequence's time, and the ranks' gradients are summed.

A step's global batch of ``batch_size`` rows is cut the same way for any number of ranks and micro-batches
(``Layout.micro_batches``), and the trainer scales each rank's loss so that the averaged (or summed) gradients
are those of the global batch's loss: the losses and the result do not depend on the number of ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mixers.context_parallel import ContextParallel, context_parallel, reduce_gradients
from models.config import ConfigError, ModelConfig, TrainConfig
from models.lm import LanguageModel


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


def teardown(world: World, *, failed: bool = False) -> None:
    """End the group if ``setup`` started it. After a run that ended well every rank first waits for the others:
    a rank that tears gloo down while another still has work in flight can abort the other process."""
    if world.started_here and dist.is_initialized():
        if not failed and world.size > 1:
            dist.barrier()
        dist.destroy_process_group()


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


def on_main(world: World, shared: bool, what: str, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 while the other ranks wait (every rank, when not ``shared``); returns its result there
    and ``None`` on the others. A failure on rank 0 is raised there, and on the others as a ``ConfigError`` (the
    wait is a collective that also tells every rank whether rank 0 failed, so that none hangs)."""
    if not shared or world.size == 1:
        return fn()
    result, failed = None, False
    if world.main:
        try:
            result = fn()
        except Exception:
            failed = True
            all_sum(1, world)
            raise
    if all_sum(int(failed), world):
        raise ConfigError(f"rank 0 could not {what}: see its error")
    return result


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


@dataclass(frozen=True)
class Layout:
    """How this rank takes part in a run: its ``world``, the data parallelism ``parallel`` and the context
    parallelism ``cp`` (``None`` without it). ``Layout.of`` checks them against the run."""

    world: World
    parallel: str = "none"
    cp: ContextParallel | None = None

    @classmethod
    def of(cls, world: World, tc: TrainConfig) -> Layout:
        """The layout of run ``tc`` (its ``parallel`` and ``context_parallel``) on ``world``; ``ConfigError`` for
        one this process group cannot run (saying how to launch it) or one the run does not fit (its batch, its
        sequence length, its documents)."""
        check_parallel(tc.parallel, world, tc.context_parallel)
        layout = cls(world, tc.parallel, _context_parallel(world, tc))
        share = layout.data_ranks * tc.accumulate
        if tc.batch_size % share:
            raise ConfigError(
                f"batch_size={tc.batch_size} must be a multiple of ranks x accumulate = {world.size} x "
                f"{tc.accumulate} = {share}: every rank computes the same number of rows in every micro-batch"
            )
        return layout

    @property
    def data_ranks(self) -> int:
        """Over how many ranks the rows of a batch are split (1 under context parallelism: each takes every row)."""
        return 1 if self.cp is not None else self.world.size

    def wrap(self, model: nn.Module, *, precision: str = "fp32") -> nn.Module:
        """``model`` made data-parallel over the group (``"none"``: as it is)."""
        if self.parallel == "none":
            return model
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.world.device.index] if self.world.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        options = {}
        if precision == "bf16":  # bf16 parameters in the forward and backward passes, gradients reduced in fp32
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, **options)
        fully_shard(model, **options)
        return model

    def micro_batches(self, picked: torch.Tensor, accumulate: int) -> list[torch.Tensor]:
        """This rank's rows of each of the ``accumulate`` micro-batches of a step's global batch ``picked``:
        micro-batch m is ``picked``'s m-th slice, of which data rank r takes the r-th part. The global batch, and
        so the loss and the gradient, are the same for any number of ranks and micro-batches."""
        per_micro = len(picked) // accumulate
        per_rank = per_micro // self.data_ranks
        rank = self.world.rank if self.cp is None else 0
        return [picked[m * per_micro + rank * per_rank :][:per_rank] for m in range(accumulate)]

    def shard(self, batch: tuple) -> tuple:
        """This rank's part of a batch ``(x, y, cu_seqlens, real tokens)``: its time ``[r L, (r+1) L)`` under
        context parallelism, else all of it."""
        if self.cp is None:
            return batch
        x, y, *rest = batch
        return (self.cp.shard(x), self.cp.shard(y), *rest)

    def context(self, model: nn.Module) -> contextlib.AbstractContextManager:
        """Context parallelism over the ranks while ``model`` runs (nothing without it)."""
        return context_parallel(self.cp.group, model=model) if self.cp is not None else contextlib.nullcontext()

    def autocast(self, precision: str) -> contextlib.AbstractContextManager:
        """bf16 autocast for ``precision="bf16"`` (under FSDP, its mixed-precision policy does it instead)."""
        if precision == "bf16" and self.parallel != "fsdp":
            return torch.autocast(self.world.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def sync_gradients(self, model: nn.Module, *, last: bool) -> Iterator[None]:
        """Reduce data-parallel gradients over the ranks only in the last micro-batch's backward pass (the others
        accumulate)."""
        if last or self.parallel == "none":
            yield
        elif self.parallel == "ddp":
            with model.no_sync():
                yield
        else:  # FSDP2
            model.set_requires_gradient_sync(False, recurse=True)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True, recurse=True)

    def reduce_context_gradients(self, model: nn.Module) -> None:
        """Sum the context-parallel ranks' gradients (each holds its tokens' share); nothing without it."""
        if self.cp is not None:
            reduce_gradients(model, self.cp.group)

    def whole_model(self, model: nn.Module, config: ModelConfig) -> LanguageModel | None:
        """The whole language model on rank 0 (``None`` on the others): the model itself, or under FSDP a copy
        gathered from the shards (every rank must call this then)."""
        if self.parallel != "fsdp":
            return unwrapped(model) if self.world.main else None
        state = full_state_dict(model, "fsdp")
        if not self.world.main:
            return None
        whole = LanguageModel(config)
        whole.load_state_dict(state)
        return whole

    def note(self, tc: TrainConfig) -> str:
        """The log line that says over how many ranks, and how, a run trains."""
        world = self.world
        backend = dist.get_backend() if dist.is_initialized() else "?"
        how = f"context parallelism over {world.size} ranks" if self.cp is not None else self.parallel.upper()
        rows = tc.batch_size // (self.data_ranks * tc.accumulate)
        split = "every rank" if self.cp is not None else f"{world.size} ranks x"
        return (
            f"parallel: {how} on {world.size} ranks ({backend}, {world.device.type}); each step's {tc.batch_size} "
            f"rows: {split} {rows} rows x {tc.accumulate} micro-batch(es)"
        )


def check_parallel(parallel: str, world: World, context_parallel: int = 1) -> None:
    """Refuse a parallelism that this process's group cannot run (``ConfigError``, saying how to launch it)."""
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


def _context_parallel(world: World, tc: TrainConfig) -> ContextParallel | None:
    """The context parallelism of run ``tc`` over ``tc.context_parallel`` ranks (``None`` for 1), checked against
    the run."""
    k, parallel = tc.context_parallel, tc.parallel
    if k == 1:
        return None
    problems = [
        f"it must equal the number of ranks ({world.size}): data and context parallelism together are not supported yet"
        if k != world.size
        else "",
        f"it needs parallel='none', got {parallel!r}" if parallel != "none" else "",
        f"seq_len={tc.seq_len} must be a multiple of it" if tc.seq_len % k else "",
        f"it needs documents='none' (no packed sequences), got {tc.documents!r}" if tc.documents != "none" else "",
    ]
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError(f"context_parallel={k}: " + "; ".join(problems))
    return ContextParallel.of()
