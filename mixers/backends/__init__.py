"""Op backends: a file per op (``torch_<op>.py``, each registering itself as a built-in plugin), the CuPy kernels,
and what they share (``ragged``: packed rows as a batch; ``nonfinite``: causality with NaN and inf inputs)."""
