"""The conformance suite, as functions: check any registered mixer, or any backend of an op, by name.

``check_mixer(name, backend)`` checks the ``TokenMixer`` contract: the three representations agree
(chunkwise with chunk sizes that do and don't divide T), any split with state hand-over equals one pass,
gradients agree between modes, causality (also of a NaN or inf input), batch independence, beam-search
reordering, the empty history, low precision, the same outputs as the reference backend, and clear errors
on bad input.

``check_op_backend(op, backend)`` checks one backend of an op against a float64 reference written from
the formula: every mode, any split with state hand-over, gradients, low precision, causality of a NaN or
inf input (of the outputs and of the gradients), packed sequences, and bad input.

Packed sequences are checked on both paths: the backend's own (``Backend.packs``: the whole packed row in one
call) and the op's per-sequence loop (``per_sequence``), each against running every sequence alone.

Both raise ``ConformanceError`` (an ``AssertionError``) listing every failed check; a property that
hypothesis falsified comes with its shrunk counterexample, reported by the kit itself in one line
(``counterexample: check 'handover', mode 'split': case_plan=...``) and kept as data in
``ConformanceError.counterexamples``, so the report reads the same whatever hypothesis's version prints.
Each check is also available on its own (``MIXER_CHECKS``, ``OP_CHECKS``, ``run_check``), which is how the
pytest plugin makes one test per check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky
from torch import Tensor

import mixers
from mixers import registry as registry_module
from mixers.catalogue import Backend
from mixers.interface import MixerState, TokenMixer, mix_packed, mix_padded
from mixers.ops.checks import MODES
from mixers.registry import Registry, get_registry
from mixers.structure import map_structure
from mixers.testing.asserts import RTOL, assert_raises_mentioning, assert_rel_close, assert_states_close, norm_rel_error
from mixers.testing.ops import KEEP, OpSpec, get_op_spec, standard_bad_inputs, state_tensors
from mixers.testing.strategies import OpInputs, handover_plans, mixer_split_plans, scaled_examples

__all__ = [
    "D_MODEL",
    "MIXER_CHECKS",
    "NUM_HEADS",
    "OP_CHECKS",
    "REFERENCE_BACKEND",
    "BackendUnavailable",
    "Check",
    "CheckCase",
    "CheckNotApplicable",
    "ConformanceError",
    "Counterexample",
    "MixerTarget",
    "OpTarget",
    "builtin_registry",
    "check_cases",
    "check_mixer",
    "check_op_backend",
    "mixer_target",
    "mixer_targets",
    "op_target",
    "op_targets",
    "represents_op",
    "run_check",
    "using_registry",
]

D_MODEL, NUM_HEADS = 16, 2
NON_FINITE = ("nan", "inf", "-inf")  # what the non-finite checks put into an input
REFERENCE_BACKEND = "torch"  # the backend other backends of an op are compared with
LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Counterexample:
    """The input a property check failed on, after hypothesis shrank it, as the kit reports it.

    ``inputs`` are the property's arguments by name (a core op's case is a ``RetentionCase`` or the like,
    whose repr is the whole input); ``mode`` is the mode whose comparison failed, ``"split"`` for a run
    split into pieces with the state handed over (the plan is in the inputs), or ``None`` when the check
    does not loop over modes. The kit formats this itself: hypothesis's own report is worded differently
    from one version to the next, and plugin authors' tests should be able to rely on ours.
    """

    check: str
    mode: str | None
    inputs: tuple[tuple[str, Any], ...]

    def __str__(self) -> str:
        where = f", mode {self.mode!r}" if self.mode is not None else ""
        args = ", ".join(f"{name}={value!r}" for name, value in self.inputs)
        return f"counterexample: check {self.check!r}{where}: {args}"


class ConformanceError(AssertionError):
    """A mixer or backend broke the contract; the message says which check, how, and on what input.

    ``counterexamples`` holds the shrunk input of each failed property check (empty for the others).
    """

    def __init__(self, message: str, counterexamples: Iterable[Counterexample] = ()) -> None:
        super().__init__(message)
        self.counterexamples: tuple[Counterexample, ...] = tuple(counterexamples)


class BackendUnavailable(Exception):
    """The backend cannot run on this machine (the reason is the message); the pytest plugin skips."""


class CheckNotApplicable(Exception):
    """This check does not apply to this target (say, bfloat16 for a backend without it); it is skipped."""


@dataclass(frozen=True)
class Check:
    """One conformance check: ``fn(target)``, or ``fn(target, mode)`` once per mode when ``per_mode``.

    A ``hypothesis`` check is a property; it takes ``max_examples`` (``None``: the loaded profile's).
    A ``per_op`` check is about the op, not the backend: it is generated once per op (see ``check_cases``).
    """

    name: str
    fn: Callable[..., None]
    per_mode: bool = False
    hypothesis: bool = False
    applies: Callable[[Any], bool] | None = None  # known before running: not applicable -> not generated at all
    # An op-level check (of the op's validation, say): generated once per op, for the backend ``represents_op``
    # picks, not once per backend. ``check_op_backend`` still runs it on the backend it is given.
    per_op: bool = False

    def applies_to(self, target: Any) -> bool:
        if self.per_op and isinstance(target, OpTarget) and not represents_op(target):
            return False
        return self.applies is None or self.applies(target)

    @property
    def doc(self) -> str:
        """The first sentence of the check's docstring: up to a full stop followed by a capital letter (so that an
        abbreviation such as "w.r.t." does not end it)."""
        text = " ".join((self.fn.__doc__ or "").split())
        return re.split(r"(?<=\.) (?=[A-Z])", text)[0].rstrip(".") + "." if text else ""


# -- hypothesis inside a function ----------------------------------------------------------------------
# What the running property is doing now (the mode it compares), so that a failure can say where it failed.
_TRAIL: dict[str, Any] = {}


def _at(mode: str) -> None:
    """Note the mode a property is about to compare in, for the counterexample report."""
    _TRAIL["mode"] = mode


class _PropertyFailed(Exception):
    """A property failed: the shrunk inputs, the mode, and the error of the last failing call.

    ``flaky``: hypothesis could not make the failure happen again on the same input.
    """

    def __init__(
        self, error: BaseException, inputs: tuple[tuple[str, Any], ...], mode: str | None, flaky: bool
    ) -> None:
        super().__init__(str(error))
        self.error, self.inputs, self.mode, self.flaky = error, inputs, mode, flaky


def _property(test: Callable[..., None], max_examples: int | None, **strategies: st.SearchStrategy[Any]) -> None:
    """Run ``test`` as a hypothesis property under the loaded profile (shrinking included).

    A failure is raised as ``_PropertyFailed`` with the inputs, mode and error of the last failing call:
    hypothesis replays the shrunk example last, so those are the shrunk inputs, recorded here rather than
    read from hypothesis's report (whose wording and structure change between its versions).
    """
    configured = settings(
        parent=settings.default,
        max_examples=max_examples or settings.default.max_examples,
        deadline=None,
        report_multiple_bugs=False,
        # The property is the kit's inner function: a @reproduce_failure blob or a list of the kit's lines
        # run only by failing examples would point the reader at code they cannot decorate or change.
        print_blob=False,
        phases=[phase for phase in settings.default.phases if phase is not Phase.explain],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    failed: list[Any] = []  # [inputs, mode, error] of the last failing call

    @functools.wraps(test)
    def recorded(**kwargs: Any) -> None:
        _TRAIL.clear()
        try:
            test(**kwargs)
        except Exception as exc:
            failed[:] = [tuple(kwargs.items()), _TRAIL.get("mode"), exc]
            raise

    try:
        configured(given(**strategies)(recorded))()
    except Exception as exc:
        if not failed:
            raise
        inputs, mode, error = failed
        raise _PropertyFailed(error, inputs, mode, flaky=isinstance(exc, Flaky)) from exc
    finally:
        _TRAIL.clear()


def _tol(target: MixerTarget | OpTarget, f64: float, f32: float) -> float:
    if target.rtol is not None:
        return target.rtol
    return f64 if target.dtype == torch.float64 else f32


# -- mixers ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixerTarget:
    """A mixer built by name with one backend, and where and in what precision to check it.

    ``dtype`` is the most precise dtype the backend takes (float64, else float32); ``modes`` the modes it
    computes; ``rtol`` overrides the tolerance of comparisons in ``dtype`` (for a backend that rounds more,
    such as TF32 kernels). ``options`` are passed to the mixer's factory with ``backend``.
    """

    name: str
    backend: str = "auto"
    options: tuple[tuple[str, Any], ...] = ()
    d_model: int = D_MODEL
    device: str = "cpu"
    dtype: torch.dtype = torch.float64
    modes: tuple[str, ...] = MODES
    low_precision: tuple[torch.dtype, ...] = (torch.bfloat16,)
    rtol: float | None = None

    @property
    def id(self) -> str:
        extra = "".join(f"-{k}={v}" for k, v in self.options if k != "num_heads")  # the options that set it apart
        return f"{self.name}-{self.backend}{extra}"

    def build(self, dtype: torch.dtype | None = None, backend: str | None = None) -> TokenMixer:
        """The mixer in ``dtype`` (default: the target's), its weights drawn from seed 0; cached, read-only."""
        return _build(self, dtype or self.dtype, backend or self.backend)

    def inputs(self, B: int = 2, T: int = 13, seed: int = 0, dtype: torch.dtype | None = None) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(B, T, self.d_model, generator=gen, dtype=torch.float64)
        return x.to(device=self.device, dtype=dtype or self.dtype)


def _fresh_build(target: MixerTarget, dtype: torch.dtype, backend: str) -> TokenMixer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mixer = mixers.build(target.name, target.d_model, **dict(target.options), backend=backend)
    assert isinstance(mixer, TokenMixer), f"mixer {target.name!r} built a {type(mixer).__name__}, not a TokenMixer"
    return mixer.to(device=target.device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _cached_build(target: MixerTarget, dtype: torch.dtype, backend: str) -> TokenMixer:
    return _fresh_build(target, dtype, backend)


def _build(target: MixerTarget, dtype: torch.dtype, backend: str) -> TokenMixer:
    try:
        hash(target)
    except TypeError:  # unhashable options: build afresh every time
        return _fresh_build(target, dtype, backend)
    return _cached_build(target, dtype, backend)


def _accepts(factory: Callable[..., Any], option: str) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == option or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _backends_of(name: str, backend: str) -> list[Backend]:
    """The named backend's entries for each op of the mixer (checking it exists and is available)."""
    registry = get_registry()
    if name not in registry.mixers:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {sorted(registry.mixers)}")
    if backend == "auto":
        return []
    ops = registry.mixers[name].ops
    found = [registry.backends[op][backend] for op in ops if backend in registry.backends.get(op, {})]
    if not found:
        known = sorted({b for op in ops for b in registry.backends.get(op, {})})
        raise ValueError(f"no backend {backend!r} serves mixer {name!r} (ops {list(ops)}); its backends: {known}")
    for b in found:
        reason = registry.unavailable_reason(b)
        if reason is not None:
            raise BackendUnavailable(f"backend {b.op}/{b.name} is unavailable: {reason}")
    return found


def _placement(backends: Iterable[Backend], device: str | None) -> tuple[str, torch.dtype, tuple[str, ...], tuple]:
    """Device, most precise dtype, modes and low-precision dtypes that every backend in ``backends`` takes."""
    backends = list(backends)
    if device is None:
        device = "cpu" if all(b.devices is None or "cpu" in b.devices for b in backends) else "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable("the backend runs on CUDA devices only, and torch sees none")

    def takes(dtype: torch.dtype) -> bool:
        return all(b.dtypes is None or dtype in b.dtypes for b in backends)

    precise = [d for d in (torch.float64, torch.float32) if takes(d)]
    if not precise:
        raise CheckNotApplicable("the backend takes neither float64 nor float32, which the checks compare in")
    modes = tuple(m for m in MODES if all(b.modes is None or m in b.modes for b in backends))
    return device, precise[0], modes, tuple(d for d in LOW_PRECISION if takes(d))


def mixer_target(
    name: str,
    backend: str = "auto",
    *,
    options: Mapping[str, Any] | None = None,
    d_model: int = D_MODEL,
    device: str | None = None,
    rtol: float | None = None,
) -> MixerTarget:
    """Describe mixer ``name`` with ``backend`` for checking.

    By default the mixer is built with ``num_heads=2`` if its factory takes ``num_heads``; ``options`` are
    added to (and override) that. Raises ``BackendUnavailable`` if the backend cannot run here.
    """
    found = _backends_of(name, backend)
    factory = get_registry().mixers[name].factory
    if not _accepts(factory, "backend"):
        raise ConformanceError(f"mixer {name!r}: its factory must take a backend= option, as every mixer does")
    opts = {"num_heads": NUM_HEADS} if _accepts(factory, "num_heads") else {}
    opts.update(options or {})
    opts.pop("backend", None)
    place, dtype, modes, low = _placement(found, device)
    return MixerTarget(name, backend, tuple(sorted(opts.items())), d_model, place, dtype, modes, low, rtol)


def mixer_targets(names: Iterable[str] | None = None) -> list[MixerTarget]:
    """Every registered mixer (or those named) with each backend that can run here, and ``"auto"``."""
    registry = get_registry()
    available = registry.available()
    targets = []
    for name in sorted(names if names is not None else registry.mixers):
        for backend in [*available.get(name, []), "auto"]:
            try:
                targets.append(mixer_target(name, backend))
            except (BackendUnavailable, CheckNotApplicable):
                continue
    return targets


def run_split(mixer: TokenMixer, x: Tensor, plan: Iterable[tuple[int, int, str, int | None]], state=None):
    """Run ``x`` in segments ``(start, stop, mode, chunk_size)``, handing the state over."""
    outs = []
    for start, stop, mode, chunk_size in plan:
        y, state = mixer(x[:, start:stop], state, mode=mode, chunk_size=chunk_size)
        outs.append(y)
    return torch.cat(outs, dim=1), state


def _chunked(target: MixerTarget) -> list[tuple[str, int | None]]:
    runs = [("parallel", None), ("recurrent", None), *(("chunkwise", c) for c in (None, 1, 4, 5, 13, 20))]
    return [(m, c) for m, c in runs if m in target.modes]


def _first_mode(target: MixerTarget) -> str:
    return target.modes[0]


def check_available(target: MixerTarget) -> None:
    """The mixer builds as a TokenMixer, and a backend of its ops can run here."""
    registry = get_registry()
    assert registry.available().get(target.name), f"no available backend serves {target.name!r}"
    mixer = target.build()
    assert mixer.d_model == target.d_model, f"d_model is {mixer.d_model}, not {target.d_model}"


def check_modes_agree(target: MixerTarget) -> None:
    """Every mode (chunkwise with chunk sizes that do and don't divide T) gives the same outputs and state."""
    mixer, x = target.build(), target.inputs()
    base_mode = _first_mode(target)
    y0, s0 = mixer(x, mode=base_mode)
    assert y0.shape == x.shape and y0.dtype == x.dtype, f"output {tuple(y0.shape)} {y0.dtype} for input {x.dtype}"
    assert y0.abs().max() > 1e-6, "output is identically zero: nothing would be tested"
    assert isinstance(s0, MixerState), f"the state is a {type(s0).__name__}, not a MixerState"
    assert s0.offset == x.shape[1], f"state.offset is {s0.offset} after {x.shape[1]} tokens"
    tol = _tol(target, 1e-10, 1e-5)
    for mode, chunk_size in _chunked(target):
        y, s = mixer(x, mode=mode, chunk_size=chunk_size)
        assert_rel_close(y, y0, tol, f"{mode} (chunk {chunk_size}) output vs {base_mode}")
        assert_states_close(s, s0, tol, f"{mode} (chunk {chunk_size}) state vs {base_mode}")


def check_modes_agree_float32(target: MixerTarget) -> None:
    """In float32 too, the modes agree (to 1e-5) and the output stays float32."""
    if target.dtype == torch.float32:
        raise CheckNotApplicable("the target is checked in float32 already")
    mixer, x = target.build(torch.float32), target.inputs(T=40, dtype=torch.float32)
    y0, s0 = mixer(x, mode=_first_mode(target))
    assert y0.dtype == torch.float32, f"float32 input gave a {y0.dtype} output"
    for mode, chunk_size in [("recurrent", None), ("chunkwise", 7), ("chunkwise", 16)]:
        if mode in target.modes:
            y, s = mixer(x, mode=mode, chunk_size=chunk_size)
            assert_rel_close(y, y0, 1e-5, f"{mode} (chunk {chunk_size}) output")
            assert_states_close(s, s0, 1e-5, f"{mode} (chunk {chunk_size}) state")


def check_split_equals_one_pass(target: MixerTarget, max_examples: int | None = None) -> None:
    """Any split of a sequence, each piece in any mode and chunk size, with the state handed over, equals one pass."""
    mixer, tol = target.build(), _tol(target, 1e-10, 1e-5)

    def split_equals_one_pass(plan, B, seed):
        T, plan = plan
        x = target.inputs(B=B, T=T, seed=seed)
        _at(_first_mode(target))
        y_whole, s_whole = mixer(x, mode=_first_mode(target))
        _at("split")
        y_split, s_split = run_split(mixer, x, plan)
        assert_rel_close(y_split, y_whole, tol, f"outputs, plan {plan}")
        assert_states_close(s_split, s_whole, tol, f"final state, plan {plan}")

    _property(
        split_equals_one_pass,
        max_examples or scaled_examples(0.4),
        plan=mixer_split_plans(modes=target.modes),
        B=st.integers(1, 3),
        seed=st.integers(0, 2**31 - 1),
    )


def check_empty_input_keeps_the_state(target: MixerTarget) -> None:
    """An empty input returns an empty output and the state it was given."""
    mixer, x = target.build(), target.inputs(T=6)
    _, state = mixer(x, mode=_first_mode(target))
    for mode in target.modes:
        y, after = mixer(x[:, :0], state, mode=mode, chunk_size=4)
        assert tuple(y.shape) == (2, 0, target.d_model), f"{mode}: output shape {tuple(y.shape)} for an empty input"
        assert_states_close(after, state, 0.0, f"{mode}, an empty input: the state")


def _grads(mixer: TokenMixer, x: Tensor, weight: Tensor, fn: Callable[[Tensor], Tensor]):
    """Gradients of ``sum(fn(x) * weight)`` w.r.t. ``x`` and every parameter."""
    x = x.detach().requires_grad_(True)
    params = [p for p in mixer.parameters() if p.requires_grad]
    loss = (fn(x) * weight).sum()
    return torch.autograd.grad(loss, [x, *params], allow_unused=True)


def check_gradients_agree(target: MixerTarget) -> None:
    """Gradients w.r.t. the input and every parameter agree between modes and a split run."""
    mixer = target.build()
    x, weight = target.inputs(T=11), target.inputs(T=11, seed=1)
    split = [(0, 4, "recurrent", None), (4, 5, "parallel", None), (5, 11, "chunkwise", 4)]
    runs = {
        "parallel": lambda x: mixer(x, mode="parallel")[0],
        "chunkwise": lambda x: mixer(x, mode="chunkwise", chunk_size=3)[0],
        "recurrent": lambda x: mixer(x, mode="recurrent")[0],
        "split": lambda x: run_split(mixer, x, split)[0],
    }
    if set(target.modes) != set(MODES):  # the split run uses every mode
        runs = {k: fn for k, fn in runs.items() if k in target.modes}
    base = _first_mode(target)
    expected = _grads(mixer, x, weight, runs.pop(base))
    names = ["x", *(n for n, p in mixer.named_parameters() if p.requires_grad)]
    assert expected[0] is not None and expected[0].abs().max() > 0, "the output does not depend on the input"
    tol = _tol(target, 1e-9, 1e-4)
    for run, fn in runs.items():
        for param, got, want in zip(names, _grads(mixer, x, weight, fn), expected, strict=True):
            assert (got is None) == (want is None), f"{run}: d/d{param} missing in one mode"
            if want is not None:
                assert_rel_close(got, want, tol, f"{run} vs {base}: d/d{param}")


def check_causality(target: MixerTarget, mode: str) -> None:
    """Changing tokens from position t on leaves the outputs before t unchanged (and changes later ones)."""
    mixer, x = target.build(), target.inputs(T=13)
    changed = x.clone()
    changed[:, 7:] = target.inputs(T=6, seed=5)
    y, _ = mixer(x, mode=mode, chunk_size=5)
    y_changed, _ = mixer(changed, mode=mode, chunk_size=5)
    assert_rel_close(y_changed[:, :7], y[:, :7], _tol(target, 1e-12, 1e-6), "outputs before the change")
    assert (y_changed[:, 7:] - y[:, 7:]).abs().max() > 1e-6, "later outputs ignore their tokens"


def check_nonfinite_stays_causal(target: MixerTarget, mode: str) -> None:
    """A NaN or inf in the input at position t leaves every output before t unchanged and finite, also after a
    state: positions a token may not see must be excluded, not weighted by zero (``0 * NaN`` is NaN)."""
    mixer, x = target.build(), target.inputs(T=13)
    _, state = mixer(target.inputs(T=3, seed=2), mode=_first_mode(target))
    tol = _tol(target, 1e-12, 1e-6)
    # With chunks of 5: inside a chunk, at a chunk's start, in the first chunk, in the tail chunk.
    spots = [(7, NON_FINITE[0]), (5, NON_FINITE[1]), (1, NON_FINITE[2]), (12, NON_FINITE[0]), (9, NON_FINITE[1])]
    for start in (None, state):
        y, _ = mixer(x, start, mode=mode, chunk_size=5)
        for t, value in spots:
            bad = x.clone()
            bad[:, t] = float(value)
            y_bad, _ = mixer(bad, start, mode=mode, chunk_size=5)
            where = f"a {value} at position {t} of 13 (chunk size 5{', after a state' if start is not None else ''})"
            assert_rel_close(y_bad[:, :t], y[:, :t], tol, f"outputs before {where}")


def check_batch_independence(target: MixerTarget, mode: str) -> None:
    """Each batch entry's output and state depend on that entry only, also when continuing a state."""
    mixer, x = target.build(), target.inputs(B=3, T=9)
    _, state = mixer(target.inputs(B=3, T=4, seed=2), mode=_first_mode(target))
    y, s = mixer(x, state, mode=mode, chunk_size=4)
    tol = _tol(target, 1e-10, 1e-5)
    for b in range(3):
        one = slice(b, b + 1)
        y_b, s_b = mixer(x[one], state.map_tensors(lambda t, one=one: t[one]), mode=mode, chunk_size=4)
        assert_rel_close(y_b, y[one], tol, f"entry {b} output")
        assert_states_close(s_b, s.map_tensors(lambda t, one=one: t[one]), tol, f"entry {b} state")


def check_reordered_state(target: MixerTarget) -> None:
    """Beam search: ``state.reorder(index)`` continues the reordered entries."""
    mixer, x = target.build(), target.inputs(B=3, T=10)
    index = torch.tensor([2, 0, 0], device=target.device)
    base = _first_mode(target)
    expected, _ = mixer(x[index], mode=base)
    _, state = mixer(x[:, :6], mode=base)
    y, _ = mixer(x[index, 6:], state.reorder(index), mode=target.modes[-1])
    assert_rel_close(y, expected[:, 6:], _tol(target, 1e-10, 1e-5), "reordered continuation")


@st.composite
def _packs(draw: st.DrawFn, target: MixerTarget) -> tuple[list[int], int, str, int, bool, int]:
    """Sequence lengths (empty and single-token ones included), a prefix length for the states they start from
    (0: none), a mode, a chunk size, which side padding goes on, and a seed."""
    lengths = draw(st.lists(st.integers(0, 7), min_size=1, max_size=4))
    prefix = draw(st.integers(0, 3))
    mode = draw(st.sampled_from(target.modes))
    return lengths, prefix, mode, draw(st.integers(1, 5)), draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def _start(mixer: TokenMixer, target: MixerTarget, rows: int, prefix: int, seed: int) -> MixerState | None:
    """The state after ``prefix`` tokens in each of ``rows`` rows (``None`` for none), without its history."""
    if not prefix:
        return None
    return mixer(target.inputs(B=rows, T=prefix, seed=seed), mode=_first_mode(target))[1].detach()


def _separate(mixer: TokenMixer, pieces: list[Tensor], state: MixerState | None, mode: str, chunk: int):
    """Each sequence run alone (from its row of ``state``): outputs and states, the reference of packing."""
    runs = []
    for n, x in enumerate(pieces):
        rows = None if state is None else state.reorder(torch.tensor([n], device=x.device))
        runs.append(mixer(x, rows, mode=mode, chunk_size=chunk))
    return runs


@contextlib.contextmanager
def per_sequence(ops: Iterable[str], registry: Registry | None = None) -> Iterator[None]:
    """Inside the block, every backend of ``ops`` that computes packed rows itself (``packs=True``) is registered
    without it, so that packed sequences take the op's per-sequence loop: the other path of packing."""
    registry = registry or get_registry()
    with contextlib.ExitStack() as stack:
        for op in ops:
            for b in list(registry.backends.get(op, {}).values()):
                if b.packs:
                    stack.enter_context(registry.temporary_backend(dataclasses.replace(b, packs=False), override=True))
        yield


def _packing_paths(ops: Iterable[str]) -> list[tuple[str, contextlib.AbstractContextManager]]:
    """The two paths of packed sequences, by name: the backend as registered, and the per-sequence loop."""
    return [("as registered", contextlib.nullcontext()), ("per-sequence loop", per_sequence(tuple(ops)))]


def check_packed_equals_separate(target: MixerTarget, max_examples: int | None = None) -> None:
    """Sequences packed in one row (``cu_seqlens``, through ``mix_packed``: the mixer's own packing or one call
    per sequence) give each sequence's outputs, final state and gradients as running it alone, from its own
    state or from none; empty and single-token sequences included; on both paths of the op's packing (the
    backend's own, and the per-sequence loop)."""
    mixer = target.build()

    def packed_equals_separate(case):
        for path, context in _packing_paths(type(mixer).ops):
            with context:
                _packed_equals_separate(target, mixer, case, path)

    _property(packed_equals_separate, max_examples or scaled_examples(0.3), case=_packs(target))


def _packed_equals_separate(target: MixerTarget, mixer: TokenMixer, case: Any, path: str) -> None:
    """One packed case on one path: outputs, states and gradients against each sequence run alone."""
    tol = _tol(target, 1e-10, 1e-5)
    params = [p for p in mixer.parameters() if p.requires_grad]
    lengths, prefix, mode, chunk, _, seed = case
    N, T = len(lengths), sum(lengths)
    state = _start(mixer, target, N, prefix, seed + 1)
    x = target.inputs(B=1, T=T, seed=seed).requires_grad_(True)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], device=target.device)
    _at(mode)
    y, s = mix_packed(mixer, x, state, cu, mode=mode, chunk_size=chunk)
    assert tuple(y.shape) == (1, T, target.d_model), f"packed output shape {tuple(y.shape)}"
    assert s.batch_size == N, f"the packed state has {s.batch_size} rows for {N} sequences"
    starts = [0, *itertools.accumulate(lengths)]
    runs = _separate(mixer, [x[:, a:b] for a, b in zip(starts, starts[1:], strict=False)], state, mode, chunk)
    for n, (y_n, s_n) in enumerate(runs):
        assert_rel_close(y[:, starts[n] : starts[n + 1]], y_n, tol, f"{path}: sequence {n} output")
        state_n = s.reorder(torch.tensor([n], device=x.device))
        assert_states_close(state_n, s_n, tol, f"{path}: sequence {n} state")
    if T == 0:
        return
    weight = target.inputs(B=1, T=T, seed=seed + 2)
    got = torch.autograd.grad((y * weight).sum(), [x, *params], allow_unused=True)
    want_loss = sum((y_n * weight[:, a:b]).sum() for (y_n, _), a, b in zip(runs, starts, starts[1:], strict=False))
    want = torch.autograd.grad(want_loss, [x, *params], allow_unused=True)
    names = ["x", *(n for n, p in mixer.named_parameters() if p.requires_grad)]
    for name, g, w in zip(names, got, want, strict=True):
        if g is not None and w is not None:
            assert_rel_close(g, w, tol * 10, f"{path}: d/d{name}")


