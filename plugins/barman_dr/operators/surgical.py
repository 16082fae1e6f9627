"""dr_surgical_recovery: put back only the rows an incident destroyed, while the live primary keeps serving.

validate (lock) -> preflight -> WAL coverage -> restore onto the nonprod instance, target
proven -> plan (the diff by primary key, audited) -> apply (confirmed runs only: one
transaction on live) -> teardown (always). Nothing is stopped or frozen on live: the
only writes to live are the apply transaction's INSERTs (and UPDATEs with
`restore_changed`), plus, in the WAL coverage step, one empty transaction and a WAL
switch (the same as dr_pitr's preflight).

The preflight and WAL coverage steps are dr_pitr's own operators, pointed at the nonprod
instance; the restore is the monthly drill's (`restore_to_nonprod`); the diff is
`barman_dr.forensics.rowdiff`.

Lock: a surgical run takes the **server** lock (`control.server_locks`, purpose
`surgical`) in its first task, plan-only runs included (they restore onto nonprod too),
and releases it in the teardown. So it never runs together with the monthly drill (same
nonprod instance, same lock) nor with a confirmed dr_pitr of the server (a rewind of live
under the diff would make the apply wrong). A plan-only dr_pitr still runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from functools import cached_property
from typing import Any

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from barman_dr.exceptions import BarmanDrError, ValidationError
from barman_dr.forensics.rowdiff import (
    SAMPLE,
    apply_table,
    check_same_shape,
    diff_table,
    read_table_spec,
    stage_name,
    stage_table,
)
from barman_dr.inventory import Instance
from barman_dr.operators.base import DrBaseOperator, utcnow
from barman_dr.operators.pitr import (
    PitrPreflightOperator,
    ResolveTargetOperator,
    ValidatePitrRequestOperator,
    VerificationError,
    WalCoverageOperator,
)
from barman_dr.operators.pitr.plan import plan_state
from barman_dr.operators.pitr.resolve import prove_resolved, resolution_for, restore_target_of, target_tli_of
from barman_dr.operators.scheduled import check_nonprod, restore_to_nonprod
from barman_dr.params.surgical_request import SurgicalRequest, validate_surgical_conf
from barman_dr.safety.audit import AuditTrail
from barman_dr.safety.locks import ServerLock
from barman_dr.surfaces.run_note import set_run_note


def pg_connect(conn_id: str, dbname: str, *, application_name: str = "barman-dr-surgical") -> Any:
    """A psycopg 3 connection from an Airflow Postgres connection (host, port, login, password), to `dbname`."""
    import psycopg
    from airflow.sdk import BaseHook

    c = BaseHook.get_connection(conn_id)
    return psycopg.connect(host=c.host, port=c.port or 5432, user=c.login, password=c.password, dbname=dbname,
                           connect_timeout=10, application_name=application_name, autocommit=False)


class SurgicalMixin:
    """What every dr_surgical_recovery step shares: the typed request, and nonprod as the restore target."""

    request: Any
    srv: Any

    @cached_property
    def req(self) -> SurgicalRequest:
        if not isinstance(self.request, dict):
            raise ValidationError("request", self.request, "the validated request (XCom of validate_params) is missing")
        return SurgicalRequest.from_dict(self.request)

    @property
    def target_instance(self) -> Instance:
        return check_nonprod(self.srv)


def tables_found_for_xid(audit: AuditTrail, server: Any, xid: Any) -> list[str]:
    """The tables a dr_find_target candidate with this xid deleted or updated rows in (newest run first).

    The default `tables` of a surgical recovery that targets a transaction found by
    dr_find_target: exactly what that transaction touched, as the live catalogue named it.
    Only resolved DELETE/UPDATE relations qualify (a DROP or TRUNCATE is dr_pitr's job);
    the names still go through the same validator as a typed-in list.
    """
    if not isinstance(server, str) or not str(xid).strip().isdigit():
        return []
    for event in audit.events(server=server, action="find_target", limit=50):
        if event.get("outcome") != "ok":
            continue
        for cand in (event.get("details") or {}).get("candidates") or []:
            if str(cand.get("xid")) != str(xid).strip():
                continue
            return sorted({r["relation"] for r in cand.get("relations") or []
                           if r.get("resolved") and r.get("operation") in ("DELETE", "UPDATE")
                           and isinstance(r.get("relation"), str)})
    return []


class ValidateSurgicalRequestOperator(SurgicalMixin, ValidatePitrRequestOperator):
    """Step 1: params validated and typed (no I/O), audit writable, the server lock, the backup catalogue."""

    def validate(self, conf: dict[str, Any]) -> SurgicalRequest:
        found = None
        if not conf.get("tables") and conf.get("target_xid") not in (None, ""):
            found = tables_found_for_xid(AuditTrail(postgres_conn_id=self.audit_conn_id), conf.get("server"),
                                         conf.get("target_xid"))
            if found:
                conf = {**conf, "tables": found}
        req = validate_surgical_conf(conf, self.inventory)
        if found:
            req = dataclasses.replace(req, tables_source="dr_find_target")
        check_nonprod(self.inventory.server(req.server))
        return req

    def take_lock(self, req: Any, context: Any) -> None:
        # plan-only runs restore onto nonprod as well: every run takes the lock
        ServerLock(postgres_conn_id=self.audit_conn_id).acquire(
            req.server, dag_id=context["dag"].dag_id, run_id=context["run_id"], purpose="surgical")


class SurgicalResolveTargetOperator(SurgicalMixin, ResolveTargetOperator):
    """Step 1b: dr_pitr's target resolution: the exact stop record and the backup, before nonprod is touched."""


class SurgicalPreflightOperator(SurgicalMixin, PitrPreflightOperator):
    """Step 2: dr_pitr's preflight (backup before the target, recovery window, barman check), for nonprod."""


class SurgicalWalCoverageOperator(SurgicalMixin, WalCoverageOperator):
    """Step 3: dr_pitr's WAL proof: one empty commit on live, `switch-wal --force --archive`, no gap."""


class RestoreNonprodOperator(SurgicalMixin, DrBaseOperator):
    """Step 4: the backup restored to the target on the nonprod instance, started, target proven.

    The drill's restore (`restore_to_nonprod`: the instance's old directory moved aside,
    detached `barman restore`, `archive_mode = off`, promotion, Barman's settings cleared),
    then `prove_target` on the server log of this start and the new timeline's history file.
    """

    action = "restore_nonprod"

    def __init__(self, *, restore_timeout: float = 6 * 3600, recovery_timeout: float = 3600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.restore_timeout = restore_timeout
        self.recovery_timeout = recovery_timeout
        self._job: tuple[str, str] | None = None

    def run(self, context: Any) -> dict[str, Any]:
        req, srv, inst = self.req, self.srv, self.target_instance
        pre = self.upstream(context, "preflight")
        db = self.db(inst.host)
        tag = self.run_tag(context)
        job_id = f"surgical-{srv.name}-{tag}"
        self._job = (self.barman.job_dir, job_id)
        res = resolution_for(self, context)
        tli = target_tli_of(res)
        restored = restore_to_nonprod(self, inst, backup_id=pre["backup_id"], target=restore_target_of(res), job_id=job_id,
                                      tag=tag, target_tli=tli, restore_timeout=self.restore_timeout,
                                      recovery_timeout=self.recovery_timeout, jobs=req.jobs)
        offset = int(restored["log_offset"])  # the start restore_to_nonprod made (each try's own)
        new_tli = int(db.psql(inst, "SELECT pg_walfile_name(pg_current_wal_lsn())")[:8], 16)
        r = db.host.run(["cat", f"{inst.data_directory}/pg_wal/{new_tli:08X}.history"], check=False)
        old_tli = tli or int(pre["backup"].get("timeline") or 0) or None
        proof = prove_resolved(res, db.log_since(inst.log_file, offset), r.stdout if r.exit_code == 0 else None,
                               old_tli, new_tli)
        if not proof.reached:
            raise VerificationError("the restored copy is NOT at the target: " + "; ".join(proof.reasons))
        return {"instance": inst.name, "host": inst.host, "backup_id": pre["backup_id"], "target": req.target.to_dict(),
                "stop": res["stop"],
                "target_tli": tli, "new_timeline": new_tli, "recovery_stop": proof.stop.get("lines", [])[:3],
                "moved_aside": restored["moved_aside"], "phases_s": restored["phases_s"],
                "archive_mode": restored["archive_mode"], "job_id": job_id}

    def on_kill(self) -> None:
        if self._job:
            try:
                self.log.warning("restore job %s killed: %s", self._job[1], self.barman.host.kill_job(*self._job))
            except Exception:
                self.log.exception("could not kill restore job %s", self._job[1])

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("Live was not touched. Only the nonprod instance was; the teardown stops it. Fix the cause (see the "
                "log above) and trigger again.")


def _rollback(conn: Any) -> None:
    """Roll back, even on a broken connection (the original error is the one worth reporting)."""
    with contextlib.suppress(Exception):
        conn.rollback()


class _DiffStep(SurgicalMixin, DrBaseOperator):
    """Connections to live (the primary) and to the restored copy (nonprod), and the tables' specs."""

    def __init__(self, *, sample: int = SAMPLE, lock_timeout_ms: int = 5000, statement_timeout_ms: int = 600_000,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sample = sample
        self.lock_timeout_ms = lock_timeout_ms
        self.statement_timeout_ms = statement_timeout_ms

    def begin(self, live: Any) -> None:
        """One REPEATABLE READ snapshot for the whole diff; bounded lock waits, statements and idle time.

        `lock_timeout`: our statements never queue for long behind DDL (and so never make
        the app queue behind us); `idle_in_transaction_session_timeout`: a hung worker
        cannot hold the transaction (and its row locks) open.
        """
        import psycopg

        live.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with live.cursor() as cur:
            for name, value in (("lock_timeout", f"{int(self.lock_timeout_ms)}ms"),
                                ("statement_timeout", f"{int(self.statement_timeout_ms)}ms"),
                                ("idle_in_transaction_session_timeout", "60s")):
                cur.execute("SELECT set_config(%s, %s, true)", (name, value))

    def connect_live(self) -> Any:
        return pg_connect(self.srv.primary.postgres_conn_id, self.srv.database)

    def connect_restored(self) -> Any:
        conn = pg_connect(self.target_instance.postgres_conn_id, self.srv.database)
        conn.read_only = True
        return conn

    def stage_rows(self, live: Any, restored: Any, spec: Any, n: int) -> int:
        """Stream the source rows of one table into a temporary table on live (the restored copy's, here)."""
        return stage_table(restored, live, spec, stage_name(n))

    def diff_tables(self) -> list[dict[str, Any]]:
        """The diff per table, staged in a transaction that is rolled back: live keeps nothing from a plan."""
        tables = []
        with self.connect_live() as live, self.connect_restored() as restored:
            try:
                self.begin(live)
                specs = self.specs(live, restored)
                for n, spec in enumerate(specs):
                    self.stage_rows(live, restored, spec, n)
                    tables.append(diff_table(live, spec, stage_name(n), self.sample))
            finally:
                _rollback(live)
                _rollback(restored)
        return tables

    def specs(self, live: Any, restored: Any) -> list[Any]:
        out = []
        for t in self.req.tables:
            spec = read_table_spec(live, t, f"live ({self.srv.primary.name})")
            check_same_shape(spec, read_table_spec(restored, t, f"the restored copy ({self.target_instance.name})"))
            out.append(spec)
        restored.rollback()
        return out


class SurgicalPlanOperator(_DiffStep):
    """Step 5: the diff per table (counts + samples) into the audit trail and the run note; stops unless confirmed.

    The restored rows are staged in temporary tables on live inside a transaction that is
    rolled back: a plan leaves nothing behind on live.
    """

    action = "surgical_plan"

    def run(self, context: Any) -> dict[str, Any]:
        req, srv = self.req, self.srv
        restore = self.upstream(context, "restore_nonprod") or {}
        tables = self.diff_tables()
        totals = {k: sum(t[k] for t in tables) for k in ("missing", "changed", "live_only")}
        plan = {"server": srv.name, "target": req.target.to_dict(), "backup_id": restore.get("backup_id"),
                "restored_on": restore.get("instance"), "recovery_stop": restore.get("recovery_stop"),
                "tables_source": req.tables_source, "restore_changed": req.restore_changed,
                "confirmed": req.confirmed, "totals": totals, "tables": tables,
                "on_apply": [f"{t['table']}: insert {t['missing']} missing rows"
                             + (f", overwrite {t['changed']} changed rows with the restored version" if req.restore_changed
                                else f", report {t['changed']} changed rows (conflicts) without touching them")
                             + f"; leave {t['live_only']} rows written since alone" for t in tables]}
        self.audit(context).record("surgical_plan", "planned", server=srv.name, target=req.target.describe(),
                                   details=plan)
        lines = [f"SURGICAL plan for {srv.name}" + plan_state(req),
                 f"target {req.target.describe()}; backup {plan['backup_id']} restored on {plan['restored_on']}"]
        for t in tables:
            keys = t["missing_keys"] or {}
            lines.append(f"{t['table']} (pk {', '.join(t['primary_key'])}): restored {t['restored_rows']}, live "
                         f"{t['live_rows']}: MISSING {t['missing']}"
                         + (f" (keys {keys.get('first')}..{keys.get('last')})" if keys else "")
                         + f", CHANGED {t['changed']}, new in live {t['live_only']} (left alone)")
        if not req.confirmed:
            lines.append(f"to apply: approve in Required Actions (a second person), or trigger again with confirm = "
                         f"{req.confirm_text()}")
        set_run_note(context["dag"].dag_id, context["run_id"], "\n".join(lines))
        self.log.info("%s", "\n".join(lines))
        plan["text"] = "\n".join(lines)
        return plan

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "Live was not changed (the plan's transaction is rolled back). Fix the table named above and trigger again."


class SurgicalApplyOperator(_DiffStep):
    """Step 6 (confirmed runs): the diff applied to live in ONE transaction, verified before COMMIT.

    REPEATABLE READ, `lock_timeout` (the app is never queued behind us for long: our
    INSERTs only need ROW EXCLUSIVE on the table, and no row of the app's is locked unless
    `restore_changed`), `idle_in_transaction_session_timeout` (a hung worker cannot keep
    row locks). The restored rows are staged again inside the transaction (live may have
    changed since the plan), then per table: INSERT the missing rows `ON CONFLICT DO
    NOTHING`, optionally UPDATE the changed ones, and verify that the counts add up
    (`rowdiff.apply_table`). A lock timeout, a serialization failure or a deadlock rolls
    everything back and the transaction is tried again (bounded); nothing is half-applied.
    An audit event with the whole diff is written *before* COMMIT (no unaudited change),
    and another after it.
    """

    action = "surgical_apply"
    #: the audit actions of the diff about to be committed and of the committed diff
    applying_action = "surgical_apply"
    applied_action = "surgical_applied"
    noun = "SURGICAL"

    def __init__(self, *, attempts: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attempts = attempts

    def confirmed(self) -> bool:
        return bool(self.req.confirmed)

    def before_commit(self, live: Any) -> Any:
        """Last work inside the apply transaction, after the diff is verified (none here)."""
        return None

    def restore_changed(self) -> bool:
        return bool(self.req.restore_changed)

    def target_text(self) -> str:
        return self.req.target.describe()

    def _transaction(self, live: Any, restored: Any) -> list[dict[str, Any]]:
        self.begin(live)
        specs = self.specs(live, restored)
        results = []
        for n, spec in enumerate(specs):
            self.stage_rows(live, restored, spec, n)
            results.append(apply_table(live, spec, stage_name(n), n, restore_changed=self.restore_changed(),
                                       sample=self.sample))
        restored.rollback()
        return results

    def apply_once(self, context: Any) -> dict[str, Any]:
        """The diff applied in ONE transaction, retried whole on a serialization failure; audited before COMMIT."""
        import psycopg.errors as pe

        srv = self.srv
        audit = self.audit(context)
        retryable = (pe.SerializationFailure, pe.LockNotAvailable, pe.DeadlockDetected)
        tries: list[str] = []
        results: list[dict[str, Any]] = []
        transaction_s = None
        t0 = time.monotonic()
        for attempt in range(1, self.attempts + 1):
            with self.connect_live() as live, self.connect_restored() as restored:
                try:
                    t_tx = time.monotonic()
                    results = self._transaction(live, restored)
                    extra = self.before_commit(live)
                    audit.record(self.applying_action, "info", server=srv.name, target=self.target_text(),
                                 details={"committing": True, "attempt": attempt, "tables": results,
                                          **({"before_commit": extra} if extra is not None else {})})
                    live.commit()
                    transaction_s = round(time.monotonic() - t_tx, 3)
                    break
                except retryable as exc:
                    _rollback(live)
                    tries.append(f"attempt {attempt}: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}")
                    self.log.warning("apply rolled back, will retry: %s", tries[-1])
                    if attempt == self.attempts:
                        raise BarmanDrError(f"the apply transaction was rolled back {attempt} times, nothing was "
                                            f"applied: {tries}") from exc
                    # a random pause: do not meet the same concurrent writer again at once
                    time.sleep(min(30.0, 2.0 ** attempt) * (0.5 + random.random()))  # noqa: S311
                except BaseException:
                    _rollback(live)
                    raise
        return {"tables": results, "rolled_back_attempts": tries, "transaction_s": transaction_s,
                "apply_s": round(time.monotonic() - t0, 3), "committed_at": utcnow(),
                **({"before_commit": extra} if extra is not None else {})}

    def live_counts(self) -> dict[str, Any]:
        """The inventory's validation queries on live after the apply (a report, not a gate)."""
        counts: dict[str, Any] = {}
        with self.connect_live() as live:
            with live.cursor() as cur:
                for name, query in self.srv.validation_queries.items():
                    try:
                        cur.execute(query)
                        counts[name] = int(cur.fetchone()[0])
                    except Exception as exc:  # noqa: BLE001 - a report, not a gate: the diff was verified in the txn
                        live.rollback()
                        counts[name] = f"error: {type(exc).__name__}"
            live.rollback()
        return counts

    def run(self, context: Any) -> dict[str, Any]:
        req, srv = self.req, self.srv
        if not self.approved(context):
            raise AirflowSkipException("not approved")
        done = self.apply_once(context)
        results, transaction_s = done["tables"], done["transaction_s"]
        counts = self.live_counts()
        applied = {"server": srv.name, "target": req.target.to_dict(), "restore_changed": req.restore_changed, **done,
                   "totals": {k: sum(int(t[k]) for t in results) for k in ("inserted", "skipped_on_conflict", "updated",
                                                                            "changed_left_alone")},
                   "live_counts_after": counts}
        self.audit(context).record(self.applied_action, "ok", server=srv.name, target=self.target_text(),
                                   details=applied)
        lines = [f"SURGICAL {srv.name} APPLIED in one transaction ({transaction_s}s): target {req.target.describe()}"]
        for t in results:
            keys = t["inserted_keys"] or {}
            lines.append(f"{t['table']}: inserted {t['inserted']}"
                         + (f" (keys {keys.get('first')}..{keys.get('last')})" if keys else "")
                         + f", conflicts skipped {t['skipped_on_conflict']}, updated {t['updated']}, changed left "
                           f"alone {t['changed_left_alone']}; live rows {t['before']['live_rows']} -> "
                           f"{t['after']['live_rows']}")
        lines.append(f"live counts now {counts}")
        set_run_note(context["dag"].dag_id, context["run_id"], "\n".join(lines))
        return applied

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("Nothing was applied unless the audit trail holds a surgical_applied event for this run (the apply is "
                "one transaction). Read the error above, then clear this task or trigger again.")


class SurgicalTeardownOperator(DrBaseOperator):
    """Always runs (all_done): stop the nonprod instance (its directory is kept, like the drill's) and release the lock.

    Only when this run holds the server's lock: otherwise it never touched nonprod, and the
    instance may belong to a drill or another surgical run.
    """

    action = "surgical_teardown"
    request_task_id = None

    def execute(self, context: Any) -> Any:
        conf = {**dict(context.get("params") or {}), **dict(getattr(context.get("dag_run"), "conf", None) or {})}
        server = conf.get("server")
        if not isinstance(server, str) or server not in self.inventory.servers:
            return {"server": server, "skipped": "unknown server: nothing to tear down"}
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        lock = ServerLock(postgres_conn_id=self.audit_conn_id)
        holder = lock.holder(server)
        out: dict[str, Any] = {"server": server, "stopped": None, "lock_released": False}
        if holder is None or (holder.dag_id, holder.run_id) != (dag_id, run_id):
            out["skipped"] = (f"server locked by {holder.dag_id} {holder.run_id}" if holder
                              else "this run holds no lock: it never touched nonprod")
            return out
        srv = self.inventory.server(server)
        if srv.nonprod is not None:
            out["stopped"] = self.db(srv.nonprod.host).stop(srv.nonprod)
            out["instance"] = srv.nonprod.name
            out["data_directory_kept"] = srv.nonprod.data_directory
        out["lock_released"] = lock.release(server, dag_id=dag_id, run_id=run_id)
        AuditTrail(postgres_conn_id=self.audit_conn_id, context=self.audit_context(context)).record(
            self.action, "ok", server=server, details=out)
        return out


class SurgicalFailureSummaryOperator(DrBaseOperator):
    """Runs when any step failed: whether live was changed, and what to do next; then fails (the run is failed)."""
    runs_on_site = False  # bookkeeping: the `default` queue

    action = "failure_summary"

    def run(self, context: Any) -> dict[str, Any]:
        failures = self.run_failures(context)
        failed = [f["task"] for f in failures]
        applied = False
        try:
            applied = any(e["outcome"] == "ok" for e in self.audit(context).events(
                run_id=context["run_id"], dag_id=context["dag"].dag_id, action="surgical_applied", limit=5))
        except BarmanDrError:
            applied = False
        live = ("the diff WAS applied (see the surgical_applied audit event)" if applied else
                "live was not changed by this run")
        summary = {"failed_tasks": failed, "live": live,
                   "next_action": "read the failed task's log; the teardown stopped nonprod; fix and trigger again"}
        set_run_note(context["dag"].dag_id, context["run_id"],
                     f"SURGICAL FAILED at {failures[0]['task'] + ': ' + failures[0]['error'][:600] if failures else '?'}; "
                     f"{live}; next: {summary['next_action']}")
        return summary

    def execute(self, context: Any) -> Any:
        summary = super().execute(context)
        raise AirflowFailException(f"surgical recovery failed at {', '.join(summary['failed_tasks']) or 'a step'}; "
                                   f"{summary['live']}. NEXT: {summary['next_action']}")
