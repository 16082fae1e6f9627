"""The seed's disaster repaired row by row by dr_surgical_recovery (in-process `dag.test`, real lab).

The seed plays (10,500 orders, 7,465 completed, then the DELETE of the completed ones), the
application then places 200 new orders through PgBouncer (some completed) and keeps
writing heartbeats the whole time. A plan-only run must show the 7,465 missing rows and
change nothing; the confirmed run must bring live to 10,700 orders (7,465 + the new
completed ones) without ever stopping the primary, and leave the plan and the applied
diff in the audit trail.
"""

from __future__ import annotations

import json
import os
import subprocess

import psycopg2
import pytest

from include.lab import seed_scenario
from tests.pitr_support import counts, one, run_dag, sql, xcom

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAG_ID = "dr_surgical_recovery"
NEW_ORDERS = 200


def place_new_orders() -> int:
    """200 orders placed one by one by the app (through PgBouncer) after the DELETE; returns how many are completed."""
    conn = psycopg2.connect(os.environ["LAB_APP_DSN"], connect_timeout=10, application_name="seed-app")
    conn.autocommit = True
    completed = 0
    try:
        with conn.cursor() as cur:
            for i in range(seed_scenario.CP2_TOTAL + 1, seed_scenario.CP2_TOTAL + NEW_ORDERS + 1):
                status = "completed" if i % 4 == 0 else "pending"
                completed += status == "completed"
                cur.execute("INSERT INTO critical_orders (order_id, customer_id, amount, status) "
                            "VALUES (%s, %s, %s, %s)", (i, 1 + i % 997, 42.50, status))
    finally:
        conn.close()
    return completed


def events(run_id: str, action: str, *outcomes: str) -> list[tuple[str, dict]]:
    """The audit events of a run for one action (the step's own started/ok events included unless outcomes are given)."""
    rows = sql("LAB_AUDIT_DSN", "SELECT outcome, details::text FROM audit.events WHERE run_id = %s AND action = %s "
                                "AND (outcome = ANY(%s) OR cardinality(%s::text[]) = 0) ORDER BY event_id",
               (run_id, action, list(outcomes), list(outcomes)))
    return [(o, json.loads(d)) for o, d in rows]


@pytest.fixture(scope="module")
def surgical():
    started = one("LAB_PRIMARY_DSN", "SELECT pg_postmaster_start_time()")
    writer = seed_scenario.AppWriter()
    writer.start()
    try:
        scenario = seed_scenario.play()
        assert scenario.after_delete == {"orders_total": 3035, "orders_completed": 0}
        new_completed = place_new_orders()
        before = counts()
        conf = {"server": "pg-primary", "target_time": scenario.good_state, "incident_id": "INC-SURGICAL-1",
                "reason": "seed scenario: DELETE of completed orders, new orders since",
                "tables": ["public.critical_orders"]}
        plan_state, plan_run, plan_tasks = run_dag(DAG_ID, conf)
        after_plan = counts()
        commits_before_apply = writer.ok
        state, run_id, tasks = run_dag(DAG_ID, {**conf, "confirm": "SURGICAL pg-primary"})
        commits_after_apply = writer.ok
        writer.stop_event.wait(1)
    finally:
        app = writer.stop()
    return {"scenario": scenario, "new_completed": new_completed, "before": before, "started": started,
            "plan": (plan_state, plan_run, plan_tasks), "after_plan": after_plan, "apply": (state, run_id, tasks),
            "app": app, "commits": (commits_before_apply, commits_after_apply)}


def test_plan_only_shows_the_missing_rows_and_changes_nothing(surgical):
    state, run_id, tasks = surgical["plan"]
    assert state == "success", tasks
    assert tasks["approve"] == "skipped" and tasks["apply"] == "skipped"
    assert tasks["teardown"] == "success" and tasks["failure_summary"] == "skipped"
    assert surgical["before"] == {"orders_total": 3035 + NEW_ORDERS, "orders_completed": surgical["new_completed"]}
    assert surgical["after_plan"] == surgical["before"]
    assert [o for o, _ in events(run_id, "surgical_plan")] == ["started", "planned", "ok"]  # then the preview stops
    [(_, plan)] = events(run_id, "surgical_plan", "planned")
    assert plan["confirmed"] is False
    [t] = plan["tables"]
    assert t["table"] == "public.critical_orders" and t["primary_key"] == ["order_id"]
    assert t["missing"] == 7465 and t["changed"] == 0 and t["live_only"] == NEW_ORDERS and t["unchanged"] == 3035
    assert t["restored_rows"] == 10500 and t["missing_keys"] == {"first": 1, "last": 10500}
    assert len(t["missing_sample"]) == 10 and all(r["status"] == "completed" for r in t["missing_sample"])
    restore = xcom(DAG_ID, run_id, "restore_nonprod")
    assert restore["instance"] == "pg-nonprod" and restore["archive_mode"] == "off"
    assert any("recovery stopping before commit" in line for line in restore["recovery_stop"])


def test_apply_brings_back_the_rows_and_keeps_the_new_orders(surgical):
    state, run_id, tasks = surgical["apply"]
    assert state == "success", tasks
    assert counts() == {"orders_total": 10500 + NEW_ORDERS, "orders_completed": 7465 + surgical["new_completed"]}
    applied = xcom(DAG_ID, run_id, "apply")
    [t] = applied["tables"]
    assert t["inserted"] == 7465 and t["skipped_on_conflict"] == 0 and t["updated"] == 0
    assert t["before"]["live_rows"] == 3035 + NEW_ORDERS and t["after"]["live_rows"] == 10500 + NEW_ORDERS
    assert t["inserted_keys"] == {"first": 1, "last": 10500}
    assert applied["live_counts_after"]["orders_total"] >= 10500 + NEW_ORDERS
    # the new orders are the app's, untouched
    assert one("LAB_PRIMARY_DSN", "SELECT count(*) FROM critical_orders WHERE order_id > 10500 AND amount = 42.50") \
        == NEW_ORDERS


