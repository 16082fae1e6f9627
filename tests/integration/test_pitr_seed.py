"""The seed's disaster, recovered end to end by dr_pitr (in-process `dag.test`, real lab).

The app writes through PgBouncer the whole time; the PITR is triggered *immediately* after
the DELETE (no waiting for archive_timeout: the seed's failure), with target_time = GOOD STATE.
It runs with the default staged_restore=true (restore before the freeze, rename inside the
downtime); tests/e2e/test_pitr_rest.py runs the same scenario with staged_restore=false.

Issue 14's variant of the seed: after the DELETE and before the freeze the app writes 200
new orders (50 completed). The PITR gives 10,500 / 7,465; dr_salvage then puts the 200
back from the moved-aside directory: 10,700 / 7,515, the same totals as the surgical path.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest

from include.lab import seed_scenario
from tests.pitr_support import audit, counts, one, pgbouncer_paused, primary_timeline, run_dag, sql, xcom

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = ["validate", "resolve_target", "preflight", "wal_coverage", "plan", "stage_restore", "freeze_app",
         "stop_postgres", "move_aside", "barman_restore", "start_recovery", "verify_target", "validate_data",
         "unfreeze_app", "discarded", "rebuild_standby", "rebase_barman", "report"]
#: the app's good writes after the DELETE (issue 14): discarded by the PITR, put back by dr_salvage
AFTER_DELETE = 200


#: an archive_command in the backed-up config (inert: the lab archives by streaming, archive_mode=off)
ARCHIVE_COMMAND = "/bin/true barman-dr-seed-test %p"


@pytest.fixture(scope="module")
def pitr():
    tli_before = primary_timeline()
    sql("LAB_PRIMARY_DSN", "ALTER SYSTEM SET archive_command = %s", (ARCHIVE_COMMAND,))  # psycopg2 inlines it
    sql("LAB_PRIMARY_DSN", "SELECT pg_reload_conf()")
    writer = seed_scenario.AppWriter()
    writer.start()
    # a backup that holds it: `barman restore` turns it into `archive_command = false`
    subprocess.run([*shlex.split(os.environ["LAB_BARMAN"]), "backup", "--wait", "pg-primary"], check=True,
                   capture_output=True, timeout=600)
    scenario = seed_scenario.play(orders_after_delete=AFTER_DELETE)
    assert scenario.after_delete == {"orders_total": 3035 + AFTER_DELETE, "orders_completed": AFTER_DELETE // 4}
    conf = {"server": "pg-primary", "target_time": scenario.good_state, "incident_id": "INC-SEED-1",
            "reason": "seed scenario: mass DELETE of completed orders",
            "expected": {"orders_total": 10500, "orders_completed": 7465}, "confirm": "PITR pg-primary"}
    state, run_id, tasks = run_dag("dr_pitr", conf)
    commits_before_stop = writer.ok
    writer.stop_event.wait(2)
    app = writer.stop()
    yield {"state": state, "run_id": run_id, "tasks": tasks, "scenario": scenario, "tli_before": tli_before,
           "app": app, "commits_before_stop": commits_before_stop, "report": xcom("dr_pitr", run_id, "report"),
           # from the config files: with archive_mode=off, SHOW says "(disabled)"
           "archive_command": sql("LAB_PRIMARY_DSN", "SELECT setting FROM pg_file_settings "
                                                     "WHERE name = 'archive_command' AND applied")}
    sql("LAB_PRIMARY_DSN", "ALTER SYSTEM RESET archive_command")
    sql("LAB_PRIMARY_DSN", "SELECT pg_reload_conf()")


def test_run_succeeded(pitr):
    assert pitr["state"] == "success", pitr["tasks"]
    assert pitr["tasks"]["failure_summary"] == "skipped"


def test_counts_are_back_to_the_good_state(pitr):
    assert counts() == {"orders_total": 10500, "orders_completed": 7465}
    assert pitr["report"]["counts"] == {"orders_total": 10500, "orders_completed": 7465}


def test_new_timeline_and_target_proven(pitr):
    report = pitr["report"]
    assert primary_timeline() == report["new_timeline"] > pitr["tli_before"] == report["old_timeline"]
    assert any("recovery stopping before commit" in line for line in report["recovery_stop"])
    proof = xcom("dr_pitr", pitr["run_id"], "verify_target")
    assert proof["reached"] is True
    assert proof["history_reason"].startswith("before ")


def test_app_writes_through_pgbouncer_again(pitr):
    assert not pgbouncer_paused()
    before = one("LAB_APP_DSN", "SELECT count(*) FROM app_heartbeat")
    sql("LAB_APP_DSN", "INSERT INTO app_heartbeat DEFAULT VALUES")
    assert one("LAB_APP_DSN", "SELECT count(*) FROM app_heartbeat") == before + 1
    # the writer ran during the whole PITR: PAUSE makes it wait, it does not make it fail
    assert pitr["app"]["commits"] > 0
    assert pitr["report"]["app_check"]["checked"] is True


def test_standby_streams_from_the_new_primary(pitr):
    rows = sql("LAB_PRIMARY_DSN", "SELECT application_name, state FROM pg_stat_replication")
    assert ("pg-standby", "streaming") in rows
    assert one("LAB_STANDBY_DSN", "SELECT pg_is_in_recovery()") is True
    standby_tli = int(one("LAB_STANDBY_DSN", "SELECT received_tli FROM pg_stat_wal_receiver"))
    assert standby_tli == primary_timeline()


def test_old_data_directory_is_kept(pitr):
    moved = pitr["report"]["moved_aside"]
    assert moved and moved.startswith(os.environ["LAB_DIR"])
    assert Path(moved, "PG_VERSION").exists()
    assert Path(moved, "global", "pg_control").exists()


def test_audit_trail_holds_every_step(pitr):
    events = audit(pitr["run_id"])
    ok = {e["action"] for e in events if e["outcome"] == "ok"}
    missing = [s for s in STEPS if s not in ok]
    assert not missing, missing
    assert any(e["action"] == "plan" and e["outcome"] == "planned" for e in events)
    assert {e["incident_id"] for e in events} == {"INC-SEED-1"}
    moved = [json.loads(e["details"]) for e in events if e["action"] == "move_aside" and e["outcome"] == "ok"]
    assert moved[0]["moved_to"] == pitr["report"]["moved_aside"]


def test_barman_protects_the_new_timeline(pitr):
    report = pitr["report"]
    assert report["new_backup_id"]
    rebase = xcom("dr_pitr", pitr["run_id"], "rebase_barman")
    assert rebase["new_backup_timeline"] == report["new_timeline"]


def test_rto_reported_per_phase(pitr):
    report = pitr["report"]
    assert report["rto_s"] is not None and report["rto_s"] > 0
    for phase in ("freeze_app", "stop_postgres", "barman_restore", "start_recovery", "unfreeze_app"):
        assert report["phases_s"][phase] is not None


def test_staged_restore_ran_before_the_freeze_and_was_renamed_into_place(pitr):
    report = pitr["report"]
    assert report["staged_restore"] is True
    assert report["outside_downtime_s"]["stage_restore"] > 0
    stage = xcom("dr_pitr", pitr["run_id"], "stage_restore")
    swap = xcom("dr_pitr", pitr["run_id"], "barman_restore")
    freeze = xcom("dr_pitr", pitr["run_id"], "freeze_app")
    assert stage["staged"] is True and stage["ended_at"] <= freeze["frozen_at"]  # the copy was outside the downtime
    data_dir = f"{os.environ['LAB_DIR']}/pg/pg-primary/data"
    assert stage["staging_directory"].startswith(f"{data_dir}.staged-")
    assert stage["staging_directory"] not in (data_dir, report["moved_aside"])
    assert stage["space"]["available_bytes"] >= stage["space"]["needed_bytes"] > 0
    assert swap["mode"] == "staged" and swap["renamed"] == "renamed" and swap["destination"] == data_dir
    # the staging directory became the data directory; Barman's WAL staging directory was removed by recovery
    assert not Path(stage["staging_directory"]).exists() and not Path(stage["wal_directory"]).exists()
    assert report["staging_leftover"] == []
    assert os.stat(data_dir).st_ino == int(stage["identity"].split(":")[1])


def test_the_recovered_primary_archives_again(pitr):
    """Barman's restore sets `archive_command = false`; the new primary gets its own back (the next PITR needs it)."""
    assert pitr["archive_command"] == [(ARCHIVE_COMMAND,)]
    proof = xcom("dr_pitr", pitr["run_id"], "verify_target")
    assert any(f.endswith("/postgresql.auto.conf") for f in proof["archive_command_restored_in"])


