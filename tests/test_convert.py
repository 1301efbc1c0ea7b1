"""``models.convert``: torchscale's and fla's RetNets into ours and back, checked against the libraries' own forwards.

Checkpoints are made on the fly from randomly initialised models of those libraries (tiny: d_model 32, 2 layers).

- torchscale: float64, its layer-norm epsilon set tiny (1e-30: torchscale rescales retention scores before its
  per-head norm and we do not, so only a negligible epsilon makes one function; its issue 40), and its two float32
  islands removed (``without_float32_casts``, ``relpos_float64``). Ours in each mode against its same mode
  (parallel, chunkwise, recurrent decoding token by token): machine precision, bound 1e-12.
- fla: its Triton kernels need a GPU, so on this CPU its model runs with those ops replaced by fla's own pure-torch
  references (``fla_reference``): ``fla.ops.retention.naive.naive_retention`` for the retention op,
  ``rotary_embedding_ref`` and ``rms_norm_ref`` from fla's modules; its fused gated norm becomes ``rms_norm_ref``
  times ``silu(g)`` and its fused SwiGLU ``silu(gate) * up`` (what its kernels compute). fla's naive retention and
  its rotary tables compute in float32 whatever the input, so the float64 comparison is at float32 rounding: bound
  1e-5 relative. The naive op is parallel only, so our three modes are each compared with fla's parallel forward.
  Measured: 2e-16 to torchscale in every mode, 1.8e-7 to 2.7e-7 to fla.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models.convert
from models import build_model
from models.checkpoint import load
from models.cli import main
from models.convert import (
    ConvertError,
    export_file,
    fla_model_config,
    from_fla,
    from_torchscale,
    to_fla,
    to_torchscale,
    torchscale_model_config,
)
from tests.torchscale_compat import (
    build_torchscale_lm,
    import_torchscale,
    lm_configs,
    relpos_float64,
    torchscale_logits,
    without_float32_casts,
)

ts = import_torchscale()
try:
    with warnings.catch_warnings():  # fla warns on import that Triton has no GPU here and flash-attn is absent
        warnings.simplefilter("ignore")
        import fla.layers.multiscale_retention as fla_layer
        import fla.modules.mlp as fla_mlp
        import fla.modules.norm.fused_norm_gate as fla_gated_norm
        import fla.modules.norm.layernorm as fla_norm
        import fla.modules.rotary.ops as fla_rotary
        from fla.models import RetNetConfig, RetNetForCausalLM
        from fla.ops.retention.naive import naive_retention
except ImportError:
    fla_layer = None
if ts is None or fla_layer is None:
    if os.environ.get("CI"):
        pytest.fail("torchscale or fla is not installed; scripts/test.sh installs them with --no-deps", pytrace=False)
    pytest.skip("torchscale 0.3.0 and flash-linear-attention 0.6.0 are needed", allow_module_level=True)

TOKENS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
MODES = ("parallel", "chunkwise", "recurrent")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------------- torchscale


def torchscale_decoder(*, tie_embeddings: bool = False, eps: float = 1e-30, seed: int = 0) -> tuple[object, object]:
    """``(RetNetConfig, RetNetDecoder)``: a random torchscale RetNet whose every norm has epsilon ``eps``."""
    args, _ = lm_configs(ts, eps=eps, tie_embeddings=tie_embeddings, chunk_size=8)
    torch.manual_seed(seed)
    return args, build_torchscale_lm(ts, args, retention_eps=eps)


def torchscale_recurrent(decoder, tokens: torch.Tensor) -> torch.Tensor:
    """torchscale's recurrent decoding: one token per call, its state in ``incremental_state``."""
    state: dict = {}
    steps = [decoder(tokens[:, : t + 1], incremental_state=state)[0] for t in range(tokens.shape[1])]
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_from_torchscale_same_logits_in_every_mode(tie_embeddings):
    args, theirs = torchscale_decoder(tie_embeddings=tie_embeddings)
    ours = from_torchscale(theirs.state_dict(), args)
    without_float32_casts(relpos_float64(theirs.double()))
    ours.double()
    assert ours.config.tie_embeddings is tie_embeddings and ours.config.embedding_scale == math.sqrt(32)
    with torch.no_grad():
        for mode in MODES:
            expected = (
                torchscale_recurrent(theirs, TOKENS) if mode == "recurrent" else torchscale_logits(theirs, TOKENS, mode)
            )
            got, _ = ours(TOKENS, mode=mode, chunk_size=8)
            assert rel(got, expected) < 1e-12, f"{mode}: {rel(got, expected):.1e}"


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_torchscale_round_trip_and_export_loads_into_torchscale(tie_embeddings):
    """ours -> torchscale -> ours is the identity, and torchscale's decoder built from the exported config loads
    the exported state strictly and computes our logits."""
    args, theirs = torchscale_decoder(tie_embeddings=tie_embeddings)
    ours = from_torchscale(theirs.state_dict(), args).double()
    state, config = to_torchscale(ours)
    again = from_torchscale(state, config)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    rebuilt = ts.RetNetDecoder(ts.RetNetConfig(**config), embed_tokens=torch.nn.Embedding(256, 32)).double()
    rebuilt.load_state_dict(state, strict=True)
    assert (rebuilt.output_projection.weight is rebuilt.embed_tokens.weight) is tie_embeddings
    without_float32_casts(relpos_float64(rebuilt))
    with torch.no_grad():
        assert rel(ours(TOKENS)[0], torchscale_logits(rebuilt, TOKENS)) < 1e-12


