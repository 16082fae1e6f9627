"""`dr_pitr` from the delayed standby (issue 17), whole runs through the REST API, as incident tooling triggers them.

* `source: delayed_standby`: the seed's DELETE undone by promoting pg-delayed at the stop
  point. No backup is copied: it replays forward what it has not applied yet (it was paused
  before the DELETE by resolve_target), is proven at the exact stop (LSN, xid, new
  timeline), its rows counted, all before the freeze; then the old primary is fenced, the app
  moves to it, pg-standby is rebuilt from it, the spare pg-delayed2 becomes the new delayed
  standby, and Barman follows it.
* `source: auto` with a target older than the delayed standby's position (it already applied
  the DELETE): the run falls back to staged Barman, and the plan says why.
* `source: auto` with the GOOD STATE as a time and no confirm: the approver answers through the
  HITL REST API at once, the time resolves to the DELETE's commit, the delayed standby serves.

`labctl failback` puts the lab back after each (pg-primary serving the recovered data).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import psycopg2
import pytest

from barman_dr.surfaces.api_client import incident_run_id
from include.lab import seed_scenario
from tests.pitr_support import barman_json, counts, pgbouncer_paused, primary_timeline, sql, wait_for_approval_request

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

EXPECTED = {"orders_total": 10500, "orders_completed": 7465}


def one(dsn_env: str, sql_text: str, args: tuple = ()) -> tuple:
    """One row (a statement without rows: ())."""
    rows = sql(dsn_env, sql_text, args)
    return rows[0] if rows else ()


def run_green(api, conf: dict, incident: str) -> str:
    """Trigger dr_pitr through REST as incident tooling does; the run must end green."""
    run_id = incident_run_id("dr_pitr", incident)
    api.trigger("dr_pitr", {**conf, "incident_id": incident, "confirm": "PITR pg-primary"}, run_id=run_id)
    final = api.wait("dr_pitr", run_id, timeout=900)
    states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
    assert final["state"] == "success", states
    return run_id


def test_the_seed_recovered_through_the_delayed_standby(api, inventory, lab_topology_restored):
    srv = inventory.server("pg-primary")
    delayed, spare = srv.standby("pg-delayed"), srv.standby("pg-delayed2")
    addr = inventory.db_host(delayed.host).address
    tli_before = primary_timeline()
    scenario = seed_scenario.play()
    run_id = run_green(api, {"server": "pg-primary", "target_xid": str(scenario.delete_xid),
                             "target_inclusive": False, "source": "delayed_standby",
                             "reason": "REST e2e: from the delayed standby", "expected": EXPECTED},
                       f"INC-DELAYED-{int(time.time())}")

    # the decision and the plan: the delayed standby, paused before the DELETE
    resolved = api.xcom("dr_pitr", run_id, "resolve_target")
    assert resolved["source"]["chosen"] == "delayed_standby" and resolved["source"]["standby"] == "pg-delayed"
    plan = api.xcom("dr_pitr", run_id, "plan")
    assert "SOURCE: delayed standby pg-delayed" in plan["text"]

    # promoted at the exact stop point before the freeze, no backup copied, counted there
    stage = api.xcom("dr_pitr", run_id, "stage_restore")
    assert stage["source"] == "delayed_standby" and stage["reached"] is True
    assert stage["counts"]["actual"] == EXPECTED
    assert api.xcom("dr_pitr", run_id, "barman_restore")["mode"] == "delayed_standby"
    assert api.xcom("dr_pitr", run_id, "move_aside")["moved_to"] is None
    verify = api.xcom("dr_pitr", run_id, "verify_target")
    assert verify["reached"] is True and verify["new_timeline"] == stage["new_timeline"] > tli_before
    report = api.xcom("dr_pitr", run_id, "report")
    assert report["source"] == "delayed_standby" and report["serving_instance"] == "pg-delayed"
    assert report["stop"]["kind"] == "commit" and report["stop"]["xid"] == scenario.delete_xid
    assert report["stop"]["when"] == "before"
    assert report["new_delayed_standbys"] == ["pg-delayed2"]
    audit = one("LAB_AUDIT_DSN", "SELECT count(*) FROM audit.events WHERE run_id = %s AND action = 'delayed_source' "
                                 "AND outcome = 'started' AND target = 'pg-delayed'", (run_id,))
    assert audit == (1,)

    # the app is on the recovered server, reads the recovered rows and writes
    assert not pgbouncer_paused()
    assert counts("LAB_APP_DSN") == EXPECTED == counts("LAB_DELAYED_DSN")
    with psycopg2.connect(os.environ["LAB_APP_DSN"]) as conn, conn.cursor() as cur:
        cur.execute("SELECT host(inet_server_addr()), inet_server_port(), pg_is_in_recovery()")
        assert cur.fetchone() == (addr, delayed.port, False)
        cur.execute("CREATE TABLE IF NOT EXISTS app_heartbeat (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())")
        cur.execute("INSERT INTO app_heartbeat DEFAULT VALUES RETURNING id")
        assert cur.fetchone()[0] > 0
    conn.close()
    # the former standby keeps none of its standby settings (pg_basebackup would copy them on)
    assert one("LAB_DELAYED_DSN", "SELECT current_setting('recovery_min_apply_delay'), "
                                  "current_setting('primary_conninfo')") == ("0", "")

    # the damaged primary: stopped, its data directory in place, recorded as fenced
    prim = srv.primary
    assert Path(prim.data_directory, "PG_VERSION").exists()
    status = subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "status", "-D",
                             prim.data_directory], capture_output=True, text=True, check=False)
    assert status.returncode == 3, status.stdout
    assert api.xcom("dr_pitr", run_id, "stop_postgres")["stopped"] == {"pg-primary": "stopped"}
    fenced = report["fenced_primary"]
    assert fenced["instance"] == "pg-primary" and fenced["data_directory"] == prim.data_directory
    assert fenced["stopped"] == "stopped" and fenced["old_end_lsn"]

    # a new delayed standby (the spare) streams from the recovered server and applies late; pg-standby follows too
    assert one("LAB_SPARE_DSN", "SELECT pg_is_in_recovery(), current_setting('recovery_min_apply_delay'), "
                                "(SELECT status FROM pg_stat_wal_receiver)") == (True, "3min", "streaming")
    clients = one("LAB_DELAYED_DSN", "SELECT string_agg(application_name, ',' ORDER BY application_name) "
                                     "FROM pg_stat_replication WHERE state = 'streaming'")[0]
    assert {"pg-delayed2", "pg-standby"} <= set(clients.split(","))

    # Barman streams from, and backed up, the new primary
    show = barman_json("show-server", "pg-primary")["pg-primary"]
    assert f"host={addr}" in show["conninfo"] and f"port={delayed.port}" in show["streaming_conninfo"]
    rebase = api.xcom("dr_pitr", run_id, "rebase_barman")
    assert rebase["new_backup_timeline"] == report["new_timeline"]
    assert spare.spare and spare.delayed


def test_a_target_older_than_the_window_falls_back_to_staged_barman(api, lab_topology_restored):
    """The delayed standby already applied the DELETE: `auto` restores from Barman (staged), and the plan says why."""
    scenario = seed_scenario.play()
    # let the delayed standby apply everything now: the DELETE is then older than its window
    lsn = one("LAB_PRIMARY_DSN", "SELECT pg_current_wal_lsn()::text")[0]
    one("LAB_DELAYED_DSN", "ALTER SYSTEM SET recovery_min_apply_delay = '0'")
    try:
        one("LAB_DELAYED_DSN", "SELECT pg_reload_conf()")
        deadline = time.monotonic() + 60
        while one("LAB_DELAYED_DSN", "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)) != (True,):
            assert time.monotonic() < deadline, "pg-delayed did not apply the DELETE"
            time.sleep(0.5)
        run_id = run_green(api, {"server": "pg-primary", "target_xid": str(scenario.delete_xid),
                                 "target_inclusive": False, "source": "auto",
                                 "reason": "REST e2e: older than the window", "expected": EXPECTED},
                           f"INC-FALLBACK-{int(time.time())}")
    finally:  # the rebuild wrote it back already on success; by hand otherwise
        one("LAB_DELAYED_DSN", "ALTER SYSTEM SET recovery_min_apply_delay = '180s'")
        one("LAB_DELAYED_DSN", "SELECT pg_reload_conf()")
    resolved = api.xcom("dr_pitr", run_id, "resolve_target")
    assert resolved["source"]["chosen"] == "barman" and resolved["source"]["requested"] == "auto"
    plan = api.xcom("dr_pitr", run_id, "plan")
    assert "falling back to Barman (staged restore)" in plan["text"]
    assert "already applied past the stop point" in plan["text"]
    stage = api.xcom("dr_pitr", run_id, "stage_restore")
    assert stage["staged"] is True
    report = api.xcom("dr_pitr", run_id, "report")
    assert report["source"] == "barman" and report["serving_instance"] is None and report["new_delayed_standbys"] == []
    assert counts("LAB_APP_DSN") == EXPECTED
    # the delayed standby was rebuilt on the new timeline, delayed again; the spare stays unbuilt
    assert one("LAB_DELAYED_DSN", "SELECT pg_is_in_recovery(), current_setting('recovery_min_apply_delay')") == \
        (True, "3min")
    assert not Path(os.environ["LAB_DIR"], "pg", "pg-delayed2", "data").exists()


def test_a_time_target_approved_through_the_hitl_api_goes_through_the_delayed_standby(api, lab_topology_restored):
    """Incident tooling's path: `source: auto`, the seed's GOOD STATE as a time, no confirm; the approver answers
    through the HITL REST API the moment the request appears (the fast answer Airflow 3.3.2 can lose: the step
    keeps it). The time is resolved to the DELETE's commit, and the delayed standby serves it."""
    from barman_dr.surfaces.api_client import AirflowApi

    scenario = seed_scenario.play()
    incident = f"INC-DELAYED-TIME-{int(time.time())}"
    run_id = incident_run_id("dr_pitr", incident)
    api.trigger("dr_pitr", {"server": "pg-primary", "target_time": scenario.good_state, "source": "auto",
                            "incident_id": incident, "reason": "REST e2e: time target, approved through HITL",
                            "expected": EXPECTED}, run_id=run_id)
    wait_for_approval_request(api, "dr_pitr", run_id)
    approver = AirflowApi(os.environ["LAB_AIRFLOW_URL"], "approver", os.environ["LAB_APPROVER_PASSWORD"])
    approver.respond("dr_pitr", run_id, "approve", "Approve")
    final = api.wait("dr_pitr", run_id, timeout=900)
    states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
    assert final["state"] == "success", states
    resolved = api.xcom("dr_pitr", run_id, "resolve_target")
    assert resolved["source"]["chosen"] == "delayed_standby"
    report = api.xcom("dr_pitr", run_id, "report")
    # the first commit after GOOD STATE is the DELETE's: the recovery stopped right before it
    assert report["stop"]["xid"] == scenario.delete_xid and report["stop"]["when"] == "before"
    assert report["serving_instance"] == "pg-delayed" and report["approval"]["approver"] == "approver"
    assert counts("LAB_APP_DSN") == EXPECTED