def check_padded_equals_separate(target: MixerTarget, max_examples: int | None = None) -> None:
    """A padded batch (``attention_mask``, left or right padding per row, NaN in the padding) gives each row's
    outputs and state as running its real tokens alone; outputs at the padding are zeros, and no NaN reaches a
    real output or a gradient."""
    mixer, tol = target.build(), _tol(target, 1e-10, 1e-5)

    def padded_equals_separate(case):
        lengths, prefix, mode, chunk, left, seed = case
        B, T = len(lengths), max(lengths)
        state = _start(mixer, target, B, prefix, seed + 1)
        real = target.inputs(B=B, T=T, seed=seed)
        mask = torch.zeros(B, T, dtype=torch.long, device=target.device)
        x = torch.full_like(real, float("nan"))
        for b, L in enumerate(lengths):
            where = slice(T - L, T) if left else slice(0, L)
            mask[b, where] = 1
            x[b, where] = real[b, :L]
        x.requires_grad_(True)
        _at(mode)
        y, s = mix_padded(mixer, x, state, mask, mode=mode, chunk_size=chunk)
        assert tuple(y.shape) == tuple(x.shape), f"padded output shape {tuple(y.shape)} for input {tuple(x.shape)}"
        assert not y.isnan().any(), "a NaN in the padding reached an output"
        assert (y[mask == 0] == 0).all(), "outputs at the padding are not zero"
        runs = _separate(mixer, [real[b : b + 1, :L] for b, L in enumerate(lengths)], state, mode, chunk)
        for b, (y_b, s_b) in enumerate(runs):
            assert_rel_close(y[b][mask[b] == 1][None], y_b, tol, f"row {b} output")
            assert_states_close(s.reorder(torch.tensor([b], device=x.device)), s_b, tol, f"row {b} state")
        if sum(lengths):
            (g,) = torch.autograd.grad((y * target.inputs(B=B, T=T, seed=seed + 2)).sum(), [x])
            assert not g.isnan().any(), "a NaN in the padding reached a gradient"
            assert (g[mask == 0] == 0).all(), "the padding got a gradient"

    _property(padded_equals_separate, max_examples or scaled_examples(0.3), case=_packs(target))