def test_torchscale_fairseq_prefix_scale_convention_and_rng():
    args, theirs = torchscale_decoder()
    state = {f"decoder.{k}": v for k, v in theirs.state_dict().items()}
    torch.manual_seed(1)
    ours = from_torchscale(state, vars(args))  # a dict of its fields
    after = torch.rand(3)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(3)), "converting drew from the caller's random numbers"
    assert torch.equal(ours.tok_emb.weight, theirs.embed_tokens.weight)
    assert torchscale_model_config({**vars(args), "no_scale_embedding": True}).embedding_scale == 1.0


@pytest.mark.parametrize(
    "option,value",
    [("activation_fn", "gelu"), ("deepnorm", True), ("layernorm_embedding", True), ("moe_freq", 2), ("multiway", True)],
)
def test_torchscale_unsupported_option_is_named(option, value):
    args, theirs = torchscale_decoder()
    with pytest.raises(ConvertError, match=rf"{option}={value!r}"):
        from_torchscale(theirs.state_dict(), {**vars(args), option: value})


def test_torchscale_bad_state_dicts_are_named():
    args, theirs = torchscale_decoder()
    good = theirs.state_dict()
    missing = {k: v for k, v in good.items() if k != "layers.1.ffn.gate.weight"}
    with pytest.raises(ConvertError, match=r"missing 1 key: layers\.1\.ffn\.gate\.weight"):
        from_torchscale(missing, args)
    with pytest.raises(ConvertError, match=r"unexpected 1 key: layers\.0\.extra\.weight"):
        from_torchscale({**good, "layers.0.extra.weight": torch.zeros(3)}, args)
    with pytest.raises(ConvertError, match=r"'layers\.0\.retention\.v_proj\.weight' has shape \[32, 32\].*\[64, 32\]"):
        from_torchscale({**good, "layers.0.retention.v_proj.weight": torch.zeros(32, 32)}, args)
    with pytest.raises(ConvertError, match=r"'retnet_rel_pos\.decay' does not hold what the config computes"):
        from_torchscale({**good, "retnet_rel_pos.decay": torch.zeros(2)}, args)
    with pytest.raises(ConvertError, match=r"'retnet_rel_pos\.angle' does not hold what the config computes"):
        from_torchscale({**good, "retnet_rel_pos.angle": torch.zeros(5)}, args)
    fla_state = RetNetForCausalLM(fla_config()).state_dict()  # another architecture's names
    with pytest.raises(ConvertError, match=r"missing \d+ keys: embed_tokens\.weight.*unexpected \d+ keys: model\."):
        from_torchscale(fla_state, args)


