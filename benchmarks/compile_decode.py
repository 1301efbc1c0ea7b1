"""Compiled vs eager decoding and training of the demo-sized models, and the old decode path (issue 12), on CPU.

Not a test: it prints tables and writes JSON (default ``benchmarks/results/compile_decode.json``).

1. Decode ms/token of the demo presets ``retnet-tiny`` and ``transformer-tiny`` (random weights, seed 0,
   float32) after a prefix of P tokens, batch B: the eager step ``model._decode_step`` against the step that
   ``generate(compile=True)`` uses (``model._compiled_step(True)``: ``torch.compile``, full graph, static
   shapes). The states come from ``init_states(B, max_len=...)`` (KV caches preallocated for every step
   timed) and one chunkwise prefill; decode steps then continue from them token after token. Only decode
   steps are timed: not the prefill, not the compilation (the first compiled call, reported as
   ``compile_s``), not the 3 warm-up steps. Eager and compiled blocks of ``--steps`` steps alternate,
   ``--repeats`` blocks each; a block's time / steps is one sample, the median of the samples is reported.
   With ``--baseline-tree`` (a checkout of an older commit, e.g. ``a25055a``, the code before the static
   decode path) the same timing runs in a subprocess on that tree with its API: ``model(prefix,
   mode="chunkwise")`` then ``model(token, states, mode="recurrent")`` per step, its KV cache growing by
   concatenation. Its column is the eager baseline the issue's target (compiled >= 2x faster at B = 1)
   refers to.
2. Training step ms: forward (parallel mode) + cross-entropy + backward, AdamW step excluded, B = 1, of a
   demo-sized single-mixer model per mixer (presets retnet-tiny, linear-tiny, transformer-tiny), eager vs
   ``torch.compile(model)``; the median of ``--repeats`` alternating steps after 2 warm-up steps each.
3. The Transformer's decode with the preallocated cache (this tree, eager) vs the concatenating cache (the
   baseline tree, eager): the ratios of two columns of table 1.

Times are wall-clock (``time.perf_counter``) on ``--threads`` threads; on a shared machine they include
waits for a core, so the ratios of columns measured in the same run are what to read.
Usage: ``python benchmarks/compile_decode.py [--quick] [--threads 2] [--baseline-tree /tmp/seqmixers-a25055a]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = "--baseline-worker"
if WORKER not in sys.argv:  # the worker must import the tree on its PYTHONPATH (the baseline), not this one
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import models  # noqa: E402
from models import build_model  # noqa: E402
from models.config import load_run_config, presets  # noqa: E402

DECODE_PRESETS = {"retnet": "retnet-tiny", "transformer": "transformer-tiny"}
TRAIN_PRESETS = {"retention": "retnet-tiny", "linear_attention": "linear-tiny", "softmax_attention": "transformer-tiny"}
WARMUP = 3


def preset_model(preset: str) -> torch.nn.Module:
    """The preset's model with seed-0 weights, so this tree and the baseline tree build the same model."""
    config, _ = load_run_config(presets()[preset])
    torch.manual_seed(0)
    return build_model(config)


def prefix_tokens(B: int, P: int, vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (B, P), generator=torch.Generator().manual_seed(P))


