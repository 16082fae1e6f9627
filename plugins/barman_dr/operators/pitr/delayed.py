"""A PITR freezes the server's delayed standbys in time while it runs, and lets them go when it ends.

A delayed standby (inventory `delayed:`) has not applied the damage yet when the damage is
younger than its delay. That holds only while nobody reads the plan for longer than the delay:
as soon as the request is validated (the first site step, `resolve_target`), the run pauses
its replay (`pg_wal_replay_pause()`) and records where it stopped (replay LSN and the time
of the last transaction it applied: damage after that is not on it). It streams on, so
nothing is lost, it only stops applying.

`resume_delayed_replay` (all_done: plan only, rejected, timed out, failed before the freeze,
or done) resumes exactly the standbys this run paused, read back from the audit trail. One
found paused already (a DBA's pause) is recorded as such and never resumed by the run. Runs
that overlap (a plan-only run beside a real one waiting for approval) share a pause: one that
finds the pause of another live run in place holds it too, and only the last holder to end
resumes it (`other_pause_holders`). A standby the run rebuilt is a new copy, not paused.
A standby that cannot be paused (down, unreachable) is recorded and does not stop the run
(unless it was asked for as the source: `choose_source`). After a failure at or past the
freeze, or past the promotion of the delayed standby the run recovers from, the others stay
paused: they may be the last copies without the damage.
"""

from __future__ import annotations

from typing import Any

from barman_dr.exceptions import BarmanDrError, PreflightError
from barman_dr.inventory import Instance
from barman_dr.models import Lsn
from barman_dr.operators.base import DrBaseOperator

#: on the standby: was a pause requested already (by a DBA: never resumed by the run)
PAUSED_SQL = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END"
PAUSE_SQL = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_wal_replay_pause() END"
RESUME_SQL = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_wal_replay_resume() END"
#: PostgreSQL 14+: 'pause requested' becomes 'paused' when the startup process actually stops
PAUSE_STATE_SQL = "SELECT CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE 'not paused' END"
#: where it stands: recovery, paused, replay LSN, last applied commit, and the timeline it follows
#: (the walreceiver's; the last restartpoint's when it is not streaming)
STATE_SQL = ("SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END, "
             "pg_last_wal_replay_lsn(), pg_last_xact_replay_timestamp(), "
             "coalesce((SELECT received_tli FROM pg_stat_wal_receiver), "
             "(SELECT timeline_id FROM pg_control_checkpoint()))")


def _state(row: str) -> dict[str, Any]:
    in_rec, paused, lsn, ts, tli = (row.split("|") + [""] * 5)[:5]
    return {"in_recovery": in_rec == "t", "paused": paused == "t", "replay_lsn": lsn or None,
            "last_applied_commit": ts or None, "timeline": int(tli) if tli.isdigit() else None}


def delayed_source_verdict(stop: dict[str, Any], paused: dict[str, Any]) -> dict[str, Any]:
    """Could this paused delayed standby reach the resolved stop point by replaying forward, in seconds?

    Yes when it is paused in recovery on the stop point's timeline, *before* the stop record
    (replay LSN < stop LSN): the damage is not on it. No when it already applied the stop
    record or anything after it, or follows another timeline (the target is older than its
    last rebuild), or could not be paused. The plan says which, and why.
    """
    name = paused.get("standby")
    if paused.get("error") or not paused.get("paused"):
        return {"standby": name, "usable": False, "why": f"not paused ({paused.get('error') or 'unknown state'})"}
    replay, tli = paused.get("replay_lsn"), paused.get("timeline")
    if not (replay and stop.get("lsn")):
        return {"standby": name, "usable": False, "why": "its replay position or the stop point is unknown"}
    if tli is not None and stop.get("timeline") is not None and int(tli) != int(stop["timeline"]):
        return {"standby": name, "usable": False,
                "why": f"it follows timeline {tli}, the stop point is on timeline {stop['timeline']}"}
    # recovery stops before the stop record (`before`), or right after it (`after`, inclusive)
    boundary = str(stop.get("end_lsn") or stop["lsn"]) if stop.get("when") == "after" else str(stop["lsn"])
    if Lsn.parse(str(replay)) > Lsn.parse(boundary):
        return {"standby": name, "usable": False,
                "why": f"it already applied past the stop point (replay {replay} > {boundary}): the target is "
                       "older than its window"}
    return {"standby": name, "usable": True,
            "why": f"paused at {replay}, before the stop point {stop['lsn']}: the damage is not on it, it "
                   "reaches the target by replaying forward"}


