"""seqmixers-conv: a short causal depthwise convolution as a seqmixers token mixer, shipped as a plugin.

The mixer (``"short_conv"``) and its op (``seqmixers_conv.short_conv``, backend ``"torch"``) are
registered through the ``seqmixers`` entry-point group by ``seqmixers_conv.plugin``; after
``pip install seqmixers-conv``, ``mixers.build("short_conv", d_model)`` works and a model config can
name it as a layer.
"""

from seqmixers_conv.mixer import ShortConvolution
from seqmixers_conv.op import short_conv

__all__ = ["ShortConvolution", "short_conv"]
__version__ = "0.1.0"
