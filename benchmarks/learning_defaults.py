"""The evidence behind the model builder's defaults (docs/learning.md): each mixer and the hybrid, with the
former defaults (``init="gpt2"``, tied embeddings) and today's (``init="scaled"``, untied), on

- MQAR (Zoology's multi-query associative recall: 8 pairs, 16 queries, 65 tokens, length 32), 2 layers,
  d_model 64, 4 heads, AdamW lr 3e-3, batch 64: accuracy at 600 and at 2000 steps, beside the plain
  reference Transformer of ``tests/test_learning.py`` (PyTorch's default initialisation);
- the demo's corpus (the 4-layer presets, their 300-step budget): validation perplexity;

each with several seeds, one process per run. Prints the table and writes
``benchmarks/results/learning_defaults.json`` (every run's curve; rewritten after each run, so a cut-short
run keeps what it measured)::

    python benchmarks/learning_defaults.py [--seeds 0 1 2] [--steps 2000] [--jobs 2] [--part mqar demo]
    python benchmarks/learning_defaults.py --variants new+conv --models retention linear_attention --resume
    python benchmarks/learning_defaults.py --models retention gated_retention --variants new new+conv --out X.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import ROOT, run_info, write_json

VARIANTS = {"old": {"init": "gpt2", "tie_embeddings": True}, "new": {"init": "scaled", "tie_embeddings": False}}
# Variants beyond the defaults (run with --variants): the new defaults plus a short convolution on q, k, v
# inside the recurrent mixers (``conv_size``; softmax attention has no such option and is left as it is).
EXTRA_VARIANTS = {"new+conv": {**VARIANTS["new"], "conv_size": 4}}
ALL_VARIANTS = {**VARIANTS, **EXTRA_VARIANTS}
CONV_MIXERS = ("retention", "linear_attention", "gated_retention")
MQAR_MODELS = {
    "softmax_attention": ["softmax_attention"],
    "retention": ["retention"],
    "linear_attention": ["linear_attention"],
    "hybrid": ["retention", "softmax_attention"],
    "gated_retention": ["gated_retention"],
}
DEMO_PRESETS = {
    "softmax_attention": "transformer-tiny",
    "retention": "retnet-tiny",
    "linear_attention": "linear-tiny",
    "hybrid": "hybrid-tiny",
    "gated_retention": "gated-retnet-tiny",
}


def mqar_config(layers: list[str]) -> dict[str, Any]:
    options = {name: {"num_heads": 4} for name in layers}
    return {"vocab_size": 65, "d_model": 64, "n_layers": 2, "layers": layers, "mixer_options": options}


def with_variant(config: dict[str, Any], variant: str) -> dict[str, Any]:
    """``config`` (a model config as a dict) with the variant's fields; ``conv_size`` goes to the mixers."""
    fields = dict(ALL_VARIANTS[variant])
    conv_size = fields.pop("conv_size", None)
    config = {**config, **fields}
    if conv_size is not None:
        mixers = {spec if isinstance(spec, str) else spec["mixer"] for spec in config["layers"]}
        options = {name: dict(opts) for name, opts in (config.get("mixer_options") or {}).items()}
        for name in mixers & set(CONV_MIXERS):
            options[name] = {**options.get(name, {}), "conv_size": conv_size}
        config["mixer_options"] = options
    return config


def run_mqar(model: str, variant: str, seed: int, steps: int) -> dict[str, Any]:
    from benchmarks.synthetic import Task, train_on_task
    from models import build_model

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    if model == "plain":
        from tests.test_learning import PlainTransformer

        net = PlainTransformer(65, 64, 2, 4)
    else:
        net = build_model(with_variant(mqar_config(MQAR_MODELS[model]), variant))
    result = train_on_task(net, Task(), steps=steps, seed=seed, eval_every=100, lr=3e-3, batch_size=64)
    return {"steps": result.steps, "accuracy": result.accuracy, "loss": result.loss, "seconds": result.seconds}


