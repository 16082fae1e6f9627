"""stage_restore's retry: a failed attempt's partial copy (its own, nothing else) is removed, then it restores.

The operator body runs against the real lab (Barman over SSH, the standby's host, the audit
DB) with a minimal task context standing in for Airflow's (XCom in a dict). The target is
the standby (`restore_to`), so the staging directory sits next to the standby's data
directory; the live standby is never touched, and the staging directory is removed after.
The copy is also replayed to the target (a private postmaster next to the running standby)
and shut down, before any freeze.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import pytest

from barman_dr.hooks.dbhost import staging_paths
from barman_dr.operators.pitr import ResolveTargetOperator, StageRestoreOperator
from barman_dr.params.pitr_request import validate_pitr_conf

pytestmark = pytest.mark.integration


class Ti:
    """What the operator uses of a TaskInstance: XCom pull/push and the audit context's ids."""

    def __init__(self, run_id: str, upstream: dict[str, Any]) -> None:
        self.dag_id, self.run_id, self.task_id, self.try_number = "dr_integration_test", run_id, "stage_restore", 2
        self.upstream, self.pushed = upstream, {}

    def xcom_pull(self, task_ids: str, key: str = "return_value") -> Any:
        return self.pushed.get(key) if task_ids == "stage_restore" else self.upstream.get(task_ids)

    def xcom_push(self, key: str, value: Any) -> None:
        self.pushed[key] = value


def test_retry_removes_only_its_own_partial_copy_then_restores(inventory, barman, standby_host, standby, unique):
    run_id = f"stage-retry-{unique}"
    tag = hashlib.sha256(f"dr_integration_test/{run_id}".encode()).hexdigest()[:10]
    staged, wal_dir = staging_paths(standby.data_directory, tag)
    backups = [b for b in barman.list_backups("pg-primary") if b.is_done]
    info = barman.show_backup("pg-primary", max(b.backup_id for b in backups))
    req = validate_pitr_conf({"server": "pg-primary", "target_immediate": True, "restore_to": standby.name,
                              "backup_id": info.backup_id}, inventory, now=datetime.now(UTC))
    ti = Ti(run_id, {"preflight": {"backup_id": info.backup_id, "backup": info.to_dict()},
                     "wal_coverage": {"wal_segments": 1, "last_wal": info.end_wal, "server_current_wal": None}})
    context = {"ti": ti, "dag": SimpleNamespace(dag_id="dr_integration_test"), "run_id": run_id}
    # the stop point, resolved in the WAL as the run's resolve_target step does (every later step reads it)
    ti.upstream["resolve_target"] = ResolveTargetOperator(task_id="resolve_target", request=req.to_dict(),
                                                          discard=False).run(context)
    job_id = f"stage-pg-primary-{tag}"
    job = f"{barman.job_dir}/{job_id}"
    # what a first attempt killed mid-copy leaves: a job record with a failed exit code, a partial copy
    barman.host.run(["sh", "-c", 'mkdir -p "$1" && echo 1 > "$1/pid" && echo 137 > "$1/rc"', "x", job])
    for d in (staged, wal_dir):
        standby_host.host.run(["sh", "-c", 'mkdir -p "$1" && echo partial > "$1/PG_VERSION"', "x", d])
    neighbour = f"{standby.data_directory}.staged-{unique[-8:]}x"  # another run's: must survive
    standby_host.prepare_directory(neighbour)
    op = StageRestoreOperator(task_id="stage_restore", request=req.to_dict())
    try:
        out = op.run(context)
        assert out["staged"] is True and out["staging_directory"] == staged and out["wal_directory"] == wal_dir
        assert out["cleaned"] == [staged, wal_dir]
        assert out["space"]["available_bytes"] >= out["space"]["needed_bytes"]
        assert ti.pushed["staging"]["staging_directory"] == staged  # recorded before anything was written
        # a fresh restore, not the partial copy: Barman's files are there, the job record of the failure is kept
        assert standby_host.path_exists(f"{staged}/global/pg_control")
        # replayed to the target before the freeze: promoted, proven, shut down cleanly
        assert not standby_host.path_exists(f"{staged}/recovery.signal")
        assert standby_host.controldata(staged).state == "shut down"
        assert out["replay"]["outcome"].startswith("promoted after") and out["replay"]["new_timeline"] >= 2
        assert standby_host.status(staged) != "running"
        assert standby_host.dir_identity(staged) == out["identity"]
        assert "--staging-wal-directory" in out["argv"] and wal_dir in out["argv"]
        listing = barman.host.run(["ls", "-1", barman.job_dir]).stdout.split()
        assert any(n.startswith(f"{job_id}.failed-") for n in listing)
        # the live standby and another run's staging directory are untouched
        assert standby_host.path_exists(neighbour)
        assert standby_host.status(standby.data_directory) == "running"
        # a second retry attaches to the finished job: nothing is removed or copied again
        again = op.run(context)
        assert again["cleaned"] == [] and again["identity"] == out["identity"] and again["space"] is None
        assert again["replay"]["outcome"] == "already"  # found replayed, proven again from the files
    finally:
        standby_host.remove_staging(standby.data_directory, staged, wal_dir)
        standby_host.host.run(["rm", "-rf", "--", neighbour], check=False)
