"""Conformance suite: every registered mixer, with every available backend of its ops, honours the
``TokenMixer`` contract. A newly registered mixer or backend is covered without new test code.

Properties: the three modes agree (chunkwise with chunk sizes that do and don't divide T), any split with
state hand-over equals one pass (in mixed modes), gradients w.r.t. the input and the parameters agree
between modes, causality, batch independence, dtype/shape preservation, and clear errors on bad input.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mixers
from mixers import MixerState, TokenMixer
from tests.strategies import MODES, assert_rel_close, norm_rel_error, scaled_examples, segments

D_MODEL, NUM_HEADS = 16, 2
CHUNKED = [
    ("parallel", None),
    ("recurrent", None),
    ("chunkwise", None),
    ("chunkwise", 1),
    ("chunkwise", 4),
    ("chunkwise", 5),
    ("chunkwise", 13),
    ("chunkwise", 20),
]


def _cases() -> list:
    registry = mixers.get_registry()
    available = registry.available()
    return [
        pytest.param(name, backend, id=f"{name}-{backend}")
        for name in sorted(registry.mixers)
        for backend in [*available[name], "auto"]
    ]


CASES = _cases()
pytestmark = pytest.mark.parametrize(("name", "backend"), CASES)


@functools.cache
def _mixer(name: str, backend: str, dtype: torch.dtype) -> TokenMixer:
    torch.manual_seed(0)
    return mixers.build(name, D_MODEL, num_heads=NUM_HEADS, backend=backend).to(dtype)


def get_mixer(name: str, backend: str, dtype: torch.dtype = torch.float64) -> TokenMixer:
    """A built mixer (cached: tests only read it; gradients are taken with ``torch.autograd.grad``)."""
    mixer = _mixer(name, backend, dtype)
    assert isinstance(mixer, TokenMixer)
    return mixer


def inputs(B: int = 2, T: int = 13, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D_MODEL, generator=gen, dtype=torch.float64).to(dtype)


def assert_states_close(got: MixerState, want: MixerState, rtol: float, what: str = "state") -> None:
    """Same state type; tensor fields close (same shape and dtype), other fields equal."""
    assert type(got) is type(want), f"{what}: {type(got).__name__} != {type(want).__name__}"
    for f in dataclasses.fields(want):
        a, b = getattr(got, f.name), getattr(want, f.name)
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype, f"{what}.{f.name}: dtype {a.dtype} != {b.dtype}"
            assert_rel_close(a, b, rtol, f"{what}.{f.name}")
        else:
            assert a == b, f"{what}.{f.name}: {a!r} != {b!r}"


def run_split(mixer, x, plan, state=None):
    """Run ``x`` in segments ``(start, stop, mode, chunk_size)``, handing the state over."""
    outs = []
    for start, stop, mode, chunk_size in plan:
        y, state = mixer(x[:, start:stop], state, mode=mode, chunk_size=chunk_size)
        outs.append(y)
    return torch.cat(outs, dim=1), state


def test_mixer_has_an_available_backend(name, backend):
    """Every registered mixer can run here (so it appears in this suite), and the backend is one of its ops'."""
    assert mixers.available()[name], f"no available backend serves {name!r}"
    if backend != "auto":
        ops = mixers.get_registry().mixers[name].ops
        assert any(backend in mixers.get_registry().backends.get(op, {}) for op in ops)


def test_modes_agree(name, backend):
    mixer = get_mixer(name, backend)
    x = inputs()
    y_par, s_par = mixer(x, mode="parallel")
    assert y_par.shape == x.shape and y_par.dtype == x.dtype
    assert y_par.abs().max() > 1e-6, "output is identically zero: nothing would be tested"
    assert s_par.offset == x.shape[1]
    for mode, chunk_size in CHUNKED:
        y, s = mixer(x, mode=mode, chunk_size=chunk_size)
        assert_rel_close(y, y_par, 1e-10, f"{mode} (chunk {chunk_size}) output")
        assert_states_close(s, s_par, 1e-10, f"{mode} (chunk {chunk_size}) state")