@pytest.mark.parametrize(
    "change,option",
    [
        ({"ffn": "gelu"}, "ffn='gelu'"),
        ({"retention": {"rope_layout": "half"}}, "rope_layout='half'"),
        ({"retention": {"norm_affine": True}}, "norm_affine=True"),
        ({"retention": {"conv_size": 4}}, "conv_size=4"),
        ({"retention": {"gammas": [0.9, 0.99]}}, "gammas="),
        ({"layers": ["retention", "softmax_attention"]}, r"layers\[1\]='softmax_attention'"),
    ],
)
def test_torchscale_export_names_what_it_cannot_express(change, option):
    config = torchscale_model_config(lm_configs(ts)[0]).to_dict()
    config["mixer_options"]["retention"] |= change.pop("retention", {})
    config["mixer_options"]["softmax_attention"] = {"num_heads": 2}
    with pytest.raises(ConvertError, match=rf"cannot export to torchscale: (retention )?{option}"):
        to_torchscale(build_model({**config, **change}))


# ------------------------------------------------------------------------------------------------------------ fla


def fla_config(**changes) -> object:
    """A tiny fla RetNetConfig, otherwise fla's defaults (fused norms and SwiGLU: the fla-hub layout)."""
    fields = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_heads": 2,
        "vocab_size": 256,
        "hidden_ratio": 2,  # intermediate_size: 2/3 * 2 * 32, rounded up to 256
        "fuse_cross_entropy": False,
    }
    return RetNetConfig(**(fields | changes))


def _rotary(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0, cu_seqlens=None, chunk_indices=None):
    assert cu_seqlens is None and isinstance(seqlen_offsets, int)
    T = x.shape[1]
    window = slice(seqlen_offsets, seqlen_offsets + T)
    return fla_rotary.rotary_embedding_ref(x, cos[window], sin[window], interleaved)


def _retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None, **kwargs):
    assert scale is None and initial_state is None and cu_seqlens is None
    o = naive_retention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # it takes [B, H, T, D]
    return o.transpose(1, 2), None


def _rms_norm(x, weight, bias, residual=None, eps=1e-5, prenorm=False, residual_in_fp32=False):
    weight = torch.ones(x.shape[-1], dtype=x.dtype) if weight is None else weight
    return fla_norm.rms_norm_ref(x, weight, bias, residual, eps, prenorm)


def _rms_norm_gated(
    x, g, weight, bias, activation="swish", residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6
):
    assert activation in ("swish", "silu") and residual is None and not prenorm
    return _rms_norm(x, weight, bias, eps=eps) * F.silu(g)


@pytest.fixture
def fla_reference(monkeypatch):
    """fla's model on the CPU: its Triton ops replaced by fla's own pure-torch references (module docstring)."""
    monkeypatch.setattr(fla_rotary, "rotary_embedding", _rotary)
    for name in ("chunk_retention", "fused_chunk_retention", "parallel_retention", "fused_recurrent_retention"):
        monkeypatch.setattr(fla_layer, name, _retention)
    monkeypatch.setattr(fla_norm, "rms_norm", _rms_norm)
    monkeypatch.setattr(fla_gated_norm, "rms_norm_gated", _rms_norm_gated)
    monkeypatch.setattr(fla_mlp, "swiglu", lambda gate, up: F.silu(gate) * up)
    monkeypatch.setattr(
        fla_mlp, "swiglu_linear", lambda gate, up, weight, bias: F.linear(F.silu(gate) * up, weight, bias)
    )


