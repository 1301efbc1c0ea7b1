"""``torch.compile`` over the mixers and models, whichever backend runs (docs/compile.md).

- Built-in mixers on the torch backend: ``torch._dynamo.explain`` counts no graph break in parallel and
  chunkwise mode, and ``torch.compile(fullgraph=True)`` gives eager's outputs and gradients (input and
  parameters), in those modes, for a recurrent step from a state, and for a whole model.
- A backend dynamo cannot trace, registered with ``traceable=False``, compiles fullgraph through the generic
  custom op of ``mixers.ops.opaque``, with eager's outputs and gradients, for every op (a plugin's included);
  its fake (meta) implementation and recomputing backward pass ``torch.library.opcheck`` on a call of each op,
  and give the kernel's own gradients.

Compiling uses the ``aot_eager_decomp_partition`` backend: dynamo, AOT autograd, inductor's decompositions and
its partitioner of forward and backward, run eagerly: what inductor traces is traced, but no C++ is generated,
which would take most of a minute per graph on a CI machine. (Plain ``aot_eager`` is no substitute: its
backward graph of linear attention, run eagerly, fails on a view whose strides differ from the traced ones;
inductor, and the decompositions here, compute it.)
Tolerance: float32 rounding, ``rtol = atol = 1e-5``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
import torch._dynamo

import mixers
from mixers import functional
from mixers.backends import torch_gated_retention, torch_linear_attention, torch_retention, torch_softmax_attention
from mixers.catalogue import RegistrationError
from mixers.ops import opaque
from mixers.ops.gated_retention import GATED_RETENTION
from mixers.ops.linear_attention import LINEAR_ATTENTION
from mixers.ops.retention import RETENTION
from mixers.ops.softmax_attention import SOFTMAX_ATTENTION
from mixers.registry import get_registry
from models.config import ModelConfig
from models.lm import build_model

# Dynamo itself triggers these while it inspects tensors and autograd.Functions (torch 2.13); the project's
# warnings-are-errors setting would turn them into tracing failures that are not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf Tensor:UserWarning"),
    pytest.mark.filterwarnings("ignore:<class 'torch.autograd.function.Function'> should not be:DeprecationWarning"),
]

B, T, D_MODEL, HEADS, CHUNK = 2, 16, 32, 2, 8
TOL = {"rtol": 1e-5, "atol": 1e-5}
MIXERS = ("retention", "linear_attention", "softmax_attention", "gated_retention")
MODES = ("parallel", "chunkwise")


def compiled(fn):
    return torch.compile(fn, backend="aot_eager_decomp_partition", fullgraph=True)


def outputs_and_grads(fn, x: torch.Tensor, params: list[torch.Tensor], *args) -> list[torch.Tensor]:
    """``fn(x, *args)`` and the gradients of a fixed random projection of it w.r.t. ``x`` and ``params``."""
    x = x.detach().requires_grad_()
    y = fn(x, *args)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype).to(y.device)
    grads = torch.autograd.grad((y * w).sum(), [x, *params])
    return [y.detach(), *grads]


def assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(g, w, **TOL, msg=lambda m, i=i: f"tensor {i} (0: the output, then grads): {m}")


def state_tensors(state: object) -> list[torch.Tensor]:
    """Every tensor a mixer state holds, in field order (the state classes are dataclasses of tensors and
    tuples of tensors, whatever their fields)."""
    found: list[torch.Tensor] = []

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    for f in dataclasses.fields(state):
        visit(getattr(state, f.name))
    return found


def graph_breaks(fn, *args) -> tuple[int, list[str]]:
    """``torch._dynamo.explain``'s count of graph breaks in ``fn(*args)``, and where they happen."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(*args)
    reasons = [f"{b.reason}".splitlines()[0] + f" at {b.user_stack[-1:]}" for b in explanation.break_reasons]
    return explanation.graph_break_count, reasons


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: mixers.build(name, D_MODEL, num_heads=HEADS, backend="torch") for name in MIXERS}


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(0))