def test_no_downtime_the_app_kept_writing(surgical):
    assert one("LAB_PRIMARY_DSN", "SELECT pg_postmaster_start_time()") == surgical["started"]
    assert surgical["app"]["errors"] == 0, surgical["app"]
    before, after = surgical["commits"]
    assert after > before  # heartbeats committed through PgBouncer while the confirmed run restored and applied


def test_audit_trail_holds_the_plan_and_the_applied_diff(surgical):
    _, run_id, _ = surgical["apply"]
    [(_, plan)] = events(run_id, "surgical_plan", "planned")
    assert plan["confirmed"] is True and plan["totals"]["missing"] == 7465
    # written before COMMIT (no unaudited change), then the step's own ok
    assert [o for o, _ in events(run_id, "surgical_apply")] == ["started", "info", "ok"]
    [(_, committing)] = events(run_id, "surgical_apply", "info")
    assert committing["committing"] is True and committing["tables"][0]["inserted"] == 7465
    [(outcome, applied)] = events(run_id, "surgical_applied")
    assert outcome == "ok" and applied["totals"]["inserted"] == 7465
    assert applied["tables"][0]["inserted_sample"][:3] == [1, 2, 3]
    incidents = {i for (i,) in sql("LAB_AUDIT_DSN", "SELECT DISTINCT incident_id FROM audit.events WHERE run_id = %s",
                                   (run_id,))}
    assert incidents == {"INC-SURGICAL-1"}


def test_teardown_stopped_nonprod_and_released_the_lock(surgical, inventory):
    _, run_id, tasks = surgical["apply"]
    assert tasks["teardown"] == "success"
    nonprod = inventory.server("pg-primary").nonprod
    r = subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/pg_ctl", "status", "-D",
                        nonprod.data_directory], capture_output=True, text=True, check=False)
    assert r.returncode == 3, r.stdout  # stopped; its directory is kept (the next restore moves it aside)
    assert sql("LAB_AUDIT_DSN", "SELECT count(*) FROM control.server_locks WHERE server = 'pg-primary'")[0][0] == 0
    [(outcome, teardown)] = events(run_id, "surgical_teardown")
    assert outcome == "ok" and teardown["lock_released"] is True


# ------------------------------------------------------------------------------------ refusals


def test_a_table_without_primary_key_is_refused_and_nonprod_torn_down(surgical, inventory):
    """The plan refuses the table with a clear error; nothing is retried, live is untouched, teardown runs."""
    sql("LAB_PRIMARY_DSN", "CREATE TABLE IF NOT EXISTS public.surgical_no_pk (a int)")
    try:
        target = one("LAB_PRIMARY_DSN", "SELECT now()").isoformat()
        before = counts()
        state, run_id, tasks = run_dag(DAG_ID, {"server": "pg-primary", "target_time": target,
                                                "tables": ["public.critical_orders", "public.surgical_no_pk"],
                                                "confirm": "SURGICAL pg-primary"})
    finally:
        sql("LAB_PRIMARY_DSN", "DROP TABLE IF EXISTS public.surgical_no_pk")
    assert state == "failed", tasks
    assert tasks["plan"] == "failed" and tasks["apply"] == "upstream_failed"
    assert tasks["teardown"] == "success" and tasks["failure_summary"] == "failed"
    assert counts() == before
    [(_, failed)] = events(run_id, "surgical_plan", "refused")  # non-retryable: one attempt
    assert "public.surgical_no_pk" in failed["error"] and "has no primary key" in failed["error"]
    [(_, summary)] = events(run_id, "failure_summary", "ok")
    assert summary["live"] == "live was not changed by this run"
    assert sql("LAB_AUDIT_DSN", "SELECT count(*) FROM control.server_locks WHERE server = 'pg-primary'")[0][0] == 0


def test_a_locked_server_is_refused_before_anything_runs(surgical, inventory):
    """A drill (or PITR) holds the server: refused in the first task; the teardown leaves its nonprod alone."""
    sql("LAB_AUDIT_DSN", "INSERT INTO control.server_locks (server, dag_id, run_id, purpose) "
                         "VALUES ('pg-primary', 'dr_monthly_restore_drill', 'test-holder', 'drill')")
    try:
        state, run_id, tasks = run_dag(DAG_ID, {"server": "pg-primary", "target_time": "2026-01-01T00:00:00Z"})
        holder = sql("LAB_AUDIT_DSN", "SELECT dag_id, run_id FROM control.server_locks WHERE server = 'pg-primary'")
    finally:
        sql("LAB_AUDIT_DSN", "DELETE FROM control.server_locks WHERE server = 'pg-primary' AND run_id = 'test-holder'")
    assert state == "failed" and tasks["validate_params"] == "failed" and tasks["preflight"] == "upstream_failed"
    assert holder == [("dr_monthly_restore_drill", "test-holder")]  # not released by the refused run
    teardown = xcom(DAG_ID, run_id, "teardown")
    assert teardown["stopped"] is None and "locked by dr_monthly_restore_drill" in teardown["skipped"]
    [(_, refused)] = events(run_id, "validate", "refused")
    assert "locked by dr_monthly_restore_drill" in refused["error"]
