"""dr_weekly_full_backup: a full Barman backup of every server, checked, verified, retention applied.

One mapped task per server (bounded by its barman host's pool): `barman backup --wait` as
a detached job on the barman host (a retry attaches to the same job: no second
concurrent backup), `check-backup`, `verify-backup` (pg_verifybackup; backup_method
postgres only), then the retention policy's OBSOLETE backups are deleted, never below
minimum redundancy. A successful server emits the Asset `barman://<server>/verified-backup`
(through the AssetAlias `barman-verified-backups`). Logic: plugins/barman_dr/operators/scheduled.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, AssetAlias

from barman_dr.fleet import queue_by_pool, schedule_for, servers_by_pool
from barman_dr.operators.scheduled import VERIFIED_BACKUP_ALIAS, FleetSummaryOperator, WeeklyBackupOperator
from barman_dr.surfaces.notifications import DrNotifier

POOLS = servers_by_pool()
#: each barman host's tasks run on the Celery workers beside it (inventory `barman_hosts.<h>.queue`)
QUEUES = queue_by_pool()

with DAG(
    dag_id="dr_weekly_full_backup",
    description="Weekly full backup of every Barman server with check-backup, verify-backup and retention",
    schedule=schedule_for("dr_weekly_full_backup"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["dr", "barman", "backup", "scheduled"],
    doc_md=__doc__,
    default_args={"owner": "dba-oncall", "retries": 2, "retry_delay": timedelta(minutes=1),
                  "on_failure_callback": DrNotifier()},
) as dag:
    ids = []
    for pool, servers in sorted(POOLS.items()):
        WeeklyBackupOperator.partial(task_id=f"backup__{pool}", pool=pool, queue=QUEUES.get(pool, "default"),
                                     outlets=[AssetAlias(VERIFIED_BACKUP_ALIAS)],
                                     map_index_template="{{ task.server }}").expand(server=servers)
        ids.append(f"backup__{pool}")
    summary = FleetSummaryOperator(task_id="summary", servers=sorted(s for v in POOLS.values() for s in v),
                                   report_task_ids=ids, action="backup_summary", trigger_rule="all_done", retries=0)
    for task_id in ids:
        dag.get_task(task_id) >> summary
