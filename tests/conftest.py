"""Fixtures shared by every test: each server lives in tests/fixtures/."""

import os
import tempfile

from hypothesis import HealthCheck, settings

# Hypothesis keeps caches (and patches for failing examples) in
# .hypothesis/ beside the tests; keep the checkout clean.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "smtpgate-hypothesis"))

pytest_plugins = [
    "tests.fixtures.postfix",
    "tests.fixtures.dnsserver",
    "tests.fixtures.gateway",
]

# Property tests are part of CI, so they must give the same verdict on every
# run: a fixed sequence of examples (derandomize), no example database left
# in the checkout, and no per-example deadline on a machine whose speed
# drifts (tests that go through Postfix take milliseconds per example).
settings.register_profile(
    "smtpgate",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# New examples each run, for a developer looking for trouble:
# pytest --hypothesis-profile=explore tests/test_relay_properties.py
settings.register_profile("explore", settings.get_profile("smtpgate"), derandomize=False)
settings.load_profile("smtpgate")
