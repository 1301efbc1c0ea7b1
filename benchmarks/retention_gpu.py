"""Retention on a GPU: the cupy backend's kernels against the torch backend, flash-linear-attention's
Triton ``chunk_retention`` and PyTorch's flash scaled-dot-product attention; and the decode step
against the bandwidth floor of reading and writing the state once.

    python benchmarks/retention_gpu.py [--out benchmarks/results] [--quick]
    python benchmarks/retention_gpu.py --sanitize   # tiny runs of every kernel, for compute-sanitizer

Shapes (bfloat16): B=8, H=16, Dk=128, Dv=256 and the paper's head layout (q/k heads of 256, v heads of
512: B=2, H=8), T = 1024 ... 16384. Every implementation gets the same inputs and per-head decays
``1 - 2^(-5-h)`` (fla's fixed ones). Times are medians of CUDA-event-timed runs after warm-up
(``triton.testing.do_bench``). FLOP/s count the chunkwise algorithm's own multiply-adds (chunk 64)
for every retention implementation, and causal attention's for SDPA; bandwidth is the fewest bytes
the pass must move (each input read once, each output written once) over the time. Results go to
``<out>/retention_gpu_<device>.json`` (rewritten after every measurement, ``"complete"`` once all are
done) with the device and library versions; a table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixers import functional  # noqa: E402
from mixers.backends.cupy import _retention  # noqa: E402

CHUNK = 64
LAYOUTS = {"B8-H16-Dk128-Dv256": (8, 16, 128, 256), "paper-B2-H8-Dk256-Dv512": (2, 8, 256, 512)}
LENGTHS = (1024, 2048, 4096, 8192, 16384)


def gammas(H: int) -> list[float]:
    return [1.0 - 2.0 ** (-5 - h) for h in range(H)]


def retention_flops(B: int, T: int, H: int, Dk: int, Dv: int) -> float:
    """Forward multiply-adds x 2 of chunkwise retention: scores and their product with V inside each chunk
    of 64, plus the state's read-out and update (each Dk x Dv per token)."""
    return 2.0 * B * H * T * (CHUNK * Dk + CHUNK * Dv + 2 * Dk * Dv)


def attention_flops(B: int, T: int, H: int, Dk: int, Dv: int) -> float:
    """Forward FLOPs of causal attention (half of the T x T scores and their product with V)."""
    return 2.0 * B * H * T * T * (Dk + Dv) / 2


