"""Per-token decode latency and state memory of a RetNet vs a Transformer of the same size, on CPU.

Not a test: it prints a table and writes JSON (default ``benchmarks/results/decode.json``).

Both models are ``models.LanguageModel``s with ``d_model=256``, 4 layers, 4 heads, a GELU FFN and
vocabulary 256, float32, batch 1, random weights (the cost does not depend on them). Their parameter
counts match as in the paper: the RetNet's retention has a 2x value width and a 2 * d_model FFN, the
Transformer a 4 * d_model FFN. For each prefix length T = 512 ... 8192 the prefix is prefilled in
chunkwise mode (extended from one length to the next through the states), then one recurrent decode
step is timed repeatedly from the same states (``models.measure.decode_profile``: the least of
``--repeats`` medians over ``--steps`` steps).

Expected: the RetNet's decode time and state are flat in T (T=8192 within 1.2x of T=512), and it is
several times faster than the Transformer at T=8192, whose KV cache and decode time grow linearly with T
(the paper reports 8.4x higher throughput at 8k for a 6.7B model on an A100). Note: our KV cache grows by
concatenation, as a dynamic cache does, so each step copies it; a preallocated cache would save that copy
but still reads all of it. Usage: ``python benchmarks/decode.py [--quick] [--threads 1] [--models ...]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.common import run_info, write_json  # noqa: E402
from models import ModelConfig, build_model  # noqa: E402
from models.measure import decode_profile, split_state_bytes  # noqa: E402


def configs(d_model: int, n_layers: int, heads: int) -> dict[str, ModelConfig]:
    """Same-size models: retention layers carry a 2x value width, so they get half the FFN width."""
    common = {"vocab_size": 256, "d_model": d_model, "n_layers": n_layers, "ffn": "gelu"}
    opts = {"num_heads": heads}
    return {
        "retnet": ModelConfig(**common, layers=["retention"], ffn_dim=2 * d_model, mixer_options={"retention": opts}),
        "transformer": ModelConfig(
            **common, layers=["softmax_attention"], ffn_dim=4 * d_model, mixer_options={"softmax_attention": opts}
        ),
        "linear": ModelConfig(
            **common, layers=["linear_attention"], ffn_dim=4 * d_model, mixer_options={"linear_attention": opts}
        ),
        "hybrid": ModelConfig(
            **common,
            layers=["retention", {"mixer": "softmax_attention", "ffn_dim": 4 * d_model}],
            ffn_dim=2 * d_model,
            mixer_options={"retention": opts, "softmax_attention": opts},
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and short prefixes, for a smoke run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="retnet,transformer", help="of retnet, transformer, linear, hybrid")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed decode steps per block")
    parser.add_argument("--repeats", type=int, default=5, help="blocks of steps; the least median is kept")
    parser.add_argument(
        "--out", type=Path, help="default: benchmarks/results/decode.json (decode_quick.json with --quick)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.d_model, args.layers, args.heads, args.steps, args.repeats = 64, 2, 2, 5, 2
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / ("decode_quick.json" if args.quick else "decode.json")
    lengths = [128, 256, 512] if args.quick else [512, 1024, 2048, 4096, 8192]
    all_configs = configs(args.d_model, args.layers, args.heads)
    names = args.models.split(",")
    unknown = [n for n in names if n not in all_configs]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {sorted(all_configs)}")
    started = time.time()
    prefix = torch.randint(0, 256, (1, lengths[-1]), generator=torch.Generator().manual_seed(0))

    print(
        f"== decode, d_model={args.d_model} layers={args.layers} heads={args.heads}, B=1 float32, "
        f"{args.threads} thread(s) =="
    )
    print(
        f"{'model':<12} {'params':>10} {'T':>6} {'ms/token':>9} {'tokens/s':>9} {'state KiB':>10} {'KV cache KiB':>13}"
    )
    rows: dict[str, dict] = {}
    for name in names:
        torch.manual_seed(0)
        model = build_model(all_configs[name])
        profile = decode_profile(model, prefix, lengths, steps=args.steps, repeats=args.repeats)
        split = split_state_bytes(profile)
        rows[name] = {"params": model.num_parameters(), "config": all_configs[name].to_dict(), "rows": []}
        for row, mem in zip(profile, split, strict=True):
            entry = {**row, **mem}
            rows[name]["rows"].append(entry)
            print(
                f"{name:<12} {model.num_parameters():>10,} {row['T']:>6} {row['decode_ms']:>9.2f} "
                f"{1e3 / row['decode_ms']:>9.0f} {mem['fixed_bytes'] / 1024:>10,.0f} "
                f"{mem['growing_bytes'] / 1024:>13,.0f}",
                flush=True,
            )
    checks = {}
    for name, r in rows.items():
        first, last = r["rows"][0], r["rows"][-1]
        checks[f"{name}: decode ms T={last['T']} / T={first['T']}"] = round(last["decode_ms"] / first["decode_ms"], 3)
    if "retnet" in rows and "transformer" in rows:
        t_last = rows["transformer"]["rows"][-1]
        r_last = rows["retnet"]["rows"][-1]
        checks[f"transformer / retnet decode ms at T={t_last['T']}"] = round(
            t_last["decode_ms"] / r_last["decode_ms"], 3
        )
        checks[f"transformer / retnet state bytes at T={t_last['T']}"] = round(
            t_last["state_bytes"] / r_last["state_bytes"], 3
        )
    print("\n== checks ==")
    for key, value in checks.items():
        print(f"  {key}: {value}")
    result = {
        **run_info(args.threads),
        "models": rows,
        "checks": checks,
        "wall_s": round(time.time() - started, 1),
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
