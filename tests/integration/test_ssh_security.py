"""RemoteHost never talks to a host whose key it cannot verify (real sshd of the lab, no mocks)."""

from __future__ import annotations

import json
import os

import pytest

from barman_dr.exceptions import HostKeyError, RemoteCommandError, SshConnectError
from barman_dr.hooks.remote import RemoteHost

pytestmark = pytest.mark.integration


def barman_conn() -> dict:
    return json.loads(os.environ["AIRFLOW_CONN_BARMAN_HOST"])


def other_host_key() -> str:
    """A real ed25519 host key of another lab host: the barman host "rebuilt" with a different key."""
    key = json.loads(os.environ["AIRFLOW_CONN_PG_PRIMARY_SSH"])["extra"]["host_key"]
    assert key != barman_conn()["extra"]["host_key"]
    return key


def conn_copy(monkeypatch, conn_id: str, **extra) -> str:
    conn = barman_conn()
    for k, v in extra.items():
        if v is None:
            conn["extra"].pop(k, None)
        else:
            conn["extra"][k] = v
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    return conn_id


def test_the_real_connection_works():
    host = RemoteHost("barman_host")
    try:
        r = host.run(["id", "-un"])
        assert r.stdout.strip() == "barman" and r.exit_code == 0
        # exit codes come back as they are
        assert host.run(["sh", "-c", "exit 7"], check=False).exit_code == 7
        with pytest.raises(RemoteCommandError) as ei:
            host.run(["sh", "-c", "echo oops >&2; exit 5"])
        assert ei.value.exit_code == 5 and "oops" in ei.value.stderr
    finally:
        host.close()


def test_argv_is_not_shell_syntax():
    host = RemoteHost("barman_host")
    try:
        hostile = "$(touch /tmp/barman-dr-pwned); `id`; echo INJECTED | cat > /tmp/x"
        assert host.run(["printf", "%s", hostile]).stdout == hostile
    finally:
        host.close()


def test_changed_host_key_is_refused(monkeypatch):
    conn_id = conn_copy(monkeypatch, "barman_host_changed_key", host_key=other_host_key())
    host = RemoteHost(conn_id)
    with pytest.raises(HostKeyError) as ei:
        host.run(["id", "-un"])
    msg = str(ei.value)
    assert "CHANGED" in msg and conn_id in msg
    assert host.connects <= 1


def test_changed_host_key_message_tells_the_keys_apart(monkeypatch):
    conn_id = conn_copy(monkeypatch, "barman_host_changed_key2", host_key=other_host_key())
    with pytest.raises(HostKeyError) as ei:
        RemoteHost(conn_id).run(["true"])
    got = str(ei.value).split("got ", 1)[1].split(",", 1)[0]
    expected = str(ei.value).split("expected ", 1)[1].split(". ", 1)[0]
    assert got.split()[-1] != expected


def test_unknown_host_key_is_refused(monkeypatch, tmp_path):
    # no host_key extra and an empty known_hosts: the key cannot be verified
    monkeypatch.setenv("HOME", str(tmp_path))
    conn_id = conn_copy(monkeypatch, "barman_host_no_key", host_key=None)
    with pytest.raises(HostKeyError, match="unknown"):
        RemoteHost(conn_id).run(["true"])


@pytest.mark.parametrize("flag", [True, "true", "True"])
def test_no_host_key_check_is_refused(monkeypatch, flag):
    conn_id = conn_copy(monkeypatch, "barman_host_nocheck", host_key=None, no_host_key_check=flag)
    with pytest.raises(HostKeyError, match="no_host_key_check"):
        RemoteHost(conn_id).run(["true"])


def test_no_host_key_check_with_a_host_key_is_refused(monkeypatch):
    # the SSH provider itself refuses this combination
    conn_id = conn_copy(monkeypatch, "barman_host_nocheck_key", no_host_key_check=True)
    with pytest.raises((HostKeyError, ValueError)):
        RemoteHost(conn_id).run(["true"])


def test_wrong_client_key_is_an_ssh_error(monkeypatch, tmp_path):
    import paramiko

    key = tmp_path / "stranger_rsa"
    paramiko.RSAKey.generate(2048).write_private_key_file(str(key))
    conn_id = conn_copy(monkeypatch, "barman_host_stranger", key_file=str(key))
    with pytest.raises(SshConnectError):
        RemoteHost(conn_id).run(["true"])


def test_password_login_is_not_possible(monkeypatch):
    conn = barman_conn()
    conn["extra"].pop("key_file")
    conn["extra"]["look_for_keys"] = False
    conn["password"] = "not-the-password"
    monkeypatch.setenv("AIRFLOW_CONN_BARMAN_HOST_PASSWORD", json.dumps(conn))
    with pytest.raises(SshConnectError):
        RemoteHost("barman_host_password").run(["true"])


def test_unreachable_host(monkeypatch):
    conn = barman_conn()
    conn["port"] = 9  # nothing listens there
    conn["extra"]["conn_timeout"] = 3
    monkeypatch.setenv("AIRFLOW_CONN_BARMAN_HOST_DOWN", json.dumps(conn))
    with pytest.raises((SshConnectError, HostKeyError)) as ei:
        RemoteHost("barman_host_down").run(["true"])
    assert ei.type is SshConnectError