# -- built-in mixers on the torch backend --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MIXERS)
def test_torch_backend_traces_without_graph_breaks(built, x, name, mode):
    mixer = built[name]
    count, reasons = graph_breaks(lambda x: mixer(x, mode=mode, chunk_size=CHUNK)[0], x)
    assert count == 0, f"{name} ({mode}) breaks the graph: {reasons}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MIXERS)
def test_compiled_mixer_matches_eager_forward_and_backward(built, x, name, mode):
    mixer = built[name]
    params = list(mixer.parameters())

    def run(x):
        return mixer(x, mode=mode, chunk_size=CHUNK)[0]

    want = outputs_and_grads(run, x, params)
    assert_all_close(outputs_and_grads(compiled(run), x, params), want)


def first_state(mixer: torch.nn.Module, x: torch.Tensor) -> object:
    """The state after ``x``, from an eager call without gradients (so that it can be copied); softmax attention
    starts from a cache with room for what follows, since a compiled step cannot grow one."""
    start = None
    if "max_len" in inspect.signature(mixer.init_state).parameters:
        start = mixer.init_state(x.shape[0], max_len=x.shape[1] + 4)
    with torch.no_grad():
        return mixer(x, start, mode="parallel")[1]


@pytest.mark.parametrize("name", MIXERS)
def test_compiled_recurrent_step_matches_eager(built, x, name):
    mixer = built[name]
    params = list(mixer.parameters())
    state = first_state(mixer, x[:, :-1])

    def step(x, state):
        return mixer(x, state, mode="recurrent")[0]

    step_x = x[:, -1:]
    want = outputs_and_grads(step, step_x, params, copy.deepcopy(state))
    assert_all_close(outputs_and_grads(compiled(step), step_x, params, copy.deepcopy(state)), want)


def test_compiled_decoding_step_without_gradients_matches_eager(built, x):
    """Decoding without gradients, where softmax attention writes its cache in place: the same output and the
    same new state as eager."""
    mixer = built["softmax_attention"]
    state = first_state(mixer, x[:, :-1])

    def step(x, state):
        y, new = mixer(x, state, mode="recurrent")
        return y, state_tensors(new)

    with torch.no_grad():
        y_want, state_want = step(x[:, -1:], copy.deepcopy(state))
        y_got, state_got = compiled(step)(x[:, -1:], copy.deepcopy(state))
    assert_all_close([y_got, *state_got], [y_want, *state_want])


def test_compiled_model_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=64,
        d_model=D_MODEL,
        n_layers=2,
        layers=["retention", "softmax_attention"],  # (linear attention's layer differs only in its mixer)
        mixer_options={name: {"num_heads": HEADS} for name in MIXERS},
        backend="torch",
    )
    model = build_model(config)
    tokens = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())

    def logits(tokens):
        return model(tokens, mode="parallel")[0]

    def run(fn):
        out = fn(tokens)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return [out.detach(), *torch.autograd.grad((out * w).sum(), params)]

    torch._dynamo.reset()
    assert_all_close(run(compiled(logits)), run(logits))


# -- backends dynamo cannot trace ----------------------------------------------------------------------------------
untraceable_retention = torch.compiler.disable(torch_retention.retention)


@pytest.fixture(scope="module")
def opaque_mixer() -> torch.nn.Module:
    """A retention mixer on a backend that dynamo must not trace, registered with ``traceable=False``."""
    with get_registry().temporary_backend("retention", "untraceable", untraceable_retention, traceable=False):
        torch.manual_seed(0)
        yield mixers.build("retention", D_MODEL, num_heads=HEADS, backend="untraceable")


