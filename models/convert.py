"""Converters between our RetNet and the two public implementations, both ways.

- torchscale (the official RetNet code): ``RetNetDecoder``'s state dict and its ``RetNetConfig`` (or the dict of
  its fields, as a fairseq ``retnet_base``-style run holds them): ``from_torchscale`` / ``to_torchscale``.
- flash-linear-attention (fla): ``RetNetForCausalLM``'s state dict and ``fla.models.RetNetConfig`` (or its dict,
  or a folder written by its ``save_pretrained``), the layout of the fla-hub RetNet checkpoints: ``from_fla`` /
  ``to_fla``.

Neither library is imported here: their configs are read as objects or dicts. A conversion first turns the source
config into a ``ModelConfig`` that computes what the source computes (or raises ``ConvertError`` naming the option
it cannot express), builds that model, and checks the state dict against the exact names and shapes the model
needs before copying anything: a foreign, incomplete or oversized state dict raises naming the keys, never loads
in part. docs/convert.md maps each convention.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mixers.retention import MultiScaleRetention, default_gammas
from models.config import ConfigError, ModelConfig
from models.lm import LanguageModel, build_model

FORMATS = ("torchscale", "fla")

__all__ = [
    "FORMATS",
    "ConvertError",
    "convert_file",
    "export_file",
    "fla_model_config",
    "from_fla",
    "from_torchscale",
    "read_fla_folder",
    "to_fla",
    "to_torchscale",
    "torchscale_model_config",
]


class ConvertError(ConfigError):
    """A source that cannot be converted: the message names the key or option and what was expected."""


# RetNetConfig's defaults (torchscale 0.3.0) for the fields a conversion reads: a dict may leave any of them out.
TORCHSCALE_DEFAULTS: dict[str, Any] = {
    "vocab_size": -1,
    "decoder_embed_dim": 768,
    "decoder_value_embed_dim": 1280,
    "decoder_retention_heads": 3,
    "decoder_ffn_embed_dim": 1280,
    "decoder_layers": 12,
    "decoder_normalize_before": True,
    "activation_fn": "gelu",
    "dropout": 0.0,
    "no_scale_embedding": True,
    "layernorm_embedding": False,
    "moe_freq": 0,
    "use_xmoe": False,
    "deepnorm": False,
    "subln": True,
    "multiway": False,
    "share_decoder_input_output_embed": False,
    "no_output_layer": False,
    "layernorm_eps": 1e-6,
    "recurrent_chunk_size": 512,
}

# fla.models.RetNetConfig's defaults (fla 0.6.0) for the fields a conversion reads.
FLA_DEFAULTS: dict[str, Any] = {
    "hidden_size": 2048,
    "expand_k": 1.0,
    "expand_v": 2.0,
    "hidden_ratio": 2,
    "intermediate_size": None,
    "num_hidden_layers": 24,
    "num_heads": 8,
    "num_kv_heads": None,
    "feature_map": None,
    "hidden_act": "swish",
    "use_output_gate": True,
    "elementwise_affine": True,
    "norm_eps": 1e-6,
    "attn": None,
    "attnres_block_size": None,
    "fuse_norm": True,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}

ROPE_BASE = 10000.0  # both libraries' rotation base, fixed in their code


def _fields(config: Any, defaults: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The fields of a source config (an object with ``to_dict()`` or attributes, or a mapping), defaults filled."""
    if isinstance(config, Mapping):
        given = dict(config)
    elif callable(getattr(config, "to_dict", None)):
        given = config.to_dict()
    elif hasattr(config, "__dict__"):
        given = vars(config)
    else:
        raise ConvertError(f"a {source} config must be its config object or a dict of its fields, got {config!r}")
    return {**defaults, **{k: v for k, v in given.items() if k in defaults}}


def _unsupported(source: str, option: str, value: object, wanted: str) -> ConvertError:
    return ConvertError(f"cannot convert this {source} model: {option}={value!r} is not supported ({wanted})")


def _cannot_export(target: str, option: str, value: object, wanted: str) -> ConvertError:
    return ConvertError(f"cannot export to {target}: {option}={value!r} ({wanted})")


def _retention_options(**options: Any) -> dict[str, Any]:
    return {"rotary": True, "rope_base": ROPE_BASE, "norm": "rmsnorm", **options}


