"""dr_salvage: after a PITR, re-insert the rows the PITR discarded that were inserted after the target.

Nothing good lost: a PITR back to the moment before a mass DELETE also throws away every
good write committed after it (in staged mode, everything the app wrote until the
freeze). dr_pitr kept the old data directory (moved aside, never deleted) and listed the
xids of every transaction it discarded. This DAG copies that directory (the original
stays untouched, as evidence), starts the copy as a private postmaster, and, per table,
finds the rows those transactions wrote; it re-inserts the ones the recovered server
lacks, by primary key, `ON CONFLICT DO NOTHING`, in one verified transaction. Rows
updated after the target, and keys the app re-used since, are conflicts: reported, never
overwritten. Rows deleted after the target stay deleted. Without `confirm` =
"SALVAGE <server>" the plan waits for a second person to approve it (`plan_only`: it only
plans). Logic: plugins/barman_dr/operators/salvage.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from barman_dr.inventory import server_names_for_dags
from barman_dr.operators.approve import FourEyesApprovalOperator
from barman_dr.operators.salvage import (
    PrepareCopyOperator,
    SalvageApplyOperator,
    SalvageFailureSummaryOperator,
    SalvagePlanOperator,
    SalvageTeardownOperator,
    ValidateSalvageOperator,
)
from barman_dr.params.approval_params import plan_only_param
from barman_dr.surfaces.notifications import DrNotifier

SERVERS = server_names_for_dags() or ["(inventory not found)"]
OPT_STR = ["null", "string"]

params = {
    "server": Param(SERVERS[0], type="string", enum=SERVERS, title="Server",
                    description="The server a dr_pitr recovered."),
    "pitr_run_id": Param(None, type=OPT_STR, title="dr_pitr run",
                         description="The dr_pitr run id whose discarded rows to put back (the DR page and the Airflow "
                                     "UI show it). Empty: the server's last successful dr_pitr."),
    "tables": Param([], type=["null", "array"], items={"type": "string"}, title="Tables",
                    description='schema.table names, parents before children, e.g. ["public.critical_orders"]. Empty: '
                                "every table with rows inserted after the target (from the PITR's list of discarded "
                                "transactions). Tables need a primary key."),
    "exclude_xids": Param([], type=["null", "array"], items={"type": ["integer", "string"]},
                          title="Transactions to leave out",
                          description="xids whose rows must not be put back (the plan lists the largest discarded "
                                      "transactions). The transaction the PITR targeted by xid (exclusive), the "
                                      "incident itself, is always left out."),
    "incident_id": Param(None, type=OPT_STR, title="Incident id", description="Your incident ticket, e.g. INC-123."),
    "reason": Param(None, type=OPT_STR, title="Reason", description="Why this runs (shown in the audit trail)."),
    "plan_only": plan_only_param(),
    "confirm": Param(None, type=OPT_STR, title="Confirm (pre-approval)",
                     description="Type exactly: SALVAGE <server> (e.g. 'SALVAGE pg-primary') to re-insert the rows "
                                 "without waiting for a second person. Empty: the rows are found and diffed, and the "
                                 "plan waits for an approver in Required Actions."),
}

with DAG(
    dag_id="dr_salvage",
    description="After a PITR: re-insert the discarded rows inserted after the target, from the kept old directory",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=2,
    tags=["dr", "salvage", "pitr", "barman"],
    params=params,
    doc_md=__doc__,
    default_args={"owner": "dba-oncall", "retries": 1, "retry_delay": timedelta(seconds=10),
                  "on_failure_callback": DrNotifier()},
) as dag:
    validate = ValidateSalvageOperator(task_id="validate_params", retries=0)
    prepare = PrepareCopyOperator(task_id="prepare_copy", retries=2, retry_delay=timedelta(seconds=15))
    plan = SalvagePlanOperator(task_id="plan", retries=0)
    approve = FourEyesApprovalOperator(task_id="approve", noun="SALVAGE", lock_purpose="salvage", retries=1,
                                       retry_delay=timedelta(seconds=5))
    apply = SalvageApplyOperator(task_id="apply")
    main = [validate, prepare, plan, approve, apply]
    teardown = SalvageTeardownOperator(task_id="teardown", trigger_rule="all_done", retries=2)
    # a leaf that fails when anything failed: the run's state is the salvage's state
    failure = SalvageFailureSummaryOperator(task_id="failure_summary", trigger_rule="one_failed", retries=0)

    validate >> prepare >> plan >> approve >> apply
    main >> teardown
    main >> failure
