"""dr_weekly_full_backup against the real lab: a new DONE backup, check-backup, verify-backup, retention, Asset."""

from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest
from pitr_support import run_dag, sql, xcom

pytestmark = pytest.mark.integration

DAG_ID = "dr_weekly_full_backup"


def done_backups() -> list[str]:
    out = subprocess.run([*shlex.split(os.environ["LAB_BARMAN"]), "-f", "json", "list-backups",
                          os.environ["LAB_BARMAN_SERVER"]], check=True, capture_output=True, text=True).stdout
    return sorted(b["backup_id"] for b in json.loads(out)[os.environ["LAB_BARMAN_SERVER"]] if b["status"] == "DONE")


def test_weekly_backup_creates_checked_verified_backup(inventory):
    from barman_dr.fleet import servers_by_pool

    before = done_backups()
    state, run_id, states = run_dag(DAG_ID, {})
    assert state == "success", states
    pool = sorted(servers_by_pool())[0]
    res = xcom(DAG_ID, run_id, f"backup__{pool}")
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
