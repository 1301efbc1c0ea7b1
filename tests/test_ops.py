"""An op is one registered object (``mixers.ops.Op``): name, backend signature, validation, state type,
reference and conformance spec, registered through the ``register_ops`` hook; calling it validates,
dispatches and checks the backend's outputs, for a plugin's op as for the core's."""

from __future__ import annotations

import sys
import types
from typing import Protocol

import pytest
import torch
from torch import Tensor

import mixers
from mixers import functional
from mixers.catalogue import Backend, BackendOutputError
from mixers.ops import Op, OpCall
from mixers.ops.checks import check_mode, check_state
from mixers.ops.gated_retention import GATED_RETENTION
from mixers.ops.linear_attention import LINEAR_ATTENTION, LinearState
from mixers.ops.retention import RETENTION
from mixers.ops.softmax_attention import SOFTMAX_ATTENTION, KVCache
from mixers.registry import Registry, get_registry
from mixers.testing.ops import OP_SPECS, get_op_spec

BUILTIN_OPS = (RETENTION, LINEAR_ATTENTION, SOFTMAX_ATTENTION, GATED_RETENTION)


def test_the_builtin_ops_are_registered_by_their_folders_with_their_reference_and_spec():
    ops = get_registry().ops
    assert {op.name for op in BUILTIN_OPS} <= set(ops)
    for op in BUILTIN_OPS:
        registered = ops[op.name]
        assert registered.plugin == f"mixers.ops.{op.name}" and registered.prepare is op.prepare
        assert callable(registered.load_reference())
        spec = registered.load_testing()
        assert spec.op == op.name and get_op_spec(op.name) is spec and OP_SPECS[op.name] is spec
    assert ops["linear_attention"].state_type is LinearState and ops["softmax_attention"].state_type is KVCache


def test_functional_ops_are_their_op_objects():
    """``mixers.functional.retention`` and calling the ``Op`` are the same computation and validation."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 3)
    op = get_registry().ops["retention"]
    o1, s1 = functional.retention(q, k, v, 0.9, mode="chunkwise", chunk_size=4)
    o2, s2 = op(q, k, v, 0.9, mode="chunkwise", chunk_size=4)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    with pytest.raises(ValueError, match=r"mode must be one of .*'sideways'"):
        op(q, k, v, 0.9, mode="sideways")


# -- a plugin's own op: validation written once, dispatch and output checks for free ------------------
class DoubleBackend(Protocol):
    def __call__(self, x: Tensor, *, mode: str, chunk_size: int | None, initial_state: Tensor | None): ...


def prepare_double(x: Tensor, *, mode: str, chunk_size: int | None = None, initial_state: Tensor | None = None):
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a tensor [B, T], got {type(x).__name__}")
    chunk = check_mode(mode, chunk_size)
    check_state(initial_state, "initial_state", (x.shape[0],), x.dtype, x.device)
    return OpCall(
        args=(x,),
        kwargs={"mode": mode, "chunk_size": chunk, "initial_state": initial_state},
        device=x.device,
        dtype=x.dtype,
        mode=mode,
        o=("y", tuple(x.shape), "[B, T]", x.dtype),
        state=[("total", (x.shape[0],), "[B]", x.dtype)],
        describe=lambda: f"x {list(x.shape)}",
    )


DOUBLE = Op("fake_double", prepare_double, DoubleBackend, state_type=Tensor, description="2x and a running sum")


def double(x, *, mode, chunk_size, initial_state):
    total = x.sum(1) if initial_state is None else initial_state + x.sum(1)
    return 2 * x, total


def forgetful(x, *, mode, chunk_size, initial_state):
    return 2 * x, x  # the state has the wrong shape


@pytest.fixture
def plugin_registry(monkeypatch):
    """A registry with a plugin module that registers the op and two backends of it, through the hooks."""
    module = types.ModuleType("fake_op_plugin")

    @mixers.hookimpl
    def register_ops(register):
        register(DOUBLE)

    @mixers.hookimpl
    def register_backends(register):
        register(Backend(op="fake_double", name="torch", fn=double))
        register(Backend(op="fake_double", name="forgetful", fn=forgetful, priority=-1))

    module.register_ops, module.register_backends = register_ops, register_backends
    monkeypatch.setitem(sys.modules, "fake_op_plugin", module)
    plugins = ("mixers.ops.retention", "mixers.backends.torch_retention", "fake_op_plugin")
    reg = Registry().load(builtins=plugins, entry_points=False)
    monkeypatch.setattr("mixers.registry._REGISTRY", reg)
    return reg


def test_a_plugin_op_gets_validation_dispatch_and_output_checks(plugin_registry):
    assert plugin_registry.ops["fake_double"].plugin == "fake_op_plugin"
    x = torch.arange(6.0).view(2, 3)
    y, total = DOUBLE(x, mode="parallel")
    assert torch.equal(y, 2 * x) and total.tolist() == [3.0, 12.0]
    with pytest.raises(ValueError, match=r"x must be a tensor \[B, T\], got list"):
        DOUBLE([1.0], mode="parallel")
    with pytest.raises(ValueError, match=r"initial_state must have shape \[2\], got \[3\]"):
        DOUBLE(x, mode="parallel", initial_state=torch.zeros(3))
    with pytest.raises(BackendOutputError) as info:
        DOUBLE(x, mode="parallel", backend="forgetful")
    message = str(info.value)
    assert "backend 'forgetful' of op 'fake_double' (plugin 'fake_op_plugin'" in message
    assert "total of shape [2, 3]; expected [2] ([B])" in message
    with pytest.raises(ValueError, match="unknown backend 'nope' for op 'fake_double'"):
        DOUBLE(x, mode="parallel", backend="nope")


def test_a_malformed_or_duplicate_op_breaks_only_its_plugin(monkeypatch):
    bad = types.ModuleType("fake_bad_op_plugin")

    @mixers.hookimpl
    def register_ops(register):
        register("retention")  # a name, not an Op

    bad.register_ops = register_ops
    again = types.ModuleType("fake_dup_op_plugin")

    @mixers.hookimpl
    def register_ops_again(register):
        register(BUILTIN_OPS[0])

    again.register_ops = register_ops_again
    monkeypatch.setitem(sys.modules, "fake_bad_op_plugin", bad)
    monkeypatch.setitem(sys.modules, "fake_dup_op_plugin", again)
    builtins = ("mixers.ops.retention", "fake_bad_op_plugin", "fake_dup_op_plugin")
    reg = Registry().load(builtins=builtins, entry_points=False)
    assert "register() expected a mixers.ops.Op, got str" in "\n".join(reg.plugins["fake_bad_op_plugin"].errors)
    assert "op 'retention' is already registered by plugin 'mixers.ops.retention'" in "\n".join(
        reg.plugins["fake_dup_op_plugin"].errors
    )
    assert reg.ops["retention"].plugin == "mixers.ops.retention"


def test_every_name_the_kit_exports_resolves():
    """``mixers.testing`` exports lazily; each name in its ``__all__`` (the kit's public API, including what a
    plugin needs to describe an op of its own) must import."""
    import mixers.testing as kit

    for name in kit.__all__:
        assert getattr(kit, name) is not None, name
    for name in ("BadInput", "standard_bad_inputs", "check_cases", "builtin_registry", "using_registry"):
        assert name in kit.__all__
