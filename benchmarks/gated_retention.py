"""Gated retention's cost against retention's (issue 23), on the torch backend, in one run.

Not a test: it prints a table and writes JSON (default ``benchmarks/results/gated_retention.json``).

1. The op: forward + backward of ``sum(o * w)`` in chunkwise mode (chunk 64), B = 2, H = 8, Dk = Dv = 64, float32,
   at T = 1k, 4k and 16k; retention with the paper's decays, gated retention with log decays of the same size
   (``g = log gamma`` plus noise, so nothing is constant). Gradients w.r.t. q, k, v (and g for gated retention).
   The two ops alternate, ``--repeats`` times each after an untimed run; a figure is the least of the repeats,
   in wall time and in the process's CPU time (all threads), which other load on a shared machine inflates
   less. Target: gated retention at most 1.5x retention's time.
2. The mixer's decode step: one token in recurrent mode, without gradients, from a state (d_model 512, 8 heads
   of 64, the paper's value width), the two mixers alternating; a figure is the least of ``--repeats`` medians
   of 20 steps (a step is well under a millisecond: the least is what the code costs, the rest is other load).
   Target: gated retention within 1.2x of retention.

Usage: ``python -m benchmarks.gated_retention [--quick] [--threads 2] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import mixers
from benchmarks.common import ROOT, run_info, write_json
from mixers import functional

B, H, D, CHUNK = 2, 8, 64, 64


def op_inputs(T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) * D**-0.25 for _ in range(3))
    gammas = torch.tensor([1 - 2.0 ** (-5 - h) for h in range(H)])
    g = gammas.log() * (1 + 0.5 * torch.rand(B, T, H, generator=gen))
    return {"q": q, "k": k, "v": v, "g": g, "gammas": gammas, "w": torch.randn(B, T, H, D, generator=gen)}


def op_step(name: str, x: dict[str, torch.Tensor]):
    """One forward + backward of the op ``name`` on ``x``."""
    leaves = [x[n].detach().requires_grad_() for n in ("q", "k", "v", *(("g",) if name == "gated_retention" else ()))]

    def step() -> None:
        q, k, v, *g = leaves
        if name == "gated_retention":
            o, _ = functional.gated_retention(q, k, v, g[0], mode="chunkwise", chunk_size=CHUNK)
        else:
            o, _ = functional.retention(q, k, v, x["gammas"], mode="chunkwise", chunk_size=CHUNK)
        torch.autograd.grad((o * x["w"]).sum(), leaves)

    return step


def decode_step(name: str, d_model: int = 512):
    torch.manual_seed(0)
    mixer = mixers.build(name, d_model, num_heads=8).eval()
    with torch.no_grad():
        _, state = mixer(torch.randn(1, 64, d_model), mode="chunkwise")
    token = torch.randn(1, 1, d_model)

    def steps() -> float:
        times = []
        with torch.no_grad():
            for _ in range(20):
                t0 = time.perf_counter()
                mixer(token, state, mode="recurrent")
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 256 and 1024 only, 2 repeats (a check run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gated_retention.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = (256, 1024) if args.quick else (1024, 4096, 16384)
    repeats = 2 if args.quick else args.repeats
    ops = ("retention", "gated_retention")
    rows = []
    print(f"op forward + backward, chunkwise (chunk {CHUNK}), B={B}, H={H}, D={D}, float32, {args.threads} threads")
    header = ("T", "retention s", "gated s", "wall ratio", "ret. CPU", "gated CPU", "CPU ratio")
    print(" | ".join(f"{h:>{w}}" for h, w in zip(header, (6, 11, 9, 10, 9, 9, 9), strict=True)))
    for T in lengths:
        x = op_inputs(T)
        steps = {name: op_step(name, x) for name in ops}
        for step in steps.values():
            step()  # untimed
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in ops}
        for _ in range(repeats):  # alternating, so that a burst of load hits both
            for name in ops:
                wall, cpu = time.perf_counter(), time.process_time()
                steps[name]()
                times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        best = {name: min(t[0] for t in times[name]) for name in ops}
        cpu = {name: min(t[1] for t in times[name]) for name in ops}
        ratio, cpu_ratio = (m["gated_retention"] / m["retention"] for m in (best, cpu))
        rows.append({"T": T, "seconds": best, "cpu_seconds": cpu, "all": times, "ratio": ratio, "cpu_ratio": cpu_ratio})
        print(f"{T:>6} | {best['retention']:>11.3f} | {best['gated_retention']:>9.3f} | {ratio:>10.2f} | "
              f"{cpu['retention']:>9.3f} | {cpu['gated_retention']:>9.3f} | {cpu_ratio:>9.2f}")  # fmt: skip

    decoders = {name: decode_step(name) for name in ops}
    best: dict[str, float] = {name: float("inf") for name in ops}
    for _ in range(max(repeats, 3)):
        for name in ops:
            best[name] = min(best[name], decoders[name]())
    decode_ratio = best["gated_retention"] / best["retention"]
    print("\nmixer decode step (d_model 512, 8 heads, recurrent, no gradients)")
    print(f"retention {best['retention'] * 1e3:.3f} ms, gated retention {best['gated_retention'] * 1e3:.3f} ms: "
          f"{decode_ratio:.2f}x")  # fmt: skip
    worst = max(r["cpu_ratio"] for r in rows)  # the CPU-time ratio: what the code costs, less the machine's load
    print(f"\ntargets: op <= 1.5x in CPU time ({'met' if worst <= 1.5 else 'NOT met'}: worst {worst:.2f}x); "
          f"decode <= 1.2x ({'met' if decode_ratio <= 1.2 else 'NOT met'}: {decode_ratio:.2f}x)")  # fmt: skip
    write_json(
        args.out,
        {
            **run_info(args.threads),
            "op": {"shape": {"B": B, "H": H, "D": D, "chunk_size": CHUNK}, "rows": rows},
            "decode": {"d_model": 512, "heads": 8, "seconds": best, "ratio": decode_ratio},
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
