"""Packed sequences and padded batches through mixers and whole models.

Properties (float64, every mode): a model run on documents packed in one row (``cu_seqlens``) gives each
document's logits as running it alone, with positions restarting at each document; a padded batch (left or right
padding, any ids in the padding) gives each row's logits and states as running its tokens alone, and decoding
continues each row as if it had been alone; the packed loss is the mean of the per-document losses. A mixer that
does not take ``cu_seqlens`` itself is run once per sequence by ``mix_packed`` and agrees with one that does.
The per-mixer properties (outputs, states and gradients, every registered mixer and backend) are kit checks:
``packed_equals_separate`` and ``padded_equals_separate`` in ``mixers.testing.conformance``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mixers
from mixers.functional import MODES
from mixers.interface import mix_packed
from mixers.registry import get_registry
from mixers.retention import MultiScaleRetention
from mixers.testing.asserts import assert_states_close
from mixers.testing.strategies import scaled_examples
from models.lm import build_model

V = 40
LAYERS = {
    "retnet-conv": [{"mixer": "retention", "conv_size": 4}, {"mixer": "retention"}],
    "hybrid": [{"mixer": "linear_attention", "conv_size": 3}, {"mixer": "softmax_attention"}],
}
if "short_conv" in get_registry().mixers:  # the example plugin, where installed
    LAYERS["conv-plugin"] = [{"mixer": "short_conv"}, {"mixer": "retention"}]
MODELS: dict[str, torch.nn.Module] = {}


def model(name: str):
    if name not in MODELS:
        torch.manual_seed(0)
        layers = LAYERS[name]
        MODELS[name] = build_model(dict(vocab_size=V, d_model=32, n_layers=len(layers), layers=layers)).double().eval()
    return MODELS[name]


def documents(lengths: list[int], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=gen) for n in lengths]


def cu_of(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


@pytest.mark.parametrize("name", sorted(LAYERS))
@settings(max_examples=scaled_examples(0.2), deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=4).filter(sum),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 1000),
)
def test_packed_documents_give_each_documents_logits(name, lengths, mode, seed):
    m, docs = model(name), documents(lengths, seed)
    logits, states = m(torch.cat(docs)[None], mode=mode, chunk_size=3, cu_seqlens=cu_of(lengths))
    start = 0
    for n, doc in enumerate(docs):
        if len(doc):
            alone, alone_states = m(doc[None], mode=mode, chunk_size=3)
            torch.testing.assert_close(logits[:, start : start + len(doc)], alone, rtol=1e-9, atol=1e-9)
            for layer, (s, a) in enumerate(zip(states, alone_states, strict=True)):
                assert_states_close(s.reorder(torch.tensor([n])), a, 1e-9, f"document {n}, layer {layer}")
        else:
            assert all(int(s.pos[n]) == 0 for s in states), "an empty document moved its state"
        start += len(doc)
    last, _ = m(torch.cat(docs)[None], mode=mode, chunk_size=3, cu_seqlens=cu_of(lengths), last_only=True)
    assert last.shape == (len(docs), 1, V)
    for n, doc in enumerate(docs):
        want = logits[0, int(cu_of(lengths)[n + 1]) - 1] if len(doc) else torch.zeros(V, dtype=logits.dtype)
        torch.testing.assert_close(last[n, 0], want, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_each_rows_logits_and_continues_each_row(name, side):
    m, lengths = model(name), [5, 1, 8, 3]
    docs, T = documents(lengths, 1), max(lengths)
    tokens = torch.full((len(docs), T), 10_000)  # the padding holds ids no embedding has
    mask = torch.zeros(len(docs), T, dtype=torch.int32)
    for b, doc in enumerate(docs):
        where = slice(T - len(doc), T) if side == "left" else slice(0, len(doc))
        tokens[b, where], mask[b, where] = doc, 1
    for mode in MODES:
        logits, states = m(tokens, mode=mode, attention_mask=mask)
        assert (logits[mask == 0] == 0).all()
        last, _ = m(tokens, mode=mode, attention_mask=mask, last_only=True)
        nxt = torch.randint(0, V, (len(docs), 2), generator=torch.Generator().manual_seed(2))
        cont, _ = m(nxt, states, mode="recurrent")  # rows at their own positions, no mask needed
        for b, doc in enumerate(docs):
            alone, alone_states = m(doc[None], mode=mode)
            torch.testing.assert_close(logits[b][mask[b] == 1][None], alone, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(last[b, 0], alone[0, -1], rtol=1e-9, atol=1e-9)
            alone_cont, _ = m(nxt[b : b + 1], alone_states, mode="recurrent")
            torch.testing.assert_close(cont[b : b + 1], alone_cont, rtol=1e-9, atol=1e-9)


def test_packed_loss_is_the_mean_of_per_document_losses():
    """Training on packed documents computes per-document training's loss: the target of each document's last
    token (the next document's first) is ignored, and the rest is the mean over every document's predictions."""
    m, lengths = model("hybrid"), [6, 1, 9, 4]
    docs = documents(lengths, 3)
    packed = torch.cat(docs)
    targets = torch.cat([torch.cat([d[1:], torch.tensor([-100])]) for d in docs])  # -100: ignored
    logits, _ = m(packed[None], cu_seqlens=cu_of(lengths))
    loss = F.cross_entropy(logits[0], targets, ignore_index=-100)
    total = sum(F.cross_entropy(m(d[None])[0][0, :-1], d[1:], reduction="sum") for d in docs if len(d) > 1)
    torch.testing.assert_close(loss, total / sum(len(d) - 1 for d in docs), rtol=1e-12, atol=0)


class PerSequenceRetention(MultiScaleRetention):
    """Retention as a mixer that does not take ``cu_seqlens``: ``mix_packed`` runs it once per sequence."""

    packs = False


@pytest.mark.parametrize("mode", MODES)
def test_a_mixer_without_packing_is_run_per_sequence_and_agrees(mode):
    torch.manual_seed(0)
    fused = mixers.build("retention", 16, conv_size=3).double()
    fallback = PerSequenceRetention(16, conv_size=3).double()
    fallback.load_state_dict(fused.state_dict())
    x, cu = torch.randn(1, 11, 16, dtype=torch.float64), torch.tensor([0, 4, 4, 5, 11])
    _, prefix = fused(torch.randn(4, 2, 16, dtype=torch.float64))
    y, s = mix_packed(fused, x, prefix, cu, mode=mode, chunk_size=2)
    y_fb, s_fb = mix_packed(fallback, x, prefix, cu, mode=mode, chunk_size=2)
    torch.testing.assert_close(y_fb, y, rtol=1e-10, atol=1e-12)
    assert_states_close(s_fb, s, 1e-10)


def test_positions_restart_at_each_sequence():
    """Two identical documents packed together give identical logits (the second is not at positions 5..9)."""
    m = model("hybrid")
    doc = documents([5], 4)[0]
    logits, _ = m(torch.cat([doc, doc])[None], cu_seqlens=torch.tensor([0, 5, 10]))
    torch.testing.assert_close(logits[:, 5:], logits[:, :5], rtol=1e-12, atol=1e-12)
    unpacked, _ = m(torch.cat([doc, doc])[None])
    assert not torch.allclose(unpacked[:, 5:], unpacked[:, :5]), "without packing the second copy sees the first"


def test_bad_packed_and_padded_input_is_refused_by_name():
    m = model("hybrid")
    tokens = torch.randint(0, V, (1, 6))
    cases = [
        (lambda: m(tokens.repeat(2, 1), cu_seqlens=torch.tensor([0, 6])), ["one row", "[1, T]"]),
        (lambda: m(tokens, cu_seqlens=torch.tensor([1, 6])), ["start at 0", "got 1"]),
        (lambda: m(tokens, cu_seqlens=torch.tensor([0, 5])), ["end at the packed length T = 6", "got 5"]),
        (lambda: m(tokens, cu_seqlens=torch.tensor([0, 4, 2, 6])), ["must not decrease", "4 then 2"]),
        (lambda: m(tokens, cu_seqlens=torch.tensor([0.0, 6.0])), ["int32 or torch.int64", "float32"]),
        (lambda: m(tokens, cu_seqlens=torch.tensor([0, 6], device="meta")), ["device", "meta"]),
        (lambda: m(tokens, attention_mask=torch.ones(1, 5)), ["[B, T] = [1, 6]", "[1, 5]"]),
        (lambda: m(tokens, attention_mask=torch.tensor([[1, 0, 1, 1, 1, 1]])), ["hole"]),
        (lambda: m(tokens, attention_mask=torch.ones(1, 6), cu_seqlens=torch.tensor([0, 6])), ["not both"]),
        (lambda: m(torch.tensor([[V, 1, 2]]), attention_mask=torch.tensor([[1, 1, 1]])), ["vocab_size=40"]),
    ]
    _, states = m(torch.randint(0, V, (3, 2)))
    cases.append((lambda: m(tokens, states, cu_seqlens=torch.tensor([0, 2, 6])), ["2 sequences", "holds 3"]))
    for i, (call, fragments) in enumerate(cases):
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert all(f in str(info.value) for f in fragments), f"case {i}: {info.value!r} lacks {fragments}"
    # The padding may hold any id: only real tokens are checked.
    m(torch.tensor([[V + 5, 1, 2]]), attention_mask=torch.tensor([[0, 1, 1]]))
