"""dr_daily_verification: every server of the inventory checked daily, OK / WARNING / CRITICAL with reasons.

One task per barman host (`verify__{pool}`, in that host's pool and on its Celery queue):
Barman runs once for all the host's servers (`check all`, `list-backups all`, `show-servers
all`, `replication-status all`), one SSH exec reads every server's WAL catalogue and files,
and each server is evaluated in-process: `barman check` with hints, backup freshness, WAL
continuity from the oldest kept backup and archive lag, receive-wal and slot, standby lag,
disk usage of the backup directory, orphaned staging copies; thresholds from the
inventory. Each server's report goes to the audit trail and XCom (the task returns the
list). `summary` runs whatever happened (all_done) and fails the run when any server is
CRITICAL (or has no report); DrNotifier writes the failure to the audit trail (and mails
when `smtp_default` exists). Logic: plugins/barman_dr/operators/verify_host.py and
plugins/barman_dr/fleet_verification.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from barman_dr.fleet import queue_by_pool, schedule_for, servers_by_pool
from barman_dr.operators.scheduled import FleetSummaryOperator
from barman_dr.operators.verify_host import BarmanHostVerificationOperator
from barman_dr.surfaces.notifications import DrNotifier

POOLS = servers_by_pool()
QUEUES = queue_by_pool()

with DAG(
    dag_id="dr_daily_verification",
    description="Daily verification of every Barman server: check, freshness, WAL continuity, streaming, disk",
    schedule=schedule_for("dr_daily_verification"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["dr", "barman", "verification", "scheduled"],
    doc_md=__doc__,
    default_args={"owner": "dba-oncall", "retries": 1, "retry_delay": timedelta(seconds=30),
                  "on_failure_callback": DrNotifier()},
) as dag:
    verify = [BarmanHostVerificationOperator(task_id=f"verify__{pool}", servers=servers, pool=pool,
                                             queue=QUEUES.get(pool, "default"),
                                             execution_timeout=timedelta(minutes=20))
              for pool, servers in sorted(POOLS.items())]
    summary = FleetSummaryOperator(task_id="summary", servers=sorted(s for v in POOLS.values() for s in v),
                                   report_task_ids=[t.task_id for t in verify], trigger_rule="all_done", retries=0)
    verify >> summary