def delayed_standbys(op: DrBaseOperator) -> list[Instance]:
    """The server's delayed standbys (not the spares), except one a Barman restore overwrites.

    With `source: auto | delayed_standby` every delayed standby is paused, the one that may
    become the recovered server first of all.
    """
    target = None if op.req.in_place or op.req.source != "barman" else op.req.restore_to
    return [s for s in op.srv.delayed_standbys if s.name != target]


def source_blocker(srv: Any, req: Any) -> str | None:
    """Why no delayed standby can be this run's source whatever its replay position (None: it may be)."""
    from barman_dr.params.pitr_request import repoint_blocker

    if req.target.kind == "immediate":
        return "target_immediate is the end of a base backup"
    blocker = repoint_blocker(srv)
    return f"the app could not be pointed at the promoted standby: {blocker}" if blocker else None


def choose_source(req: Any, srv: Any, stop: dict[str, Any], paused: list[dict[str, Any]]) -> dict[str, Any]:
    """Where this run recovers from, once the stop point is known: Barman, or a delayed standby promoted at it.

    `barman`: Barman. `delayed_standby`: the first delayed standby (restore_to's when it names one)
    that can reach the stop point by replaying forward (`delayed_source_verdict`); none can:
    refused, nothing touched. `auto`: the same, falling back to Barman (staged as requested), with
    the reason the plan shows. Returned as resolve_target's XCom `source`, which every later step
    reads its request through (`DrBaseOperator.effective_request`).
    """
    barman = {"chosen": "barman", "restore_to": req.restore_to, "standby": None, "requested": req.source}
    if req.source == "barman":
        return {**barman, "why": "source=barman: restore a Barman backup and replay its WAL"}
    candidates = [s for s in srv.delayed_standbys if req.in_place or s.name == req.restore_to]
    by_name = {p.get("standby"): p for p in paused}
    blocker = source_blocker(srv, req)
    verdicts = []
    for sb in candidates:
        why = blocker or (None if sb.restore_command else
                          "it has no restore_command in the inventory: without Barman's archive it could pick a "
                          "timeline id Barman already holds, and could not fetch WAL the primary no longer has")
        verdicts.append({"standby": sb.name, "usable": False, "why": why} if why else delayed_source_verdict(
            stop, by_name.get(sb.name) or {"standby": sb.name, "error": "not paused by this run"}))
    if not candidates and not req.in_place:
        verdicts = [{"standby": req.restore_to, "usable": False, "why": f"restore_to {req.restore_to} is not a "
                                                                       "delayed standby"}]
    usable = next((v for v in verdicts if v["usable"]), None)
    if usable:
        return {"chosen": "delayed_standby", "restore_to": usable["standby"], "standby": usable["standby"],
                "requested": req.source, "why": f"delayed standby {usable['standby']} {usable['why']}",
                "verdicts": verdicts}
    why = "; ".join(f"{v['standby']}: {v['why']}" for v in verdicts) or "no delayed standby"
    if req.source == "delayed_standby":
        raise PreflightError(
            f"source=delayed_standby: no delayed standby of {srv.name} can serve this stop point ({why}). Nothing was "
            "touched; the delayed standbys' replay stays paused until this run ends. Fix: trigger again with "
            "source=auto (falls back to Barman) or source=barman")
    staged = "staged" if req.staged_restore else "unstaged"
    return {**barman, "verdicts": verdicts,
            "why": f"source=auto: falling back to Barman ({staged} restore): the delayed standby cannot serve this "
                   f"target ({why})"}


