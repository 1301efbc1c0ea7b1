"""What a backend returns is checked at the op boundary, and ``"auto"`` leaves plugin backends alone unless allowed.

A backend returning the wrong structure, shape, dtype or state shape fails at the op, on any call (structure
is metadata, checked on every call), with an error naming the backend, its plugin and distribution (not far
away in a mixer's layers). A plugin backend that returns zeros of the right shape passes that check; what keeps it from
taking over every model is the ``"auto"`` policy: for an op with a built-in backend, ``"auto"`` picks a
plugin's backend only when the user allows it (``SEQMIXERS_AUTO_PLUGINS`` / ``mixers.allow_plugin_backends``),
while a backend named explicitly always runs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mixers
from mixers import functional
from mixers import registry as registry_module
from mixers.catalogue import BackendOutputError
from mixers.ops import base
from mixers.registry import Registry
from tests.fake_plugins import OUTPUT_DISTRIBUTION, OUTPUT_VERSION, forget_other_fake_modules, write_output_distribution

PLUGIN = f"plugin 'fake_outputs' (distribution {OUTPUT_DISTRIBUTION} {OUTPUT_VERSION})"


@pytest.fixture
def reg(tmp_path, monkeypatch) -> Registry:
    """The process registry: the built-ins and the ``fakeplug-output`` distribution's two plugins."""
    write_output_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SEQMIXERS_PLUGINS", "fake_outputs,fake_owner")
    for name in ("SEQMIXERS_STRICT_PLUGINS", "SEQMIXERS_AUTO_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    registry = Registry().load()
    monkeypatch.setattr(registry_module, "_REGISTRY", registry)
    yield registry
    forget_other_fake_modules()


def qkv(B=2, T=5, H=3, D=4, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, T, H, D, generator=gen, dtype=dtype) for _ in range(3)]