def torchscale_model_config(config: Any, *, retention_eps: float | None = None) -> ModelConfig:
    """The ``ModelConfig`` that computes what torchscale's ``RetNetDecoder`` with ``config`` computes.

    ``retention_eps``: the epsilon of the per-head RMSNorm inside retention (default: ``layernorm_eps``, which
    torchscale uses there). torchscale rescales the retention scores before that norm and we do not, so only a
    negligible epsilon makes the two the same function (torchscale's issue 40; docs/convert.md)."""
    c = _fields(config, TORCHSCALE_DEFAULTS, "torchscale")
    if c["deepnorm"]:
        raise _unsupported("torchscale", "deepnorm", True, "our blocks are pre-norm without DeepNorm's scaling")
    if not c["subln"] and not c["decoder_normalize_before"]:
        raise _unsupported("torchscale", "decoder_normalize_before", False, "our blocks are pre-norm")
    checks = {
        "activation_fn": (c["activation_fn"] == "swish", "its GLU with swish is our ffn='swiglu'; no other GLU"),
        "layernorm_embedding": (not c["layernorm_embedding"], "we have no norm after the embedding"),
        "moe_freq": (not c["moe_freq"] and not c["use_xmoe"], "no mixture-of-experts layers"),
        "multiway": (not c["multiway"], "no multiway (per-modality) weights"),
        "no_output_layer": (not c["no_output_layer"], "a language model needs its output projection"),
        "vocab_size": (isinstance(c["vocab_size"], int) and c["vocab_size"] > 0, "a positive vocabulary"),
    }
    for option, (ok, wanted) in checks.items():
        if not ok:
            raise _unsupported("torchscale", option, c[option], wanted)
    d, heads = c["decoder_embed_dim"], c["decoder_retention_heads"]
    if d % heads:
        raise _unsupported("torchscale", "decoder_retention_heads", heads, f"must divide decoder_embed_dim={d}")
    eps = c["layernorm_eps"]
    retention = _retention_options(
        num_heads=heads,
        value_dim=c["decoder_value_embed_dim"],
        rope_layout="interleaved",
        rope_schedule="linspace",
        norm_affine=False,
        norm_eps=eps if retention_eps is None else retention_eps,
    )
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=d,
        n_layers=c["decoder_layers"],
        layers=["retention"],
        mixer_options={"retention": retention},
        ffn="swiglu",
        ffn_dim=c["decoder_ffn_embed_dim"],
        norm="rmsnorm",
        norm_eps=eps,
        dropout=c["dropout"],
        tie_embeddings=bool(c["share_decoder_input_output_embed"]),
        init="scaled",
        embed_scale=1.0 if c["no_scale_embedding"] else math.sqrt(d),
        chunk_size=c["recurrent_chunk_size"],
    )


