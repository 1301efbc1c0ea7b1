"""Re-export of the float64 retention reference, which now lives in ``mixers.testing.reference``.

Kept so that test modules importing ``tests.reference`` keep working; new tests import ``mixers.testing``.
"""

from mixers.testing.reference import retention_reference

__all__ = ["retention_reference"]
