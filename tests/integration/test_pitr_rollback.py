"""A PITR that fails after the freeze leaves the app frozen and the old data kept; dr_pitr_rollback undoes it.

Fault 3 of issue 7, for real: a broken setting lands in the restored configuration (as a
bad `postgresql.auto.conf` or a config-management push would), so PostgreSQL refuses to
start after the data directory was already moved aside and the restore succeeded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.pitr_support import audit, counts, one, pgbouncer_paused, primary_timeline, run_dag, sql

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def failed_pitr():
    sql("LAB_PRIMARY_DSN", "INSERT INTO critical_orders (order_id, customer_id, amount, status) "
                           "VALUES (9000001, 1, 1.00, 'pending') ON CONFLICT DO NOTHING")
    before = counts()
    tli = primary_timeline()
    target = one("LAB_PRIMARY_DSN", "SELECT now()").isoformat()
    sql("LAB_PRIMARY_DSN", "SELECT pg_current_xact_id()")  # a commit after the target

    def break_config(context) -> None:
        data = Path(os.environ["LAB_DIR"], "pg", "pg-primary", "data", "postgresql.auto.conf")
        with data.open("a") as f:
            f.write("shared_buffers = 'lots'  # fault 3: a broken setting in the restored config\n")

    state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", "target_time": target,
                                               "incident_id": "INC-RB-1", "confirm": "PITR pg-primary"},
                                   before={"start_recovery": break_config})
    return {"state": state, "run_id": run_id, "tasks": tasks, "before": before, "tli": tli}


def test_pitr_fails_at_start_and_keeps_the_app_frozen(failed_pitr):
    assert failed_pitr["state"] == "failed"
    tasks = failed_pitr["tasks"]
    assert tasks["stage_restore"] == "success"  # staged (the default): the copy ran before the freeze
    assert tasks["barman_restore"] == "success"  # the rename of the staged copy
    assert tasks["start_recovery"] == "failed"
    assert tasks["unfreeze_app"] == "upstream_failed"
    assert pgbouncer_paused()  # safe: the app never saw the half-recovered server


def test_failure_is_audited_with_the_log_tail_and_the_old_directory(failed_pitr):
    events = audit(failed_pitr["run_id"])
    failed = [e for e in events if e["action"] == "start_recovery" and e["outcome"] == "failed"]
    assert failed and "invalid value for parameter" in failed[0]["details"] and "shared_buffers" in failed[0]["details"]
    moved = [json.loads(e["details"])["moved_to"] for e in events if e["action"] == "move_aside" and e["outcome"] == "ok"]
    assert moved and Path(moved[0], "PG_VERSION").exists()
    summary = [e for e in events if e["action"] == "failure_summary" and e["outcome"] == "ok"]
    assert summary and "dr_pitr_rollback" in summary[0]["details"]
    # the staging copy replayed to the target and promoted before the freeze, which ran Barman's
    # recovery_end_command: its WAL staging directory is gone, nothing is left to report
    assert json.loads(summary[0]["details"])["staging_leftover"] == []
    stage = [json.loads(e["details"]) for e in events if e["action"] == "stage_restore" and e["outcome"] == "ok"]
    assert stage and stage[0]["replay"]["log_file"].endswith("-run/postgresql.log")


def test_rollback_puts_the_old_data_back_and_resumes_the_app(failed_pitr):
    state, run_id, tasks = run_dag("dr_pitr_rollback", {"server": "pg-primary", "pitr_run_id": failed_pitr["run_id"],
                                                        "confirm": "ROLLBACK pg-primary"})
    assert state == "success", tasks
    assert counts() == failed_pitr["before"]
    assert primary_timeline() == failed_pitr["tli"]
    assert not pgbouncer_paused()
    assert one("LAB_APP_DSN", "SELECT count(*) FROM critical_orders WHERE order_id = 9000001") == 1
    rb = [e for e in audit(run_id) if e["action"] == "rollback" and e["outcome"] == "ok"]
    assert rb and ".failed-" in rb[0]["details"]  # the failed restore was set aside too, not deleted
    assert json.loads(rb[0]["details"])["staging_leftover"] == []


def test_rollback_refuses_without_confirmation():
    state, run_id, _ = run_dag("dr_pitr_rollback", {"server": "pg-primary", "pitr_run_id": "x"})
    assert state == "failed"
    refused = [e for e in audit(run_id) if e["outcome"] == "refused"]
    assert refused and "confirm" in refused[0]["details"]