def test_an_untraceable_backend_runs_its_kernel_directly_in_eager_mode():
    calls = []

    def kernel(q, k, v, gamma, *, mode, chunk_size, initial_state):
        calls.append(mode)
        return torch_retention.retention(q, k, v, gamma, mode=mode, chunk_size=chunk_size, initial_state=initial_state)

    with get_registry().temporary_backend("retention", "probe", kernel, traceable=False) as added:
        assert added.traceable is False and added.fn is kernel  # registered as it is: the op decides per call
        q = torch.randn(1, 3, 1, 2)
        o, s = functional.retention(q, q, q, 0.9, mode="parallel", backend="probe")
        want = kernel(
            q, q, q, torch.tensor([0.9], dtype=torch.float64), mode="parallel", chunk_size=None, initial_state=None
        )
    assert calls == ["parallel", "parallel"]  # eagerly no custom op in between (it would run the kernel itself)
    assert_all_close([o, s], list(want))


def test_traceable_must_be_a_bool():
    with pytest.raises(RegistrationError, match="traceable must be a bool"):
        get_registry().register_backend("retention", "bad", torch_retention.retention, traceable="no")


def test_without_traceable_false_the_same_kernel_cannot_compile_fullgraph():
    """The opaque path is what makes the next tests pass: registered as traceable, the kernel breaks the graph."""
    q = torch.randn(B, T, HEADS, 8)

    def run(q):
        return functional.retention(q, q, q, 0.9, mode="parallel", backend="untraceable_plain")[0]

    torch._dynamo.reset()
    with get_registry().temporary_backend("retention", "untraceable_plain", untraceable_retention):
        with pytest.raises(torch._dynamo.exc.Unsupported, match="disable"):
            compiled(run)(q)


def test_untraceable_backend_compiles_fullgraph_through_the_opaque_op(opaque_mixer, x):
    """``fullgraph=True`` fails on any graph break, so compiling at all shows there is none. (The mode travels
    to the kernel as a plain argument of the op: one mode covers the path.)"""
    params = list(opaque_mixer.parameters())

    def run(x):
        return opaque_mixer(x, mode="chunkwise", chunk_size=CHUNK)[0]

    want = outputs_and_grads(run, x, params)
    assert_all_close(outputs_and_grads(compiled(run), x, params), want)


def test_untraceable_backend_compiled_recurrent_step_matches_eager(opaque_mixer, x):
    params = list(opaque_mixer.parameters())
    state = first_state(opaque_mixer, x[:, :-1])

    def step(x, state):
        return opaque_mixer(x, state, mode="recurrent")[0]

    want = outputs_and_grads(step, x[:, -1:], params, copy.deepcopy(state))
    assert_all_close(outputs_and_grads(compiled(step), x[:, -1:], params, copy.deepcopy(state)), want)


# -- the custom op itself ------------------------------------------------------------------------------------------
def rand(*shape: int, positive: bool = False) -> torch.Tensor:
    t = torch.randn(*shape)
    return (t.abs() if positive else t).requires_grad_()


