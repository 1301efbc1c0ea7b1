"""The built-in torch backend, registered through the same hook a third-party plugin uses."""

from __future__ import annotations

from mixers.backends import torch_retention
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