def source_intents(op: DrBaseOperator, context: Any) -> list[dict[str, Any]]:
    """This run's `delayed_source` intents, oldest first: stage_restore audits one before it stops or promotes a
    delayed standby (the audit trail, not an XCom: Airflow clears a task's own XComs when a new try starts)."""
    events = op.audit(context).events(run_id=context["run_id"], dag_id=context["dag"].dag_id, action="delayed_source",
                                      limit=20)
    return [e for e in reversed(events) if e.get("outcome") == "started" and e.get("target")]


#: Airflow states of a dag run that may still need the pause it holds
_LIVE_RUN_STATES = ("queued", "running")


def holds_pause(intent: dict[str, Any]) -> bool:
    """Does a run's first pause intent make the pause its own to undo? Not when it found a DBA's pause.

    A pause found in place is a DBA's (or one a failed run kept on purpose: the last copy without
    the damage) unless another live dr_pitr run held it then (`shared_with`): that pause is shared,
    and the last holder to end resumes it.
    """
    return not intent.get("already_paused") or bool(intent.get("shared_with"))


def _run_state(context: Any, dag_id: str, run_id: str) -> str:
    """The Airflow state of another run (the task SDK's own call, a `DagRunState`) as its value.

    "gone" when Airflow no longer has that run (deleted: it cannot need a pause); "unknown" when
    the state cannot be read (counted as live: the pause is kept, never undone under a run).
    """
    try:
        state = context["ti"].get_dagrun_state(dag_id=dag_id, run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        text = str(exc).lower()
        return "gone" if "404" in text or "not found" in text or "not_found" in text else "unknown"
    return str(getattr(state, "value", state))


def other_pause_holders(op: DrBaseOperator, context: Any, standby: str, *, releasing_too: bool = False) -> list[str]:
    """The *other* dr_pitr runs, still live, that hold a pause on `standby` and have not released it.

    Two runs of one server may overlap (a plan-only run beside a real one waiting for approval):
    the first to end must not resume a replay the other still relies on, or its window slides
    past the other's target while people read its plan. Read from the audit trail (every run's
    first intent, and `delayed_replay_released`); a run's liveness from Airflow. A run whose
    state cannot be read counts as live: keeping a replay paused is safe (the standby streams on,
    and the daily verification reports one paused past its window); resuming it under a run is not.

    `releasing_too` (a run about to pause): a live run that has released its hold may be resuming
    right now, so the new run counts it as a holder it shares with; that run's resume step then
    sees the new holder and pauses again.
    """
    audit = op.audit(context)
    me = (context["dag"].dag_id, context["run_id"])

    def of_standby(action: str) -> list[dict[str, Any]]:
        return [e for e in audit.events(server=op.srv.name, action=action, limit=200) if e.get("target") == standby]

    # a run whose resume step finished (resumed, kept, or left it to another) holds nothing any more,
    # and never pauses again; one that released but has not finished may be resuming right now
    finished = {(e.get("dag_id"), e.get("run_id")) for e in
                audit.events(server=op.srv.name, action=ResumeDelayedReplayOperator.action, limit=200)
                if e.get("outcome") == "ok"}
    released = finished | {(e.get("dag_id"), e.get("run_id")) for e in of_standby("delayed_replay_released")}
    paused = of_standby("delayed_replay_paused")
    first = first_pause_intents(paused, key=lambda e: (e.get("dag_id"), e.get("run_id")))
    kept = of_standby("delayed_replay_kept_paused")
    if releasing_too:
        # the pause found in place comes from a run that kept it on purpose, unless a later run
        # found the standby replaying (a DBA resumed it since): a kept pause is a DBA's to undo
        fresh = [int(e.get("event_id") or 0) for e in paused
                 if e.get("outcome") == "started" and not (e.get("details") or {}).get("already_paused")]
        if any(int(e.get("event_id") or 0) > max(fresh, default=0) for e in kept):
            return []
    holders = []
    for key, event in first.items():
        if key == me or key in (finished if releasing_too else released) or not holds_pause(event.get("details") or {}):
            continue
        if _run_state(context, str(key[0]), str(key[1])) in (*_LIVE_RUN_STATES, "unknown"):
            holders.append(str(key[1]))
    # a run that kept the pause on purpose (it failed at or after the freeze: the last copy without
    # the damage) while this run held it: this run must not undo that. One kept before this run
    # paused was found paused, so this run never held it (holds_pause) and never gets here.
    if me in first:
        mine = int(first[me].get("event_id") or 0)
        holders += [f"{e.get('run_id')} (kept paused)" for e in kept
                    if int(e.get("event_id") or 0) > mine and (e.get("dag_id"), e.get("run_id")) != me]
    return holders


def first_pause_intents(events: list[dict[str, Any]], key: Any) -> dict[Any, dict[str, Any]]:
    """The first `delayed_replay_paused` intent (a `started` event) per `key(event)`, from events newest first.

    The first one says whether the pause was found in place: a retry re-records its intent, and must
    not mistake its own earlier pause for a DBA's.
    """
    first: dict[Any, dict[str, Any]] = {}
    for e in reversed(events):  # oldest first
        if e.get("outcome") == "started" and e.get("target"):
            first.setdefault(key(e), e)
    return first


def _run_pause_events(op: DrBaseOperator, context: Any) -> list[dict[str, Any]]:
    return op.audit(context).events(run_id=context["run_id"], dag_id=context["dag"].dag_id,
                                    action="delayed_replay_paused", limit=100)


def _first_pause_intent(op: DrBaseOperator, context: Any, standby: str) -> dict[str, Any] | None:
    """This run's first `delayed_replay_paused` intent for `standby`'s details, or None."""
    first = first_pause_intents(_run_pause_events(op, context), key=lambda e: e["target"]).get(standby)
    return (first.get("details") or {}) if first else None


def pause_delayed_replay(op: DrBaseOperator, context: Any, settle_s: float = 1.0) -> list[dict[str, Any]]:
    """Pause each delayed standby's replay; audited (intent, then ok or failed). Never raises.

    The intent (with whether a pause was requested already) is recorded *before* pausing, so a
    retry after a try that paused and died still knows the pause is this run's to undo.
    """
    import time

    audit = op.audit(context)
    out = []
    for sb in delayed_standbys(op):
        try:
            db = op.db(sb.host)
            intent = _first_pause_intent(op, context, sb.name)
            if intent is None:
                intent = {"standby": sb.name, "already_paused": db.psql(sb, PAUSED_SQL) == "t"}
                if intent["already_paused"]:  # a DBA's, or another live run's that this run now shares
                    intent["shared_with"] = other_pause_holders(op, context, sb.name, releasing_too=True)
                audit.record("delayed_replay_paused", "started", server=op.srv.name, target=sb.name, details=intent)
            db.psql(sb, PAUSE_SQL)
            deadline = time.monotonic() + settle_s
            pause_state = db.psql(sb, PAUSE_STATE_SQL)
            while pause_state == "pause requested" and time.monotonic() < deadline:
                time.sleep(0.25)
                pause_state = db.psql(sb, PAUSE_STATE_SQL)
            state = {"standby": sb.name, "already_paused": bool(intent.get("already_paused")),
                     "shared_with": list(intent.get("shared_with") or []), "pause_state": pause_state,
                     **_state(db.psql(sb, STATE_SQL))}
            outcome = "ok" if state["paused"] else "failed"
            if not state["in_recovery"]:
                state["error"] = "not in recovery (promoted?): nothing to pause"
        except Exception as exc:  # noqa: BLE001 - a delayed standby that cannot be paused must not stop the PITR
            state, outcome = {"standby": sb.name, "error": f"{type(exc).__name__}: {exc}"[:500]}, "failed"
            op.log.warning("could not pause the replay of delayed standby %s: %s", sb.name, exc)
        audit.record("delayed_replay_paused", outcome, server=op.srv.name, target=sb.name, details=state)
        out.append(state)
    return out


class ResumeDelayedReplayOperator(DrBaseOperator):
    """Always (all_done): resume the delayed standbys this very run paused, unless it left the server broken.

    Resumed when the run succeeded, or ended before anything live changed (plan only, rejected,
    timed out, or failed before the freeze). After a failure at or past the freeze the delayed
    standby may be the last copy without the damage: it stays paused, audited (`kept_paused`),
    and the failure summary's page says so. Each standby on its own: one that does not answer
    does not keep the others paused; the task then fails naming it.
    """

    action = "resume_delayed_replay"
    # on `default`, like release_lock: it must run even when the site's queue has no worker (a run
    # refused at validate_params paused nothing and ends at once); with pauses to undo it reaches the
    # db hosts from the central worker, best effort, and fails the run naming what stays paused
    runs_on_site = False

    def execute(self, context: Any) -> Any:
        if self.request is None and self.request_task_id:
            self.request = context["ti"].xcom_pull(task_ids=self.request_task_id)
        if not isinstance(self.request, dict):  # the request was never validated: nothing was paused
            return {"resumed": []}
        return super().execute(context)

    def paused_by_this_run(self, context: Any) -> list[str]:
        """Standbys this run holds a pause on: its first intent found none, or shared a live run's (a DBA's stays)."""
        first = first_pause_intents(_run_pause_events(self, context), key=lambda e: str(e["target"]))
        return sorted(name for name, e in first.items() if holds_pause(e.get("details") or {}))

    def left_broken(self, context: Any) -> bool:
        """The run reached the freeze (something live changed) and did not finish with its report."""
        audit = self.audit(context)
        run = {"run_id": context["run_id"], "dag_id": context["dag"].dag_id}
        # the freeze, or (source delayed_standby) the promotion of the delayed standby before it
        froze = bool(audit.events(**run, action="freeze_app", limit=1)) or bool(source_intents(self, context))
        reported = any(e.get("outcome") == "ok" for e in audit.events(**run, action="report", limit=5))
        return froze and not reported

    def run(self, context: Any) -> dict[str, Any]:
        names = self.paused_by_this_run(context)
        # the standby this run recovers onto (promoted, or restored over by Barman) is the server now, not paused
        promoted = None if self.req.in_place else self.req.restore_to
        standbys = [s for s in self.srv.standbys if s.name in names and s.name != promoted]
        if standbys and self.left_broken(context):
            for sb in standbys:
                self.audit(context).record("delayed_replay_kept_paused", "ok", server=self.srv.name, target=sb.name,
                                           details={"reason": "the PITR failed at or after the freeze: this delayed "
                                                              "standby may be the last copy without the damage"})
            return {"resumed": [], "kept_paused": [s.name for s in standbys], "recovered_onto": promoted}
        resumed, failed, shared = [], [], []
        audit = self.audit(context)
        for sb in standbys:
            try:
                # released first: a run starting now sees this one gone and pauses on its own
                audit.record("delayed_replay_released", "ok", server=self.srv.name, target=sb.name)
                others = other_pause_holders(self, context, sb.name)
                if others:  # the last holder resumes it
                    audit.record("delayed_replay_left_paused", "ok", server=self.srv.name, target=sb.name,
                                 details={"held_by": others})
                    shared.append({"standby": sb.name, "held_by": others})
                    continue
                db = self.db(sb.host)
                db.psql(sb, RESUME_SQL)
                # a run that paused between the check and the resume (it found the pause in place and
                # counted on it) gets its pause back: pausing twice is harmless, resuming under it is not
                again = other_pause_holders(self, context, sb.name)
                if again:
                    db.psql(sb, PAUSE_SQL)
                    audit.record("delayed_replay_left_paused", "ok", server=self.srv.name, target=sb.name,
                                 details={"held_by": again, "paused_again": True})
                    shared.append({"standby": sb.name, "held_by": again})
                    continue
                state = {"standby": sb.name, **_state(db.psql(sb, STATE_SQL))}
                (failed if state["paused"] else resumed).append(state)
            except Exception as exc:  # noqa: BLE001 - the others are still resumed; this task fails below
                failed.append({"standby": sb.name, "error": f"{type(exc).__name__}: {exc}"[:300]})
        if failed:
            raise BarmanDrError(f"delayed standby replay still paused: {failed} (resumed: "
                                f"{[s['standby'] for s in resumed]})")
        out: dict[str, Any] = {"resumed": resumed, "recovered_onto": promoted}
        if shared:
            out["left_paused_for"] = shared
        return out

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("A delayed standby this run paused may still be paused: run SELECT pg_wal_replay_resume() on it "
                "(its data is safe: it streams on, it only stopped applying), or clear this task.")