def io_bytes(B: int, T: int, H: int, Dk: int, Dv: int, backward: bool, elem: int = 2) -> float:
    """Fewest bytes: forward reads q, k, v and writes o; backward also reads q, k, v, dO, writes dq, dk, dv."""
    qkv = B * T * H * (2 * Dk + Dv) * elem
    o = B * T * H * Dv * elem
    return qkv + o + ((qkv + o + qkv) if backward else 0)


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (CUDA events), after warm-up."""
    try:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=50, rep=300, return_mode="median"))
    except ImportError:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(20):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        return sorted(times)[len(times) // 2]


def implementations(H: int) -> dict[str, Callable]:
    """name -> f(q, k, v) -> o, all on [B, T, H, D] inputs with the same decays."""
    g = gammas(H)
    impls: dict[str, Callable] = {
        "cupy": lambda q, k, v: functional.retention(q, k, v, g, mode="chunkwise", backend="cupy")[0],
    }
    try:
        from fla.ops.retention import chunk_retention

        impls["fla_chunk_retention"] = lambda q, k, v: chunk_retention(q, k, v, scale=1.0)[0]
    except Exception as exc:  # not installed: the script still runs, and says so
        print(f"flash-linear-attention unavailable: {type(exc).__name__}: {exc}")
    impls["torch"] = lambda q, k, v: functional.retention(q, k, v, g, mode="chunkwise", backend="torch")[0]

    def sdpa(q, k, v, backends):
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(backends):
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
        return out.transpose(1, 2)

    from torch.nn.attention import SDPBackend

    # Flash attention proper; and whichever kernel PyTorch picks (flash needs Dk == Dv, so the layouts
    # here may need another one).
    impls["sdpa_flash"] = lambda q, k, v: sdpa(q, k, v, [SDPBackend.FLASH_ATTENTION])
    impls["sdpa_any"] = lambda q, k, v: sdpa(
        q, k, v, [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    )
    return impls


def measure(name: str, fn: Callable, B: int, T: int, H: int, Dk: int, Dv: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(T)
    q = (torch.randn(B, T, H, Dk, device="cuda", generator=gen) * Dk**-0.5).bfloat16().requires_grad_()
    k = torch.randn(B, T, H, Dk, device="cuda", generator=gen).bfloat16().requires_grad_()
    v = torch.randn(B, T, H, Dv, device="cuda", generator=gen).bfloat16().requires_grad_()
    do = torch.randn(B, T, H, Dv, device="cuda", generator=gen).bfloat16()
    flops = attention_flops(B, T, H, Dk, Dv) if name.startswith("sdpa") else retention_flops(B, T, H, Dk, Dv)
    row = {"impl": name, "B": B, "T": T, "H": H, "Dk": Dk, "Dv": Dv}
    with torch.no_grad():
        fwd = bench(lambda: fn(q, k, v))
    row["fwd_ms"] = fwd
    row["fwd_tflops"] = flops / fwd / 1e9
    row["fwd_gbps"] = io_bytes(B, T, H, Dk, Dv, backward=False) / fwd / 1e6
    fwd_bwd = bench(lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do))
    bwd_factor = 2.5 if name.startswith("sdpa") else 2.0  # backward FLOPs relative to forward
    row["fwd_bwd_ms"] = fwd_bwd
    row["fwd_bwd_tflops"] = flops * (1 + bwd_factor) / fwd_bwd / 1e9
    row["fwd_bwd_gbps"] = io_bytes(B, T, H, Dk, Dv, backward=True) / fwd_bwd / 1e6
    return row


def check_agreement(B: int, T: int, H: int, Dk: int, Dv: int, impls: dict[str, Callable]) -> dict[str, float]:
    """RMS error of each retention implementation against the torch backend in float32 on the same inputs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = (torch.randn(B, T, H, Dk, device="cuda", generator=gen) * Dk**-0.5).bfloat16()
    k = torch.randn(B, T, H, Dk, device="cuda", generator=gen).bfloat16()
    v = torch.randn(B, T, H, Dv, device="cuda", generator=gen).bfloat16()
    ref, _ = functional.retention(q.float(), k.float(), v.float(), gammas(H), mode="chunkwise", backend="torch")
    out = {}
    for name, fn in impls.items():
        if name.startswith("sdpa"):
            continue
        with torch.no_grad():
            o = fn(q, k, v).float()
        out[name] = ((o - ref).norm() / ref.norm()).item()
    return out


def decode_step(B: int, H: int, Dk: int, Dv: int, steps: int = 50) -> dict:
    """One token per call (T = 1) with a float32 state. The kernel's time comes from replaying a CUDA graph
    of ``steps`` launches, so that Python's per-call overhead (reported separately, as the API call's
    latency) stays out of it; if capture fails, from ``steps`` back-to-back launches instead."""
    rt = _retention.cupy_runtime(torch.device("cuda"))
    g = torch.tensor(gammas(H), dtype=torch.float64, device="cuda")
    q = torch.randn(B, 1, H, Dk, device="cuda").bfloat16()
    k = torch.randn(B, 1, H, Dk, device="cuda").bfloat16()
    v = torch.randn(B, 1, H, Dv, device="cuda").bfloat16()
    s0 = torch.randn(B, H, Dk, Dv, device="cuda")

    def launches() -> None:
        for _ in range(steps):
            _retention.recurrent_retention(rt, q, k, v, g, s0)

    launches()  # compile, load, warm up
    torch.cuda.synchronize()
    row: dict = {"B": B, "H": H, "Dk": Dk, "Dv": Dv}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            launches()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launches()
        kernel_ms = bench(graph.replay) / steps
        row["timing"] = "CUDA graph replay"
    except Exception as exc:
        row["graph_error"] = f"{type(exc).__name__}: {exc}"
        kernel_ms = bench(launches) / steps
        row["timing"] = "back-to-back launches (includes launch gaps)"
    floor_bytes = B * H * Dk * Dv * 4 * 2  # the state, read once and written once
    gl = gammas(H)
    api_ms = bench(lambda: functional.retention(q, k, v, gl, mode="recurrent", initial_state=s0, backend="cupy"))
    row.update(kernel_us=kernel_ms * 1e3, api_call_us=api_ms * 1e3, state_bytes_read_written=floor_bytes,
               kernel_gbps=floor_bytes / kernel_ms / 1e6)  # fmt: skip
    try:
        from fla.ops.retention import fused_recurrent_retention

        row["fla_fused_recurrent_us"] = 1e3 * bench(
            lambda: fused_recurrent_retention(q, k, v, scale=1.0, initial_state=s0, output_final_state=True)
        )
    except Exception as exc:
        row["fla_fused_recurrent_error"] = f"{type(exc).__name__}: {exc}"
    return row


