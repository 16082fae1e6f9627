"""dr_daily_verification against the real lab: OK when healthy, CRITICAL (with the hint) when receive-wal is stopped."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from pitr_support import run_dag, sql, xcom

pytestmark = pytest.mark.integration

DAG_ID = "dr_daily_verification"


def barman(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*shlex.split(os.environ["LAB_BARMAN"]), *args], check=check, capture_output=True,
                          text=True, timeout=120)


def ensure_pools() -> None:
    """The scheduler needs the barman host pools (dag.test ignores pools; a real deployment must create them)."""
    from airflow.models.pool import Pool

    from barman_dr.fleet import pool_slots

    for name, slots in pool_slots().items():
        Pool.create_or_update_pool(name, slots, "barman-dr: concurrent barman commands on this host",
                                   include_deferred=False)


def wait_streaming(timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        barman("cron", check=False)
        out = barman("-f", "json", "check", os.environ["LAB_BARMAN_SERVER"], check=False).stdout
        try:
            checks = json.loads(out)[os.environ["LAB_BARMAN_SERVER"]]
            if all(c["status"] == "OK" for c in checks.values()):
                return
        except (ValueError, KeyError):
            pass
        time.sleep(2)
    raise AssertionError("barman check did not become OK again")


def report_of(run_id: str) -> dict:
    from barman_dr.fleet import servers_by_pool

    pool = sorted(servers_by_pool())[0]
    return xcom(DAG_ID, run_id, f"verify__{pool}")


def test_healthy_lab_is_ok():
    ensure_pools()
    wait_streaming()
    state, run_id, states = run_dag(DAG_ID, {})
    rep = report_of(run_id)
    assert rep["server"] == "pg-primary"
    assert rep["status"] == "OK", rep["reasons"]
    assert state == "success", states
    checks = {f["check"] for f in rep["findings"]}
    assert {"backup_freshness", "wal_continuity", "wal_archive_lag", "receive_wal", "replication_slot",
            "standby.pg-standby", "disk_usage"} <= checks
    rows = sql("LAB_AUDIT_DSN", "SELECT outcome FROM audit.events WHERE run_id = %s AND action = 'verify_report'",
               (run_id,))
    assert rows == [("ok",)]
    summary = sql("LAB_AUDIT_DSN", "SELECT outcome FROM audit.events WHERE run_id = %s AND action = 'verify_summary'",
                  (run_id,))
    assert summary == [("ok",)]


def test_receive_wal_stopped_is_critical_with_hint():
    paused = Path(os.environ["LAB_DIR"], "run", "barman-cron.paused")
    paused.touch()
    try:
        time.sleep(1)
        barman("receive-wal", "--stop", os.environ["LAB_BARMAN_SERVER"], check=False)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "receive-wal" in barman(
                "list-processes", os.environ["LAB_BARMAN_SERVER"], check=False).stdout:
            time.sleep(1)
        state, run_id, states = run_dag(DAG_ID, {})
        rep = report_of(run_id)
        assert rep["status"] == "CRITICAL"
        by = {f["check"]: f for f in rep["findings"]}
        assert by["receive_wal"]["status"] == "CRITICAL"
        assert "barman cron" in by["receive_wal"]["hint"]
        assert by["barman_check.receive_wal_running"]["status"] == "CRITICAL"
        # the run fails through the summary, while the per-server report itself succeeded
        assert state == "failed"
        assert states["summary"] == "failed"
        assert [v for k, v in states.items() if k.startswith("verify__")] == ["success"]
        notified = sql("LAB_AUDIT_DSN", "SELECT count(*) FROM audit.events WHERE run_id = %s AND action = 'notify'",
                       (run_id,))
        assert notified[0][0] >= 1
    finally:
        paused.unlink(missing_ok=True)
        barman("cron", check=False)
        wait_streaming()
