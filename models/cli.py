"""The ``seqmixers`` command: ``train``, ``generate``, ``export``, ``convert``, ``list``, ``demo``, ``mixers-demo``
and plugins' commands.

- ``seqmixers train --config FILE|PRESET [--data PATH] [--out DIR] [--force]``: train on the embedded corpus
  (or a text file, JSONL file or folder, streamed; ``--documents`` packs documents; ``--tokenizer bpe``) with a
  progress bar and validation perplexity; writes ``DIR/model.safetensors`` (last) and ``DIR/best.safetensors``,
  never over an earlier run's without ``--force``; exit code 3 when the run diverges, 128 + the signal's number
  after SIGINT/SIGTERM (which save first).
- ``seqmixers generate CHECKPOINT --prompt TEXT``: stream a sample (prefill, then O(1)-state decoding
  for the recurrent layers); ``--prompt`` several times: one batch of ragged prompts; ``--beams K``: beam search.
- ``seqmixers export RUN --out FILE``: the model of a run's training state (sharded or not) as one file.
- ``seqmixers convert --from torchscale|fla SRC --out FILE`` (and ``--to``): RetNets of the official code and of
  flash-linear-attention into our checkpoints and back (``models.convert``).
- ``seqmixers list``: mixers, backends, feature maps and plugins, where each came from, what is available.
- ``seqmixers demo``: the main job, a RetNet / Transformer / hybrid comparison in a few minutes on a CPU.
- ``seqmixers mixers-demo``: the op-level check, every mixer's three modes agreeing and states handing over.
- Plugins add commands through the ``register_commands`` hook. ``python -m mixers ...`` is this command.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import itertools
import math
import os
import re
import sys
import textwrap
import time
import typing
from pathlib import Path

# Only the standard library at the top: torch takes seconds to import, and a Ctrl-C meanwhile must end in
# "interrupted" (exit 130), which only main() can print. Each command imports what it needs.


def _cmd_train(args: argparse.Namespace) -> int:
    from models.config import load_run_config, resolve_config
    from models.training import folder
    from models.training import state as train_state
    from models.training.data import default_corpus
    from models.training.interrupts import Interrupted
    from models.training.loop import train
    from models.training.results import TrainingDiverged
    from models.training.tokenizers import TokenizerInterrupted

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, only rank 0 speaks

    def say(*parts: object, file: object = None) -> None:
        if main_rank:
            print(*parts, file=file)

    if args.config is None and args.resume is None:
        say("seqmixers train: error: give --config FILE|PRESET (or --resume RUN_FOLDER)", file=sys.stderr)
        return 2
    if args.allow_new_data and args.resume is None:
        say("seqmixers train: error: --allow-new-data goes with --resume RUN_FOLDER", file=sys.stderr)
        return 2
    saved = None
    if args.resume is not None:  # checked whole (checksums, every field) before anything else is done
        saved = train_state.read(args.resume)
    if args.config is not None:
        path = resolve_config(args.config)
        model_config, train_config = load_run_config(path)
    else:  # the run's own configs, from its saved training state
        model_config, train_config = saved.model, saved.train
        path = Path(args.resume)
    train_config = _with_overrides(train_config, args)
    out = Path(args.out) if args.out else Path(args.resume) if args.resume else Path("runs") / path.stem
    existing = folder.checkpoints(out)
    into_its_own_folder = saved is not None and out.resolve() == saved.path.parent.resolve()
    if existing and not args.force and not into_its_own_folder:
        say(
            f"seqmixers train: error: {out} already holds a checkpoint ({'; '.join(existing)}), which this run "
            f"would overwrite at its first validation.\n  To train anew and keep it, write elsewhere: --out DIR.\n"
            f"  To replace it: --force.\n  To use it: seqmixers generate {out / 'model.safetensors'}.\n"
            f"  To go on with it (if it saved its training state): --resume {out}.",
            file=sys.stderr,
        )
        return 2
    data = train_config.data
    if saved is not None and data in (None, saved.train.data):  # the data the run trained on, as its state records
        record = saved.data
        source = "the embedded corpus (pydoc help text)" if record["kind"] == "embedded" else record["path"]
        source += ", as the run trained on it"
        size = record["bytes"] if "bytes" in record else sum(f["size"] for f in record["files"])
    elif data is None:  # the embedded corpus
        text, source = default_corpus(), "the embedded corpus (pydoc help text)"
        size = len(text)
        if train_config.documents == "none" and train_config.tokenizer == "bytes":
            _check_corpus(size, train_config, source)
    else:  # a file or a folder, streamed into the token cache OUT/cache/ by train()
        from models.training.batches import cache_options
        from models.training.data import source_files

        files = source_files(data, fmt=cache_options(train_config)["fmt"])  # FileNotFoundError: exit 2
        size = sum(f.stat().st_size for f, _ in files)
        source = data if Path(data).is_file() else f"{data} ({len(files)} files)"
        text_only = all(kind == "text" for _, kind in files)  # their bytes are the tokens (for valid UTF-8)
        if train_config.documents == "none" and train_config.tokenizer == "bytes" and text_only:
            _check_corpus(size, train_config, f"--data {data!r}")
    model_config.check_backends(args.device)
    say(f"model: {model_config.describe()}", file=sys.stderr)
    packed = "" if train_config.documents == "none" else f" (packed {train_config.documents} documents)"
    bpe = f"; BPE tokenizer of up to {train_config.bpe_vocab} ids" if train_config.tokenizer == "bpe" else ""
    say(
        f"data: {source}, {size:,} bytes; {train_config.steps} steps of "
        f"{train_config.batch_size} x {train_config.seq_len} tokens{packed}{bpe}",
        file=sys.stderr,
    )
    if existing and not into_its_own_folder:
        say(f"--force: overwriting {'; '.join(existing)} in {out}", file=sys.stderr)
    try:
        result = train(
            model_config,
            train_config,
            out=out,
            device=args.device,
            progress=not args.quiet and main_rank,
            resume=saved,  # read and checked above: not hashed twice
            allow_new_data=args.allow_new_data,
        )
    except TrainingDiverged as exc:
        say(f"seqmixers train: error: {exc}", file=sys.stderr)
        if exc.best is not None:
            say(
                f"seqmixers train: kept the best checkpoint {exc.best} (step {exc.best_step}, val loss "
                f"{exc.best_val_loss:.3f}); {exc.checkpoint} holds the last validation before the divergence",
                file=sys.stderr,
            )
        return 3
    except Interrupted as exc:
        again = f"; go on with: {_resume_command(args, out)}" if exc.checkpoint is not None else ""
        say(f"seqmixers train: {exc}{again}", file=sys.stderr)
        return 128 + exc.signum
    except TokenizerInterrupted as exc:  # before the first step: nothing to save or resume
        say(f"seqmixers train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    say(
        f"done: val loss {result.val_loss:.3f} (ppl {result.val_ppl:.2f}), "
        f"{result.tokens_per_s:,.0f} tokens/s, checkpoint {result.checkpoint}, best {result.best} "
        f"(val loss {result.best_val_loss:.3f})",
        file=sys.stderr,
    )
    if main_rank:
        from models.training.runlog import plot_curves

        log, curves = out / folder.LOG, out / folder.CURVES
        if log.exists() and plot_curves(log, curves) is not None:
            say(f"curves: {curves} (log: {log})", file=sys.stderr)
    if result.sample:
        say("sample:", file=sys.stderr)
        say(result.sample)
    return 0


def _with_overrides(config: object, args: argparse.Namespace) -> object:
    """The train ``config`` with the settings given as options (one per field; ``None``: not given)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config)}
    return dataclasses.replace(config, **{name: value for name, value in given.items() if value is not None})


