"""Shared by the provider driver tests. Each fake server keeps its fixtures in its own
module (tests/providers/fake_<provider>.py); they are registered here with one import."""

from tests.providers.fake_lxd import lxd_env, lxd_fakes, lxd_tls_material  # noqa: F401
