"""Operators of the scheduled fleet DAGs: weekly full backup, the verification summary, monthly drill.

One task instance per server (dynamic task mapping over the inventory's server names),
each bounded by the Airflow pool of its barman host. The daily verification's per-host
task is in operators/verify_host.py. Unlike the PITR steps, these take no
validated request: the server name is the mapped, templated argument. Every step is
audited like the PITR steps (started / ok / failed), and retry-safe: a retried backup
attaches to the job its first attempt started, a retried drill finds its restore job.
The pure threshold logic lives in barman_dr/verification.py.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from barman_dr.exceptions import BarmanCommandError, BarmanDrError, PreflightError
from barman_dr.forensics.walswitch import nudging
from barman_dr.hooks.remote import sh_argv
from barman_dr.models import RecoveryTarget
from barman_dr.operators.base import DrBaseOperator, utcnow
from barman_dr.operators.pitr import VerificationError, clear_recovery_settings
from barman_dr.operators.pitr.resolve import TargetResolver, prove_resolved, restore_target_of, target_tli_of
from barman_dr.safety.audit import AuditContext, AuditTrail
from barman_dr.safety.locks import ServerLock
from barman_dr.verification import (
    CRITICAL,
    SKIPPED,
    retention_plan,
    summarise,
)

VERIFIED_BACKUP_ALIAS = "barman-verified-backups"


def verified_backup_uri(server: str) -> str:
    """The Asset a successful weekly backup of `server` emits (other DAGs may schedule on it)."""
    return f"barman://{server}/verified-backup"


class FleetServerOperator(DrBaseOperator):
    """A DR step on one server of the fleet; `server` is a (mapped) templated argument."""

    template_fields: Sequence[str] = ("server",)
    request_task_id = None

    def __init__(self, *, server: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server = server

    @property
    def server_name(self) -> str:
        return str(self.server)

    def audit_target(self) -> str | None:
        return None

    def _sql_literal(self, value: str) -> str:
        return "'" + value.replace("'", "''") + "'"


# ------------------------------------------------------------------------------------ weekly backup


class WeeklyBackupOperator(FleetServerOperator):
    """`barman backup --wait` as a detached job, then check-backup, verify-backup, retention.

    The job id is derived from the DAG run and the server: a retried task attaches to the
    backup its first attempt started (or reads its result) instead of starting a second
    concurrent backup. A failed or lost attempt's job record is kept under another name
    and a new backup starts. While the job runs, a tiny transaction on the primary every
    few seconds gives `--wait` the WAL record it waits for on an idle server.
    """

    action = "backup"

    def __init__(self, *, wait_timeout: int = 3600, job_timeout: float = 6 * 3600, nudge_every_s: float = 3.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wait_timeout = wait_timeout
        self.job_timeout = job_timeout
        self.nudge_every_s = nudge_every_s

    def _nudge(self) -> None:
        try:
            self.db(self.srv.primary.host).psql(self.srv.primary, "SELECT pg_current_xact_id()",
                                                database=self.srv.database)
        except BarmanDrError as exc:
            self.log.warning("could not nudge the primary: %s", exc)

    def _run_backup(self, job_id: str) -> dict[str, Any]:
        host, job_dir = self.barman.host, self.barman.job_dir
        status, stamp = host.reset_if_failed(job_dir, job_id)
        if stamp:
            self.log.warning("earlier backup attempt %s failed (%s): kept as failed-%s, starting again",
                             job_id, status, stamp)
        # "running"/"finished": an earlier attempt of this run started it; start_job only attaches
        attached = stamp is None and status.state in ("running", "finished")
        argv = self.barman.argv("backup", "--wait", "--wait-timeout", str(self.wait_timeout), self.srv.name)
        t0 = time.monotonic()
        self.track_job(host, job_dir, job_id)
        status = host.start_job(job_dir, job_id, argv)
        last_nudge = 0.0
        while not status.finished:
            if status.state in ("lost", "absent"):
                raise BarmanDrError(f"backup job {job_id} is {status.state}: its process is gone; retry the task")
            if time.monotonic() - t0 > self.job_timeout:
                raise BarmanDrError(f"backup job {job_id} still running after {self.job_timeout:.0f}s")
            if time.monotonic() - last_nudge > self.nudge_every_s:
                self._nudge()
                last_nudge = time.monotonic()
            time.sleep(1)
            status = host.job_status(job_dir, job_id)
        out, err = host.job_output(job_dir, job_id)
        if status.exit_code != 0:
            raise BarmanCommandError(host.name, argv, int(status.exit_code or 1), err, out)
        return {"job_id": job_id, "attached_to_existing_job": attached, "backup_s": round(time.monotonic() - t0, 3),
                "stdout_tail": out[-1500:]}

    def run(self, context: Any) -> dict[str, Any]:
        srv = self.srv
        audit = self.audit(context)
        job_id = f"weekly-{srv.name}-{self.run_tag(context)}"
        before = {b.backup_id for b in self.barman.list_backups(srv.name)}
        job = self._run_backup(job_id)
        backups = self.barman.list_backups(srv.name)
        done = sorted((b for b in backups if b.is_done), key=lambda b: b.backup_id)
        new = [b for b in done if b.backup_id not in before]
        if new:
            backup_id = new[-1].backup_id
        else:
            # a retry after the job had finished: the job's own output names the backup
            named = [b.backup_id for b in done if b.backup_id in job["stdout_tail"]]
            if not named:
                raise BarmanDrError(f"backup job {job_id} finished but no new DONE backup is listed")
            backup_id = named[-1]
        info = self.barman.show_backup(srv.name, backup_id)
        audit.record("backup_taken", "info", server=srv.name, details={"backup_id": backup_id, **job})
        # the primary's validation counts right after the backup: what a drill to this backup
        # (target immediate) should find, when nothing was written in between
        counts = {}
        try:
            for name, sql in srv.validation_queries.items():
                counts[name] = int(self.db(srv.primary.host).psql(srv.primary, sql, database=srv.database))
        except BarmanDrError as exc:
            self.log.warning("validation counts on the primary failed: %s", exc)
        self.barman.check_backup(srv.name, backup_id)
        audit.record("check_backup", "ok", server=srv.name, details={"backup_id": backup_id})
        verify = self.verify_backup(srv.name, backup_id, info.backup_method)
        audit.record("verify_backup", "ok" if verify["verified"] else "info", server=srv.name,
                     details={"backup_id": backup_id, **verify})
        retention = self.apply_retention(backup_id)
        audit.record("retention", "ok", server=srv.name, details=retention)
        alias = self._alias()
        if alias is not None:
            from airflow.sdk import Asset

            context["outlet_events"][alias].add(Asset(verified_backup_uri(srv.name)),
                                                 extra={"backup_id": backup_id})
        return {"server": srv.name, "status": "OK", "backup_id": backup_id, "backup_method": info.backup_method,
                "begin_wal": info.begin_wal, "end_wal": info.end_wal, "size_bytes": info.size_bytes,
                "counts_after_backup": counts, "job": {k: v for k, v in job.items() if k != "stdout_tail"},
                "check_backup": "OK", "verify_backup": verify, "retention": retention}

    def _alias(self) -> Any:
        from airflow.sdk import AssetAlias

        for o in self.outlets or []:
            if isinstance(o, AssetAlias):
                return o
        return None

    def verify_backup(self, server: str, backup_id: str, method: str | None) -> dict[str, Any]:
        """`barman verify-backup` runs pg_verifybackup against the backup's `backup_manifest`.

        Only `pg_basebackup` (backup_method postgres, PG 13+) writes that manifest; rsync
        backups have none unless `barman generate-manifest` made one. Barman reports a
        failure with exit code 1 and an error message.
        """
        if method != "postgres":
            return {"verified": False, "skipped": f"backup_method {method!r} has no backup_manifest"}
        r = self.barman.run("verify-backup", server, backup_id, json_output=False, timeout=3600)
        return {"verified": True, "output": r.stdout.strip()[-500:]}

    def apply_retention(self, protect: str) -> dict[str, Any]:
        """Delete what Barman's retention policy made OBSOLETE, never below minimum redundancy."""
        srv = self.srv
        backups = self.barman.list_backups(srv.name)
        plan = retention_plan(backups, srv.minimum_redundancy, protect=[protect],
                              recovery_window_days=srv.recovery_window_days, now=datetime.now(UTC))
        plan["recovery_window_days"] = srv.recovery_window_days
        deleted = []
        for bid in plan["delete"]:
            # re-check before each delete: a concurrent `barman cron` may have deleted some already
            current = self.barman.list_backups(srv.name)
            if len([b for b in current if b.is_done]) <= srv.minimum_redundancy:
                break
            if bid not in {b.backup_id for b in current}:
                continue
            self.barman.delete_backup(srv.name, bid)
            deleted.append(bid)
        remaining = [b.backup_id for b in self.barman.list_backups(srv.name) if b.is_done]
        if len(remaining) < srv.minimum_redundancy:
            raise AirflowFailException(f"{srv.name}: only {len(remaining)} DONE backups remain, minimum redundancy "
                                       f"is {srv.minimum_redundancy}")
        return {**plan, "deleted": deleted, "remaining": remaining}


