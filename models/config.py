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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from mixers.registry import Registry


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


def _registry() -> Registry:
    """The registry of mixers, imported when first needed: a config is data, and reading one (the ``seqmixers``
    command's parser reads ``TrainConfig``'s fields) must not import torch."""
    from mixers.registry import get_registry

    return get_registry()


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
    for name, spec in sorted((registry or _registry()).mixers.items()):
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
    factory = (registry or _registry()).mixers[name].factory
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
        registry = registry or _registry()
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
        registry = _registry()
        for i, spec in enumerate(self.layer_specs()):
            name = spec.options.get("backend", "auto")
            if name == "auto":
                continue
            for op in registry.mixers[spec.mixer].ops:
                reason = registry.cannot_run(registry.backends[op][name], device)
                if reason is not None:
                    usable = sorted(
                        n for n, b in registry.backends[op].items() if registry.cannot_run(b, device) is None
                    )
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


TRAIN_MODES = ("parallel", "chunkwise")  # the modes of mixers.functional.MODES that train (recurrent decodes)
PARALLEL = ("none", "ddp", "fsdp")
DOCUMENTS = ("none", "separator", "lines", "jsonl")
PRECISIONS = ("fp32", "bf16")
TOKENIZERS = ("bytes", "bpe")


def _setting(default: Any, help: str, check: Any, *, choices: tuple = ()) -> Any:
    """A ``TrainConfig`` field: its default, what it does (the help of ``seqmixers train --NAME``, which overrides
    it), and ``check(name, value)``, which raises ``ConfigError`` for a value it does not allow."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices})


def _at_least(minimum: int, optional: bool = False) -> Any:
    return lambda name, value: None if optional and value is None else _int(name, value, minimum)


def _within(lo: float, hi: float, **ends: bool) -> Any:
    return lambda name, value: _float(name, value, lo, hi, **ends)


def _one_of(choices: tuple) -> Any:
    return lambda name, value: _choice(name, value, choices)


def _text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {_got(value)}")


def _path_or_none(name: str, value: object) -> None:
    if value is not None:
        _str(name, value)


@_suggest_fields("train config field")
@dataclass
class TrainConfig:
    """Every setting that decides a training run: the optimisation, the data and its tokenizer, the processes that
    share the run. A resumed run restores it; each field is also the ``seqmixers train --NAME`` option that
    overrides it (its help says what the field does). Checked when made, field by field.

    The data is the embedded corpus, or ``data``: a text file, a folder of text and JSONL files, or a JSONL file
    (a ``Path`` is kept as a ``str``). ``documents="none"`` trains on random windows of the whole corpus; the
    other choices train on documents packed into rows of ``seq_len`` tokens, nothing crossing a document
    (``models.training.data.pack_documents``), and hold out the last ``val_fraction`` of the documents. With
    ``tokenizer="bpe"``, a byte-level BPE tokenizer (``models.training.tokenizers.BPETokenizer``, needs the
    ``tokenizers`` library) is trained on the training data before the run, saved to ``OUT/tokenizer.json`` and
    reused by a resumed run; the model's ``vocab_size`` must be at least its size, and is set to it exactly when
    the model config keeps the byte default. See docs/training-data.md and docs/distributed.md.
    """

    steps: int = _setting(300, "optimizer steps", _at_least(1))
    batch_size: int = _setting(16, "rows per optimizer step, over all ranks and micro-batches", _at_least(1))
    seq_len: int = _setting(128, "tokens per row", _at_least(1))
    lr: float = _setting(3e-3, "peak learning rate (AdamW)", _within(0.0, 10.0, lo_open=True))
    min_lr_ratio: float = _setting(0.1, "the cosine decay ends at min_lr_ratio * lr", _within(0.0, 1.0))
    warmup_steps: int = _setting(20, "steps of linear warm-up to lr", _at_least(0))
    weight_decay: float = _setting(0.1, "AdamW weight decay, on matrices only", _within(0.0, 10.0))
    beta1: float = _setting(0.9, "AdamW beta1", _within(0.0, 1.0, hi_open=True))
    beta2: float = _setting(0.99, "AdamW beta2", _within(0.0, 1.0, hi_open=True))
    grad_clip: float = _setting(1.0, "the most gradient norm (0: no clipping)", _within(0.0, math.inf))
    mode: str = _setting("parallel", "the representation trained", _one_of(TRAIN_MODES), choices=TRAIN_MODES)
    chunk_size: int | None = _setting(None, "the chunk size of mode chunkwise", _at_least(1, optional=True))
    eval_every: int = _setting(50, "steps between validations (and checkpoints)", _at_least(1))
    eval_batches: int = _setting(8, "fixed batches per validation", _at_least(1))
    val_fraction: float = _setting(0.1, "the held-out end of the data", _within(0.0, 0.5, lo_open=True))
    seed: int = _setting(0, "seeds the weights, the batches and the sample", _at_least(0))
    sample_prompt: str = _setting("The ", "the prompt of the sample generated at the end", _text)
    sample_tokens: int = _setting(200, "tokens of the sample (0: none)", _at_least(0))
    temperature: float = _setting(0.8, "the sample's temperature (0: greedy)", _within(0.0, 100.0))
    top_k: int | None = _setting(None, "the sample draws from the top_k most likely tokens", _at_least(1, True))
    data: str | None = _setting(
        None,
        "a text file, a JSONL file or a folder of them to train on, streamed from disk into a memory-mapped "
        "token cache OUT/cache/ (none: the embedded pydoc corpus)",
        _path_or_none,
    )
    documents: str = _setting(
        "none",
        "train on random windows of the whole text (none), or on documents packed into rows, split on "
        "separator, one per line, or one JSON object per line (its jsonl_field)",
        _one_of(DOCUMENTS),
        choices=DOCUMENTS,
    )
    separator: str = _setting("\n\n", "what separates documents, with documents separator", _str)
    jsonl_field: str = _setting("text", "the string field of a JSONL record that holds its document", _str)
    precision: str = _setting(
        "fp32",
        "bf16: autocast (under FSDP a mixed-precision policy: bf16 parameters in the passes, fp32 gradient "
        "reduction); the loss and the optimizer stay fp32",
        _one_of(PRECISIONS),
        choices=PRECISIONS,
    )
    accumulate: int = _setting(
        1, "micro-batches per optimizer step (the loss is normalised over the whole step's targets)", _at_least(1)
    )
    checkpoint_activations: bool = _setting(
        False, "recompute each block's activations in the backward pass (less memory, more compute)", _bool
    )
    parallel: str = _setting(
        "none",
        "data parallelism over the processes torchrun starts: DDP, or FSDP2 (sharded parameters, gradients "
        "and optimizer state); run as: torchrun --nproc_per_node N -m models.cli train --parallel ddp ...",
        _one_of(PARALLEL),
        choices=PARALLEL,
    )
    context_parallel: int = _setting(
        1,
        "split every sequence's time over N ranks (N = the number of torchrun processes; retention, linear "
        "and softmax attention; see docs/distributed.md; 1: none)",
        _at_least(1),
    )
    save_every: int = _setting(
        0, "steps between saves of the whole training state OUT/train_state (0: when interrupted)", _at_least(0)
    )
    log_every: int = _setting(10, "steps between lines of the run log OUT/log.jsonl", _at_least(1))
    tokenizer: str = _setting(
        "bytes",
        "UTF-8 bytes (vocabulary 256), or a BPE tokenizer trained on the data and saved to "
        "OUT/tokenizer.json (needs the tokenizers library; the model's vocab_size becomes its size unless "
        "the config sets another)",
        _one_of(TOKENIZERS),
        choices=TOKENIZERS,
    )
    bpe_vocab: int = _setting(4096, "the most BPE token ids (the bytes come first)", _at_least(256))

    def __post_init__(self) -> None:
        if isinstance(self.data, Path):
            self.data = str(self.data)
        for f in dataclasses.fields(self):
            f.metadata["check"](f.name, getattr(self, f.name))

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
