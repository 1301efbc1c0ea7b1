"""Packed vs padded vs one-document-per-row training, and batched ragged generation (issue 13), on CPU.

Not a test: it prints tables and writes JSON (default ``benchmarks/results/packed.json``).

1. Training tokens/s (forward in parallel mode + cross-entropy + backward; no optimizer step) of the demo
   presets ``retnet-tiny`` and ``transformer-tiny`` (random weights, seed 0, float32) on one stream of
   documents with lengths drawn log-uniformly from 10 to 2,000 tokens (seed 0). Every strategy sees the same
   documents in the same order and about ``--tokens`` real tokens per step; tokens/s counts real tokens only:
   - ``packed``: rows of ``--row`` tokens filled with documents (one cut at a row's end continues as a new
     sequence in the next row), the rows of a step flattened into one with ``cu_seqlens``;
   - ``padded+mask``: documents batched as they come, right-padded to the longest, ``attention_mask``
     (the model unpads once: the padding is never computed on);
   - ``padded``: the same batches without a mask, the padding computed on and its loss ignored (what a model
     without packing support does; exact for causal models with right padding);
   - ``one per row``: each document its own ``[1, n]`` call (gradients accumulate over the documents of a step).
   Each strategy runs over the stream ``--repeats`` times, the strategies alternating; the median is reported.
2. Batched ragged generation: ``--prompts`` prompts of 10 to 200 tokens (uniform, seed 1), greedy,
   ``--new`` tokens each: ``model.generate_batch`` on B prompts at a time (B = 1, 8, 32) against generating
   them one at a time with ``model.generate``. Generated tokens/s, median of ``--repeats``.

Times are wall-clock (``time.perf_counter``) on ``--threads`` threads; on a shared machine they include waits
for a core, so read the ratios of columns measured in the same run.
Usage: ``python benchmarks/packed.py [--quick] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models import build_model  # noqa: E402
from models.config import load_run_config, presets  # noqa: E402

PRESETS = {"retnet": "retnet-tiny", "transformer": "transformer-tiny"}
IGNORE = -100


def preset_model(preset: str) -> torch.nn.Module:
    config, _ = load_run_config(presets()[preset])
    torch.manual_seed(0)
    return build_model(config)


def corpus(n_docs: int, seed: int = 0) -> list[torch.Tensor]:
    """Documents of log-uniform lengths in [10, 2000], random byte tokens."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.empty(n_docs).uniform_(math.log(10), math.log(2000), generator=gen)).long()
    return [torch.randint(0, 256, (int(n),), generator=gen) for n in lengths]


def targets_of(doc: torch.Tensor) -> torch.Tensor:
    """Next-token targets of a document (its last token has none)."""
    return torch.cat([doc[1:], torch.tensor([IGNORE])])


