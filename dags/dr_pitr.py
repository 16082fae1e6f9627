"""dr_pitr: on-demand point-in-time recovery of one server, from the UI form or the REST API.

The seed's runbook as a DAG: assess (validate, resolve the target in the WAL, preflight,
WAL coverage, plan: the exact stop record, the backup, what will be discarded) -> stage
(staged_restore, default on: barman restore into a staging directory next to the data
directory while the app still runs) -> execute (freeze app, stop, move aside, rename the
staged restore into place -- or restore now when staged_restore is off -- start) ->
verify (the exact stop point reached, data) -> post-incident (unfreeze, what was discarded,
standbys, Barman, report).
After the plan comes the approval step: without `confirm` = "PITR <server>" (or on a server
with `require_approval: true`) the plan waits in Required Actions for a second person, one of
the server's approvers and never the requester; Reject or no answer in time touches nothing.
`plan_only` stops after the plan and asks nobody.
The logic lives in plugins/barman_dr/operators/pitr/ (one module per phase); this file only declares.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from barman_dr.inventory import server_names_for_dags, standby_names_for_dags
from barman_dr.operators.approve import FourEyesApprovalOperator
from barman_dr.operators.pitr import (
    BarmanRestoreOperator,
    DiscardedOperator,
    FreezeAppOperator,
    MoveAsideOperator,
    PitrFailureSummaryOperator,
    PitrPreflightOperator,
    PitrReportOperator,
    PlanGateOperator,
    RebaseBarmanOperator,
    RebuildStandbyOperator,
    ReleaseLockOperator,
    ResolveTargetOperator,
    ResumeDelayedReplayOperator,
    StageRestoreOperator,
    StandbysToRebuildOperator,
    StartRecoveryOperator,
    StopPostgresOperator,
    UnfreezeAppOperator,
    ValidateDataOperator,
    ValidatePitrRequestOperator,
    VerifyTargetOperator,
    WalCoverageOperator,
)
from barman_dr.params.approval_params import plan_only_param
from barman_dr.routing import SITE_QUEUE
from barman_dr.surfaces.deadlines import rto_deadlines
from barman_dr.surfaces.notifications import DrNotifier

SERVERS = server_names_for_dags() or ["(inventory not found)"]
STANDBYS = standby_names_for_dags()
OPT_STR = ["null", "string"]

params = {
    "server": Param(SERVERS[0], type="string", enum=SERVERS, title="Server",
                    description="The Barman server (PostgreSQL cluster) to recover, from the inventory."),
    "target_time": Param(None, type=OPT_STR, format="date-time", title="Target time (recover to)",
                         description="The last good moment, with its timezone: the picker sends UTC. Recovery stops "
                                     "before the first transaction that committed after it. Example: "
                                     "2026-11-25T11:45:00+00:00. A time without a timezone is rejected, never guessed. "
                                     "Give exactly one target."),
    "target_xid": Param(None, type=OPT_STR, title="Target transaction id",
                        description="Instead of a time: a transaction id (digits), e.g. the xid of the bad DELETE "
                                    "with 'Target inclusive' off to stop right before it."),
    "target_lsn": Param(None, type=OPT_STR, title="Target LSN",
                        description="Instead of a time: a WAL location like 0/7000028."),
    "target_name": Param(None, type=OPT_STR, title="Target restore point",
                         description="Instead of a time: a restore point created with pg_create_restore_point(), "
                                     "exactly as created (any text up to 63 bytes). Recovery stops right after it. "
                                     "A name created more than once is refused until 'Restore point occurrence' "
                                     "names one: the plan (or the refusal) lists each occurrence with its LSN."),
    "target_name_lsn": Param(None, type=OPT_STR, title="Restore point occurrence (LSN)",
                             description="Only with a target restore point created more than once: the LSN of the "
                                         "occurrence to recover to, as the plan or the refusal lists it (e.g. "
                                         "0/9000150), or as pg_create_restore_point() returned it. The restore then "
                                         "stops at exactly that one."),
    "target_immediate": Param(False, type="boolean", title="Target: end of the backup",
                              description="Recover only to the end of the base backup (no WAL replay after it)."),
    "target_inclusive": Param(True, type="boolean", title="Target inclusive",
                              description="On: stop just after the target (xid/LSN). Off: stop just before it "
                                          "(Barman --exclusive)."),
    "backup_id": Param("auto", type="string", title="Backup",
                       description="'auto' picks the newest DONE backup that ended before the target; or a Barman "
                                   "backup id like 20261125T020000."),
    "restore_to": Param("in_place", type="string", enum=["in_place", *STANDBYS], title="Restore to",
                        description="'in_place': the primary's own host and data directory (its data is moved aside, "
                                    "kept). Or a standby: recover there, repoint the app to it, and leave the damaged "
                                    "primary stopped and untouched for forensics."),
    "expected": Param({}, type="object", title="Expected counts",
                      description='Validation query name -> expected integer, e.g. {"orders_total": 10500, '
                                  '"orders_completed": 7465}. Queries are defined in the inventory.'),
    "incident_id": Param(None, type=OPT_STR, title="Incident id",
                         description="Your incident ticket, e.g. INC-123 (letters, digits, . _ -). Shown in the audit."),
    "reason": Param(None, type=OPT_STR, title="Reason",
                    description="Why this recovery runs, in plain words (shown in the audit trail)."),
    "jobs": Param(1, type="integer", minimum=1, maximum=16, title="Parallel restore jobs",
                  description="barman restore --jobs: parallel copy processes (1-16)."),
    "staged_restore": Param(True, type="boolean", title="Staged restore (shorter downtime)",
                            description="On (default): restore the backup and the WAL up to the target into "
                                        "<data directory>.staged-<run> on the same filesystem BEFORE freezing the "
                                        "app, then freeze, stop, move the old directory aside (kept) and rename the "
                                        "staged copy into place: the copy is outside the downtime. Needs free space "
                                        "for a second copy (checked first: backup + WAL + 10%). The app keeps "
                                        "writing while the copy is prepared: those writes are discarded too (the "
                                        "report lists them; dr_salvage can put their new rows back). Off: the "
                                        "restore runs inside the downtime window, after the freeze."),
    "source": Param("barman", type="string", enum=["barman", "auto", "delayed_standby"], title="Recovery source",
                    description="'barman' (default): restore a Barman backup and replay its WAL. 'delayed_standby': "
                                "the server's delayed standby (inventory `delayed:`), paused before the damage, "
                                "replays forward to the stop point and is promoted; the app moves to it (like "
                                "restore_to a standby) and no backup is copied, so the time does not grow with the "
                                "database. Refused when it already applied the stop point. 'auto': the delayed "
                                "standby when it can serve the stop point, else Barman; the plan says which and why."),
    "plan_only": plan_only_param(),
    "confirm": Param(None, type=OPT_STR, title="Confirm (pre-approval)",
                     description="Type exactly: PITR <server> (e.g. 'PITR pg-primary') to EXECUTE without waiting for "
                                 "a second person (pre-approved automation; ignored on a server with "
                                 "require_approval). Leave empty: the plan waits for an approver."),
}

with DAG(
    dag_id="dr_pitr",
    description="Point-in-time recovery with Barman: preflight, WAL proof, restore, target proof, RTO report",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    tags=["dr", "pitr", "barman"],
    params=params,
    doc_md=__doc__,
    # pages (DrNotifier) when a run is still unfinished past its server's RTO objective (trigger -> now)
    deadline=rto_deadlines("pitr"),
    default_args={"owner": "dba-oncall", "retries": 2, "retry_delay": timedelta(seconds=10),
                  "on_failure_callback": DrNotifier()},
) as dag:
    validate = ValidatePitrRequestOperator(task_id="validate_params", retries=0)
    resolve = ResolveTargetOperator(task_id="resolve_target", retries=1)
    preflight = PitrPreflightOperator(task_id="preflight", retries=1)
    wal = WalCoverageOperator(task_id="wal_coverage", retries=1)
    plan = PlanGateOperator(task_id="plan", retries=0)
    approve = FourEyesApprovalOperator(task_id="approve", noun="PITR", lock_purpose="pitr", retries=1,
                                       retry_delay=timedelta(seconds=5))
    stage = StageRestoreOperator(task_id="stage_restore", retries=2, retry_delay=timedelta(seconds=15))
    freeze = FreezeAppOperator(task_id="freeze_app")
    stop = StopPostgresOperator(task_id="stop_postgres")
    aside = MoveAsideOperator(task_id="move_aside")
    restore = BarmanRestoreOperator(task_id="barman_restore", retries=3, retry_delay=timedelta(seconds=15))
    start = StartRecoveryOperator(task_id="start_recovery", retries=1)
    verify = VerifyTargetOperator(task_id="verify_target", retries=1)
    data = ValidateDataOperator(task_id="validate_data", retries=1)
    unfreeze = UnfreezeAppOperator(task_id="unfreeze_app")
    discarded = DiscardedOperator(task_id="discarded", retries=0)
    to_rebuild = StandbysToRebuildOperator(task_id="list_standbys")
    # a mapped task's queue comes from partial(): the site placeholder, resolved per run (barman_dr/routing.py)
    standbys = RebuildStandbyOperator.partial(task_id="rebuild_standby", queue=SITE_QUEUE,
                                              map_index_template="{{ task.standby }}").expand(standby=to_rebuild.output)
    rebase = RebaseBarmanOperator(task_id="rebase_barman")
    report = PitrReportOperator(task_id="report", trigger_rule="none_failed_min_one_success")
    main = [validate, resolve, preflight, wal, plan, approve, stage, freeze, stop, aside, restore, start, verify, data, unfreeze,
            discarded, to_rebuild, standbys, rebase, report]
    # a leaf that fails when anything failed: the run's state is the PITR's state
    failure = PitrFailureSummaryOperator(task_id="failure_summary", trigger_rule="one_failed", retries=0)
    # whatever happened: the delayed standbys this run paused apply WAL again (operators/pitr/delayed.py)
    resume = ResumeDelayedReplayOperator(task_id="resume_delayed_replay", trigger_rule="all_done", retries=2)
    release = ReleaseLockOperator(task_id="release_lock", trigger_rule="all_done", retries=2)

    validate >> resolve >> preflight >> wal >> plan >> approve >> stage >> freeze >> stop >> aside >> restore >> start >> verify
    verify >> data >> unfreeze >> discarded >> rebase >> report
    data >> to_rebuild >> standbys >> report
    main >> failure
    main >> resume >> release
    resume >> failure  # a leaf judges the run: a delayed standby left paused by mistake fails it
