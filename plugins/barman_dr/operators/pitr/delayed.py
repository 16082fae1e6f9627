"""A PITR freezes the server's delayed standbys in time while it runs, and lets them go when it ends.

A delayed standby (inventory `delayed:`) has not applied the damage yet when the damage is
younger than its delay. That holds only while nobody reads the plan for longer than the delay:
as soon as the request is validated (the first site step, `resolve_target`), the run pauses
its replay (`pg_wal_replay_pause()`) and records where it stopped (replay LSN and the time
of the last transaction it applied: damage after that is not on it). It streams on, so
nothing is lost, it only stops applying.

`resume_delayed_replay` (all_done, whatever happened: plan only, rejected, timed out, failed
or done) resumes exactly the standbys this run paused, read back from the audit trail. One
found paused already (a DBA's pause) is recorded as such and never resumed by the run. A
standby the run rebuilt is a new copy, not paused.
A standby that cannot be paused (down, unreachable) is recorded and does not stop the run:
it is a second line of defence, not the recovery source (yet).
"""

from __future__ import annotations

from typing import Any

from barman_dr.exceptions import BarmanDrError
from barman_dr.inventory import Instance
from barman_dr.models import Lsn
from barman_dr.operators.base import DrBaseOperator

#: on the standby: was it paused already (by a DBA: never resumed by the run), pause replay, then where it
#: stands (recovery, paused, replay LSN, last applied commit time)
PAUSE_SQL = ("SELECT CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END",
             "SELECT CASE WHEN pg_is_in_recovery() THEN pg_wal_replay_pause() END",
             "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END, "
             "pg_last_wal_replay_lsn(), pg_last_xact_replay_timestamp(), "
             "(SELECT timeline_id FROM pg_control_checkpoint())")
RESUME_SQL = ("SELECT CASE WHEN pg_is_in_recovery() THEN pg_wal_replay_resume() END",
              "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END, "
              "pg_last_wal_replay_lsn(), pg_last_xact_replay_timestamp()")


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
    """The server's delayed standbys, except the one the run restores onto (it is stopped and replaced)."""
    target = None if op.req.in_place else op.req.restore_to
    return [s for s in op.srv.standbys if s.delayed and s.name != target]


def pause_delayed_replay(op: DrBaseOperator, context: Any) -> list[dict[str, Any]]:
    """Pause each delayed standby's replay; one audit event each (ok, or failed with the error). Never raises."""
    audit = op.audit(context)
    out = []
    for sb in delayed_standbys(op):
        try:
            lines = op.db(sb.host).psql_each(sb, list(PAUSE_SQL)).splitlines()
            state = {"standby": sb.name, "already_paused": bool(lines) and lines[0] == "t",
                     **_state(lines[-1] if lines else "")}
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
    """Always (all_done): resume the replay of the delayed standbys this very run paused."""

    action = "resume_delayed_replay"

    def execute(self, context: Any) -> Any:
        if self.request is None and self.request_task_id:
            self.request = context["ti"].xcom_pull(task_ids=self.request_task_id)
        if not isinstance(self.request, dict):  # the request was never validated: nothing was paused
            return {"resumed": []}
        return super().execute(context)

    def paused_by_this_run(self, context: Any) -> list[str]:
        events = self.audit(context).events(run_id=context["run_id"], dag_id=context["dag"].dag_id,
                                            action="delayed_replay_paused", limit=100)
        # a standby found paused already (a DBA's pause, e.g. for forensics) stays paused
        return sorted({str(e["target"]) for e in events if e.get("outcome") == "ok" and e.get("target")
                       and not (e.get("details") or {}).get("already_paused")})

    def run(self, context: Any) -> dict[str, Any]:
        names = self.paused_by_this_run(context)
        resumed, left = [], []
        for sb in (s for s in self.srv.standbys if s.name in names):
            lines = self.db(sb.host).psql_each(sb, list(RESUME_SQL)).splitlines()
            state = {"standby": sb.name, **_state(lines[-1] if lines else "")}
            (left if state["paused"] else resumed).append(state)
        if left:
            raise BarmanDrError(f"delayed standby replay still paused after pg_wal_replay_resume(): "
                               f"{[s['standby'] for s in left]}")
        return {"resumed": resumed}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("A delayed standby this run paused may still be paused: run SELECT pg_wal_replay_resume() on it "
                "(its data is safe: it streams on, it only stopped applying), or clear this task.")
