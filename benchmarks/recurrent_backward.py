"""Time and memory of recurrent-mode retention with gradients: the former token loop vs the new backward
(issue 21, item 11).

Not a test: it prints a table and writes JSON (default ``benchmarks/results/recurrent_backward.json``).

Autograd through the token loop (the torch backend's recurrent mode until issue 21, reimplemented here as
``old`` for comparison) keeps every step's ``[B, H, Dk, Dv]`` state for the backward; the backend now saves only
its inputs and recomputes the states in its backward (``torch_retention._Recurrent``). For each T, one forward
and backward of ``sum(o * w) + sum(S_T * w_S)``, float32, one thread. Memory: the bytes of the distinct
storages autograd saves, and the peak tensor memory of the run above its start as torch's CPU allocator reports
it to the profiler (``chunkwise_memory.memory``: it counts the gradients of q, k, v, not the inputs). Times: the
best CPU time of ``--repeats`` runs, the two interleaved (``chunkwise_memory.best_times``).
Usage: ``python benchmarks/recurrent_backward.py [--quick] [--lengths 256,1024,4096] [--heads 4 --dk 64 --dv 64]``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.chunkwise_memory import MiB, best_times, memory  # noqa: E402
from benchmarks.common import run_info, write_json  # noqa: E402
from mixers import functional  # noqa: E402

GAMMA = 0.99


def old_recurrent(q, k, v, gamma: float):
    """The former recurrent mode: autograd through the token loop (``o_t = q_t S_t``, ``S_t = gamma S + k_t^T v_t``)."""
    B, T, H, Dk = q.shape
    state = q.new_zeros(B, H, Dk, v.shape[-1])
    outs = []
    for q_t, k_t, v_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), strict=True):
        state = gamma * state + k_t[..., :, None] * v_t[..., None, :]
        outs.append((q_t[..., None, :] @ state).squeeze(-2))
    return torch.stack(outs, dim=1), state


def new_recurrent(q, k, v, gamma: float):
    return functional.retention(q, k, v, gamma, mode="recurrent", backend="torch")


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def row(T: int, B: int, H: int, Dk: int, Dv: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, T, H, d, generator=gen).requires_grad_(True) for d in (Dk, Dk, Dv))
    w_o, w_s = torch.randn(B, T, H, Dv, generator=gen), torch.randn(B, H, Dk, Dv, generator=gen)

    def forward_backward(fn) -> Callable[[], None]:
        def run() -> None:
            o, s = fn(q, k, v, GAMMA)
            ((o * w_o).sum() + (s * w_s).sum()).backward()
            q.grad = k.grad = v.grad = None

        return run

    runs = {"old": forward_backward(old_recurrent), "new": forward_backward(new_recurrent)}
    times = best_times(runs, repeats)
    result: dict = {"T": T}
    for name, run in runs.items():
        result[f"{name}_s"] = times[name][0]
        result[f"{name}_saved_MiB"] = saved_bytes(run) / MiB
        result[f"{name}_peak_MiB"] = memory(run)[0] / MiB
    return result


def check_gradients(B: int, H: int, Dk: int, Dv: int) -> float:
    """The largest relative difference between the two variants' gradients, at T = 50 in float64."""
    gen = torch.Generator().manual_seed(1)
    leaves = [torch.randn(B, 50, H, d, generator=gen, dtype=torch.float64) for d in (Dk, Dk, Dv)]
    grads = []
    for fn in (old_recurrent, new_recurrent):
        xs = [x.clone().requires_grad_(True) for x in leaves]
        o, s = fn(*xs, GAMMA)
        grads.append(torch.autograd.grad(o.sum() + s.square().sum(), xs))
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*grads, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short sequences, for a smoke run")
    parser.add_argument("--lengths", default="256,1024,4096", help="sequence lengths T, comma-separated")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dk", type=int, default=64)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/recurrent_backward[_quick].json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shape = (args.batch, args.heads, args.dk, args.dv)
    lengths = [64, 256] if args.quick else [int(t) for t in args.lengths.split(",")]
    name = "recurrent_backward_quick.json" if args.quick else "recurrent_backward.json"
    out = args.out or ROOT / "benchmarks" / "results" / name
    print(f"B={args.batch} H={args.heads} Dk={args.dk} Dv={args.dv} float32, one state {math_mib(shape):.3f} MiB")
    print(f"gradients, old vs new (float64, T=50): largest relative difference {check_gradients(*shape):.1e}")
    columns = ["T", "old_s", "new_s", "old_saved_MiB", "new_saved_MiB", "old_peak_MiB", "new_peak_MiB"]
    print("".join(f"{c:>15}" for c in columns))
    rows = []
    for T in lengths:
        rows.append(row(T, *shape, args.repeats))
        print(f"{T:>15}" + "".join(f"{rows[-1][c]:>15.3f}" for c in columns[1:]))
    shape_info = dict(zip(("batch", "heads", "dk", "dv"), shape, strict=True))
    write_json(out, {**run_info(1), "shape": shape_info, "repeats": args.repeats, "rows": rows})


def math_mib(shape: tuple[int, int, int, int]) -> float:
    B, H, Dk, Dv = shape
    return B * H * Dk * Dv * 4 / MiB


if __name__ == "__main__":
    main()