def alternate(fns: dict[str, Callable[[], object]], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function: ``repeats`` samples, each the mean over a block of ``steps`` calls,
    the functions' blocks alternating so that a burst of load from other processes hits them alike."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            samples[name].append((time.perf_counter() - t0) / steps)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    return {"ms": statistics.median(samples) * 1e3, "min_ms": min(samples) * 1e3}


def unique_graphs() -> int:
    """Graphs dynamo has compiled so far in this process: a rise while timing would mean a recompile."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# -- 1: decode on this tree --------------------------------------------------------------------------------
@torch.no_grad()
def decode_new(name: str, P: int, B: int, steps: int, repeats: int, compiled: bool = True) -> dict:
    """Eager (and compiled) decode ms/token of preset ``name`` after a prefix of ``P`` tokens, batch ``B``."""
    model = preset_model(DECODE_PRESETS[name]).eval()
    tokens = prefix_tokens(B, P, model.config.vocab_size)
    calls = (1 + compiled) * (WARMUP + steps * repeats)
    states = model.init_states(B, max_len=P + calls + 1)
    _, states = model(tokens, states, mode="chunkwise")
    token, box = tokens[:, -1:], [states]  # one state for both steps: positions advance through every call

    def stepper(step: Callable) -> Callable[[], None]:
        def run() -> None:
            _, box[0] = step(token, box[0])

        return run

    fns = {"eager": stepper(model._decode_step)}
    row: dict = {"model": name, "P": P, "B": B}
    if compiled:
        torch._dynamo.reset()  # a fresh compilation per shape: no recompile limit, no cache from earlier rows
        fns["compiled"] = stepper(model._compiled_step(True))
        graphs = unique_graphs()
        t0 = time.perf_counter()
        fns["compiled"]()
        row["compile_s"] = time.perf_counter() - t0
        row["graphs_compiled"] = unique_graphs() - graphs
    for fn in fns.values():
        for _ in range(WARMUP):
            fn()
    graphs = unique_graphs()
    samples = alternate(fns, steps, repeats)
    for kind, s in samples.items():
        row[f"{kind}_ms"], row[f"{kind}_min_ms"] = summary(s).values()
    if compiled:
        row["recompiled_while_timing"] = unique_graphs() != graphs
    return row


# -- 1: decode on the baseline tree (subprocess) -----------------------------------------------------------
@torch.no_grad()
def decode_old_api(name: str, P: int, B: int, steps: int, repeats: int) -> dict:
    """Eager decode ms/token through the public API of the code before the static decode path: states from
    a chunkwise prefill without preallocation, then ``mode="recurrent"`` steps that grow the caches."""
    model = preset_model(DECODE_PRESETS[name]).eval()
    tokens = prefix_tokens(B, P, model.config.vocab_size)
    _, states = model(tokens, mode="chunkwise")
    token, box = tokens[:, -1:], [states]

    def run() -> None:
        _, box[0] = model(token, box[0], mode="recurrent")

    for _ in range(WARMUP):
        run()
    ms, min_ms = summary(alternate({"old": run}, steps, repeats)["old"]).values()
    return {"model": name, "P": P, "B": B, "old_eager_ms": ms, "old_eager_min_ms": min_ms}


def worker(spec: dict) -> None:
    """The subprocess side: check which tree is imported, time every row, print one JSON line."""
    tree = Path(spec["tree"]).resolve()
    imported = Path(models.__file__).resolve()
    if not imported.is_relative_to(tree):
        raise SystemExit(f"baseline worker imported models from {imported}, not from {tree}")
    torch.set_num_threads(spec["threads"])
    rows = [decode_old_api(name, P, B, spec["steps"], spec["repeats"]) for name, P, B in spec["rows"]]
    print(json.dumps({"models_file": str(imported), "torch": torch.__version__, "rows": rows}))


def decode_baseline(tree: Path, rows: list[tuple[str, int, int]], args: argparse.Namespace) -> dict:
    """Run ``worker`` on ``tree`` (first on its PYTHONPATH, working directory there) and collect its JSON."""
    spec = {"tree": str(tree), "threads": args.threads, "steps": args.steps, "repeats": args.repeats, "rows": rows}
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), WORKER, json.dumps(spec)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"baseline worker failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result["commit"] = commit.stdout.strip() or None
    return result


# -- 2: training step --------------------------------------------------------------------------------------
def train_step(mixer: str, T: int, B: int, repeats: int) -> dict:
    """Forward (parallel) + cross-entropy + backward ms, eager vs ``torch.compile(model)``; no optimizer step."""
    model = preset_model(TRAIN_PRESETS[mixer]).train()
    data = prefix_tokens(B, T + 1, model.config.vocab_size)
    inputs, targets = data[:, :-1], data[:, 1:]
    torch._dynamo.reset()
    compiled = torch.compile(model)

    def stepper(net: Callable) -> Callable[[], None]:
        def run() -> None:
            model.zero_grad(set_to_none=True)
            logits, _ = net(inputs)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()

        return run

    fns = {"eager": stepper(model), "compiled": stepper(compiled)}
    row: dict = {"mixer": mixer, "preset": TRAIN_PRESETS[mixer], "T": T, "B": B, "params": model.num_parameters()}
    t0 = time.perf_counter()
    fns["compiled"]()
    row["compile_s"] = time.perf_counter() - t0
    for fn in fns.values():
        for _ in range(2):
            fn()
    graphs = unique_graphs()
    for kind, s in alternate(fns, 1, repeats).items():
        row[f"{kind}_ms"], row[f"{kind}_min_ms"] = summary(s).values()
    row["recompiled_while_timing"] = unique_graphs() != graphs
    row["eager_over_compiled"] = row["eager_ms"] / row["compiled_ms"]
    return row


# -- tables ------------------------------------------------------------------------------------------------
def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_decode(rows: list[dict]) -> None:
    print(
        f"{'model':<12} {'P':>5} {'B':>3} {'old eager':>10} {'eager':>8} {'compiled':>9} {'compile s':>10} "
        f"{'old/eager':>10} {'old/compiled':>13} {'eager/compiled':>15}"
    )
    for r in rows:
        print(
            f"{r['model']:<12} {r['P']:>5} {r['B']:>3} {fmt(r.get('old_eager_ms')):>10} {r['eager_ms']:>8.2f} "
            f"{r['compiled_ms']:>9.2f} {r['compile_s']:>10.1f} {fmt(r['old_over_eager'], '.2f'):>10} "
            f"{fmt(r['old_over_compiled'], '.2f'):>13} {r['eager_over_compiled']:>15.2f}",
            flush=True,
        )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == WORKER:
        worker(json.loads(sys.argv[2]))
        return
    from benchmarks.common import run_info, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="prefix 64/256, B 1/4, T 256, few steps: a check run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="decode steps per timed block (default 20, 5 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed blocks (decode) or steps (training) per variant")
    parser.add_argument("--baseline-tree", type=Path, help="checkout of the old code (e.g. a25055a); none: skipped")
    parser.add_argument("--skip-training", action="store_true", help="decode tables only")
    parser.add_argument("--note", default="", help="recorded in the JSON: what was (not) run, and why")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compile_decode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.steps = args.steps or (5 if args.quick else 20)
    args.repeats = args.repeats or (3 if args.quick else 5)
    prefixes, batches, T = ([64, 256], [1, 4], 256) if args.quick else ([512, 4096], [1, 16], 2048)
    cases = [(name, P, B) for name in DECODE_PRESETS for P in prefixes for B in batches]
    started = time.time()

    baseline = None
    if args.baseline_tree is not None:
        print(f"baseline: eager decode on {args.baseline_tree} (subprocess) ...", flush=True)
        baseline = decode_baseline(args.baseline_tree.resolve(), cases, args)
    else:
        print("baseline: skipped (no --baseline-tree); the old-eager column stays empty")
    old = {(r["model"], r["P"], r["B"]): r for r in (baseline or {}).get("rows", [])}

    print(f"\n1. decode ms/token, demo presets, float32, {args.threads} thread(s), median of {args.repeats} blocks")
    decode_rows = []
    for name, P, B in cases:
        row = decode_new(name, P, B, args.steps, args.repeats)
        if (name, P, B) in old:
            row["old_eager_ms"] = old[name, P, B]["old_eager_ms"]
            row["old_eager_min_ms"] = old[name, P, B]["old_eager_min_ms"]
        row["old_over_eager"] = ratio(row.get("old_eager_ms"), row["eager_ms"])
        row["old_over_compiled"] = ratio(row.get("old_eager_ms"), row["compiled_ms"])
        row["eager_over_compiled"] = row["eager_ms"] / row["compiled_ms"]
        decode_rows.append(row)
    print_decode(decode_rows)

    targets = {
        f"{r['model']} P={r['P']} B=1: old eager / compiled >= 2": r["old_over_compiled"] >= 2
        for r in decode_rows
        if r["B"] == 1 and r["old_over_compiled"] is not None
    }
    for key, met in targets.items():
        print(f"  {key}: {'met' if met else 'NOT met'}")

    print("\n3. transformer decode: preallocated cache (this tree, eager) vs concatenating cache (baseline, eager)")
    cache_rows = [
        {"P": r["P"], "B": r["B"], "concat_ms": r.get("old_eager_ms"), "prealloc_ms": r["eager_ms"]}
        | {"concat_over_prealloc": r["old_over_eager"]}
        for r in decode_rows
        if r["model"] == "transformer"
    ]
    print(f"{'P':>5} {'B':>3} {'concat ms':>10} {'prealloc ms':>12} {'concat/prealloc':>16}")
    for r in cache_rows:
        print(
            f"{r['P']:>5} {r['B']:>3} {fmt(r['concat_ms']):>10} {r['prealloc_ms']:>12.2f} "
            f"{fmt(r['concat_over_prealloc']):>16}"
        )

    train_rows: list[dict] = []
    result = {
        **run_info(args.threads),
        "device": f"cpu, {args.threads} thread(s)",
        "note": args.note,
        "time": "wall-clock ms; decode: median over blocks of steps (eager and compiled blocks alternating), "
        "training: median over alternating single steps; *_min_ms the fastest sample",
        "decode_presets": DECODE_PRESETS,
        "baseline": None if baseline is None else {k: v for k, v in baseline.items() if k != "rows"},
        "decode": decode_rows,
        "decode_targets_B1": targets,
        "transformer_cache": cache_rows,
        "training": {"what": "forward (parallel) + cross-entropy + backward; AdamW step excluded", "rows": train_rows},
        "steps": args.steps,
        "repeats": args.repeats,
        "complete": args.skip_training,
    }
    write_json(args.out, result)  # the decode tables are kept if the training part is stopped
    if not args.skip_training:
        print(f"\n2. training step (forward parallel + backward, no optimizer step), B=1, T={T}")
        print(f"{'mixer':<18} {'eager ms':>9} {'compiled ms':>12} {'compile s':>10} {'eager/compiled':>15}")
        for mixer in TRAIN_PRESETS:
            r = train_step(mixer, T, 1, args.repeats)
            train_rows.append(r)
            write_json(args.out, result)
            print(
                f"{mixer:<18} {r['eager_ms']:>9.1f} {r['compiled_ms']:>12.1f} {r['compile_s']:>10.1f} "
                f"{r['eager_over_compiled']:>15.2f}",
                flush=True,
            )

    wall = time.time() - started
    print(f"\nwall {wall:.0f} s")
    result["complete"] = True
    result["wall_s"] = round(wall, 1)
    write_json(args.out, result)


if __name__ == "__main__":
    main()
