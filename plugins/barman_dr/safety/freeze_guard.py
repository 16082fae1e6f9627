"""The app frozen with nobody watching: the out-of-band check behind dr_freeze_guard.

A DR run freezes the app (PgBouncer PAUSE) before it stops PostgreSQL and resumes it
after the data is proven. If the run dies in between (the Airflow host restarts, the
scheduler is SIGKILLed, a task fails and the on-call misses the page), the app stays
frozen: clients stall silently, nothing errors. This check runs on its own schedule,
outside the frozen run's tasks. For each server it reads the live PgBouncer state and the
audit trail (which run froze the app, when, what that run did last, whether it still holds
the server lock), and when the app has been frozen for longer than the server's
`max_freeze_seconds` it alerts with the run and the next step. It never unfreezes: the
data behind a frozen app may not be proven yet, and only a person (or the run itself)
may decide to let writes in again.

`assess` is pure (unit-tested); the operator gathers the facts and sends the alert.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from barman_dr.safety.ownership import Owner

OK, FROZEN, ALERT = "ok", "frozen", "alert"


@dataclass(frozen=True)
class FreezeVerdict:
    server: str
    status: str  # ok | frozen (within max_freeze) | alert
    message: str
    next_step: str | None = None
    run_id: str | None = None
    dag_id: str | None = None
    frozen_since: str | None = None
    frozen_for_s: float | None = None
    max_freeze_s: int | None = None
    paused: bool | None = None
    repeat: bool = False  # an alert for this freeze was already sent less than max_freeze ago

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def last_step(run_events: Sequence[Mapping[str, Any]]) -> str | None:
    """`<action> <outcome> at <time>` of the run's newest event (events newest first, as the trail returns them)."""
    for e in run_events:
        if e.get("action") not in ("notify", "freeze_guard"):
            return f"{e.get('task_id') or e.get('action')} {e.get('outcome')} at {e.get('event_time')}"
    return None


def failures(run_events: Sequence[Mapping[str, Any]]) -> list[str]:
    """The run's failed or refused steps, oldest first, with the first line of each error."""
    out = []
    for e in reversed(list(run_events)):
        if e.get("outcome") in ("failed", "refused") and e.get("action") not in ("notify",):
            err = str((e.get("details") or {}).get("error") or "").strip().splitlines()
            out.append(f"{e.get('task_id') or e.get('action')}: {err[0][:200] if err else e.get('outcome')}")
    return out


def moved_aside(run_events: Sequence[Mapping[str, Any]]) -> str | None:
    for e in run_events:
        if e.get("action") == "move_aside" and e.get("outcome") == "ok":
            return (e.get("details") or {}).get("moved_to")
    return None


def assess(server: str, *, paused: bool | None, frozen_by: Owner | None, lock: Owner | None,
           run_events: Sequence[Mapping[str, Any]], last_alert_at: str | None, now: datetime,
           max_freeze_s: int) -> FreezeVerdict:
    """Is the app of `server` frozen longer than allowed, by which run, and what should a person do now?

    `paused` is PgBouncer's live state (None: not observable, e.g. a freeze command, or the
    console unreachable); `frozen_by` the run that froze the app and has not resumed it
    (barman_dr.safety.ownership); `lock` the server lock's holder.
    """
    repeat = bool(last_alert_at and (now - _parse(last_alert_at)).total_seconds() < max_freeze_s)
    if frozen_by is None:
        if paused and lock is not None:
            # PAUSE waits for in-flight transactions before freeze_app records it: that run is freezing
            return FreezeVerdict(server, FROZEN, f"{server}: paused while {lock.dag_id} run {lock.run_id!r} holds the "
                                 "lock (freezing)", paused=True, run_id=lock.run_id, dag_id=lock.dag_id,
                                 max_freeze_s=max_freeze_s)
        if paused:
            return FreezeVerdict(
                server, ALERT, f"{server}: the app is paused in PgBouncer, but no barman-dr run froze it (no "
                "freeze_app event without a later resume in the audit trail)", paused=True, max_freeze_s=max_freeze_s,
                next_step="Someone paused it by hand or with another tool: find out who before you RESUME it on "
                          "the PgBouncer console. barman-dr does not unfreeze it.", repeat=repeat)
        return FreezeVerdict(server, OK, f"{server}: the app is not frozen", paused=paused)
    if paused is False:
        return FreezeVerdict(
            server, OK, f"{server}: {frozen_by.dag_id} run {frozen_by.run_id!r} froze the app at {frozen_by.since} and "
            "it is serving again (resumed outside barman-dr: the audit trail has no resume event)", paused=False,
            run_id=frozen_by.run_id, dag_id=frozen_by.dag_id,
            next_step="Nothing to do for the freeze; note in the incident who resumed it and whether the data was "
                      "proven first (the run's verify_target and validate_data).")
    since = _parse(frozen_by.since)
    frozen_for = round((now - since).total_seconds(), 1)
    base = dict(run_id=frozen_by.run_id, dag_id=frozen_by.dag_id, frozen_since=frozen_by.since,
                frozen_for_s=frozen_for, max_freeze_s=max_freeze_s, paused=paused)
    if frozen_for <= max_freeze_s:
        return FreezeVerdict(server, FROZEN, f"{server}: frozen for {frozen_for:.0f}s by {frozen_by.dag_id} run "
                             f"{frozen_by.run_id!r} (within max_freeze_seconds={max_freeze_s})", **base)
    step = last_step(run_events) or "no event"
    aside = moved_aside(run_events)
    kept = f" The original data directory is kept at {aside}." if aside else ""
    if lock is not None and lock.run_id == frozen_by.run_id:
        state = f"The run still holds the server lock: it has not ended. Its last step: {step}."
        nxt = ("If that step is not moving, Airflow's scheduler or workers are down: bring them back (the lab: "
               "`make lab-up`; production: your service manager). The run's tasks are then retried and it converges "
               "or fails safe by itself. Do not RESUME the app by hand before the run has proven the data." + kept)
    else:
        failed = failures(run_events)
        where = f" It failed at: {'; '.join(failed[-3:])}." if failed else ""
        state = f"The run has ended without resuming the app.{where} Its last step: {step}."
        nxt = (f"Read the run's failure_summary (Airflow UI, or the DR page).{kept} To go back to the data as it was "
               f"before the PITR, trigger dr_pitr_rollback with server={server}, pitr_run_id={frozen_by.run_id}, "
               f"confirm='ROLLBACK {server}'. To keep the recovered data, fix the cause and clear the failed task. "
               "barman-dr never unfreezes on its own.")
    return FreezeVerdict(
        server, ALERT, f"{server}: the app has been FROZEN for {frozen_for:.0f}s (max_freeze_seconds={max_freeze_s}) "
        f"by {frozen_by.dag_id} run {frozen_by.run_id!r}, frozen at {frozen_by.since}. {state}", next_step=nxt,
        repeat=repeat, **base)
