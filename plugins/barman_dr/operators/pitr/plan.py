"""Plan: what will happen, what it costs and what it discards, into the audit trail and the run note.

Without the typed confirmation the run stops here (skipped), having touched nothing."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from barman_dr.exceptions import BarmanDrError
from barman_dr.hooks.dbhost import (
    staging_paths,
)
from barman_dr.models import Lsn
from barman_dr.operators.base import DrBaseOperator
from barman_dr.operators.pitr.delayed import delayed_source_verdict
from barman_dr.operators.pitr.post_incident import standbys_to_rebuild
from barman_dr.operators.pitr.resolve import resolution_for
from barman_dr.rto_estimate import Calibration
from barman_dr.rto_estimate import estimate as estimate_rto_for
from barman_dr.surfaces.run_note import set_run_note


def discarded_lines(disc: dict[str, Any], limit: int = 6) -> list[str]:
    """What a PITR throws away, in a few lines: count, first/last commit, per table, total."""
    if not disc:
        return ["discarded: not computed"]
    n = disc.get("transactions_with_changes", 0)
    lines = [f"discarded: {n} transaction(s) with changes committed after the stop point"
             + (f" ({disc.get('first_commit', '')[:23]} .. {disc.get('last_commit', '')[:23]})" if n else "")
             + f"; {disc.get('transactions', 0)} commits in all"]
    tables = disc.get("tables") or {}
    for name, c in sorted(tables.items(), key=lambda kv: -sum(kv[1].values()))[:limit]:
        lines.append(f"  {name}: +{c['inserted']} inserted, {c['updated']} updated, -{c['deleted']} deleted")
    if len(tables) > limit:
        lines.append(f"  ... {len(tables) - limit} more table(s) (audit trail)")
    t = disc.get("total") or {}
    if tables:
        lines.append(f"  total: +{t.get('inserted', 0)} inserted, {t.get('updated', 0)} updated, "
                     f"-{t.get('deleted', 0)} deleted")
    for w in disc.get("whole_relation") or []:
        lines.append(f"  xid {w['xid']} TRUNCATEd/DROPped relations (rows not counted by the WAL)")
    if disc.get("partial_counts"):
        lines.append(f"  note: {disc['partial_counts']}")
    return lines


def stop_lines(res: dict[str, Any]) -> list[str]:
    stop = res["stop"]
    out = [f"stop: {stop.get('described')}"]
    occ = res.get("occurrences") or []
    if occ:
        out.append("restore point occurrences: " + "; ".join(
            f"#{o['occurrence']} LSN {o['lsn']} (after commit {str(o.get('after_commit_at') or '?')[:23]})"
            + (" <- chosen" if o.get("chosen") else "") for o in occ))
    rt = res["restore_target"]
    if rt != res["requested"]:
        out.append(f"restore asks for: {rt['kind']} {rt['value']} ({'inclusive' if rt['inclusive'] else 'exclusive'}), "
                   "exactly that occurrence")
    return out


def unfreeze_step(srv: Any, in_place: bool, instance: Any, inventory: Any) -> str:
    """The plan's unfreeze line: where the app goes when the server moved, and who moves it."""
    if in_place:
        return "unfreeze app"
    if srv.app_freeze.method == "none":
        addr = inventory.db_host(instance.host).address
        return (f"the app is not managed here (app_freeze.method none): point it at {instance.name} "
                f"({addr}:{instance.port}) yourself; {srv.primary.name} is fenced")
    return f"unfreeze app (repoint PgBouncer to {instance.name})"


