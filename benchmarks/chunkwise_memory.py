"""Memory of chunkwise retention, and of streaming with gradients on (CPU).

Not a test: it prints tables and writes JSON (default ``benchmarks/results/chunkwise_memory.json``).

1. Forward without gradients, chunkwise (chunk 64), the paper's head dims (Dk=256, Dv=512), B=1, H=1,
   float32, T = 1024 ... 16384: the torch backend's bounded path (``GROUP`` chunks at a time, the running
   state kept) vs all chunks at once (the path it took before, which keeps every chunk's state; reproduced
   by raising ``GROUP`` above the number of chunks).
2. Forward+backward, same shapes: the default (autograd keeps every chunk's incoming state) vs
   ``checkpoint_states()`` (one state every ~sqrt(N) chunks, the others recomputed in the backward).
3. Streaming with gradients on: a ``"retention"`` mixer (d_model 256, 2 heads: Dk=128, Dv=256) fed n calls of
   1 token (recurrent mode) or 64 tokens (chunkwise mode), the state handed over as it is, ``detach()``-ed
   after every call, or everything under ``torch.no_grad()``: tensor memory still held after the n calls
   (the last output and state kept), and the time of a backward from the last call's output.
4. Training piece by piece, same mixer and pieces: a backward after every call, the state handed over as it
   is (which needs ``retain_graph=True``; without it the second backward raises) or detached: memory held,
   the time of the last backward, and of all n calls.

Memory is tensor storage as torch's CPU allocator reports it to the profiler (``profile_memory=True``): the
highest level of allocated-minus-freed bytes during a run above its level at the start ("peak"), and the level
at its end ("held"). It counts the output and, in 2, the gradients; not the inputs, made before the run.
Times are CPU time of this process, on one thread by default, the best of ``--repeats`` runs after a warm-up,
the compared functions interleaved: on a shared machine wall time also counts the waits for a core (wall
times are recorded too). Ratios compare runs measured side by side.
Usage: ``python benchmarks/chunkwise_memory.py [--quick] [--threads 1] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import mixers  # noqa: E402
from benchmarks.common import run_info, write_json  # noqa: E402
from mixers import functional  # noqa: E402
from mixers.backends import torch_retention  # noqa: E402

MiB = 2**20
SHAPE = dict(B=1, H=1, Dk=256, Dv=512)  # the paper's head dims (RetNet: 256 for q/k, 512 for v per head)
CHUNK = 64
GAMMA = [1 - 2**-5]


# -- measuring ---------------------------------------------------------------------------------------------
def memory(fn: Callable[[], object]) -> tuple[int, int]:
    """``(peak, held)`` bytes of tensor storage allocated by ``fn`` (see the module docstring)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()
        peak = max(peak, level)
    return peak, level


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Best ``(CPU, wall)`` seconds of each function over ``repeats`` rounds, the functions interleaved in
    every round. The CPU time of this process is what the ratios use: on a shared machine the wall time
    also counts the waits for a core."""
    for fn in fns.values():
        fn()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append((time.process_time() - c0, time.perf_counter() - w0))
    return {name: (min(c for c, _ in ts), min(w for _, w in ts)) for name, ts in times.items()}


def all_chunks_at_once(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with the backend computing every chunk of a no-gradient call at once, as it did before."""

    def run() -> object:
        kept = torch_retention.GROUP
        torch_retention.GROUP = 1 << 40
        try:
            return fn()
        finally:
            torch_retention.GROUP = kept

    return run


def op_inputs(T: int, requires_grad: bool = False):
    B, H, Dk, Dv = SHAPE.values()
    gen = torch.Generator().manual_seed(T)
    q = torch.randn(B, T, H, Dk, generator=gen)
    k = torch.randn(B, T, H, Dk, generator=gen) * Dk**-0.5
    v = torch.randn(B, T, H, Dv, generator=gen)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


# -- 1 and 2: the op ---------------------------------------------------------------------------------------
def forward_without_gradients(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return functional.retention(q, k, v, GAMMA, mode="chunkwise", chunk_size=CHUNK)

    return run


def forward_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, checkpointed: bool) -> Callable[[], None]:
    def run() -> None:
        with torch_retention.checkpoint_states() if checkpointed else contextlib.nullcontext():
            o, _ = functional.retention(q, k, v, GAMMA, mode="chunkwise", chunk_size=CHUNK)
        o.sum().backward()
        q.grad = k.grad = v.grad = None

    return run


