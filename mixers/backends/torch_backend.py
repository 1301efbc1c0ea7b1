"""The built-in torch backend, registered through the same hook a third-party plugin uses. Each of its functions
computes a packed row in one call (``packs=True``; the contract is in docs/packing.md)."""

from __future__ import annotations

from mixers.backends import torch_linear_attention, torch_retention, torch_softmax_attention
from mixers.catalogue import Backend, BackendRegistrar
from mixers.hookspecs import hookimpl


@hookimpl
def register_backends(register: BackendRegistrar) -> None:
    register(
        Backend(
            op="retention",
            name="torch",
            fn=torch_retention.retention,
            priority=0,
            packs=True,
            description="pure torch; any device and dtype; differentiable by autograd",
        )
    )
    register(
        Backend(
            op="linear_attention",
            name="torch",
            fn=torch_linear_attention.linear_attention,
            priority=0,
            packs=True,
            description="pure torch; any device and dtype; differentiable by autograd",
        )
    )
    register(
        Backend(
            op="softmax_attention",
            name="torch",
            fn=torch_softmax_attention.softmax_attention,
            priority=0,
            packs=True,
            description="pure torch (parallel through scaled_dot_product_attention); any device and dtype",
        )
    )
