"""CPU benchmark of every registered mixer: decode cost and state size against the prefix length.

Not a test: it prints a table and writes JSON (default ``benchmarks/results/mixers_cpu.json``).

For each mixer (built with ``d_model=256, num_heads=4``, its other options at their defaults, float32,
B=1) and each prefix length T = 512 ... 8192:

- ``state bytes``: ``state.nbytes`` after a chunkwise prefill (chunk 64) of T tokens;
- ``decode``: the least of ``repeats`` medians, each over ``steps`` timed single-token ``mode="recurrent"``
  calls continuing that same state;
- ``fwd+bwd``: the median time of a chunkwise (chunk 64) forward and backward over T tokens.

Expected: retention and linear attention have a fixed-size state and a flat decode time; softmax
attention's KV cache grows linearly with T, and so does its decode time. Mixers added by plugins are
measured too. Usage: ``python benchmarks/mixers_cpu.py [--quick] [--threads 2] [--mixers a,b]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import mixers  # noqa: E402
from benchmarks.common import run_info, timed, write_json  # noqa: E402

CHUNK = 64


def measure(mixer: mixers.TokenMixer, T: int, d_model: int, steps: int, repeats: int) -> dict:
    """State size and per-token decode time after a prefix of T tokens; chunkwise fwd+bwd time over T."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, d_model, generator=gen)
    with torch.no_grad():
        t0 = time.perf_counter()
        _, state = mixer(x, mode="chunkwise", chunk_size=CHUNK)
        prefill_s = time.perf_counter() - t0
        token = torch.randn(1, 1, d_model, generator=gen)
        mixer(token, state, mode="recurrent")  # warm-up
        medians = []
        for _ in range(repeats):  # every call continues the same prefix, so T stays fixed
            calls = []
            for _ in range(steps):
                t0 = time.perf_counter()
                mixer(token, state, mode="recurrent")
                calls.append(time.perf_counter() - t0)
            medians.append(statistics.median(calls))
        # The least of the blocks' medians (as models.measure.decode_profile): a burst of load from another
        # process on a shared machine spoils one block, not the figure.
        decode_s = min(medians)

    xg = x.clone().requires_grad_(True)

    def train() -> None:
        y, _ = mixer(xg, mode="chunkwise", chunk_size=CHUNK)
        y.square().mean().backward()

    return {
        "T": T,
        "state_bytes": state.nbytes,
        "decode_s": decode_s,
        "prefill_s": prefill_s,
        "chunkwise_fwd_bwd_s": timed(train, repeats),
    }


def checks(rows: dict[str, list[dict]]) -> dict[str, object]:
    """Growth from the shortest to the longest prefix, per mixer: state size and decode time ratios."""
    out: dict[str, object] = {}
    for name, rs in rows.items():
        first, last = rs[0], rs[-1]
        span = f"T={last['T']} / T={first['T']}"
        out[f"{name}: state bytes {span}"] = round(last["state_bytes"] / max(first["state_bytes"], 1), 3)
        out[f"{name}: decode time {span}"] = round(last["decode_s"] / first["decode_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="decode calls per timing")
    parser.add_argument("--mixers", help="comma-separated mixer names (default: every registered mixer)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mixers_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = sorted(mixers.get_registry().mixers) if args.mixers is None else args.mixers.split(",")
    d_model, num_heads = (64, 2) if args.quick else (256, 4)
    lengths = [64, 128] if args.quick else [512, 1024, 2048, 4096, 8192]
    repeats = 1 if args.quick else args.repeats
    steps = 5 if args.quick else args.steps
    started = time.time()

    print(f"== mixers, d_model={d_model} num_heads={num_heads} B=1 float32, chunk {CHUNK}, {args.threads} threads ==")
    print(f"{'mixer':<20} {'T':>6} {'state bytes':>12} {'decode us/token':>16} {'chunkwise fwd+bwd ms':>21}")
    rows: dict[str, list[dict]] = {}
    for name in names:
        torch.manual_seed(0)
        try:
            mixer = mixers.build(name, d_model, num_heads=num_heads)
        except TypeError:  # a mixer without heads (a plugin's convolution, say) takes no num_heads
            mixer = mixers.build(name, d_model)
        rows[name] = []
        for T in lengths:
            row = measure(mixer, T, d_model, steps, repeats)
            rows[name].append(row)
            print(
                f"{name:<20} {T:>6} {row['state_bytes']:>12,} {row['decode_s'] * 1e6:>16.1f} "
                f"{row['chunkwise_fwd_bwd_s'] * 1e3:>21.1f}",
                flush=True,
            )
    result = {
        **run_info(args.threads),
        "config": {"d_model": d_model, "num_heads": num_heads, "batch": 1, "dtype": "float32", "chunk": CHUNK},
        "mixers": rows,
        "checks": checks(rows),
        "wall_s": round(time.time() - started, 1),
    }
    print("\n== growth from the shortest to the longest prefix ==")
    for key, value in result["checks"].items():
        print(f"  {key}: {value}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
