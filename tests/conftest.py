"""Hypothesis profiles: ``ci`` (fast, derandomised; chosen when CI is set), ``dev`` (thorough).

Pick one explicitly with ``HYPOTHESIS_PROFILE=dev`` (or ``ci``, ``default``).
"""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    parent=settings.get_profile("ci"),
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("default", max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))

torch.set_num_threads(min(2, torch.get_num_threads()))