def check_init_state(target: MixerTarget) -> None:
    """``init_state(B)`` is the empty history: continuing it equals starting without a state."""
    mixer, x = target.build(), target.inputs()
    state = mixer.init_state(2, device=target.device, dtype=target.dtype)
    assert state.offset == 0, f"init_state has offset {state.offset}"
    for mode in target.modes:
        y, s = mixer(x, state, mode=mode, chunk_size=4)
        y_none, s_none = mixer(x, mode=mode, chunk_size=4)
        assert_rel_close(y, y_none, _tol(target, 1e-12, 1e-6), f"{mode} output")
        assert_states_close(s, s_none, _tol(target, 1e-12, 1e-6), f"{mode} state")


def check_low_precision(target: MixerTarget, mode: str) -> None:
    """A bfloat16 module on bfloat16 input gives bfloat16 output within 2e-2 of the same weights in float64."""
    if torch.bfloat16 not in target.low_precision:
        raise CheckNotApplicable("the backend does not take bfloat16")
    mixer, x = target.build(torch.bfloat16), target.inputs(T=32, dtype=torch.bfloat16)
    y, _ = mixer(x, mode=mode, chunk_size=8)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape, f"output {tuple(y.shape)} {y.dtype}"
    assert torch.isfinite(y).all(), "non-finite bfloat16 output"
    ref_backend = target.backend if target.dtype == torch.float64 else "auto"
    reference = _fresh_build(target, torch.float64, ref_backend)
    reference.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in mixer.state_dict().items()})
    with torch.no_grad():
        y_ref, _ = reference(x.double())  # the same (bf16-rounded) weights and inputs, in float64
    err = norm_rel_error(y, y_ref)
    assert err < 2e-2, f"bfloat16 output is {err:.3e} (relative RMS) from float64, more than 2e-2"


