"""Issue 22's speed check: the code before the restructuring against the code after it, in one run, on CPU.

Not a test: it prints tables and writes JSON (default ``benchmarks/results/restructure_speed.json``).

Every measurement runs in a subprocess whose ``PYTHONPATH`` puts one tree first (``--before``: a checkout of
the commit before the restructuring; ``--after``: the tree to judge); the subprocess checks that every module of
``mixers``, ``models`` and ``benchmarks`` it ran came from that tree and stops if not. (The project is installed
editable from one tree: the worker drops that install's import hook, so the plugins installed beside it do not
load either, and both trees run their built-in backends.) The helpers it reuses (``benchmarks.common.timed``,
``benchmarks.decode.configs``, ``benchmarks.packed``'s documents) come from the tree measured too; both trees must
report the same parameter and token counts. The subprocesses alternate between the trees (which goes first
changes from group to group and round to round), ``--rounds`` times; for a training step each reports the median
of ``--samples`` timings after an untimed one, and a figure below is the median over the rounds (the JSON keeps
every round).

The models: a RetNet and a Transformer of the same size, ``d_model=256``, 2 layers, 4 heads, GELU FFN,
vocabulary 256, float32, seed-0 weights (``benchmarks.decode.configs``: 2x retention value width and 2x FFN
against a 4x FFN), batch 1. A training step is forward + cross-entropy + backward (no optimizer step).

Modes: training runs in ``TrainConfig.mode`` (default parallel; docs/models.md: chunkwise for long sequences).
The headline times each model in its faster mode, at every length: the RetNet chunkwise (retention is linear in T
there, and faster than its parallel form from T = 512 on), the Transformer parallel (one fused SDPA call, faster
than its blockwise chunkwise form). The issue's figures of "today" are of these modes. The other mode of each is
timed too where affordable: both at T <= 2048 (both are quadratic in T), the RetNet's parallel form (the default
``TrainConfig.mode``) on the short documents.

1. Training steps at T = 512, 2048 and 8192, before and after; the RetNet's speed over the Transformer's.
2. Packed documents, all in one row ``[1, N]`` with ``cu_seqlens`` (``benchmarks.packed.packed_steps``):
   64 documents of 10 to 2,000 tokens (``benchmarks.packed.corpus``) and 256 of 10 to 100 tokens (uniform,
   seed 0). Paths: ``loop``, each sequence through the op on its own (the only path before; after, the op's
   auto backend registered again under another name with ``packs=False``), and ``native``, after only: the
   auto backend itself, which computes the packed row in one call when its ``Backend.packs`` is true (the JSON
   records it). Targets: the RetNet's step >= 1.1x as fast as the Transformer's on the 64 documents (native),
   and native >= 2x as fast as the loop on the 256 short documents.
3. Decode ms/token, eager and compiled (``LanguageModel.stream(..., compile=...)``, greedy, B = 1): the gaps
   between the 32 tokens a stream yields after a prompt of P = 512 or 4096 tokens (its chunkwise prefill and
   first 2 steps not counted). A stream's median gap, the least of 5 such medians per subprocess (eager and
   compiled streams alternating; the least, as benchmarks/decode.py takes it: a burst of load spoils one stream,
   not the figure), then the median over the rounds. The compilation happens in an untimed stream first
   (``compile_s``, with inductor's on-disk cache as it is: the tree measured second finds the graphs the first
   compiled).

Times are wall-clock on ``--threads`` threads; on a shared machine they include waits for a core: read the
before/after ratios (measured alternately in the same run) and the spread over the rounds.
Usage: ``python -m benchmarks.restructure_speed --before /tmp/before --after . [--quick] [--rounds 3]``
(``--groups packed``: that part alone, written to ``restructure_speed_packed.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

WORKER = "--worker"
PACKAGES = ("mixers", "models", "benchmarks")
if sys.argv[1:2] == [WORKER]:
    # The project is installed editable: its import hook would serve a module the measured tree lacks (and the
    # plugins, which import such modules) from the installed tree. The worker imports the measured tree only.
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import mixers  # noqa: E402
from benchmarks.common import timed  # noqa: E402
from benchmarks.decode import configs  # noqa: E402
from benchmarks.packed import IGNORE, corpus, packed_steps  # noqa: E402
from models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("retnet", "transformer")
TRAIN_MODE = {"retnet": "chunkwise", "transformer": "parallel"}  # each model's faster training mode
OTHER_MODE = {"retnet": "parallel", "transformer": "chunkwise"}
TREES = ("before", "after")
PER_ROUND, PER_TREE = ("ms", "compile_s"), ("backends", "packs")  # row fields that differ by round, by tree


# -- the subprocess side: what one tree measures -------------------------------------------------------------
def model_of(name: str, quick: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(configs(64 if quick else 256, 2, 2 if quick else 4)[name])


def train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, **kwargs) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits, _ = model(x, mode=mode, **kwargs)
        F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE).backward()

    return step


def train_rows(spec: dict) -> list[dict]:
    data = torch.randint(0, 256, (1, spec["T"] + 1), generator=torch.Generator().manual_seed(spec["T"]))
    rows = []
    for name, mode in spec["cases"]:
        model = model_of(name, spec["quick"]).train()
        seconds = timed(train_step(model, data[:, :-1], data[:, 1:], mode), spec["samples"])
        rows.append(
            {"model": name, "mode": mode, "T": spec["T"], "ms": seconds * 1e3, "params": model.num_parameters()}
        )
    return rows


def documents(kind: str, quick: bool) -> list[torch.Tensor]:
    """``long``: log-uniform lengths in [10, 2000] (as benchmarks/packed.py); ``short``: uniform in [10, 100]."""
    if kind == "long":
        return corpus(8 if quick else 64)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 101, (32 if quick else 256,), generator=gen)
    return [torch.randint(0, 256, (int(n),), generator=gen) for n in lengths]


def packing_path(model: torch.nn.Module, path: str, mode: str, stack: contextlib.ExitStack) -> dict:
    """Put ``model`` on ``path`` (``"native"``: its auto backends; ``"loop"``: the same backends with
    ``packs=False``, under another name) and say which backends those are."""
    registry = mixers.get_registry()
    ops = sorted({op for m in model.modules() if isinstance(m, mixers.TokenMixer) for op in m.ops})
    cpu = torch.device("cpu")
    native = [registry.resolve_backend(op, "auto", device=cpu, dtype=torch.float32, mode=mode) for op in ops]
    names = {b.op: b.name for b in native}
    packs = [getattr(b, "packs", None) for b in native]  # None: a tree without Backend.packs
    if path == "native":
        if None in packs:
            raise SystemExit(f"this tree's backends have no Backend.packs: no native packed path for {names}")
        return {"backends": names, "packs": all(packs)}
    if None in packs:  # the loop is this tree's only path: its ops run each packed sequence on its own
        return {"backends": names, "packs": False}
    loop = "per_sequence_loop"
    for b in native:
        stack.enter_context(registry.temporary_backend(dataclasses.replace(b, name=loop, packs=False)))
    model.set_backend(loop)
    return {"backends": {b.op: f"{b.name} as {loop!r}, packs=False" for b in native}, "packs": False}


def packed_rows(spec: dict) -> list[dict]:
    docs = documents(spec["docs"], spec["quick"])
    tokens = sum(len(d) for d in docs)
    ((kwargs, x, y),) = packed_steps(docs, tokens, tokens)[0]  # one row holding every document
    rows = []
    for name, mode, path in spec["cases"]:
        model = model_of(name, spec["quick"]).train()
        with contextlib.ExitStack() as stack:
            chosen = packing_path(model, path, mode, stack)
            seconds = timed(train_step(model, x, y, mode, **kwargs), spec["samples"])
        rows.append(
            {"docs": spec["docs"], "model": name, "mode": mode, "path": path, "ms": seconds * 1e3, **chosen}
            | {"documents": len(docs), "tokens": tokens, "params": model.num_parameters()}
        )
    return rows


def stream_gaps(model: torch.nn.Module, prompt: torch.Tensor, new: int, compile: bool) -> list[float]:
    """Seconds between the tokens one greedy stream yields."""
    stamps = []
    for _ in model.stream(prompt, new, temperature=0, compile=compile):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def decode_rows(spec: dict) -> list[dict]:
    rows = []
    for name in MODELS:
        model = model_of(name, spec["quick"]).eval()
        for P in spec["prompts"]:
            prompt = torch.randint(0, 256, (1, P), generator=torch.Generator().manual_seed(P))
            stream_gaps(model, prompt, spec["new"], compile=False)  # warm-up
            t0 = time.perf_counter()
            stream_gaps(model, prompt, spec["new"], compile=True)  # compiles the step for this shape
            compile_s = time.perf_counter() - t0
            samples: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(spec["blocks"]):
                for compiled in (False, True):
                    gaps = stream_gaps(model, prompt, spec["new"], compile=compiled)[2:]
                    samples[compiled].append(statistics.median(gaps))
            row = {"model": name, "P": P, "compile_s": compile_s, "params": model.num_parameters()}
            for compiled, kind in ((False, "eager"), (True, "compiled")):
                rows.append(row | {"kind": kind, "ms": min(samples[compiled]) * 1e3})
    return rows


GROUPS = {"train": train_rows, "packed": packed_rows, "decode": decode_rows}


def check_tree(tree: Path) -> dict[str, str]:
    """The files of ``mixers``, ``models`` and ``benchmarks``; ``SystemExit`` if any module of theirs loaded
    so far is not from ``tree``."""
    loaded = {
        name: Path(module.__file__).resolve()
        for name, module in list(sys.modules.items())
        if name.split(".")[0] in PACKAGES and getattr(module, "__file__", None)
    }
    strays = {name: str(path) for name, path in loaded.items() if not path.is_relative_to(tree)}
    if strays or not set(PACKAGES) <= loaded.keys():
        raise SystemExit(f"worker for {tree} ran modules from elsewhere (PYTHONPATH override failed): {strays}")
    return {name: str(loaded[name]) for name in PACKAGES}


def worker(spec: dict) -> None:
    """Measure one group on ``spec["tree"]`` (checked before and after), print one JSON line."""
    tree = Path(spec["tree"]).resolve()
    check_tree(tree)
    torch.set_num_threads(spec["threads"])
    rows = GROUPS[spec["group"]](spec)
    files = check_tree(tree)
    print(json.dumps({"files": files, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}))


# -- the parent side: alternate the trees, gather, compare ---------------------------------------------------
def measure(tree: Path, spec: dict) -> dict:
    """Run ``worker`` on ``tree`` (first on PYTHONPATH, working directory there) and return its JSON."""
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), WORKER, json.dumps(spec | {"tree": str(tree)})],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker on {tree} ({spec['group']}) failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def jobs(quick: bool, samples: int, groups: tuple[str, ...] = tuple(GROUPS)) -> list[tuple[dict, dict]]:
    """(spec for before, spec for after) per measurement of ``groups``."""
    lengths = (256, 512) if quick else (512, 2048, 8192)
    out = []
    for T in lengths:
        cases = [(m, TRAIN_MODE[m]) for m in MODELS]
        if T <= 2048:  # the other modes are quadratic in time (and retention's parallel form in memory)
            cases += [(m, OTHER_MODE[m]) for m in MODELS]
        spec = {"group": "train", "T": T, "cases": cases}
        out.append((spec, spec))
    for docs in ("long", "short"):
        cases = [(m, TRAIN_MODE[m]) for m in MODELS]
        if docs == "short":  # the RetNet's parallel form too (TrainConfig's default mode)
            cases.append(("retnet", "parallel"))
        base = {"group": "packed", "docs": docs}
        before = base | {"cases": [(m, mode, "loop") for m, mode in cases]}
        after = base | {"cases": [(m, mode, path) for m, mode in cases for path in ("native", "loop")]}
        out.append((before, after))
    spec = {"group": "decode", "prompts": [64] if quick else [512, 4096], "new": 8 if quick else 32}
    spec["blocks"] = 2 if quick else 5
    out.append((spec, spec))
    common = {"quick": quick, "samples": samples}
    return [(b | common, a | common) for b, a in out if b["group"] in groups]


def key(row: dict) -> tuple:
    return tuple(row[k] for k in ("group", "T", "docs", "P", "model", "mode", "path", "kind") if k in row)


def gather(trees: dict[str, Path], args: argparse.Namespace) -> tuple[dict, dict]:
    """Every row each tree's workers returned, per round, keyed by ``key``; and what each tree's workers
    imported. The same key must mean the same work in both trees (same parameter and token counts)."""
    runs: dict[tuple, dict[str, list[dict]]] = {}
    seen: dict[str, dict] = {}
    todo = jobs(args.quick, args.samples, args.groups)
    for r in range(args.rounds):
        for j, specs in enumerate(todo):
            order = TREES if (r + j) % 2 == 0 else TREES[::-1]
            for tree in order:
                spec = specs[TREES.index(tree)] | {"threads": args.threads}
                t0 = time.perf_counter()
                out = measure(trees[tree], spec)
                what = f"{spec['group']} {spec.get('T', spec.get('docs', ''))}"
                print(
                    f"  round {r + 1}/{args.rounds}, {what:<12} {tree:<6} {time.perf_counter() - t0:6.1f} s", flush=True
                )
                seen[tree] = {k: out[k] for k in ("files", "torch", "threads")}
                for row in out["rows"]:
                    k = key({"group": spec["group"], **row})
                    entry = runs.setdefault(k, {})
                    first = next(iter(entry.values()), [row])[0]
                    if (row["params"], row.get("tokens")) != (first["params"], first.get("tokens")):
                        raise RuntimeError(f"{k}: the trees timed different work: {first} vs {row}")
                    entry.setdefault(tree, []).append(row)
    return runs, seen


def summary(k: tuple, entry: dict[str, list[dict]]) -> dict:
    """One row: what both trees share, each tree's median ms over the rounds (and its rounds, and what it
    reported of its own: backends, compile times), and the speed-up."""
    first = next(iter(entry.values()))[0]
    row = {"group": k[0]} | {f: v for f, v in first.items() if f not in PER_ROUND + PER_TREE}
    for tree in TREES:
        got = entry.get(tree, [])
        row[f"{tree}_ms"] = statistics.median(r["ms"] for r in got) if got else None
        row[tree] = {f"{f}_rounds": [r[f] for r in got] for f in PER_ROUND if got and f in got[0]}
        row[tree] |= {f: got[-1][f] for f in PER_TREE if got and f in got[-1]}
    row["speedup"] = ratio(row["before_ms"], row["after_ms"])
    return row


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def report(runs: dict, quick: bool) -> dict:
    """Print the tables and return the rows and the targets for the JSON."""
    rows = [summary(k, entry) for k, entry in runs.items()]
    get = {key(r): r for r in rows}
    targets: dict[str, dict] = {}

    def target(name: str, value: float | None, goal: float | None, before: float | None = None) -> None:
        met = "-" if value is None or goal is None else ("met" if value >= goal else "NOT met")
        targets[name] = {"value": value, "target": goal, "before": before, "verdict": met}

    def rounds(r: dict, tree: str) -> str:
        return "/".join(f"{x:.0f}" for x in r[tree].get("ms_rounds", []))

    print("\n1. training step ms (forward + cross-entropy + backward), B = 1; speed-up = before / after")
    print(f"{'T':>5} {'model':<12} {'mode':<10} {'before':>9} {'after':>9} {'speed-up':>9}  rounds before | after")
    for r in (r for r in rows if r["group"] == "train"):
        print(
            f"{r['T']:>5} {r['model']:<12} {r['mode']:<10} {fmt(r['before_ms'], '.1f'):>9} "
            f"{fmt(r['after_ms'], '.1f'):>9} {fmt(r['speedup']):>9}  {rounds(r, 'before')} | {rounds(r, 'after')}"
        )
        target(f"train T={r['T']} {r['model']} {r['mode']}: after / before speed >= 1", r["speedup"], 1.0)
    for T in sorted({r["T"] for r in rows if r["group"] == "train"}):
        ret, tra = (get[("train", T, m, TRAIN_MODE[m])] for m in MODELS)
        speeds = {t: ratio(tra[f"{t}_ms"], ret[f"{t}_ms"]) for t in TREES}
        print(
            f"  T={T}: RetNet speed / Transformer speed, before {fmt(speeds['before'])}, after {fmt(speeds['after'])}"
        )
        target(f"train T={T}: RetNet / Transformer speed, no lower than before", speeds["after"], speeds["before"])

    print("\n2. packed training step ms, all documents in one row; speed-up = before (loop) / after (native)")
    print(
        f"{'docs':<6} {'model':<12} {'mode':<10} {'before loop':>12} {'after loop':>11} {'after native':>13} "
        f"{'packs':>6} {'loop/native':>12} {'speed-up':>9}"
    )
    for r in (r for r in rows if r["group"] == "packed" and r["path"] == "native"):
        loop = get[("packed", r["docs"], r["model"], r["mode"], "loop")]
        r["after_loop_over_native"] = ratio(loop["after_ms"], r["after_ms"])
        r["before_loop_over_after_native"] = ratio(loop["before_ms"], r["after_ms"])
        print(
            f"{r['docs']:<6} {r['model']:<12} {r['mode']:<10} {fmt(loop['before_ms'], '.0f'):>12} "
            f"{fmt(loop['after_ms'], '.0f'):>11} {fmt(r['after_ms'], '.0f'):>13} {str(r['after']['packs']):>6} "
            f"{fmt(r['after_loop_over_native']):>12} {fmt(r['before_loop_over_after_native']):>9}"
        )
        if r["docs"] == "short":
            target(f"packed short {r['model']} {r['mode']}: loop / native >= 2", r["after_loop_over_native"], 2.0)
    if any(r["group"] == "packed" for r in rows):
        ret, tra = (get[("packed", "long", m, TRAIN_MODE[m], "native")] for m in MODELS)
        ret_loop, tra_loop = (get[("packed", "long", m, TRAIN_MODE[m], "loop")] for m in MODELS)
        before = ratio(tra_loop["before_ms"], ret_loop["before_ms"])
        after = ratio(tra["after_ms"], ret["after_ms"])
        print(f"  long: RetNet speed / Transformer speed, before (loop) {fmt(before)}, after (native) {fmt(after)}")
        target("packed long: RetNet / Transformer speed >= 1.1 (native)", after, 1.1, before)

    print("\n3. decode ms/token, B = 1, greedy stream; speed-up = before / after")
    print(
        f"{'model':<12} {'P':>5} {'kind':<9} {'before':>8} {'after':>8} {'speed-up':>9} "
        f"{'compile s before | after':>24}"
    )
    for r in (r for r in rows if r["group"] == "decode"):
        compile_s = " | ".join("/".join(f"{x:.0f}" for x in r[t].get("compile_s_rounds", [])) for t in TREES)
        print(
            f"{r['model']:<12} {r['P']:>5} {r['kind']:<9} {fmt(r['before_ms']):>8} {fmt(r['after_ms']):>8} "
            f"{fmt(r['speedup']):>9} {compile_s:>24}"
        )
        target(f"decode {r['model']} P={r['P']} {r['kind']}: after / before speed >= 1", r["speedup"], 1.0)

    caveat = " (--quick: small sizes, one sample: a check that the script runs, not a measurement)" if quick else ""
    print(f"\ntargets{caveat}:")
    for name, t in targets.items():
        print(f"  {name}: {fmt(t['value'])} ({t['verdict']})")
    return {"rows": rows, "targets": targets}


def commit_of(tree: Path) -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *cmd], capture_output=True, text=True).stdout.strip()

    changed = git("status", "--porcelain", "--untracked-files=no")
    return {
        "path": str(tree),
        "commit": git("rev-parse", "--short", "HEAD"),
        "modified_files": len(changed.splitlines()),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == WORKER:
        worker(json.loads(sys.argv[2]))
        return
    from benchmarks.common import run_info, write_json

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the commit before the restructuring")
    parser.add_argument("--after", type=Path, required=True, help="the tree to judge")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round, 1 sample: a check run (~3 min)")
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per tree and group, alternating")
    parser.add_argument("--samples", type=int, default=2, help="timings per subprocess (after an untimed one)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--groups", nargs="+", choices=tuple(GROUPS), default=tuple(GROUPS), help="the parts to run (default: all)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="default benchmarks/results/restructure_speed[_GROUPS][_quick].json (_GROUPS: if not all)",
    )
    args = parser.parse_args()
    args.groups = tuple(g for g in GROUPS if g in args.groups)
    if args.quick:
        args.rounds, args.samples = 1, 1
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for name, tree in trees.items():
        if not (tree / "mixers" / "__init__.py").is_file() or not (tree / "models" / "__init__.py").is_file():
            parser.error(f"--{name} {tree} is not a seqmixers tree (no mixers/ and models/ packages there)")
    part = "" if args.groups == tuple(GROUPS) else "_" + "_".join(args.groups)
    out = args.out or ROOT / "benchmarks" / "results" / f"restructure_speed{part}{'_quick' if args.quick else ''}.json"
    info = run_info(args.threads)
    if __spec__ is not None:  # run as a module: record the command that way
        info["command"] = " ".join([Path(sys.executable).name, "-m", __spec__.name, *sys.argv[1:]])
    started = time.time()
    machine = info["machine"]
    print(
        f"machine: {machine['platform']}, {machine['processor']}, {machine['cpu_count']} CPUs; "
        f"{args.threads} threads; {info['date']}; torch {machine['torch']}"
    )
    print(f"before {trees['before']}, after {trees['after']}; {args.rounds} rounds")
    runs, seen = gather(trees, args)
    tables = report(runs, args.quick)
    wall = time.time() - started
    print(f"\nwall {wall:.0f} s")
    result = {
        **info,
        "device": f"cpu, {args.threads} thread(s)",
        "trees": {t: commit_of(trees[t]) | seen.get(t, {}) for t in TREES},
        "modes": {
            "headline": TRAIN_MODE,
            "other": "the other mode of each at T <= 2048; short documents: retnet parallel",
        },
        "time": "wall-clock ms; before_ms/after_ms: the median over the rounds of a subprocess's figure, for a "
        "training step the median of --samples after an untimed one, for decode the least of 5 streams' median gaps; "
        "speedup = before_ms / after_ms",
        "rounds": args.rounds,
        "samples": args.samples,
        "quick": args.quick,
        "groups": list(args.groups),
        **tables,
        "wall_s": round(wall, 1),
    }
    write_json(out, result)


if __name__ == "__main__":
    main()
