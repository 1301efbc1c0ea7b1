"""Hypothesis profiles from the conformance kit: ``ci`` (fast, derandomised; chosen when CI is set), ``dev``
(thorough), ``default``. Pick one explicitly with ``HYPOTHESIS_PROFILE=dev`` (or ``ci``, ``default``).
"""

import torch

from mixers.testing.profiles import load_profiles

load_profiles()

torch.set_num_threads(min(2, torch.get_num_threads()))
