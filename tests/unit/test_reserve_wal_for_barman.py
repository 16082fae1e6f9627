"""verify_target reserves Barman's slot on the promoted server: the new timeline's first WAL is kept for Barman."""

from __future__ import annotations

from barman_dr.exceptions import RemoteCommandError
from barman_dr.operators.pitr.verify import reserve_wal_for_barman

STREAMING = {"slot_name": "barman", "streaming_archiver": True, "create_slot": "auto"}


class FakeDb:
    def __init__(self, slots: set[str] | None = None, fail_create: bool = False, create_meanwhile: bool = False):
        self.slots = set(slots or ())
        self.fail_create = fail_create
        self.create_meanwhile = create_meanwhile
        self.sql: list[str] = []

    def psql(self, inst, sql: str) -> str:
        self.sql.append(sql)
        if sql.startswith("SELECT count(*) FROM pg_replication_slots"):
            return "1" if any(f"'{s}'" in sql for s in self.slots) else "0"
        if sql.startswith("SELECT pg_create_physical_replication_slot"):
            if self.create_meanwhile:
                self.slots.add("barman")  # `barman cron` won the race
                raise RemoteCommandError("pg-primary", ["psql"], 1, 'ERROR:  replication slot "barman" already exists')
            if self.fail_create:
                raise RemoteCommandError("pg-primary", ["psql"], 1, "ERROR:  all replication slots are in use")
            self.slots.add("barman")
            return ""
        if sql.startswith("SELECT restart_lsn"):
            return "1/3F2CED00"
        raise AssertionError(sql)


def test_the_slot_is_created_reserving_wal_from_now():
    db = FakeDb()
    out = reserve_wal_for_barman(STREAMING, db, inst=None)
    assert out == {"slot": "barman", "reserved": True, "created": True, "restart_lsn": "1/3F2CED00"}
    assert "pg_create_physical_replication_slot('barman', true)" in db.sql[1]  # immediately_reserve


def test_an_existing_slot_is_left_as_it_is():
    db = FakeDb(slots={"barman"})
    assert reserve_wal_for_barman(STREAMING, db, inst=None) == {"slot": "barman", "reserved": True, "created": False}
    assert not any("pg_create" in s for s in db.sql)


def test_barman_creating_it_first_is_fine():
    out = reserve_wal_for_barman(STREAMING, FakeDb(create_meanwhile=True), inst=None)
    assert out == {"slot": "barman", "reserved": True, "created": False}


def test_a_failure_is_reported_never_raised():
    out = reserve_wal_for_barman(STREAMING, FakeDb(fail_create=True), inst=None)
    assert out["reserved"] is False and "all replication slots are in use" in out["error"]


def test_nothing_without_a_streaming_slot_and_never_a_hostile_name():
    db = FakeDb()
    assert reserve_wal_for_barman({"streaming_archiver": False, "slot_name": "barman"}, db, None)["slot"] is None
    assert reserve_wal_for_barman({"streaming_archiver": True, "slot_name": None}, db, None)["slot"] is None
    out = reserve_wal_for_barman({"streaming_archiver": True, "slot_name": "x'); DROP TABLE t; --"}, db, None)
    assert out["reserved"] is False
    assert db.sql == []