def fla_model(config: object, seed: int = 0) -> object:
    """fla's model with every weight moved off its init (norm weights are ones there), float64."""
    torch.manual_seed(seed)
    model = RetNetForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double().eval()


def fla_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, use_cache=False).logits


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"tie_word_embeddings": True, "intermediate_size": 48, "expand_k": 2.0, "expand_v": 1.0, "fuse_norm": False},
        {"use_output_gate": False, "elementwise_affine": False},
    ],
    ids=["fla-defaults", "tied-expand-unfused", "no-gate-no-affine"],
)
def test_from_fla_same_logits_in_every_mode(fla_reference, changes):
    config = fla_config(**changes)
    theirs = fla_model(config)
    ours = from_fla(theirs.state_dict(), config)
    assert ours.dtype == torch.float64
    expected = fla_logits(theirs, TOKENS)
    with torch.no_grad():
        for mode in MODES:
            got, _ = ours(TOKENS, mode=mode, chunk_size=8)
            assert rel(got, expected) < 1e-5, f"{mode}: {rel(got, expected):.1e}"


def test_fla_save_pretrained_folder_and_export_round_trip(fla_reference, tmp_path):
    """A save_pretrained folder converts; ours -> fla -> ours is the identity; fla loads our export strictly
    (as a state dict, and as a folder through its from_pretrained) and computes our logits."""
    config = fla_config(tie_word_embeddings=True)
    theirs = fla_model(config)
    theirs.save_pretrained(tmp_path / "hub")
    ours = from_fla(tmp_path / "hub")
    state, exported = to_fla(ours)
    again = from_fla(state, exported)
    for key, value in ours.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    rebuilt = RetNetForCausalLM(RetNetConfig(**exported)).double()
    rebuilt.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert rel(ours(TOKENS)[0], fla_logits(rebuilt, TOKENS)) < 1e-5
    export_file(ours, "fla", tmp_path / "out")
    reloaded = RetNetForCausalLM.from_pretrained(tmp_path / "out").double()
    assert rel(fla_logits(reloaded, TOKENS), fla_logits(theirs, TOKENS)) < 1e-12


def test_fla_folders_sharded_and_bin(tmp_path):
    """A save_pretrained folder with sharded safetensors, or with pytorch_model.bin, reads as the state dict does;
    a folder that is not one is named."""
    theirs = RetNetForCausalLM(fla_config())
    expected = from_fla(theirs.state_dict(), theirs.config).state_dict()
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "sharded" / "config.json", tmp_path / "bin")
    torch.save(theirs.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("sharded", "bin"):
        got = from_fla(tmp_path / folder).state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items()), folder
    (tmp_path / "bin" / "pytorch_model.bin").unlink()
    with pytest.raises(ConvertError, match="holds no model.safetensors, sharded safetensors or pytorch_model.bin"):
        from_fla(tmp_path / "bin")
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"model_type": "gla"}))
    with pytest.raises(ConvertError, match="model_type='gla', not 'retnet'"):
        from_fla(tmp_path / "bin")
    with pytest.raises(ConvertError, match="it has no config.json"):
        from_fla(tmp_path)


@pytest.mark.parametrize(
    "option,value",
    [("feature_map", "elu"), ("num_kv_heads", 1), ("hidden_act", "powlu"), ("attn", {"layers": [1]})],
)
def test_fla_unsupported_option_is_named(option, value):
    state = RetNetForCausalLM(fla_config()).state_dict()
    with pytest.raises(ConvertError, match=re.escape(f"{option}={value!r} is not supported")):
        from_fla(state, {**fla_config().to_dict(), option: value})