def check_matches_reference_backend(target: MixerTarget) -> None:
    """With the same weights, the backend gives the reference backend's outputs and states in every mode."""
    registry = get_registry()
    ops = registry.mixers[target.name].ops
    if target.backend in ("auto", REFERENCE_BACKEND):
        raise CheckNotApplicable(f"the target is the reference backend ({target.backend!r})")
    if not ops or not all(REFERENCE_BACKEND in registry.backends.get(op, {}) for op in ops):
        raise CheckNotApplicable(f"the mixer's ops {list(ops)} have no {REFERENCE_BACKEND!r} backend to compare with")
    mixer, x = target.build(), target.inputs(T=13)
    reference = _fresh_build(target, target.dtype, REFERENCE_BACKEND)
    reference.load_state_dict(mixer.state_dict())
    tol = _tol(target, 1e-10, 1e-5)
    for mode in target.modes:
        y, s = mixer(x, mode=mode, chunk_size=5)
        y_ref, s_ref = reference(x, mode=mode, chunk_size=5)
        assert_rel_close(y, y_ref, tol, f"{mode}: output vs backend {REFERENCE_BACKEND!r}")
        assert_states_close(s, s_ref, tol, f"{mode}: state vs backend {REFERENCE_BACKEND!r}")


def check_rejects_bad_input(target: MixerTarget) -> None:
    """Bad input (rank, width, a state of another batch size, an unknown mode) raises a clear error."""
    dtype = target.dtype
    mixer, x = target.build(dtype), target.inputs(B=2, T=5, dtype=dtype)
    _, state = mixer(x, mode=_first_mode(target))
    D = target.d_model
    bad = [
        ("rank 2", lambda: mixer(x[0]), [str(D), f"[5, {D}]"]),
        ("rank 4", lambda: mixer(x[None]), [str(D), f"[1, 2, 5, {D}]"]),
        ("width", lambda: mixer(x[..., :-1]), [str(D), str(D - 1)]),
        ("state of another batch size", lambda: mixer(target.inputs(B=5, T=3, dtype=dtype), state), ["2", "5"]),
        ("unknown mode", lambda: mixer(x, mode="sideways"), ["'sideways'", "'parallel'"]),
    ]
    for what, call, fragments in bad:
        assert_raises_mentioning(call, fragments, what)


