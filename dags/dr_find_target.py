"""dr_find_target: find the bad transaction in the WAL, and the exact target that undoes it.

Instead of a human reading logs to guess a target time (which loses good transactions or
keeps part of the bad one), the WAL Barman holds for the window is decoded with
pg_waldump on the barman host: every committed transaction that DELETEd, UPDATEd,
TRUNCATEd or DROPped user tables, with its xid, commit time, commit LSN, the tables (named
through the live catalogue) and the rows affected. The ranked list (DROP/TRUNCATE first,
then by rows) goes to the audit trail, the run note and the DR page, each candidate with
`target_xid` + `target_inclusive=false` (stop right before it), the equivalent
`target_lsn`, and a dr_pitr conf ready to trigger (plan first: add `confirm` to execute).
Read-only apart from one WAL switch. Logic: plugins/barman_dr/operators/find_target.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from barman_dr.inventory import server_names_for_dags
from barman_dr.operators.find_target import FindCandidatesOperator, ValidateFindTargetOperator
from barman_dr.surfaces.notifications import DrNotifier

SERVERS = server_names_for_dags() or ["(inventory not found)"]
OPT_STR = ["null", "string"]

params = {
    "server": Param(SERVERS[0], type="string", enum=SERVERS, title="Server",
                    description="The Barman server (PostgreSQL cluster) whose WAL to search, from the inventory."),
    "window_start": Param(None, type=OPT_STR, format="date-time", title="Window start",
                          description="Transactions committed from this moment, with its timezone (the picker sends "
                                      "UTC). Empty: one hour before the window end. A time without a timezone is "
                                      "rejected, never guessed."),
    "window_end": Param(None, type=OPT_STR, format="date-time", title="Window end",
                        description="Transactions committed up to this moment, with its timezone. Empty: now."),
    "table": Param(None, type=OPT_STR, title="Table (optional)",
                   description="Only transactions touching this table, e.g. critical_orders or public.critical_orders."),
    "min_rows": Param(1, type="integer", minimum=0, title="Minimum rows",
                      description="Only DELETE/UPDATE transactions affecting at least this many rows. TRUNCATE and "
                                  "DROP are always listed (the WAL does not count their rows)."),
    "incident_id": Param(None, type=OPT_STR, title="Incident id",
                         description="Your incident ticket, e.g. INC-123: shown in the audit and copied into the "
                                     "recommended dr_pitr confs."),
}

with DAG(
    dag_id="dr_find_target",
    description="Find the bad transaction in the WAL (pg_waldump on the barman host) and recommend the PITR target",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    tags=["dr", "pitr", "barman", "assessment"],
    params=params,
    doc_md=__doc__,
    default_args={"owner": "dba-oncall", "retries": 1, "retry_delay": timedelta(seconds=10),
                  "on_failure_callback": DrNotifier()},
) as dag:
    validate = ValidateFindTargetOperator(task_id="validate_params", retries=0)
    find = FindCandidatesOperator(task_id="find_candidates")
    validate >> find
