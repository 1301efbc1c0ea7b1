"""What the checks issue 21 added to generation and checkpoints cost, on CPU.

Not a test: it prints a table and writes JSON (default ``benchmarks/results/generate_checks.json``).

For hybrid models (retention and softmax attention alternating, d_model 256, 4 heads, vocabulary 256; random
weights, seed 0, float32) of 2, 12 and 24 layers:

- ``check_ms``: ``model.check_state_memory(1, 1200)``, the memory check every ``generate`` / ``stream`` /
  ``generate_batch`` / ``beam_search`` call makes before it preallocates the states (the mixers' ``init_state`` on
  the meta device, and ``/proc/meminfo``); the mean of ``--repeats`` calls;
- ``generate_ms``: one ``model.generate(3-token prompt, 32)`` call (with that check inside), the scale it is read
  against;
- ``nonfinite_ms``: the scan for NaN or inf weights that ``save`` now makes (``models.checkpoint_format.nonfinite``);
- ``checksum_ms``: the SHA-256 over the tensors that ``save`` already computed, the scale that is read against.

Times are wall-clock (``time.perf_counter``) on ``--threads`` threads; the median of ``--repeats`` for the scans.
Usage: ``python benchmarks/generate_checks.py [--threads 1] [--repeats 50]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, run_info, timed, write_json  # noqa: E402
from models import ModelConfig, build_model  # noqa: E402
from models.checkpoint_format import checksum, nonfinite, state_tensors  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    return timed(fn, repeats, warmup=False) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generate_checks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'layers':>6} {'params':>8} {'check_ms':>9} {'generate_ms':>12} {'nonfinite_ms':>13} {'checksum_ms':>12}")
    for layers in (2, 12, 24):
        torch.manual_seed(0)
        options = {"retention": {"num_heads": 4}, "softmax_attention": {"num_heads": 4}}
        config = ModelConfig(
            vocab_size=256,
            d_model=256,
            n_layers=layers,
            layers=["retention", "softmax_attention"],
            mixer_options=options,
        )
        model = build_model(config).eval()
        start = time.perf_counter()
        for _ in range(args.repeats):
            model.check_state_memory(1, 1200)
        check_ms = (time.perf_counter() - start) / args.repeats * 1e3
        generate_ms = median_ms(lambda model=model: model.generate([1, 2, 3], 32, seed=0), 3)
        tensors = {k: v.cpu() for k, v in state_tensors(model).items()}
        row = {
            "layers": layers,
            "parameters": model.num_parameters(),
            "check_ms": check_ms,
            "generate_ms": generate_ms,
            "nonfinite_ms": median_ms(lambda tensors=tensors: nonfinite(tensors), args.repeats),
            "checksum_ms": median_ms(lambda tensors=tensors: checksum(tensors), max(3, args.repeats // 10)),
        }
        rows.append(row)
        print(
            f"{layers:>6} {row['parameters'] / 1e6:>7.1f}M {check_ms:>9.2f} {generate_ms:>12.1f} "
            f"{row['nonfinite_ms']:>13.2f} {row['checksum_ms']:>12.2f}"
        )
    write_json(args.out, {**run_info(args.threads), "rows": rows})


if __name__ == "__main__":
    main()
