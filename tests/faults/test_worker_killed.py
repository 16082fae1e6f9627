"""Fault 5: the task running `barman restore` is killed (marked failed in Airflow, as an operator would).

Through the real scheduler and API server: Airflow's supervisor terminates the task, the
operator's `on_kill` stops the restore's process group on the barman host, so nothing keeps
writing; the app stays frozen, the original data directory is kept, and a new run starts
clean and recovers the seed's data.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from barman_dr.surfaces.api_client import incident_run_id
from include.lab import seed_scenario
from tests.fault_support import barman_bandwidth_limit, wait_for
from tests.pitr_support import audit, counts, pgbouncer_paused

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DATA = Path(os.environ.get("LAB_DIR", "."), "pg", "pg-primary", "data")
EXPECTED = {"orders_total": 10500, "orders_completed": 7465}


def restore_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"restore .*{DATA}"], capture_output=True, text=True, check=False).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def test_killed_restore_task_leaves_no_orphan_and_a_new_run_recovers(api):
    scenario = seed_scenario.play()
    # the restore inside the downtime window (the riskier place to be killed); a killed
    # stage_restore is the same on_kill, before the freeze
    conf = {"server": "pg-primary", "target_time": scenario.good_state, "expected": EXPECTED,
            "confirm": "PITR pg-primary", "staged_restore": False}
    incident = f"INC-FAULT-5-{int(time.time())}"
    run_id = incident_run_id("dr_pitr", incident)
    with barman_bandwidth_limit(1500):  # ~48 MB at 1.5 MB/s: half a minute of copying to interrupt
        api.trigger("dr_pitr", {**conf, "incident_id": incident}, run_id=run_id)

        def restoring() -> bool:
            states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
            assert states.get("barman_restore") not in ("success", "failed", "upstream_failed"), states
            return states.get("barman_restore") == "running" and (DATA / "base").is_dir()

        wait_for(restoring, "barman_restore to be copying", timeout=600, every=0.5)
        assert restore_processes(), "no barman restore running on the barman host"
        api._call("PATCH", f"/api/v2/dags/dr_pitr/dagRuns/{run_id}/taskInstances/barman_restore",
                  {"new_state": "failed", "note": "fault 5: killed by the test"})
        final = api.wait("dr_pitr", run_id, timeout=600)
    assert final["state"] == "failed"
    # no orphan: the restore's process group is gone and nothing grows the destination any more
    wait_for(lambda: not restore_processes(), "the restore processes to be gone", timeout=60, every=0.5)
    size = du(DATA)
    time.sleep(3)
    assert du(DATA) == size
    assert pgbouncer_paused()  # the app never saw a half-restored server
    events = audit(run_id)
    killed = [json.loads(e["details"]) for e in events if e["action"] == "barman_restore" and e["outcome"] == "failed"
              and "task killed" in (e["details"] or "")]
    assert killed and killed[0]["job_stopped"] in ("killed", "killed-hard", "not-running"), killed
    moved = [json.loads(e["details"])["moved_to"] for e in events if e["action"] == "move_aside" and e["outcome"] == "ok"]
    assert moved and Path(moved[0], "PG_VERSION").exists()
    states = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run_id)}
    assert states["release_lock"] == "success" and states["unfreeze_app"] in ("upstream_failed", None), states

    # a new run starts clean: the half-restored directory is set aside like any data directory
    run2 = incident_run_id("dr_pitr", f"{incident}-B")
    api.trigger("dr_pitr", {**conf, "incident_id": f"{incident}-B"}, run_id=run2)
    final2 = api.wait("dr_pitr", run2, timeout=900)
    states2 = {t["task_id"]: t["state"] for t in api.task_instances("dr_pitr", run2)}
    assert final2["state"] == "success", states2
    assert counts() == EXPECTED
    assert not pgbouncer_paused()
    assert Path(moved[0], "PG_VERSION").exists()  # the first run's original is still kept
