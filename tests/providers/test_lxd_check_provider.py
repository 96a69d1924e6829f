"""``manage.py check_provider <id>``: against the fake LXD/Incus daemon, and failing clearly."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tasks.management.commands.check_provider import Command
from tasks.models import Provider


def make_provider(env, transport="unix", **overrides) -> Provider:
    provider = Provider(name=f"{env.flavour}-{transport}", provider_type=env.flavour)
    provider.connection = env.connection(transport, **overrides)
    provider.set_secrets(env.secrets(transport))
    provider.save()
    return provider


def run(*args) -> str:
    out = StringIO()
    call_command("check_provider", *[str(a) for a in args], stdout=out)
    return out.getvalue()


@pytest.mark.django_db
@pytest.mark.parametrize("transport", ["unix", "https"])
def test_prints_the_version_and_capabilities(lxd_env, transport):
    provider = make_provider(lxd_env, transport)
    out = run(provider.pk)
    version = "6.1" if lxd_env.flavour == "incus" else "5.21.2"
    assert f"provider {provider.pk} '{provider.name}' ({lxd_env.flavour}): OK" in out
    assert f"server version:      {version}" in out
    assert "instance types:      container, vm" in out
    assert "native rebuild:      yes" in out
    assert "password methods:    exec-stdin" in out


@pytest.mark.django_db
def test_unreachable_provider_exits_non_zero_with_the_reason(lxd_env, tmp_path, capsys):
    provider = make_provider(lxd_env, endpoint=f"unix://{tmp_path}/gone.sock")
    with pytest.raises(SystemExit) as info:
        Command().run_from_argv(["manage.py", "check_provider", str(provider.pk)])
    assert info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreachable: server info: cannot connect to" in err[0]


@pytest.mark.django_db
def test_refused_client_certificate_is_reported_as_such(lxd_env):
    provider = make_provider(lxd_env, "https")
    provider.set_secrets({"client_cert": lxd_env.tls.stranger_cert_pem, "client_key": lxd_env.tls.stranger_key_pem})
    provider.save()
    with pytest.raises(CommandError, match="authentication refused: .* does not trust this client certificate"):
        run(provider.pk)


@pytest.mark.django_db
def test_unknown_provider_id():
    with pytest.raises(CommandError, match="no provider with id 999"):
        run(999)


@pytest.mark.django_db
def test_works_for_the_simulated_provider_too(provider):
    assert "(simulated): OK" in run(provider.pk)
