"""Issue 18: Airflow itself fails in the middle of a recovery, on the real lab, through the REST API.

The scheduler and every worker (its whole session: LocalExecutor workers, task
supervisors, task processes) are SIGKILLed at a point of a running `dr_pitr`; the API
server keeps running. The lab is then brought back the way an operator would, with
`make lab-up`, which must leave every server the run owns alone (it holds the server's
lock). The restarted scheduler resets the orphaned task instance, the retry picks up
what the lost try left (a stopped server, a moved directory, a restore job still running
on the barman host, a renamed staging copy) and the run converges: the exact target is
proven, the counts are the seed's, the app is resumed, and the audit trail shows the lost
try. Nothing is lost: the moved-aside original is kept and the cluster is the same one
(same system identifier), never a fresh initdb.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from barman_dr.surfaces.api_client import incident_run_id
from include.lab import seed_scenario
from tests.fault_support import barman_bandwidth_limit, kill_airflow, make_lab_up, wait_for
from tests.pitr_support import audit, counts, one, pgbouncer_paused

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

LAB = Path(os.environ.get("LAB_DIR", "."))
DATA = LAB / "pg" / "pg-primary" / "data"
EXPECTED = {"orders_total": 10500, "orders_completed": 7465}

# point -> (staged_restore, task, the state it must have reached when the crash lands)
CRASH_POINTS = {
    "after_stop_postgres": (False, "stop_postgres", "success"),
    "during_unstaged_restore": (False, "barman_restore", "running"),
    "after_staged_rename": (True, "barman_restore", "success"),
    "during_stage_restore": (True, "stage_restore", "running"),
}


def system_identifier() -> int:
    return int(one("LAB_PRIMARY_DSN", "SELECT system_identifier FROM pg_control_system()"))


def details(events: list[dict], action: str, outcome: str) -> list[dict]:
    return [json.loads(e["details"] or "{}") for e in events if e["action"] == action and e["outcome"] == outcome]


def staging_postmasters() -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"postgres -D {DATA}.staged-"], capture_output=True, text=True,
                         check=False).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture
def lab_back_on_failure(api):
    """If a crash test fails midway: the scheduler back, its run ended, the app resumed (later suites need them)."""
    runs: list[str] = []
    yield runs
    if not runs:
        return
    run_id = runs[0]
    with contextlib.suppress(Exception):
        if api.get_run("dr_pitr", run_id).get("state") not in ("success", "failed"):
            make_lab_up()
            try:
                api.wait("dr_pitr", run_id, timeout=600)
            except TimeoutError:
                api._call("PATCH", f"/api/v2/dags/dr_pitr/dagRuns/{run_id}", {"state": "failed"})
    with contextlib.suppress(Exception):
        if pgbouncer_paused():
            from barman_dr.inventory import load_inventory
            from barman_dr.safety.appfreeze import PgBouncerAdmin

            PgBouncerAdmin(load_inventory().server("pg-primary").app_freeze).resume()


@pytest.mark.parametrize("point", list(CRASH_POINTS))
def test_scheduler_and_workers_killed_mid_pitr_the_run_converges(api, point, lab_back_on_failure):
    staged, task, reached_state = CRASH_POINTS[point]
    scenario = seed_scenario.play()
    sysid = system_identifier()
    incident = f"INC-CRASH-{point}-{int(time.time())}"
    run_id = incident_run_id("dr_pitr", incident)
    conf = {"server": "pg-primary", "target_time": scenario.good_state, "expected": EXPECTED,
            "confirm": "PITR pg-primary", "staged_restore": staged, "incident_id": incident}
    copying = task in ("barman_restore", "stage_restore") and reached_state == "running"
    # a copy slow enough to be interrupted (~48 MB at 1.5 MB/s); the crash points after a step need no throttle
    throttle = barman_bandwidth_limit(1500) if copying else contextlib.nullcontext()
    with throttle:
        api.trigger("dr_pitr", conf, run_id=run_id)
        lab_back_on_failure.append(run_id)

        def reached() -> bool:
            states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
            assert "failed" not in states.values(), states
            if states.get(task) != reached_state:
                return False
            if not copying:
                return True
            where = glob.glob(f"{DATA}.staged-*/base") if staged else [str(DATA / "base")]
            return any(Path(p).is_dir() for p in where)

        wait_for(reached, f"{task} to be {reached_state}", timeout=600, every=0.2)
        killed = kill_airflow("scheduler")
        assert len(killed) >= 2, killed  # the scheduler and at least its executor's worker
        frozen = pgbouncer_paused()
        assert frozen == (point != "during_stage_restore")  # the staged copy runs before the freeze
        up = make_lab_up()
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    # the run holds the lock: `make lab-up` initialised, started and reconfigured nothing of pg-primary
    assert "pg-primary: left alone, owned by a DR run" in up.stdout, up.stdout[-3000:]
    assert "pgbouncer: left alone" in up.stdout
    assert pgbouncer_paused() == frozen, "lab-up changed the app's freeze"
    final = api.wait("dr_pitr", run_id, timeout=900)
    states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
    assert final["state"] == "success", states
    assert counts() == EXPECTED
    assert not pgbouncer_paused()
    assert system_identifier() == sysid  # the recovered cluster, not a new one
    events = audit(run_id)
    moved = details(events, "move_aside", "ok")[0]["moved_to"]
    assert Path(moved, "PG_VERSION").exists()  # the original is kept
    assert details(events, "verify_target", "ok")
    lost = [d for d in details(events, task, "warning") if d.get("interrupted_try")]
    if reached_state == "running":
        # the crash is in the audit trail: the next try recorded the one that died without an outcome
        assert lost and "worker or the scheduler was lost" in lost[0]["cause"], events
    lab_back_on_failure.clear()  # converged: nothing to clean up
    if staged:
        # the retry left no staging copy or staging postmaster behind
        left = [p for p in glob.glob(f"{DATA}.staged-*") if not p.endswith("-run")]  # -run: the staging log
        assert not left, left
        assert not staging_postmasters()
