"""Per-row positions, the rotary module's phase cache, the static decode path and run-time backend switching.

- Rows of one batch at different positions compute what each row computes alone, for every built-in mixer
  and mode (the mixer state is the op's state plus ``pos [B]``).
- The rotary module's cached phase table gives the same bits as phases computed from positions.
- ``generate`` decodes against preallocated caches written in place, with the tokens of a plain loop over
  ``model(token, states)``; its decode step compiles into one graph, reused for every token.
- ``model.set_backend`` switches backends at run time, all or nothing, and refuses unknown names.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

import mixers
from mixers.interface import MixerState
from mixers.layers import Rotary
from mixers.structure import map_structure, tensors_in
from models import build_model
from tests.models_helpers import tiny_config

MIXERS = [
    ("retention", {"num_heads": 2}),
    ("retention", {"num_heads": 2, "conv_size": 3}),
    ("linear_attention", {"num_heads": 2}),
    ("softmax_attention", {"num_heads": 2, "num_kv_heads": 1}),
]


def cat_rows(states: list[MixerState]) -> MixerState:
    """One state holding the rows of ``states`` (each built for one row), field by field."""
    fields = {}
    for f in dataclasses.fields(states[0]):
        parts = [getattr(s, f.name) for s in states]
        leaves = [tensors_in(p) for p in parts]  # the same structure in every state
        joined = iter([torch.cat(group) for group in zip(*leaves, strict=True)])
        fields[f.name] = map_structure(parts[0], lambda _t, it=joined: next(it))
    return type(states[0])(**fields)


@pytest.mark.parametrize("name,options", MIXERS, ids=lambda v: v if isinstance(v, str) else ",".join(map(str, v)))
def test_rows_at_different_positions_equal_each_row_alone(name, options):
    torch.manual_seed(0)
    mixer = mixers.build(name, 16, **options).double()
    x = torch.randn(3, 14, 16, dtype=torch.float64)
    cuts = [2, 7, 0]  # each row has consumed a prefix of its own length
    alone, states = [], []
    for b, cut in enumerate(cuts):
        s = mixer.init_state(1, dtype=torch.float64, max_len=16)
        _, s = mixer(x[b : b + 1, :cut], s)
        states.append(s)
        alone.append(mixer(x[b : b + 1, cut : cut + 5], s)[0])
    batched = cat_rows(states)
    assert batched.pos.tolist() == cuts
    x_next = torch.stack([x[b, cut : cut + 5] for b, cut in enumerate(cuts)])
    for mode in ("parallel", "chunkwise", "recurrent"):
        y, after = mixer(x_next, batched, mode=mode, chunk_size=2)
        torch.testing.assert_close(y, torch.cat(alone), rtol=1e-10, atol=1e-10, msg=f"{name} {mode}")
        assert after.pos.tolist() == [c + 5 for c in cuts]
    with pytest.raises(ValueError, match="different positions"):
        _ = after.offset  # one int cannot say where the rows are


def test_a_state_with_malformed_positions_is_refused():
    mixer = mixers.build("retention", 16, num_heads=2)
    state = mixer.init_state(2)
    x = torch.randn(2, 3, 16)
    for pos, fragment in [(torch.zeros(2), "int64"), (torch.zeros(2, 1, dtype=torch.int64), "[2]"), ([0, 0], "list")]:
        with pytest.raises((TypeError, ValueError), match="state.pos") as info:
            mixer(x, dataclasses.replace(state, pos=pos))
        assert fragment in str(info.value)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_the_cached_phase_table_equals_phases_from_positions(layout):
    rope = Rotary(8, layout=layout)
    for dtype in (torch.complex64, torch.complex128):
        table = rope.phases(None, 37, torch.device("cpu"), dtype)
        direct = rope.phases(torch.zeros(1, dtype=torch.int64), 37, torch.device("cpu"), dtype)[0]
        assert table.shape == (37, 4) and torch.equal(table, direct)
        assert torch.equal(rope.phases(None, 5, torch.device("cpu"), dtype), table[:5])  # served from the table
    x = torch.randn(2, 37, 3, 8)
    assert torch.equal(rope(x, None), rope(x, torch.zeros(2, dtype=torch.int64)))


def test_angles_stay_float64_when_the_model_is_cast():
    model = build_model(tiny_config(["retention", "softmax_attention"])).to(torch.bfloat16)
    for block in model.blocks:
        assert block.mixer.rope.theta.dtype == torch.float64


def _model(layers):
    torch.manual_seed(0)
    return build_model(tiny_config(layers)).eval()


HYBRID = ["retention", "softmax_attention", "linear_attention"]


def _plain_loop(model, prompt: Tensor, n: int) -> Tensor:
    """Greedy decoding the plain way: no preallocation, the caches grow as tokens come."""
    logits, states = model(prompt, mode="chunkwise")
    out = []
    for _ in range(n):
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
        logits, states = model(token, states, mode="recurrent")
    return torch.cat(out, dim=1)


def test_generate_decodes_against_preallocated_caches_with_the_tokens_of_a_plain_loop():
    model = _model(HYBRID)
    prompt = torch.randint(0, 32, (2, 6))
    with torch.no_grad():
        want = _plain_loop(model, prompt, 10)
    assert torch.equal(model.generate(prompt, 10, temperature=0)[:, 6:], want)
    states = model.init_states(2, max_len=16)
    buffers = states[1].op.k.data_ptr(), states[1].op.v.data_ptr()
    with torch.no_grad():
        logits, states = model(prompt, states, mode="chunkwise")
        for _ in range(10):
            logits, states = model._decode_step(logits[:, -1].argmax(-1, keepdim=True), states)
    assert (states[1].op.k.data_ptr(), states[1].op.v.data_ptr()) == buffers, "the cache was reallocated"
    assert states[1].op.k.shape[2] == 16 and states[1].op.length.tolist() == [16, 16]


def test_the_decode_step_compiles_into_one_graph_reused_for_every_token():
    """Positions are tensors and the caches preallocated: 100 steps, one compilation, no graph break (the issue
    allows two)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _model(HYBRID)
    prompt = torch.randint(0, 32, (2, 5))
    with torch.no_grad():
        want = _plain_loop(model, prompt, 100)
        counter = CompileCounter()
        step = torch.compile(model._decode_step, backend=counter, fullgraph=True, dynamic=False)
        states = model.init_states(2, max_len=105)
        logits, states = model(prompt, states, mode="chunkwise")
        got = []
        for _ in range(100):
            token = logits[:, -1].argmax(-1, keepdim=True)
            got.append(token)
            logits, states = step(token, states)
    assert torch.equal(torch.cat(got, dim=1), want)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 100 tokens"
    torch._dynamo.reset()