def measure(row: dict, runs: dict[str, Callable[[], object]], repeats: int) -> dict:
    """Add each run's peak memory (MiB) and best CPU and wall times (ms) to ``row``."""
    times = best_times(runs, repeats)
    for name, fn in runs.items():
        peak, _ = memory(fn)
        row[f"{name}_peak_MiB"] = peak / MiB
        row[f"{name}_ms"], row[f"{name}_wall_ms"] = (x * 1e3 for x in times[name])
    return row


def forward_rows(lengths: list[int], repeats: int) -> list[dict]:
    rows = []
    for T in lengths:
        q, k, v = op_inputs(T)
        bounded = forward_without_gradients(q, k, v)
        runs = {"bounded": bounded, "all_at_once": all_chunks_at_once(bounded)}
        row = measure({"T": T, "output_MiB": q.shape[0] * T * q.shape[2] * v.shape[-1] * 4 / MiB}, runs, repeats)
        row["time_ratio"] = row["bounded_ms"] / row["all_at_once_ms"]
        rows.append(row)
        print(
            f"{T:>6} | out {row['output_MiB']:6.1f} MiB | peak: bounded {row['bounded_peak_MiB']:7.1f}, all at once "
            f"{row['all_at_once_peak_MiB']:7.1f} MiB | ms: bounded {row['bounded_ms']:7.1f}, all at once "
            f"{row['all_at_once_ms']:7.1f} ({row['time_ratio']:.2f}x)",
            flush=True,
        )
    return rows


def backward_rows(lengths: list[int], repeats: int) -> list[dict]:
    rows = []
    for T in lengths:
        q, k, v = op_inputs(T, requires_grad=True)
        runs = {"default": forward_backward(q, k, v, False), "checkpointed": forward_backward(q, k, v, True)}
        N = T // CHUNK
        row = {"T": T, "chunks": N, "kept_states_checkpointed": math.ceil(N / (math.isqrt(N - 1) + 1))}
        measure(row, runs, repeats)
        row["time_ratio"] = row["checkpointed_ms"] / row["default_ms"]
        rows.append(row)
        print(
            f"{T:>6} | peak: default {row['default_peak_MiB']:7.1f}, checkpointed {row['checkpointed_peak_MiB']:7.1f} "
            f"MiB | ms: default {row['default_ms']:8.1f}, checkpointed {row['checkpointed_ms']:8.1f} "
            f"({row['time_ratio']:.2f}x)",
            flush=True,
        )
    return rows


# -- 3: streaming with gradients ---------------------------------------------------------------------------
def stream_mixer():
    torch.manual_seed(0)
    return mixers.build("retention", 256, num_heads=2)


PIECES = [(1, "recurrent"), (64, "chunkwise")]  # tokens per call, and the mode they are computed in


def stream(mixer, x: torch.Tensor, calls: int, P: int, mode: str, how: str, kept: list) -> Callable[[], None]:
    """``calls`` calls of ``P`` tokens; ``how``: the state handed over as it is ("attached"), "detached" after
    every call, or everything under "no_grad". Keeps the last output and state in ``kept``."""

    def run() -> None:
        state = None
        with torch.set_grad_enabled(how != "no_grad"):
            for i in range(calls):
                y, state = mixer(x[:, i * P : i * P + P], state, mode=mode)
                if how == "detached":
                    state = state.detach()
        kept[:] = [y, state]  # the last output, and the state the stream would go on from

    return run


def train(mixer, x: torch.Tensor, calls: int, P: int, mode: str, how: str, kept: list) -> Callable[[], None]:
    """``calls`` calls of ``P`` tokens, each followed by the backward of its loss; the state handed over as it
    is (``how`` "retain_graph": without it the second backward fails) or "detached". Keeps the last state
    and the CPU time of the last backward in ``kept``."""

    def run() -> None:
        state = None
        for i in range(calls):
            y, state = mixer(x[:, i * P : i * P + P], state, mode=mode)
            t0 = time.process_time()
            y.pow(2).mean().backward(retain_graph=how == "retain_graph")
            last = time.process_time() - t0
            if how == "detached":
                state = state.detach()
        kept[:] = [state, last]
        mixer.zero_grad(set_to_none=True)

    return run