def fails(call, *fragments):
    with pytest.raises(BackendOutputError) as info:
        call()
    message = str(info.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"message {message!r} lacks {missing}"
    return message


@pytest.mark.parametrize(
    ("backend", "fragments"),
    [
        ("wrong_shape", ["o of shape [2, 5, 3, 3]", "expected [2, 5, 3, 4] ([B, T, H, Dv])"]),
        ("wrong_dtype", ["o of dtype torch.float64", "expected torch.float32"]),
        ("wrong_state", ["final_state of shape [2, 3, 3, 4]", "expected [2, 3, 4, 4] ([B, H, Dk, Dv])"]),
        ("not_a_pair", ["returned a Tensor", "expected a pair (o, final_state)"]),
    ],
)
@pytest.mark.parametrize("mode", ["parallel", "recurrent"])
def test_wrong_retention_outputs_fail_at_the_op_naming_backend_plugin_and_distribution(reg, backend, fragments, mode):
    q, k, v = qkv()
    message = fails(
        lambda: functional.retention(q, k, v, 0.9, mode=mode, backend=backend),
        f"backend {backend!r} of op 'retention' ({PLUGIN})",
        *fragments,
        "q [2, 5, 3, 4], v [2, 5, 3, 4]",
        f"mode {mode!r}",
        "'torch'",  # the alternatives
    )
    assert "Traceback" not in message


def test_a_mixer_with_a_wrong_backend_fails_at_the_op_not_in_its_layers(reg):
    mixer = mixers.build("retention", 8, num_heads=2, backend="wrong_state")
    fails(lambda: mixer(torch.randn(1, 3, 8)), "backend 'wrong_state' of op 'retention'", OUTPUT_DISTRIBUTION)


def test_wrong_attention_states_fail_at_the_op(reg):
    q, k, v = qkv()
    fails(
        lambda: functional.linear_attention(q.relu(), k.relu(), v, mode="chunkwise", backend="no_z"),
        f"backend 'no_z' of op 'linear_attention' ({PLUGIN})",
        "final_state.z of shape [2, 3, 3]; expected [2, 3, 4] ([B, H, Dk])",
    )
    _, cache = functional.softmax_attention(q, k, v, mode="parallel", backend="torch")
    fails(
        lambda: functional.softmax_attention(q, k, v, mode="recurrent", initial_state=cache, backend="stale_cache"),
        f"backend 'stale_cache' of op 'softmax_attention' ({PLUGIN})",
        "final_state.k of shape [2, 5, 3, 4]; expected [2, 3, 10, 4] ([B, Hkv, C, Dk])",
        "a cache of capacity 10",
    )


# -- every call is checked (issue 21, item 6) -------------------------------------------------------------
# The check reads only metadata (types, shapes, dtypes, devices), so it runs on every call of every backend, the
# built-in ones included: benchmarks/backend_checks.py measures it at about 1% of an eager decode step of the
# tiny presets (docs/registry.md).


def test_a_plugin_backend_wrong_after_its_first_call_fails_on_that_call(reg):
    q, k, v = qkv()
    o, _ = functional.retention(q, k, v, 0.9, mode="recurrent", backend="right_once")
    assert o.shape == (2, 5, 3, 4)
    fails(
        lambda: functional.retention(q, k, v, 0.9, mode="recurrent", backend="right_once"),
        f"backend 'right_once' of op 'retention' ({PLUGIN})",
        "o of shape [2, 5, 2, 4]; expected [2, 5, 3, 4] ([B, T, H, Dv])",
    )


def test_a_builtin_backend_is_checked_on_every_call_too(reg, monkeypatch):
    """The torch backend of softmax attention, made to forget the cache from its third decoding step on."""
    torch_backend = reg.backends["softmax_attention"]["torch"]
    calls = []

    def forgets_later(q, k, v, *, mode, chunk_size, initial_state):
        o, cache = torch_backend.fn(q, k, v, mode=mode, chunk_size=chunk_size, initial_state=initial_state)
        calls.append(mode)
        return o, (cache.k[:, :, :1], cache.v, cache.length) if len(calls) >= 3 else cache

    wrong_later = dataclasses.replace(torch_backend, fn=forgets_later)
    monkeypatch.setitem(reg.backends["softmax_attention"], "torch", wrong_later)
    q, k, v = qkv(T=1)
    _, cache = functional.softmax_attention(q, k, v, mode="recurrent", backend="torch")
    _, cache = functional.softmax_attention(q, k, v, mode="recurrent", initial_state=cache, backend="torch")
    fails(
        lambda: functional.softmax_attention(q, k, v, mode="recurrent", initial_state=cache, backend="torch"),
        "backend 'torch' of op 'softmax_attention'",
        "final_state.k of shape [2, 3, 1, 4]",
    )


def test_the_check_runs_no_tensor_operation():
    """Host metadata only: no aten op runs inside it, so nothing waits for a device."""

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    q, k, v = qkv()
    call = functional.RETENTION.prepare(q, k, v, 0.9, mode="recurrent")
    result = functional.retention(q, k, v, 0.9, mode="recurrent", backend="torch")
    with Ops() as ops:
        checked = base._verified(None, call.mode, result, call.describe, call.o, call.state, call.device)
    assert checked is result and ops.seen == []


@pytest.mark.parametrize(
    "result",
    [
        "not a pair",
        (torch.zeros(2, 5, 3, 4),),
        (torch.zeros(2, 5, 3, 4), "no state"),
        (torch.zeros(2, 5, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 4, 4)),
        (torch.zeros(2, 5, 3, 4), torch.zeros(2, 3, 4, 4, device="meta")),
    ],
    ids=["not-a-pair", "one-item", "state-not-a-tensor", "wrong-dtype", "wrong-device"],
)
def test_the_quick_test_and_the_explained_check_agree(reg, result):
    """``_fits`` is the quick test every call takes; what it refuses, the full check explains (and raises)."""
    q, k, v = qkv()
    call = functional.RETENTION.prepare(q, k, v, 0.9, mode="recurrent")
    assert not base._fits(result, [call.o, *call.state], call.device)
    backend = reg.backends["retention"]["torch"]
    with pytest.raises(BackendOutputError):
        base._verified(backend, call.mode, result, call.describe, call.o, call.state, call.device)


def test_builtin_backends_pass_the_boundary_check(reg):
    for dtype in (torch.float64, torch.bfloat16):
        q, k, v = qkv(dtype=dtype)
        for mode in functional.MODES:
            functional.retention(q, k, v, 0.9, mode=mode, backend="torch")
            functional.linear_attention(q.relu(), k.relu(), v, mode=mode, backend="torch")
            _, cache = functional.softmax_attention(q, k[:, :, :1], v[:, :, :1], mode=mode)
            functional.softmax_attention(q, k[:, :, :1], v[:, :, :1], mode=mode, initial_state=cache)


# -- the "auto" policy ----------------------------------------------------------------------------------


def test_auto_does_not_pick_a_plugin_backend_for_a_builtin_op_unless_allowed(reg, monkeypatch):
    """``zeros`` (priority 1000, right shapes, zero outputs) would silently zero every model's outputs."""
    torch.manual_seed(0)
    mixer = mixers.build("retention", 8, num_heads=2)
    x = torch.randn(1, 4, 8)
    y, _ = mixer(x)
    assert y.abs().sum() > 0
    assert reg.resolve_backend("retention", "auto", device=x.device, dtype=x.dtype, mode="parallel").name == "torch"
    assert "'zeros' (priority 1000" in reg.describe_backends("retention")
    assert "not picked by 'auto' (plugin backends need SEQMIXERS_AUTO_PLUGINS=1" in reg.describe_backends("retention")
    # Named, it always runs.
    o, _ = functional.retention(*qkv(), 0.9, mode="parallel", backend="zeros")
    assert not o.any()
    # Allowed (all plugins, or this one by name), "auto" takes it: the user's choice.
    for allowed in (True, "fake_outputs", ["fake_outputs"]):
        mixers.allow_plugin_backends(allowed)
        assert not mixer(x)[0].any()
        mixers.allow_plugin_backends(False)
        assert torch.equal(mixer(x)[0], y)
    mixers.allow_plugin_backends(["fake_owner"])  # another plugin allowed: not this one
    assert torch.equal(mixer(x)[0], y)
    with pytest.raises(TypeError, match="plugin names"):
        mixers.allow_plugin_backends([1])


@pytest.mark.parametrize(
    ("value", "expected"), [("1", "zeros"), ("fake_outputs", "zeros"), ("0", "torch"), ("", "torch")]
)
def test_auto_plugins_by_environment(reg, monkeypatch, value, expected):
    monkeypatch.setenv("SEQMIXERS_AUTO_PLUGINS", value)
    fresh = Registry().load()
    chosen = fresh.resolve_backend(
        "retention", "auto", device=torch.device("cpu"), dtype=torch.float32, mode="parallel"
    )
    assert chosen.name == expected


def test_auto_still_picks_a_plugins_backend_for_its_own_op(reg):
    """An op no built-in serves: its owner's backend (the plugin whose mixer uses it), not a higher-priority one
    of another plugin; an op nobody owns takes any backend."""

    def auto(op):
        return reg.resolve_backend(op, "auto", device=torch.device("cpu"), dtype=torch.float32, mode="parallel").name

    assert auto("fake_own_op") == "own"
    assert auto("fake_free_op") == "free"
    reg.allow_plugin_backends("fake_outputs")
    assert auto("fake_own_op") == "intruder"


def test_the_example_conv_plugins_op_is_served_by_auto():
    registry = mixers.get_registry()
    if "short_conv" not in registry.mixers:
        pytest.skip("seqmixers-conv is not installed")
    chosen = registry.resolve_backend(
        "short_conv", "auto", device=torch.device("cpu"), dtype=torch.float32, mode="parallel"
    )
    assert chosen.name == "torch" and not registry.is_builtin(chosen.plugin)
    y, _ = mixers.build("short_conv", 8)(torch.randn(1, 3, 8))
    assert y.shape == (1, 3, 8)
