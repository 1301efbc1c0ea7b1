"""Re-exports of the conformance kit's strategies and comparisons, which now live in ``mixers.testing``.

Kept so that test modules importing ``tests.strategies`` keep working; new tests import ``mixers.testing``.
"""

from mixers.testing.asserts import RTOL, assert_rel_close, max_rel_error, norm_rel_error
from mixers.testing.strategies import (
    ELEMENT_BUDGET,
    MODES,
    RetentionCase,
    gamma_values,
    retention_cases,
    scaled_examples,
    segments,
    splits,
)

__all__ = [
    "ELEMENT_BUDGET",
    "MODES",
    "RTOL",
    "RetentionCase",
    "assert_rel_close",
    "gamma_values",
    "max_rel_error",
    "norm_rel_error",
    "retention_cases",
    "scaled_examples",
    "segments",
    "splits",
]