def fla_model_config(config: Any) -> ModelConfig:
    """The ``ModelConfig`` that computes what fla's ``RetNetForCausalLM`` with ``config`` computes.

    fla's ``use_short_conv`` and ``conv_size`` are not read: its RetNet blocks do not pass them to the layer."""
    c = _fields(config, FLA_DEFAULTS, "fla")
    d, heads = c["hidden_size"], c["num_heads"]
    checks = {
        "attn": (c["attn"] is None, "hybrid softmax-attention layers are not converted"),
        "attnres_block_size": (c["attnres_block_size"] is None, "no attention residuals"),
        "feature_map": (c["feature_map"] is None, "our retention has no feature map on q and k"),
        "num_kv_heads": (c["num_kv_heads"] in (None, heads), f"no grouped keys: one key head per head ({heads})"),
        "hidden_act": (c["hidden_act"] == "swish", "the swish gate and SwiGLU FFN are ours; no other activation"),
    }
    for option, (ok, wanted) in checks.items():
        if not ok:
            raise _unsupported("fla", option, c[option], wanted)
    widths = {}
    for option in ("expand_k", "expand_v"):
        width = d * c[option]
        if not math.isclose(width, round(width)) or round(width) % heads:
            raise _unsupported("fla", option, c[option], f"hidden_size * {option} must be a multiple of num_heads")
        widths[option] = round(width)
    ffn_dim = c["intermediate_size"]
    if ffn_dim is None:  # fla's GatedMLP: 2/3 of hidden_ratio * hidden_size, rounded up to a multiple of 256
        ffn_dim = int(d * (c["hidden_ratio"] or 4) * 2 / 3)
        ffn_dim = 256 * ((ffn_dim + 255) // 256)
    retention = _retention_options(
        num_heads=heads,
        head_dim=widths["expand_k"] // heads,
        value_dim=widths["expand_v"],
        gate=bool(c["use_output_gate"]),
        rope_layout="half",
        rope_schedule="rope",
        norm_affine=bool(c["elementwise_affine"]),
        norm_eps=c["norm_eps"],
    )
    return ModelConfig(
        vocab_size=c["vocab_size"],
        d_model=d,
        n_layers=c["num_hidden_layers"],
        layers=["retention"],
        mixer_options={"retention": retention},
        ffn="swiglu",
        ffn_dim=ffn_dim,
        norm="rmsnorm",
        norm_eps=c["norm_eps"],
        tie_embeddings=bool(c["tie_word_embeddings"]),
        init="gpt2",  # fla starts its weights at N(0, 0.02) and does not scale the embedding
    )


@dataclass(frozen=True)
class _Link:
    """Our weight ``ours`` is the source's ``theirs`` concatenated along dim 0, in rows of ``sizes``; ``tiled``:
    ours repeats the single source weight that many times (fla's head-norm weight, shared by the heads)."""

    ours: str
    theirs: tuple[str, ...]
    sizes: tuple[int, ...] | None = None
    tiled: int = 1

    def split(self, tensor: Tensor) -> list[Tensor]:
        if self.tiled > 1:
            return [tensor[: tensor.shape[0] // self.tiled]]
        return list(tensor.split(list(self.sizes))) if self.sizes else [tensor]

    def join(self, parts: list[Tensor]) -> Tensor:
        if self.tiled > 1:
            return parts[0].repeat(self.tiled)
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _retention(model: LanguageModel, i: int) -> MultiScaleRetention:
    return model.blocks[i].mixer


def _torchscale_links(model: LanguageModel) -> list[_Link]:
    links = [_Link("tok_emb.weight", ("embed_tokens.weight",))]
    for i, block in enumerate(model.blocks):
        mixer, ts = _retention(model, i), f"layers.{i}."
        qkvg = ("q_proj", "k_proj", "v_proj", "g_proj")
        hidden = block.ffn.proj.in_features
        links += [
            _Link(f"blocks.{i}.norm1.weight", (ts + "retention_layer_norm.weight",)),
            _Link(
                f"blocks.{i}.mixer.in_proj.weight",
                tuple(f"{ts}retention.{p}.weight" for p in qkvg),
                tuple(mixer.widths),
            ),
            _Link(f"blocks.{i}.mixer.out_proj.weight", (ts + "retention.out_proj.weight",)),
            _Link(f"blocks.{i}.norm2.weight", (ts + "final_layer_norm.weight",)),
            # our SwiGLU's fc: first the half through the activation (their fc1), then the linear half (their gate)
            _Link(f"blocks.{i}.ffn.fc.weight", (ts + "ffn.fc1.weight", ts + "ffn.gate.weight"), (hidden, hidden)),
            _Link(f"blocks.{i}.ffn.proj.weight", (ts + "ffn.fc2.weight",)),
        ]
    links.append(_Link("norm.weight", ("layer_norm.weight",)))
    if not model.config.tie_embeddings:
        links.append(_Link("lm_head.weight", ("output_projection.weight",)))
    return links


def _fla_head_norm_key(config: Mapping[str, Any]) -> str:
    """fla's name of the head norm: fused with the gate (``g_norm_swish_gate``) or not (``g_norm``)."""
    fused = config["use_output_gate"] and config["hidden_act"] == "swish" and config["fuse_norm"]
    return "g_norm_swish_gate" if fused else "g_norm"


def _fla_links(model: LanguageModel, head_norm: str) -> list[_Link]:
    links = [_Link("tok_emb.weight", ("model.embeddings.weight",))]
    for i, block in enumerate(model.blocks):
        mixer, fla = _retention(model, i), f"model.layers.{i}."
        qkvg = ("q_proj", "k_proj", "v_proj", "g_proj")[: len(mixer.widths)]
        hidden = block.ffn.proj.in_features
        links += [
            _Link(f"blocks.{i}.norm1.weight", (fla + "attn_norm.weight",)),
            _Link(
                f"blocks.{i}.mixer.in_proj.weight", tuple(f"{fla}attn.{p}.weight" for p in qkvg), tuple(mixer.widths)
            ),
            _Link(f"blocks.{i}.mixer.out_proj.weight", (fla + "attn.o_proj.weight",)),
            _Link(f"blocks.{i}.norm2.weight", (fla + "mlp_norm.weight",)),
            _Link(
                f"blocks.{i}.ffn.fc.weight",
                (fla + "mlp.gate_proj.weight", fla + "mlp.up_proj.weight"),
                (hidden, hidden),
            ),
            _Link(f"blocks.{i}.ffn.proj.weight", (fla + "mlp.down_proj.weight",)),
        ]
        if mixer.head_norm.weight is not None:
            links.append(
                _Link(f"blocks.{i}.mixer.head_norm.weight", (f"{fla}attn.{head_norm}.weight",), tiled=mixer.num_heads)
            )
    links.append(_Link("norm.weight", ("model.norm.weight",)))
    if not model.config.tie_embeddings:
        links.append(_Link("lm_head.weight", ("lm_head.weight",)))
    return links


def _torchscale_buffers(model: LanguageModel) -> dict[str, Tensor]:
    """``RetNetRelPos``'s buffers as torchscale computes them (float32): its angles and log-decays."""
    heads, key_dim = _retention(model, 0).num_heads, _retention(model, 0).head_dim
    angle = 1.0 / (ROPE_BASE ** torch.linspace(0, 1, key_dim // 2))
    decay = torch.log(1 - 2 ** (-5 - torch.arange(heads, dtype=torch.float)))
    return {"retnet_rel_pos.angle": angle.unsqueeze(-1).repeat(1, 2).flatten(), "retnet_rel_pos.decay": decay}


def _load(
    model: LanguageModel,
    links: list[_Link],
    state: Mapping[str, Any],
    source: str,
    *,
    tied: str | None,
    derived: Mapping[str, Tensor] | None = None,
) -> LanguageModel:
    """Copy ``state`` into ``model`` through ``links`` after checking every name and shape; all or nothing.

    ``tied``: the source's output-projection key, which a tied model may hold as a copy of its embedding.
    ``derived``: buffers the source may hold that are functions of the config; checked against those values."""
    expected: dict[str, tuple[int, ...]] = {}
    ours = model.state_dict()
    for link in links:
        for key, part in zip(link.theirs, link.split(ours[link.ours]), strict=True):
            expected[key] = tuple(part.shape)
    derived = derived or {}
    optional = set(derived) | ({tied} if tied else set())
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected and k not in optional]
    if missing or extra:
        what = "; ".join(
            f"{label} {len(keys)} key{'s' * (len(keys) != 1)}: {', '.join(keys[:6])}{', ...' * (len(keys) > 6)}"
            for label, keys in (("missing", missing), ("unexpected", extra))
            if keys
        )
        raise ConvertError(f"the {source} state dict does not fit the config's model ({what})")
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, Tensor):
            raise ConvertError(f"{source} key {key!r} must be a tensor, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ConvertError(f"{source} key {key!r} has shape {list(value.shape)}, the config needs {list(shape)}")
        if not value.is_floating_point():
            raise ConvertError(f"{source} key {key!r} must be floating point, got {value.dtype}")
    for key, want in derived.items():
        value = state.get(key, want)
        fits = isinstance(value, Tensor) and value.shape == want.shape
        if not fits or not torch.allclose(value.double(), want.double(), rtol=1e-5, atol=1e-6):
            raise ConvertError(f"{source} key {key!r} does not hold what the config computes: a different model")
    if tied and tied in state and not torch.equal(state[tied], state[links[0].theirs[0]]):
        raise ConvertError(f"{source} key {tied!r} differs from the embedding, but the config ties them")
    converted = {link.ours: link.join([state[k] for k in link.theirs]) for link in links}
    if model.config.tie_embeddings:
        converted["lm_head.weight"] = converted["tok_emb.weight"]
    model.to(state[links[0].theirs[0]].dtype)
    with torch.no_grad():
        model.load_state_dict(converted, strict=True)
    return model


def _build(config: ModelConfig) -> LanguageModel:
    """The model to load into; its initial weights are overwritten, so their draws leave the caller's RNG alone."""
    with torch.random.fork_rng(devices=[]):
        return build_model(config)


def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The state without ``prefix`` when every key has it (a fairseq checkpoint's ``decoder.``)."""
    if state and all(isinstance(k, str) and k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _check_state(state: object, source: str) -> Mapping[str, Any]:
    if not isinstance(state, Mapping):
        raise ConvertError(f"a {source} state dict must be a mapping of names to tensors, got {type(state).__name__}")
    return state


def from_torchscale(
    state_dict: Mapping[str, Tensor], config: Any, *, retention_eps: float | None = None
) -> LanguageModel:
    """Our ``LanguageModel`` holding torchscale ``RetNetDecoder`` weights (``decoder.state_dict()``; a fairseq
    checkpoint's ``decoder.``-prefixed keys are read too); ``config``: its ``RetNetConfig`` or a dict of its
    fields. The model takes the embedding's dtype. ``retention_eps``: see ``torchscale_model_config``."""
    state = _strip(_check_state(state_dict, "torchscale"), "decoder.")
    model = _build(torchscale_model_config(config, retention_eps=retention_eps))
    return _load(
        model,
        _torchscale_links(model),
        state,
        "torchscale",
        tied="output_projection.weight" if model.config.tie_embeddings else None,
        derived=_torchscale_buffers(model),
    )


def read_fla_folder(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The state dict and config of a folder written by fla's ``save_pretrained`` (``config.json`` and
    ``model.safetensors``, sharded with ``model.safetensors.index.json``, or ``pytorch_model.bin``)."""
    import safetensors.torch

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConvertError(f"{str(folder)!r} is not a folder written by save_pretrained: it has no config.json")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "retnet":
        raise ConvertError(f"{folder / 'config.json'} has model_type={config.get('model_type')!r}, not 'retnet'")
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        state = safetensors.torch.load_file(folder / "model.safetensors")
    elif index.is_file():
        state = {}
        for shard in sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())):
            state |= safetensors.torch.load_file(folder / shard)
    elif (folder / "pytorch_model.bin").is_file():
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConvertError(f"{str(folder)!r} holds no model.safetensors, sharded safetensors or pytorch_model.bin")
    return state, config


def from_fla(state_dict: Mapping[str, Tensor] | str | Path, config: Any = None) -> LanguageModel:
    """Our ``LanguageModel`` holding the weights of fla's ``RetNetForCausalLM`` (``model.state_dict()``);
    ``config``: its ``RetNetConfig`` or a dict of its fields. ``state_dict`` may instead be a folder written by
    ``save_pretrained`` (then ``config`` is read from it). The model takes the embedding's dtype."""
    if isinstance(state_dict, (str, Path)):
        if config is not None:
            raise ConvertError("give a save_pretrained folder alone (its config.json is the config), or a state dict")
        state_dict, config = read_fla_folder(state_dict)
    if config is None:
        raise ConvertError("from_fla needs the fla RetNetConfig (or its dict) with a state dict")
    state = _check_state(state_dict, "fla")
    model = _build(fla_model_config(config))
    head_norm = _fla_head_norm_key(_fields(config, FLA_DEFAULTS, "fla"))
    return _load(
        model,
        _fla_links(model, head_norm),
        state,
        "fla",
        tied="lm_head.weight" if model.config.tie_embeddings else None,
    )


def _uniform_retention(model: LanguageModel, target: str) -> MultiScaleRetention:
    """The first layer's retention after checking that every layer is the same retention layer and FFN."""
    specs = model.config.layer_specs()
    for i, spec in enumerate(specs):
        if spec.mixer != "retention":
            raise _cannot_export(target, f"layers[{i}]", spec.mixer, f"{target}'s RetNet has retention layers only")
        for name, value, first in (
            ("options", spec.options, specs[0].options),
            ("ffn_dim", spec.ffn_dim, specs[0].ffn_dim),
        ):
            if value != first:
                raise _cannot_export(
                    target, f"layers[{i}].{name}", value, f"{target} gives every layer the same ({first!r})"
                )
    return _retention(model, 0)


def _require(target: str, checks: Sequence[tuple[str, object, object, str]]) -> None:
    """Each ``(option, value, wanted, why)`` must have ``value == wanted``."""
    for option, value, wanted, why in checks:
        if value != wanted:
            raise _cannot_export(target, option, value, f"{target} needs {wanted!r}: {why}")


def _common_checks(
    model: LanguageModel, mixer: MultiScaleRetention, target: str
) -> list[tuple[str, object, object, str]]:
    config = model.config
    return [
        ("ffn", config.ffn, "swiglu", "its FFN is a SwiGLU without biases"),
        ("norm", config.norm, "rmsnorm", "its block norms are RMSNorms"),
        ("retention rotary", mixer.rope is not None, True, "it always rotates q and k"),
        ("retention rope_base", mixer.rope and mixer.rope.base, ROPE_BASE, "its rotation base is fixed"),
        ("retention gammas", list(mixer.gammas), default_gammas(mixer.num_heads), "its decays are the paper's"),
        ("retention group_norm", mixer.group_norm, True, "it always normalises each head"),
        ("retention norm", mixer.norm, "rmsnorm", "its head norm is an RMSNorm"),
        ("retention norm_eps", mixer.head_norm and mixer.head_norm.eps, config.norm_eps, "one epsilon for all norms"),
        ("retention conv_size", mixer.conv and mixer.conv.kernel_size, None, "it has no short convolution"),
        ("retention bias", mixer.in_proj.bias is not None, False, "its projections have no biases"),
    ]


def _export(model: LanguageModel, links: list[_Link]) -> dict[str, Tensor]:
    ours = model.state_dict()
    state = {}
    for link in links:
        for key, part in zip(link.theirs, link.split(ours[link.ours]), strict=True):
            state[key] = part.detach().clone()
    return state


def to_torchscale(model: LanguageModel) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, config)`` for torchscale: ``RetNetDecoder(RetNetConfig(**config), embed_tokens=...)`` loads
    the state dict (with an ``nn.Embedding(vocab_size, decoder_embed_dim)`` passed in, as its LM does). Raises
    ``ConvertError`` naming the first option torchscale cannot express."""
    target = "torchscale"
    mixer, config = _uniform_retention(model, target), model.config
    d, scale = config.d_model, config.embedding_scale
    _require(
        target,
        [
            *_common_checks(model, mixer, target),
            ("retention rope_layout", mixer.rope and mixer.rope.layout, "interleaved", "it rotates adjacent pairs"),
            ("retention rope_schedule", mixer.rope and mixer.rope.schedule, "linspace", "its angles are linspace"),
            (
                "retention norm_affine",
                mixer.head_norm and mixer.head_norm.weight is not None,
                False,
                "no head-norm weights",
            ),
            ("retention gate", mixer.gate, True, "it always gates the output"),
            ("retention num_heads * head_dim", mixer.num_heads * mixer.head_dim, d, "its key width is d_model"),
            ("embed_scale", scale in (1.0, math.sqrt(d)), True, "no_scale_embedding gives 1 or sqrt(d_model)"),
        ],
    )
    state = _export(model, _torchscale_links(model)) | _torchscale_buffers(model)
    if config.tie_embeddings:
        state["output_projection.weight"] = state["embed_tokens.weight"]
    ts_config = {
        "vocab_size": config.vocab_size,
        "decoder_embed_dim": d,
        "decoder_value_embed_dim": mixer.num_heads * mixer.value_head_dim,
        "decoder_retention_heads": mixer.num_heads,
        "decoder_ffn_embed_dim": model.blocks[0].ffn.proj.in_features,
        "decoder_layers": config.n_layers,
        "decoder_normalize_before": True,
        "activation_fn": "swish",
        "dropout": config.dropout,
        "no_scale_embedding": scale == 1.0,
        "layernorm_embedding": False,
        "deepnorm": False,
        "share_decoder_input_output_embed": config.tie_embeddings,
        "layernorm_eps": config.norm_eps,
    }
    if config.chunk_size is not None:
        ts_config["recurrent_chunk_size"] = config.chunk_size
    return state, ts_config


def to_fla(model: LanguageModel, *, fuse_norm: bool = True) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, config)`` for fla: ``RetNetForCausalLM(RetNetConfig(**config))`` loads the state dict.
    ``fuse_norm``: fla's fused Triton norms (its default; GPU) or torch's, which also names the head-norm weight.
    Raises ``ConvertError`` naming the first option fla cannot express."""
    target = "fla"
    mixer, config = _uniform_retention(model, target), model.config
    _require(
        target,
        [
            *_common_checks(model, mixer, target),
            ("retention rope_layout", mixer.rope and mixer.rope.layout, "half", "it rotates i with i + D/2"),
            ("retention rope_schedule", mixer.rope and mixer.rope.schedule, "rope", "its angles are RoPE's"),
            ("embed_scale", config.embedding_scale, 1.0, "it does not scale the embedding"),
        ],
    )
    H, d = mixer.num_heads, config.d_model
    fla_config = {
        "hidden_size": d,
        "expand_k": H * mixer.head_dim / d,
        "expand_v": H * mixer.value_head_dim / d,
        "num_hidden_layers": config.n_layers,
        "num_heads": H,
        "num_kv_heads": None,
        "feature_map": None,
        "hidden_act": "swish",
        "use_output_gate": mixer.gate,
        "elementwise_affine": mixer.head_norm.weight is not None,
        "norm_eps": config.norm_eps,
        "intermediate_size": model.blocks[0].ffn.proj.in_features,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        "fuse_norm": fuse_norm,
    }
    for key in ("expand_k", "expand_v"):
        if not math.isclose(d * fla_config[key], round(d * fla_config[key])):
            raise _cannot_export(target, key, fla_config[key], "hidden_size * it must be an integer")
    links = _fla_links(model, _fla_head_norm_key({**FLA_DEFAULTS, **fla_config}))
    for i in range(config.n_layers):
        weight = _retention(model, i).head_norm.weight
        if weight is not None and not torch.equal(weight.view(H, -1), weight.view(H, -1)[:1].expand(H, -1)):
            raise _cannot_export(
                target, f"layers[{i}] head_norm.weight", "per head", "fla shares one head-norm weight by all heads"
            )
    state = _export(model, links)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["model.embeddings.weight"]
    return state, fla_config


def _read_state_file(path: Path) -> tuple[Mapping[str, Any], Any]:
    """``(state dict, config or None)`` of a ``.safetensors`` file or a torch file (read with ``weights_only``):
    a state dict, or ``{"model": state dict, "config": dict}`` as ``export_file`` writes for torchscale."""
    import safetensors.torch

    if not path.is_file():
        raise ConvertError(f"{str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        return safetensors.torch.load_file(path), None
    try:
        held = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (pickle and zip errors alike: not a weights file we can read safely)
        raise ConvertError(f"cannot read {str(path)!r} as a torch weights file: {type(exc).__name__}: {exc}") from None
    if isinstance(held, Mapping) and isinstance(held.get("model"), Mapping):
        return held["model"], held.get("config")
    return held, None


def convert_file(source: str, src: str | Path, *, config: str | Path | None = None) -> LanguageModel:
    """The model of a ``source`` ("torchscale" or "fla") checkpoint at ``src``: a weights file (``.safetensors``
    or a torch file, which may hold ``{"model": ..., "config": ...}``) with ``config`` a JSON file of the source
    config's fields where the file holds none; for fla also a ``save_pretrained`` folder."""
    if source not in FORMATS:
        raise ConvertError(f"the source format must be one of {list(FORMATS)}, got {source!r}")
    src = Path(src)
    if source == "fla" and src.is_dir():
        if config is not None:
            raise ConvertError(f"{str(src)!r} is a save_pretrained folder: its config.json is the config")
        return from_fla(src)
    state, held = _read_state_file(src)
    if config is not None:
        try:
            held = json.loads(Path(config).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConvertError(f"the config {str(config)!r} is not JSON: {exc}") from None
    if held is None:
        raise ConvertError(f"{str(src)!r} holds no config: give the {source} config as a JSON file of its fields")
    return from_torchscale(state, held) if source == "torchscale" else from_fla(state, held)


def export_file(model: LanguageModel, target: str, out: str | Path, *, fuse_norm: bool = True) -> Path:
    """Write ``model`` for ``target``: for fla a ``save_pretrained``-style folder (``config.json``,
    ``model.safetensors``; ``RetNetForCausalLM.from_pretrained`` reads it; ``fuse_norm`` as in ``to_fla``), for
    torchscale a torch file ``{"model": state dict, "config": RetNetConfig fields}``. Returns the path written."""
    import safetensors.torch

    out = Path(out)
    if target == "fla":
        state, config = to_fla(model, fuse_norm=fuse_norm)
        if config["tie_word_embeddings"]:
            del state["lm_head.weight"]  # one tensor under two names: save_pretrained keeps the embedding only
        out.mkdir(parents=True, exist_ok=True)
        config = {**config, "model_type": "retnet", "architectures": ["RetNetForCausalLM"]}
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
        return out
    if target == "torchscale":
        state, config = to_torchscale(model)
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state, "config": config}, out)
        return out
    raise ConvertError(f"the target format must be one of {list(FORMATS)}, got {target!r}")
