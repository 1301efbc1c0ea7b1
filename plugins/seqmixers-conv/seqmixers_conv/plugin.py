"""The plugin module named by the ``seqmixers`` entry point: it registers the op, its backend and the mixer.

This is the whole integration with seqmixers; the same hooks register the core's own pieces.
"""

from __future__ import annotations

from mixers import Backend, hookimpl
from mixers.catalogue import BackendRegistrar, MixerRegistrar, OpRegistrar

from seqmixers_conv.mixer import ShortConvolution
from seqmixers_conv.op import OP, SHORT_CONV, torch_short_conv


@hookimpl
def register_ops(register: OpRegistrar) -> None:
    register(SHORT_CONV)


@hookimpl
def register_backends(register: BackendRegistrar) -> None:
    register(
        Backend(
            op=OP,
            name="torch",
            fn=torch_short_conv,
            priority=0,
            description="pure torch (depthwise conv1d); any device and dtype; differentiable by autograd",
        )
    )


@hookimpl
def register_mixers(register: MixerRegistrar) -> None:
    register(
        "short_conv",
        ShortConvolution,
        ops=(OP,),
        description="short causal depthwise convolution (state: the last K-1 inputs)",
    )