def test_fla_bad_state_dicts_are_named():
    config = fla_config()
    good = RetNetForCausalLM(config).state_dict()
    with pytest.raises(ConvertError, match=r"missing 1 key: model\.layers\.0\.attn\.g_norm_swish_gate\.weight"):
        from_fla({k: v for k, v in good.items() if "layers.0.attn.g_norm" not in k}, config)
    with pytest.raises(
        ConvertError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \[8, 32\].*\[256, 32\]"
    ):
        from_fla({**good, "model.layers.1.mlp.up_proj.weight": torch.zeros(8, 32)}, config)
    # fla names the head norm by whether it is fused with the gate: a state dict from the other setting
    with pytest.raises(
        ConvertError, match=r"missing 2 keys: .*attn\.g_norm\.weight.*unexpected 2 keys: .*g_norm_swish_gate"
    ):
        from_fla(good, {**config.to_dict(), "fuse_norm": False})
    args, theirs = torchscale_decoder()
    with pytest.raises(ConvertError, match=r"missing \d+ keys: model\.embeddings\.weight"):
        from_fla(theirs.state_dict(), config)


def test_fla_export_names_what_it_cannot_express():
    args, theirs = torchscale_decoder()
    with pytest.raises(ConvertError, match=r"cannot export to fla: retention rope_layout='interleaved'"):
        to_fla(from_torchscale(theirs.state_dict(), args))  # torchscale's rotation is not fla's
    ours = build_model(fla_model_config(fla_config()))
    with torch.no_grad():
        ours.blocks[1].mixer.head_norm.weight[:32].mul_(2.0)  # heads with their own norm weights
    with pytest.raises(ConvertError, match=r"layers\[1\] head_norm\.weight='per head'.*shares one head-norm weight"):
        to_fla(ours)


# ------------------------------------------------------------------------------------------------------------ CLI


def test_convert_command_writes_our_checkpoint_and_exports(fla_reference, tmp_path, capsys):
    args, theirs = torchscale_decoder(eps=1e-6)
    torch.save({"model": theirs.state_dict()}, tmp_path / "ts.pt")
    (tmp_path / "ts.json").write_text(json.dumps(vars(args)))
    argv = ["convert", "--from", "torchscale", str(tmp_path / "ts.pt"), "--config", str(tmp_path / "ts.json")]
    assert main([*argv[:-2], "--out", str(tmp_path / "none.safetensors")]) == 2  # no config given, none held
    assert "holds no config" in capsys.readouterr().err and not (tmp_path / "none.safetensors").exists()
    (tmp_path / "bad.json").write_text("{decoder_layers: 2")
    assert main([*argv[:-1], str(tmp_path / "bad.json"), "--out", str(tmp_path / "none.safetensors")]) == 2
    assert "is not JSON" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "ts.safetensors")]) == 0
    ours = load(tmp_path / "ts.safetensors")
    expected = from_torchscale(theirs.state_dict(), args)
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in ours.state_dict().items())
    assert (
        main(["convert", "--to", "torchscale", str(tmp_path / "ts.safetensors"), "--out", str(tmp_path / "b.pt")]) == 0
    )
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert back["config"]["layernorm_eps"] == 1e-6
    assert all(torch.equal(back["model"][k], v) for k, v in theirs.state_dict().items())

    fla = fla_model(fla_config()).float()
    fla.save_pretrained(tmp_path / "hub")
    assert main(["convert", "--from", "fla", str(tmp_path / "hub"), "--out", str(tmp_path / "fla.safetensors")]) == 0
    with torch.no_grad():
        assert rel(load(tmp_path / "fla.safetensors")(TOKENS)[0], fla(TOKENS).logits) < 1e-5
    # a config the source cannot express: exit code 2 and the option named, nothing written
    assert main(["convert", "--to", "fla", str(tmp_path / "ts.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "rope_layout='interleaved'" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_convert_imports_neither_library():
    """models.convert reads their configs as data: no import of torchscale or fla anywhere in it (functions too)."""
    tree = ast.parse(Path(models.convert.__file__).read_text(encoding="utf-8"))
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert imported and not [m for m in imported if m.split(".")[0] in ("fla", "torchscale")]
