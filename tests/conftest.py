"""Fixtures shared by every test: each server lives in tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.postfix",
    "tests.fixtures.dnsserver",
    "tests.fixtures.gateway",
]