def op_cases() -> list[tuple[str, object, object, tuple, dict]]:
    """``(id, op, kernel, args, kwargs)``: a call of each op, with and without a state, a plugin's op included."""
    from seqmixers_conv.op import SHORT_CONV, torch_short_conv

    Dk, Dv, Hkv = 4, 3, 1
    s0 = rand(B, HEADS, Dk, Dv)
    q, k, v = rand(B, 5, HEADS, Dk), rand(B, 5, HEADS, Dk), rand(B, 5, HEADS, Dv)
    kg, vg = rand(B, 5, Hkv, Dk), rand(B, 5, Hkv, Dv)  # grouped: one key/value head for two query heads
    kc, vc = rand(B, Hkv, 9, Dk), rand(B, Hkv, 9, Dv)  # caches are head-major
    length = torch.tensor([2, 4])  # rows hold 2 and 4 of 9 slots; 5 new tokens fit
    kpos = rand(B, 5, HEADS, Dk, positive=True)
    lin_state = functional.LinearState(s0, rand(B, HEADS, Dk, positive=True))
    ret, lin, soft = RETENTION, LINEAR_ATTENTION, SOFTMAX_ATTENTION
    ret_k, lin_k = torch_retention.retention, torch_linear_attention.linear_attention
    soft_k = torch_softmax_attention.softmax_attention
    cache = functional.KVCache(kc, vc, length)
    x, w = rand(B, 5, 6), rand(6, 3)
    gammas = [0.9, 0.8]
    g, gated_k = -rand(B, 5, HEADS, positive=True), torch_gated_retention.gated_retention
    return [
        ("retention", ret, ret_k, (q, k, v, gammas), {"mode": "chunkwise", "chunk_size": 2}),
        ("retention-state", ret, ret_k, (q, k, v, gammas), {"mode": "parallel", "initial_state": s0}),
        ("gated", GATED_RETENTION, gated_k, (q, k, v, g), {"mode": "chunkwise", "chunk_size": 2}),
        ("gated-state", GATED_RETENTION, gated_k, (q, k, v, g), {"mode": "recurrent", "initial_state": s0}),
        ("linear", lin, lin_k, (q, k, v), {"mode": "parallel"}),
        ("linear-state", lin, lin_k, (q, kpos, v), {"mode": "chunkwise", "chunk_size": 2, "initial_state": lin_state}),
        ("softmax", soft, soft_k, (q, kg, vg), {"mode": "parallel"}),
        ("softmax-length", soft, soft_k, (q, kg, vg), {"mode": "recurrent", "initial_state": cache}),
        (
            "softmax-chunkwise",
            soft,
            soft_k,
            (q, kg, vg),
            {"mode": "chunkwise", "chunk_size": 2, "initial_state": cache},
        ),
        (
            "plugin-short-conv",
            SHORT_CONV,
            torch_short_conv,
            (x, w),
            {"mode": "parallel", "initial_state": rand(B, 2, 6)},
        ),
    ]


CASES = op_cases()


def opaque_arguments(op, kernel, args, kwargs) -> tuple:
    """What ``Op.run`` hands ``seqmixers::opaque`` while compiling, for ``kernel`` on this call."""
    return opaque.arguments(kernel, f"{op.name}/test", op.prepare(*args, **kwargs), op.state_arg)


