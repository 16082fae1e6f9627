"""dr_daily_verification: every server of the inventory checked daily, OK / WARNING / CRITICAL with reasons.

One mapped task per server (per barman host, bounded by that host's pool): `barman check`
with hints, backup freshness, WAL continuity from the oldest kept backup and archive lag,
receive-wal and slot, standby lag, disk usage of the backup directory; thresholds from
the inventory. Each report goes to the audit trail and XCom. `summary` runs whatever
happened (all_done) and fails the run when any server is CRITICAL (or has no report);
DrNotifier writes the failure to the audit trail (and mails when `smtp_default` exists).
Logic: plugins/barman_dr/operators/scheduled.py and plugins/barman_dr/verification.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from barman_dr.fleet import schedule_for, servers_by_pool
from barman_dr.operators.scheduled import DailyVerificationOperator, FleetSummaryOperator
from barman_dr.surfaces.notifications import DrNotifier

POOLS = servers_by_pool()

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
    verify_ids = []
    for pool, servers in sorted(POOLS.items()):
        t = DailyVerificationOperator.partial(task_id=f"verify__{pool}", pool=pool,
                                              execution_timeout=timedelta(minutes=20),
                                              map_index_template="{{ task.server }}").expand(server=servers)
        verify_ids.append(f"verify__{pool}")
    summary = FleetSummaryOperator(task_id="summary", servers=sorted(s for v in POOLS.values() for s in v),
                                   report_task_ids=verify_ids, trigger_rule="all_done", retries=0)
    for task_id in verify_ids:
        dag.get_task(task_id) >> summary