MIXER_CHECKS: tuple[Check, ...] = (
    Check("available", check_available),
    Check("modes_agree", check_modes_agree),
    Check("modes_agree_float32", check_modes_agree_float32),
    Check("split_equals_one_pass", check_split_equals_one_pass, hypothesis=True),
    Check("empty_input_keeps_the_state", check_empty_input_keeps_the_state),
    Check("gradients_agree", check_gradients_agree),
    Check("causality", check_causality, per_mode=True),
    Check("nonfinite_stays_causal", check_nonfinite_stays_causal, per_mode=True),
    Check("batch_independence", check_batch_independence, per_mode=True),
    Check("reordered_state", check_reordered_state),
    Check("packed_equals_separate", check_packed_equals_separate, hypothesis=True),
    Check("padded_equals_separate", check_padded_equals_separate, hypothesis=True),
    Check("init_state", check_init_state),
    Check("low_precision", check_low_precision, per_mode=True),
    Check(
        "matches_reference_backend",
        check_matches_reference_backend,
        applies=lambda target: target.backend not in ("auto", REFERENCE_BACKEND),
    ),
    Check("rejects_bad_input", check_rejects_bad_input),
)


# -- op backends -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpTarget:
    """One backend of an op, and where and in what dtypes to check it (see ``op_target``)."""

    spec: OpSpec
    backend: str
    device: str = "cpu"
    dtype: torch.dtype = torch.float64  # the most precise dtype the backend takes
    dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32)
    modes: tuple[str, ...] = MODES
    low_precision: tuple[torch.dtype, ...] = (torch.bfloat16,)
    rtol: float | None = None  # overrides RTOL[dtype] for every comparison
    grad_rtol: float | None = None

    @property
    def id(self) -> str:
        return f"{self.spec.op}-{self.backend}"

    def call(self, inputs: OpInputs, state: Any, *, mode: str, chunk_size: int | None, start=None, stop=None):
        seq = inputs.seq if start is None else {n: t[:, start:stop] for n, t in inputs.seq.items()}
        return self.spec.call(seq, inputs.const, state, mode=mode, chunk_size=chunk_size, backend=self.backend)


