"""dr_monthly_restore_drill against the real lab: pg-nonprod restored, validated, stopped; the lock released."""

from __future__ import annotations

import os
import subprocess

import pytest
from pitr_support import counts, run_dag, sql, xcom

pytestmark = pytest.mark.integration

DAG_ID = "dr_monthly_restore_drill"


def test_drill_restores_validates_and_stops_nonprod(inventory):
    from barman_dr.fleet import servers_by_pool

    srv = inventory.server("pg-primary")
    nonprod = srv.nonprod
    primary_counts = counts()  # the lab is idle: the newest backup has these counts too
    state, run_id, states = run_dag(DAG_ID, {})
    pool = sorted(servers_by_pool())[0]
    res = xcom(DAG_ID, run_id, f"drill__{pool}")
    assert state == "success", states
    assert res["instance"] == "pg-nonprod"
    assert res["counts"] == primary_counts
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
                                 "ORDER BY event_id", (run_id,))
    assert [o for (o,) in drill] == ["started", "ok"]


def test_second_drill_moves_the_previous_copy_aside(inventory):
    nonprod = inventory.server("pg-primary").nonprod
    state, run_id, states = run_dag(DAG_ID, {})
    assert state == "success", states
    from barman_dr.fleet import servers_by_pool

    res = xcom(DAG_ID, run_id, f"drill__{sorted(servers_by_pool())[0]}")
    assert res["moved_aside"] and res["moved_aside"][0].startswith(nonprod.data_directory + ".pre-")
    assert os.path.isdir(res["moved_aside"][0])
