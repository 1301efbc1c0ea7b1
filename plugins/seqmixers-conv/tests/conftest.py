"""The conformance kit's hypothesis profiles: ``ci`` under CI (fast, derandomised), else ``default``;
``HYPOTHESIS_PROFILE=dev`` for a thorough run."""

from mixers.testing.profiles import load_profiles

load_profiles()