def streaming_rows(calls: list[int]) -> list[dict]:
    """Inference with gradients left on: n calls of P tokens, each output dropped but the last."""
    mixer = stream_mixer()
    rows = []
    for (P, mode), n in ((piece, n) for piece in PIECES for n in calls):
        x = torch.randn(1, n * P, 256)
        row: dict = {"tokens_per_call": P, "mode": mode, "calls": n}
        for how in ("attached", "detached", "no_grad"):
            kept: list = []
            run = stream(mixer, x, n, P, mode, how, kept)
            t0 = time.process_time()
            run()
            row[f"{how}_ms_per_call"] = (time.process_time() - t0) * 1e3 / n
            if how != "no_grad":
                t0 = time.process_time()
                kept[0].sum().backward()
                row[f"{how}_backward_ms"] = (time.process_time() - t0) * 1e3
                mixer.zero_grad(set_to_none=True)
            kept.clear()
            _, held = memory(run)
            row[f"{how}_held_MiB"] = held / MiB
            kept.clear()
        rows.append(row)
        print(
            f"{P:>3} tok x {n:>4} calls | held: attached {row['attached_held_MiB']:6.2f}, detached "
            f"{row['detached_held_MiB']:5.2f}, no_grad {row['no_grad_held_MiB']:5.2f} MiB | backward of the last "
            f"output: attached {row['attached_backward_ms']:6.1f} ms, detached {row['detached_backward_ms']:4.1f} ms",
            flush=True,
        )
    return rows


def tbptt_rows(calls: list[int]) -> tuple[list[dict], str]:
    """Training piece by piece: each call's loss backpropagated at once (see ``train``)."""
    mixer = stream_mixer()
    x = torch.randn(1, 2, 256)
    state = None
    try:
        for i in range(2):
            y, state = mixer(x[:, i : i + 1], state, mode="recurrent")
            y.pow(2).mean().backward()
        error = "none"
    except RuntimeError as exc:
        error = str(exc).split(".")[0]
    rows = []
    for (P, mode), n in ((piece, n) for piece in PIECES for n in calls):
        x = torch.randn(1, n * P, 256)
        row: dict = {"tokens_per_call": P, "mode": mode, "calls": n}
        for how in ("retain_graph", "detached"):
            kept: list = []
            run = train(mixer, x, n, P, mode, how, kept)
            t0 = time.process_time()
            run()
            row[f"{how}_total_s"] = time.process_time() - t0
            row[f"{how}_last_backward_ms"] = kept[1] * 1e3
            kept.clear()
            _, held = memory(run)
            row[f"{how}_held_MiB"] = held / MiB
            kept.clear()
        rows.append(row)
        print(
            f"{P:>3} tok x {n:>4} calls | held: retain_graph {row['retain_graph_held_MiB']:6.2f}, detached "
            f"{row['detached_held_MiB']:5.2f} MiB | last backward: retain_graph "
            f"{row['retain_graph_last_backward_ms']:6.1f} ms, detached {row['detached_last_backward_ms']:4.1f} ms | "
            f"all calls: retain_graph {row['retain_graph_total_s']:6.2f} s, detached {row['detached_total_s']:5.2f} s",
            flush=True,
        )
    return rows, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short sequences only (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="1: so that CPU time measures the work alone")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "chunkwise_memory.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [1024, 2048] if args.quick else [1024, 4096, 16384]
    calls = [10, 30] if args.quick else [10, 100, 300]
    train_calls = [10, 30] if args.quick else [10, 50, 100]
    memory(lambda: torch.ones(1))  # the profiler's first start is slow; not inside a measurement

    print(f"1. forward without gradients, chunkwise (chunk {CHUNK}), {SHAPE}, float32")
    forward = forward_rows(lengths, args.repeats)
    print(f"\n2. forward+backward, chunkwise (chunk {CHUNK}), {SHAPE}, float32")
    backward = backward_rows(lengths, args.repeats)
    print("\n3. streaming with gradients on: retention mixer, d_model 256, 2 heads (Dk 128, Dv 256)")
    streaming = streaming_rows(calls)
    print("\n4. training piece by piece (a backward per call), same mixer")
    training, error = tbptt_rows(train_calls)
    print(f"   without retain_graph and without detach, the second backward raises: {error}")
    result = {
        **run_info(args.threads),
        "memory": "tensor storage from torch's CPU allocator via the profiler: peak above the start, held at the end",
        "time": f"CPU time of this process ({args.threads} thread(s)), best of {args.repeats} interleaved runs after "
        "a warm-up (wall times as *_wall_ms); in 3 and 4 one run each",
        "op": {**SHAPE, "chunk_size": CHUNK, "gamma": GAMMA, "dtype": "float32", "group": torch_retention.GROUP},
        "forward_no_grad": forward,
        "forward_backward": backward,
        "streaming_with_gradients": streaming,
        "training_per_call": training,
        "training_per_call_attached_error": error,
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
