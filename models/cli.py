"""The ``seqmixers`` command: ``train``, ``generate``, ``list`` and ``demo``.

- ``seqmixers train --config FILE|PRESET [--data TEXT_FILE] [--out DIR]``: train on the embedded corpus
  (or a text file) with a progress bar and validation perplexity; writes ``DIR/model.safetensors``.
- ``seqmixers generate CHECKPOINT --prompt TEXT``: stream a sample (prefill, then O(1)-state decoding
  for the recurrent layers).
- ``seqmixers list``: mixers, backends and plugins (as ``python -m mixers list``).
- ``seqmixers demo``: the main job, a RetNet / Transformer / hybrid comparison in a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from models.checkpoint import CheckpointError
from models.config import ConfigError, load_run_config, presets, resolve_config


def _cmd_train(args: argparse.Namespace) -> int:
    from models import data as corpus
    from models.train import train

    path = resolve_config(args.config)
    model_config, train_config = load_run_config(path)
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    if overrides:
        train_config = dataclasses.replace(train_config, **overrides)
    out = Path(args.out) if args.out else Path("runs") / path.stem
    text = corpus.load_corpus(args.data)
    source = args.data or "the embedded corpus (pydoc help text)"
    print(f"model: {model_config.describe()}", file=sys.stderr)
    print(
        f"data: {source}, {len(text):,} bytes; {train_config.steps} steps of "
        f"{train_config.batch_size} x {train_config.seq_len} tokens",
        file=sys.stderr,
    )
    result = train(model_config, train_config, data=text, out=out, device=args.device, progress=not args.quiet)
    print(
        f"done: val loss {result.val_loss:.3f} (ppl {result.val_ppl:.2f}), "
        f"{result.tokens_per_s:,.0f} tokens/s, checkpoint {result.checkpoint}",
        file=sys.stderr,
    )
    if result.sample:
        print("sample:", file=sys.stderr)
        print(result.sample)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from models import data as corpus
    from models.checkpoint import load

    model = load(args.checkpoint, device=args.device)
    if model.config.vocab_size < corpus.BYTE_VOCAB:
        raise ConfigError(f"this checkpoint's vocab_size={model.config.vocab_size} cannot hold byte tokens")
    decoder = corpus.StreamDecoder()
    sys.stdout.write(args.prompt)
    t0, n = time.perf_counter(), 0
    for token in model.stream(
        corpus.encode(args.prompt),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
    ):
        sys.stdout.write(decoder(int(token)))
        sys.stdout.flush()
        n += 1
    sys.stdout.write(decoder.flush() + "\n")
    dt = time.perf_counter() - t0
    print(f"[{n} tokens in {dt:.2f} s, {dt / max(n, 1) * 1e3:.1f} ms/token]", file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from mixers.__main__ import format_listing
    from mixers.registry import get_registry

    print(format_listing(get_registry()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from models import demo

    if args.quick:
        demo.run(
            args.out,
            steps=args.steps or 20,
            lengths=(64, 128, 256),
            table_lengths=(64, 256),
            decode_steps=5,
            decode_repeats=1,
        )
    else:
        demo.run(args.out, steps=args.steps)
    return 0


def _prompt_text(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("the prompt must hold at least one character")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqmixers", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a model from a config file or preset",
        epilog=f"presets: {', '.join(presets())}",
    )
    t.add_argument("--config", required=True, help="a TOML/YAML/JSON run file ([model], [train]) or a preset name")
    t.add_argument("--data", help="a text file to train on (default: the embedded pydoc corpus)")
    t.add_argument("--out", help="output folder for model.safetensors (default: runs/<config name>)")
    t.add_argument("--steps", type=int, help="override train.steps")
    t.add_argument("--seed", type=int, help="override train.seed")
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("checkpoint", help="a model.safetensors written by train")
    g.add_argument("--prompt", type=_prompt_text, default="The ")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=_cmd_generate)

    sub.add_parser("list", help="list mixers, backends and plugins").set_defaults(func=_cmd_list)

    d = sub.add_parser("demo", help="train a tiny RetNet, Transformer and hybrid; compare them (a few minutes)")
    d.add_argument("--out", default="runs/demo", help="where the plot, JSON and checkpoints go")
    d.add_argument("--steps", type=int, help="training steps per model (default: the presets')")
    d.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: tiny models gain little from more, and one thread does not\n"
        "slow down when other processes share the cores)",
    )
    d.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, short prefixes")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as exc:
        print(f"seqmixers {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seqmixers {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
