"""dr_daily_verification against the real lab: OK when healthy, CRITICAL (with the hint) when receive-wal is stopped."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from pitr_support import run_dag, sql, stop_wal_stream
from scheduled_support import temp_inventory, xcom_for

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


def report_of(run_id: str, server: str = "pg-primary") -> dict:
    """`server`'s report in XCom: an element of the list its barman host's task returned."""
    from barman_dr.fleet import pool_of

    return xcom_for(DAG_ID, run_id, f"verify__{pool_of(server)}", server)


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
    # the second server of the fleet (no standby) is verified in the same run, on its own
    rep2 = report_of(run_id, "pg-primary2")
    assert rep2["status"] == "OK", rep2["reasons"]
    assert {"backup_freshness", "wal_continuity", "receive_wal", "replication_slot"} <= \
        {f["check"] for f in rep2["findings"]}
    assert not any(f["check"].startswith("standby.") for f in rep2["findings"])
    rows = sql("LAB_AUDIT_DSN", "SELECT outcome, server FROM audit.events WHERE run_id = %s AND "
                                "action = 'verify_report' ORDER BY server", (run_id,))
    assert rows == [("ok", "pg-primary"), ("ok", "pg-primary2")]
    summary = sql("LAB_AUDIT_DSN", "SELECT outcome FROM audit.events WHERE run_id = %s AND action = 'verify_summary'",
                  (run_id,))
    assert summary == [("ok",)]


def test_receive_wal_stopped_is_critical_with_hint():
    paused = Path(os.environ["LAB_DIR"], "run", "barman-cron.paused")
    try:
        stop_wal_stream(os.environ["LAB_BARMAN_SERVER"])
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
        assert [v for k, v in states.items() if k.startswith("verify__")] == ["success", "success"]
        # one bad server does not hide the others: pg-primary2 still streams and reports OK
        assert report_of(run_id, "pg-primary2")["status"] == "OK"
        notified = sql("LAB_AUDIT_DSN", "SELECT count(*) FROM audit.events WHERE run_id = %s AND action = 'notify'",
                       (run_id,))
        assert notified[0][0] >= 1
    finally:
        paused.unlink(missing_ok=True)
        barman("cron", check=False)
        wait_streaming()


def _wal_dir(server: str) -> Path:
    out = barman("-f", "json", "show-server", server).stdout
    return Path(json.loads(out)[server]["wals_directory"])


def test_wal_segment_removed_from_archive_is_critical_naming_the_gap():
    """A segment file moved out of Barman's wals directory (the catalogue still lists it) is a gap.

    Only the file is moved: that is what a manual deletion or a lost disk does, and Barman's
    catalogue (`-xlog.db`) would still claim it. The continuity check lists the files too.
    """
    server = os.environ.get("LAB_BARMAN_SERVER2", "pg-primary2")
    wals = _wal_dir(server)
    backups = json.loads(barman("-f", "json", "list-backups", server).stdout)[server]
    oldest = sorted(b["backup_id"] for b in backups if b["status"] == "DONE")[0]
    begin = json.loads(barman("-f", "json", "show-backup", server, oldest).stdout)[server][
        "base_backup_information"]["begin_wal"]
    segs = sorted(p for p in wals.glob("*/*") if p.is_file() and len(p.name) == 24 and p.name[:8] == begin[:8]
                  and p.name >= begin)
    assert len(segs) >= 3, segs
    victim = segs[1]  # inside the range, never the newest: a real gap, not archive lag
    aside = Path(os.environ["LAB_DIR"], "run", f"wal-aside-{victim.name}")
    victim.rename(aside)
    try:
        state, run_id, states = run_dag(DAG_ID, {})
        rep = report_of(run_id, server)
        assert rep["status"] == "CRITICAL"
        by = {f["check"]: f for f in rep["findings"]}
        assert by["wal_continuity"]["status"] == "CRITICAL"
        assert victim.name in by["wal_continuity"]["reason"]
        assert "take a new full backup" in by["wal_continuity"]["hint"]
        assert victim.name in rep["facts"]["wal"]["catalogued_files_missing"]
        assert state == "failed" and states["summary"] == "failed"
        assert report_of(run_id, "pg-primary")["status"] == "OK"
    finally:
        aside.rename(victim)
    assert victim.exists()


def test_stale_backup_is_freshness_critical(tmp_path, monkeypatch):
    """A threshold override (test inventory via BARMAN_DR_INVENTORY) instead of waiting a week."""
    def edit(doc: dict) -> None:
        doc["servers"]["pg-primary"]["verification"]["max_backup_age_hours"] = 0.0001

    temp_inventory(tmp_path, monkeypatch, edit)
    wait_streaming()
    state, run_id, states = run_dag(DAG_ID, {})
    rep = report_of(run_id)
    by = {f["check"]: f for f in rep["findings"]}
    assert rep["status"] == "CRITICAL"
    assert by["backup_freshness"]["status"] == "CRITICAL"
    assert "max 0.0001 h" in by["backup_freshness"]["reason"]
    assert "dr_weekly_full_backup" in by["backup_freshness"]["hint"]
    assert report_of(run_id, "pg-primary2")["status"] == "OK"  # its threshold was not changed
    assert state == "failed" and states["summary"] == "failed"
