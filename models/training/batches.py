"""A run's data: where it comes from, its tokenizer and token cache (made once, on rank 0, while the other ranks
wait), the batches it draws, and the record of it that a resume checks.

``prepare`` gives a ``RunData``: ``draw(generator)`` picks a step's global batch (``batch_size`` rows; the same on
every rank, from the same generator), ``make(rows)`` reads the picked rows into ``(x, y, cu_seqlens or None, real
tokens)``, so that each rank reads only its own rows, and ``val_batches`` are the fixed validation batches.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.config import ConfigError, ModelConfig, TrainConfig
from models.training import data as corpus
from models.training.data import TokenCache, build_token_cache, iter_texts, open_token_cache, source_files
from models.training.folder import CACHE_DIR, CACHE_NAME
from models.training.parallel import World, on_main
from models.training.state import ResumeError, Saved
from models.training.tokenizers import BYTE_VOCAB, TOKENIZER_FILE, BPETokenizer, ByteTokenizer, Tokenizer

# The train-config fields that decide what a run trains and validates on: a resumed run keeps them.
DATA_FIELDS = (
    "documents", "separator", "jsonl_field", "tokenizer", "bpe_vocab", "seq_len", "batch_size", "val_fraction",
    "eval_batches",
)  # fmt: skip


@dataclass
class RunData:
    """What a run trains on: its batches (see the module's docstring), tokenizer, model config (``vocab_size``
    set to a BPE tokenizer's), the ``record`` its training state keeps, and notes for the log."""

    draw: Callable[[torch.Generator], torch.Tensor]
    make: Callable[[torch.Tensor], tuple]
    val_batches: list[tuple]
    tokenizer: Tokenizer
    model_config: ModelConfig
    record: dict[str, Any]
    changed: list[str] = field(default_factory=list)  # how the data differs from a resumed run's (allowed)
    notes: list[str] = field(default_factory=list)
    temporary: tempfile.TemporaryDirectory | None = None  # the cache's folder without a run folder

    def close(self) -> None:
        """Remove the temporary folder of the cache, if any."""
        if self.temporary is not None:
            self.temporary.cleanup()

    def __enter__(self) -> RunData:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cache_options(tc: TrainConfig) -> dict[str, str]:
    """The reading options for ``tc.documents``: ``"none"`` reads each text file (and each JSONL record) as one
    document, ``"lines"``/``"separator"`` split text files, ``"jsonl"`` reads every file as JSONL."""
    documents = {"none": "file", "jsonl": "file"}.get(tc.documents, tc.documents)
    return {
        "fmt": "jsonl" if tc.documents == "jsonl" else "auto",
        "field": tc.jsonl_field,
        "documents": documents,
        "separator": tc.separator,
    }


def corpus_needs(tc: TrainConfig) -> int:
    """The fewest tokens that leave more than ``seq_len`` tokens to both the training part and the held-out
    ``val_fraction`` of a corpus trained on random windows (``documents="none"``)."""
    seq_len, fraction = tc.seq_len, tc.val_fraction
    need = math.ceil((seq_len + 1) / fraction)
    while int(need * fraction) < seq_len + 1 or need - int(need * fraction) < seq_len + 1:
        need += 1
    return need


def check_corpus_size(n: int, tc: TrainConfig, source: str, unit: str = "bytes") -> None:
    """Raise a ``ConfigError`` when ``n`` tokens (``unit``) are too few for ``corpus_needs``."""
    need = corpus_needs(tc)
    if n >= need:
        return
    what = "is empty" if not n else f"holds {n:,} {unit}"
    raise ConfigError(
        f"{source} {what}; seq_len={tc.seq_len} with val_fraction={tc.val_fraction} needs at least {need:,} {unit} "
        f"(more than seq_len for validation, and for training): give more text or a smaller seq_len"
    )


# What a run trains on, and what changed since ---------------------------------------------------------------


def data_record(data: bytes | None, source: str | Path | None, tc: TrainConfig) -> dict[str, Any]:
    """What a run trains on, as saved in its training state (without its tokenizer, added once known): the
    embedded corpus or in-memory bytes by SHA-256, or a path with each file's size and modification time (the
    token cache's own test of change, so that recording costs no read of the data)."""
    if source is None:
        text = corpus.default_corpus() if data is None else data
        kind = "embedded" if data is None else "bytes"
        return {"kind": kind, "sha256": hashlib.sha256(text).hexdigest(), "bytes": len(text)}
    files = []
    for path, _ in source_files(source, fmt=cache_options(tc)["fmt"]):
        st = path.stat()
        files.append({"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return {"kind": "path", "path": str(Path(source).resolve()), "files": files}


def _describe_data(record: dict[str, Any]) -> str:
    if record["kind"] == "path":
        return f"{record['path']} ({len(record['files'])} file(s))"
    what = "the embedded corpus" if record["kind"] == "embedded" else "bytes given to train(data=...)"
    return f"{what} ({record['bytes']:,} bytes, sha256 {record['sha256'][:12]})"


def data_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """How the data ``now`` differs from the ``saved`` record (tokenizers aside); [] when it is the same."""
    if any(saved.get(key) != now.get(key) for key in ("kind", "path", "sha256")):
        return [f"saved {_describe_data(saved)}, now {_describe_data(now)}"]
    if saved["kind"] != "path":
        return []
    was = {f["path"]: f for f in saved["files"]}
    is_ = {f["path"]: f for f in now["files"]}
    changes = [f"{path} is gone" for path in sorted(was.keys() - is_.keys())]
    changes += [f"{path} is new" for path in sorted(is_.keys() - was.keys())]
    for path in was.keys() & is_.keys():
        a, b = was[path], is_[path]
        if a["size"] != b["size"]:
            changes.append(f"{path} changed size: {a['size']:,} -> {b['size']:,} bytes")
        elif a["mtime_ns"] != b["mtime_ns"]:
            changes.append(f"{path} was modified (same size, another modification time)")
    return sorted(changes)


def saved_source(saved: Saved) -> str | None:
    """The path a saved run trained on (``None``: the embedded corpus); a run on in-memory bytes is refused,
    since its state does not hold them."""
    record = saved.data
    if record["kind"] == "bytes":
        raise ResumeError(
            f"the run in {saved.path.parent} trained on bytes given to train(data=...), which its state does not "
            f"hold: give the same bytes again"
        )
    return record["path"] if record["kind"] == "path" else None


def _resumed_data_changes(saved: Saved, record: dict[str, Any], tc: TrainConfig, allow: bool) -> list[str]:
    """What differs between the data a saved run trained on and this resume's; refused unless ``allow``."""
    changes = data_changes(saved.data, record) + [
        f"train.{name}: saved {getattr(saved.train, name)!r}, now {getattr(tc, name)!r}"
        for name in DATA_FIELDS
        if getattr(saved.train, name) != getattr(tc, name)
    ]
    if changes and not allow:
        raise ResumeError(
            f"the run in {saved.path.parent} trained on other data than this resume would: {'; '.join(changes)}. "
            f"To go on as it was, resume without --data or data options; to train on this data anyway, add "
            f"--allow-new-data (allow_new_data=True; its best validation so far is then forgotten)"
        )
    return changes


# The tokenizer and the token cache ----------------------------------------------------------------------------


def prepare(
    model_config: ModelConfig,
    tc: TrainConfig,
    world: World,
    *,
    data: bytes | None = None,
    out: Path | None = None,
    saved: Saved | None = None,
    allow_new_data: bool = False,
    progress: bool = False,
) -> RunData:
    """The data of run ``tc``: in-memory ``data`` (default: the embedded corpus) or ``tc.data`` (a file or folder),
    checked against a resumed run's (``saved``; refused if it changed, unless ``allow_new_data``).

    One pipeline for all: in-memory text is written to ``CACHE_DIR/data.txt`` and read like any file (as UTF-8,
    invalid bytes becoming U+FFFD). Rank 0 builds or reuses the token cache ``out/cache/tokens.bin`` (in a
    temporary folder without ``out``: then each rank builds its own) while the others wait, then open it. With
    BPE, rank 0 first trains the tokenizer on the training texts and saves it to ``out/tokenizer.json``; a
    resumed run loads the one saved in the run it resumes instead."""
    if data is not None and tc.data is not None:
        raise ConfigError("give the training data as bytes (data) or as a path (train.data), not both")
    if model_config.vocab_size < BYTE_VOCAB:
        which = "the byte tokenizer, which needs" if tc.tokenizer == "bytes" else "a BPE tokenizer, which has"
        raise ConfigError(
            f"vocab_size={model_config.vocab_size} is too small for {which} >= {BYTE_VOCAB}"
            f"{' ids' if tc.tokenizer == 'bpe' else ''}"
        )
    record = data_record(data, tc.data, tc)
    changed = _resumed_data_changes(saved, record, tc, allow_new_data) if saved is not None else []
    temporary = tempfile.TemporaryDirectory(prefix="seqmixers-cache-") if out is None else None
    try:
        tokenizer, cache, model_config, notes = _tokenize(
            model_config, tc, world, data, out, temporary, saved, progress
        )
        if saved is not None and saved.data["tokenizer"] != tokenizer.fingerprint and not changed:
            raise ResumeError(
                f"the tokenizer of the run in {saved.path.parent} is not the one it trained with (fingerprint "
                f"{saved.data['tokenizer']!r}, now {tokenizer.fingerprint!r}): was its {TOKENIZER_FILE} replaced?"
            )
        if changed:
            notes.append(f"data changed since the saved state (--allow-new-data): {'; '.join(changed)}")
        label = f"data {tc.data!r}" if tc.data is not None else "the data"
        draw, make, val_batches = _batches(cache, tc, label)
    except BaseException:
        if temporary is not None:
            temporary.cleanup()
        raise
    record = {**record, "tokenizer": tokenizer.fingerprint}
    return RunData(draw, make, val_batches, tokenizer, model_config, record, changed, notes, temporary)


def _tokenize(
    model_config: ModelConfig,
    tc: TrainConfig,
    world: World,
    data: bytes | None,
    out: Path | None,
    temporary: tempfile.TemporaryDirectory | None,
    saved: Saved | None,
    progress: bool,
) -> tuple[Tokenizer, TokenCache, ModelConfig, list[str]]:
    """The tokenizer, the token cache (in ``out/CACHE_DIR``, shared by the ranks, or else in this rank's
    ``temporary`` folder), the model config (its vocabulary the BPE tokenizer's) and notes."""
    shared, notes = out is not None, []
    folder = out / CACHE_DIR if out is not None else Path(temporary.name)
    if tc.data is None:
        source = _write_text(corpus.default_corpus() if data is None else data, folder / "data.txt", world, shared)
    else:
        source = Path(tc.data)
    options = cache_options(tc)
    source_files(source, fmt=options["fmt"])  # FileNotFoundError for a missing path, on every rank
    if tc.tokenizer == "bpe":
        resumed = saved.path.parent if saved is not None else None
        tokenizer = _bpe(tc, source, options, out, resumed, world, shared, progress, notes)
        model_config = _bpe_vocab(model_config, tokenizer, tc, notes)
    else:
        tokenizer = ByteTokenizer()
    cache = _token_cache(source, tokenizer, options, folder / CACHE_NAME, world, shared, notes)
    return tokenizer, cache, model_config, notes


def _write_text(text: bytes, path: Path, world: World, shared: bool) -> Path:
    """In-memory ``text`` as the file ``path``, read like any other (rewritten only when it changed: an unchanged
    file keeps its cache)."""

    def write() -> None:
        if not (path.is_file() and path.stat().st_size == len(text) and path.read_bytes() == text):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text)

    on_main(world, shared, "write the data", write)
    return path


def _token_cache(
    source: Path, tokenizer: Tokenizer, options: dict, path: Path, world: World, shared: bool, notes: list[str]
) -> TokenCache:
    """The token cache of ``source`` at ``path``: built or reused by rank 0, then opened by the others."""
    build = functools.partial(build_token_cache, source, tokenizer, path, **options)
    cache = on_main(world, shared, "build the token cache", build)
    if cache is None:
        cache = open_token_cache(path)
    if world.main:
        how = "reused" if not cache.built else f"rebuilt ({cache.damaged})" if cache.damaged else "built"
        notes.append(f"token cache {how}: {path} ({len(cache):,} tokens, {cache.n_documents:,} documents)")
    return cache


def _bpe(
    tc: TrainConfig,
    source: Path,
    options: dict,
    out: Path | None,
    resumed: Path | None,
    world: World,
    shared: bool,
    progress: bool,
    notes: list[str],
) -> BPETokenizer:
    """A resumed run's saved tokenizer, or one trained (on rank 0) on ``source`` and saved to ``out``."""
    if resumed is not None:
        if not (resumed / TOKENIZER_FILE).is_file():
            raise ConfigError(
                f"the run in {resumed} trains with a BPE tokenizer, but {resumed / TOKENIZER_FILE} is missing"
            )
        tokenizer = BPETokenizer.load(resumed)
        if out is not None and world.main and resumed.resolve() != out.resolve():
            tokenizer.save(out)
        notes.append(f"BPE tokenizer: {resumed / TOKENIZER_FILE} ({tokenizer.vocab_size} ids)")
        return tokenizer

    def make() -> BPETokenizer:
        trained = BPETokenizer.train(iter_texts(source, **options), tc.bpe_vocab, show_progress=progress)
        if out is not None:
            trained.save(out)
        return trained

    tokenizer = on_main(world, shared, "train the BPE tokenizer", make)
    if tokenizer is None:
        tokenizer = BPETokenizer.load(out)
    where = f"saved to {out / TOKENIZER_FILE}" if out is not None else "not saved (no run folder)"
    notes.append(f"BPE tokenizer: trained on {source}, {tokenizer.vocab_size} ids, {where}")
    return tokenizer


def _bpe_vocab(model_config: ModelConfig, tokenizer: BPETokenizer, tc: TrainConfig, notes: list[str]) -> ModelConfig:
    """The model config with the BPE tokenizer's vocabulary: its size when the config kept the byte default."""
    V, size = model_config.vocab_size, tokenizer.vocab_size
    if V == BYTE_VOCAB and size != V:  # the byte default: the config did not choose one for BPE
        notes.append(f"vocab_size {V} -> {size}, the BPE tokenizer's size")
        return dataclasses.replace(model_config, vocab_size=size)
    if V < size:
        raise ConfigError(
            f"vocab_size={V} in the model config is smaller than the BPE tokenizer's {size} ids "
            f"(train.bpe_vocab={tc.bpe_vocab}): remove vocab_size from the config (it is then the "
            f"tokenizer's), set it to {size} or more, or lower bpe_vocab"
        )
    if V > size:
        notes.append(f"vocab_size {V} (the config's; the BPE tokenizer uses the first {size} ids)")
    return model_config


# Batches ------------------------------------------------------------------------------------------------------


def _batches(
    cache: TokenCache, tc: TrainConfig, label: str = "the data"
) -> tuple[Callable[[torch.Generator], Any], Callable[[Any], tuple], list]:
    """``(draw, make, val_batches)`` from a memory-mapped token cache (see the module's docstring); each batch
    reads only the tokens it needs.

    ``documents="none"``: random windows ``[B, T]`` (no ``cu_seqlens``) of the tokens but the last
    ``int(N * val_fraction)``, held out, and fixed windows spread over those. Otherwise the last ``val_fraction``
    of the documents is held out; a training row starts at a random token (``TokenCache.random_positions``) and
    packs the rest of its document, then the documents after it, by ``pack_documents``'s rules; validation takes
    rows at positions spread evenly over the held-out documents (``TokenCache.fixed_packed``). Packed batches are
    flattened into one row ``[1, B*T]`` with its ``cu_seqlens``.
    """
    if tc.documents == "none":
        check_corpus_size(len(cache), tc, label, "tokens")
        train_part, val_part = cache.split(tc.val_fraction, by="tokens")

        def starts(gen: torch.Generator) -> torch.Tensor:
            return train_part.random_window_starts(tc.batch_size, tc.seq_len, gen)

        def windows(picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, int]:
            x, y = train_part.windows_at(picked, tc.seq_len)
            return x, y, None, x.numel()

        return starts, windows, val_part.fixed_windows(tc.batch_size, tc.seq_len, tc.eval_batches)
    usable = _documents_with_a_target(cache)
    if usable >= 2:
        train_part, val_part = cache.split(tc.val_fraction)
    if usable < 2 or not _documents_with_a_target(train_part) or not _documents_with_a_target(val_part):
        raise corpus.DocumentError(
            f"the data holds {usable} document(s) of 2 or more tokens; training and validation need at least one "
            f"each: give more documents"
        )

    def pick(gen: torch.Generator) -> torch.Tensor:
        return train_part.random_positions(tc.batch_size, gen)

    def rows(picked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        packed = train_part.rows_at(picked, tc.seq_len)
        x, y, cu_seqlens = packed.batch(torch.arange(len(packed)))
        return x, y, cu_seqlens, int(packed.n_real.sum())

    return pick, rows, val_part.fixed_packed(tc.batch_size, tc.seq_len, tc.eval_batches)


def _documents_with_a_target(part: TokenCache) -> int:
    """How many documents of ``part`` have 2 or more tokens (something to predict)."""
    return int((torch.diff(part.doc_starts, append=torch.tensor([len(part)])) >= 2).sum())