class PlanGateOperator(DrBaseOperator):
    """Step 4: the plan (audit + run note): the resolved stop point, the backup and the WAL to replay, what is
    discarded, the RTO for the mode that will run, the steps. Stops here unless the run is confirmed."""
    runs_on_site = False  # bookkeeping: the `default` queue

    action = "plan"

    def calibration(self, context: Any) -> Calibration:
        events: list[dict[str, Any]] = []
        try:
            for action in ("report", "stage_restore", "barman_restore", "start_recovery", "drill_result"):
                events += self.audit(context).events(server=self.srv.name, action=action, limit=20)
        except BarmanDrError:
            return Calibration()
        return Calibration.from_events(events)

    def run(self, context: Any) -> dict[str, Any]:
        req, srv = self.req, self.srv
        pre = self.upstream(context, "preflight")
        wal = self.upstream(context, "wal_coverage")
        res = resolution_for(self, context)
        started = getattr(context.get("dag_run"), "start_date", None)
        elapsed = (datetime.now(UTC) - started).total_seconds() if started else 0.0
        source = (self.upstream(context, "resolve_target") or {}).get("source") or {
            "chosen": "barman", "why": "source=barman"}
        paused = [d for d in (self.upstream(context, "resolve_target") or {}).get("delayed_paused") or []]
        verdicts = [delayed_source_verdict(res["stop"], d) for d in paused]
        from_delayed = req.from_delayed_standby
        replay_bytes = int(res["replay"]["bytes"])
        if from_delayed:  # only what the delayed standby has not applied yet: the stop point minus its replay LSN
            at = next((d.get("replay_lsn") for d in paused if d.get("standby") == source.get("standby")), None)
            replay_bytes = max(Lsn.parse(str(res["stop"]["lsn"])).value - Lsn.parse(str(at)).value, 0) if at else 0
        estimate = estimate_rto_for(backup_bytes=0 if from_delayed else int(pre["backup"].get("size_bytes") or 0),
                                    replay_bytes=replay_bytes, staged=req.staged_restore or from_delayed,
                                    calibration=self.calibration(context), elapsed_s=max(elapsed, 0.0))
        if from_delayed:
            estimate["mode"] = f"delayed standby {source.get('standby')}"
        instance = self.target_instance
        standbys = standbys_to_rebuild(srv, instance)
        rt = res["restore_target"]
        freeze = ("freeze app (PgBouncer PAUSE)" if srv.app_freeze.method == "pgbouncer" else
                  f"freeze app ({srv.app_freeze.method})")
        validate = "validate data: " + (", ".join(f"{k}={v}" for k, v in req.expected.items()) or "report counts")
        unfreeze = unfreeze_step(srv, req.in_place, instance, self.inventory)
        if from_delayed:
            steps = [f"stop delayed standby {instance.name} (paused before the stop point), set recovery_target_"
                     f"{rt['kind']} = {rt['value']} ({'inclusive' if rt['inclusive'] else 'exclusive'}), "
                     f"recovery_target_timeline {res['recovery_timeline']}, recovery_target_action promote, "
                     "recovery_min_apply_delay 0; start it: it replays only what it has not applied "
                     f"({replay_bytes / 1048576:,.1f} MiB) up to the stop point and promotes, while the app still runs "
                     "(its writes from now on are discarded too)",
                     f"prove the stop there: {res['stop']['described']} (server log + timeline history); {validate}",
                     freeze,
                     f"fence {srv.primary.name}: stop it, its data directory untouched (forensics, dr_salvage)",
                     "prove the stop again and validate data on the recovered server",
                     unfreeze,
                     "list what was actually discarded up to the freeze",
                     f"rebuild standbys: {', '.join(standbys) or '(none)'}",
                     f"Barman follows {instance.name} (config-update), re-point it at the new timeline, full backup",
                     "report RTO"]
        else:
            steps = self.barman_steps(context, req, srv, pre, res, instance, standbys, freeze, validate, unfreeze)
        steps = [*(f"delayed standby {d['standby']}: NOT paused ({d['error']})" if d.get("error") else
                   f"delayed standby {d['standby']}: replay paused at {d.get('replay_lsn')} (last applied commit "
                   f"{d.get('last_applied_commit')}: damage after it is not on it); "
                   + ("it was paused already (by hand or another run): left paused when this run ends"
                      if d.get("already_paused") else
                      "it becomes the recovered server" if from_delayed and d["standby"] == instance.name else
                      "resumed when this run ends, unless it fails at or after the freeze (then kept paused)")
                   for d in paused),
                 *(f"delayed standby {v['standby']} {'COULD' if v['usable'] else 'could not'} serve this target: "
                   f"{v['why']}" for v in verdicts),
                 f"SOURCE: {'delayed standby ' + str(source.get('standby')) if from_delayed else 'Barman'}: "
                 f"{source.get('why')}", *steps]
        replay = res["replay"]
        plan = {
            "server": srv.name, "target": req.target.to_dict(), "stop": res["stop"],
            "restore_target": rt, "occurrences": res.get("occurrences") or [],
            "recovery_timeline": res["recovery_timeline"], "backup_id": pre["backup_id"],
            "backup_end_time": pre["backup"].get("end_time"), "wal_range": [wal["first_wal"], wal["last_wal"]],
            "wal_segments": wal["wal_segments"], "replay": replay, "restore_to": instance.name,
            "estimated_rto": estimate, "rto_objective_s": srv.rto_objective_seconds, "steps": steps,
            "confirmed": req.confirmed, "plan_only": req.plan_only, "standbys": standbys, "staged_restore": req.staged_restore,
            "discarded": {k: v for k, v in (res.get("discarded") or {}).items() if k != "xid_ranges"},
            "warnings": pre.get("warnings") or [],
            "delayed_paused": paused,
            "delayed_source": verdicts,
            "source": source,
        }
        text = plan_text(plan, srv.name, req)
        plan["text"] = text
        self.audit(context).record("plan", "planned", server=srv.name, target=req.target.describe(), details=plan)
        set_run_note(context["dag"].dag_id, context["run_id"], text)
        self.log.info("%s", text)
        return plan

    def barman_steps(self, context: Any, req: Any, srv: Any, pre: dict[str, Any], res: dict[str, Any], instance: Any,
                     standbys: list[str], freeze: str, validate: str, unfreeze: str) -> list[str]:
        rt = res["restore_target"]
        restore = (f"barman restore {pre['backup_id']} (target {rt['kind']} {rt['value']}"
                   f"{'' if rt['inclusive'] else ' exclusive'}, jobs={req.jobs}, --target-action promote)")
        if req.staged_restore:
            staged, _ = staging_paths(instance.data_directory, self.run_tag(context))
            before = [f"check free space next to {instance.data_directory} on {instance.host} (backup + WAL + 10%)",
                      f"{restore} to {instance.host}:{staged} while the app still runs (outside the downtime)",
                      "replay the WAL to the stop point in that copy (private socket, no TCP, archive_command=false), "
                      "prove the exact stop there, shut it down cleanly (outside the downtime)"]
            in_window = f"rename {staged} to {instance.data_directory} (same filesystem: instant)"
        else:
            before = []
            in_window = f"{restore} to {instance.host}:{instance.data_directory} (inside the downtime)"
        return [*before, freeze,
                f"stop PostgreSQL {instance.name}" + ("" if req.in_place else f" and fence {srv.primary.name}"),
                f"move {instance.data_directory} aside (kept)",
                in_window,
                "start PostgreSQL, wait for recovery end and promotion",
                f"prove the stop: {res['stop']['described']} (server log + timeline history)",
                validate,
                unfreeze,
                "list what was actually discarded up to the freeze",
                f"rebuild standbys: {', '.join(standbys) or '(none)'}",
                "re-point Barman at the new timeline and take a full backup",
                "report RTO"]


