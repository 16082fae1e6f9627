"""Four-eyes approval inside Airflow, end to end: the real scheduler, the HITL REST API, two users.

`admin` (the api fixture's user) triggers; Airflow itself refuses admin's answer (403, the
requester is not among the assigned users); `approver` answers through `barman-dr approve`
(the CLI on the HITL REST API). Approve recovers the seed; Reject and the timeout touch
nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from barman_dr.surfaces.api_client import ApiError, incident_run_id
from include.lab import seed_scenario
from tests.pitr_support import counts, pgbouncer_paused, primary_timeline, sql, wait_for_approval_request

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CLI = str(Path(__file__).resolve().parents[2] / "bin" / "barman-dr")
DAG = "dr_pitr"


def as_approver(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BARMAN_DR_API_URL": os.environ["LAB_AIRFLOW_URL"], "BARMAN_DR_API_USER": "approver",
           "BARMAN_DR_API_PASSWORD": os.environ["LAB_APPROVER_PASSWORD"]}
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120, env=env, check=False)


def approval_events(run_id: str) -> list[dict]:
    rows = sql("LAB_AUDIT_DSN", "SELECT outcome, details FROM audit.events WHERE run_id = %s AND action = 'approval' "
                                "ORDER BY event_id", (run_id,))
    return [{"outcome": o, **(d if isinstance(d, dict) else json.loads(d))} for o, d in rows]


def test_the_requester_is_refused_and_the_approver_recovers_the_seed(api):
    tli = primary_timeline()
    writer = seed_scenario.AppWriter()
    writer.start()
    scenario = seed_scenario.play()
    damaged = counts()
    incident = f"INC-4EYES-{int(time.time())}"
    run_id = incident_run_id(DAG, incident)
    api.trigger(DAG, {"server": "pg-primary", "target_xid": str(scenario.delete_xid), "target_inclusive": False,
                      "incident_id": incident, "expected": {"orders_total": 10500, "orders_completed": 7465}},
                run_id=run_id)
    try:
        hitl = wait_for_approval_request(api, DAG, run_id)
        body = hitl["body"]
        # the plan itself: the resolved stop record, the backup and WAL, what is discarded, the RTO, the steps
        assert "PITR plan for pg-primary" in body and f"xid {scenario.delete_xid}" in body
        assert "backup:" in body and "WAL proven" in body and "discarded:" in body and "estimate" in body
        assert "steps:" in body and "freeze app" in body and "requested by **admin**" in body
        assert [u["id"] for u in hitl["assigned_users"]] == ["approver"]

        with pytest.raises(ApiError) as exc:  # four eyes: Airflow refuses the requester's own approval
            api.respond(DAG, run_id, "approve", "Approve")
        assert exc.value.status == 403
        time.sleep(3)
        assert counts() == damaged and primary_timeline() == tli and not pgbouncer_paused()
        assert {t["task_id"]: t["state"] for t in api.task_instances(DAG, run_id)}["stage_restore"] in (None, "")

        r = as_approver("approve", "--incident", incident, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        assert json.loads(r.stdout)["answered"] is True
        final = api.wait(DAG, run_id, timeout=900)
    finally:
        writer.stop()
    states = {t["task_id"]: t["state"] for t in api.task_instances(DAG, run_id)}
    assert final["state"] == "success", states
    assert counts() == {"orders_total": 10500, "orders_completed": 7465}
    assert primary_timeline() > tli
    events = approval_events(run_id)
    requested = next(e for e in events if e.get("decision") == "requested")
    approved = next(e for e in events if e.get("decision") == "approved")
    assert requested["requester"] == "admin" and requested["approvers"] == ["approver"]
    assert approved["outcome"] == "ok" and approved["approver"] == "approver" and approved["requester"] == "admin"
    assert approved["plan_hash"] == requested["plan_hash"]
    note = api.get_run(DAG, run_id).get("note") or ""
    assert "approver" in note


def test_a_reject_touches_nothing(api):
    tli, before = primary_timeline(), counts()
    incident = f"INC-REJECT-{int(time.time())}"
    run_id = incident_run_id(DAG, incident)
    sql("LAB_PRIMARY_DSN", "SELECT pg_current_xact_id()")
    time.sleep(1.1)
    target = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    api.trigger(DAG, {"server": "pg-primary", "target_time": target, "incident_id": incident}, run_id=run_id)
    wait_for_approval_request(api, DAG, run_id)
    r = as_approver("approve", "--incident", incident, "--reject")
    assert r.returncode == 0, r.stdout + r.stderr
    final = api.wait(DAG, run_id, timeout=300)
    states = {t["task_id"]: t["state"] for t in api.task_instances(DAG, run_id)}
    assert final["state"] == "success" and states["approve"] == "skipped", states
    assert all(states[t] == "skipped" for t in ("stage_restore", "freeze_app", "stop_postgres", "move_aside"))
    assert primary_timeline() == tli and counts() == before and not pgbouncer_paused()
    [rejected] = [e for e in approval_events(run_id) if e.get("decision") == "rejected"]
    assert rejected["approver"] == "approver" and rejected["requester"] == "admin"
    assert "REJECTED by approver" in (api.get_run(DAG, run_id).get("note") or "")
    assert not sql("LAB_AUDIT_DSN", "SELECT 1 FROM control.server_locks WHERE run_id = %s", (run_id,))


def test_no_answer_in_time_touches_nothing_and_alerts(api):
    """pg-primary2's lab window is 30 s: the scheduler's timeout sweep fails the step, nothing is touched.

    Its lab RTO objective is 20 s: the run is still waiting when Airflow's DeadlineAlert passes,
    and its callback pages through DrNotifier, naming the run.
    """
    dsn = "LAB_PRIMARY2_DSN"
    tli = sql(dsn, "SELECT timeline_id FROM pg_control_checkpoint()")[0][0]
    before = sql(dsn, "SELECT count(*) FROM critical_orders")[0][0]
    incident = f"INC-TIMEOUT-{int(time.time())}"
    run_id = incident_run_id(DAG, incident)
    sql(dsn, "SELECT pg_current_xact_id()")
    time.sleep(1.1)
    target = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    api.trigger(DAG, {"server": "pg-primary2", "target_time": target, "incident_id": incident}, run_id=run_id)
    wait_for_approval_request(api, DAG, run_id)
    final = api.wait(DAG, run_id, timeout=300)
    states = {t["task_id"]: t["state"] for t in api.task_instances(DAG, run_id)}
    assert final["state"] == "failed" and states["approve"] == "failed", states
    assert states["stage_restore"] == "upstream_failed" and states["release_lock"] == "success"
    assert sql(dsn, "SELECT timeline_id FROM pg_control_checkpoint()")[0][0] == tli
    assert sql(dsn, "SELECT count(*) FROM critical_orders")[0][0] == before
    [timed_out] = [e for e in approval_events(run_id) if e.get("decision") == "timed_out"]
    assert timed_out["outcome"] == "failed" and timed_out["requester"] == "admin"
    notified = sql("LAB_AUDIT_DSN", "SELECT count(*) FROM audit.events WHERE run_id = %s AND action = 'notify' "
                                    "AND outcome = 'failed'", (run_id,))[0][0]
    assert notified >= 1
    assert "no answer within 0.5 min" in (api.get_run(DAG, run_id).get("note") or "")
    deadline = time.monotonic() + 120  # the deadline's callback runs on the executor
    rto = []
    while not rto and time.monotonic() < deadline:
        rto = sql("LAB_AUDIT_DSN", "SELECT details->>'message' FROM audit.events WHERE action = 'notify' AND "
                                   "outcome = 'critical' AND details->>'run_id' = %s", (run_id,))
        time.sleep(2)
    assert rto and "RTO objective missed" in rto[0][0] and run_id in rto[0][0] and "pg-primary2" in rto[0][0]
