"""Our retention mixer, configured the way torchscale computes, matches the official code.

torchscale rescales retention scores (row-normalised decay, ``max(|row sum|, 1)``) before a per-head
RMSNorm. The norm is scale-invariant except through its epsilon, so with a negligible epsilon both
implementations compute the same function; with torchscale's default epsilon they differ by exactly
that epsilon's effect (which is also why torchscale's own modes disagree).
"""

import os

import pytest
import torch

from tests.torchscale_compat import build_pair, import_torchscale, run_torchscale

ts = import_torchscale()
if ts is None:
    if os.environ.get("CI"):
        pytest.fail("torchscale is not installed; scripts/test.sh installs it with --no-deps", pytrace=False)
    pytest.skip("torchscale is not installed (pip install --no-deps torchscale==0.3.0)", allow_module_level=True)


@pytest.mark.parametrize("mode", ["parallel", "chunkwise"])
@pytest.mark.parametrize("d_model,value_dim,num_heads", [(64, 128, 2), (96, 96, 3)])
def test_same_function_as_torchscale(mode, d_model, value_dim, num_heads):
    theirs, relpos, ours = build_pair(
        ts, d_model=d_model, value_dim=value_dim, num_heads=num_heads, chunk_size=8, eps=1e-14, seed=1
    )
    theirs, relpos, ours = theirs.double(), relpos.double(), ours.double()
    x = torch.randn(2, 32, d_model, dtype=torch.float64)
    expected = run_torchscale(theirs, relpos, x, mode)
    got, _ = ours(x, mode=mode, chunk_size=8)
    # torchscale builds its angles and decays in float32 before .double(): ~1e-7 is its own rounding.
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 1e-5, f"relative difference {rel:.2e} to torchscale in {mode} mode"


def test_default_epsilon_difference_is_the_norm_epsilon():
    """With torchscale's epsilon the two differ, and shrinking only the epsilon removes the difference."""
    x = torch.randn(1, 32, 64, dtype=torch.float64)
    diffs = {}
    for eps in (1e-6, 1e-14):
        theirs, relpos, ours = build_pair(ts, d_model=64, value_dim=128, num_heads=2, eps=eps, seed=2)
        expected = run_torchscale(theirs.double(), relpos.double(), x, "parallel")
        got, _ = ours.double()(x)
        diffs[eps] = ((got - expected).norm() / expected.norm()).item()
    assert diffs[1e-14] < 1e-5 < diffs[1e-6]
