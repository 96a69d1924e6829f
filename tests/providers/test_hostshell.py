"""ParamikoHostShell against a real SSH server on 127.0.0.1; IptablesNat on a fake host."""

from __future__ import annotations

import io

import paramiko
import pytest

from providers.base import AuthError, PermanentError, PortSpec, RetryableError
from providers.hostshell import IptablesNat, ParamikoHostShell, from_config
from tests.providers.fakes_hostshell import FakeHostShell, FakeSSHServer


@pytest.fixture(scope="module")
def keys():
    return {"host": paramiko.ECDSAKey.generate(), "client": paramiko.ECDSAKey.generate()}


def pem(key: paramiko.PKey) -> str:
    out = io.StringIO()
    key.write_private_key(out)
    return out.getvalue()


@pytest.fixture
def host():
    return FakeHostShell()


@pytest.fixture
def server(keys, host):
    srv = FakeSSHServer(host, keys["host"], keys["client"])
    yield srv
    srv.stop()


def shell_for(server, keys, **kw) -> ParamikoHostShell:
    options = dict(port=server.port, private_key=pem(keys["client"]), host_key=server.host_key_line)
    options.update(kw)
    return ParamikoHostShell("127.0.0.1", **options)


def test_secret_goes_on_stdin_and_never_in_the_command_line(server, keys, host):
    shell = shell_for(server, keys)
    rc, out, err = shell.run(["pct", "exec", "101", "--", "chpasswd"], stdin="root:Very-Secret-1\n")
    assert (rc, out, err) == (0, "", "")
    assert host.passwords == {"101": "Very-Secret-1"}
    assert server.commands == ["pct exec 101 -- chpasswd"]
    shell.close()


def test_exit_code_stdout_and_stderr_come_back(server, keys):
    shell = shell_for(server, keys)
    rc, out, err = shell.run(["iptables", "-w", "5", "-t", "nat", "-S", "PREROUTING"])
    assert rc == 0 and out.startswith("-P PREROUTING ACCEPT")
    rc, out, err = shell.run(["no-such-tool", "--flag"])
    assert rc == 127 and "command not found" in err
    rc, _, err = shell.run(["pct", "exec", "7", "--", "chpasswd"], stdin="root:x\n")
    assert rc == 0
    shell.close()


def test_arguments_are_quoted_for_the_remote_shell(server, keys, host):
    shell = shell_for(server, keys)
    shell.run(["iptables", "-t", "nat", "-A", "PREROUTING", "-m", "comment", "--comment", "two words; rm -rf /"])
    assert host.rules["nat"]["PREROUTING"] == [["-m", "comment", "--comment", "two words; rm -rf /"]]


def test_wrong_host_key_is_refused(server, keys):
    impostor = paramiko.ECDSAKey.generate()
    shell = shell_for(server, keys, host_key=f"{impostor.get_name()} {impostor.get_base64()}")
    with pytest.raises(AuthError, match="host key"):
        shell.run(["true"])


def test_no_pinned_host_key_is_refused_unless_explicitly_insecure(server, keys):
    with pytest.raises(PermanentError, match="no host_key pinned"):
        shell_for(server, keys, host_key=None).run(["true"])
    with pytest.warns(UserWarning, match="Unknown .* host key"):
        rc, _, _ = shell_for(server, keys, host_key=None, insecure_skip_host_key=True).run(["netfilter-persistent"])
    assert rc == 0


def test_wrong_client_key_is_an_auth_error(server, keys):
    with pytest.raises(AuthError, match="authentication"):
        shell_for(server, keys, private_key=pem(paramiko.ECDSAKey.generate())).run(["true"])


def test_unreachable_host_is_retryable(keys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    good_key = paramiko.ECDSAKey.generate()
    shell = ParamikoHostShell(
        "127.0.0.1",
        port=port,
        private_key=pem(keys["client"]),
        host_key=f"{good_key.get_name()} {good_key.get_base64()}",
    )
    with pytest.raises(RetryableError, match="cannot reach"):
        shell.run(["true"])


def test_from_config(keys):
    assert from_config({}, {}) is None
    shell = from_config(
        {"ssh": {"host": "10.0.0.1", "port": 2222, "user": "admin", "host_key": "ssh-ed25519 AAAA"}},
        {"ssh_private_key": "PEM"},
    )
    assert (shell.host, shell.port, shell.username) == ("10.0.0.1", 2222, "admin")
    with pytest.raises(PermanentError):
        from_config({"ssh": {"port": 22}}, {})


# ------------------------------------------------------------------ NAT


def test_nat_ensure_is_idempotent_and_remove_cleans_both_chains(host):
    nat = IptablesNat(host, save_command=["netfilter-persistent", "save"])
    port = PortSpec("tcp", 20022, 20022, 22, 22, listen_ip="203.0.113.5")
    assert nat.ensure(port, "10.0.0.5") is True
    assert nat.ensure(port, "10.0.0.5") is False
    assert host.rule_lines("nat", "PREROUTING") == [
        "-d 203.0.113.5/32 -p tcp -m tcp --dport 20022 -m comment --comment pm-tcp-20022 "
        "-j DNAT --to-destination 10.0.0.5:22"
    ]
    saves = [argv for argv, _ in host.calls if argv[0] == "netfilter-persistent"]
    assert len(saves) == 1  # only when something changed
    assert nat.remove(port.handle) is True
    assert nat.remove(port.handle) is False
    assert host.rules["nat"]["PREROUTING"] == [] and host.rules["filter"]["FORWARD"] == []


def test_nat_ignores_rules_that_are_not_ours(host):
    host.rules["nat"]["PREROUTING"].append("-p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.9:80".split())
    nat = IptablesNat(host, forward_accept=False)
    nat.ensure(PortSpec("tcp", 20022, 20022, 22, 22), "10.0.0.5")
    nat.remove_for_addresses(["10.0.0.5", "10.0.0.9"])
    assert host.rule_lines("nat", "PREROUTING") == ["-p tcp -m tcp --dport 80 -j DNAT --to-destination 10.0.0.9:80"]


def test_nat_failures_are_classified(host):
    nat = IptablesNat(host)
    host.fail_next.append((4, "Another app is currently holding the xtables lock. Perhaps you want to use -w?"))
    with pytest.raises(RetryableError):
        nat.ensure(PortSpec("tcp", 1, 1, 1, 1), "10.0.0.5")
    host.fail_next.append((1, "iptables: No chain/target/match by that name."))
    with pytest.raises(PermanentError):
        nat.ensure(PortSpec("tcp", 1, 1, 1, 1), "10.0.0.5")


def test_nat_over_real_ssh(server, keys, host):
    nat = IptablesNat(shell_for(server, keys))
    nat.ensure(PortSpec("udp", 30000, 30004, 30000, 30004), "10.0.0.8")
    assert host.rule_lines("nat", "PREROUTING") == [
        "-p udp -m udp --dport 30000:30004 -m comment --comment pm-udp-30000-30004 "
        "-j DNAT --to-destination 10.0.0.8:30000-30004"
    ]
