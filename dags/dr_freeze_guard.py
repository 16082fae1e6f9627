"""dr_freeze_guard: an app left frozen by a DR run, with nobody watching, raises an alert.

Every 5 minutes (the inventory's `schedules` may change it), for every server: is its app
frozen (PgBouncer's live state), which DR run froze it and when (the audit trail), is that
run still holding the server lock, what did it do last. Past the server's
`max_freeze_seconds` it alerts through DrNotifier (audit, e-mail, chat) with the run and the
next step, and repeats once per `max_freeze_seconds` while the app stays frozen. It never
unfreezes. It runs outside the frozen run's tasks, so it sees a run whose tasks stopped
(Airflow host crash, scheduler killed) as well as one that failed. Unpause it in production.
Logic: plugins/barman_dr/safety/freeze_guard.py and plugins/barman_dr/operators/guard.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG

from barman_dr.fleet import schedule_for
from barman_dr.operators.guard import FreezeGuardOperator
from barman_dr.surfaces.notifications import DrNotifier

with DAG(
    dag_id="dr_freeze_guard",
    description="Alert when a DR run left an app frozen longer than the server's max_freeze_seconds (never unfreezes)",
    schedule=schedule_for("dr_freeze_guard"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["dr", "guard", "scheduled"],
    doc_md=__doc__,
    default_args={"owner": "dba-oncall", "retries": 1, "retry_delay": timedelta(seconds=20),
                  "on_failure_callback": DrNotifier()},
) as dag:
    FreezeGuardOperator(task_id="check_frozen_apps", execution_timeout=timedelta(minutes=4))