def plan_state(req: Any) -> str:
    """How the plan goes on: pre-approved by confirm, a preview, or waiting for a second person."""
    if getattr(req, "plan_only", False):
        return " (plan only: a preview, nobody is asked)"
    return " (CONFIRMED)" if req.confirmed else " (awaiting approval by a second person)"


def plan_text(plan: dict[str, Any], server: str, req: Any) -> str:
    """The plan as a DBA reads it (the run note, the log, the approval body): most important first."""
    e = plan["estimated_rto"]
    replay = plan["replay"]
    head = [f"PITR plan for {server}" + plan_state(req),
            f"target: {req.target.describe()}",
            *stop_lines({"stop": plan["stop"], "occurrences": plan["occurrences"],
                         "restore_target": plan["restore_target"], "requested": plan["target"]}),
            f"backup: {plan['backup_id']} (ended {plan['backup_end_time']}); replay {replay['bytes'] / 1048576:,.1f} MiB "
            f"of WAL ({replay['first_wal']} .. {replay['last_wal']}, {replay['segments']} segments) along timeline "
            f"{plan['recovery_timeline']}",
            f"WAL proven: {plan['wal_range'][0]} .. {plan['wal_range'][1]} ({plan['wal_segments']} segments)",
            f"estimate ({e['mode']}): downtime {e['downtime_s']:.0f}s, time-to-recovered {e['time_to_recovered_s']:.0f}s "
            f"(objective {plan['rto_objective_s']}s; rates: {e['sources']['restore_rate']})",
            *discarded_lines(plan["discarded"], limit=4)]
    source = plan.get("source") or {}
    if source.get("chosen") == "delayed_standby":
        head.append(f"SOURCE: delayed standby {source.get('standby')} (no backup is copied: the backup line above is "
                    f"what source=barman would restore): {source.get('why')}")
    elif source.get("requested") not in (None, "barman"):
        head.append(f"SOURCE: Barman: {source.get('why')}")
    if plan["staged_restore"] and source.get("chosen") != "delayed_standby":
        head.append("staged: the app keeps writing until the freeze; those writes are discarded too (the report lists "
                    "them; dr_salvage can put their new rows back)")
    if not plan["confirmed"]:
        how = "trigger again with" if req.plan_only else "approve in Required Actions, or trigger again with"
        head.append(f"to execute: {how} confirm = {req.confirm_text()}"
                    + (f" and target_name_lsn = {plan['stop']['lsn']}" if plan["occurrences"] and
                       len(plan["occurrences"]) > 1 else ""))
    steps = [f"{i}. {s}" for i, s in enumerate(plan["steps"], 1)]
    return "\n".join([*head, "steps:", *steps])
