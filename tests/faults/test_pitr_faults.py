"""Faults injected into real PITRs (issue 7): each asserts the outcome, not only that an error was raised.

1. The SSH servers die in the middle of `barman restore` and come back: the retry converges.
4. WAL is taken out of Barman's archive after the preflight proved it: recovery ends before
   the target. Staged (the default), the staging copy's replay finds it before the freeze and
   nothing stops; in-window, the run fails with the app frozen and the rollback DAG restores
   service.

(2, 3, 6 and 7 live in tests/integration: test_scheduled_verification, test_pitr_rollback,
test_pitr_refusals; 5, the worker killed, is tests/faults/test_worker_killed.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from include.lab import seed_scenario
from tests.fault_support import (
    SshOutageDuringRestore,
    barman_bandwidth_limit,
    make_lab_up,
    orphan_postmaster,
    postmaster_pid,
    verification_report,
    wal_taken_out_of_the_archive,
)
from tests.pitr_support import audit, counts, pgbouncer_paused, primary_timeline, run_dag, sql, xcom

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = Path(os.environ.get("LAB_DIR", "."), "pg", "pg-primary", "data")
EXPECTED = {"orders_total": 10500, "orders_completed": 7465}


def details(events: list[dict], action: str, outcome: str) -> list[dict]:
    return [json.loads(e["details"] or "{}") for e in events if e["action"] == action and e["outcome"] == outcome]


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "in-window"])
def test_ssh_killed_mid_restore_the_retry_converges(staged):
    """Staged (the default): the copy runs before the freeze; in-window: after the move aside."""
    scenario = seed_scenario.play()
    task = "stage_restore" if staged else "barman_restore"
    outage = SshOutageDuringRestore(f"{DATA}.staged-*" if staged else str(DATA))
    with barman_bandwidth_limit(3000):  # ~48 MB at 3 MB/s: the copy is still running when SSH dies
        state, run_id, tasks = run_dag(
            "dr_pitr", {"server": "pg-primary", "target_time": scenario.good_state, "incident_id": "INC-FAULT-1",
                        "expected": EXPECTED, "confirm": "PITR pg-primary", "staged_restore": staged},
            before={task: outage})
    assert outage.error is None, outage.error
    assert outage.killed.get("barman-lab") and outage.killed.get("pg-primary"), outage.killed
    assert state == "success", tasks
    assert counts() == EXPECTED
    assert not pgbouncer_paused()
    events = audit(run_id)
    failed = details(events, task, "failed")
    assert failed, "the first restore attempt did not fail: the outage missed it"
    assert "NEXT:" in failed[0].get("error", "") or failed[0].get("next_action")
    done = xcom("dr_pitr", run_id, task)
    moved = details(events, "move_aside", "ok")[0]["moved_to"]
    if staged:
        # the failed attempt's partial copy was this run's own staging output: only that was cleaned
        assert done["cleaned"] and all(".staged-" in p for p in done["cleaned"]), done
        assert not Path(done["staging_directory"]).exists()  # renamed into place
    else:
        # the partial copy of the failed attempt was set aside (kept), never the live or moved-aside directory
        assert done["retried_after"] and done["retried_after"] != "finished (exit 0)", done
        assert done["partial_kept_at"] and Path(done["partial_kept_at"]).is_dir()
        assert moved != done["partial_kept_at"]
    assert Path(moved, "PG_VERSION").exists()
    assert (DATA / "PG_VERSION").exists()


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "in-window"])
def test_wal_removed_after_preflight_recovery_ends_before_target(staged):
    scenario = seed_scenario.play()
    before = counts()  # the damaged state: 3,035 rows
    tli = primary_timeline()
    with wal_taken_out_of_the_archive() as wal:
        def sabotage(context) -> None:
            backup = context["ti"].xcom_pull(task_ids="preflight")["backup"]
            wal["take"](backup["end_wal"])

        # after the preflight proved coverage, before any copy
        state, run_id, tasks = run_dag(
            "dr_pitr", {"server": "pg-primary", "target_time": scenario.good_state, "incident_id": f"INC-FAULT-4-{staged:d}",
                        "expected": EXPECTED, "staged_restore": staged, "confirm": "PITR pg-primary"},
            before={"stage_restore" if staged else "barman_restore": sabotage})
        assert wal["moved"], "no WAL after the backup to take out"
    assert state == "failed", tasks
    assert tasks["wal_coverage"] == "success"
    events = audit(run_id)
    if staged:
        # the staging copy replays before the freeze: the shortfall is found there, nothing stops
        assert tasks["stage_restore"] == "failed" and tasks["freeze_app"] == "upstream_failed", tasks
        failed = details(events, "stage_restore", "failed")
        assert failed and "recovery ended before configured recovery target was reached" in json.dumps(failed)
        assert not details(events, "move_aside", "ok") and not details(events, "freeze_app", "ok")
        assert not pgbouncer_paused()
        assert counts() == before and primary_timeline() == tli  # the live server was never touched
        # the unusable staging copy is reported for the DBA to inspect and delete (not live data)
        summary = details(events, "failure_summary", "ok")
        assert summary and any(".staged-" in p for p in summary[0]["staging_leftover"]), summary
        # ... and the daily verification reports it, with the run that left it, until someone removes it
        try:
            leftover = [p for p in summary[0]["staging_leftover"] if p.endswith(tuple("0123456789abcdef"))]
            assert leftover, summary
            with orphan_postmaster() as (orphan_dir, orphan_pid):
                report = verification_report("pg-primary")
            orphans = [f for f in report["findings"] if f["check"] == "orphans"]
            text = json.dumps(orphans)
            assert all(f["status"] == "WARNING" for f in orphans) and run_id in text and leftover[0] in text, orphans
            assert orphan_dir in text and f"pid {orphan_pid}" in text  # a postmaster no run recorded
        finally:
            for path in summary[0]["staging_leftover"]:  # the DBA's decision: they are not live data
                shutil.rmtree(path, ignore_errors=True)
        return
    assert tasks["barman_restore"] == "success"
    assert tasks["start_recovery"] == "failed" and tasks["unfreeze_app"] == "upstream_failed"
    assert pgbouncer_paused()  # the app never saw a server short of its target
    failed = details(events, "start_recovery", "failed")
    assert failed and "recovery ended before configured recovery target was reached" in json.dumps(failed)
    summary = details(events, "failure_summary", "ok")
    assert summary and "dr_pitr_rollback" in json.dumps(summary)
    moved = details(events, "move_aside", "ok")[0]["moved_to"]
    assert Path(moved, "PG_VERSION").exists()

    try:
        frozen_app_guarded(run_id)
    finally:  # whatever happened above, the next suites need pg-primary back and the app resumed
        state, _, rb_tasks = run_dag("dr_pitr_rollback", {"server": "pg-primary", "pitr_run_id": run_id,
                                                               "confirm": "ROLLBACK pg-primary"})
    assert state == "success", rb_tasks
    assert counts() == before and primary_timeline() == tli
    assert not pgbouncer_paused()
    # resumed by the rollback: nothing is frozen any more, the guard is quiet, the server is free again
    _, g_run, _ = run_dag("dr_freeze_guard", {})
    assert xcom("dr_freeze_guard", g_run, "check_frozen_apps")["servers"]["pg-primary"]["status"] == "ok"


def frozen_app_guarded(run_id: str) -> None:
    """A run ended with the app frozen: lab-up leaves the server alone, dr_freeze_guard pages past max_freeze."""
    # the run is over (its lock released) but left the app frozen
    assert not sql("LAB_AUDIT_DSN", "SELECT 1 FROM control.server_locks WHERE server = 'pg-primary'")
    # `make lab-up` still leaves the server alone: the run froze its app and nothing resumed it
    up = make_lab_up()
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    assert "pg-primary: left alone, owned by a DR run" in up.stdout and "froze its app" in up.stdout
    assert pgbouncer_paused()
    assert not DATA.joinpath("postmaster.pid").exists() or not postmaster_pid(DATA)  # not started by lab-up
    # past max_freeze_seconds (45 s in the lab) the out-of-band guard alerts, naming the run and the next step
    frozen_at = sql("LAB_AUDIT_DSN", "SELECT max(event_time) FROM audit.events WHERE run_id = %s AND "
                                     "action = 'freeze_app' AND outcome = 'ok'", (run_id,))[0][0]
    time.sleep(max(0.0, 45 + 2 - (datetime.now(UTC) - frozen_at).total_seconds()))
    before_mail = set(Path(os.environ["LAB_MAIL_DIR"]).glob("*.eml"))
    g_state, g_run, _ = run_dag("dr_freeze_guard", {})
    assert g_state == "success"
    verdict = xcom("dr_freeze_guard", g_run, "check_frozen_apps")["servers"]["pg-primary"]
    assert verdict["status"] == "alert" and verdict["run_id"] == run_id and not verdict["repeat"], verdict
    assert "dr_pitr_rollback" in verdict["next_step"] and f"pitr_run_id={run_id}" in verdict["next_step"]
    mails = [m.read_text() for m in set(Path(os.environ["LAB_MAIL_DIR"]).glob("*.eml")) - before_mail]
    assert any(run_id in m and "FROZEN" in m and "dr_pitr_rollback" in m for m in mails), mails
    assert pgbouncer_paused()  # the guard never unfreezes
    # a second check within max_freeze does not page again
    g_state, g_run, _ = run_dag("dr_freeze_guard", {})
    assert xcom("dr_freeze_guard", g_run, "check_frozen_apps")["servers"]["pg-primary"]["repeat"] is True