def test_generate_with_compile_gives_the_eager_tokens():
    """End to end with inductor (the default torch.compile backend) on a one-layer model, to keep it quick."""
    torch._dynamo.reset()
    model = _model(["softmax_attention"])
    prompt = torch.randint(0, 32, (1, 4))
    eager = model.generate(prompt, 8, temperature=0)
    assert torch.equal(model.generate(prompt, 8, temperature=0, compile=True), eager)
    assert list(model._compiled_steps) == ["default"]  # made once, kept for later calls
    with pytest.raises(TypeError, match="compile must be a bool or a torch.compile mode name"):
        model.generate(prompt, 2, compile=1.5)
    torch._dynamo.reset()


def test_set_backend_switches_all_layers_or_the_chosen_ones_and_refuses_unknown_names():
    model = _model(HYBRID)
    model.set_backend("torch")
    assert [b.mixer.backend for b in model.blocks] == ["torch"] * 3
    model.set_backend("auto", layers=[0])
    assert [b.mixer.backend for b in model.blocks] == ["auto", "torch", "torch"]
    with pytest.raises(ValueError, match=r"unknown backend 'nope' for .*expected 'auto' or one of \["):
        model.set_backend("nope")
    assert [b.mixer.backend for b in model.blocks] == ["auto", "torch", "torch"], "a failed switch changed layers"
    with pytest.raises(ValueError, match=r"layers must hold layer indices in \[0, 3\), got 7"):
        model.set_backend("torch", layers=[7])
    with pytest.raises(ValueError, match="unknown backend 'cuda-magic'"):
        mixers.build("retention", 16, num_heads=2, backend="cuda-magic")  # checked when the mixer is built
    tokens = torch.randint(0, 32, (1, 5))
    model.set_backend("torch")
    torch.testing.assert_close(model(tokens)[0], _model(HYBRID)(tokens)[0])