def op_target(
    op: str | OpSpec,
    backend: str,
    *,
    device: str | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    rtol: float | None = None,
    grad_rtol: float | None = None,
) -> OpTarget:
    """Describe ``backend`` of ``op`` (a core op's name, or an ``OpSpec``) for checking.

    By default the checks run in float64 and float32 where the backend takes them, on the CPU unless the
    backend runs on CUDA only. Raises ``BackendUnavailable`` if it cannot run here.
    """
    spec = get_op_spec(op)
    registry = get_registry()
    installed = registry.backends.get(spec.op, {})
    if backend not in installed:
        raise ValueError(f"no backend {backend!r} is registered for op {spec.op!r}; registered: {sorted(installed)}")
    b = installed[backend]
    reason = registry.unavailable_reason(b)
    if reason is not None:
        raise BackendUnavailable(f"backend {spec.op}/{backend} is unavailable: {reason}")
    place, precise, modes, low = _placement([b], device)
    wanted = tuple(dtypes) if dtypes is not None else (torch.float64, torch.float32)
    usable = tuple(d for d in wanted if b.dtypes is None or d in b.dtypes)
    if not usable:
        raise CheckNotApplicable(f"backend {spec.op}/{backend} takes none of {list(wanted)}")
    return OpTarget(spec, backend, place, usable[0], usable, modes, low, rtol, grad_rtol)


def op_targets(ops: Iterable[str] | None = None) -> list[OpTarget]:
    """Every available backend of every core op (or of those named)."""
    from mixers.testing.ops import OP_SPECS

    registry = get_registry()
    targets = []
    for op in sorted(ops if ops is not None else OP_SPECS):
        for name, b in sorted(registry.backends.get(op, {}).items()):
            if registry.unavailable_reason(b) is None:
                try:
                    targets.append(op_target(op, name))
                except (BackendUnavailable, CheckNotApplicable):
                    continue
    return targets


def _op_rtol(target: OpTarget, dtype: torch.dtype) -> float:
    return target.rtol if target.rtol is not None else RTOL[dtype]


def _compare(target: OpTarget, inputs: OpInputs, o: Tensor, state: Any, what: str) -> None:
    """``(o, state)`` against the float64 reference, relative to the magnitude of the terms summed."""
    spec, dtype = target.spec, inputs.seq[next(iter(inputs.seq))].dtype
    ref_o, ref_s = spec.reference(inputs)
    mag_o, mag_s = spec.magnitude(inputs) if spec.magnitude is not None else (None, None)
    rtol = _op_rtol(target, dtype)
    assert o.dtype == dtype, f"{what}: output dtype {o.dtype}, not the inputs' {dtype}"
    assert_rel_close(o, ref_o, rtol, f"{what}: output", scale=mag_o)
    got, want = state_tensors(state), state_tensors(ref_s)
    scales = state_tensors(mag_s) if mag_s is not None else (None,) * len(want)
    assert len(got) == len(want), f"{what}: the state has {len(got)} tensors, the reference's {len(want)}"
    for i, (g, w, s) in enumerate(zip(got, want, scales, strict=True)):
        assert g.dtype == spec.state_dtype(dtype), f"{what}: state[{i}] dtype {g.dtype}, not {spec.state_dtype(dtype)}"
        assert_rel_close(g, w, rtol, f"{what}: state[{i}]", scale=s)


def check_op_matches_reference(target: OpTarget, max_examples: int | None = None) -> None:
    """Every mode, with any chunk size and initial state, matches the float64 reference; the state is not written."""

    def matches_reference(case):
        inputs = case.inputs(device=target.device)
        kept = [t.clone() for t in state_tensors(inputs.state)]
        for mode in target.modes:
            _at(mode)
            o, state = target.call(inputs, inputs.state, mode=mode, chunk_size=case.chunk_size)
            _compare(target, inputs, o, state, f"mode {mode!r}")
        for before, after in zip(kept, state_tensors(inputs.state), strict=True):
            assert torch.equal(before, after), "the backend wrote into the initial state it was given"

    _property(matches_reference, max_examples, case=target.spec.cases(dtypes=target.dtypes))


def check_op_handover(target: OpTarget, max_examples: int | None = None) -> None:
    """Any split with the state handed over (in any modes and chunk sizes) matches the reference; an empty
    piece hands its state on unchanged."""

    def handover(case_plan):
        case, plan = case_plan
        inputs = case.inputs(device=target.device)
        outs, state = [], inputs.state
        _at("split")
        for start, stop, mode, chunk_size in plan:
            before = state_tensors(state)
            o, state = target.call(inputs, state, mode=mode, chunk_size=chunk_size, start=start, stop=stop)
            outs.append(o)
            if start == stop and before:
                for b, a in zip(before, state_tensors(state), strict=True):
                    assert torch.equal(a, b), f"an empty call in mode {mode!r} changed the state"
        _compare(target, inputs, torch.cat(outs, dim=1), state, f"split {plan}")

    _property(
        handover,
        max_examples or scaled_examples(0.5),
        case_plan=handover_plans(target.spec.cases(dtypes=target.dtypes), modes=target.modes),
    )


def check_op_gradients(target: OpTarget, max_examples: int | None = None) -> None:
    """Gradients w.r.t. the inputs and the initial state match the reference's, in every mode and a split."""
    rtol = target.grad_rtol if target.grad_rtol is not None else {torch.float64: 1e-9}.get(target.dtype, 1e-4)

    def gradients(case_plan):
        case, plan = case_plan
        inputs = case.inputs(requires_grad=True, device=target.device)
        names, leaves = zip(*inputs.named_leaves(), strict=True)
        ref_o, ref_s = target.spec.reference(inputs)
        gen = torch.Generator().manual_seed(case.seed + 1)
        outputs = (ref_o, *state_tensors(ref_s))
        weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64).to(target.device) for t in outputs]

        def loss(o, state):
            return sum((t.double() * w).sum() for t, w in zip((o, *state_tensors(state)), weights, strict=True))

        expected = torch.autograd.grad(loss(ref_o, ref_s), leaves, allow_unused=True)
        # Relative to the largest gradient of any leaf: one that vanishes by symmetry (d/dq with a single
        # key) is rounding noise on both sides, and its own size is no yardstick.
        scale = torch.tensor(max(w.abs().max().item() if w is not None and w.numel() else 0.0 for w in expected))

        def split():
            outs, state = [], inputs.state
            for start, stop, mode, chunk_size in plan:
                o, state = target.call(inputs, state, mode=mode, chunk_size=chunk_size, start=start, stop=stop)
                outs.append(o)
            return torch.cat(outs, dim=1), state

        runs = {
            m: (lambda m=m: target.call(inputs, inputs.state, mode=m, chunk_size=case.chunk_size)) for m in target.modes
        }
        runs["split"] = split
        for run, fn in runs.items():
            _at(run)
            got = torch.autograd.grad(loss(*fn()), leaves, allow_unused=True)
            for name, g, w in zip(names, got, expected, strict=True):
                if w is None:
                    continue
                assert g is not None, f"{run}: no gradient reaches {name}"
                assert_rel_close(g, w, rtol, f"{run} (plan {plan}): d/d{name}", scale=scale)

    _property(
        gradients,
        max_examples or scaled_examples(0.3),
        case_plan=handover_plans(target.spec.cases(dtypes=(target.dtype,)), modes=target.modes),
    )


def check_op_low_precision(target: OpTarget, max_examples: int | None = None) -> None:
    """bfloat16 inputs give bfloat16 outputs within 2e-2 (relative RMS) of the float64 reference."""
    if torch.bfloat16 not in target.low_precision:
        raise CheckNotApplicable("the backend does not take bfloat16")

    def low_precision(case):
        inputs = case.inputs(device=target.device)
        ref_o, ref_s = target.spec.reference(inputs)
        for mode in target.modes:
            _at(mode)
            o, state = target.call(inputs, inputs.state, mode=mode, chunk_size=case.chunk_size)
            assert o.dtype == torch.bfloat16, f"{mode}: bfloat16 inputs gave a {o.dtype} output"
            assert torch.isfinite(o).all(), f"{mode}: non-finite output"
            err = norm_rel_error(o, ref_o)
            assert err < 2e-2, f"{mode}: output is {err:.3e} (relative RMS) from the reference, more than 2e-2"
            for i, (g, w) in enumerate(zip(state_tensors(state), state_tensors(ref_s), strict=True)):
                assert norm_rel_error(g, w) < 2e-2, f"{mode}: state[{i}] is more than 2e-2 from the reference"

    _property(low_precision, max_examples or scaled_examples(0.2), case=target.spec.cases(dtypes=(torch.bfloat16,)))