# ------------------------------------------------------------------------------- daily verification
# The per-barman-host verification task is operators/verify_host.py (batched probes, one report per server).


class FleetSummaryOperator(BaseOperator):
    """Runs after every verification task (all_done): the fleet view; fails when any server is CRITICAL.

    A server whose task failed (no report) counts as CRITICAL: a broken check must not
    read as a healthy server.
    """

    template_fields: Sequence[str] = ()
    ui_color = "#e8f1fb"

    def __init__(self, *, servers: Sequence[str], report_task_ids: Sequence[str], audit_conn_id: str = "dr_audit",
                 action: str = "verify_summary", release_locks: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.servers = list(servers)
        self.report_task_ids = list(report_task_ids)
        self.audit_conn_id = audit_conn_id
        self.action = action
        self.release_locks = release_locks

    def release_own_locks(self, context: Any, audit: AuditTrail) -> list[str]:
        """Locks this run still holds at its end (a teardown that never ran): released, each audited.

        A teardown releases its server's lock. One that did not run at all (its task instance
        removed because the DAG's shape changed mid-run, e.g. an inventory edit, or skipped)
        would leave the lock behind and every later DR run of that server refused. The summary
        runs after all of them (all_done) and releases only what this very run holds, for the
        servers with no teardown event in this run (a failed teardown keeps its lock and its
        failure: its nonprod instance may still run).
        """
        dag_id, run_id = context["dag"].dag_id, context["run_id"]
        lock = ServerLock(postgres_conn_id=self.audit_conn_id)
        # a teardown that ran (even one that failed) keeps its own outcome and lock: only the missing ones
        tore_down = {str(e.get("server")) for e in audit.events(run_id=run_id, dag_id=dag_id, action="drill_teardown",
                                                                 limit=1000)}
        released = []
        for server, holder in sorted(lock.holders(self.servers).items()):
            if server in tore_down:
                continue
            if holder.dag_id == dag_id and holder.run_id == run_id and lock.release(server, dag_id=dag_id,
                                                                                    run_id=run_id):
                released.append(server)
                audit.record("lock_released_by_summary", "ok", server=server,
                             details={"reason": "its teardown did not release it (the task did not run); its "
                                                "nonprod instance may still be running: check it"})
        return released

    def execute(self, context: Any) -> dict[str, Any]:
        pulled = context["ti"].xcom_pull(task_ids=self.report_task_ids) or []
        reports: dict[str, Any] = {s: None for s in self.servers}
        for rep in _flatten_reports(pulled):
            reports[str(rep["server"])] = rep
        summary = summarise(reports)
        audit = AuditTrail(postgres_conn_id=self.audit_conn_id, context=AuditContext.from_airflow(context))
        if self.release_locks:
            summary["locks_released"] = self.release_own_locks(context, audit)
        audit.record(self.action, summary["status"].lower(), details=summary)
        if summary["status"] == CRITICAL:
            lines = [f"{s}: {'; '.join(summary['reasons'].get(s, []))}" for s in summary["critical"]]
            raise AirflowFailException("CRITICAL servers: " + " | ".join(lines))
        return summary


def _flatten_reports(pulled: Any) -> list[dict[str, Any]]:
    """Per-server reports from XCom: one report (per-server task), or a list of them (per-host task), or lists of those."""
    if isinstance(pulled, dict):
        return [pulled] if pulled.get("server") else []
    if isinstance(pulled, (list, tuple)):
        return [r for item in pulled for r in _flatten_reports(item)]
    return []


# ------------------------------------------------------------------------------------ monthly drill


def check_nonprod(srv: Any) -> Any:
    """The server's nonprod instance, refused when it points at a production data directory."""
    inst = srv.nonprod
    if inst is None:
        raise PreflightError(f"server {srv.name} has no nonprod instance in the inventory")
    if inst.host in {srv.primary.host, *(s.host for s in srv.standbys)} and \
            inst.data_directory in {srv.primary.data_directory, *(s.data_directory for s in srv.standbys)}:
        raise PreflightError(f"nonprod instance {inst.name} points at a production data directory: refused")
    return inst


def restore_to_nonprod(op: DrBaseOperator, inst: Any, *, backup_id: str, target: RecoveryTarget, job_id: str, tag: str,
                       target_tli: int | None, restore_timeout: float, recovery_timeout: float,
                       jobs: int = 1) -> dict[str, Any]:
    """Restore a backup onto a nonprod instance and start it there, promoted, never archiving.

    Shared by the monthly drill and dr_surgical_recovery. Stops the instance, moves its data
    directory aside (kept: `<dir>.pre-<stamp>-<tag>`), `barman restore` as a detached job on
    the barman host (a retry attaches to it; a failed attempt's partial output is moved
    aside too), appends `archive_mode = off` before the first start, starts it on its own
    address and port, waits for promotion, clears Barman's recovery settings and refuses a
    copy that would archive. Returns the phases, the moved-aside paths and the server log
    offset of this start (where the recovery proof reads from).
    """
    db = op.db(inst.host)
    host, job_dir = op.barman.host, op.barman.job_dir
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    db.stop(inst)
    status, stamp = host.reset_if_failed(job_dir, job_id)
    moved = []
    if status.state == "absent":
        m = db.move_aside(inst.data_directory, tag)
        if m:
            moved.append(m)
    elif stamp:
        m = db.move_aside(inst.data_directory, f"partial-{tag}-{stamp}")
        if m:
            moved.append(m)
    argv = op.barman.restore_argv(op.srv.name, backup_id, inst.data_directory, target,
                                  remote_ssh_command=op.inventory.db_host(inst.host).restore_ssh_command,
                                  target_tli=target_tli, jobs=jobs)
    phases["prepare_s"] = round(time.monotonic() - t0, 3)
    t1 = time.monotonic()
    op.track_job(op.barman.host, op.barman.job_dir, job_id)
    op.barman.restore_job(job_id, argv, timeout=restore_timeout)
    phases["restore_s"] = round(time.monotonic() - t1, 3)
    # never archive from the copy: archive_mode needs a restart, so it goes in before the first start
    db.host.run(sh_argv('printf "%s\\n" "$2" >> "$1"', f"{inst.data_directory}/postgresql.auto.conf",
                        "archive_mode = 'off'  # barman-dr: never archive from a restored copy"))
    db.host.run(["mkdir", "-p", inst.socket_directory])
    log_offset = db.log_size(inst.log_file)
    t2 = time.monotonic()
    db.start(inst, wait=False)
    phases["ready_s"] = db.wait_ready(inst, timeout=min(600, recovery_timeout))
    phases["recovery_s"] = db.wait_recovery_end(inst, timeout=recovery_timeout)
    phases["start_to_promoted_s"] = round(time.monotonic() - t2, 3)
    cleared = clear_recovery_settings(db, inst)
    archive_mode = db.psql(inst, "SHOW archive_mode")
    if archive_mode != "off":
        raise VerificationError(f"the restored copy on {inst.name} has archive_mode={archive_mode}: stopping it")
    return {"job_id": job_id, "argv": argv, "moved_aside": moved, "phases_s": phases, "log_offset": log_offset,
            "recovery_settings_cleared": cleared, "archive_mode": archive_mode, "restore_started": t1}


class RestoreDrillOperator(FleetServerOperator):
    """Restore the newest backup onto the server's non-prod instance, start it, validate, measure RTO.

    Target (`target_mode`): `random` (default) = a random instant after the backup's end
    and before now, so WAL replay is exercised and not only the base backup (a commit is
    made on the primary and its WAL archived first: recovery to a time needs a commit
    after it); `immediate` = the end of the backup (then the primary's counts recorded by
    dr_weekly_full_backup at that backup are the expected counts). After validation,
    `amcheck`'s `bt_index_check` runs on the largest btree indexes of the copy.

    Safety: only the inventory's `nonprod` instance is touched (its data directory moved
    aside, never deleted); the restored copy must never archive into production WAL
    archives: Barman writes `archive_command = false` and we append `archive_mode = off`
    before the first start; Barman's recovery settings are cleared after promotion. One
    DR run per server (the server lock), released by the teardown task. A server without
    a nonprod target is reported as SKIPPED (nothing touched, no lock taken).
    """

    action = "drill"
    template_fields: Sequence[str] = ("server", "target_mode")

    def __init__(self, *, target_mode: str = "random", amcheck_indexes: int = 5, restore_timeout: float = 6 * 3600,
                 recovery_timeout: float = 3600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.target_mode = target_mode
        self.amcheck_indexes = amcheck_indexes
        self.restore_timeout = restore_timeout
        self.recovery_timeout = recovery_timeout

    # ------------------------------------------------------------------ target
    def _archive_past_now(self) -> datetime:
        """A commit on the primary after `now`, and its WAL archived; returns `now` (the latest usable target)."""
        srv = self.srv
        pdb = self.db(srv.primary.host)
        upper = datetime.now(UTC)
        time.sleep(0.01)

        def commit() -> None:
            pdb.psql(srv.primary, "SELECT pg_current_xact_id()", database=srv.database)

        commit()
        with nudging(commit):  # switch-wal --archive returns once a WAL record follows the switch
            self.barman.switch_wal(srv.name, archive_timeout=int(srv.switch_wal_timeout_seconds or 60))
        return upper

    def choose_target(self, backup: Any) -> tuple[RecoveryTarget, dict[str, Any]]:
        mode = str(self.target_mode or "random").strip().lower()
        if mode not in ("random", "immediate"):
            raise AirflowFailException(f"target_mode {mode!r}: use random or immediate")
        if mode == "immediate":
            return RecoveryTarget("immediate", None), {"mode": "immediate"}
        end = backup.end_time
        if end is None:
            raise PreflightError(f"backup {backup.backup_id} has no end time: cannot pick a random target after it")
        if end.tzinfo is None:
            end = end.replace(tzinfo=UTC)
        upper = self._archive_past_now()
        lower = end + timedelta(seconds=1)
        # a drill target, not a secret: `random` is fine here
        chosen = upper if upper <= lower else lower + (upper - lower) * random.random()  # noqa: S311
        return (RecoveryTarget("time", chosen.isoformat()),
                {"mode": "random", "window_from": lower.isoformat(), "window_to": upper.isoformat(),
                 "chosen": chosen.isoformat()})

    # ------------------------------------------------------------------ amcheck
    def amcheck(self, db: Any, inst: Any) -> dict[str, Any]:
        """`bt_index_check` on the largest btree indexes of the restored copy (read-only checks)."""
        database = self.srv.database
        db.psql(inst, "CREATE EXTENSION IF NOT EXISTS amcheck", database=database)
        rows = db.psql(inst, (
            "SELECT c.oid::regclass::text || '|' || pg_relation_size(c.oid) FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE a.amname = 'btree' AND c.relpersistence <> 't' AND i.indisvalid AND i.indisready "
            # the application's indexes first (largest first); catalogue indexes only fill up to N
            "ORDER BY n.nspname IN ('pg_catalog', 'information_schema', 'pg_toast'), pg_relation_size(c.oid) DESC, 1 "
            f"LIMIT {int(self.amcheck_indexes)}"), database=database)
        checked, failed = [], {}
        for line in [r for r in rows.splitlines() if r.strip()]:
            name, _, size = line.rpartition("|")
            try:
                db.psql(inst, f"SELECT bt_index_check({self._sql_literal(name)}::regclass)", database=database)
                checked.append({"index": name, "size_bytes": int(size)})
            except BarmanDrError as exc:
                failed[name] = str(exc).strip()[-500:]
        return {"ok": not failed and bool(checked), "checked": checked, "failed": failed}

    # ------------------------------------------------------------------ run
    def run(self, context: Any) -> dict[str, Any]:
        srv = self.srv
        inst = srv.nonprod
        if inst is None:
            self.log.warning("server %s has no nonprod target in the inventory: drill skipped", srv.name)
            return {"server": srv.name, "status": SKIPPED, "skipped": "no nonprod target", "finished_at": utcnow()}
        check_nonprod(srv)
        ServerLock(postgres_conn_id=self.audit_conn_id).acquire(srv.name, dag_id=context["dag"].dag_id,
                                                                run_id=context["run_id"], purpose="drill")
        db = self.db(inst.host)
        tag = self.run_tag(context)
        job_id = f"drill-{srv.name}-{tag}"
        done = sorted((b for b in self.barman.list_backups(srv.name) if b.is_done), key=lambda b: b.backup_id)
        if not done:
            raise PreflightError(f"{srv.name} has no DONE backup to drill with")
        backup = self.barman.show_backup(srv.name, done[-1].backup_id)
        target, target_info = self.choose_target(backup)
        # the drill's target is resolved in the WAL like a PITR's: the exact stop record, proven after the restore
        res = TargetResolver(self, srv).resolve(target, backup_id=backup.backup_id, switch=False,
                                                discard=False).to_dict()
        target_tli = target_tli_of(res)
        restored = restore_to_nonprod(self, inst, backup_id=backup.backup_id, target=restore_target_of(res),
                                      job_id=job_id, tag=tag, target_tli=target_tli,
                                      restore_timeout=self.restore_timeout, recovery_timeout=self.recovery_timeout)
        new_tli = int(db.psql(inst, "SELECT pg_walfile_name(pg_current_wal_lsn())")[:8], 16)
        hist = db.host.run(["cat", f"{inst.data_directory}/pg_wal/{new_tli:08X}.history"], check=False)
        proof = prove_resolved(res, db.log_since(inst.log_file, int(restored["log_offset"])),
                               hist.stdout if hist.exit_code == 0 else None, int(res["recovery_timeline"]), new_tli)
        if not proof.reached:
            raise AirflowFailException(f"drill of {srv.name}: the restored copy did not stop at the resolved point "
                                       f"({res['stop']['described']}): " + "; ".join(proof.reasons))
        phases: dict[str, float] = restored["phases_s"]
        moved, cleared, archive_mode = restored["moved_aside"], restored["recovery_settings_cleared"], \
            restored["archive_mode"]
        t1 = restored["restore_started"]
        t3 = time.monotonic()
        counts: dict[str, int] = {}
        for name, sql in srv.validation_queries.items():
            try:
                counts[name] = int(db.psql(inst, sql, database=srv.database))
            except (BarmanDrError, ValueError) as exc:
                # a broken query or a wrong answer does not get better on retry: fail now (teardown still runs)
                raise AirflowFailException(f"drill of {srv.name}: validation query {name!r} failed on "
                                           f"{inst.name}: {str(exc).strip()[-800:]}") from exc
        phases["validate_s"] = round(time.monotonic() - t3, 3)
        rto = round(time.monotonic() - t1, 3)
        t4 = time.monotonic()
        try:
            amcheck = self.amcheck(db, inst)
        except BarmanDrError as exc:
            amcheck = {"ok": False, "checked": [], "failed": {"amcheck": str(exc).strip()[-500:]}}
        phases["amcheck_s"] = round(time.monotonic() - t4, 3)
        if target.kind == "immediate":
            expected = self._counts_at_backup(context, backup.backup_id)
            counts_source = ("primary's counts recorded by dr_weekly_full_backup right after this backup"
                             if expected else "unknown: no counts recorded for this backup")
        else:
            # the primary's counts at a random past instant are not recorded anywhere
            expected, counts_source = None, "unknown: no record of the primary's counts at a random time"
        mismatches = {k: {"expected": v, "actual": counts.get(k)} for k, v in (expected or {}).items()
                      if counts.get(k) != v}
        result = {"server": srv.name, "status": "OK", "instance": inst.name, "host": inst.host,
                  "backup_id": backup.backup_id, "backup_end": backup.end_time.isoformat() if backup.end_time else None,
                  "target": target.to_dict(), "target_choice": target_info, "target_tli": target_tli,
                  "stop": res["stop"], "recovery_stop": proof.stop.get("lines", [])[:3],
                  "backup_bytes": backup.size_bytes, "replay_bytes": res["replay"]["bytes"],
                  "moved_aside": moved, "job_id": job_id, "counts": counts,
                  "expected_counts": expected, "expected_counts_source": counts_source,
                  "counts_comparison": ("match" if expected and not mismatches else
                                        "MISMATCH" if mismatches else "unknown"),
                  "mismatches": mismatches, "amcheck": amcheck, "recovery_settings_cleared": cleared,
                  "archive_mode": archive_mode, "rto_s": rto, "rto_objective_s": srv.rto_objective_seconds,
                  "rto_met": rto <= srv.rto_objective_seconds, "phases_s": phases, "finished_at": utcnow()}
        self.audit(context).record("drill_result", "ok" if result["rto_met"] and not mismatches and amcheck["ok"]
                                   else "failed", server=srv.name, details=result)
        if mismatches:
            raise AirflowFailException(f"drill of {srv.name}: counts differ from the primary's at backup "
                                       f"{backup.backup_id}: {mismatches}")
        if not amcheck["ok"]:
            raise AirflowFailException(f"drill of {srv.name}: amcheck failed: {amcheck['failed'] or 'no index checked'}")
        if not result["rto_met"]:
            raise AirflowFailException(f"drill of {srv.name}: RTO {rto}s exceeds the objective "
                                       f"{srv.rto_objective_seconds}s")
        return result

    def _counts_at_backup(self, context: Any, backup_id: str) -> dict[str, int] | None:
        """The primary's counts right after that backup, when dr_weekly_full_backup recorded them."""
        try:
            for e in self.audit(context).events(server=self.srv.name, action="backup", limit=50):
                d = e.get("details") or {}
                if e.get("outcome") == "ok" and isinstance(d, dict) and d.get("backup_id") == backup_id:
                    return d.get("counts_after_backup") or None
        except BarmanDrError:
            return None
        return None

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("Only the nonprod instance was touched. Read the log above; the teardown task stops it and releases "
                "the lock.")


class DrillTeardownOperator(FleetServerOperator):
    """Always runs (all_done): stop the non-prod instance (its directory is kept), release the lock.

    Touches nothing but the inventory's `nonprod` instance of the server.
    """

    action = "drill_teardown"

    def run(self, context: Any) -> dict[str, Any]:
        srv = self.srv
        out: dict[str, Any] = {"server": srv.name, "stopped": None}
        lock = ServerLock(postgres_conn_id=self.audit_conn_id)
        holder = lock.holder(srv.name)
        if holder and (holder.dag_id, holder.run_id) != (context["dag"].dag_id, context["run_id"]):
            # another DR run owns this server (maybe a drill using the same nonprod): not ours to stop
            out["skipped"] = f"server locked by {holder.dag_id} {holder.run_id}"
            return out
        if srv.nonprod is not None:
            out["stopped"] = self.db(srv.nonprod.host).stop(srv.nonprod)
            out["instance"] = srv.nonprod.name
        out["lock_released"] = lock.release(
            srv.name, dag_id=context["dag"].dag_id, run_id=context["run_id"])
        return out
