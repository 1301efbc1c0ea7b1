"""Hypothesis profiles for conformance runs, shared by the project's tests and plugin authors' conftests.

``ci``: fast and derandomised (chosen when ``CI`` is set); ``dev``: thorough; ``default``: in between.
``HYPOTHESIS_PROFILE`` picks one explicitly. Registering is idempotent, so several conftests in one run
(the core's and each plugin's) agree on what each profile means.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILES = ("ci", "dev", "default")


def load_profiles() -> str:
    """Register the profiles and load the one ``HYPOTHESIS_PROFILE`` (or ``CI``) asks for; return its name."""
    slow = [HealthCheck.too_slow]
    # Spelled out rather than derived from hypothesis's own "ci" profile, which hypothesis < 6.107 lacks.
    settings.register_profile(
        "ci", max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=slow
    )
    settings.register_profile("dev", max_examples=300, deadline=None, suppress_health_check=slow)
    settings.register_profile("default", max_examples=50, deadline=None, suppress_health_check=slow)
    name = os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
    settings.load_profile(name)
    return name
