"""The built-in torch backend, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from mixers.backends import torch_linear_attention, torch_retention, torch_softmax_attention
from mixers.hookspecs import hookimpl
from mixers.registry import Backend, BackendRegistrar


@hookimpl
def register_backends(register: BackendRegistrar) -> None:
    register(
        Backend(
            op="retention",
            name="torch",
            fn=torch_retention.retention,
            priority=0,
            description="pure torch; any device and dtype; differentiable by autograd",
        )
    )
    register(
        Backend(
            op="linear_attention",
            name="torch",
            fn=torch_linear_attention.linear_attention,
            priority=0,
            description="pure torch; any device and dtype; differentiable by autograd",
        )
    )
    register(
        Backend(
            op="softmax_attention",
            name="torch",
            fn=torch_softmax_attention.softmax_attention,
            priority=0,
            description="pure torch (parallel through scaled_dot_product_attention); any device and dtype",
        )
    )