def _resume_command(args: argparse.Namespace, out: Path) -> str:
    """The command that goes on with an interrupted run exactly: its state holds the configs (the parallelism
    included) and the data; the processes and the device are the command's (under torchrun, the same number of
    processes)."""
    import shlex

    options = ["--resume", str(out)]
    if args.device != "cpu":
        options += ["--device", args.device]
    if args.threads is not None:
        options += ["--threads", str(args.threads)]
    command = ["seqmixers", "train"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = f"--nnodes {world // per_node} " if world != per_node else ""
        command = [*f"torchrun {nodes}--nproc_per_node {per_node} -m models.cli train".split()]
    return shlex.join([*command, *options])


def _cmd_export(args: argparse.Namespace) -> int:
    from models.training import state as train_state

    path = train_state.export(args.run, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from models import convert
    from models.checkpoint import load

    if args.source:
        model = convert.convert_file(args.source, args.src, config=args.config)
        path = model.save(args.out, metadata={"converted_from": args.source, "source": str(args.src)})
    else:
        if args.config:
            raise convert.ConvertError("--config describes a source to convert from; --to reads our checkpoint")
        path = convert.export_file(load(args.src), args.target, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _checkpoint_tokenizer(checkpoint: str, model: object) -> object:
    """The tokenizer saved beside ``checkpoint`` (its folder's ``tokenizer.json``: BPE), else bytes; checked
    against the model's vocabulary and the run's ``train.tokenizer``."""
    from models.checkpoint import read_header
    from models.config import ConfigError
    from models.training.tokenizers import BYTE_VOCAB, TOKENIZER_FILE, ByteTokenizer, load_tokenizer

    folder = Path(checkpoint).parent
    try:
        tokenizer = load_tokenizer(folder)
    except ImportError as exc:  # the tokenizers library is missing: the message says how to install it
        raise ConfigError(f"{folder / TOKENIZER_FILE} is a BPE tokenizer: {exc}") from None
    except Exception as exc:  # noqa: BLE001  (the tokenizers library raises a bare Exception for a bad file)
        raise ConfigError(
            f"{folder / TOKENIZER_FILE} beside the checkpoint is not a readable tokenizer ({type(exc).__name__}: "
            f"{str(exc).strip() or 'no details'}): put the run's own tokenizer.json there, or remove it to use bytes"
        ) from None
    V = model.config.vocab_size
    if isinstance(tokenizer, ByteTokenizer):
        trained_with = (read_header(checkpoint)[1].get("train") or {}).get("tokenizer", "bytes")
        if trained_with != "bytes":
            raise ConfigError(
                f"this checkpoint was trained with the {trained_with} tokenizer, but {folder / TOKENIZER_FILE} "
                f"is missing: put the run's tokenizer.json beside it"
            )
        if V < BYTE_VOCAB:
            raise ConfigError(f"this checkpoint's vocab_size={V} cannot hold byte tokens")
    elif V < tokenizer.vocab_size:
        raise ConfigError(
            f"this checkpoint's vocab_size={V} is smaller than the vocabulary of {folder / TOKENIZER_FILE} "
            f"({tokenizer.vocab_size} ids): the tokenizer beside it is not the one it was trained with"
        )
    return tokenizer


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from models.checkpoint import load
    from models.checkpoint_format import CheckpointError, nonfinite

    model = load(args.checkpoint, device=args.device)
    bad = nonfinite(dict(model.named_parameters()))
    if bad:
        raise CheckpointError(
            f"checkpoint {args.checkpoint!r} holds non-finite weights: {', '.join(bad)} hold NaN or inf, so it "
            "cannot generate (was it saved from a diverged run? use an earlier checkpoint, such as the run's best)"
        )
    tokenizer = _checkpoint_tokenizer(args.checkpoint, model)
    model.config.check_backends(args.device)
    prompts = args.prompt or [DEFAULT_PROMPT]
    if len(prompts) > 1 or args.beams is not None:
        return _generate_batch(model, prompts, args, tokenizer)
    decoder = tokenizer.stream()  # a character appears once complete
    t0, n = time.perf_counter(), 0
    tokens = model.stream(
        torch.tensor(tokenizer.encode(prompts[0]), dtype=torch.long),
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed,
        progress=True,  # a bar on a terminal while a long prompt is prefilled
        compile=args.compile,
    )
    first = next(tokens, None)  # the prefill: its bar is gone before the prompt is echoed
    first_at, second_at = time.perf_counter(), None
    sys.stdout.write(prompts[0])
    for token in itertools.chain([] if first is None else [first], tokens):
        if n == 1:  # the first decode step has run: the one that compiles, with --compile
            second_at = time.perf_counter()
        sys.stdout.write(decoder(int(token)))
        sys.stdout.flush()
        n += 1
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    compiling = second_at - first_at if args.compile and second_at is not None else None
    print(_timing(n, time.perf_counter() - t0, compiling), file=sys.stderr)
    return 0


def _timing(n: int, seconds: float, compiling: float | None = None, note: str = "") -> str:
    """generate's timing line; with ``compiling`` (the first decode step's time, which compiles the step), the
    time per token leaves that step out and the compilation is reported apart."""
    if compiling is None:
        return f"[{n} tokens in {seconds:.2f} s, {seconds / max(n, 1) * 1e3:.1f} ms/token{note}]"
    per_token = (seconds - compiling) / max(n - 1, 1)
    return f"[{n} tokens in {seconds:.2f} s, {per_token * 1e3:.1f} ms/token; compile {compiling:.2f} s]"


def _generate_batch(model, prompts: list[str], args: argparse.Namespace, tokenizer: object) -> int:
    """``generate`` with several prompts (one batch, ragged) or ``--beams``: each text printed once complete,
    under a ``==> prompt i <==`` line when there are several."""
    import torch

    from models.config import ConfigError

    encoded = [torch.tensor(tokenizer.encode(p), dtype=torch.long) for p in prompts]
    t0 = time.perf_counter()
    if args.beams is not None:
        if args.beams > model.config.vocab_size:
            V = model.config.vocab_size
            raise ConfigError(f"--beams must be at most the vocabulary size {V}, got {args.beams}")
        outputs = model.beam_search(encoded, args.max_new_tokens, num_beams=args.beams)
    else:  # every prompt with --seed: each text is the one that prompt alone gives
        outputs = model.generate_batch(
            encoded,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            seeds=args.seed,
            compile=args.compile,
        )
    n = sum(len(out) - len(e) for out, e in zip(outputs, encoded, strict=True))
    for i, (prompt, out, e) in enumerate(zip(prompts, outputs, encoded, strict=True)):
        if len(prompts) > 1:
            sys.stdout.write(("\n" if i else "") + f"==> prompt {i + 1} <==\n")
        sys.stdout.write(prompt + tokenizer.decode(out[len(e) :]) + "\n")
    sys.stdout.flush()
    # A batch's steps are not timed one by one: with --compile, its compilation is in the time per token.
    compiled = ", compilation included" if args.compile and args.beams is None else ""
    print(_timing(n, time.perf_counter() - t0, note=compiled), file=sys.stderr)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from mixers.listing import format_listing
    from mixers.registry import get_registry

    print(format_listing(get_registry()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from models import demo

    if args.quick:
        demo.run(
            args.out,
            steps=20 if args.steps is None else args.steps,
            lengths=(64, 128, 256),
            table_lengths=(64, 256),
            decode_steps=5,
            decode_repeats=1,
        )
    else:
        demo.run(args.out, steps=args.steps)
    return 0


def _cmd_mixers_demo(args: argparse.Namespace) -> int:
    from mixers import demo

    demo.run()
    return 0


def _prompt_text(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("the prompt must hold at least one character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # bytes that are not UTF-8 reach argv as lone surrogates (PEP 383)
        bad = value[exc.start : exc.end]
        try:
            shown = repr(bad.encode("utf-8", "surrogateescape"))  # the bytes given
        except UnicodeEncodeError:  # a lone surrogate passed from Python, not bytes from argv
            shown = ascii(bad)
        raise argparse.ArgumentTypeError(
            f"expected UTF-8 text, got {shown} at character {exc.start}, which is not (convert it, e.g. with iconv)"
        ) from None
    return value


def _int_at_least(minimum: int) -> object:
    """An argparse type: an int >= ``minimum``; the error says so and quotes what was given."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {text!r}")
        return value

    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**64), got {text!r}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0 (0: greedy), got {text!r}")
    return value


def _device(text: str) -> str:
    """A torch device that this machine has: ``cpu``, or ``cuda[:N]``, ``mps``, ... when available."""
    if text == "cpu":  # the default: no need to import torch while parsing
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(
            f"expected a torch device such as cpu, cuda, cuda:1 or mps, got {text!r}"
        ) from None
    if device.type == "cpu":
        return text
    module = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, ...
    is_available = torch.backends.mps.is_available if device.type == "mps" else getattr(module, "is_available", None)
    if is_available is None:
        raise argparse.ArgumentTypeError(f"expected a device that runs models (cpu, cuda, mps, ...), got {text!r}")
    name = {"cuda": "CUDA", "mps": "MPS"}.get(device.type, device.type)
    if not is_available():
        raise argparse.ArgumentTypeError(
            f"{name} is not available here (torch.{'backends.' if device.type == 'mps' else ''}{device.type}"
            f".is_available() is False), got {text!r}"
        )
    count = getattr(module, "device_count", None)
    if device.index is not None and count is not None and device.index >= count():
        raise argparse.ArgumentTypeError(f"there is no {name} device {device.index} ({count()} found), got {text!r}")
    return text


def _out_dir(text: str) -> str:
    """A folder that exists or can be made, and can be written to."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder, got the file {text!r}")
    nearest = path.absolute()
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise argparse.ArgumentTypeError(f"expected a folder, but {str(nearest)!r} is a file, got {text!r}")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write to the folder {str(nearest)!r} (read-only), got {text!r}")
    return text


def _check_corpus(size: int, train_config: object, source: str) -> None:
    """The training text (``size`` bytes, one token each) must leave more than ``seq_len`` bytes to both its
    training and validation parts (``models.training.batches.check_corpus_size``; train() checks a token cache's
    tokens)."""
    from models.training.batches import check_corpus_size

    check_corpus_size(size, train_config, source, "bytes")


def _preset_names() -> list[str]:
    """The shipped presets' names, without importing torch (``models.config.presets`` has their paths)."""
    root = importlib.resources.files("models") / "configs"
    return sorted(p.name.removesuffix(".toml") for p in root.iterdir() if p.name.endswith(".toml"))


class _Version(argparse.Action):
    """``--version``: the version of seqmixers (imported only when asked for)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: object) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help="print the version")

    def __call__(self, parser: argparse.ArgumentParser, *args: object) -> None:
        from mixers import __version__

        print(f"{parser.prog} {__version__}")
        parser.exit()


class _HelpFormatter(argparse.HelpFormatter):
    """The top-level help: the description's paragraphs and its bullets ("- " items, continued two spaces in) kept
    as written, each filled to the terminal's width; the commands' help lines wrapped as argparse wraps them."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = []
        for paragraph in re.split(r"\n\s*\n", text.strip()):
            items = re.split(r"\n(?=- )", paragraph)
            paragraphs.append(
                "\n".join(
                    textwrap.fill(
                        " ".join(item.split()),
                        width,
                        initial_indent=indent,
                        subsequent_indent=indent + ("  " if item.startswith("- ") else ""),
                        break_long_words=False,
                        break_on_hyphens=False,
                    )
                    for item in items
                )
            )
        return "\n\n".join(paragraphs)


DEVICE_HELP = "the torch device: cpu, cuda, cuda:N, mps (default: %(default)s)"
# The train options that override a field of the run file's [train] (or of the resumed run's saved config).
_FROM_CONFIG = "(default: the config's train.%s)"
DEFAULT_PROMPT = "The "  # generate's prompt when no --prompt is given


def parser(*, plugin_commands: bool = False) -> argparse.ArgumentParser:
    """The command's parser; with ``plugin_commands``, the plugins' commands too (this loads the registry)."""
    p = argparse.ArgumentParser(prog="seqmixers", description=__doc__.replace("``", ""), formatter_class=_HelpFormatter)
    p.add_argument("--version", action=_Version)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train",
        help="train a model from a config file or preset",
        epilog=f"presets: {', '.join(_preset_names())}",
    )
    t.add_argument(
        "--config", help="a TOML/YAML/JSON run file ([model], [train]) or a preset name (optional with --resume)"
    )
    t.add_argument("--out", type=_out_dir, help="output folder for model.safetensors (default: runs/<config name>)")
    t.add_argument("--force", action="store_true", help="overwrite the checkpoints already in --out")
    t.add_argument(
        "--resume",
        metavar="RUN_FOLDER",
        help="go on with the run whose training state is in RUN_FOLDER, with its configs and data (checked\n"
        "against what it saved; default: a new run)",
    )
    t.add_argument(
        "--allow-new-data",
        action="store_true",
        help="with --resume: train on data other than the run's (another --data, changed files, other\n"
        "data options); its best validation so far is forgotten (default: refused)",
    )
    t.add_argument("--device", default="cpu", type=_device, help=DEVICE_HELP)
    t.add_argument("--threads", type=_int_at_least(1), help="torch CPU threads (default: torch's choice)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    _add_train_settings(t.add_argument_group("settings of the run (each overrides a field of the config's [train])"))
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser(
        "generate",
        help="generate text from a checkpoint",
        description="Continue a prompt: it is prefilled, then each token is decoded in recurrent mode and "
        "written to stdout as it comes; a timing line goes to stderr. Several prompts (or --beams) are generated "
        "as one batch, each text written once complete.",
    )
    g.add_argument("checkpoint", help="a model.safetensors written by train")
    g.add_argument(
        "--prompt",
        type=_prompt_text,
        action="append",
        metavar="TEXT",
        help=f"text to continue; give it several times for one text per prompt, generated as one batch "
        f"(default: {DEFAULT_PROMPT!r})",
    )
    g.add_argument(
        "--max-new-tokens",
        type=_int_at_least(0),
        default=200,
        metavar="N",
        help="how many tokens (bytes, or BPE tokens) to generate (default: %(default)s)",
    )
    g.add_argument(
        "--temperature",
        type=_temperature,
        default=0.8,
        metavar="T",
        help="sampling temperature, 0 for greedy (default: %(default)s)",
    )
    g.add_argument(
        "--top-k", type=_int_at_least(1), metavar="K", help="sample among the K most likely tokens (default: all)"
    )
    g.add_argument(
        "--seed", type=_seed, default=0, metavar="N", help="the same seed gives the same text (default: %(default)s)"
    )
    g.add_argument(
        "--beams",
        type=_int_at_least(1),
        metavar="K",
        help="beam search with K beams per prompt: the most likely text found, deterministic (--temperature, "
        "--top-k, --seed and --compile do not apply; default: sampling)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step with torch.compile (once, on the first token; pays off for long outputs)",
    )
    g.add_argument("--device", default="cpu", type=_device, help=DEVICE_HELP)
    g.add_argument("--threads", type=_int_at_least(1), metavar="N", help="torch CPU threads (default: torch's choice)")
    g.set_defaults(func=_cmd_generate)

    e = sub.add_parser("export", help="write the model of a run's training state (sharded or not) to one file")
    e.add_argument("run", help="a run folder holding train_state/ (or the train_state folder)")
    e.add_argument("--out", required=True, help="the .safetensors file to write (read by generate and models.load)")
    e.set_defaults(func=_cmd_export)

    c = sub.add_parser(
        "convert",
        help="convert a torchscale or fla RetNet into our checkpoint, or ours into theirs",
        description="--from: read a torchscale RetNetDecoder or fla RetNetForCausalLM checkpoint and write ours (read "
        "by generate and models.load); --to: write our checkpoint in their layout (docs/convert.md).",
    )
    direction = c.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=("torchscale", "fla"), help="the source's library")
    direction.add_argument("--to", dest="target", choices=("torchscale", "fla"), help="the target's library")
    c.add_argument(
        "src",
        help="--from: a .safetensors or torch weights file (fla: also a save_pretrained folder); --to: our "
        ".safetensors checkpoint",
    )
    c.add_argument("--config", help="--from: a JSON file of the source config's fields, where SRC holds none")
    c.add_argument(
        "--out",
        required=True,
        help="--from: our .safetensors to write; --to fla: a folder (config.json, model.safetensors); --to "
        "torchscale: a torch file {model, config}",
    )
    c.set_defaults(func=_cmd_convert)

    sub.add_parser("list", help="list mixers, backends and plugins").set_defaults(func=_cmd_list)

    d = sub.add_parser("demo", help="train a tiny RetNet, Transformer and hybrid; compare them (a few minutes)")
    d.add_argument("--out", default="runs/demo", type=_out_dir, help="where the plot, JSON and checkpoints go")
    d.add_argument("--steps", type=_int_at_least(1), help="training steps per model (default: the presets')")
    d.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=1,
        help="torch CPU threads (default 1: tiny models gain little from more, and one thread does not\n"
        "slow down when other processes share the cores)",
    )
    d.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, short prefixes")
    d.set_defaults(func=_cmd_demo)

    sub.add_parser(
        "mixers-demo",
        help="check every mixer's parallel, chunkwise and recurrent modes agree, and states hand over (seconds)",
    ).set_defaults(func=_cmd_mixers_demo)
    if plugin_commands:
        _add_plugin_commands(sub)
    return p


def _add_train_settings(group: argparse._ArgumentGroup) -> None:
    """One option per field of ``TrainConfig`` (``--bpe-vocab N`` sets ``train.bpe_vocab``), whose value is checked
    as the field checks it; a flag for a bool field (``--checkpoint-activations``, ``--no-...``)."""
    from models.config import TrainConfig  # no torch: a config is data

    types = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        option, help_text = f"--{f.name.replace('_', '-')}", f"{f.metadata['help']} {_FROM_CONFIG % f.name}"
        kind = next(t for t in typing.get_args(types[f.name]) or (types[f.name],) if t is not type(None))
        if kind is bool:
            group.add_argument(option, action=argparse.BooleanOptionalAction, help=help_text)
        elif f.metadata["choices"]:
            group.add_argument(option, choices=f.metadata["choices"], help=help_text)
        else:
            metavar = {int: "N", float: "X"}.get(kind)
            group.add_argument(option, type=_setting(f, kind), metavar=metavar, help=help_text)


def _setting(f: dataclasses.Field, kind: type) -> object:
    """An argparse type: the text as ``kind``, checked as ``TrainConfig`` checks field ``f``."""

    def parse(text: str) -> object:
        try:
            value = kind(text)
        except ValueError:
            expected = "an int" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        try:
            f.metadata["check"](f.name, value)
        except ValueError as exc:  # a ConfigError
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return parse


def builtin_commands() -> list[str]:
    """The names of the built-in commands: those of the parser without the plugins' commands."""
    return [name for action in parser()._subparsers._group_actions for name in action.choices]


PLUGIN_GROUP = "seqmixers"  # mixers.plugins.ENTRY_POINT_GROUP, named here so that start-up need not import torch


def _wants_plugin_commands(argv: list[str]) -> bool:
    """Whether parsing ``argv`` may need the plugins' commands: when it names no built-in command (``--help``,
    no command, a plugin's command, a typo), and a third-party plugin is declared. The built-in commands, their
    ``--help`` and ``--version`` never load the plugins (and so torch): they stay fast."""
    for arg in argv:
        if arg == "--version":
            return False
        if not arg.startswith("-"):
            if arg in builtin_commands():
                return False
            break
    import importlib.metadata

    wanted = os.environ.get("SEQMIXERS_PLUGINS")
    names = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
    return any(names is None or ep.name in names for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP))


class _CommandRegistrar:
    """The ``register`` that a plugin's ``register_commands`` hook gets: ``register(name, run, help=...)`` adds
    the command to the ``seqmixers`` subcommands and returns its parser, refusing a name already taken;
    ``withdraw`` takes back what the plugin added (when its hook fails)."""

    def __init__(self, subparsers: argparse._SubParsersAction, plugin: str, owners: dict[str, str]) -> None:
        self._subparsers = subparsers
        self._plugin = plugin
        self._owners = owners  # command name -> who added it
        self._added: list[str] = []

    def __call__(self, name: str, run: object, *, help: str = "", **options: object) -> argparse.ArgumentParser:
        if not isinstance(name, str) or not name or name.startswith("-"):
            raise ValueError(f"a command name must be a non-empty str not starting with '-', got {name!r}")
        if not callable(run):
            raise TypeError(f"command {name!r}: run must be callable (args -> exit code), got {run!r}")
        names = [name, *options.get("aliases", ())]
        for command in names:
            if command in self._subparsers.choices:
                raise ValueError(f"the command name {command!r} is taken by {self._owners.get(command, 'seqmixers')}")
        parser = self._subparsers.add_parser(name, help=help, **options)
        parser.set_defaults(func=run)
        for command in names:
            self._added.append(command)
            self._owners[command] = f"plugin {self._plugin}"
        return parser

    def withdraw(self) -> None:
        for command in self._added:
            self._subparsers._name_parser_map.pop(command, None)
            self._owners.pop(command, None)
        self._subparsers._choices_actions = [a for a in self._subparsers._choices_actions if a.dest not in self._added]
        self._added.clear()


def _add_plugin_commands(subparsers: argparse._SubParsersAction) -> None:
    """Call each loaded plugin's ``register_commands`` hook on its own (through pluggy), in load order. A hook
    that raises is reported on stderr and its plugin's commands are left out; the other plugins' commands stay
    (``SEQMIXERS_STRICT_PLUGINS=1``: ``PluginLoadError`` instead, a traceback)."""
    from mixers.plugins import PLUGIN_FAILURES, PluginLoadError
    from mixers.registry import get_registry

    registry = get_registry()
    order = {name: i for i, name in enumerate(registry.plugins)}
    names = {impl.plugin_name for impl in registry.pm.hook.register_commands.get_hookimpls()}
    owners: dict[str, str] = {}
    for name in sorted(names, key=lambda name: order.get(name, len(order))):
        plugin = registry.describe_plugin(name)
        register = _CommandRegistrar(subparsers, plugin, owners)
        try:
            registry.call_plugin_hook(name, "register_commands", register=register)
        except PLUGIN_FAILURES as exc:
            register.withdraw()
            what = f"SystemExit ({exc.code!r})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
            message = f"plugin {plugin}: register_commands raised {what}; its commands are left out"
            if registry.strict:
                raise PluginLoadError(message) from exc
            print(f"seqmixers: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """The command: exit code 0, 2 for a usage error or a bad config, file or option (a one-line message,
    never a traceback), 130 for Ctrl-C, 141 when the reader of stdout goes away (``generate | head``)."""
    command = "seqmixers"
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser(plugin_commands=_wants_plugin_commands(argv)).parse_args(argv)
        command = f"seqmixers {args.command}"
        return _run(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _stdout_gone()


def _run(args: argparse.Namespace) -> int:
    from models.checkpoint_format import CheckpointError
    from models.config import ConfigError
    from models.lm import NotEnoughMemory

    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        code = args.func(args)
        return 0 if code is None else code  # a plugin's command that returns nothing succeeded
    except BrokenPipeError:
        raise
    except (ConfigError, CheckpointError, OSError, NotEnoughMemory) as exc:  # OSError: a missing or unreadable file
        print(f"seqmixers {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _stdout_gone() -> int:
    """The reader of stdout went away (``seqmixers generate ... | head``): stop quietly. Stdout is pointed at
    /dev/null so that the flush at exit does not fail again, and the exit code is that of a process killed by
    SIGPIPE (128 + 13), as ``yes | head`` gives, so that ``set -o pipefail`` sees the output was cut short."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (captured in memory)
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