def check_op_nonfinite_stays_causal(target: OpTarget, max_examples: int | None = None) -> None:
    """A NaN or inf at position t of a sequence input (q, k or v) leaves the outputs before t, and the gradients
    of a loss on them w.r.t. every sequence input before t and the initial state, unchanged and finite, in every
    mode and from any initial state. Later positions must be excluded, not weighted by zero: ``0 * NaN`` is NaN,
    in a forward product and in a backward one that meets a later NaN with a zero gradient. (A weight of the op,
    such as a convolution's, is not held to it: its gradient sums over every position, the NaN's included.)"""

    def nonfinite_stays_causal(case, position, which, value):
        inputs = case.inputs(requires_grad=True, device=target.device)
        names = sorted(inputs.seq)
        name = names[which % len(names)]
        T = inputs.seq[name].shape[1]
        if T < 2:
            return
        t = 1 + position % (T - 1)
        poisoned = inputs.seq[name].detach().clone()
        poisoned[:, t] = float(value)
        bad = OpInputs({**inputs.seq, name: poisoned.requires_grad_(True)}, inputs.const, inputs.state)
        rtol = _op_rtol(target, poisoned.dtype)

        def run(x: OpInputs, mode: str) -> tuple[Tensor, tuple[Tensor | None, ...]]:
            """The output, and the gradients of a random weighting of the outputs before t (the same each call)."""
            o, _ = target.call(x, x.state, mode=mode, chunk_size=case.chunk_size)
            gen = torch.Generator().manual_seed(case.seed + 2)
            weight = torch.randn(o[:, :t].shape, generator=gen, dtype=torch.float64).to(o.device)
            leaves = [leaf for _, leaf in x.named_leaves()]
            return o, torch.autograd.grad((o[:, :t].double() * weight).sum(), leaves, allow_unused=True)

        for mode in target.modes:
            _at(mode)
            o, grads = run(inputs, mode)
            o_bad, grads_bad = run(bad, mode)
            where = f"mode {mode!r}, chunk size {case.chunk_size}, a {value} in {name}[:, {t}]"
            assert_rel_close(o_bad[:, :t], o[:, :t], rtol, f"{where}: outputs before it")
            scale = torch.tensor(max((g.abs().max().item() for g in grads if g is not None and g.numel()), default=0))
            for (leaf, _), g, g_bad in zip(inputs.named_leaves(), grads, grads_bad, strict=True):
                if g is None or leaf in inputs.const:
                    continue
                assert g_bad is not None, f"{where}: no gradient reaches {leaf}"
                if leaf in inputs.seq:  # positions before t; a state is before every position
                    g, g_bad = g[:, :t], g_bad[:, :t]
                assert_rel_close(g_bad, g, rtol, f"{where}: d/d{leaf} before it", scale=scale)

    _property(
        nonfinite_stays_causal,
        max_examples or scaled_examples(0.3),
        case=target.spec.cases(dtypes=target.dtypes),
        position=st.integers(0, 2**16),
        which=st.integers(0, 7),
        value=st.sampled_from(NON_FINITE),
    )


def check_op_packed_equals_separate(target: OpTarget, max_examples: int | None = None) -> None:
    """The rows of a case packed into one row (``cu_seqlens``: each row cut to a drawn length, empty ones
    included), each from its own row of the initial state, give each row's outputs and final state as calling the
    op on it alone, in every mode, on both paths (the backend's own packing, and the op's per-sequence loop). The
    registered ``Op`` is called with the spec's sequence inputs and constants by name."""
    op = get_registry().ops[target.spec.op]

    def packed_equals_separate(case, cut):
        inputs = case.inputs(device=target.device)
        first = next(iter(inputs.seq.values()))
        B, T = first.shape[:2]
        lengths = [(cut >> (4 * b)) % (T + 1) for b in range(B)]
        starts = [0, *itertools.accumulate(lengths)]
        cu = torch.tensor(starts, device=first.device)
        packed = {n: torch.cat([t[b : b + 1, :L] for b, L in enumerate(lengths)], dim=1) for n, t in inputs.seq.items()}
        rtol = _op_rtol(target, first.dtype)
        for mode in target.modes:
            _at(mode)
            for path, context in _packing_paths([op.name]):
                with context:
                    o, state = op(
                        **packed, **inputs.const, **{op.state_arg: inputs.state}, mode=mode,
                        chunk_size=case.chunk_size, backend=target.backend, cu_seqlens=cu,
                    )  # fmt: skip
                got_state = state_tensors(state)
                for b, L in enumerate(lengths):
                    rows = None if inputs.state is None else map_structure(inputs.state, lambda t, b=b: t[b : b + 1])
                    alone = {n: t[b : b + 1, :L] for n, t in inputs.seq.items()}
                    o_b, s_b = target.spec.call(
                        alone, inputs.const, rows, mode=mode, chunk_size=case.chunk_size, backend=target.backend
                    )
                    where = f"{path}, mode {mode!r}, row {b} of {lengths}"
                    assert_rel_close(o[:, starts[b] : starts[b + 1]], o_b, rtol, f"{where}: output")
                    for i, (g, w) in enumerate(zip(got_state, state_tensors(s_b), strict=True)):
                        row = g[b : b + 1]
                        for dim, size in enumerate(w.shape):  # a cache holds the longest row's tokens: this row's
                            row = row.narrow(dim, 0, size) if row.shape[dim] > size else row
                        assert_rel_close(row, w, rtol, f"{where}: state[{i}]")

    _property(
        packed_equals_separate,
        max_examples or scaled_examples(0.3),
        case=target.spec.cases(dtypes=target.dtypes),
        cut=st.integers(0, 2**32 - 1),
    )


def check_op_rejects_bad_input(target: OpTarget, max_examples: int | None = None) -> None:
    """The op's validation rejects each bad input its spec lists (``OpSpec.bad_inputs``: an unknown mode, a
    state of another batch size or dtype...) with an error naming what was expected and what was given.

    An op-level check: the public op validates before any backend runs, so it runs once per op."""
    spec = target.spec
    bad_inputs = spec.bad_inputs or standard_bad_inputs

    def rejects_bad_input(case):
        inputs = case.inputs(device=target.device)
        mode = target.modes[0]
        _at(mode)
        _, state = target.call(inputs, inputs.state, mode=mode, chunk_size=case.chunk_size)
        for bad in bad_inputs(inputs, state):
            _at(bad.mode or mode)
            seq, const = {**inputs.seq, **bad.seq}, {**inputs.const, **bad.const}
            given = inputs.state if bad.state is KEEP else bad.state
            chunk_size = case.chunk_size if bad.chunk_size is KEEP else bad.chunk_size
            assert_raises_mentioning(
                lambda seq=seq, const=const, given=given, bad=bad, chunk_size=chunk_size: spec.call(
                    seq, const, given, mode=bad.mode or mode, chunk_size=chunk_size, backend=target.backend
                ),
                bad.fragments,
                f"{spec.op}: {bad.what}",
            )

    _property(rejects_bad_input, max_examples or 5, case=spec.cases(dtypes=(target.dtype,)))


