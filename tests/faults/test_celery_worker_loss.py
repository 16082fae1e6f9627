"""Issue 15: the Celery worker running a PITR's copy is lost (SIGKILL of the worker and all it started).

On the Celery lab (`make test`'s Celery phase), through the real scheduler and REST API: the
worker that runs `stage_restore` (staged) or `barman_restore` (unstaged) is SIGKILLed while
the copy runs. `on_kill` cannot run. The scheduler notices the missing heartbeats
(task_instance_heartbeat_timeout), fails the try and retries it; the retry goes to the same
queue and runs on the site's other live worker, which finds the lost try's remote job and
cleans up after it or attaches to it. The run converges to the seed's counts, nothing lost.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path

import pytest

from barman_dr.surfaces.api_client import incident_run_id
from include.lab import seed_scenario
from tests.fault_support import barman_bandwidth_limit, kill_celery_worker, restart_celery_workers, wait_for
from tests.pitr_support import audit, counts, pgbouncer_paused

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.celery_lab]

LAB = Path(os.environ.get("LAB_DIR", "."))
DATA = LAB / "pg" / "pg-primary" / "data"
EXPECTED = {"orders_total": 10500, "orders_completed": 7465}
CASES = {"stage_restore": True, "barman_restore": False}  # the copying task -> staged_restore


@pytest.fixture
def workers_back():
    """Whatever happens, the lost worker is started again afterwards (later suites need every worker)."""
    yield
    r = restart_celery_workers()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.parametrize("task", list(CASES))
def test_worker_lost_mid_copy_the_retry_runs_on_a_live_worker(api, inventory, task, workers_back):
    staged = CASES[task]
    import time

    # a staging directory left by an earlier run would look like this run's copy
    assert not [p for p in glob.glob(f"{DATA}.staged-*") if not p.endswith("-run")]
    scenario = seed_scenario.play()
    incident = f"INC-WLOSS-{task}-{int(time.time())}"
    run_id = incident_run_id("dr_pitr", incident)
    conf = {"server": "pg-primary", "target_time": scenario.good_state, "expected": EXPECTED,
            "confirm": "PITR pg-primary", "staged_restore": staged, "incident_id": incident}
    lost: dict = {}
    with barman_bandwidth_limit(1500):  # ~48 MB at 1.5 MB/s: half a minute of copying to interrupt
        api.trigger("dr_pitr", conf, run_id=run_id)

        def copying() -> bool:
            tis = {t["task_id"]: t for t in api.task_instances("dr_pitr", run_id)}
            assert "failed" not in {t["state"] for t in tis.values()}, tis
            ti = tis.get(task) or {}
            if ti.get("state") != "running" or not ti.get("hostname"):
                return False
            where = glob.glob(f"{DATA}.staged-*/base") if staged else [str(DATA / "base")]
            if any(Path(p).is_dir() for p in where):
                lost.update(ti)
                return True
            return False

        wait_for(copying, f"{task} to be copying", timeout=600, every=0.2)
        victim = lost["hostname"]
        assert victim in {"worker-b", "worker-c"}  # a worker beside pg-primary's barman host
        killed = kill_celery_worker(victim)
        assert len(killed) >= 3, killed  # the worker, its pool process, the task supervisor (and the task)
    final = api.wait("dr_pitr", run_id, timeout=900)
    tis = {t["task_id"]: t for t in api.task_instances("dr_pitr", run_id)}
    assert final["state"] == "success", {k: v["state"] for k, v in tis.items()}
    assert counts() == EXPECTED
    assert not pgbouncer_paused()
    retry = tis[task]
    assert retry["try_number"] > lost["try_number"]
    # the retry ran on the site's other worker, still on the site's queue
    assert retry["queue"] == inventory.queue_of("pg-primary")
    assert retry["hostname"] != victim and retry["hostname"] in {"worker-b", "worker-c"}, retry
    events = audit(run_id)
    # the retry recorded the try that died without an outcome, and the cause
    interrupted = [json.loads(e["details"] or "{}") for e in events
                   if e["task_id"] == task and e["outcome"] == "warning"]
    interrupted = [d for d in interrupted if d.get("interrupted_try")]
    assert interrupted and "worker or the scheduler was lost" in interrupted[0]["cause"], events
    moved = [json.loads(e["details"] or "{}") for e in events if e["action"] == "move_aside" and e["outcome"] == "ok"]
    assert Path(moved[0]["moved_to"], "PG_VERSION").exists()  # the original is kept
    if staged:
        left = [p for p in glob.glob(f"{DATA}.staged-*") if not p.endswith("-run")]
        assert not left, left  # no staging copy left behind
    # nothing of the lost try's remote job still runs on the barman host
    assert not restore_processes(), restore_processes()


def restore_processes() -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"barman.* restore .*{DATA}"], capture_output=True, text=True,
                         check=False).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]
