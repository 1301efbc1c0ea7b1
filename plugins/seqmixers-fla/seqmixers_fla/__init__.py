"""seqmixers-fla: the ``"fla"`` backend of the ``retention``, ``gated_retention`` and ``linear_attention`` ops, through
flash-linear-attention's Triton kernels (``fla.ops.simple_gla``).

Registered through the ``seqmixers`` entry-point group by ``seqmixers_fla.plugin``. Without fla or a
CUDA device the backend is listed as unavailable, with the reason. Not yet verified on a GPU, so it
ranks below the torch backend: ask for it by name, ``backend="fla"``.
"""

from seqmixers_fla.adapter import gated_retention, linear_attention, retention
from seqmixers_fla.plugin import PRIORITY, check_available

__all__ = ["PRIORITY", "check_available", "gated_retention", "linear_attention", "retention"]
__version__ = "0.1.0"