def test_plan_listed_what_would_be_discarded(pitr):
    plan = xcom("dr_pitr", pitr["run_id"], "plan")
    orders = plan["discarded"]["tables"]["public.critical_orders"]
    assert orders == {"inserted": AFTER_DELETE, "updated": 0, "deleted": 7465}
    assert plan["stop"]["kind"] == "commit" and plan["stop"]["when"] == "before"
    assert plan["estimated_rto"]["mode"] == "staged"


def test_report_lists_what_was_actually_discarded_up_to_the_freeze(pitr):
    disc = pitr["report"]["discarded"]
    assert disc["tables"]["public.critical_orders"] == {"inserted": AFTER_DELETE, "updated": 0, "deleted": 7465}
    # the app's heartbeats kept coming until the freeze: discarded too, and listed
    assert disc["tables"]["public.app_heartbeat"]["inserted"] > 0
    assert pitr["report"]["time_to_recovered_s"] >= pitr["report"]["rto_s"] > 0


# --------------------------------------------------------------- dr_salvage: nothing good lost


def test_salvage_plan_only_changes_nothing(pitr):
    before = counts()
    state, run_id, tasks = run_dag("dr_salvage", {"server": "pg-primary", "tables": ["public.critical_orders"]})
    assert state == "success", tasks
    assert tasks["approve"] == "skipped" and tasks["apply"] == "skipped" and tasks["teardown"] == "success"
    assert counts() == before == {"orders_total": 10500, "orders_completed": 7465}
    plan = next(json.loads(e["details"]) for e in audit(run_id) if e["action"] == "salvage_plan"
                and e["outcome"] == "planned")
    t = plan["tables"][0]
    assert plan["pitr_run_id"] == pitr["run_id"]
    assert (t["discarded_rows"], t["to_insert"], t["conflicts"]) == (AFTER_DELETE, AFTER_DELETE, 0)
    assert t["deleted_after_target_left_alone"] == 7465
    teardown = xcom("dr_salvage", run_id, "teardown")
    assert teardown["lock_released"] and not Path(teardown["copy"]).exists()  # the copy is gone
    assert Path(pitr["report"]["moved_aside"], "PG_VERSION").exists()  # the evidence is untouched