def run_demo(model: str, variant: str, seed: int) -> dict[str, Any]:
    from models.config import ModelConfig, load_run_config, presets
    from models.training.loop import train

    torch.set_num_threads(1)
    model_config, train_config = load_run_config(presets()[DEMO_PRESETS[model]])
    model_config = ModelConfig.from_dict(with_variant(model_config.to_dict(), variant))
    train_config = dataclasses.replace(train_config, seed=seed, sample_tokens=0)
    with tempfile.TemporaryDirectory() as out:
        result = train(model_config, train_config, out=out, progress=False)
    return {"val_ppl": result.val_ppl, "val_curve": result.val_curve, "tokens_per_s": result.tokens_per_s}


def _job(part: str, model: str, variant: str, seed: int, steps: int) -> tuple[tuple, dict[str, Any]]:
    start = time.perf_counter()
    out = run_mqar(model, variant, seed, steps) if part == "mqar" else run_demo(model, variant, seed)
    out["wall_s"] = time.perf_counter() - start
    return (part, model, variant, seed), out


def _at(run: dict[str, Any], step: int) -> float | None:
    return dict(zip(run["steps"], run["accuracy"], strict=True)).get(step)


def _cell(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.mean(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(runs: dict[str, dict[str, Any]], steps: tuple[int, int]) -> str:
    """One row per model and variant: MQAR accuracy at two step counts, and demo perplexity; mean (min-max)."""
    a, b = steps
    head = f"{'model':<18} {'defaults':<8} {f'MQAR acc @{a}':>22} {f'MQAR acc @{b}':>22} {'demo val ppl':>22} seeds"
    lines = [head, "-" * len(head)]
    for model in ["plain", *MQAR_MODELS]:
        for variant in ["-"] if model == "plain" else list(ALL_VARIANTS):
            mq = [r for k, r in runs.items() if k.startswith(f"mqar/{model}/{variant}/")]
            dm = [r for k, r in runs.items() if k.startswith(f"demo/{model}/{variant}/")]
            if not mq and not dm:
                continue
            at_a = [v for r in mq if (v := _at(r, a)) is not None]
            at_b = [v for r in mq if (v := _at(r, b)) is not None]
            ppl = [r["val_ppl"] for r in dm]
            name = "plain reference" if model == "plain" else model
            lines.append(
                f"{name:<18} {variant:<8} {_cell(at_a, '.3f'):>22} {_cell(at_b, '.3f'):>22} "
                f"{_cell(ppl, '.2f'):>22} {max(len(mq), len(dm))}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=2000, help="MQAR training steps (accuracy also at 600)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--part", nargs="+", choices=["mqar", "demo"], default=["mqar", "demo"])
    parser.add_argument("--models", nargs="+", choices=["plain", *MQAR_MODELS], default=["plain", *MQAR_MODELS])
    parser.add_argument(
        "--variants", nargs="+", choices=list(ALL_VARIANTS), default=list(VARIANTS), help="defaults to compare"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "learning_defaults.json")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --out; run only the others")
    args = parser.parse_args(argv)
    jobs = []
    for part in args.part:
        for model in args.models:
            if model == "plain" and part == "demo":
                continue
            for variant in ["-"] if model == "plain" else args.variants:
                jobs += [(part, model, variant, seed, args.steps) for seed in args.seeds]
    result = {**run_info(1), "jobs": args.jobs, "mqar_steps": args.steps, "variants": ALL_VARIANTS, "runs": {}}
    if args.resume and args.out.exists():
        kept = json.loads(args.out.read_text())
        if kept.get("mqar_steps") != args.steps:
            parser.error(f"--resume: {args.out} has MQAR runs of {kept.get('mqar_steps')} steps, not {args.steps}")
        result["runs"] = kept["runs"]
        result["earlier_commands"] = [*kept.get("earlier_commands", []), kept["command"]]
        jobs = [job for job in jobs if "/".join(map(str, job[:4])) not in result["runs"]]
    print(f"{len(jobs)} runs, {args.jobs} at a time", flush=True)
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(_job, *job) for job in jobs]
        for done, future in enumerate(as_completed(futures), 1):
            key, out = future.result()
            result["runs"]["/".join(map(str, key))] = out
            summary = f"acc {out['accuracy'][-1]:.3f}" if key[0] == "mqar" else f"val ppl {out['val_ppl']:.2f}"
            print(f"[{done}/{len(jobs)}] {'/'.join(map(str, key))}: {summary} ({out['wall_s']:.0f} s)", flush=True)
            result["table"] = table(result["runs"], (600, args.steps))
            write_json(args.out, result)
    print("\n" + result["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