def test_modes_agree_in_float32(name, backend):
    mixer = get_mixer(name, backend, torch.float32)
    x = inputs(T=40, dtype=torch.float32)
    y_par, s_par = mixer(x, mode="parallel")
    assert y_par.dtype == torch.float32
    for mode, chunk_size in [("recurrent", None), ("chunkwise", 7), ("chunkwise", 16)]:
        y, s = mixer(x, mode=mode, chunk_size=chunk_size)
        assert_rel_close(y, y_par, 1e-5, f"{mode} (chunk {chunk_size}) output")
        assert_states_close(s, s_par, 1e-5, f"{mode} (chunk {chunk_size}) state")


@st.composite
def split_plans(draw, max_T: int = 24):
    T = draw(st.integers(1, max_T))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, T - 1)), max_size=3)))) if T > 1 else []
    return T, [
        (start, stop, draw(st.sampled_from(MODES)), draw(st.integers(1, stop - start + 3)))
        for start, stop in segments(T, cuts)
    ]


@settings(max_examples=scaled_examples(0.4))
@given(plan=split_plans(), B=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_any_split_equals_one_pass(name, backend, plan, B, seed):
    T, plan = plan
    mixer = get_mixer(name, backend)
    x = inputs(B=B, T=T, seed=seed)
    y_whole, s_whole = mixer(x)
    y_split, s_split = run_split(mixer, x, plan)
    assert_rel_close(y_split, y_whole, 1e-10, f"outputs, plan {plan}")
    assert_states_close(s_split, s_whole, 1e-10, f"final state, plan {plan}")


def test_empty_input_keeps_the_state(name, backend):
    mixer = get_mixer(name, backend)
    x = inputs(T=6)
    _, state = mixer(x)
    for mode in MODES:
        y, after = mixer(x[:, :0], state, mode=mode, chunk_size=4)
        assert y.shape == (2, 0, D_MODEL)
        assert_states_close(after, state, 0.0, f"{mode}: state after an empty input")


def grads(mixer, x, weight, fn):
    """Gradients of ``sum(fn(x) * weight)`` w.r.t. ``x`` and every parameter."""
    x = x.detach().requires_grad_(True)
    params = [p for p in mixer.parameters() if p.requires_grad]
    loss = (fn(x) * weight).sum()
    return torch.autograd.grad(loss, [x, *params], allow_unused=True)


def test_gradients_agree_between_modes(name, backend):
    mixer = get_mixer(name, backend)
    x = inputs(T=11)
    weight = inputs(T=11, seed=1)
    runs = {
        "parallel": lambda x: mixer(x, mode="parallel")[0],
        "chunkwise": lambda x: mixer(x, mode="chunkwise", chunk_size=3)[0],
        "recurrent": lambda x: mixer(x, mode="recurrent")[0],
        "split": lambda x: run_split(
            mixer, x, [(0, 4, "recurrent", None), (4, 5, "parallel", None), (5, 11, "chunkwise", 4)]
        )[0],
    }
    expected = grads(mixer, x, weight, runs.pop("parallel"))
    names = ["x", *(n for n, p in mixer.named_parameters() if p.requires_grad)]
    assert expected[0] is not None and expected[0].abs().max() > 0
    for run, fn in runs.items():
        for param, got, want in zip(names, grads(mixer, x, weight, fn), expected, strict=True):
            assert (got is None) == (want is None), f"{run}: d/d{param} missing in one mode"
            if want is not None:
                assert_rel_close(got, want, 1e-9, f"{run}: d/d{param}")


@pytest.mark.parametrize("mode", MODES)
def test_causality(name, backend, mode):
    """Changing tokens from position t on leaves the outputs before t unchanged (and changes later ones)."""
    mixer = get_mixer(name, backend)
    x = inputs(T=13)
    changed = x.clone()
    changed[:, 7:] = inputs(T=6, seed=5)
    y, _ = mixer(x, mode=mode, chunk_size=5)
    y_changed, _ = mixer(changed, mode=mode, chunk_size=5)
    assert_rel_close(y_changed[:, :7], y[:, :7], 1e-12, "outputs before the change")
    assert (y_changed[:, 7:] - y[:, 7:]).abs().max() > 1e-6, "later outputs ignore their tokens"


@pytest.mark.parametrize("mode", MODES)
def test_batch_independence(name, backend, mode):
    """Each batch entry's output and state depend on that entry only, also when continuing a state."""
    mixer = get_mixer(name, backend)
    x = inputs(B=3, T=9)
    _, state = mixer(inputs(B=3, T=4, seed=2))
    y, s = mixer(x, state, mode=mode, chunk_size=4)
    for b in range(3):
        one = slice(b, b + 1)
        y_b, s_b = mixer(x[one], state.map_tensors(lambda t, one=one: t[one]), mode=mode, chunk_size=4)
        assert_rel_close(y_b, y[one], 1e-10, f"entry {b} output")
        assert_states_close(s_b, s.map_tensors(lambda t, one=one: t[one]), 1e-10, f"entry {b} state")


def test_reordered_state_follows_its_batch_entries(name, backend):
    """Beam search: ``state.reorder(index)`` continues the reordered entries."""
    mixer = get_mixer(name, backend)
    x = inputs(B=3, T=10)
    index = torch.tensor([2, 0, 0])
    expected, _ = mixer(x[index])
    _, state = mixer(x[:, :6])
    y, _ = mixer(x[index, 6:], state.reorder(index), mode="recurrent")
    assert_rel_close(y, expected[:, 6:], 1e-10, "reordered continuation")


def test_init_state_is_the_empty_history(name, backend):
    mixer = get_mixer(name, backend)
    x = inputs()
    state = mixer.init_state(2, dtype=torch.float64)
    assert state.offset == 0
    for mode in MODES:
        y, s = mixer(x, state, mode=mode, chunk_size=4)
        y_none, s_none = mixer(x, mode=mode, chunk_size=4)
        assert_rel_close(y, y_none, 1e-12, f"{mode} output")
        assert_states_close(s, s_none, 1e-12, f"{mode} state")


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_within_2e_2_of_float64(name, backend, mode):
    """A bf16 module on bf16 input gives bf16 output within 2e-2 of the same weights in float64."""
    mixer = get_mixer(name, backend, torch.bfloat16)
    x = inputs(T=32, dtype=torch.bfloat16)
    y, _ = mixer(x, mode=mode, chunk_size=8)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y).all()
    reference = mixers.build(name, D_MODEL, num_heads=NUM_HEADS, backend=backend).double()
    reference.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in mixer.state_dict().items()})
    y_ref, _ = reference(x.double())  # the same (bf16-rounded) weights and inputs, in float64
    assert norm_rel_error(y, y_ref) < 2e-2


def test_rejects_bad_input(name, backend):
    mixer = get_mixer(name, backend, torch.float32)
    x = inputs(B=2, T=5, dtype=torch.float32)
    _, state = mixer(x)
    bad = [
        (lambda: mixer(x[0]), [str(D_MODEL), "[5, 16]"]),  # rank 2
        (lambda: mixer(x[None]), [str(D_MODEL), "[1, 2, 5, 16]"]),  # rank 4
        (lambda: mixer(x[..., :-1]), [str(D_MODEL), "15"]),  # width
        (lambda: mixer(inputs(B=5, T=3, dtype=torch.float32), state), ["2", "5"]),  # state of another batch size
        (lambda: mixer(x, mode="sideways"), ["'sideways'", "'parallel'"]),
    ]
    for call, fragments in bad:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        missing = [f for f in fragments if f not in str(info.value)]
        assert not missing, f"error {info.value!r} lacks {missing}"
