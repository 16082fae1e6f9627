"""dr_pitr_rollback: undo a dr_pitr run by putting its moved-aside data directory back.

Used when a PITR failed after it moved the data directory aside (the restored server did
not start, the target was not reached), or when the recovered data is judged wrong. The
path comes from the PITR run's audit trail; nothing is deleted.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from barman_dr.inventory import server_names_for_dags
from barman_dr.operators.rollback import PitrRollbackOperator
from barman_dr.surfaces.notifications import DrNotifier

SERVERS = server_names_for_dags() or ["(inventory not found)"]

with DAG(
    dag_id="dr_pitr_rollback",
    description="Put back the data directory a dr_pitr run moved aside",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["dr", "pitr", "rollback"],
    params={
        "server": Param(SERVERS[0], type="string", enum=SERVERS, title="Server",
                        description="The server whose PITR is rolled back."),
        "pitr_run_id": Param("", type="string", title="dr_pitr run id",
                             description="The run id of the dr_pitr run to undo (shown in its failure note)."),
        "confirm": Param(None, type=["null", "string"], title="Confirm",
                         description="Type exactly: ROLLBACK <server> (e.g. 'ROLLBACK pg-primary')."),
    },
    doc_md=__doc__,
    default_args={"owner": "dba-oncall", "retries": 0, "retry_delay": timedelta(seconds=10),
                  "on_failure_callback": DrNotifier()},
) as dag:
    PitrRollbackOperator(task_id="rollback")
