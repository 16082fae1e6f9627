"""Barman follows the new primary after `restore_to: <standby>`: conninfo re-pointing (issue 17, part 1)."""

from __future__ import annotations

import json

import pytest

from barman_dr.exceptions import BarmanDrError, BarmanOutputError
from barman_dr.hooks.barman import BarmanHook, conninfo_points_at, repointed_conninfo

LAB = "host=127.0.10.11 port=5432 user=barman dbname=postgres passfile=/lab/secrets/pgpass-barman"


def test_only_host_and_port_change():
    new = repointed_conninfo(LAB, "127.0.10.12", 5433)
    assert conninfo_points_at(new, "127.0.10.12", 5433)
    from psycopg2.extensions import parse_dsn

    assert parse_dsn(new) == {"host": "127.0.10.12", "port": "5433", "user": "barman", "dbname": "postgres",
                              "passfile": "/lab/secrets/pgpass-barman"}


def test_hostaddr_is_dropped_and_a_missing_port_is_added():
    new = repointed_conninfo("hostaddr=10.0.0.1 host=old user=streaming_barman", "db2.example", 5432)
    from psycopg2.extensions import parse_dsn

    assert parse_dsn(new) == {"host": "db2.example", "port": "5432", "user": "streaming_barman"}


def test_quoted_values_survive():
    new = repointed_conninfo("host=a user=barman application_name='barman dr' passfile='/p q/pgpass'", "b", 5432)
    from psycopg2.extensions import parse_dsn

    assert parse_dsn(new)["application_name"] == "barman dr" and parse_dsn(new)["passfile"] == "/p q/pgpass"


@pytest.mark.parametrize("conninfo", ["host=a user=barman password=*REDACTED*", "host=a password=s3cret user=b"])
def test_a_password_in_the_conninfo_is_never_copied_and_the_fix_is_named(conninfo):
    with pytest.raises(BarmanOutputError, match="passfile") as exc:
        repointed_conninfo(conninfo, "b", 5432)
    assert "s3cret" not in str(exc.value)


def test_points_at_defaults_the_port():
    assert conninfo_points_at("host=a user=x", "a", 5432)
    assert not conninfo_points_at("host=a port=5433", "a", 5432)
    assert not conninfo_points_at(None, "a", 5432)


class FakeBarman(BarmanHook):
    """show-server and config-update against an in-memory server section."""

    def __init__(self, conninfo: dict[str, str], apply: bool = True) -> None:
        super().__init__(ssh_conn_id="x")
        self.section = dict(conninfo)
        self.apply = apply
        self.calls: list[tuple[str, ...]] = []

    def show_server(self, server: str) -> dict:
        return dict(self.section)

    def run(self, *args: str, timeout: float | None = None, json_output: bool = True):
        self.calls.append(args)
        assert args[0] == "config-update" and json_output is False
        (change,) = json.loads(args[1])
        assert change.pop("scope") == "server" and change.pop("server_name") == "pg-primary"
        if self.apply:
            self.section.update(change)


def test_the_wal_conninfos_follow_too_when_set():
    hook = FakeBarman({"conninfo": LAB, "streaming_conninfo": LAB, "wal_streaming_conninfo": LAB,
                       "wal_conninfo": None})
    out = hook.point_at("pg-primary", "127.0.10.12", 5432)
    assert out["changed"] == ["conninfo", "streaming_conninfo", "wal_streaming_conninfo"]
    assert conninfo_points_at(hook.section["wal_streaming_conninfo"], "127.0.10.12", 5432)


def test_point_at_updates_both_and_is_idempotent():
    hook = FakeBarman({"conninfo": LAB, "streaming_conninfo": LAB.replace("user=barman", "user=streaming_barman")})
    out = hook.point_at("pg-primary", "127.0.10.12", 5432)
    assert out["changed"] == ["conninfo", "streaming_conninfo"]
    assert out["previous"]["conninfo"] == "127.0.10.11:5432"
    assert len(hook.calls) == 1 and hook.calls[0][0] == "config-update"  # one argv element holds the JSON
    assert "user=streaming_barman" in hook.section["streaming_conninfo"]
    again = hook.point_at("pg-primary", "127.0.10.12", 5432)
    assert again["changed"] == [] and len(hook.calls) == 1


def test_a_change_barman_did_not_apply_raises():
    """config-update logs and exits 0 when it cannot apply a change: the read-back catches it."""
    hook = FakeBarman({"conninfo": LAB, "streaming_conninfo": LAB}, apply=False)
    with pytest.raises(BarmanDrError, match="exited 0 but left conninfo, streaming_conninfo"):
        hook.point_at("pg-primary", "127.0.10.12", 5432)
