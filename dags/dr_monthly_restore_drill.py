"""dr_monthly_restore_drill: restore every server's newest backup onto its non-prod instance and prove it.

Per server (mapped, bounded by the barman host's pool): take the server lock, stop the
non-prod instance and move its data directory aside (never deleted), `barman restore`
(detached job) to the non-prod host, by default to a **random instant** between the newest
backup's end and now (a commit is made and archived first, so WAL replay is exercised;
param `target: immediate` restores to the backup's end instead), start it there on its own
address and port with archiving off, wait for promotion, clear Barman's recovery settings,
run the inventory's validation queries (compared with the primary's counts recorded by the
weekly backup when the target is `immediate`; "unknown" for a random time), `amcheck`
(`bt_index_check`) on the largest btree indexes, measure the RTO: over the inventory's
`rto_objective_seconds` the drill fails (and DrNotifier notifies). A server without a
`nonprod` target is reported "SKIPPED: no nonprod target".
`teardown` always runs: it stops the non-prod instance (keeps its directory) and releases
the lock; it touches nothing else. Logic: plugins/barman_dr/operators/scheduled.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from barman_dr.fleet import queue_by_pool, schedule_for, servers_by_pool
from barman_dr.operators.scheduled import DrillTeardownOperator, FleetSummaryOperator, RestoreDrillOperator
from barman_dr.surfaces.deadlines import rto_deadlines
from barman_dr.surfaces.notifications import DrNotifier

POOLS = servers_by_pool()
#: each barman host's tasks run on the Celery workers beside it (inventory `barman_hosts.<h>.queue`)
QUEUES = queue_by_pool()

with DAG(
    dag_id="dr_monthly_restore_drill",
    description="Monthly restore drill of every Barman server onto its non-prod instance, with RTO",
    schedule=schedule_for("dr_monthly_restore_drill"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["dr", "barman", "drill", "scheduled"],
    doc_md=__doc__,
    # pages (DrNotifier) when a drill is still running past a drilled server's RTO objective
    deadline=rto_deadlines("drill"),
    default_args={"owner": "dba-oncall", "retries": 1, "retry_delay": timedelta(seconds=30),
                  "on_failure_callback": DrNotifier()},
    params={"target": Param("random", type="string", enum=["random", "immediate"], title="Drill target",
                            description="random: a random instant after the backup's end (tests WAL replay); "
                                        "immediate: the end of the backup")},
) as dag:
    drill_ids = []
    for pool, servers in sorted(POOLS.items()):
        drill = RestoreDrillOperator.partial(task_id=f"drill__{pool}", pool=pool, queue=QUEUES.get(pool, "default"),
                                             target_mode="{{ params.target }}",
                                             map_index_template="{{ task.server }}").expand(server=servers)
        teardown = DrillTeardownOperator.partial(task_id=f"teardown__{pool}", trigger_rule="all_done",
                                                 queue=QUEUES.get(pool, "default"),
                                                 retries=2,
                                                 map_index_template="{{ task.server }}").expand(server=servers)
        drill >> teardown
        drill_ids.append(f"drill__{pool}")
    summary = FleetSummaryOperator(task_id="summary", servers=sorted(s for v in POOLS.values() for s in v),
                                   report_task_ids=drill_ids, action="drill_summary", trigger_rule="all_done",
                                   release_locks=True, retries=0)
    for pool in sorted(POOLS):
        dag.get_task(f"teardown__{pool}") >> summary