# -- the strategies: each a list of steps, a step a list of (forward kwargs, tokens, targets) calls --------------
def packed_steps(docs: list[torch.Tensor], row: int, tokens_per_step: int) -> list[list[tuple]]:
    pieces, room, rows = [], row, []
    for doc in docs:
        while len(doc):
            piece, doc = doc[:room], doc[room:]
            pieces.append(piece)
            room -= len(piece)
            if room == 0:
                rows.append(pieces)
                pieces, room = [], row
    if pieces:
        rows.append(pieces)
    per_step = max(1, tokens_per_step // row)
    steps = []
    for i in range(0, len(rows), per_step):
        flat = [p for r in rows[i : i + per_step] for p in r]
        lengths = torch.tensor([len(p) for p in flat])
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        x = torch.cat(flat)[None]
        y = torch.cat([targets_of(p) for p in flat])[None]
        steps.append([({"cu_seqlens": cu}, x, y)])
    return steps


def doc_batches(docs: list[torch.Tensor], tokens_per_step: int) -> list[list[torch.Tensor]]:
    batches, batch, count = [], [], 0
    for doc in docs:
        batch.append(doc)
        count += len(doc)
        if count >= tokens_per_step:
            batches.append(batch)
            batch, count = [], 0
    if batch:
        batches.append(batch)
    return batches


def padded_steps(docs: list[torch.Tensor], tokens_per_step: int, mask: bool) -> tuple[list[list[tuple]], float]:
    steps, total, real = [], 0, 0
    for batch in doc_batches(docs, tokens_per_step):
        T = max(len(d) for d in batch)
        x = torch.zeros(len(batch), T, dtype=torch.long)
        y = torch.full((len(batch), T), IGNORE)
        m = torch.zeros(len(batch), T, dtype=torch.long)
        for b, d in enumerate(batch):
            x[b, : len(d)], y[b, : len(d)], m[b, : len(d)] = d, targets_of(d), 1
        steps.append([({"attention_mask": m} if mask else {}, x, y)])
        total, real = total + x.numel(), real + int(m.sum())
    return steps, 1 - real / total


def one_per_row_steps(docs: list[torch.Tensor], tokens_per_step: int) -> list[list[tuple]]:
    return [[({}, d[None], targets_of(d)[None]) for d in batch] for batch in doc_batches(docs, tokens_per_step)]


def run_steps(model: torch.nn.Module, steps: list[list[tuple]]) -> None:
    for step in steps:
        model.zero_grad(set_to_none=True)
        count = sum(int((y != IGNORE).sum()) for _, _, y in step)
        for kwargs, x, y in step:
            logits, _ = model(x, mode="parallel", **kwargs)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum") / count
            loss.backward()


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return samples


def training(name: str, docs: list[torch.Tensor], args: argparse.Namespace) -> dict:
    model = preset_model(PRESETS[name]).train()
    real = sum(len(d) for d in docs)
    padded, pad_share = padded_steps(docs, args.tokens, mask=False)
    masked, _ = padded_steps(docs, args.tokens, mask=True)
    strategies = {
        "packed": packed_steps(docs, args.row, args.tokens),
        "padded+mask": masked,
        "padded": padded,
        "one per row": one_per_row_steps(docs, args.tokens),
    }
    run_steps(model, [s[0] for s in strategies.values()])  # warm-up
    samples = alternate({k: (lambda s=s: run_steps(model, s)) for k, s in strategies.items()}, args.repeats)
    rows = {k: {"tokens_per_s": real / statistics.median(v), "seconds": v} for k, v in samples.items()}
    for k, s in strategies.items():
        rows[k]["steps"] = len(s)
    return {"model": PRESETS[name], "real_tokens": real, "padding_share": pad_share, "strategies": rows}


@torch.no_grad()
def generation(name: str, args: argparse.Namespace) -> dict:
    model = preset_model(PRESETS[name]).eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(0, 256, (int(n),), generator=gen) for n in torch.randint(10, 201, (args.prompts,), generator=gen)
    ]
    new = args.new * len(prompts)

    def batched(B: int) -> Callable[[], None]:
        def run() -> None:
            for i in range(0, len(prompts), B):
                model.generate_batch(prompts[i : i + B], args.new, temperature=0)

        return run

    def one_at_a_time() -> None:
        for p in prompts:
            model.generate(p, args.new, temperature=0)

    fns = {"one at a time": one_at_a_time, **{f"B={B}": batched(B) for B in (1, 8, 32)}}
    fns["one at a time"]()  # warm-up
    samples = alternate(fns, args.repeats)
    rows = {k: {"tokens_per_s": new / statistics.median(v), "seconds": v} for k, v in samples.items()}
    return {"model": PRESETS[name], "prompts": len(prompts), "new_tokens_each": args.new, "rows": rows}


def main() -> None:
    from benchmarks.common import run_info, write_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=48, help="documents in the training stream")
    parser.add_argument("--row", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--tokens", type=int, default=4096, help="real tokens per training step (about)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=32, help="tokens generated per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few documents and prompts")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "packed.json")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.prompts, args.new, args.repeats, args.tokens = 8, 8, 4, 1, 2048
    torch.set_num_threads(args.threads)
    result = {**run_info(args.threads), "args": vars(args) | {"out": str(args.out)}, "training": {}, "generation": {}}
    docs = corpus(args.docs)
    print(f"training: {len(docs)} documents, {sum(len(d) for d in docs):,} tokens, rows of {args.row}")
    print(f"{'model':<18} {'strategy':<12} {'tokens/s':>10} {'vs packed':>10}")
    for name in PRESETS:
        r = result["training"][name] = training(name, docs, args)
        base = r["strategies"]["packed"]["tokens_per_s"]
        for k, v in r["strategies"].items():
            print(f"{r['model']:<18} {k:<12} {v['tokens_per_s']:>10,.0f} {v['tokens_per_s'] / base:>9.2f}x")
        print(f"{'':<18} (padding share of the padded batches: {r['padding_share']:.0%})")
        write_json(args.out, result)
    print(f"\ngeneration: {args.prompts} prompts of 10-200 tokens, {args.new} new tokens each, greedy")
    print(f"{'model':<18} {'how':<14} {'tokens/s':>10} {'vs one':>8}")
    for name in PRESETS:
        r = result["generation"][name] = generation(name, args)
        base = r["rows"]["one at a time"]["tokens_per_s"]
        for k, v in r["rows"].items():
            print(f"{r['model']:<18} {k:<14} {v['tokens_per_s']:>10,.0f} {v['tokens_per_s'] / base:>7.2f}x")
        write_json(args.out, result)


if __name__ == "__main__":
    main()
