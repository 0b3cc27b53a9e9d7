"""Test-suite settings: property tests are derandomized so every run checks the same cases."""

from hypothesis import settings

settings.register_profile("mixq", derandomize=True, database=None)
settings.load_profile("mixq")
