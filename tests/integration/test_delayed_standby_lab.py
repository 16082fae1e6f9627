"""The lab's delayed standby (issue 17): built as the inventory says, verified, reported when it falls behind.

pg-delayed is a second PostgreSQL on pg-standby's host that applies WAL `delayed` late and
falls back to Barman's archive through barman-wal-restore (get-wal only, over SSH).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import psycopg2
import pytest
from pitr_support import run_dag
from scheduled_support import temp_inventory, xcom_for

pytestmark = pytest.mark.integration

DAG_ID = "dr_daily_verification"


def delayed_sql(query: str) -> list[tuple]:
    conn = psycopg2.connect(os.environ["LAB_DELAYED_DSN"])
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(query)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def commit_on_primary(seconds: float) -> None:
    """The app keeps writing: one commit a second on the primary (WAL the delayed standby holds back)."""
    conn = psycopg2.connect(os.environ["LAB_PRIMARY_DSN"])
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE IF NOT EXISTS delayed_probe (at timestamptz DEFAULT now())")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                cur.execute("INSERT INTO delayed_probe DEFAULT VALUES")
                time.sleep(1)
    finally:
        conn.close()


def report_of(run_id: str) -> dict:
    from barman_dr.fleet import pool_of

    return xcom_for(DAG_ID, run_id, f"verify__{pool_of('pg-primary')}", "pg-primary")


def test_the_delayed_standby_is_what_the_inventory_says(inventory):
    sb = inventory.server("pg-primary").standby("pg-delayed")
    (row,) = delayed_sql("SELECT pg_is_in_recovery(), current_setting('recovery_min_apply_delay'), "
                         "current_setting('restore_command'), (SELECT status FROM pg_stat_wal_receiver)")
    assert row[0] is True and row[1] == f"{sb.apply_delay_s // 60}min" and row[3] == "streaming"
    assert "barman-wal-restore" in row[2]
    # its fallback to Barman's archive works from the db host: get-wal of a segment Barman archived
    show = subprocess.run([*os.environ["LAB_BARMAN"].split(), "-f", "json", "show-backup", "pg-primary", "latest"],
                          capture_output=True, text=True, check=True).stdout
    archived = json.loads(show)["pg-primary"]["base_backup_information"]["begin_wal"]
    restore = sb.restore_command.split(" %f")[0].split()
    ok = subprocess.run(["runuser", "-u", "postgres", "--", *restore, archived, "/dev/null"], capture_output=True,
                        text=True, check=False, timeout=120)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(["runuser", "-u", "postgres", "--", "ssh", "-F",
                              os.path.join(os.environ["LAB_DIR"], "ssh", "postgres_ssh_config"), "barman-lab",
                              "barman", "delete", "pg-primary", "oldest"], capture_output=True, text=True,
                             check=False, timeout=60)
    assert refused.returncode != 0 and "only `barman get-wal`" in refused.stderr  # the key does get-wal only
    other = subprocess.run(["runuser", "-u", "postgres", "--", "ssh", "-F",
                            os.path.join(os.environ["LAB_DIR"], "ssh", "postgres_ssh_config"), "barman-lab",
                            "barman", "get-wal", "pg-primary2", archived], capture_output=True, text=True,
                           check=False, timeout=60)
    # and only the WAL of the servers the key names (pg-primary; the benchmark cluster through its own Barman)
    assert other.returncode != 0 and "of pg-primary, pg-bench is allowed" in other.stderr


def test_the_verification_reports_its_window_and_when_it_falls_behind(inventory, tmp_path, monkeypatch):
    """A 5 s delay and 5 s tolerance for this test, replay paused while the app writes: fallen behind."""
    _state, run_id, _ = run_dag(DAG_ID, {})
    finding = next(f for f in report_of(run_id)["findings"] if f["check"] == "delayed.pg-delayed")
    assert finding["status"] == "OK" and "delayed standby pg-delayed" in finding["reason"], finding

    def short(doc: dict) -> None:
        sb = next(s for s in doc["servers"]["pg-primary"]["standbys"] if s["name"] == "pg-delayed")
        sb.update(delayed="5s", delay_tolerance="5s")

    delayed_sql("ALTER SYSTEM SET recovery_min_apply_delay = '5s'")
    delayed_sql("SELECT pg_reload_conf()")
    try:
        commit_on_primary(8)  # within its window now
        delayed_sql("SELECT pg_wal_replay_pause()")
        commit_on_primary(14)
        temp_inventory(tmp_path, monkeypatch, short)
        _state, run_id, _ = run_dag(DAG_ID, {})
        report = report_of(run_id)
        finding = next(f for f in report["findings"] if f["check"] == "delayed.pg-delayed")
        assert finding["status"] == "WARNING" and "fallen behind its window" in finding["reason"], finding
        assert "(replay paused)" in finding["reason"] and "pg_wal_replay_resume" in finding["hint"]
        window = report["facts"]["delayed_standbys"][0]
        assert window["standby"] == "pg-delayed" and window["protected_window_s"] > 10 and window["paused"]
    finally:
        delayed_sql("SELECT pg_wal_replay_resume()")
        delay = inventory.server("pg-primary").standby("pg-delayed").apply_delay_s
        delayed_sql(f"ALTER SYSTEM SET recovery_min_apply_delay = '{delay}s'")  # the inventory's, as rebuilt
        delayed_sql("SELECT pg_reload_conf()")
        conn = psycopg2.connect(os.environ["LAB_PRIMARY_DSN"])
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS delayed_probe")
        conn.close()


def test_a_plan_only_run_pauses_the_delayed_replay_and_resumes_it_when_it_ends():
    """As soon as the request is valid the window stops sliding; the run's end lets it go (issue 17)."""
    from datetime import UTC, datetime, timedelta

    from pitr_support import audit

    delayed_sql("SELECT pg_wal_replay_resume()")
    commit_on_primary(2)
    target = (datetime.now(UTC) - timedelta(seconds=1)).isoformat(timespec="seconds")
    state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", "target_time": target, "plan_only": True,
                                               "incident_id": "INC-DELAYED-PLAN"})
    assert state == "success", tasks
    assert tasks["approve"] == "skipped" and tasks["resume_delayed_replay"] == "success", tasks
    events = audit(run_id)
    paused = [e for e in events if e["action"] == "delayed_replay_paused" and e["outcome"] == "ok"]
    assert len(paused) == 1 and paused[0]["task_id"] == "resolve_target"
    intent = [e for e in events if e["action"] == "delayed_replay_paused" and e["outcome"] == "started"]
    assert len(intent) == 1 and '"already_paused": false' in intent[0]["details"]  # recorded before pausing
    assert '"paused": true' in paused[0]["details"] and '"replay_lsn": "' in paused[0]["details"]
    plan = next(e for e in events if e["action"] == "plan" and e["outcome"] == "planned")
    assert "delayed standby pg-delayed: replay paused at" in plan["details"]
    # the damage (a target a second ago) is younger than its delay: the plan says it could serve it
    assert "delayed standby pg-delayed COULD serve this target" in plan["details"], plan["details"][-3000:]
    resumed = [e for e in events if e["action"] == "resume_delayed_replay" and e["outcome"] == "ok"]
    assert resumed and '"standby": "pg-delayed"' in resumed[0]["details"]
    # the run is over: pg-delayed applies WAL again
    assert delayed_sql("SELECT pg_is_wal_replay_paused()") == [(False,)]


def test_a_pause_set_by_hand_is_not_undone_by_a_run():
    """Only what the run paused is resumed: a DBA's own pause (forensics) stays."""
    from datetime import UTC, datetime, timedelta

    delayed_sql("SELECT pg_wal_replay_pause()")
    try:
        target = (datetime.now(UTC) - timedelta(seconds=1)).isoformat(timespec="seconds")
        state, run_id, tasks = run_dag("dr_pitr", {"server": "pg-primary", "target_time": target, "plan_only": True,
                                                   "incident_id": "INC-DELAYED-HAND"})
        assert state == "success", tasks
        from pitr_support import audit

        paused = [e for e in audit(run_id) if e["action"] == "delayed_replay_paused" and e["outcome"] == "ok"]
        assert len(paused) == 1 and '"already_paused": true' in paused[0]["details"]
        plan = next(e for e in audit(run_id) if e["action"] == "plan" and e["outcome"] == "planned")
        assert "it was paused already (by hand or another run): left paused" in plan["details"]
        assert delayed_sql("SELECT pg_is_wal_replay_paused()") == [(True,)]  # still the DBA's pause
    finally:
        delayed_sql("SELECT pg_wal_replay_resume()")
