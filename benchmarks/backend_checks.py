"""What checking a backend's outputs on every call costs the eager decode step (issue 21, item 6).

Not a test: it prints a table and writes JSON (default ``benchmarks/results/backend_checks.json``).

The ops check the structure of what a backend returns (a pair ``(o, state)``, shapes, dtypes, devices) on every
call (``mixers.ops.base._verified``). For each model (the shipped tiny presets, random weights, batch 1, float32,
one thread), a 64-token prefix is prefilled, then one eager recurrent decode step (``model(token, states)``
under ``torch.no_grad``) is timed with the check and with it replaced by a pass-through, alternately, so that
both see the same load; the medians of ``--steps`` steps each are compared. On a shared machine that ratio
moves by several percent from run to run, more than the check costs, so the time spent inside the checks is
also measured directly, in each checked step: its median share of the step is the figure to decide on. The
project's rule: the built-in backends are checked on every call too if that costs under 3% (docs/registry.md).
Usage: ``python benchmarks/backend_checks.py [--steps 3000] [--models retnet-tiny,transformer-tiny]``.
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

from benchmarks.common import run_info, write_json  # noqa: E402
from mixers.ops import base  # noqa: E402
from models import build_model  # noqa: E402
from models.config import load_run_config, presets  # noqa: E402


def _unchecked(impl, mode, result, *args, **kwargs):
    return result


def measure(name: str, steps: int, prefix: int) -> dict:
    """Median seconds of one decode step of preset ``name`` with the per-call check and without it."""
    config, _ = load_run_config(presets()[name])
    model = build_model(config).eval()
    tokens = torch.randint(0, config.vocab_size, (1, prefix), generator=torch.Generator().manual_seed(0))
    checked = base._verified
    calls, inside = 0, 0.0

    def timed(*args, **kwargs):
        nonlocal calls, inside
        calls += 1
        t0 = time.perf_counter()
        result = checked(*args, **kwargs)
        inside += time.perf_counter() - t0
        return result

    with torch.no_grad():
        _, states = model(tokens, None, mode="chunkwise")
        token = tokens[:, -1:]

        def step() -> float:
            t0 = time.perf_counter()
            model(token, states, mode="recurrent")
            return time.perf_counter() - t0

        base._verified = timed
        step()
        per_step = calls
        times: dict[str, list[float]] = {"checked": [], "unchecked": [], "share": [], "check": []}
        try:
            for _ in range(50):  # warm-up
                step()
            for _ in range(steps):
                base._verified = checked
                times["checked"].append(step())
                base._verified = _unchecked
                times["unchecked"].append(step())
                base._verified, inside = timed, 0.0
                total = step()
                times["share"].append(inside / total)
                times["check"].append(inside / per_step)
        finally:
            base._verified = checked
    with_check, without = statistics.median(times["checked"]), statistics.median(times["unchecked"])
    return {
        "model": name,
        "op_calls_per_step": per_step,
        "step_ms_checked": with_check * 1e3,
        "step_ms_unchecked": without * 1e3,
        "ratio": with_check / without,
        "us_per_check": statistics.median(times["check"]) * 1e6,
        "check_share": statistics.median(times["share"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="timed steps per variant (alternating)")
    parser.add_argument("--prefix", type=int, default=64, help="prefilled tokens before the decode step")
    parser.add_argument("--models", default="retnet-tiny,transformer-tiny", help="presets, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "backend_checks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    known = presets()
    names = args.models.split(",")
    if unknown := [n for n in names if n not in known]:
        parser.error(f"unknown presets {unknown}; the presets are {sorted(known)}")
    rows = []
    header = ["model", "op calls", "checked ms", "unchecked ms", "ratio", "us/check", "check share"]
    print(f"{header[0]:<18}" + "".join(f"{h:>13}" for h in header[1:]))
    for name in names:
        row = measure(name, args.steps, args.prefix)
        rows.append(row)
        print(
            f"{name:<18}{row['op_calls_per_step']:>13}{row['step_ms_checked']:>13.3f}{row['step_ms_unchecked']:>13.3f}"
            f"{row['ratio']:>13.4f}{row['us_per_check']:>13.2f}{row['check_share']:>13.2%}"
        )
    write_json(args.out, {**run_info(args.threads), "steps": args.steps, "prefix": args.prefix, "rows": rows})


if __name__ == "__main__":
    main()