def represents_op(target: OpTarget) -> bool:
    """Whether ``target`` is the one backend of its op that op-level checks run on: the reference backend
    (``"torch"``) when it is available, else the first available backend by name."""
    registry = get_registry()
    available = sorted(
        name for name, b in registry.backends.get(target.spec.op, {}).items() if registry.unavailable_reason(b) is None
    )
    if REFERENCE_BACKEND in available:
        return target.backend == REFERENCE_BACKEND
    return bool(available) and target.backend == available[0]


OP_CHECKS: tuple[Check, ...] = (
    Check("matches_reference", check_op_matches_reference, hypothesis=True),
    Check("handover", check_op_handover, hypothesis=True),
    Check("gradients", check_op_gradients, hypothesis=True),
    Check("low_precision", check_op_low_precision, hypothesis=True),
    Check("nonfinite_stays_causal", check_op_nonfinite_stays_causal, hypothesis=True),
    Check("packed_equals_separate", check_op_packed_equals_separate, hypothesis=True),
    Check("rejects_bad_input", check_op_rejects_bad_input, hypothesis=True, per_op=True),
)


# -- which cases to run ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckCase:
    """One check on one target (in one mode, for a ``per_mode`` check): a test case, with a readable id."""

    id: str
    check: Check
    target: MixerTarget | OpTarget
    mode: str | None = None


def check_cases(targets: Iterable[MixerTarget | OpTarget], checks: Iterable[Check] | None = None) -> list[CheckCase]:
    """Every check that applies to each target, once per mode the target computes for a ``per_mode`` check,
    and once per op for a ``per_op`` one. ``checks`` default to ``MIXER_CHECKS`` or ``OP_CHECKS`` by target.

    Ids read ``<target>-<check>[-<mode>]`` (``retention-torch-causality-parallel``); a ``per_op`` check's id
    names the op alone (``retention-rejects_bad_input``).
    """
    cases = []
    for target in targets:
        for check in checks if checks is not None else MIXER_CHECKS if isinstance(target, MixerTarget) else OP_CHECKS:
            if not check.applies_to(target):
                continue
            prefix = target.spec.op if check.per_op and isinstance(target, OpTarget) else target.id
            for mode in target.modes if check.per_mode else (None,):
                cases.append(CheckCase(f"{prefix}-{check.name}{'-' + mode if mode else ''}", check, target, mode))
    return cases


def builtin_registry() -> Registry:
    """A registry of the built-in plugins only, as ``SEQMIXERS_PLUGINS=""`` loads it (whatever is installed)."""
    return Registry().load(entry_points=False)


@contextlib.contextmanager
def using_registry(registry: Registry) -> Iterator[Registry]:
    """Make ``registry`` the process-wide one (what ``mixers.build`` and the checks use) inside the block.

    The core suite checks the built-ins with ``using_registry(builtin_registry())``, so its targets do not
    depend on which plugins are installed, while the plugins' suites in the same session see theirs.
    """
    saved = registry_module._REGISTRY
    registry_module._REGISTRY = registry
    try:
        yield registry
    finally:
        registry_module._REGISTRY = saved


# -- running -------------------------------------------------------------------------------------------
def _describe(target: MixerTarget | OpTarget) -> str:
    if isinstance(target, MixerTarget):
        return f"mixer {target.name!r} with backend {target.backend!r}"
    return f"backend {target.backend!r} of op {target.spec.op!r}"


def _error_text(exc: BaseException) -> str:
    """The failure in the kit's words: the assertion's message, or the type and message of an error."""
    kind = "" if isinstance(exc, AssertionError) else f"raised {type(exc).__name__}: "
    return f"{kind}{exc}"


def run_check(
    check: Check, target: MixerTarget | OpTarget, mode: str | None = None, max_examples: int | None = None
) -> None:
    """Run one check; a failure becomes a ``ConformanceError`` naming the check and the target, and, for a
    property, the kit's report of the shrunk counterexample. ``CheckNotApplicable`` passes through."""
    label = f"{check.name}{f'[{mode}]' if mode else ''}"
    try:
        args = (target, mode) if check.per_mode else (target,)
        check.fn(*args, max_examples=max_examples) if check.hypothesis else check.fn(*args)
    except (CheckNotApplicable, BackendUnavailable):
        raise
    except _PropertyFailed as failure:
        # Hypothesis's notes on the error are its own report of the same example, worded by its version;
        # the kit's line replaces them.
        example = Counterexample(check.name, failure.mode or mode, failure.inputs)
        text = _error_text(failure.error)
        if failure.flaky:
            text = (
                "the check failed on an input and then passed on the same input: the backend (or the mixer) "
                f"does not compute the same result twice, or keeps state between calls. The failure: {text}"
            )
        message = f"{_describe(target)}: check {label!r} failed ({check.doc})\n  {text}"
        raise ConformanceError(f"{message}\n  {example}", [example]) from failure.error
    except Exception as exc:
        notes = "\n".join(getattr(exc, "__notes__", []))
        message = f"{_describe(target)}: check {label!r} failed ({check.doc})\n  {_error_text(exc)}"
        if notes:
            message += "\n" + notes
        raise ConformanceError(message) from exc


def _run_all(
    target: MixerTarget | OpTarget, checks: tuple[Check, ...], names: Iterable[str] | None, max_examples: int | None
) -> None:
    wanted = set(names) if names is not None else None
    if wanted is not None and (unknown := wanted - {c.name for c in checks}):
        raise ValueError(f"unknown checks {sorted(unknown)}; the checks are {[c.name for c in checks]}")
    failures: list[ConformanceError] = []
    ran = 0
    for check in checks:
        if wanted is not None and check.name not in wanted:
            continue
        for mode in target.modes if check.per_mode else (None,):
            try:
                run_check(check, target, mode, max_examples)
                ran += 1
            except CheckNotApplicable:
                continue
            except ConformanceError as exc:
                ran += 1
                failures.append(exc)
    if failures:
        raise ConformanceError(
            f"{_describe(target)} failed {len(failures)} of {ran} conformance checks:\n\n"
            + "\n\n".join(str(f) for f in failures),
            [example for f in failures for example in f.counterexamples],
        )


def check_mixer(
    name: str,
    backend: str = "auto",
    *,
    options: Mapping[str, Any] | None = None,
    device: str | None = None,
    rtol: float | None = None,
    checks: Iterable[str] | None = None,
    max_examples: int | None = None,
) -> None:
    """Run every mixer check (or those named in ``checks``) on mixer ``name`` with ``backend``.

    Raises ``ConformanceError`` listing each failed check, ``BackendUnavailable`` if the backend cannot
    run here. ``max_examples`` bounds the hypothesis properties (default: the loaded profile's).
    """
    target = mixer_target(name, backend, options=options, device=device, rtol=rtol)
    _run_all(target, MIXER_CHECKS, checks, max_examples)


def check_op_backend(
    op: str | OpSpec,
    backend: str,
    *,
    device: str | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    rtol: float | None = None,
    grad_rtol: float | None = None,
    checks: Iterable[str] | None = None,
    max_examples: int | None = None,
) -> None:
    """Run every op check (or those named) on ``backend`` of ``op`` (a core op's name, or an ``OpSpec``).

    Raises ``ConformanceError`` listing each failed check with its shrunk counterexample,
    ``BackendUnavailable`` if the backend cannot run here.
    """
    target = op_target(op, backend, device=device, dtypes=dtypes, rtol=rtol, grad_rtol=grad_rtol)
    _run_all(target, OP_CHECKS, checks, max_examples)
