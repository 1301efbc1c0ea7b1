"""The language model: its three modes agree, prefill + decode equals one forward, generation is a seeded
decode loop, hybrids carry fixed-size states and KV caches side by side, and a plugin's mixer works by name.

Models are float64 so that agreement can be asserted tightly; one float32 case checks the working dtype.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mixers
from mixers import registry as registry_module
from mixers.registry import Registry
from mixers.testing.asserts import assert_rel_close
from mixers.testing.strategies import scaled_examples
from models import ConfigError, LanguageModel, ModelConfig, build_model
from models.lm import state_nbytes
from tests.fake_plugins import forget_fake_modules, write_fake_distribution
from tests.models_helpers import (  # noqa: F401  (one_thread is an autouse fixture)
    assert_states_close,
    model_configs,
    one_thread,
    tiny_config,
)

RTOL64 = 1e-9


def make(config, seed: int = 0, dtype: torch.dtype = torch.float64) -> LanguageModel:
    torch.manual_seed(seed)
    model = build_model(config).to(dtype).eval()
    with torch.no_grad():  # move the LayerNorm/bias parameters off their trivial init
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def tokens_for(model: LanguageModel, B: int, T: int, seed: int) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def check_modes(model: LanguageModel, tokens: torch.Tensor, chunk: int, t0: int) -> None:
    """Parallel = chunkwise = recurrent (logits and final states), and a chunkwise prefill of ``t0`` tokens
    followed by token-by-token decoding gives the same logits and states as one parallel forward."""
    T = tokens.shape[1]
    with torch.no_grad():
        ref, ref_states = model(tokens, mode="parallel")
        for mode, chunk_size in (("chunkwise", chunk), ("chunkwise", None), ("recurrent", None)):
            logits, states = model(tokens, mode=mode, chunk_size=chunk_size)
            assert_rel_close(logits, ref, RTOL64, f"{mode} chunk {chunk_size} vs parallel")
            assert_states_close(states, ref_states, RTOL64)
        parts, states = [], None
        if t0:
            head, states = model(tokens[:, :t0], mode="chunkwise", chunk_size=chunk)
            parts.append(head)
        for t in range(t0, T):
            step, states = model(tokens[:, t : t + 1], states, mode="recurrent")
            parts.append(step)
    assert_rel_close(torch.cat(parts, dim=1), ref, RTOL64, f"prefill {t0} + decode vs parallel")
    assert_states_close(states, ref_states, RTOL64)


@settings(max_examples=scaled_examples(1.0))
@given(
    config=model_configs(),
    B=st.integers(1, 2),
    T=st.one_of(st.integers(1, 40), st.integers(24, 40)),
    chunk=st.integers(1, 17),
    seed=st.integers(0, 99),
)
def test_modes_agree_and_prefill_plus_decode_equals_one_forward(config, B, T, chunk, seed):
    model = make(config, seed)
    check_modes(model, tokens_for(model, B, T, seed), chunk, seed % T)


@pytest.mark.parametrize("pair", list(itertools.permutations(sorted(mixers.get_registry().mixers), 2)), ids=str)
def test_every_two_layer_hybrid(pair):
    """Each ordered pair of registered mixers (plugins included) as a two-layer hybrid."""
    model = make(tiny_config(list(pair)), seed=len(pair[0]))
    check_modes(model, tokens_for(model, 2, 33, 5), chunk=7, t0=20)


def test_every_mixer_in_one_hybrid_float32():
    """A hybrid of every registered mixer, in the working dtype: modes agree to float32 rounding."""
    names = sorted(mixers.get_registry().mixers)
    model = make(tiny_config(names, d_model=32), dtype=torch.float32)
    tokens = tokens_for(model, 2, 37, 0)
    with torch.no_grad():
        ref, _ = model.double()(tokens, mode="parallel")
        model.float()
        for mode in ("parallel", "chunkwise", "recurrent"):
            logits, states = model(tokens, mode=mode, chunk_size=5)
            assert logits.dtype == torch.float32
            assert_rel_close(logits, ref, 2e-5, f"float32 {mode} vs float64")
    assert [type(s).__name__ for s in states] == [type(b.mixer.init_state(1)).__name__ for b in model.blocks], (
        "one state per layer, of each layer's own kind"
    )


def test_model_state_is_fixed_size_for_recurrent_layers_and_grows_for_attention():
    model = make(tiny_config(["retention", "softmax_attention", "linear_attention"]))
    tokens = tokens_for(model, 1, 30, 1)
    with torch.no_grad():
        _, short = model(tokens[:, :5], mode="chunkwise")
        _, long = model(tokens, mode="chunkwise")
    sizes = [(a.nbytes, b.nbytes) for a, b in zip(short, long, strict=True)]
    assert sizes[0][0] == sizes[0][1] and sizes[2][0] == sizes[2][1], "retention / linear state sizes are fixed"
    cache_bytes = [s[1].op.k.nbytes + s[1].op.v.nbytes for s in (short, long)]
    assert cache_bytes[1] == 6 * cache_bytes[0], "the KV cache grows with the tokens (5 -> 30)"
    assert state_nbytes(long) == sum(b for _, b in sizes)


def manual_sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> torch.Tensor:
    """The documented sampling rule, written out independently of ``models.generation.sample``."""
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:  # a top_k of at least the vocabulary keeps every token
        kth = scaled.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
        scaled = torch.where(scaled < kth, torch.full_like(scaled, -math.inf), scaled)
    return torch.multinomial(F.softmax(scaled, dim=-1), 1, generator=gen)


@settings(max_examples=scaled_examples(0.6))
@given(
    config=model_configs(),
    B=st.integers(1, 2),
    T=st.integers(1, 12),
    new=st.integers(0, 12),
    temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]),
    top_k=st.sampled_from([None, 1, 3]),
    seed=st.integers(0, 2**31 - 1),
    prefill=st.sampled_from(["chunkwise", "parallel", "recurrent"]),
)
def test_generate_is_a_seeded_decode_loop(config, B, T, new, temperature, top_k, seed, prefill):
    model = make(config, seed % 1000)
    prompt = tokens_for(model, B, T, seed)
    out = model.generate(prompt, new, temperature=temperature, top_k=top_k, seed=seed, prefill_mode=prefill)
    assert out.shape == (B, T + new) and torch.equal(out[:, :T], prompt)
    again = model.generate(prompt, new, temperature=temperature, top_k=top_k, seed=seed, prefill_mode=prefill)
    assert torch.equal(out, again), "a fixed seed gives the same tokens"
    # the same rule by hand, recomputing the whole sequence in parallel mode at every step (no states)
    gen = torch.Generator().manual_seed(seed)
    seq = prompt
    with torch.no_grad():
        for _ in range(new):
            logits, _ = model(seq, mode="parallel")
            seq = torch.cat([seq, manual_sample(logits[:, -1], temperature, top_k, gen)], dim=1)
    assert torch.equal(out, seq)


def test_every_registered_mixer_decodes_from_preallocated_states():
    """Every registered mixer (plugins included) takes ``max_len`` in ``init_state``, as ``TokenMixer`` says, so a
    hybrid of all of them generates from states preallocated for prompt + new tokens: greedy tokens equal the
    argmax of a full parallel forward at every step."""
    model = make(tiny_config(sorted(mixers.get_registry().mixers)))
    prompt = tokens_for(model, 2, 5, 3)
    out = model.generate(prompt, 4, temperature=0)
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq)[0][:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, seq)


def test_generate_seeds_shapes_and_modes():
    model = make(tiny_config(["retention", "softmax_attention"]))
    prompt = [3, 1, 4, 1, 5]
    a = model.generate(prompt, 20, seed=1)
    assert a.shape == (25,) and a[:5].tolist() == prompt, "a 1-D prompt gives a 1-D result"
    assert not torch.equal(a, model.generate(prompt, 20, seed=2)), "another seed, other tokens"
    assert torch.equal(model.generate(torch.tensor(prompt), 0), torch.tensor(prompt))
    model.train()
    model.generate(prompt, 2, seed=1)
    assert model.training, "generate restores training mode"
    streamed = torch.cat(list(model.stream(prompt, 20, seed=1)), dim=1)[0]
    assert torch.equal(streamed, a[5:])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m(torch.tensor([[0, 32]])), r"vocab_size=32\), got values in \[0, 32\]"),
        (lambda m: m(torch.tensor([[-1, 2]])), r"token ids must be in \[0, vocab_size=32\)"),
        (lambda m: m(torch.zeros(2, 3)), "integer tensor"),
        (lambda m: m(torch.zeros(3, dtype=torch.long)), r"shape \[B, T\]"),
        (lambda m: m(torch.zeros(1, 3, dtype=torch.long), [None]), "one state per layer \\(2\\), got 1"),
        (lambda m: m(torch.zeros(1, 3, dtype=torch.long), mode="fast"), "mode must be one of"),
        (lambda m: m.generate([], 3), "at least one token"),
        (lambda m: m.generate([1], 3, temperature=-1.0), "temperature"),
        (lambda m: m.generate([1], 3, top_k=0), "top_k"),
        (lambda m: m.generate([1], -1), "max_new_tokens"),
        (lambda m: m.generate([1], 3, prefill_mode="fast"), "prefill_mode"),
    ],
)
def test_bad_inputs_are_named(call, match):
    model = make(tiny_config(["retention", "softmax_attention"]))
    with pytest.raises((ValueError, TypeError), match=match):
        call(model)


def test_state_of_the_wrong_layer_kind_is_rejected():
    model = make(tiny_config(["retention", "softmax_attention"]))
    tokens = tokens_for(model, 1, 4, 0)
    _, states = model(tokens)
    with pytest.raises(TypeError, match="state.op must be a Tensor"):
        model(tokens, states[::-1])


def test_plugin_mixer_by_name(tmp_path, monkeypatch):
    """A mixer registered by a third-party distribution is a layer by name, and is listed in errors."""
    write_fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SEQMIXERS_PLUGINS", "fake_good")
    monkeypatch.delenv("SEQMIXERS_STRICT_PLUGINS", raising=False)
    try:
        monkeypatch.setattr(registry_module, "_REGISTRY", Registry().load())
        model = make(tiny_config(["fake_retention", "softmax_attention"]))
        tokens = tokens_for(model, 1, 9, 0)
        with torch.no_grad():
            ref, _ = model(tokens, mode="parallel")
            rec, _ = model(tokens, mode="recurrent")
        assert_rel_close(rec, ref, RTOL64, "plugin hybrid, recurrent vs parallel")
        assert type(model.blocks[0].mixer).__name__ == "MultiScaleRetention"
        with pytest.raises(ConfigError, match=r"unknown mixer 'fake_retnet'.*fake_retention \(plugin fake_good\)"):
            build_model(ModelConfig(layers=["fake_retnet"]))
    finally:
        forget_fake_modules()


def test_dropout_only_in_training():
    model = make(tiny_config(["retention"], dropout=0.5))
    tokens = tokens_for(model, 2, 8, 0)
    a, _ = model(tokens)
    b, _ = model(tokens)
    assert torch.equal(a, b), "eval mode: no dropout"
    model.train()
    c, _ = model(tokens)
    assert not torch.equal(a, c)


def test_tied_and_untied_embeddings():
    tied = build_model(tiny_config(["retention"], tie_embeddings=True))
    untied = build_model(tiny_config(["retention"]))  # the default: untied
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == 32 * 16


def test_bad_mixer_option_value_names_the_layer():
    with pytest.raises(ConfigError, match=r"layers\[1\]: could not build mixer 'softmax_attention'.*num_heads"):
        build_model(tiny_config(["retention", {"mixer": "softmax_attention", "num_heads": 3}]))
