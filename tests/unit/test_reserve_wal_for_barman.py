"""verify_target reserves Barman's slot on the promoted server: the new timeline's first WAL is kept for Barman."""

from __future__ import annotations

from barman_dr.exceptions import RemoteCommandError
from barman_dr.operators.pitr.verify import reserve_wal_for_barman

STREAMING = {"slot_name": "barman", "streaming_archiver": True, "create_slot": "auto"}


def psql_error(msg: str) -> RemoteCommandError:
    return RemoteCommandError("pg-primary", ["psql"], 1, f"ERROR:  {msg}")


class FakeDb:
    """pg_replication_slots of one server: slot -> [restart_lsn or None, active]."""

    def __init__(self, slots: dict | None = None, *, fail_create: bool = False, cron_races: bool = False,
                 active_until: int = 0):
        self.slots = {k: list(v) for k, v in (slots or {}).items()}
        self.fail_create = fail_create
        self.cron_races = cron_races  # `barman cron` creates it (without WAL) just before our create
        self.active_until = active_until  # receive-wal attached: restart_lsn set after this many looks
        self.looks = 0
        self.sql: list[str] = []

    def psql(self, inst, sql: str) -> str:
        self.sql.append(sql)
        if sql.startswith("SELECT coalesce(restart_lsn::text"):
            self.looks += 1
            row = self.slots.get("barman")
            if row and row[1] and self.looks > self.active_until:
                row[0] = "1/3F000000"  # pg_receivewal's first flush
            assert "CASE WHEN active THEN ' active' ELSE ' idle' END" in sql  # never `text || boolean` ('true')
            return "" if row is None else f"{row[0] or '-'} {'active' if row[1] else 'idle'}"
        if sql.startswith("SELECT pg_drop_replication_slot"):
            if self.slots["barman"][1]:
                raise psql_error('replication slot "barman" is active for PID 4242')
            del self.slots["barman"]
            return ""
        if sql.startswith("SELECT pg_create_physical_replication_slot"):
            if self.cron_races:
                self.cron_races = False
                self.slots["barman"] = [None, False]
                raise psql_error('replication slot "barman" already exists')
            if self.fail_create:
                raise psql_error("all replication slots are in use")
            assert "barman" not in self.slots
            self.slots["barman"] = ["1/3E000028", False]  # immediately_reserve: the last checkpoint's redo
            return ""
        raise AssertionError(sql)


def reserve(db: FakeDb, show: dict = STREAMING) -> dict:
    return reserve_wal_for_barman(show, db, inst=None, pause_s=0)


def test_the_slot_is_created_reserving_wal():
    db = FakeDb()
    assert reserve(db) == {"slot": "barman", "reserved": True, "created": True, "restart_lsn": "1/3E000028"}
    assert any("pg_create_physical_replication_slot('barman', true)" in s for s in db.sql)  # immediately_reserve


def test_a_slot_already_holding_wal_is_left_as_it_is():
    db = FakeDb({"barman": ["1/3F000000", True]})
    assert reserve(db) == {"slot": "barman", "reserved": True, "created": False, "restart_lsn": "1/3F000000"}
    assert not any("pg_create" in s or "pg_drop" in s for s in db.sql)


def test_an_idle_slot_barman_created_without_wal_is_created_again_reserving():
    """`barman cron` creates the slot with CREATE_REPLICATION_SLOT ... PHYSICAL: restart_lsn NULL, nothing kept."""
    db = FakeDb({"barman": [None, False]})
    out = reserve(db)
    assert out["reserved"] is True and out["created"] is True and out["restart_lsn"] == "1/3E000028"
    assert any(s.startswith("SELECT pg_drop_replication_slot('barman')") for s in db.sql)


def test_a_slot_receive_wal_is_attaching_to_is_waited_for_not_dropped():
    db = FakeDb({"barman": [None, True]}, active_until=1)
    assert reserve(db) == {"slot": "barman", "reserved": True, "created": False, "restart_lsn": "1/3F000000"}
    assert not any("pg_drop" in s for s in db.sql)


def test_barman_creating_it_in_between_is_handled_on_the_next_look():
    out = reserve(FakeDb(cron_races=True))
    assert out["reserved"] is True and out["created"] is True


def test_a_failure_is_reported_never_raised():
    out = reserve(FakeDb(fail_create=True))
    assert out["reserved"] is False and "all replication slots are in use" in out["error"]


def test_nothing_without_a_streaming_slot_and_never_a_hostile_name():
    db = FakeDb()
    assert reserve(db, {"streaming_archiver": False, "slot_name": "barman"})["slot"] is None
    assert reserve(db, {"streaming_archiver": True, "slot_name": None})["slot"] is None
    assert reserve(db, {"streaming_archiver": True, "slot_name": "x'); DROP TABLE t; --"})["reserved"] is False
    assert db.sql == []


def failure_summary(monkeypatch, xcoms: dict) -> dict:
    from types import SimpleNamespace

    from barman_dr.operators.pitr import report
    from barman_dr.operators.pitr.report import PitrFailureSummaryOperator

    op = PitrFailureSummaryOperator(task_id="failure_summary")
    monkeypatch.setattr(report, "set_run_note", lambda *a, **k: None)
    monkeypatch.setattr(op, "run_failures", lambda ctx: [{"task": "validate_data", "error": "counts differ"}])
    monkeypatch.setattr(op, "upstream", lambda ctx, task: xcoms.get(task))
    ti = SimpleNamespace(xcom_pull=lambda **k: None)
    return op.run({"ti": ti, "run_id": "r1", "dag": SimpleNamespace(dag_id="dr_pitr")})


def test_a_run_failing_after_the_slot_was_created_says_where_it_holds_wal(monkeypatch):
    held = {"slot": "barman", "reserved": True, "created": True, "instance": "pg-primary"}
    out = failure_summary(monkeypatch, {"verify_target": {"barman_wal": held},
                                        "move_aside": {"moved_to": "/pg/data.pre-x"}})
    assert "replication slot barman holds WAL on the recovered server (pg-primary)" in out["next_action"]
    assert "pg_drop_replication_slot('barman')" in out["next_action"]
    # a retried verify_target found its earlier try's slot (created False): it holds WAL all the same
    retried = failure_summary(monkeypatch, {"verify_target": {"barman_wal": {**held, "created": False}}})
    assert "replication slot barman holds WAL" in retried["next_action"]
    # Barman streams from it once rebase_barman has run, and a slot holding nothing is no concern
    done = failure_summary(monkeypatch, {"verify_target": {"barman_wal": held}, "rebase_barman": {"streaming": True}})
    assert "replication slot" not in done["next_action"]
    empty = failure_summary(monkeypatch, {"verify_target": {"barman_wal": {**held, "reserved": False}}})
    assert "replication slot" not in empty["next_action"]


def test_a_create_that_succeeds_on_the_last_attempt_is_seen():
    class LateDb(FakeDb):
        fails = 2

        def psql(self, inst, sql: str) -> str:
            if sql.startswith("SELECT pg_create_physical_replication_slot") and self.fails:
                self.fails -= 1
                self.sql.append(sql)
                raise psql_error("could not create: out of shared memory")
            return super().psql(inst, sql)

    out = reserve(LateDb())
    assert out["reserved"] is True and out["created"] is True and out["restart_lsn"] == "1/3E000028"
