"""Data-parallel (DDP, FSDP2) and context-parallel training on 1 vs 2 processes (gloo, CPU) (issue 14).

Not a test: it prints tables and writes JSON (default ``benchmarks/results/distributed.json``).

1. Data parallelism: a RetNet of ``--d-model`` x ``--layers`` (retention with ``conv_size=4``, float32, AdamW)
   trains ``--steps`` steps of a global batch of ``--batch`` x ``--seq-len`` tokens (forward in chunkwise mode,
   backward, optimizer step) in 1 process, and in 2 processes with DDP and with FSDP2 (each rank computing half
   of the batch). Per rank: tokens/s of the whole run (global tokens / wall time of the timed steps, after 2
   warm-up steps), the bytes of the parameters and of the optimizer state the rank holds (FSDP2: its shards),
   and the growth of its peak resident memory (``ru_maxrss``) from just before training to the end.
2. Context parallelism: the same kind of model on one sequence of ``--cp-len`` tokens (forward in chunkwise
   mode with chunks of 256, backward), in 1 process and split over 2 ranks (``mixers.context_parallel``):
   seconds per step and peak resident memory growth per rank.

Every configuration runs in fresh processes (``torch.multiprocessing.spawn``) with one thread per rank.
What CPU figures can and cannot say about GPUs is in ``docs/benchmarks.md``.
Usage: ``python benchmarks/distributed.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def build(args: argparse.Namespace, vocab: int = 256):
    from models import build_model

    torch.manual_seed(0)
    layers = [{"mixer": "retention", "conv_size": 4, "num_heads": max(1, args.d_model // 64)}]
    return build_model(
        dict(vocab_size=vocab, d_model=args.d_model, n_layers=args.layers, layers=layers, ffn_dim=2 * args.d_model)
    )


def data_parallel_worker(rank: int, world: int, folder: str, parallel: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    from models.training.parallel import Layout, World

    here = World(rank, world) if world > 1 else World()
    model = Layout(here, parallel).wrap(build(args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    rows = args.batch // world
    tokens = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=gen)[rank * rows : (rank + 1) * rows]
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits, _ = model(x, mode="chunkwise", chunk_size=128)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        optimizer.step()

    before = peak_rss_mib()
    for _ in range(2):
        step()
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - t0
    optim_tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    result = {
        "rank": rank,
        "tokens_per_s": args.batch * args.seq_len * args.steps / seconds,
        "param_mib": local_bytes(model.parameters()) / 2**20,
        "optimizer_mib": local_bytes(optim_tensors) / 2**20,
        "peak_rss_growth_mib": peak_rss_mib() - before,
    }
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def context_parallel_worker(rank: int, world: int, folder: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    from contextlib import nullcontext

    from mixers.context_parallel import ContextParallel, context_parallel, reduce_gradients

    model = build(args)
    tokens = torch.randint(0, 256, (1, args.cp_len + 1), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    if world > 1:
        cp = ContextParallel.of()
        x, y = cp.shard(x), cp.shard(y)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with context_parallel(model=model) if world > 1 else nullcontext():
            logits, _ = model(x, mode="chunkwise", chunk_size=256)
            F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").backward()
        if world > 1:
            reduce_gradients(model)

    before = peak_rss_mib()
    step()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    result = {"rank": rank, "seconds_per_step": seconds, "peak_rss_growth_mib": peak_rss_mib() - before}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def spawn(fn, world: int, *extra) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(fn, args=(world, folder, *extra), nprocs=world, join=True)
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    from benchmarks.common import run_info, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cp-len", type=int, default=16384)
    parser.add_argument("--quick", action="store_true", help="a smoke run: small sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distributed.json")
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.layers, args.batch, args.seq_len, args.steps, args.cp_len = 64, 2, 4, 64, 2, 1024
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = {**run_info(1), "args": vars(args) | {"out": str(args.out)}, "data_parallel": {}, "context_parallel": {}}
    print(f"data parallel: d_model {args.d_model}, {args.layers} layers, batch {args.batch} x {args.seq_len}")
    print(f"{'setup':<12} {'rank':>4} {'tokens/s':>10} {'params MiB':>11} {'optim MiB':>10} {'peak RSS +MiB':>14}")
    for name, world, parallel in [("1 process", 1, "none"), ("2 ranks DDP", 2, "ddp"), ("2 ranks FSDP", 2, "fsdp")]:
        ranks = result["data_parallel"][name] = spawn(data_parallel_worker, world, parallel, args)
        for r in ranks:
            print(
                f"{name:<12} {r['rank']:>4} {r['tokens_per_s']:>10,.0f} {r['param_mib']:>11.2f} "
                f"{r['optimizer_mib']:>10.2f} {r['peak_rss_growth_mib']:>14.1f}"
            )
        write_json(args.out, result)
    print(f"\ncontext parallel: one sequence of {args.cp_len:,} tokens")
    print(f"{'setup':<12} {'rank':>4} {'s/step':>8} {'peak RSS +MiB':>14}")
    for name, world in [("1 process", 1), ("2 ranks CP", 2)]:
        ranks = result["context_parallel"][name] = spawn(context_parallel_worker, world, args)
        for r in ranks:
            print(f"{name:<12} {r['rank']:>4} {r['seconds_per_step']:>8.2f} {r['peak_rss_growth_mib']:>14.1f}")
        write_json(args.out, result)


if __name__ == "__main__":
    main()
