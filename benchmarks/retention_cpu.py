"""CPU benchmark of retention: parallel vs chunkwise vs recurrent, and ours vs the official torchscale code.

Not a test: it prints tables and writes JSON (default ``benchmarks/results/retention_cpu.json``).

1. The op ``mixers.functional.retention`` (B=2, H=8, Dk=64, Dv=128, float32) for T = 512 ... 8192:
   forward (no_grad) and forward+backward time and peak memory of parallel vs chunkwise (chunk 64 and
   128), and the per-token recurrent step time after a prefix of T tokens.
2. torchscale's ``MultiScaleRetention`` vs our ``"retention"`` mixer configured the way torchscale
   computes (same weights), B=2, d_model=512, 8 heads, value dim 1024, T = 1024 and 4096, parallel and
   chunkwise (chunk 128): times, peak memory, and how far apart the outputs are.

Peak memory is the rise of the process's resident-set high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``) over one run, measured in a fresh subprocess per configuration so that
allocator caches of earlier runs cannot hide or inflate it. Times are medians of repeated runs in this
process after a warm-up (the per-token recurrent step: the best of 7 runs of 50 steps).
Usage: ``python benchmarks/retention_cpu.py [--quick] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import run_info, timed, write_json  # noqa: E402
from mixers import functional  # noqa: E402

OP_SHAPE = dict(B=2, H=8, Dk=64, Dv=128)
PARALLEL_MEMORY_CAP = 12e9  # bytes; parallel fwd+bwd needs about 5 score-sized [B, H, T, T] buffers


# -- measuring ---------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def peak_rise(fn: Callable[[], object]) -> int:
    """Bytes by which resident memory rose above its level before ``fn`` at its highest point."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _status()["VmRSS"]
    fn()
    return _status()["VmHWM"] - before


# -- workloads (each returns a zero-argument callable running one forward or forward+backward) ---------
def op_workload(T: int, method: str, backward: bool) -> Callable[[], object]:
    B, H, Dk, Dv = OP_SHAPE.values()
    torch.manual_seed(0)
    q, k = torch.randn(B, T, H, Dk) * Dk**-0.5, torch.randn(B, T, H, Dk) * Dk**-0.5
    v = torch.randn(B, T, H, Dv)
    gamma = [1 - 2 ** (-5 - h) for h in range(H)]
    mode, chunk = ("parallel", None) if method == "parallel" else ("chunkwise", int(method.removeprefix("chunk")))
    if not backward:

        def run():
            with torch.no_grad():
                return functional.retention(q, k, v, gamma, mode=mode, chunk_size=chunk)

        return run
    for t in (q, k, v):
        t.requires_grad_(True)

    def run_bwd():
        o, _ = functional.retention(q, k, v, gamma, mode=mode, chunk_size=chunk)
        o.sum().backward()

    return run_bwd


def mixer_workload(impl: str, T: int, mode: str, backward: bool) -> Callable[[], object]:
    from tests.torchscale_compat import build_pair, import_torchscale, run_torchscale

    theirs, relpos, ours = build_pair(import_torchscale(), chunk_size=128)
    x = torch.randn(2, T, 512, requires_grad=backward)
    if impl == "torchscale":

        def forward():
            return run_torchscale(theirs, relpos, x, mode)
    else:

        def forward():
            return ours(x, mode=mode, chunk_size=128)[0]

    if not backward:

        def run():
            with torch.no_grad():
                return forward()

        return run

    def run_bwd():
        forward().sum().backward()

    return run_bwd


def memory_in_subprocess(kind: str, *args: object, threads: int) -> int:
    """Run one workload in a fresh interpreter and return its peak memory rise in bytes."""
    spec = json.dumps({"kind": kind, "args": list(args), "threads": threads})
    out = subprocess.run(
        [sys.executable, __file__, "--memory-probe", spec], capture_output=True, text=True, check=True
    ).stdout
    return int(out.strip().splitlines()[-1])


def _probe(spec: str) -> None:
    s = json.loads(spec)
    torch.set_num_threads(s["threads"])
    fn = {"op": op_workload, "mixer": mixer_workload}[s["kind"]](*s["args"])
    print(peak_rise(fn))


