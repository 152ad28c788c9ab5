"""Test-wide settings: hypothesis must not judge speed on a loaded 2-core machine."""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ipop", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.load_profile("ipop")