def copy_bandwidth_gbps() -> float:
    """The device's own copy bandwidth (bytes read + written), the ceiling the decode step is measured against."""
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6


def sanitize_case() -> None:
    """Tiny forward and backward runs of every kernel and dtype, for compute-sanitizer (memcheck, racecheck)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for mode in ("chunkwise", "recurrent"):
            for Dk, Dv in ((72, 40), (24, 136)):
                q = torch.randn(2, 130, 2, Dk, device="cuda", dtype=dtype, requires_grad=True)
                k = torch.randn(2, 130, 2, Dk, device="cuda", dtype=dtype, requires_grad=True)
                v = torch.randn(2, 130, 2, Dv, device="cuda", dtype=dtype, requires_grad=True)
                s0 = torch.randn(2, 2, Dk, Dv, device="cuda", requires_grad=True)
                o, s = functional.retention(q, k, v, [0.9, 0.99], mode=mode, initial_state=s0, backend="cupy")
                torch.autograd.grad(o.float().sum() + s.sum(), (q, k, v, s0))
    torch.cuda.synchronize()
    print("sanitize case done")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for mod in ("cupy", "triton", "fla"):
        try:
            out[mod] = getattr(__import__(mod), "__version__", "?")
        except Exception as exc:
            out[mod] = f"unavailable ({type(exc).__name__})"
    return out


def table(rows: list[dict]) -> str:
    lines = ["| layout | T | impl | fwd ms | fwd TFLOP/s | fwd GB/s | fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd GB/s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['layout']} | {r['T']} | {r['impl']} | error: {r['error'][:60]} |||||||")
            continue
        lines.append(
            f"| {r['layout']} | {r['T']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_tflops']:.1f} | "
            f"{r['fwd_gbps']:.0f} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_tflops']:.1f} | {r['fwd_bwd_gbps']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--quick", action="store_true", help="T = 1024 and 4096 only")
    parser.add_argument("--sanitize", action="store_true", help="tiny runs for compute-sanitizer, no timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    if args.sanitize:
        sanitize_case()
        return 0
    device = torch.cuda.get_device_name()
    result: dict = {"device": device, "versions": versions(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "complete": False, "decode": {}, "agreement": {}, "rows": []}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"retention_gpu_{re.sub(r'[^A-Za-z0-9]+', '_', device).strip('_')}.json"

    def save() -> None:  # after every measurement, so that a run cut short keeps what it measured
        path.write_text(json.dumps(result, indent=2))

    print(f"device: {device}; {result['versions']}", flush=True)
    result["copy_gbps"] = copy_bandwidth_gbps()
    result["decode"] = {}
    for layout, (B, H, Dk, Dv) in LAYOUTS.items():
        try:
            row = decode_step(B, H, Dk, Dv)
            row["floor_us_at_copy_bandwidth"] = row["state_bytes_read_written"] / result["copy_gbps"] / 1e3
        except Exception as exc:
            row = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        result["decode"][layout] = row
        print(f"decode step, {layout}: {json.dumps(row)}", flush=True)
        save()
    lengths = (1024, 4096) if args.quick else LENGTHS
    for layout, (B, H, Dk, Dv) in LAYOUTS.items():
        impls = implementations(H)
        try:
            result["agreement"][layout] = check_agreement(B, 1024, H, Dk, Dv, impls)
        except Exception as exc:
            result["agreement"][layout] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        print(f"{layout}: RMS error vs torch float32 at T=1024: {result['agreement'][layout]}", flush=True)
        for T in lengths:
            for name, fn in impls.items():
                try:
                    row = measure(name, fn, B, T, H, Dk, Dv)
                except Exception as exc:  # one failing implementation or size does not lose the others
                    first_line = str(exc).splitlines()[0] if str(exc) else ""
                    row = {"impl": name, "B": B, "T": T, "H": H, "Dk": Dk, "Dv": Dv,
                           "error": f"{type(exc).__name__}: {first_line}"}  # fmt: skip
                row["layout"] = layout
                result["rows"].append(row)
                save()
                print(json.dumps(row), flush=True)
                torch.cuda.empty_cache()
    result["complete"] = True
    save()
    print(f"\nwrote {path}\n")
    print(table(result["rows"]))
    print(f"\ncopy bandwidth: {result['copy_gbps']:.0f} GB/s")
    for layout, row in result["decode"].items():
        print(f"decode step, {layout}: {json.dumps(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
