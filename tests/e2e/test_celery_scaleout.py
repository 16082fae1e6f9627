"""Issue 15: CeleryExecutor with Redis, tasks routed to the workers beside each barman host.

Runs in `make test`'s Celery phase (LAB_EXECUTOR=celery: the lab's Redis, three Celery
workers from the inventory's `workers:`), through the real scheduler and REST API:
- the seed's PITR: bookkeeping steps on `default` (worker-a), every step that runs Barman or
  SSH on the queue of pg-primary's barman host (worker-b or worker-c), and the data recovered;
- the daily verification of both servers: pg-primary2's host tasks on site 2's queue;
- a queue no live worker serves is refused at validate_params, before anything runs;
- an unreachable broker gets a clear error (the check validate_params runs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from barman_dr.surfaces.api_client import incident_run_id
from include.lab import seed_scenario
from tests.pitr_support import audit, counts, pgbouncer_paused, primary_timeline, sql

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.celery_lab]

REPO = Path(__file__).resolve().parents[2]
EXPECTED = {"orders_total": 10500, "orders_completed": 7465}
#: dr_pitr's bookkeeping steps (the `default` queue); every other step runs on the server's site
PITR_DEFAULT = {"validate_params", "plan", "approve", "list_standbys", "failure_summary", "release_lock",
                "resume_delayed_replay"}


def workers_serving(inventory, queue: str) -> set[str]:
    return {name for name, w in inventory.workers.items() if queue in w.queues}


def test_seed_pitr_runs_each_step_on_its_queue(api, inventory):
    tli_before = primary_timeline()
    scenario = seed_scenario.play()
    incident = f"INC-CELERY-{int(time.time())}"
    run_id = incident_run_id("dr_pitr", incident)
    conf = {"server": "pg-primary", "target_xid": str(scenario.delete_xid), "target_inclusive": False,
            "incident_id": incident, "expected": EXPECTED, "confirm": "PITR pg-primary"}  # staged (the default)
    api.trigger("dr_pitr", conf, run_id=run_id)
    final = api.wait("dr_pitr", run_id, timeout=900)
    tis = api.task_instances("dr_pitr", run_id)
    states = {t["task_id"]: t["state"] for t in tis}
    assert final["state"] == "success", states
    assert counts() == EXPECTED
    assert primary_timeline() > tli_before and not pgbouncer_paused()

    site = inventory.queue_of("pg-primary")
    assert site == "barman-lab"
    ran = [t for t in tis if t.get("hostname")]
    for t in tis:
        want = "default" if t["task_id"] in PITR_DEFAULT else site
        assert t["queue"] == want, (t["task_id"], t["queue"])
    for t in ran:
        assert t["hostname"] in workers_serving(inventory, t["queue"]), (t["task_id"], t["queue"], t["hostname"])
    hosts = {t["hostname"] for t in ran}
    assert len(hosts) >= 2, hosts  # the central worker and at least one site worker
    # the steps that ran Barman (restore) and SSH (stop, start) ran beside the barman host
    for task in ("resolve_target", "stage_restore", "stop_postgres", "barman_restore", "start_recovery",
                 "verify_target", "report"):
        assert next(t for t in ran if t["task_id"] == task)["hostname"] in {"worker-b", "worker-c"}
    for task in ("validate_params", "plan", "release_lock"):
        assert next(t for t in ran if t["task_id"] == task)["hostname"] == "worker-a"


def test_daily_verification_of_both_servers_routes_per_barman_host(api, inventory):
    from barman_dr.fleet import pool_of, queue_by_pool

    api.unpause("dr_daily_verification")
    try:
        run_id = f"celery_verify_{int(time.time())}"
        api.trigger("dr_daily_verification", {}, run_id=run_id)
        api.wait("dr_daily_verification", run_id, timeout=900)
    finally:
        api._call("PATCH", "/api/v2/dags/dr_daily_verification", {"is_paused": True})
    tis = api.task_instances("dr_daily_verification", run_id)
    queues = queue_by_pool()
    for server in ("pg-primary", "pg-primary2"):
        pool = pool_of(server)
        host_tis = [t for t in tis if t["task_id"].endswith(f"__{pool}")]
        assert host_tis, (server, [t["task_id"] for t in tis])
        for t in host_tis:
            assert t["queue"] == queues[pool] == inventory.queue_of(server)
            assert t["state"] == "success", t
            assert t["hostname"] in workers_serving(inventory, t["queue"]), t
    # pg-primary2 is site 2's: only worker-c serves its queue
    assert {t["hostname"] for t in tis if t["task_id"].endswith(f"__{pool_of('pg-primary2')}")} == {"worker-c"}
    summary = next(t for t in tis if t["task_id"] == "summary")
    assert summary["queue"] == "default" and summary["hostname"] == "worker-a"
    # a report per server, as on LocalExecutor
    rows = sql("LAB_AUDIT_DSN", "SELECT server, outcome, details::text FROM audit.events WHERE run_id = %s AND "
                                "action = 'verify_report'", (run_id,))
    assert {r[0] for r in rows} == {"pg-primary", "pg-primary2"}
    # every probe ran from the site's worker: nothing unmeasured (a worker that cannot reach the barman
    # host would turn each probe into "could not be measured")
    for server, _outcome, details in rows:
        assert "could not be measured" not in details, (server, details[:2000])


def celery_control(action: str, queue: str, worker: str) -> None:
    code = ("from airflow.providers.celery.executors.celery_executor_utils import app; "
            f"r = app.control.{action}({queue!r}, destination=[{worker!r}], reply=True); print(r)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "plugins")})
    assert "ok" in out.stdout, out.stdout + out.stderr


def test_a_queue_no_worker_serves_is_refused_before_anything_runs(api):
    """Site 2's only worker stops consuming its queue: a pg-primary2 PITR is refused at validate_params."""
    node = f"worker-c@{os.environ['LAB_NET']}"
    celery_control("cancel_consumer", "barman-lab2", node)
    try:
        incident = f"INC-NOQ-{int(time.time())}"
        run_id = incident_run_id("dr_pitr", incident)
        api.trigger("dr_pitr", {"server": "pg-primary2", "target_immediate": True, "plan_only": True,
                                "incident_id": incident}, run_id=run_id)
        final = api.wait("dr_pitr", run_id, timeout=300)
    finally:
        celery_control("add_consumer", "barman-lab2", node)
    states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
    assert final["state"] == "failed", states
    assert states["validate_params"] == "failed"
    assert states["resolve_target"] in ("upstream_failed", None), states
    refused = [e for e in audit(run_id) if e["task_id"] == "validate_params" and e["outcome"] in ("refused", "failed")]
    assert refused, audit(run_id)
    text = str(refused[0]["details"])
    assert "no live Celery worker serves queue(s) barman-lab2" in text and "airflow celery worker -q barman-lab2" in text


def test_an_unreachable_broker_is_a_clear_error():
    """The check validate_params runs, against a broker URL where nothing listens (a real connection refused)."""
    lab_net = os.environ["LAB_NET"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "plugins"),
           "AIRFLOW__CELERY__BROKER_URL": f"redis://:secret-not-shown@{lab_net}.1:1/0"}
    code = ("from barman_dr.routing import require_served\n"
            "try:\n    require_served(['default'], timeout=2)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         check=True).stdout
    assert "QueueNotServedError the Celery broker" in out, out
    assert f"{lab_net}.1:1/0" in out and "cannot be reached" in out and "Start Redis" in out
    assert "secret-not-shown" not in out
