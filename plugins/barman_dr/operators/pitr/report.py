"""Report: the RTO per phase on success; where things stand and what to do next on failure; the lock released."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

from barman_dr.operators.base import DrBaseOperator
from barman_dr.operators.pitr.delayed import source_intents
from barman_dr.safety.audit import AuditTrail
from barman_dr.safety.locks import ServerLock
from barman_dr.surfaces.run_note import set_run_note


def staging_leftover(op: DrBaseOperator, staging: dict[str, Any]) -> list[str]:
    """Which of a run's staging directories still exist on its host (best effort: [] when it cannot tell)."""
    paths = [p for p in (staging.get("staging_directory"), staging.get("wal_directory")) if p]
    if not paths or not staging.get("host"):
        return []
    try:
        db = op.db(staging["host"])
        return [p for p in paths if db.path_exists(p)]
    except Exception as exc:  # noqa: BLE001 - a report must not fail on this
        op.log.warning("could not check the staging directories %s: %s", paths, exc)
        return [f"{p} (unchecked)" for p in paths]


class PitrReportOperator(DrBaseOperator):
    """Step 15: the report: RTO freeze -> resume with a per-phase breakdown (audit + run note)."""
    # checks over SSH whether the run left staging directories: on the site

    action = "report"

    PHASES = ("freeze_app", "stop_postgres", "move_aside", "barman_restore", "start_recovery", "verify_target",
              "validate_data", "unfreeze_app")

    def run(self, context: Any) -> dict[str, Any]:
        req, srv = self.req, self.srv
        x = {t: self.upstream(context, t) or {} for t in
             ("validate_params", "resolve_target", "preflight", "wal_coverage", "plan", "approve", "stage_restore",
              *self.PHASES,
              "discarded", "rebase_barman")}
        # in the order they ran (the runbook's order, unless a retry or a clear changed it)
        ran = sorted((p for p in self.PHASES if x[p]), key=lambda p: str(x[p].get("started_at") or ""))
        phases = {p: x[p].get("duration_s") for p in ran}
        frozen_at = x["freeze_app"].get("frozen_at") or x["freeze_app"].get("started_at")
        resumed_at = x["unfreeze_app"].get("resumed_at") or x["unfreeze_app"].get("ended_at")
        rto = None
        if frozen_at and resumed_at:
            rto = round((datetime.fromisoformat(resumed_at) - datetime.fromisoformat(frozen_at)).total_seconds(), 3)
        standbys = context["ti"].xcom_pull(task_ids="rebuild_standby") or []
        if isinstance(standbys, dict):
            standbys = [standbys]
        report = {
            "server": srv.name, "incident_id": req.incident_id, "target": req.target.to_dict(),
            "backup_id": x["preflight"].get("backup_id"),
            "wal_range": [x["wal_coverage"].get("first_wal"), x["wal_coverage"].get("last_wal")],
            "old_timeline": x["stop_postgres"].get("old_timeline"),
            "new_timeline": x["verify_target"].get("new_timeline"),
            "recovery_stop": x["verify_target"].get("stop", {}).get("lines", [])[:3],
            "moved_aside": x["move_aside"].get("moved_to"),
            # restore_to a standby (or the delayed-standby source): the damaged primary, stopped and untouched
            "fenced_primary": None if req.in_place else {
                "instance": srv.primary.name, "host": srv.primary.host, "data_directory": srv.primary.data_directory,
                "stopped": (x["stop_postgres"].get("stopped") or {}).get(srv.primary.name),
                "old_end_lsn": x["stop_postgres"].get("old_end_lsn")},
            "counts": x["validate_data"].get("actual"), "expected": req.expected,
            "app_check": x["unfreeze_app"].get("app_check"),
            "standbys": [s for s in standbys if s],
            "new_backup_id": x["rebase_barman"].get("new_backup_id"),
            # restore_to a standby: the server PgBouncer and Barman now point at (None: in place)
            "serving_instance": None if req.in_place else req.restore_to,
            "barman_follows": x["rebase_barman"].get("barman_follows"),
            "rto_s": rto, "rto_objective_s": srv.rto_objective_seconds,
            "rto_met": rto is not None and rto <= srv.rto_objective_seconds,
            "estimated_rto_s": (x["plan"].get("estimated_rto") or {}).get("downtime_s"),
            "estimated": x["plan"].get("estimated_rto"),
            "phases_s": phases,
            "stop": x["resolve_target"].get("stop"),
            "restore_target": x["resolve_target"].get("restore_target"),
            "recovery_timeline": x["resolve_target"].get("recovery_timeline"),
            "discarded": {k: v for k, v in x["discarded"].items() if k != "xid_ranges"},
            "discarded_at_plan": (x["plan"].get("discarded") or {}).get("total"),
            "prepared_transactions": x["verify_target"].get("prepared_transactions"),
            "approval": {k: x["approve"].get(k) for k in ("decision", "requester", "approver", "responded_at",
                                                           "plan_hash") if x["approve"].get(k) is not None},
        }
        # time-to-recovered: trigger -> the app serving recovered data (resume)
        triggered = getattr(context.get("dag_run"), "start_date", None) or (
            datetime.fromisoformat(x["validate_params"]["started_at"]) if x["validate_params"].get("started_at")
            else None)
        report["time_to_recovered_s"] = (round((datetime.fromisoformat(resumed_at) - triggered).total_seconds(), 3)
                                         if triggered and resumed_at else None)
        stage = x["stage_restore"]
        staged = bool(stage.get("staged"))
        report["staged_restore"] = staged
        # the downtime window is rto_s (freeze -> resume); staging ran before it, with the app up
        report["outside_downtime_s"] = {"stage_restore": stage.get("duration_s")} if staged else {}
        report["staging_leftover"] = staging_leftover(self, stage) if staged else []
        # where the recovered data came from: Barman, or the delayed standby promoted at the stop point
        report["source"] = "delayed_standby" if req.from_delayed_standby else "barman"
        report["source_decision"] = x["resolve_target"].get("source")
        if req.from_delayed_standby:
            report["outside_downtime_s"] = {"stage_restore": stage.get("duration_s")}
            report["delayed_source"] = {k: stage.get(k) for k in ("standby", "promoted_s", "recover_s", "steps",
                                                                 "counts")}
        rebuilt = {d.get("standby") for d in report["standbys"] if isinstance(d, dict)}
        spares = [s.name for s in srv.standbys if s.spare and s.name in rebuilt]
        report["new_delayed_standbys"] = spares
        disc = report["discarded"]
        total = disc.get("total") or {}
        appr = report["approval"]
        note = (f"PITR {srv.name} DONE: stopped {(report['stop'] or {}).get('described', req.target.describe())}, new "
                f"timeline {report['new_timeline']}\n"
                + (f"approved by {appr.get('approver')} at {str(appr.get('responded_at'))[:19]} (requested by "
                   f"{appr.get('requester')}, plan {appr.get('plan_hash')})\n" if appr.get("decision") == "approved"
                   else f"pre-approved by confirm (requested by {appr.get('requester') or 'unknown'})\n" if appr
                   else "")
                + f"RTO: downtime (freeze -> resume) {rto}s, time-to-recovered {report['time_to_recovered_s']}s "
                f"(objective {srv.rto_objective_seconds}s): "
                + ", ".join(f"{k} {v}s" for k, v in phases.items() if v is not None)
                + (f"\nstaged restore before the freeze (app running): {stage.get('duration_s')}s" if staged else "")
                + (f"\nsource: delayed standby {req.restore_to}, replayed forward to the stop point and promoted "
                   f"before the freeze (app running): {stage.get('duration_s')}s, no backup copied"
                   if req.from_delayed_standby else "")
                + (f"\ndiscarded up to the freeze: {disc.get('transactions_with_changes')} transaction(s), +"
                   f"{total.get('inserted', 0)}/~{total.get('updated', 0)}/-{total.get('deleted', 0)} rows "
                   f"(dr_salvage can re-insert the new rows)" if not disc.get("error") else
                   f"\ndiscarded: unknown ({disc['error'][:100]})")
                + (f"\nWARNING: prepared transactions survived the stop point (COMMIT/ROLLBACK PREPARED them): "
                   f"{report['prepared_transactions']}" if report["prepared_transactions"] else "")
                + f"\ncounts {report['counts']}\nold data kept at "
                  f"{report['moved_aside'] or (srv.primary.host + ':' + srv.primary.data_directory + ' (fenced)')}\n"
                  f"new backup {report['new_backup_id']}"
                + ("" if req.in_place else
                   f"\nnow serving: {req.restore_to} ("
                   + ("Barman points at it, the app is not managed here (app_freeze.method none): point it there"
                      if srv.app_freeze.method == "none" else "PgBouncer and Barman point at it")
                   + "; the old primary "
                   f"{srv.primary.name} is fenced, its data untouched). Update the inventory: {req.restore_to} "
                   f"is {srv.name}'s primary now"
                   + (f"; {', '.join(spares)} (spare) is its delayed standby now: set `spare: false` on it"
                      if spares else ""))
                + (f"\nstaging directories left: {', '.join(report['staging_leftover'])}"
                   if report["staging_leftover"] else ""))
        set_run_note(context["dag"].dag_id, context["run_id"], note)
        return report