# -- the benchmark -------------------------------------------------------------------------------
def recurrent_step_time(T: int, steps: int) -> float:
    """Seconds per single-token recurrent call after a chunkwise prefill of T tokens (best of 7 x ``steps``)."""
    B, H, Dk, Dv = OP_SHAPE.values()
    gamma = [1 - 2 ** (-5 - h) for h in range(H)]
    with torch.no_grad():
        q, k, v = torch.randn(B, T, H, Dk) * Dk**-0.5, torch.randn(B, T, H, Dk) * Dk**-0.5, torch.randn(B, T, H, Dv)
        _, state = functional.retention(q, k, v, gamma, mode="chunkwise", chunk_size=128)
        x1 = torch.randn(B, 1, H, Dk), torch.randn(B, 1, H, Dk), torch.randn(B, 1, H, Dv)

        def step():
            for _ in range(steps):
                functional.retention(*x1, gamma, mode="recurrent", initial_state=state)

        return timed(step, repeats=7, best=True) / steps


def fmt_mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:8.1f}"


def fmt_s(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:9.2f}"


def bench_op(lengths: list[int], threads: int, repeats: int) -> tuple[list[dict], list[dict]]:
    B, H, Dk, Dv = OP_SHAPE.values()
    rows = []
    print(f"\n== op: retention, B={B} H={H} Dk={Dk} Dv={Dv} float32, {threads} threads ==")
    print(f"{'T':>6} {'method':>9} {'fwd ms':>9} {'fwd+bwd ms':>10} {'fwd MiB':>8} {'f+b MiB':>8}")
    for T in lengths:
        for method in ("parallel", "chunk64", "chunk128"):
            row: dict = {"T": T, "method": method}
            if method == "parallel" and 5 * B * H * T * T * 4 > PARALLEL_MEMORY_CAP:
                row["skipped"] = f"parallel fwd+bwd would need about {5 * B * H * T * T * 4 / 1e9:.0f} GB"
            else:
                row["fwd_s"] = timed(op_workload(T, method, False), repeats)
                row["fwd_bwd_s"] = timed(op_workload(T, method, True), repeats)
                row["fwd_peak_bytes"] = memory_in_subprocess("op", T, method, False, threads=threads)
                row["fwd_bwd_peak_bytes"] = memory_in_subprocess("op", T, method, True, threads=threads)
            rows.append(row)
            print(
                f"{T:>6} {method:>9} {fmt_s(row.get('fwd_s'))} {fmt_s(row.get('fwd_bwd_s')):>10} "
                f"{fmt_mb(row.get('fwd_peak_bytes'))} {fmt_mb(row.get('fwd_bwd_peak_bytes'))}"
                + (f"  ({row['skipped']})" if "skipped" in row else ""),
                flush=True,
            )
    steps = []
    print(f"\n== recurrent decode step after a prefix of T tokens (B={B} H={H} Dk={Dk} Dv={Dv}) ==")
    for T in lengths:
        t = recurrent_step_time(T, steps=50)
        steps.append({"prefix": T, "step_s": t})
        print(f"  prefix {T:>6}: {t * 1e6:8.1f} us/token", flush=True)
    return rows, steps


