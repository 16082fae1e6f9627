"""dr_pitr refuses before touching anything: plan-only, bad params, a WAL gap, a held lock."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.pitr_support import audit, counts, pgbouncer_paused, primary_timeline, run_dag, sql, stop_wal_stream

pytestmark = pytest.mark.integration

DESTRUCTIVE = {"stage_restore", "staging_directory", "freeze_app", "stop_postgres", "move_aside", "barman_restore",
               "start_recovery"}


def now_iso(delta: float = 0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=delta)).isoformat()


def assert_untouched(run_id: str, tli: int, before: dict[str, int]) -> list[dict]:
    events = audit(run_id)
    touched = {e["action"] for e in events if e["action"] in DESTRUCTIVE}
    assert not touched, touched
    assert primary_timeline() == tli
    assert counts() == before
    assert not pgbouncer_paused()
    return events


@pytest.fixture
def baseline():
    sql("LAB_PRIMARY_DSN", "SELECT pg_current_xact_id()")
    time.sleep(1.1)
    return primary_timeline(), counts()


def test_plan_only_without_confirm(baseline):
    tli, before = baseline
    state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", "target_time": now_iso(-1),
                                               "incident_id": "INC-PLAN-1"})
    assert state == "success"
    assert tasks["plan"] == "success" and tasks["approve"] == "skipped"
    assert tasks["stage_restore"] == "skipped" and tasks["freeze_app"] == "skipped"
    events = assert_untouched(run_id, tli, before)
    planned = [e for e in events if e["action"] == "plan" and e["outcome"] == "planned"]
    assert planned and '"steps"' in planned[0]["details"] and '"estimated_rto"' in planned[0]["details"]


@pytest.mark.parametrize(("conf", "field"), [
    ({"target_time": "2099-01-01T00:00:00+00:00"}, "target_time"),
    ({"target_time": "2026-11-25T10:00:00+00:00", "target_xid": "123"}, "target_time, target_xid"),
    ({}, "target"),
    ({"target_xid": "12; rm -rf /"}, "target_xid"),
    ({"target_lsn": "0/ZZ"}, "target_lsn"),
    ({"target_time": "2026-11-25T10:00:00+00:00", "confirm": "yes"}, "confirm"),
])
def test_bad_params_fail_in_the_first_task(baseline, conf, field):
    tli, before = baseline
    state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", **conf})
    assert state == "failed"
    assert tasks["validate_params"] == "failed" and tasks["preflight"] == "upstream_failed"
    events = assert_untouched(run_id, tli, before)
    refused = [e for e in events if e["action"] == "validate" and e["outcome"] == "refused"]
    assert refused and field in refused[0]["details"]


@pytest.mark.parametrize(("conf", "field"), [
    ({"target_time": "2000-01-01T00:00:00+00:00"}, "target_time"),  # before the oldest backup
    ({"target_time": "2026-11-25T10:00:00+00:00", "backup_id": "20000101T000000"}, "backup_id"),  # no such backup
])
def test_a_target_the_catalogue_cannot_serve_is_refused_first_thing_on_the_site(baseline, conf, field):
    """The catalogue half of validation opens resolve_target (the first step on the barman host's
    site: validate_params runs centrally and needs no barman host). Still before any side effect."""
    tli, before = baseline
    state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", **conf})
    assert state == "failed"
    assert tasks["validate_params"] == "success" and tasks["resolve_target"] == "failed"
    assert tasks["preflight"] == "upstream_failed"
    events = assert_untouched(run_id, tli, before)
    refused = [e for e in events if e["task_id"] == "resolve_target" and e["outcome"] == "refused"]
    assert refused and field in refused[0]["details"], events


@pytest.mark.parametrize(("conf", "field"), [
    ({"target_time": "2026-11-25T10:00:00"}, "target_time"),       # no timezone: never guessed
    ({"target_time": "now-ish"}, "target_time"),
    ({"target_time": "2026-11-25T10:00:00+00:00", "jobs": 99}, "jobs"),
])
def test_the_form_schema_rejects_before_a_run_exists(baseline, conf, field):
    """Airflow validates the params' JSON schema at trigger time (the REST API answers 400)."""
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError) as exc:
        run_dag("dr_pitr", {"server": "pg-primary", **conf})
    assert field in str(exc.value)