class PitrFailureSummaryOperator(DrBaseOperator):
    """Runs when any step failed: where things stand and what to do next, in the audit and the run note."""
    # on `default`, so the failure is summarised even when the site is unreachable or unserved; its
    # staging-leftover check is best effort from there (a leftover it cannot see is listed as unchecked)
    runs_on_site = False

    action = "failure_summary"

    def run(self, context: Any) -> dict[str, Any]:
        failures = self.run_failures(context)
        failed = [f["task"] for f in failures]
        freeze = self.upstream(context, "freeze_app") or {}
        unfreeze = self.upstream(context, "unfreeze_app") or {}
        aside = self.upstream(context, "move_aside") or {}
        app_state = "frozen" if freeze.get("frozen") and not unfreeze else (
            "never frozen" if not freeze.get("frozen") else "resumed")
        staging = context["ti"].xcom_pull(task_ids="stage_restore", key="staging") or {}
        leftover = staging_leftover(self, staging) if staging else []
        next_action = ("run dr_pitr_rollback with pitr_run_id=" + context["run_id"]
                       if aside.get("moved_to") else "nothing live was changed: fix the cause and trigger again")
        promoted = None
        # the request may be what failed (validate_params): then nothing was promoted
        if isinstance(self.request, dict) and self.req.from_delayed_standby and source_intents(self, context):
            # stage_restore started promoting the delayed standby (its own XCom is gone when it failed)
            promoted = self.req.restore_to
            sb = self.srv.standby(promoted)
            # stop_postgres's own XCom is gone when it failed: whether it ran is in the audit trail
            fence = self.audit(context).events(run_id=context["run_id"], dag_id=context["dag"].dag_id,
                                               action="stop_postgres", limit=1)
            slot = f"; drop its replication slot {sb.replication_slot} there once you give it up (it holds WAL)" \
                if sb.replication_slot and not fence else ""
            next_action = (
                f"{promoted} (the delayed standby) was stopped or promoted at the stop point by this run (socket "
                "only until the old primary is fenced)"
                + (f"; stop_postgres ran: {self.srv.primary.name} is (being) fenced, its data untouched; the app is "
                   f"{app_state}" if fence else
                   f"; the app still runs on {self.srv.primary.name}, which was never stopped{slot}")
                + ": fix the cause and clear the failed task to finish the run (each step converges), or trigger "
                  f"with source=barman; {promoted} is no longer a delayed standby: rebuild it before relying on it")
        if leftover:
            next_action += (f"; staging directories left on {staging.get('host')}: {', '.join(leftover)} (restore "
                            "copies, not live data: delete them once no longer needed)")
        held = (self.upstream(context, "verify_target") or {}).get("barman_wal") or {}
        # reserved, whoever created it (a retried verify_target finds its own earlier try's slot): it holds WAL
        if held.get("reserved") and not self.upstream(context, "rebase_barman"):
            next_action += (f"; Barman's replication slot {held.get('slot')} holds WAL on the recovered server "
                            f"({held.get('instance')}) until Barman streams from it (rebase_barman did not finish). "
                            "If Barman will not stream from that server, drop it "
                            f"(SELECT pg_drop_replication_slot('{held.get('slot')}'))")
        kept = (self.upstream(context, "resume_delayed_replay") or {}).get("kept_paused") or []
        if kept:
            next_action += (f"; delayed standby {', '.join(kept)} kept PAUSED (it may be the last copy without the "
                            "damage): resume it (SELECT pg_wal_replay_resume()) only once the server is recovered")
        summary = {"failed_tasks": failed, "errors": failures, "app": app_state, "promoted_delayed_standby": promoted,
                   "old_data_directory": aside.get("moved_to"), "staging_leftover": leftover,
                   "staging_host": staging.get("host"), "next_action": next_action}
        first = f"{failures[0]['task']}: {failures[0]['error'][:600]}" if failures else "an unrecorded step"
        set_run_note(context["dag"].dag_id, context["run_id"],
                     f"PITR FAILED at {first}\napp {app_state}; old data: {aside.get('moved_to') or 'untouched'}; "
                     f"next: {summary['next_action']}")
        return summary

    def execute(self, context: Any) -> Any:
        summary = super().execute(context)
        # this task is a leaf: failing it makes the DAG run's state say what happened
        raise AirflowFailException(
            f"PITR failed at {', '.join(summary['failed_tasks']) or 'an earlier step'}; app: {summary['app']}; "
            f"original data: {summary['old_data_directory'] or 'untouched'}. NEXT: {summary['next_action']}")


class ReleaseLockOperator(DrBaseOperator):
    """Always last: release this run's server lock (a no-op when the run never took it)."""
    runs_on_site = False  # bookkeeping: the `default` queue

    action = "release_lock"

    def execute(self, context: Any) -> Any:
        conf = dict(getattr(context.get("dag_run"), "conf", None) or {})
        server = conf.get("server") or dict(context.get("params") or {}).get("server")
        if not isinstance(server, str):
            return {"released": False}
        released = ServerLock(postgres_conn_id=self.audit_conn_id).release(
            server, dag_id=context["dag"].dag_id, run_id=context["run_id"])
        if released:
            AuditTrail(postgres_conn_id=self.audit_conn_id, context=self.audit_context(context)).record(
                "release_lock", "ok", server=server)
        return {"released": released}
