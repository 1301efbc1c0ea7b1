"""Model and training configs: dataclasses loadable from TOML, YAML, JSON, a dict or keyword arguments.

A config is pure data: every field's type and range, and the shape of the layer pattern, are checked when
the object is made, without loading any plugin (so a checkpoint's header can be read where its mixers are
not installed). What needs the registry (the mixer names, their options, the backend names) is checked
by ``ModelConfig.check_against_registry()``, which ``build_model`` calls; ``load_run_config`` calls it
too, so a run file's errors name the file. Either way an error names the field, what it allows and what it
got. The layer pattern is expanded into one validated per-layer spec (``ModelConfig.layer_specs()``), so
a hybrid is just a list, and any registered mixer, a plugin's included, is a valid layer by name.

A run file (``seqmixers train --config FILE``) holds a ``[model]`` and a ``[train]`` section; a file or
dict without sections is read as a model config alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import inspect
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixers.functional import MODES
from mixers.registry import Registry, get_registry

FFNS = ("gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
INITS = ("scaled", "gpt2")
LAYER_KEYS = ("mixer", "backend", "ffn_dim")  # the keys of a layer table that are not mixer options
SUFFIXES = (".toml", ".yaml", ".yml", ".json")
SECTIONS = ("model", "train")


class ConfigError(ValueError):
    """An invalid config field; the message names the field, the allowed values and the value given."""


class UnknownFieldError(ConfigError, TypeError):
    """A keyword argument that is not a field (``ModelConfig(d_modle=64)``): a ``TypeError``, as for any
    function, and a ``ConfigError`` that suggests the closest field."""


def _got(value: object) -> str:
    return f"{value!r} ({type(value).__name__})"


def _int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int >= {minimum}, got {_got(value)}")
    if value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _float(name: str, value: object, lo: float, hi: float, *, hi_open: bool = False, lo_open: bool = False) -> float:
    hint = ""
    if isinstance(value, str) and _parses_as_float(value):
        hint = " (a number in quotes? YAML also reads 3e-3 as a string: write 3.0e-3)"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {_got(value)}{hint}")
    left, right = "(" if lo_open else "[", ")" if hi_open else "]"
    if value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi):
        raise ConfigError(f"{name} must be in {left}{lo}, {hi}{right}, got {value}")
    return float(value)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {_got(value)}")
    return value


def _choice(name: str, value: object, choices: tuple) -> Any:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {_got(value)}")
    return value


def _str(name: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, got {_got(value)}")
    return value


def _unknown_key(kind: str, key: object, allowed: list[str], error: type[ConfigError] = ConfigError) -> ConfigError:
    close = difflib.get_close_matches(str(key), allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return error(f"unknown {kind} {key!r}{hint}; allowed: {allowed}")


def _suggest_fields(kind: str) -> Any:
    """A class decorator (outside ``@dataclass``): an unknown keyword argument raises ``UnknownFieldError``
    naming the closest field, as an unknown key in a config file does."""

    def decorate(cls: type) -> type:
        init = cls.__init__
        names = [f.name for f in dataclasses.fields(cls)]

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for key in kwargs:
                if key not in names:
                    raise _unknown_key(kind, key, names, UnknownFieldError)
            init(self, *args, **kwargs)

        cls.__init__ = __init__
        return cls

    return decorate


def registered_mixers(registry: Registry | None = None) -> str:
    """The registered mixer names, with the plugin of those that do not come with seqmixers."""
    names = []
    for name, spec in sorted((registry or get_registry()).mixers.items()):
        names.append(name if spec.plugin.startswith("mixers.") else f"{name} (plugin {spec.plugin})")
    return ", ".join(names)


def _registered_hint() -> str:
    """``"; registered mixers: ..."`` for a structural error's message, or nothing if the plugins cannot be
    loaded: a config is data, and saying what is wrong with it must not depend on the plugins."""
    try:
        return f"; registered mixers: {registered_mixers()}"
    except Exception:
        return ""


def mixer_parameters(name: str, registry: Registry | None = None) -> list[str] | None:
    """The keyword options the mixer ``name``'s factory accepts, or ``None`` if it takes any (``**kwargs``)."""
    factory = (registry or get_registry()).mixers[name].factory
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin or C factory: its options are checked when it is built
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    # the first positional parameter is d_model, which the model passes itself
    return [p.name for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _check_mixer_type(where: str, name: object) -> str:
    """A mixer name is a string (whether a plugin provides it is checked against the registry, at build)."""
    if not isinstance(name, str):
        raise ConfigError(f"{where}: unknown mixer {name!r}{_registered_hint()}")
    return name


def _check_mixer_name(where: str, name: str, registry: Registry) -> str:
    if name not in registry.mixers:
        raise ConfigError(f"{where}: unknown mixer {name!r}; registered mixers: {registered_mixers(registry)}")
    return name


def _check_backend(where: str, mixer: str, backend: object, registry: Registry) -> None:
    """``backend`` must be ``"auto"`` or a backend registered for each of the mixer's ops."""
    try:
        registry.check_backend_name(registry.mixers[mixer].ops, backend, f"mixer {mixer!r}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc} (see python -m mixers list)") from None


def _check_options_table(where: str, mixer: str, options: object) -> dict[str, Any]:
    """The structural checks of a mixer's options: a table, without ``d_model``; a plain copy."""
    if not isinstance(options, Mapping):
        raise ConfigError(f"{where} must be a table of options for mixer {mixer!r}, got {_got(options)}")
    if "d_model" in options:
        raise ConfigError(f"{where}.d_model: set d_model at the top level of the model config, not per mixer")
    return _plain(options)


def _check_options(where: str, mixer: str, options: Mapping[str, Any], registry: Registry) -> None:
    """Each option must be one that the mixer's factory accepts."""
    allowed = mixer_parameters(mixer, registry)
    if allowed is None:
        return
    for key in options:
        if key not in allowed:
            raise _unknown_key(f"option of mixer {mixer!r} in {where}:", key, allowed)


def _plain(table: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with tuples as lists, so that a config equals itself after a trip through JSON/TOML/YAML."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in table.items()}


@dataclass(frozen=True)
class LayerSpec:
    """One layer, fully resolved: the mixer's name, the options it is built with, and the FFN width."""

    mixer: str
    options: dict[str, Any]
    ffn_dim: int


@_suggest_fields("model config field")
@dataclass
class ModelConfig:
    """A language model: embedding, ``n_layers`` blocks ``x + mixer(norm(x))``, ``x + ffn(norm(x))``, LM head.

    Arguments:
        vocab_size: number of token ids (256 for the byte tokenizer).
        d_model: model width.
        n_layers: number of blocks.
        layers: the layer pattern, repeated to ``n_layers`` (its length must divide ``n_layers``), or one
            entry per layer. An entry is a mixer name (``"retention"``) or a table
            ``{mixer = "retention", backend = "torch", ffn_dim = 256, <mixer options>...}``.
        mixer_options: options per mixer name, e.g. ``{"retention": {"num_heads": 4}}``; a layer table's
            options override them.
        backend: the backend of every mixer's op (``"auto"`` picks the best available); overridable in
            ``mixer_options`` or per layer.
        ffn: ``"gelu"`` (the paper's MLP, with biases) or ``"swiglu"`` (no biases).
        ffn_dim: hidden width of the FFN; default ``4 * d_model`` for gelu and about ``8/3 * d_model``
            (a multiple of 8) for swiglu, which gives both the same parameter count.
        norm: ``"layernorm"`` or ``"rmsnorm"``, for the pre-norms and the final norm; ``norm_eps``.
        dropout: on the embedding and on each residual branch, during training.
        tie_embeddings: share the embedding matrix with the LM head (default: no; untied heads learn
            associative recall far faster at small sizes, see docs/learning.md; LLaMA and the official
            RetNet code do not tie either).
        init: how the embedding and LM head start (the FFNs start as in GPT-2 either way, and each mixer
            initialises itself). ``"scaled"`` (default): both N(0, 1/d_model), and the embedding's output
            is multiplied by ``embed_scale`` = sqrt(d_model), so the residual stream starts with
            unit-variance token identity and the logits with unit variance, tied or not (the official
            RetNet code, T5 and Gemma do this). ``"gpt2"``: both N(0, 0.02) and no scaling (seqmixers'
            default before 0.2): the token signal is then several times smaller than the mixers' outputs
            at small widths, and models learn recall much more slowly (docs/learning.md has the evidence).
        embed_scale: the factor on the embedding's output; ``None``: sqrt(d_model) for ``init="scaled"``,
            1 for ``init="gpt2"``.
        chunk_size: chunk size of ``mode="chunkwise"`` when a call gives none (``None``: each mixer's default).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    layers: list[str | dict[str, Any]] = field(default_factory=lambda: ["retention"])
    mixer_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    backend: str = "auto"
    ffn: str = "gelu"
    ffn_dim: int | None = None
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False
    init: str = "scaled"
    embed_scale: float | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        _int("vocab_size", self.vocab_size, 1)
        _int("d_model", self.d_model, 1)
        _int("n_layers", self.n_layers, 1)
        _str("backend", self.backend)
        _choice("ffn", self.ffn, FFNS)
        if self.ffn_dim is not None:
            _int("ffn_dim", self.ffn_dim, 1)
        _choice("norm", self.norm, NORMS)
        _float("norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True)
        _float("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        _bool("tie_embeddings", self.tie_embeddings)
        _choice("init", self.init, INITS)
        if self.embed_scale is not None:
            _float("embed_scale", self.embed_scale, 0.0, 1e6, lo_open=True)
        if self.chunk_size is not None:
            _int("chunk_size", self.chunk_size, 1)
        if not isinstance(self.mixer_options, Mapping):
            raise ConfigError(f"mixer_options must be a table mixer name -> options, got {_got(self.mixer_options)}")
        self.mixer_options = {
            _check_mixer_type(f"mixer_options.{name}", name): _check_options_table(
                f"mixer_options.{name}", name, options
            )
            for name, options in self.mixer_options.items()
        }
        self.layers = self._check_layers(self.layers)
        # No registry here: the mixer names, their options and the backends are checked by
        # check_against_registry(), when a model is built.

    def _check_layers(self, layers: object) -> list[str | dict[str, Any]]:
        if isinstance(layers, (str, Mapping)):
            layers = [layers]  # one mixer for every layer
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ConfigError(
                f"layers must be a non-empty list of mixer names or layer tables, got {_got(layers)}"
                f"{_registered_hint()}"
            )
        if len(layers) > self.n_layers or self.n_layers % len(layers):
            raise ConfigError(
                f"layers has {len(layers)} entries, which does not divide n_layers={self.n_layers}: give a "
                f"pattern whose length divides n_layers (it is repeated), or one entry per layer"
            )
        out: list[str | dict[str, Any]] = []
        for i, entry in enumerate(layers):
            where = f"layers[{i}]"
            if isinstance(entry, str):
                out.append(entry)
                continue
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{where} must be a mixer name or a table with a 'mixer' key, got {_got(entry)}")
            if "mixer" not in entry:
                raise ConfigError(f"{where} is a table without a 'mixer' key{_registered_hint()}")
            mixer = _check_mixer_type(f"{where}.mixer", entry["mixer"])
            if "backend" in entry:
                _str(f"{where}.backend", entry["backend"])
            if "ffn_dim" in entry:
                _int(f"{where}.ffn_dim", entry["ffn_dim"], 1)
            _check_options_table(where, mixer, {k: v for k, v in entry.items() if k not in LAYER_KEYS})
            out.append(_plain(entry))
        return out

    def check_against_registry(self, registry: Registry | None = None) -> None:
        """Raise ``ConfigError`` unless every mixer is registered, takes the options given to it, and each
        backend named is registered for its ops (``"auto"`` always is). ``registry``: the process-wide one
        by default, loaded (with every plugin) on first use.

        Making a config checks only what needs no plugin; ``build_model`` (and ``load``, ``load_run_config``)
        call this. Whether a registered backend can run on this machine is ``check_backends``."""
        self.layer_specs(registry)

    @property
    def embedding_scale(self) -> float:
        """The factor applied to the embedding's output (``embed_scale``, or the ``init``'s default)."""
        if self.embed_scale is not None:
            return float(self.embed_scale)
        return math.sqrt(self.d_model) if self.init == "scaled" else 1.0

    @property
    def default_ffn_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        if self.ffn == "gelu":
            return 4 * self.d_model
        return 8 * math.ceil(8 * self.d_model / 3 / 8)

    def layer_specs(self, registry: Registry | None = None) -> list[LayerSpec]:
        """One resolved spec per layer: the pattern repeated to ``n_layers``, options merged (layer wins).

        Resolving needs the registry (which mixers take a ``backend`` option), so this checks the config
        against it first, as ``check_against_registry`` does."""
        registry = registry or get_registry()
        for name, options in self.mixer_options.items():
            _check_mixer_name(f"mixer_options.{name}", name, registry)
            _check_options(f"mixer_options.{name}", name, options, registry)
        for i, entry in enumerate(self.layers):
            where = f"layers[{i}]"
            if isinstance(entry, str):
                _check_mixer_name(where, entry, registry)
                continue
            mixer = _check_mixer_name(f"{where}.mixer", entry["mixer"], registry)
            _check_options(where, mixer, {k: v for k, v in entry.items() if k not in LAYER_KEYS}, registry)
        specs = []
        for i in range(self.n_layers):
            entry = self.layers[i % len(self.layers)]
            table = {"mixer": entry} if isinstance(entry, str) else entry
            mixer = table["mixer"]
            options = dict(self.mixer_options.get(mixer, {}))
            options.update({k: v for k, v in table.items() if k not in ("mixer", "ffn_dim")})
            accepted = mixer_parameters(mixer, registry)
            if "backend" in table:
                where = f"layers[{i % len(self.layers)}].backend"
            elif "backend" in options:
                where = f"mixer_options.{mixer}.backend"
            else:
                where = "backend"
                if accepted is None or "backend" in accepted:
                    options["backend"] = self.backend
                elif self.backend != "auto":
                    raise ConfigError(f"backend={self.backend!r}: mixer {mixer!r} (layer {i}) takes no backend option")
            if "backend" in options:
                _check_backend(where, mixer, options["backend"], registry)
            specs.append(LayerSpec(mixer, options, table.get("ffn_dim", self.default_ffn_dim)))
        return specs

    def check_backends(self, device: Any = "cpu") -> None:
        """Raise ``ConfigError`` if a layer names a backend (not ``"auto"``) that cannot run here: not available
        on this machine (its library or driver is missing), or not made for ``device``'s type.

        A config is valid wherever it is written (it may name a GPU backend on a CPU-only machine); this is
        the check for running it, which the ``seqmixers`` command makes before it builds a model."""
        registry = get_registry()
        device_type = device if isinstance(device, str) else device.type
        device_type = device_type.split(":")[0]

        def problem(backend: Any) -> str | None:
            reason = registry.unavailable_reason(backend)
            if reason is None and backend.devices is not None and device_type not in backend.devices:
                reason = f"it runs on {sorted(backend.devices)} devices, not {device_type!r}"
            return reason

        for i, spec in enumerate(self.layer_specs()):
            name = spec.options.get("backend", "auto")
            if name == "auto":
                continue
            for op in registry.mixers[spec.mixer].ops:
                reason = problem(registry.backends[op][name])
                if reason is not None:
                    usable = sorted(n for n, b in registry.backends[op].items() if problem(b) is None)
                    raise ConfigError(
                        f"layers[{i}] ({spec.mixer}): backend {name!r} is unavailable here: {reason}; use backend "
                        f"'auto' or one of {usable} (seqmixers list shows every backend)"
                    )

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON/TOML-able) that ``ModelConfig.from_dict`` turns back into an equal config."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """From a dict of fields; an unknown key is an error that suggests the closest field. Data only: no
        plugin is loaded (``check_against_registry`` checks the mixers)."""
        return _from_mapping(cls, data, "model config field")

    @classmethod
    def from_file(cls, path: str | Path, *, check_registry: bool = True) -> ModelConfig:
        """From a TOML, YAML or JSON file: its ``[model]`` section, or the whole file if it has no sections;
        checked against the registry unless ``check_registry=False`` (see ``load_run_config``)."""
        return load_run_config(path, check_registry=check_registry)[0]

    def describe(self) -> str:
        """One line per layer: index, mixer, options, FFN."""
        lines = [
            f"{self.n_layers} layers, d_model={self.d_model}, vocab_size={self.vocab_size}, "
            f"ffn={self.ffn}, norm={self.norm}, tie_embeddings={self.tie_embeddings}, init={self.init}, "
            f"embed_scale={self.embedding_scale:g}"
        ]
        for i, spec in enumerate(self.layer_specs()):
            opts = ", ".join(f"{k}={v!r}" for k, v in spec.options.items())
            lines.append(f"  layer {i}: {spec.mixer}({opts}), {self.ffn} FFN {spec.ffn_dim}")
        return "\n".join(lines)


@_suggest_fields("train config field")
@dataclass
class TrainConfig:
    """A training run on a corpus: the embedded default, or text files, a folder of them or JSONL, tokenized as
    bytes or with a BPE tokenizer trained on the data (``tokenizer``).

    Arguments:
        steps: optimizer steps. batch_size, seq_len: sequences of ``seq_len`` tokens per step.
        lr: peak learning rate (AdamW), reached after ``warmup_steps`` and cosine-decayed to
            ``min_lr_ratio * lr``; weight_decay (on matrices only), beta1, beta2, grad_clip (0: none).
        mode: the representation used for training, ``"parallel"`` or ``"chunkwise"`` (``chunk_size``).
        eval_every: steps between validation runs (and checkpoints); eval_batches: validation batches.
        val_fraction: the share of the corpus held out (its end) for validation.
        seed: seeds the weights, the batches and the sample.
        sample_prompt, sample_tokens, temperature, top_k: the sample generated at the end.
        documents: ``"none"`` trains on random windows of the whole corpus; ``"separator"`` (documents between
            occurrences of ``separator``), ``"lines"`` (one per line) or ``"jsonl"`` (one JSON object per line,
            the document in its string field ``jsonl_field``) train on documents packed into rows of
            ``seq_len`` tokens, with nothing crossing a document (``models.data.pack_documents``); the last
            ``val_fraction`` of the documents is held out.
        precision: ``"fp32"``, or ``"bf16"`` (autocast; under FSDP a mixed-precision policy: bf16 parameters
            in the passes, fp32 gradient reduction); the loss and the optimizer stay fp32.
        accumulate: micro-batches per optimizer step (``batch_size`` rows in all, over all ranks); the loss
            is normalised by the counted targets of the whole step, not averaged per micro-batch.
        checkpoint_activations: recompute each block's activations in the backward pass instead of keeping
            them (less memory, about a third more compute).
        save_every: steps between saves of the whole training state (``OUT/train_state``, for ``--resume``);
            0: only when the run is interrupted.
        log_every: steps between lines of the run log ``OUT/log.jsonl`` (loss, lr, tokens/s, gradient norm,
            memory; and every validation), written by rank 0.
        tokenizer: ``"bytes"`` (UTF-8 bytes, vocabulary 256; the model's ``vocab_size`` must be at least 256) or
            ``"bpe"``: a byte-level BPE tokenizer (``models.corpus.BPETokenizer``, needs the ``tokenizers``
            library) trained on the training data before the run, saved to ``OUT/tokenizer.json`` beside the
            checkpoints and reused by a resumed run. Its vocabulary is at most ``bpe_vocab`` ids (fewer when the
            data runs out of pairs to merge); the model's ``vocab_size`` must be at least the tokenizer's size, and
            is then set to it exactly. See docs/training-data.md.
        bpe_vocab: the most ids the BPE tokenizer learns (>= 256: the bytes come first).
    """

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    mode: str = "parallel"
    chunk_size: int | None = None
    eval_every: int = 50
    eval_batches: int = 8
    val_fraction: float = 0.1
    seed: int = 0
    sample_prompt: str = "The "
    sample_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = None
    documents: str = "none"
    separator: str = "\n\n"
    jsonl_field: str = "text"
    precision: str = "fp32"
    accumulate: int = 1
    checkpoint_activations: bool = False
    save_every: int = 0
    log_every: int = 10
    tokenizer: str = "bytes"
    bpe_vocab: int = 4096

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
            _int(name, getattr(self, name), 1)
        for name in ("warmup_steps", "sample_tokens", "seed"):
            _int(name, getattr(self, name), 0)
        _float("lr", self.lr, 0.0, 10.0, lo_open=True)
        _float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _float("weight_decay", self.weight_decay, 0.0, 10.0)
        _float("beta1", self.beta1, 0.0, 1.0, hi_open=True)
        _float("beta2", self.beta2, 0.0, 1.0, hi_open=True)
        _float("grad_clip", self.grad_clip, 0.0, math.inf)
        _choice("mode", self.mode, tuple(m for m in MODES if m != "recurrent"))
        if self.chunk_size is not None:
            _int("chunk_size", self.chunk_size, 1)
        _float("val_fraction", self.val_fraction, 0.0, 0.5, lo_open=True)
        if not isinstance(self.sample_prompt, str):
            raise ConfigError(f"sample_prompt must be a string, got {_got(self.sample_prompt)}")
        _float("temperature", self.temperature, 0.0, 100.0)
        if self.top_k is not None:
            _int("top_k", self.top_k, 1)
        _choice("documents", self.documents, ("none", "separator", "lines", "jsonl"))
        _choice("precision", self.precision, ("fp32", "bf16"))
        _int("accumulate", self.accumulate, 1)
        _bool("checkpoint_activations", self.checkpoint_activations)
        _int("save_every", self.save_every, 0)
        _int("log_every", self.log_every, 1)
        _str("separator", self.separator)
        _str("jsonl_field", self.jsonl_field)
        _choice("tokenizer", self.tokenizer, ("bytes", "bpe"))
        _int("bpe_vocab", self.bpe_vocab, 256)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        return _from_mapping(cls, data, "train config field")


def _from_mapping(cls: type, data: Mapping[str, Any], kind: str) -> Any:
    if not isinstance(data, Mapping):
        raise ConfigError(f"a {cls.__name__} must be built from a table of fields, got {_got(data)}")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise _unknown_key(kind, key, names)
    return cls(**data)


def read_document(path: str | Path) -> dict[str, Any]:
    """Parse a TOML, YAML or JSON file (by suffix) into a dict; parse errors name the file."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"config file {str(path)!r}: unknown suffix {path.suffix!r}; expected one of {SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"(line {line}); save it as UTF-8"
        ) from None
    try:
        if not text.strip():
            doc = None
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            doc = tomllib.loads(text)
        elif path.suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as exc:  # each parser has its own error class; the message is what matters
        raise ConfigError(f"could not parse config file {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    if doc is None or doc == {}:  # no text, an empty table, or a YAML file of comments
        raise ConfigError(
            f"config file {str(path)!r} is empty: expected a [model] section (and optionally a [train] section), "
            f"or the fields of a model config"
        )
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a table of fields, got {type(doc).__name__}")
    return doc


def _unknown_section(source: str, key: object) -> ConfigError:
    close = difflib.get_close_matches(str(key), SECTIONS, n=1)
    hint = f" (did you mean [{close[0]}]?)" if close else ""
    return ConfigError(f"{source}: unknown section [{key}]{hint}; a run file holds a [model] and a [train] section")


def split_run_config(
    doc: Mapping[str, Any], source: str = "config", *, check_registry: bool = True
) -> tuple[ModelConfig, TrainConfig]:
    """A ``{"model": ..., "train": ...}`` document, or a bare model config, into the two configs.

    A run file is read to be run, so its model config is also checked against the registry
    (``ModelConfig.check_against_registry``), and an unknown mixer, option or backend is named with
    ``source``; ``check_registry=False`` reads it as data only, without loading any plugin."""
    if not any(key in doc for key in SECTIONS):
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        for key, value in doc.items():  # a misspelt section, [modle], is not a bare model config's odd field
            if key not in fields and isinstance(value, Mapping) and difflib.get_close_matches(str(key), SECTIONS, n=1):
                raise _unknown_section(source, key)
        try:
            model = ModelConfig.from_dict(doc)
            if check_registry:
                model.check_against_registry()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        return model, TrainConfig()
    for key in doc:
        if key not in SECTIONS:
            raise _unknown_section(source, key)
    try:
        model = ModelConfig.from_dict(doc.get("model", {}))
        if check_registry:
            model.check_against_registry()
    except ConfigError as exc:
        raise ConfigError(f"{source} [model]: {exc}") from exc
    try:
        train = TrainConfig.from_dict(doc.get("train", {}))
    except ConfigError as exc:
        raise ConfigError(f"{source} [train]: {exc}") from exc
    return model, train


def load_run_config(path: str | Path, *, check_registry: bool = True) -> tuple[ModelConfig, TrainConfig]:
    """The model and training configs of a run file (a missing ``[train]`` section gives the defaults);
    see ``split_run_config`` for ``check_registry``."""
    return split_run_config(read_document(path), source=f"config file {str(path)!r}", check_registry=check_registry)


def presets() -> dict[str, Path]:
    """The shipped presets (``models/configs/*.toml``): name -> path."""
    root = Path(str(importlib.resources.files("models") / "configs"))
    return {p.stem: p for p in sorted(root.glob("*.toml"))}


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file path, or the path of the preset of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = presets()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a file nor a preset; presets: {sorted(shipped)}")


def as_model_config(config: ModelConfig | Mapping[str, Any]) -> ModelConfig:
    """Accept a ``ModelConfig`` or a dict of its fields."""
    if isinstance(config, ModelConfig):
        return config
    return ModelConfig.from_dict(config)