def test_unknown_server_is_rejected(baseline):
    """The form's enum stops it; a crafted API call reaches the validator, which names the field."""
    with pytest.raises(Exception) as exc:  # the schema enum error, whatever its class
        run_dag("dr_pitr", {"server": "pg-primary;reboot", "target_time": now_iso(-1)})
    assert "server" in str(exc.value)


def test_wal_gap_is_refused_before_anything_stops(baseline):
    """WAL streaming stopped before the incident: the preflight names the missing WAL; nothing stopped."""
    tli, before = baseline
    lab = Path(os.environ["LAB_DIR"])
    pause = lab / "run" / "barman-cron.paused"
    barman = os.environ["LAB_BARMAN"].split()
    try:
        stop_wal_stream("pg-primary")
        for _ in range(3):  # WAL the archive will not see: a gap before the target
            sql("LAB_PRIMARY_DSN", "SELECT pg_switch_wal() FROM (SELECT pg_current_xact_id()) x")
        target = now_iso(-0.5)
        state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", "target_time": target,
                                                   "confirm": "PITR pg-primary", "incident_id": "INC-GAP-1"})
        assert state == "failed"
        # resolving the target already reads the archive: the gap is named there (or, for a target the
        # archive does hold, by the coverage proof), before anything is stopped
        step = "resolve_target" if tasks["resolve_target"] == "failed" else "wal_coverage"
        assert tasks[step] == "failed" and tasks["freeze_app"] == "upstream_failed", tasks
        events = assert_untouched(run_id, tli, before)
        refused = [e for e in events if e["action"] == step and e["outcome"] == "refused"]
        assert refused and "WAL missing" in refused[0]["details"], events
    finally:
        pause.unlink(missing_ok=True)
        subprocess.run([*barman, "cron"], check=False, capture_output=True)
        subprocess.run([*barman, "switch-wal", "--force", "--archive", "--archive-timeout", "60", "pg-primary"],
                       check=False, capture_output=True)


def test_second_pitr_of_a_locked_server_is_refused(baseline):
    from barman_dr.safety.locks import ServerLock

    tli, before = baseline
    lock = ServerLock()
    lock.acquire("pg-primary", dag_id="dr_pitr", run_id="someone-else", purpose="pitr")
    try:
        state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", "target_time": now_iso(-1),
                                                   "confirm": "PITR pg-primary"})
        assert state == "failed" and tasks["validate_params"] == "failed"
        events = assert_untouched(run_id, tli, before)
        assert any("locked by dr_pitr run 'someone-else'" in e["details"] for e in events if e["outcome"] == "refused")
    finally:
        lock.release("pg-primary", dag_id="dr_pitr", run_id="someone-else")


def test_audit_database_down_refuses_the_pitr(baseline, monkeypatch):
    """No unaudited DR run: with the audit DB unreachable the first task refuses, nothing is touched."""
    import json as _json

    tli, before = baseline
    conn = _json.loads(os.environ["AIRFLOW_CONN_DR_AUDIT"])
    conn["port"] = 1  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_DR_AUDIT", _json.dumps(conn))
    state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", "target_time": now_iso(-1),
                                               "confirm": "PITR pg-primary", "incident_id": "INC-AUDIT-DOWN"})
    monkeypatch.undo()
    assert state == "failed"
    assert tasks["validate_params"] == "failed" and tasks["preflight"] == "upstream_failed"
    assert primary_timeline() == tli and counts() == before and not pgbouncer_paused()
    assert audit(run_id) == []  # it could not write, so it did nothing
