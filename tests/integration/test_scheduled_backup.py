"""dr_weekly_full_backup against the real lab: a new DONE backup, check-backup, verify-backup, retention, Asset."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest
from pitr_support import run_dag, sql
from scheduled_support import temp_inventory, xcom_for

pytestmark = pytest.mark.integration

DAG_ID = "dr_weekly_full_backup"


def done_backups(server: str | None = None) -> list[str]:
    server = server or os.environ["LAB_BARMAN_SERVER"]
    out = subprocess.run([*shlex.split(os.environ["LAB_BARMAN"]), "-f", "json", "list-backups",
                          server], check=True, capture_output=True, text=True).stdout
    return sorted(b["backup_id"] for b in json.loads(out)[server] if b["status"] == "DONE")


def test_weekly_backup_creates_checked_verified_backup(inventory):
    from barman_dr.fleet import pool_of

    before = done_backups()
    before2 = done_backups("pg-primary2")
    state, run_id, states = run_dag(DAG_ID, {})
    assert state == "success", states
    pool = pool_of("pg-primary")
    res = xcom_for(DAG_ID, run_id, f"backup__{pool}", "pg-primary")
    # mapping is real: the second server got its own new, checked backup in the same run
    res2 = xcom_for(DAG_ID, run_id, f"backup__{pool_of('pg-primary2')}", "pg-primary2")
    assert res2["backup_id"] in done_backups("pg-primary2") and res2["backup_id"] not in before2
    assert res2["check_backup"] == "OK" and res2["verify_backup"]["verified"] is True
    after = done_backups()
    assert res["backup_id"] in after and res["backup_id"] not in before
    assert res["check_backup"] == "OK"
    assert res["verify_backup"]["verified"] is True  # backup_method postgres: pg_verifybackup ran
    srv = inventory.server("pg-primary")
    assert len(after) >= srv.minimum_redundancy
    assert len(res["retention"]["remaining"]) >= srv.minimum_redundancy
    assert set(res["retention"]["deleted"]) <= set(res["retention"]["obsolete"])
    assert res["job"]["job_id"].startswith("weekly-pg-primary-")
    actions = [a for (a,) in sql("LAB_AUDIT_DSN", "SELECT action FROM audit.events WHERE run_id = %s AND outcome IN "
                                                  "('ok', 'info') ORDER BY event_id", (run_id,))]
    for a in ("backup_taken", "check_backup", "verify_backup", "retention", "backup", "backup_summary"):
        assert a in actions
    # the Asset "a verified backup of pg-primary exists"
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        n = (session.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
             .filter(AssetModel.uri == "barman://pg-primary/verified-backup", AssetEvent.source_run_id == run_id).count())
    assert n == 1


def test_retried_backup_attaches_to_the_same_job(inventory):
    """A second attempt with the same job id reads the finished job instead of starting a second backup."""
    from barman_dr.operators.scheduled import WeeklyBackupOperator

    op = WeeklyBackupOperator(task_id="t", server="pg-primary")
    before = done_backups()
    job_id = "weekly-pg-primary-attachtest" + os.urandom(3).hex()
    first = op._run_backup(job_id)
    mid = done_backups()
    second = op._run_backup(job_id)
    assert len(mid) == len(before) + 1
    assert done_backups() == mid  # no second backup
    assert first["attached_to_existing_job"] is False
    assert second["attached_to_existing_job"] is True
    assert second["stdout_tail"] == first["stdout_tail"]


def test_retention_deletes_obsolete_backup_but_keeps_minimum_redundancy(tmp_path, monkeypatch):
    """A test inventory with a zero-day recovery window for pg-primary2 only (the PITR tests' server untouched).

    Every backup but the newest then falls out of the window: the weekly run deletes the
    oldest obsolete ones and stops at minimum_redundancy (2).
    """
    server = "pg-primary2"

    def edit(doc: dict) -> None:
        doc["servers"] = {server: doc["servers"][server]}
        doc["servers"][server]["retention"] = {"recovery_window_days": 0, "minimum_redundancy": 2}

    temp_inventory(tmp_path, monkeypatch, edit)
    from barman_dr.fleet import servers_by_pool

    assert servers_by_pool() == {"barman_barman_lab2": [server]}
    before = done_backups(server)
    assert len(before) >= 2
    state, run_id, states = run_dag(DAG_ID, {})
    assert state == "success", states
    res = xcom_for(DAG_ID, run_id, "backup__barman_barman_lab2", server)
    ret = res["retention"]
    after = done_backups(server)
    assert ret["deleted"], ret
    assert set(ret["deleted"]) <= set(before)              # only older backups, never the new one
    assert res["backup_id"] in after and res["backup_id"] not in ret["deleted"]
    assert not set(ret["deleted"]) & set(after)
    assert len(after) == 2 == len(ret["remaining"])        # exactly minimum_redundancy left
    assert ret["kept_for_redundancy"]                       # an obsolete backup kept for redundancy
    assert len(before) + 1 - len(ret["deleted"]) == 2
