"""dr_surgical_recovery: put back only the rows an incident destroyed, without rewinding or stopping live.

A plain PITR (dr_pitr) rewinds the whole cluster and loses every good write made after
the incident. This DAG restores the backup to the target on the server's **nonprod**
instance, side by side with the live primary (which keeps serving: no freeze, no stop),
compares the named tables by primary key, and writes the diff (rows missing in live,
rows changed since, rows new in live) with a sample to the audit trail and the run note.
Without `confirm` = "SURGICAL <server>" the plan waits for a second person (`plan_only`: it
stops there). Approved or confirmed, it re-inserts the
missing rows into live in ONE transaction (and, with `restore_changed`, puts back the
restored version of changed rows; otherwise those conflicts are only reported), verifies
the counts, and audits the applied diff. The teardown always stops the nonprod instance
(its directory is kept, like the drill's) and releases the server lock.
Logic: plugins/barman_dr/operators/surgical.py and plugins/barman_dr/forensics/rowdiff.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from barman_dr.inventory import server_names_for_dags
from barman_dr.operators.approve import FourEyesApprovalOperator
from barman_dr.operators.surgical import (
    RestoreNonprodOperator,
    SurgicalApplyOperator,
    SurgicalFailureSummaryOperator,
    SurgicalPlanOperator,
    SurgicalPreflightOperator,
    SurgicalResolveTargetOperator,
    SurgicalTeardownOperator,
    SurgicalWalCoverageOperator,
    ValidateSurgicalRequestOperator,
)
from barman_dr.params.approval_params import plan_only_param
from barman_dr.surfaces.notifications import DrNotifier

SERVERS = server_names_for_dags() or ["(inventory not found)"]
OPT_STR = ["null", "string"]

params = {
    "server": Param(SERVERS[0], type="string", enum=SERVERS, title="Server",
                    description="The Barman server whose rows to repair; it needs a nonprod instance in the inventory."),
    "target_time": Param(None, type=OPT_STR, format="date-time", title="Target time (restore the copy to)",
                         description="The last good moment, with its timezone (the picker sends UTC). Give exactly one "
                                     "target."),
    "target_xid": Param(None, type=OPT_STR, title="Target transaction id",
                        description="Instead of a time: the xid of the bad transaction, with 'Target inclusive' off."),
    "target_lsn": Param(None, type=OPT_STR, title="Target LSN", description="Instead of a time: a WAL location."),
    "target_inclusive": Param(True, type="boolean", title="Target inclusive",
                              description="Off: stop just before the target transaction/LSN (Barman --exclusive)."),
    "backup_id": Param("auto", type="string", title="Backup",
                       description="'auto' picks the newest DONE backup that ended before the target."),
    "tables": Param([], type=["null", "array"], items={"type": "string"}, title="Tables",
                    description='schema.table names to compare by primary key, parents before children, e.g. '
                                '["public.critical_orders"]. Empty: the inventory\'s surgical_tables for the server.'),
    "restore_changed": Param(False, type="boolean", title="Restore changed rows",
                             description="Also overwrite live rows that differ from the restored copy with the restored "
                                         "version. Off (default): they are reported as conflicts and left alone."),
    "incident_id": Param(None, type=OPT_STR, title="Incident id", description="Your incident ticket, e.g. INC-123."),
    "reason": Param(None, type=OPT_STR, title="Reason", description="Why this runs (shown in the audit trail)."),
    "plan_only": plan_only_param(),
    "confirm": Param(None, type=OPT_STR, title="Confirm (pre-approval)",
                     description="Type exactly: SURGICAL <server> (e.g. 'SURGICAL pg-primary') to APPLY the diff to "
                                 "live without waiting for a second person. Empty: the diff is computed and shown, and waits "
                                 "for an approver in Required Actions."),
}

with DAG(
    dag_id="dr_surgical_recovery",
    description="Re-insert the rows an incident destroyed from a restored copy on nonprod, live keeps serving",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=2,
    tags=["dr", "surgical", "barman"],
    params=params,
    doc_md=__doc__,
    default_args={"owner": "dba-oncall", "retries": 1, "retry_delay": timedelta(seconds=10),
                  "on_failure_callback": DrNotifier()},
) as dag:
    validate = ValidateSurgicalRequestOperator(task_id="validate_params", retries=0)
    resolve = SurgicalResolveTargetOperator(task_id="resolve_target", discard=False)
    preflight = SurgicalPreflightOperator(task_id="preflight")
    wal = SurgicalWalCoverageOperator(task_id="wal_coverage")
    restore = RestoreNonprodOperator(task_id="restore_nonprod", retries=2, retry_delay=timedelta(seconds=15))
    plan = SurgicalPlanOperator(task_id="plan", retries=0)
    approve = FourEyesApprovalOperator(task_id="approve", noun="SURGICAL recovery", lock_purpose="surgical",
                                       retries=1, retry_delay=timedelta(seconds=5))
    apply = SurgicalApplyOperator(task_id="apply")
    main = [validate, resolve, preflight, wal, restore, plan, approve, apply]
    teardown = SurgicalTeardownOperator(task_id="teardown", trigger_rule="all_done", retries=2)
    # a leaf that fails when anything failed: the run's state is the recovery's state
    failure = SurgicalFailureSummaryOperator(task_id="failure_summary", trigger_rule="one_failed", retries=0)

    validate >> resolve >> preflight >> wal >> restore >> plan >> approve >> apply
    main >> teardown
    main >> failure
