"""The operator base every barman-dr step builds on.

The provider contract (apache/airflow providers/ssh, providers/postgres): keyword-only
`__init__` that only assigns, `template_fields`, hooks as `cached_property`, no I/O at
import or in `__init__`, JSON-serialisable return values, `on_kill`.

Every step is audited the same way: a `started` event, then `ok` (with the step's
result) or `failed` (with the error), each with the duration. Errors that a retry cannot
fix (invalid input, a failed safety check, a held lock, a changed host key) fail the
task without retries (`AirflowFailException`); everything else may be retried.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from barman_dr.exceptions import (
    ApprovalMissingError,
    AuditUnavailableError,
    HostKeyError,
    InventoryError,
    PreflightError,
    ValidationError,
)
from barman_dr.hooks.barman import BarmanHook
from barman_dr.hooks.dbhost import DbHostHook
from barman_dr.inventory import Instance, Inventory, Server, load_inventory
from barman_dr.params.pitr_request import PitrRequest
from barman_dr.routing import DEFAULT_QUEUE, SITE_QUEUE, celery_enabled, queue_for_run, require_served
from barman_dr.safety.audit import AuditContext, AuditTrail
from barman_dr.safety.locks import ServerLock, ServerLockedError

#: errors a retry cannot fix: fail at once, with the message, no retry
try:  # a human-in-the-loop wait (Airflow 3.3+) or a deferral parks the try: it has not ended
    from airflow.sdk.exceptions import TaskAwaitingInput, TaskDeferred

    PARKED: tuple[type[BaseException], ...] = (TaskAwaitingInput, TaskDeferred)
except ImportError:  # pragma: no cover - older task SDKs
    from airflow.sdk.exceptions import TaskDeferred

    PARKED = (TaskDeferred,)
NON_RETRYABLE = (ApprovalMissingError, ValidationError, PreflightError, ServerLockedError, HostKeyError, InventoryError,
                 AuditUnavailableError)


def utcnow() -> str:
    return datetime.now(UTC).isoformat()


#: outcomes that end a try in the audit trail (`started` opens it)
TRY_END_OUTCOMES = frozenset({"ok", "failed", "refused", "planned", "critical"})


def interrupted_tries(events: Sequence[dict[str, Any]], action: str, task_id: str, current_try: int | None) -> list[dict]:
    """Earlier tries of this task that `started` and never recorded how they ended.

    A try ends with an outcome event (ok, failed, refused) unless its process died first:
    the worker or the scheduler was SIGKILLed, ran out of memory, or its host restarted.
    Airflow then resets or fails the task instance without running any of our code, so
    the next try is the first to know: it records the lost try in the audit trail, so a
    crash is visible there and not only as a gap. Only tries before the current one count
    (a mapped task's siblings run the same try number at the same time).
    """
    opened: dict[int, dict[str, Any]] = {}
    ended: set[int] = set()
    for e in events:
        if e.get("task_id") != task_id or e.get("try_number") is None or e.get("action") != action:
            continue
        reported = (e.get("details") or {}).get("interrupted_try") if e.get("outcome") == "warning" else None
        if reported is not None:  # a later try already recorded that one (under its own try number)
            ended.add(int(reported))
        n = int(e["try_number"])
        if current_try is not None and n >= current_try:
            continue
        if e.get("outcome") == "started":
            opened.setdefault(n, e)
        elif e.get("outcome") in TRY_END_OUTCOMES:
            ended.add(n)
    return [{"interrupted_try": n, "started_at": opened[n].get("event_time")}
            for n in sorted(opened) if n not in ended]


#: audit actions that report a failure without being a step's own (the notifier, Airflow's listener, summaries)
NOT_A_STEP = frozenset({"notify", "task_failed", "failure_summary", "freeze_guard"})


def run_failures(events: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The run's failed or refused steps, in the order they failed, each with the first line of its error.

    From the audit trail (newest first, as `AuditTrail.events` returns it), not from Airflow's
    task states: a failure summary must name the step even where the task SDK gives a task
    no view of its siblings.
    """
    out, seen = [], set()
    for e in reversed(list(events)):
        if e.get("outcome") not in ("failed", "refused") or e.get("action") in NOT_A_STEP:
            continue
        task = str(e.get("task_id") or e.get("action"))
        if task in seen:
            continue
        seen.add(task)
        raw = str((e.get("details") or {}).get("error") or e.get("outcome"))
        first = raw.strip().splitlines()[0] if raw.strip() else str(e.get("outcome"))
        out.append({"task": task, "error": first.split(": ", 1)[1] if first.startswith(("ValidationError: ",
                    "PreflightError: ", "BarmanDrError: ")) else first})
    return out


class DrBaseOperator(BaseOperator):
    """A DR step on one server of the inventory, audited from start to end."""

    template_fields: Sequence[str] = ("request",)
    #: the audit action name of this step
    action: str = "step"
    ui_color = "#e8f1fb"
    #: runs Barman or SSH for the run's server: CeleryExecutor sends it to the workers beside the
    #: server's barman host (barman_dr/routing.py). False for bookkeeping steps (`default` queue).
    runs_on_site: ClassVar[bool] = True

    def __init__(self, *, request: Any = None, audit_conn_id: str = "dr_audit", inventory_path: str | None = None,
                 **kwargs: Any) -> None:
        if self.runs_on_site and "queue" not in kwargs:
            kwargs["queue"] = SITE_QUEUE
        super().__init__(**kwargs)
        self.request = request
        self.audit_conn_id = audit_conn_id
        self.inventory_path = inventory_path
        self._remote_jobs: list[tuple[str, str, str, str]] = []
        self._remote_cleanups: list[tuple[str, str, list[str], str]] = []
        self._audit_trail: AuditTrail | None = None

    def require_workers(self, server: str, context: Any = None) -> None:
        """CeleryExecutor: the run's site steps are routed to `server`'s queue, and a live worker serves it
        and `default`; else refuse now, before any side effect (a task on an unserved queue would sit
        queued until task_queued_timeout; one routed elsewhere would run where the barman host is out of reach)."""
        if not celery_enabled():
            return
        want = self.inventory.queue_of(server)
        routed = queue_for_run(dict(getattr((context or {}).get("dag_run"), "conf", None) or {}))
        if routed != want:
            raise PreflightError(f"this run's site steps were routed to queue {routed!r}, but server {server!r} is "
                                 f"served by queue {want!r} (barman host {self.inventory.server(server).barman_host}): "
                                 "is plugins/airflow_local_settings.py (the routing policy) loaded by the scheduler? "
                                 "Nothing was run; fix it and trigger again")
        live = require_served([DEFAULT_QUEUE, want])
        self.log.info("celery workers serving this run's queues: %s", live)

    # ------------------------------------------------------------------ context
    @cached_property
    def inventory(self) -> Inventory:
        return load_inventory(self.inventory_path)

    @cached_property
    def req(self) -> PitrRequest:
        if not isinstance(self.request, dict):
            raise ValidationError("request", self.request, "the validated request (XCom of validate_params) is missing")
        return PitrRequest.from_dict(self.request)

    @property
    def server_name(self) -> str:
        return self.req.server

    @cached_property
    def srv(self) -> Server:
        return self.inventory.server(self.server_name)

    @cached_property
    def barman(self) -> BarmanHook:
        bh = self.inventory.barman_host_of(self.srv)
        return BarmanHook(ssh_conn_id=bh.ssh_conn_id, barman_command=bh.barman_command, job_dir=bh.job_dir)

    @cached_property
    def _db_hooks(self) -> dict[str, DbHostHook]:
        return {}

    def db(self, host_name: str) -> DbHostHook:
        if host_name not in self._db_hooks:
            self._db_hooks[host_name] = DbHostHook(db_host=self.inventory.db_host(host_name))
        return self._db_hooks[host_name]

    @property
    def target_instance(self) -> Instance:
        """Where the recovered server will run: the primary (in place) or the chosen standby."""
        return self.srv.primary if self.req.in_place else self.srv.standby(self.req.restore_to)

    def run_tag(self, context: Any) -> str:
        """A short, stable, filesystem-safe tag for this DAG run (moved-aside dirs, job ids)."""
        import hashlib

        return hashlib.sha256(f"{context['dag'].dag_id}/{context['run_id']}".encode()).hexdigest()[:10]

    def upstream(self, context: Any, task_id: str) -> Any:
        return context["ti"].xcom_pull(task_ids=task_id)

    #: a destructive step of a DAG with a four-eyes `approve` step: it refuses unless that step let this run
    #: through and this run holds the server lock (an `approve` marked success by hand has done neither)
    gated_by_approval: bool = False

    def check_approval_gate(self, context: Any) -> None:
        dag = context.get("dag")
        if not self.gated_by_approval or dag is None or "approve" not in set(getattr(dag, "task_ids", ()) or ()):
            return
        fix = ("nothing was done by this step. NEXT: trigger a new run and let one of the server's approvers approve "
               "it (or pre-approve with confirm)")
        if not self.approved(context):
            raise ApprovalMissingError(f"{self.task_id} refused: the run has no approval (the approve step returned "
                                       f"none: was it marked success by hand?); {fix}")
        holder = ServerLock(postgres_conn_id=self.audit_conn_id).holder(self.server_name)
        if holder is None or (holder.dag_id, holder.run_id) != (dag.dag_id, context["run_id"]):
            who = f"{holder.dag_id} run {holder.run_id}" if holder else "nobody"
            raise ApprovalMissingError(f"{self.task_id} refused: the server lock of {self.server_name} is held by "
                                       f"{who}, not by this run; {fix}")

    def approved(self, context: Any, task_id: str = "approve") -> bool:
        """The approval step let this run through (pre-approved by confirm, or a second person approved)."""
        out = self.upstream(context, task_id)
        return isinstance(out, dict) and out.get("approved") is True

    # -------------------------------------------------------------------- audit
    def audit_context(self, context: Any) -> AuditContext:
        incident = None
        if isinstance(self.request, dict):
            incident = self.request.get("incident_id")
        return AuditContext.from_airflow(context, incident_id=incident)

    def audit(self, context: Any) -> AuditTrail:
        return AuditTrail(postgres_conn_id=self.audit_conn_id, context=self.audit_context(context))

    def audit_target(self) -> str | None:
        try:
            return self.req.target.describe()
        except Exception:  # noqa: BLE001 - the request may be what failed
            return None

    def audit_server(self) -> str | None:
        try:
            return self.server_name
        except Exception:  # noqa: BLE001
            return None

    # ---------------------------------------------------------------- execution
    #: where `request` comes from when the DAG does not pass it: the validated request
    request_task_id: str | None = "validate_params"

    def execute(self, context: Any) -> Any:
        if self.request is None and self.request_task_id:
            self.request = context["ti"].xcom_pull(task_ids=self.request_task_id)
        self.request = self.effective_request(context, self.request)
        audit = self._audit_trail = self.audit(context)
        started = time.monotonic()
        started_at = utcnow()
        try:
            self.record_interrupted_tries(context, audit)
            audit.record(self.action, "started", server=self.audit_server(), target=self.audit_target())
        except AuditUnavailableError as exc:
            # no unaudited DR action, destructive or not: refuse, without retries
            self.log.error("%s refused: %s", self.task_id, exc)
            raise AirflowFailException(f"{self.task_id} refused: {exc}") from exc
        try:
            self.check_approval_gate(context)
            result = self.run(context)
        except (AirflowSkipException, *PARKED):
            raise
        except BaseException as exc:  # also a timeout or a kill (BaseException in the task SDK): the try has an end
            details = {"error": f"{type(exc).__name__}: {exc}"[:8000], "next_action": self.next_action(context, exc)}
            try:
                audit.record(self.action, "refused" if isinstance(exc, NON_RETRYABLE) else "failed",
                             server=self.audit_server(), target=self.audit_target(),
                             duration_s=round(time.monotonic() - started, 3), details=details,
                             exit_code=getattr(exc, "exit_code", None), argv=getattr(exc, "argv", None))
            except AuditUnavailableError:
                self.log.exception("the audit trail is unavailable while recording a failure")
            hint = details["next_action"]
            message = f"{self.task_id} failed: {exc}" + (f"\nNEXT: {hint}" if hint else "")
            self.log.error("%s", message)
            if isinstance(exc, NON_RETRYABLE):
                raise AirflowFailException(message) from exc
            raise
        if isinstance(result, dict):
            result.setdefault("started_at", started_at)
            result.setdefault("ended_at", utcnow())
            result.setdefault("duration_s", round(time.monotonic() - started, 3))
        audit.record(self.action, "ok", server=self.audit_server(), target=self.audit_target(),
                     duration_s=round(time.monotonic() - started, 3), details=self.audit_details(result))
        return result

    def run(self, context: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    #: the step that decides a PITR's source (`source: auto | delayed_standby`) once the stop point is known
    SOURCE_TASK_ID: ClassVar[str] = "resolve_target"

    def effective_request(self, context: Any, request: Any) -> Any:
        """The request as the run executes it: with the source resolve_target chose (and where it restores).

        `source: auto` can only be decided against the resolved stop point, so resolve_target
        pushes its decision (XCom key `source`) and every later step reads the request through
        it: `restore_to` becomes the delayed standby that will be promoted, and every step
        (fence, repoint, rebuild, Barman following) works on it unchanged. A request for
        Barman reads no XCom.
        """
        if not isinstance(request, dict) or request.get("source") in (None, "barman") or \
                self.task_id in (self.SOURCE_TASK_ID, "validate_params"):
            return request
        dag = context.get("dag")
        if dag is None or self.SOURCE_TASK_ID not in set(getattr(dag, "task_ids", ()) or ()):
            return request
        decision = context["ti"].xcom_pull(task_ids=self.SOURCE_TASK_ID, key="source")
        if not isinstance(decision, dict) or not decision.get("chosen"):
            return request
        return {**request, "source_chosen": decision["chosen"], "restore_to": decision.get("restore_to")
                or request.get("restore_to")}

    def remembered(self, context: Any, key: str) -> Any:
        """The newest value of `key` an earlier try of this task recorded in this run (`remember`), or None.

        Kept in the audit trail (`<action>_<key>`, outcome info), not in an XCom: Airflow clears a
        task's own XComs when a new try starts, so an XCom pushed by one try is gone by the next.
        """
        ti = context.get("ti")
        map_index = getattr(ti, "map_index", None)
        events = self.audit(context).events(run_id=context["run_id"], dag_id=context["dag"].dag_id,
                                            action=f"{self.action}_{key}", limit=20)
        mine = [e for e in events if e.get("task_id") == self.task_id
                and (e.get("details") or {}).get("map_index") in (None, map_index)]
        return (mine[0].get("details") or {}).get(key) if mine else None  # newest first

    def remember(self, context: Any, key: str, value: Any) -> Any:
        ti = context.get("ti")
        self.audit(context).record(f"{self.action}_{key}", "info", server=self.audit_server(),
                                   target=self.audit_target(),
                                   details={key: value, "map_index": getattr(ti, "map_index", None)})
        return value

    def run_failures(self, context: Any) -> list[dict[str, str]]:
        """This run's failed steps and their errors, from the audit trail (best effort: [] when unreadable)."""
        try:
            return run_failures(self.audit(context).events(run_id=context["run_id"], dag_id=context["dag"].dag_id,
                                                           limit=2000))
        except Exception as exc:  # noqa: BLE001 - a summary must not fail on this
            self.log.warning("could not read this run's failures from the audit trail: %s", exc)
            return []

    def record_interrupted_tries(self, context: Any, audit: AuditTrail) -> list[dict[str, Any]]:
        """Audit each earlier try of this task that died without an outcome (see `interrupted_tries`)."""
        ti = context.get("ti")
        try_number = getattr(ti, "try_number", None)
        map_index = getattr(ti, "map_index", None)
        if not isinstance(try_number, int) or try_number <= 1 or (isinstance(map_index, int) and map_index >= 0):
            return []
        events = audit.events(run_id=context["run_id"], dag_id=context["dag"].dag_id, limit=2000)
        lost = interrupted_tries(events, self.action, self.task_id, try_number)
        for item in lost:
            self.log.warning("try %s of %s started at %s and never recorded an outcome: its worker or the scheduler "
                             "was lost. This try picks up what it left (a running job, a stopped server, a "
                             "directory already moved).", item["interrupted_try"], self.task_id, item["started_at"])
            audit.record(self.action, "warning", server=self.audit_server(), target=self.audit_target(), details={
                **item, "cause": "the try ended without an outcome: its worker or the scheduler was lost "
                                 "(SIGKILL, out of memory, host restart)",
                "resumed_by_try": try_number})
        return lost

    # ------------------------------------------------------------- remote jobs
    def track_job(self, host: Any, job_root: str, job_id: str) -> None:
        """Remember a detached remote job this try started or attached to, so `on_kill` can stop it."""
        self._remote_jobs.append((host.ssh_conn_id, host.name, job_root, job_id))

    def track_cleanup(self, host: Any, argv: list[str], what: str) -> None:
        """Remember a command `on_kill` must run on a host (e.g. stop a staging postmaster this try started)."""
        self._remote_cleanups.append((host.ssh_conn_id, host.name, list(argv), what))

    def untrack_cleanup(self, what: str) -> None:
        self._remote_cleanups = [c for c in self._remote_cleanups if c[3] != what]

    def on_kill(self) -> None:
        """The task is being killed (marked failed/cleared in the UI, timeout, worker shutdown).

        Detached jobs survive an SSH drop by design, so they would survive a killed worker
        too: stop each job's whole process group on its host (TERM, then KILL after 3 s:
        Airflow's supervisor escalates to SIGKILL of this process after 5 s), over a fresh
        connection (the task's own may be in the middle of a read), and audit it. The
        partial output stays where it is; the next attempt or run sets it aside.
        """
        from barman_dr.hooks.remote import RemoteHost

        for conn_id, name, argv, what in self._remote_cleanups:
            host = RemoteHost(conn_id, name=name, cmd_timeout=10)
            try:
                r = host.run(argv, check=False)
                outcome = f"exit {r.exit_code}"
                self.log.warning("task killed: %s on %s (%s)", what, name, outcome)
            except Exception as exc:
                outcome = f"NOT done: {type(exc).__name__}: {exc}"
                self.log.exception("task killed: could not %s on %s", what, name)
            finally:
                host.close()
            if self._audit_trail is not None:
                try:
                    self._audit_trail.record(self.action, "failed", server=self.audit_server(),
                                             details={"error": "task killed", "cleanup": what, "host": name,
                                                      "outcome": outcome})
                except Exception:
                    self.log.exception("could not audit the cleanup %s", what)
        for conn_id, name, job_root, job_id in self._remote_jobs:
            host = RemoteHost(conn_id, name=name, cmd_timeout=10)
            try:
                outcome = host.kill_job(job_root, job_id, grace_seconds=3)
                self.log.warning("task killed: remote job %s on %s stopped (%s)", job_id, name, outcome)
            except Exception as exc:
                outcome = f"NOT stopped: {type(exc).__name__}: {exc}"
                self.log.exception("task killed: could not stop remote job %s on %s", job_id, name)
            finally:
                host.close()
            if self._audit_trail is not None:
                try:
                    self._audit_trail.record(self.action, "failed", server=self.audit_server(),
                                             details={"error": "task killed", "job_id": job_id, "host": name,
                                                      "job_stopped": outcome})
                except Exception:
                    self.log.exception("could not audit the kill of %s", job_id)

    def audit_details(self, result: Any) -> dict[str, Any]:
        return result if isinstance(result, dict) else {"result": result}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        """What the on-call DBA should do now; each step says it in its own terms."""
        return None