def bench_torchscale(lengths: list[int], threads: int, repeats: int) -> list[dict]:
    from tests.torchscale_compat import build_pair, import_torchscale, run_torchscale

    ts = import_torchscale()
    if ts is None:
        print("\n(torchscale is not installed: pip install --no-deps torchscale==0.3.0; comparison skipped)")
        return []
    print("\n== torchscale MultiScaleRetention vs ours: B=2 d_model=512 heads=8 value_dim=1024 chunk 128 ==")
    print(
        f"{'T':>6} {'mode':>9} {'pass':>7} {'torchscale ms':>13} {'ours ms':>9} {'speed-up':>8} "
        f"{'ts MiB':>8} {'ours MiB':>8}"
    )
    rows = []
    for T in lengths:
        for mode in ("parallel", "chunkwise"):
            for backward in (False, True):
                row: dict = {"T": T, "mode": mode, "pass": "fwd+bwd" if backward else "fwd"}
                for impl in ("torchscale", "ours"):
                    row[f"{impl}_s"] = timed(mixer_workload(impl, T, mode, backward), repeats)
                    row[f"{impl}_peak_bytes"] = memory_in_subprocess("mixer", impl, T, mode, backward, threads=threads)
                row["speedup"] = row["torchscale_s"] / row["ours_s"]
                rows.append(row)
                print(
                    f"{T:>6} {mode:>9} {row['pass']:>7} {fmt_s(row['torchscale_s']):>13} {fmt_s(row['ours_s'])} "
                    f"{row['speedup']:>7.2f}x {fmt_mb(row['torchscale_peak_bytes'])} {fmt_mb(row['ours_peak_bytes'])}",
                    flush=True,
                )
    # Outputs given the same weights: they differ only through the norm's epsilon (see docs/retention.md).
    agreement = {}
    for eps in (1e-6, 1e-14):
        theirs, relpos, ours = build_pair(ts, chunk_size=128, eps=eps)
        x = torch.randn(2, 1024, 512, dtype=torch.float64)
        theirs, relpos, ours = theirs.double(), relpos.double(), ours.double()
        with torch.no_grad():
            for mode in ("parallel", "chunkwise"):
                a = run_torchscale(theirs, relpos, x, mode)
                b = ours(x, mode=mode, chunk_size=128)[0]
                agreement[f"eps={eps:g} {mode}"] = ((a - b).norm() / a.norm()).item()
    print("  output relative difference, same weights, float64, T=1024:")
    for key, value in agreement.items():
        print(f"    {key:<24} {value:.2e}")
    rows.append({"agreement": agreement})
    return rows


def checks(op_rows: list[dict], steps: list[dict], ts_rows: list[dict]) -> dict[str, object]:
    """The expected shapes of the result, evaluated on what was measured."""
    out: dict[str, object] = {}
    by = {(r["T"], r["method"]): r for r in op_rows}
    beats = []
    for T in sorted({r["T"] for r in op_rows if r["T"] >= 2048}):
        par = by[(T, "parallel")]
        for m in ("chunk64", "chunk128"):
            c = by[(T, m)]
            if "skipped" in par:
                beats.append(True)  # parallel does not even fit
                continue
            beats.append(c["fwd_bwd_s"] < par["fwd_bwd_s"] and c["fwd_bwd_peak_bytes"] < par["fwd_bwd_peak_bytes"])
    out["chunkwise beats parallel (time and memory) from T=2048"] = all(beats) if beats else None
    if len(steps) > 1:
        ratio = steps[-1]["step_s"] / steps[0]["step_s"]
        out[f"recurrent step T={steps[-1]['prefix']} / T={steps[0]['prefix']}"] = round(ratio, 3)
    timing = [r for r in ts_rows if "speedup" in r]
    if timing:
        out["speed-up over torchscale (min over rows)"] = round(min(r["speedup"] for r in timing), 3)
        out["ours peak memory <= torchscale's in every row"] = all(
            r["ours_peak_bytes"] <= r["torchscale_peak_bytes"] for r in timing
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-torchscale", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "retention_cpu.json")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_probe:
        return _probe(args.memory_probe)
    torch.set_num_threads(args.threads)
    lengths = [256, 512] if args.quick else [512, 1024, 2048, 4096, 8192]
    ts_lengths = [256] if args.quick else [1024, 4096]
    started = time.time()
    repeats = 1 if args.quick else args.repeats
    op_rows, steps = bench_op(lengths, args.threads, repeats)
    ts_rows = [] if args.no_torchscale else bench_torchscale(ts_lengths, args.threads, repeats)
    result = {
        **run_info(args.threads),
        "op": op_rows,
        "recurrent_step": steps,
        "torchscale_vs_ours": ts_rows,
        "checks": checks(op_rows, steps, ts_rows),
        "wall_s": round(time.time() - started, 1),
    }
    print("\n== checks ==")
    for key, value in result["checks"].items():
        print(f"  {key}: {value}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