def test_salvage_puts_the_discarded_orders_back_and_reports_a_conflict(pitr):
    # after the recovery the app re-used one of the discarded keys, with other content: never overwritten
    reused = seed_scenario.AFTER_DELETE_FIRST_ID + AFTER_DELETE - 3  # a pending one
    sql("LAB_APP_DSN", "INSERT INTO critical_orders (order_id, customer_id, amount, status) "
                       "VALUES (%s, 1, 1.23, 'pending')", (reused,))
    state, run_id, tasks = run_dag("dr_salvage", {"server": "pg-primary", "confirm": "SALVAGE pg-primary",
                                                  "incident_id": "INC-SEED-1"})
    assert state == "success", tasks
    assert counts() == {"orders_total": 10700, "orders_completed": 7515}
    assert one("LAB_PRIMARY_DSN", "SELECT amount FROM critical_orders WHERE order_id = %s", (reused,)) == Decimal("1.23")
    applied = xcom("dr_salvage", run_id, "apply")
    orders = next(t for t in applied["tables"] if t["table"] == "public.critical_orders")
    assert orders["inserted"] == AFTER_DELETE - 1 and orders["changed_left_alone"] == 1
    events = audit(run_id)
    assert any(e["action"] == "salvage_apply" and e["outcome"] == "info" for e in events)  # audited before COMMIT
    assert any(e["action"] == "salvage_applied" and e["outcome"] == "ok" for e in events)
    # a second run finds nothing left to insert: idempotent
    state, run_id2, _ = run_dag("dr_salvage", {"server": "pg-primary", "confirm": "SALVAGE pg-primary",
                                               "tables": ["public.critical_orders"]})
    assert state == "success"
    assert xcom("dr_salvage", run_id2, "apply")["totals"]["inserted"] == 0
    assert counts() == {"orders_total": 10700, "orders_completed": 7515}
