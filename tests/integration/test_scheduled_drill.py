"""dr_monthly_restore_drill against the real lab: pg-nonprod restored, validated, stopped; the lock released."""

from __future__ import annotations

import os
import shlex
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from pitr_support import counts, run_dag, sql
from scheduled_support import temp_inventory, xcom_for

pytestmark = pytest.mark.integration

DAG_ID = "dr_monthly_restore_drill"


def test_drill_restores_validates_and_stops_nonprod(inventory):
    from barman_dr.fleet import pool_of

    srv = inventory.server("pg-primary")
    nonprod = srv.nonprod
    # a fresh backup: the drill's random target lies after it, and the lab is idle from here on,
    # so the restored copy must hold exactly the primary's counts (whatever earlier suites wrote)
    subprocess.run([*shlex.split(os.environ["LAB_BARMAN"]), "backup", "--wait", "pg-primary"], check=True,
                   capture_output=True, timeout=600)
    primary_counts = counts()
    state, run_id, states = run_dag(DAG_ID, {})
    pool = pool_of("pg-primary")
    res = xcom_for(DAG_ID, run_id, f"drill__{pool}", "pg-primary")
    assert state == "success", states
    assert res["instance"] == "pg-nonprod"
    assert res["counts"] == primary_counts
    # default target: a random instant after the backup's end and before the drill started (WAL replay)
    assert res["target"]["kind"] == "time" and res["target_choice"]["mode"] == "random"
    chosen = datetime.fromisoformat(res["target"]["value"])
    assert datetime.fromisoformat(res["backup_end"]) <= chosen <= datetime.fromisoformat(res["target_choice"]["window_to"])
    assert res["counts_comparison"] == "unknown" and res["expected_counts"] is None
    assert res["amcheck"]["ok"] is True and res["amcheck"]["checked"]
    assert "critical_orders_pkey" in {c["index"] for c in res["amcheck"]["checked"]}
    # the second server has no nonprod target: reported, not drilled
    res2 = xcom_for(DAG_ID, run_id, f"drill__{pool_of('pg-primary2')}", "pg-primary2")
    assert res2["status"] == "SKIPPED" and res2["skipped"] == "no nonprod target"
    assert res["archive_mode"] == "off"
    assert res["rto_met"] is True and res["rto_s"] > 0
    assert set(res["phases_s"]) >= {"restore_s", "recovery_s", "start_to_promoted_s"}
    assert res["recovery_settings_cleared"]
    # teardown stopped the nonprod instance and kept its directory
    assert states[f"teardown__{pool}[0]"] == "success"
    assert os.path.isdir(nonprod.data_directory)
    r = subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "status", "-D",
                        nonprod.data_directory], capture_output=True, text=True, check=False)
    assert r.returncode == 3, r.stdout  # 3: not running
    assert sql("LAB_AUDIT_DSN", "SELECT count(*) FROM control.server_locks WHERE server = 'pg-primary'")[0][0] == 0
    drill = sql("LAB_AUDIT_DSN", "SELECT outcome FROM audit.events WHERE run_id = %s AND action = 'drill' "
                                 "AND server = 'pg-primary' ORDER BY event_id", (run_id,))
    assert [o for (o,) in drill] == ["started", "ok"]


def test_second_drill_moves_the_previous_copy_aside(inventory):
    """target immediate: the counts the weekly backup recorded (when it took this backup) are the expectation."""
    nonprod = inventory.server("pg-primary").nonprod
    state, run_id, states = run_dag(DAG_ID, {"target": "immediate"})
    assert state == "success", states
    from barman_dr.fleet import pool_of

    res = xcom_for(DAG_ID, run_id, f"drill__{pool_of('pg-primary')}", "pg-primary")
    assert res["moved_aside"] and res["moved_aside"][0].startswith(nonprod.data_directory + ".pre-")
    assert os.path.isdir(res["moved_aside"][0])
    assert res["target"]["kind"] == "immediate"
    if res["expected_counts"] is not None:  # the newest backup was taken by dr_weekly_full_backup
        assert res["counts_comparison"] == "match"
    else:
        assert res["counts_comparison"] == "unknown"


def _nonprod_stopped(nonprod) -> bool:
    r = subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "status", "-D",
                        nonprod.data_directory], capture_output=True, text=True, check=False)
    return r.returncode == 3


def test_drill_with_failing_validation_query_fails_and_tears_down(inventory, tmp_path, monkeypatch):
    def edit(doc: dict) -> None:
        doc["servers"]["pg-primary"]["validation_queries"]["broken"] = "SELECT count(*) FROM no_such_table"

    temp_inventory(tmp_path, monkeypatch, edit)
    nonprod = inventory.server("pg-primary").nonprod
    state, run_id, states = run_dag(DAG_ID, {"target": "immediate"})
    from barman_dr.fleet import pool_of

    pool = pool_of("pg-primary")
    assert state == "failed", states
    assert states[f"drill__{pool}[0]"] == "failed"
    assert states[f"teardown__{pool}[0]"] == "success" and states[f"teardown__{pool_of('pg-primary2')}[0]"] == "success"
    assert _nonprod_stopped(nonprod)
    assert sql("LAB_AUDIT_DSN", "SELECT count(*) FROM control.server_locks WHERE server = 'pg-primary'")[0][0] == 0
    failed = sql("LAB_AUDIT_DSN", "SELECT details::text FROM audit.events WHERE run_id = %s AND action = 'drill' "
                                  "AND outcome = 'failed'", (run_id,))
    assert len(failed) == 1 and "broken" in failed[0][0] and "no_such_table" in failed[0][0]  # one try: no retry
    notified = sql("LAB_AUDIT_DSN", "SELECT count(*) FROM audit.events WHERE run_id = %s AND action = 'notify'",
                   (run_id,))
    assert notified[0][0] >= 1
    teardown = xcom_for(DAG_ID, run_id, f"teardown__{pool}", "pg-primary")
    assert teardown["instance"] == "pg-nonprod" and teardown["lock_released"] is True
    assert Path(nonprod.data_directory).is_dir()


def test_drill_over_rto_objective_fails_and_notifies(inventory, tmp_path, monkeypatch):
    def edit(doc: dict) -> None:
        doc["servers"]["pg-primary"]["rto_objective_seconds"] = 0

    temp_inventory(tmp_path, monkeypatch, edit)
    state, run_id, states = run_dag(DAG_ID, {"target": "immediate"})
    from barman_dr.fleet import pool_of

    pool = pool_of("pg-primary")
    assert state == "failed", states
    assert states[f"teardown__{pool}[0]"] == "success"
    result = sql("LAB_AUDIT_DSN", "SELECT outcome, details->>'rto_met' FROM audit.events WHERE run_id = %s "
                                  "AND action = 'drill_result'", (run_id,))
    assert result == [("failed", "false")]
    failed = sql("LAB_AUDIT_DSN", "SELECT details::text FROM audit.events WHERE run_id = %s AND action = 'drill' "
                                  "AND outcome = 'failed'", (run_id,))
    assert len(failed) == 1 and "exceeds the objective" in failed[0][0]
    assert sql("LAB_AUDIT_DSN", "SELECT count(*) FROM audit.events WHERE run_id = %s AND action = 'notify'",
               (run_id,))[0][0] >= 1
    assert _nonprod_stopped(inventory.server("pg-primary").nonprod)