@pytest.mark.parametrize(("op", "kernel", "args", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_opaque_op_passes_opcheck(op, kernel, args, kwargs):
    """Schema, autograd registration, fake implementation (its outputs' shapes and dtypes against the real
    ones) and AOT dispatch with dynamic shapes, forward and backward."""
    torch.library.opcheck(torch.ops.seqmixers.opaque.default, opaque_arguments(op, kernel, args, kwargs))


@pytest.mark.parametrize(("op", "kernel", "args", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_opaque_op_fake_outputs_have_the_kernels_shapes_and_dtypes(op, kernel, args, kwargs):
    tensors, *rest = opaque_arguments(op, kernel, args, kwargs)
    real = opaque.opaque(tensors, *rest)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = opaque.opaque([mode.from_tensor(t) for t in tensors], *rest)
    assert [(tuple(t.shape), t.dtype) for t in fake] == [(tuple(t.shape), t.dtype) for t in real]


@pytest.mark.parametrize(("op", "kernel", "args", "kwargs"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_opaque_op_gradients_are_the_kernels_and_its_inputs_stay_as_they_were(op, kernel, args, kwargs):
    """The recomputing backward gives what autograd through the kernel itself gives, state inputs included; the
    inputs are as they were (the torch backend fills a cache's free slots in place when no gradient is recorded,
    as in the custom op's forward: it gets a copy)."""
    tensors, *rest = opaque_arguments(op, kernel, args, kwargs)
    before = [t.detach().clone() for t in tensors]
    out = opaque.opaque(tensors, *rest)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))
    leaves = [t for t in tensors if t.requires_grad]
    differentiable = [t for t in out if t.is_floating_point()]
    weights = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(differentiable)]
    got = torch.autograd.grad(sum((t * w).sum() for t, w in zip(differentiable, weights, strict=True)), leaves)

    call = op.prepare(*args, **kwargs)
    o, final = kernel(*call.args, **call.kwargs)
    want_out = [o, *(t for t in torch.utils._pytree.tree_leaves(final) if t.is_floating_point())]
    want = torch.autograd.grad(sum((t * w).sum() for t, w in zip(want_out, weights, strict=True)), leaves)
    assert_all_close([*differentiable, *got], [*want_out, *want])


def test_a_plugin_op_on_an_untraceable_backend_compiles_fullgraph():
    """The custom op is generic: the conv plugin's own op, on a backend dynamo cannot trace, compiles with
    ``fullgraph=True`` and gives eager's outputs and gradients."""
    from seqmixers_conv.op import SHORT_CONV, torch_short_conv

    x, w = rand(B, 7, 6), rand(6, 3)
    untraceable = torch.compiler.disable(torch_short_conv)
    with get_registry().temporary_backend("short_conv", "untraceable", untraceable, traceable=False):

        def run(x):
            return SHORT_CONV(x, w, mode="chunkwise", chunk_size=3, backend="untraceable")[0]

        assert_all_close(outputs_and_grads(compiled(run), x, [w]), outputs_and_grads(run, x, [w]))


# -- the CuPy backend ----------------------------------------------------------------------------------------------
def test_cupy_backend_is_registered_untraceable():
    assert get_registry().backends["retention"]["cupy"].traceable is False


def cupy_unavailable() -> str | None:
    return get_registry().unavailable_reason(get_registry().backends["retention"]["cupy"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_retention_mixer_on_cupy_compiles_fullgraph_and_matches_eager():
    reason = cupy_unavailable()
    if reason is not None:
        pytest.skip(f"the cupy backend cannot run here: {reason}")
    torch.manual_seed(0)
    mixer = mixers.build("retention", 64, num_heads=2, backend="cupy").cuda()
    x = torch.randn(B, 40, 64, device="cuda")
    params = list(mixer.parameters())
    for mode in MODES:

        def run(x, mode=mode):
            return mixer(x, mode=mode, chunk_size=CHUNK)[0]

        count, reasons = graph_breaks(run, x)
        assert count == 0, reasons
        # The same kernels run either way (the compiled backward recomputes the forward, then runs eager's backward).
        assert_all_close(outputs_and_grads(compiled(run), x, params), outputs_and_grads(run, x, params))


def test_cupy_kernels_emulated_on_the_cpu_compile_fullgraph_and_match_eager(x, monkeypatch):
    """The CuPy backend as registered, its kernels and ``autograd.Function`` run by the CPU emulator of
    ``tests/cuda_emu``: a retention mixer on it compiles fullgraph, and gives eager's outputs and gradients."""
    from mixers.backends.cupy import _retention
    from tests import cuda_emu

    if cuda_emu.compiler() is None:
        pytest.skip("no C++ compiler (g++ or clang++) to build the kernels for the CPU")
    rt = cuda_emu.EmuRuntime(cuda_emu.build(), schedule=0, num_sms=132, max_smem=227 * 1024, tensor_cores=False)
    monkeypatch.setattr(_retention, "cupy_runtime", lambda device: rt)
    cupy = get_registry().backends["retention"]["cupy"]
    emulated = dataclasses.replace(cupy, name="cupy_emulated", devices=None, check_available=None)
    with get_registry().temporary_backend(emulated):
        torch.manual_seed(0)
        mixer = mixers.build("retention", D_MODEL, num_heads=HEADS, backend="cupy_emulated")
        params = list(mixer.parameters())

        def run(x):
            return mixer(x, mode="chunkwise", chunk_size=CHUNK)[0]

        assert_all_close(outputs_and_grads(compiled(run), x, params), outputs_and_grads(run, x, params))
