"""Shared by the provider driver tests. Each fake server keeps its fixtures in its own
module (tests/providers/fake_<provider>.py), imported by the tests that use it."""
