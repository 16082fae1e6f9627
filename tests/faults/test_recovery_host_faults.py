"""Issue 18, on the recovery host: PostgreSQL SIGKILLed mid-recovery, and the staging filesystem filling up.

* PostgreSQL is SIGKILLed while it replays WAL: the staging copy's private postmaster
  (staged), and the recovered server in `start_recovery` (unstaged). The try fails on the
  exited postmaster, the retry starts it again, recovery resumes from its last restart
  point and stops at the same proven target: the run converges, nothing is lost.
* The staging filesystem fills up during the copy (a real 1 GiB filesystem of its own
  under pg-primary2, filled by "another writer"): the run fails before the freeze, names
  the shortfall, removes its partial copy, and the live server keeps serving.
"""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from include.lab import seed_scenario
from tests.fault_support import FillWhenStaging, KillPostmasterOnStart, barman_bandwidth_limit
from tests.pitr_support import audit, counts, pgbouncer_paused, run_dag, sql

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LAB = Path(os.environ.get("LAB_DIR", "."))
DATA = LAB / "pg" / "pg-primary" / "data"
EXPECTED = {"orders_total": 10500, "orders_completed": 7465}


def details(events: list[dict], action: str, outcome: str) -> list[dict]:
    return [json.loads(e["details"] or "{}") for e in events if e["action"] == action and e["outcome"] == outcome]


@pytest.mark.parametrize("where", ["staging_replay", "start_recovery"])
def test_postgres_killed_during_recovery_the_retry_converges(where):
    scenario = seed_scenario.play()
    staged = where == "staging_replay"
    task = "stage_restore" if staged else "start_recovery"
    killer = KillPostmasterOnStart(f"{DATA}.staged-[0-9a-f]*[0-9a-f]" if staged else str(DATA))
    state, run_id, tasks = run_dag(
        "dr_pitr", {"server": "pg-primary", "target_time": scenario.good_state, "expected": EXPECTED,
                    "incident_id": f"INC-PGKILL-{where}", "confirm": "PITR pg-primary", "staged_restore": staged},
        before={task: killer})
    assert killer.error is None, killer.error
    assert killer.killed, "the postmaster was never killed"
    assert state == "success", tasks
    assert counts() == EXPECTED
    assert not pgbouncer_paused()
    events = audit(run_id)
    failed = details(events, task, "failed")
    assert failed and ("stopped during recovery" in failed[0]["error"] or "exited" in failed[0]["error"]), failed
    assert details(events, "verify_target", "ok")  # the exact point, proven after the second start
    moved = details(events, "move_aside", "ok")[0]["moved_to"]
    assert Path(moved, "PG_VERSION").exists()


def test_staging_filesystem_fills_up_during_the_copy():
    mount = LAB / "pg" / "pg-primary2"
    if not os.path.ismount(mount):
        pytest.skip("pg-primary2 has no filesystem of its own in this lab (built before it, or no mount allowed)")
    before = counts("LAB_PRIMARY2_DSN")
    target = datetime.now(UTC).isoformat()
    time.sleep(1.1)
    sql("LAB_PRIMARY2_DSN", "INSERT INTO critical_orders (order_id, customer_id, amount, status) "
                            "SELECT coalesce(max(order_id), 0) + 1, 1, 1, 'pending' FROM critical_orders")
    after_damage = counts("LAB_PRIMARY2_DSN")
    filler = FillWhenStaging(mount)
    try:
        with barman_bandwidth_limit(600, server="pg-primary2"):
            state, run_id, tasks = run_dag(
                "dr_pitr", {"server": "pg-primary2", "target_time": target, "incident_id": "INC-ENOSPC",
                            "confirm": "PITR pg-primary2"}, before={"stage_restore": filler})
    finally:
        filler.remove()
    assert filler.error is None, filler.error
    assert filler.filled, "the filesystem was never filled"
    assert state == "failed", tasks
    assert tasks["stage_restore"] == "failed" and tasks["freeze_app"] == "upstream_failed", tasks
    events = audit(run_id)
    refused = details(events, "stage_restore", "refused")
    assert refused, [e for e in events if e["action"] == "stage_restore"]
    error = refused[0]["error"]
    assert "filled up during the staged restore" in error and "shortfall of" in error and "MiB" in error, error
    assert "never frozen" in error and str(mount) in error
    removed = details(events, "staging_removed", "info")
    assert removed and any(".staged-" in p for p in removed[0]["removed"]), removed
    assert not list(mount.glob("data.staged-*[0-9a-f]")) and not list(mount.glob("data.staged-*-wal"))
    assert not details(events, "freeze_app", "ok") and not details(events, "stop_postgres", "ok")
    assert counts("LAB_PRIMARY2_DSN") == after_damage != before  # the live server was never touched
