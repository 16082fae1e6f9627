"""The PITR steps, one operator each, in the order of the seed's runbook.

assess (validate, preflight, WAL coverage, plan) -> execute (freeze, stop, move aside,
restore, start) -> verify (target reached, data) -> post-incident (unfreeze, standbys,
Barman, report). Nothing destructive runs before `plan` has passed, and `plan` passes
only when the request carries the typed confirmation.

Every step is idempotent: a retried task finds the state its first attempt left (a
stopped server, a directory already moved aside, a restore job already running) and
converges instead of doing the step twice.
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from barman_dr.appfreeze import REPOINT_SCRIPT, FreezeError, PgBouncerAdmin
from barman_dr.audit import AuditTrail
from barman_dr.exceptions import BarmanCommandError, BarmanDrError, PreflightError, ValidationError
from barman_dr.hooks.barman import compute_coverage
from barman_dr.hooks.dbhost import (
    SOCKET_PATH_MAX,
    staged_instance,
    staged_socket_path,
    staged_start_options,
    staging_paths,
)
from barman_dr.hooks.remote import sh_argv
from barman_dr.inventory import Instance
from barman_dr.locks import ServerLock
from barman_dr.models import BackupInfo, BackupSummary, Lsn, WalSegment, is_wal_segment_name, utc_stamp
from barman_dr.operators.base import DrBaseOperator, utcnow
from barman_dr.pitr_request import PitrRequest, validate_pitr_conf
from barman_dr.recovery_proof import parse_history_file, prove_target
from barman_dr.run_note import set_run_note

SEGMENT_BYTES = 16 * 1024 * 1024
log = logging.getLogger(__name__)


class VerificationError(BarmanDrError):
    """Recovery finished but did not produce what was asked (target or data)."""


# ---------------------------------------------------------------------------- assess


class ValidatePitrRequestOperator(DrBaseOperator):
    """Step 1: the params, validated and typed, before any command runs anywhere.

    Order matters: pure validation first (no I/O: hostile input never gets further),
    then the audit trail must be writable (no unaudited DR run), then the server lock
    (only for a confirmed run), then one read-only catalogue query: the target must not
    be older than the oldest backup.
    """

    action = "validate"
    request_task_id = None

    def validate(self, conf: dict[str, Any]) -> PitrRequest:
        """The pure validation (no I/O); other DR DAGs override it with their own request type."""
        return validate_pitr_conf(conf, self.inventory)

    def take_lock(self, req: PitrRequest, context: Any) -> None:
        """A confirmed PITR takes the server lock; a plan-only run touches nothing and only warns."""
        if req.confirmed:
            ServerLock(postgres_conn_id=self.audit_conn_id).acquire(
                req.server, dag_id=context["dag"].dag_id, run_id=context["run_id"], purpose="pitr")
        else:
            holder = ServerLock(postgres_conn_id=self.audit_conn_id).holder(req.server)
            if holder:
                self.log.warning("server %s is locked by %s %s: this plan-only run will not touch it",
                                 req.server, holder.dag_id, holder.run_id)

    def run(self, context: Any) -> dict[str, Any]:
        conf = {k: v for k, v in dict(context["params"]).items()}
        dag_run = context.get("dag_run")
        conf.update(dict(getattr(dag_run, "conf", None) or {}))
        req = self.validate(conf)
        self.request = req.to_dict()
        self.__dict__.pop("req", None)
        self.take_lock(req, context)
        backups = [b for b in self.barman.list_backups(req.server) if b.is_done]
        if not backups:
            raise PreflightError(f"Barman has no DONE backup of {req.server}: nothing to recover from")
        if req.backup_id != "auto" and req.backup_id not in {b.backup_id for b in backups}:
            raise ValidationError("backup_id", req.backup_id,
                                  f"no DONE backup with that id; available: {', '.join(b.backup_id for b in backups)}")
        t = req.target.time
        oldest = min(backups, key=lambda b: b.end_time or datetime.max.replace(tzinfo=UTC))
        if t is not None and oldest.end_time is not None and t < oldest.end_time:
            raise ValidationError("target_time", req.target.value,
                                  f"is before the end of the oldest backup ({oldest.backup_id}, ended "
                                  f"{oldest.end_time.isoformat()}): no backup can recover to it")
        return req.to_dict()

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "Nothing was touched. Correct the field named above and trigger again."


def choose_backup(backups: Sequence[BackupSummary], infos: dict[str, BackupInfo], target_kind: str,
                  target_time: datetime | None, target_lsn: Lsn | None) -> str:
    """`backup_id: auto`: the newest DONE backup that ended before the target.

    Time and LSN targets can be compared with a backup's end; an xid or a restore point
    cannot (we do not know when it happened), so those start from the oldest backup,
    whose WAL covers them all. `immediate` means the newest backup.
    """
    done = sorted((b for b in backups if b.is_done), key=lambda b: b.backup_id)
    if not done:
        raise PreflightError("no DONE backup")
    if target_kind == "immediate":
        return done[-1].backup_id
    if target_kind in ("xid", "name"):
        return done[0].backup_id
    for b in reversed(done):
        info = infos.get(b.backup_id)
        if info is None:
            continue
        if target_kind == "time" and info.end_time and target_time and info.end_time < target_time:
            return b.backup_id
        if target_kind == "lsn" and info.end_lsn and target_lsn and info.end_lsn <= target_lsn:
            return b.backup_id
    raise PreflightError("no DONE backup ended before the target: pick an earlier backup or a later target")


class PitrPreflightOperator(DrBaseOperator):
    """Step 2: a usable backup exists, ended before the target, inside the recovery window; `barman check` OK."""

    action = "preflight"
    #: `barman check` results that make a restore unsafe: the archive itself is broken or is
    #: not this server's. The others (PostgreSQL reachable, streaming, slot, backup age...)
    #: describe the *live* server, which is down or damaged in a disaster: they are reported
    #: as warnings, and the WAL coverage proof (next step) decides whether the target is reachable.
    BLOCKING_CHECKS = frozenset({"directories", "systemid_coherence", "compression_settings"})

    def run(self, context: Any) -> dict[str, Any]:
        req, srv = self.req, self.srv
        backups = self.barman.list_backups(srv.name)
        target_time = req.target.time
        target_lsn = Lsn.parse(str(req.target.value)) if req.target.kind == "lsn" else None
        if req.backup_id == "auto":
            done = [b for b in backups if b.is_done]
            infos = {b.backup_id: self.barman.show_backup(srv.name, b.backup_id) for b in done}
            backup_id = choose_backup(backups, infos, req.target.kind, target_time, target_lsn)
            info = infos[backup_id]
        else:
            backup_id = req.backup_id
            info = self.barman.show_backup(srv.name, backup_id)
        problems = []
        if info.status != "DONE":
            problems.append(f"backup {backup_id} is {info.status}, not DONE")
        if not info.begin_wal:
            problems.append(f"backup {backup_id} has no begin WAL in its metadata")
        if target_time and info.end_time and info.end_time >= target_time:
            problems.append(f"backup {backup_id} ended at {info.end_time.isoformat()}, after the target "
                            f"{target_time.isoformat()}: choose an older backup (backup_id) or a later target")
        if target_lsn and info.end_lsn and info.end_lsn > target_lsn:
            problems.append(f"backup {backup_id} ends at LSN {info.end_lsn}, after the target LSN {target_lsn}")
        window = timedelta(days=srv.recovery_window_days)
        if target_time and target_time < datetime.now(UTC) - window:
            problems.append(f"the target is older than the recovery window ({srv.recovery_window_days} days): "
                            "WAL for it may have been removed by retention")
        check = self.barman.check(srv.name)
        blocking = [c for c in check.failed if c.name in self.BLOCKING_CHECKS]
        for c in blocking:
            problems.append(f"barman check {c.name} FAILED" + (f" ({c.hint})" if c.hint else ""))
        instance = self.target_instance
        if req.staging:
            problems.append("staging restores are done by dr_monthly_restore_drill, not dr_pitr")
        if problems:
            raise PreflightError("preflight refused, nothing was touched:\n- " + "\n- ".join(problems))
        return {
            "backup_id": backup_id,
            "backup": info.to_dict(),
            "check": check.to_dict(),
            "warnings": [f"{c.name}: {c.hint}" for c in check.failed],
            "target_instance": instance.name,
            "target_host": instance.host,
            "data_directory": instance.data_directory,
        }

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "Nothing was stopped or changed. Fix the reported problem (or choose another backup/target) and trigger again."


@contextmanager
def nudging(write_wal: Any, every_s: float = 1.0) -> Iterator[None]:
    """Write a little WAL every second while `barman switch-wal --archive` waits.

    Barman's streaming archiver always leaves the newest complete segment in its streaming
    directory until pg_receivewal opens the next one, i.e. until the server writes WAL
    again. An idle (or frozen) server may write nothing for up to 15 s (the next
    running-xacts record): the closed segment would sit there and the switch would time
    out. One tiny commit per second makes the next segment start at once.
    """
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                write_wal()
            except Exception:  # noqa: BLE001 - best effort; the switch reports its own failure
                log.debug("WAL nudge failed", exc_info=True)

    t = threading.Thread(target=loop, name="wal-nudge", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=30)


class WalCoverageOperator(DrBaseOperator):
    """Step 3: force the WAL out and prove every segment from the backup to the target is archived.

    The seed's recovery fell short because the WAL after the backup was still in
    PostgreSQL's current segment. Here, while the damaged server still runs, we commit
    one empty transaction (a commit record *after* the target: recovery to a time stops
    only at a commit later than the target) and `switch-wal --force --archive`, which
    returns once Barman holds the closed segment. Then every segment from the backup's
    begin WAL to that one must be in Barman's WAL catalogue. When the server is down
    (a real crash), the newest archived segment must be younger than the target.
    """

    action = "wal_coverage"

    def __init__(self, *, archive_timeout: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.archive_timeout = archive_timeout

    def run(self, context: Any) -> dict[str, Any]:
        req, srv = self.req, self.srv
        timeout = self.archive_timeout or srv.switch_wal_timeout_seconds
        pre = self.upstream(context, "preflight")
        backup = pre["backup"]
        primary = srv.primary
        db = self.db(primary.host)
        closed: str | None = None
        current: str | None = None
        switch_error: str | None = None
        primary_up = db.status(primary.data_directory) == "running" and db.is_ready(primary)
        if primary_up:
            # a commit record later than any past target, then the segment boundary
            db.psql(primary, "SELECT pg_current_xact_id()", database=srv.database)
            current = db.psql(primary, "SELECT pg_walfile_name(pg_current_wal_lsn())")
            try:
                with nudging(lambda: db.psql(primary, "SELECT pg_current_xact_id()", database=srv.database)):
                    closed = self.barman.switch_wal(srv.name, archive_timeout=timeout)
            except BarmanCommandError as exc:
                switch_error = str(exc).splitlines()[-1] if str(exc) else "switch-wal failed"
        # segments only: the catalogue also lists timeline history files (00000002.history)
        catalog = [e for e in self.barman.wal_catalog(srv.name) if is_wal_segment_name(e.name)]
        names = [e.name for e in catalog]
        if not names:
            raise PreflightError("Barman's WAL catalogue is empty: no WAL archived at all")
        first = backup["begin_wal"]
        if closed:
            last = closed
        elif current:
            last = current  # the switch did not archive: show how far the archive falls short of the server
        else:
            last = max(names, key=lambda n: WalSegment.parse(n).segno) if names else first
        switches = None
        target_tli = WalSegment.parse(last).timeline
        if target_tli > WalSegment.parse(first).timeline:
            # recovery follows the history to the target's timeline: each segment must be on the right one
            history = self.barman.timeline_history(srv.name, target_tli)
            if history is None:
                raise PreflightError(f"timeline {target_tli} has no history file in Barman's archive: recovery from "
                                     f"backup {pre['backup_id']} (timeline {WalSegment.parse(first).timeline}) cannot "
                                     "follow it. Nothing was stopped.")
            switches = [(e.parent_timeline, e.switch_lsn) for e in parse_history_file(history)]
        coverage = compute_coverage(names, first, last, switches)
        newest = max(catalog, key=lambda e: (WalSegment.parse(e.name).segno, e.time)) if catalog else None
        result = {
            "first_wal": first, "last_wal": last, "closed_wal": closed, "server_current_wal": current,
            "primary_running": primary_up, "coverage": coverage.to_dict(),
            "newest_archived": newest.name if newest else None,
            "newest_archived_at": datetime.fromtimestamp(newest.time, UTC).isoformat() if newest else None,
            "wal_segments": coverage.present,
        }
        problems = []
        if switch_error:
            problems.append(f"`barman switch-wal --force --archive` did not archive the current WAL within "
                            f"{timeout}s ({switch_error}): WAL streaming/archiving is not working")
        if not coverage.complete:
            problems.append(f"WAL missing from Barman's archive between {first} and {last}: "
                            + ", ".join(coverage.missing_ranges()))
        if not primary_up and req.target.time and newest and \
                datetime.fromtimestamp(newest.time, UTC) <= req.target.time:
            problems.append(f"the server is down and the newest archived WAL ({newest.name}, archived "
                            f"{result['newest_archived_at']}) is not younger than the target: the target may not "
                            "be reachable")
        if req.target.kind == "lsn":
            tgt_seg = WalSegment.from_lsn(WalSegment.parse(last).timeline, Lsn.parse(str(req.target.value)))
            if tgt_seg.segno > WalSegment.parse(last).segno:
                problems.append(f"target LSN {req.target.value} is beyond the archived WAL ({last})")
        if problems:
            raise PreflightError("WAL coverage NOT proven, nothing was stopped:\n- " + "\n- ".join(problems))
        return result

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("Nothing was stopped. Restore WAL streaming on the barman host (`barman cron`, `barman check`), "
                "make sure the missing segments exist, then trigger again.")


def estimate_rto(backup_bytes: int, wal_segments: int, history: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A conservative RTO estimate: restore at the measured (or assumed) rate, replay, fixed overhead."""
    rates = [h["restore_bytes_per_s"] for h in history if h.get("restore_bytes_per_s")]
    restore_rate = sorted(rates)[len(rates) // 2] if rates else 50 * 1024 * 1024
    replay_rate = 32 * 1024 * 1024
    restore_s = backup_bytes / restore_rate
    replay_s = wal_segments * SEGMENT_BYTES / replay_rate
    overhead_s = 60.0
    return {"restore_s": round(restore_s, 1), "replay_s": round(replay_s, 1), "overhead_s": overhead_s,
            "total_s": round(restore_s + replay_s + overhead_s, 1),
            "restore_rate_source": "median of past restores" if rates else "assumed 50 MiB/s",
            "restore_bytes_per_s": int(restore_rate)}


class PlanGateOperator(DrBaseOperator):
    """Step 4: write the plan (audit + run note); stop here unless the run is confirmed."""

    action = "plan"

    def run(self, context: Any) -> dict[str, Any]:
        req, srv = self.req, self.srv
        pre = self.upstream(context, "preflight")
        wal = self.upstream(context, "wal_coverage")
        history = []
        try:
            for action in ("stage_restore", "barman_restore"):
                for e in self.audit(context).events(server=srv.name, action=action, limit=20):
                    if e["outcome"] == "ok" and isinstance(e["details"], dict):
                        history.append(e["details"])
        except BarmanDrError:
            history = []
        estimate = estimate_rto(int(pre["backup"].get("size_bytes") or 0), int(wal["wal_segments"]), history)
        instance = self.target_instance
        standbys = [s.name for s in srv.standbys if s.name != instance.name]
        restore = (f"barman restore {pre['backup_id']} ({req.target.describe()}, jobs={req.jobs}, "
                   "--target-action promote)")
        if req.staged_restore:
            staged, _ = staging_paths(instance.data_directory, self.run_tag(context))
            estimate["downtime_s"] = round(estimate["total_s"] - estimate["restore_s"] - estimate["replay_s"], 1)
            before = [f"check free space next to {instance.data_directory} on {instance.host} (backup + WAL + 10%)",
                      f"{restore} to {instance.host}:{staged} while the app still runs (outside the downtime)",
                      "replay the WAL to the target in that copy (private socket, no TCP, archive_command=false), prove the "
                      "target there, shut it down cleanly (outside the downtime)"]
            in_window = f"rename {staged} to {instance.data_directory} (same filesystem: instant)"
        else:
            estimate["downtime_s"] = estimate["total_s"]
            before = []
            in_window = f"{restore} to {instance.host}:{instance.data_directory} (inside the downtime)"
        steps = [*before,
                 "freeze app (PgBouncer PAUSE)" if srv.app_freeze.method == "pgbouncer" else
                 f"freeze app ({srv.app_freeze.method})",
                 f"stop PostgreSQL {instance.name}" + ("" if req.in_place else f" and fence {srv.primary.name}"),
                 f"move {instance.data_directory} aside (kept)",
                 in_window,
                 "start PostgreSQL, wait for recovery end and promotion",
                 "prove the target was reached (server log + timeline history)",
                 "validate data: " + (", ".join(f"{k}={v}" for k, v in req.expected.items()) or "report counts"),
                 "unfreeze app" + ("" if req.in_place else f" (repoint PgBouncer to {instance.name})"),
                 f"rebuild standbys: {', '.join(standbys) or '(none)'}",
                 "re-point Barman at the new timeline and take a full backup",
                 "report RTO"]
        plan = {
            "server": srv.name, "target": req.target.to_dict(), "backup_id": pre["backup_id"],
            "backup_end_time": pre["backup"].get("end_time"), "wal_range": [wal["first_wal"], wal["last_wal"]],
            "wal_segments": wal["wal_segments"], "restore_to": instance.name, "estimated_rto": estimate,
            "rto_objective_s": srv.rto_objective_seconds, "steps": steps, "confirmed": req.confirmed,
            "standbys": standbys, "staged_restore": req.staged_restore,
        }
        self.audit(context).record("plan", "planned", server=srv.name, target=req.target.describe(), details=plan)
        note = (f"PITR plan for {srv.name}{' (CONFIRMED)' if req.confirmed else ' (plan only: not confirmed)'}\n"
                f"target: {req.target.describe()}\nbackup: {pre['backup_id']} (ended {plan['backup_end_time']})\n"
                f"WAL proven: {wal['first_wal']} .. {wal['last_wal']} ({wal['wal_segments']} segments)\n"
                f"estimated RTO: {estimate['total_s']:.0f}s, of which downtime {estimate['downtime_s']:.0f}s "
                f"(objective {srv.rto_objective_seconds}s)\n"
                + "\n".join(f"{i}. {s}" for i, s in enumerate(steps, 1)))
        set_run_note(context["dag"].dag_id, context["run_id"], note)
        if not req.confirmed:
            self.log.info("plan only (confirm is not '%s'):\n%s", req.confirm_text(), note)
            raise AirflowSkipException(f"plan only: set confirm to '{req.confirm_text()}' to execute")
        return plan


# --------------------------------------------------------------------------- stage

#: free space a staged restore needs beyond the backup and the WAL it copies
STAGING_MARGIN = 0.10


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:,.0f} MiB"


def check_staging_space(host: str, free: dict[str, Any], backup_bytes: int, wal_segments: int) -> dict[str, Any]:
    """Free space for a second copy next to the data directory: backup + WAL to replay + 10%; or a refusal."""
    wal_bytes = wal_segments * SEGMENT_BYTES
    needed = int((backup_bytes + wal_bytes) * (1 + STAGING_MARGIN))
    out = {**free, "needed_bytes": needed, "backup_bytes": backup_bytes, "wal_bytes": wal_bytes}
    if free["available_bytes"] < needed:
        raise PreflightError(
            f"not enough free space for a staged restore on {host}:{free['mount_point']} (the filesystem of "
            f"{free['path']}): it needs {_mib(needed)} (backup {_mib(backup_bytes)} + WAL to replay "
            f"{_mib(wal_bytes)} + {STAGING_MARGIN:.0%} margin), {_mib(free['available_bytes'])} are available. "
            "Nothing was stopped. Fix: free space on that filesystem and clear this task, or trigger again with "
            "staged_restore=false (the restore then runs inside the downtime window, after the freeze; it needs "
            "about the same space, because the old data directory is kept next to the restored one)")
    return out


class StageRestoreOperator(DrBaseOperator):
    """Step 4b (staged_restore, default on): `barman restore` into a staging directory while the app still runs.

    The target is in the past, so the base backup and the WAL up to it can be restored
    before anything stops: into `<data_dir>.staged-<run tag>`, a sibling of the data
    directory (same filesystem: the later rename is instant), with Barman's WAL staging
    directory next to it (`...-wal`, whose absolute path Barman writes into
    restore_command; it does not move). Free space is checked first. Then the copy
    replays its WAL to the target as a private postmaster, is proven there and shut down
    (`replay_staged`): the downtime holds neither the copy nor the replay, and a target
    the WAL cannot reach fails here, before the freeze. The live data directory is never
    written to. A retry attaches to the running job; a failed attempt's
    partial copy (this run's own staging directories, nothing else) is deleted and the
    restore starts again. With staged_restore=false this step does nothing and
    `barman_restore` restores inside the downtime window as before.
    """

    action = "stage_restore"

    def __init__(self, *, restore_timeout: float = 6 * 3600, staged_shared_buffers: str = "256MB",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.restore_timeout = restore_timeout
        self.staged_shared_buffers = staged_shared_buffers

    def run(self, context: Any) -> dict[str, Any]:
        req, srv, inst = self.req, self.srv, self.target_instance
        if not req.staged_restore:
            return {"staged": False, "reason": "staged_restore=false: barman restore runs inside the downtime window"}
        pre = self.upstream(context, "preflight")
        wal = self.upstream(context, "wal_coverage") or {}
        backup = pre["backup"]
        if backup.get("tablespaces"):
            raise PreflightError(
                f"backup {pre['backup_id']} has tablespaces ({', '.join(backup['tablespaces'])}): a staged restore "
                "would write them to their original locations while the server runs. Nothing was stopped. "
                "Trigger again with staged_restore=false")
        db = self.db(inst.host)
        tag = self.run_tag(context)
        staged, wal_dir = staging_paths(inst.data_directory, tag)
        if staged.rstrip("/") == inst.data_directory.rstrip("/"):
            raise PreflightError(f"refusing: the staging directory {staged} equals the data directory")
        sock = staged_socket_path(staged_instance(inst, staged))
        if len(sock.encode()) > SOCKET_PATH_MAX:
            raise PreflightError(
                f"the staging copy's socket path {sock} is {len(sock.encode())} bytes, over the {SOCKET_PATH_MAX} a Unix "
                "socket allows (the data directory's path is too long for a staged restore). Nothing was stopped. "
                "Trigger again with staged_restore=false")
        record = {"host": inst.host, "data_directory": inst.data_directory, "staging_directory": staged,
                  "wal_directory": wal_dir}
        # before anything is written: the failure summary and dr_pitr_rollback find it even if this task dies
        context["ti"].xcom_push(key="staging", value=record)
        self.audit(context).record("staging_directory", "info", server=srv.name, target=self.audit_target(),
                                   details=record)
        job_id = f"stage-{srv.name}-{tag}"
        status, stamp = self.barman.host.reset_if_failed(self.barman.job_dir, job_id)
        cleaned: list[str] = []
        if stamp:
            # a failed or lost attempt: its partial copy is this run's own staging output, not live data
            cleaned = db.remove_staging(inst.data_directory, staged, wal_dir)
            self.log.warning("failed staging attempt set aside (job %s.failed-%s); removed %s", job_id, stamp, cleaned)
        elif status.state == "absent" and (db.path_exists(staged) or db.path_exists(wal_dir)):
            raise PreflightError(f"{staged} (or {wal_dir}) exists on {inst.host} but no staging job of this run wrote "
                                 "it: refusing to restore into it. Nothing was stopped. Inspect it (it is not the "
                                 "live data directory), remove it, then clear this task")
        space = None
        if status.state == "absent" or stamp:
            free = db.free_space(posixpath.dirname(inst.data_directory.rstrip("/")))
            space = check_staging_space(inst.host, free, int(backup.get("size_bytes") or 0),
                                        int(wal.get("wal_segments") or 0))
        argv = self.barman.restore_argv(
            srv.name, pre["backup_id"], staged, req.target,
            remote_ssh_command=self.inventory.db_host(inst.host).restore_ssh_command, jobs=req.jobs,
            target_tli=target_timeline(backup, wal), staging_wal_directory=wal_dir)
        self.track_job(self.barman.host, self.barman.job_dir, job_id)
        started = time.monotonic()
        result = self.barman.restore_job(job_id, argv, timeout=self.restore_timeout)
        seconds = max(time.monotonic() - started, 0.001)
        size = int(backup.get("size_bytes") or 0)
        replay = self.replay_staged(db, inst, staged)
        return {"staged": True, **record, "identity": db.dir_identity(staged), "job_id": job_id, "argv": argv,
                "space": space, "cleaned": cleaned, "restore_s": round(seconds, 3), "bytes": size,
                "restore_bytes_per_s": int(size / seconds) if size else None, "stdout_tail": result.stdout[-2000:],
                "replay": replay}

    def replay_staged(self, db: Any, inst: Instance, staged: str) -> dict[str, Any]:
        """Replay the WAL to the target in the staging copy, prove it there, and shut it down cleanly.

        The copy runs as a private postmaster (no TCP, its own socket and log, nothing archived:
        `staged_start_options`) while the app still runs on the live server. Recovery stops
        at the target and promotes (Barman's `recovery_target_action`), then a fast shutdown
        checkpoints it: inside the downtime the renamed copy starts with nothing to replay.
        A recovery that cannot reach the target (missing WAL) fails here, before the freeze.
        A retry attaches to a running replay, or finds it done and proves it again from the
        files (log, control file, history file), so it converges.
        """
        sinst = staged_instance(inst, staged)
        t0 = time.monotonic()
        if db.replayed(staged):
            outcome = "already"
        else:
            what = f"stop the staging PostgreSQL on {staged}"
            self.track_cleanup(db.host, [db._bin("pg_ctl"), "stop", "-D", staged, "-m", "immediate", "-w"], what)
            db.prepare_directory(sinst.socket_directory)
            try:
                db.start(sinst, options=staged_start_options(sinst, self.staged_shared_buffers))
                db.wait_recovery_end(sinst, timeout=self.restore_timeout)
                promoted_s = round(time.monotonic() - t0, 3)
                db.stop(sinst, mode="fast", timeout=600)
            except BaseException:
                # never leave a staging postmaster running after a failed try (it is not live data)
                try:
                    db.stop(sinst, mode="immediate", timeout=60)
                except Exception:
                    self.log.exception("could not stop the staging PostgreSQL on %s", staged)
                raise
            self.untrack_cleanup(what)
            outcome = f"promoted after {promoted_s}s, shut down"
        control = db.controldata(staged)
        new_tli = control.timeline
        hist_path = f"{staged}/pg_wal/{new_tli:08X}.history"
        r = db.host.run(["cat", hist_path], check=False)
        history = r.stdout if r.exit_code == 0 else None
        entries = parse_history_file(history or "")
        old_tli = entries[-1].parent_timeline if entries else None
        proof = prove_target(self.req.target, db.log_since(sinst.log_file, 0), history, old_tli, new_tli)
        if not proof.reached:
            raise VerificationError(
                "the staging copy did NOT stop at the target: " + "; ".join(proof.reasons)
                + f". Nothing was stopped: the app runs on the original server. The staging copy {staged} "
                "is not used. Check the WAL archive (dr_daily_verification), then trigger a new run")
        return {"outcome": outcome, "log_file": sinst.log_file, "replay_s": round(time.monotonic() - t0, 3),
                "new_timeline": new_tli, "switch_lsn": entries[-1].switch_lsn if entries else None,
                "stop": proof.stop.get("lines", [])[:3]}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        staging = context["ti"].xcom_pull(task_ids=self.task_id, key="staging") or {}
        where = f" A partial copy may be left in {staging.get('staging_directory')} (not live data)." if staging else ""
        return ("Nothing was stopped: the app runs on the original server." + where + " Clear this task to retry "
                "(it removes its own partial copy first), or trigger again with staged_restore=false.")


# --------------------------------------------------------------------------- execute


def freeze_app(op: DrBaseOperator) -> dict[str, Any]:
    fr = op.srv.app_freeze
    if fr.method == "none":
        return {"method": "none", "frozen": False}
    if fr.method == "command":
        import subprocess

        subprocess.run(list(fr.freeze_command or ()), check=True, timeout=fr.timeout_seconds)
        return {"method": "command", "frozen": True, "waited_s": None}
    waited = PgBouncerAdmin(fr).pause()
    return {"method": "pgbouncer", "frozen": True, "waited_s": waited, "database": fr.database}


class FreezeAppOperator(DrBaseOperator):
    """Step 5: stop application writes (PgBouncer PAUSE: clients stall, they do not fail)."""

    action = "freeze_app"

    def run(self, context: Any) -> dict[str, Any]:
        frozen_at = utcnow()
        out = freeze_app(self)
        return {**out, "frozen_at": frozen_at}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "The application was NOT frozen and nothing was stopped. Find the long transaction, then clear this task."


class StopPostgresOperator(DrBaseOperator):
    """Step 6: stop PostgreSQL where the recovered server will run (and fence the old primary)."""

    action = "stop_postgres"

    def run(self, context: Any) -> dict[str, Any]:
        srv, inst = self.srv, self.target_instance
        prim_db = self.db(srv.primary.host)
        old_timeline = None
        try:
            old_timeline = prim_db.controldata(srv.primary.data_directory).timeline
        except BarmanDrError as exc:
            self.log.warning("pg_controldata of the primary failed: %s", exc)
        stopped = {}
        if not self.req.in_place:
            stopped[srv.primary.name] = prim_db.stop(srv.primary)  # fenced: untouched, for forensics
        stopped[inst.name] = self.db(inst.host).stop(inst)
        return {"old_timeline": old_timeline, "stopped": stopped, "instance": inst.name}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "The app is frozen. Check the server log of the instance, stop it by hand if needed, then clear this task."


class MoveAsideOperator(DrBaseOperator):
    """Step 7: rename the data directory to `<dir>.pre-<stamp>-<tag>`. Never deleted."""

    action = "move_aside"

    def run(self, context: Any) -> dict[str, Any]:
        inst = self.target_instance
        moved = self.db(inst.host).move_aside(inst.data_directory, self.run_tag(context))
        return {"data_directory": inst.data_directory, "moved_to": moved, "host": inst.host}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "The app is frozen and PostgreSQL is stopped; the data directory is where it was. Clear this task."


def target_timeline(backup: dict[str, Any], wal: dict[str, Any]) -> int | None:
    """The timeline to recover along, when it is not the backup's own.

    The incident happened on the damaged server's current timeline; when an earlier PITR
    moved the server to a newer timeline than the chosen backup's, recovery must follow
    the history to that timeline. (A target before that earlier fork needs an explicit
    backup on the old timeline: choose `backup_id`.)
    """
    current = wal.get("server_current_wal") or wal.get("last_wal")
    if not current:
        return None
    tli = WalSegment.parse(current).timeline
    return tli if tli != int(backup.get("timeline") or tli) else None


class BarmanRestoreOperator(DrBaseOperator):
    """Step 8: put the restored data directory in place.

    Staged (stage_restore ran): rename the staging directory to the data directory, an
    instant rename on the same filesystem, refused unless the staging directory is still
    the one the staging restore produced (device:inode).

    Unstaged: `barman restore` to the target host as a detached job on the barman host. A
    retry attaches to a running job. A failed or lost attempt's partial destination (our
    own output: the live directory was moved aside before the first attempt) is moved
    aside too, never deleted, and the restore starts again.
    """

    action = "barman_restore"

    def __init__(self, *, restore_timeout: float = 6 * 3600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.restore_timeout = restore_timeout

    def run(self, context: Any) -> dict[str, Any]:
        req, srv, inst = self.req, self.srv, self.target_instance
        pre = self.upstream(context, "preflight")
        aside = self.upstream(context, "move_aside") or {}
        db = self.db(inst.host)
        if aside.get("moved_to") and aside["moved_to"] == inst.data_directory:
            raise PreflightError("refusing: the moved-aside path equals the data directory")
        stage = self.upstream(context, "stage_restore") or {}
        if stage.get("staged"):
            return self.swap_in(stage, aside)
        tag = self.run_tag(context)
        job_id = f"restore-{srv.name}-{tag}"
        host = self.barman.host
        # an earlier attempt that failed: keep its job record and its partial output, start clean
        status, stamp = host.reset_if_failed(self.barman.job_dir, job_id)
        partial_kept_at = None
        if stamp:
            if db.path_exists(inst.data_directory):
                partial_kept_at = db.move_aside(inst.data_directory, f"partial-{tag}-{stamp}")
                self.log.warning("partial restore of the failed attempt kept at %s", partial_kept_at)
        elif status.state == "absent" and db.path_exists(inst.data_directory):
            # the live directory was moved aside by the previous step; anything there now is not ours
            raise PreflightError(f"{inst.data_directory} exists but no restore job of this run wrote it: refusing "
                                 "to restore over it")
        wal = self.upstream(context, "wal_coverage") or {}
        argv = self.barman.restore_argv(
            srv.name, pre["backup_id"], inst.data_directory, req.target,
            remote_ssh_command=self.inventory.db_host(inst.host).restore_ssh_command, jobs=req.jobs,
            target_tli=target_timeline(pre["backup"], wal))
        self.track_job(host, self.barman.job_dir, job_id)
        started = time.monotonic()
        result = self.barman.restore_job(job_id, argv, timeout=self.restore_timeout)
        seconds = max(time.monotonic() - started, 0.001)
        size = int(pre["backup"].get("size_bytes") or 0)
        return {"mode": "restore", "job_id": job_id, "argv": argv, "restore_s": round(seconds, 3),
                "destination": inst.data_directory, "host": inst.host, "bytes": size,
                "restore_bytes_per_s": int(size / seconds) if size else None, "stdout_tail": result.stdout[-2000:],
                "retried_after": f"{status.state} (exit {status.exit_code})" if stamp else None,
                "partial_kept_at": partial_kept_at}

    def swap_in(self, stage: dict[str, Any], aside: dict[str, Any]) -> dict[str, Any]:
        inst = self.target_instance
        staged = stage["staging_directory"]
        if stage.get("data_directory") != inst.data_directory or stage.get("host") != inst.host:
            raise PreflightError(f"the staged restore is for {stage.get('host')}:{stage.get('data_directory')}, not "
                                 f"{inst.host}:{inst.data_directory}")
        if staged in (inst.data_directory, aside.get("moved_to")):
            raise PreflightError(f"refusing: the staging directory {staged} is the live or the moved-aside directory")
        t0 = time.monotonic()
        outcome = self.db(inst.host).swap_in_staged(staged, inst.data_directory, stage["identity"])
        return {"mode": "staged", "renamed": outcome, "staging_directory": staged, "destination": inst.data_directory,
                "host": inst.host, "wal_directory": stage.get("wal_directory"),
                "rename_s": round(time.monotonic() - t0, 3)}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        aside = self.upstream(context, "move_aside") or {}
        stage = self.upstream(context, "stage_restore") or {}
        what = (f"the rename of the staged restore {stage.get('staging_directory')}" if stage.get("staged")
                else "the restore (partial output is moved aside)")
        return (f"The app is frozen. The original data directory is kept at {aside.get('moved_to')}. Clear this task to "
                f"retry {what}, or run dr_pitr_rollback to put the original back.")


class StartRecoveryOperator(DrBaseOperator):
    """Step 9: start PostgreSQL on the restored directory; wait until recovery ends and it is promoted."""

    action = "start_recovery"

    def __init__(self, *, recovery_timeout: float = 3600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recovery_timeout = recovery_timeout

    def run(self, context: Any) -> dict[str, Any]:
        inst = self.target_instance
        db = self.db(inst.host)
        offset = db.log_size(inst.log_file)
        prior = context["ti"].xcom_pull(task_ids=self.task_id, key="log_offset")
        if prior is not None:
            offset = int(prior)  # a retry reads the log from the first attempt's start
        else:
            context["ti"].xcom_push(key="log_offset", value=offset)
        t0 = time.monotonic()
        db.start(inst, wait=False)
        ready_s = db.wait_ready(inst, timeout=min(600, self.recovery_timeout))
        recovery_s = db.wait_recovery_end(inst, timeout=self.recovery_timeout)
        return {"log_offset": offset, "ready_s": ready_s, "recovery_s": recovery_s,
                "start_to_promoted_s": round(time.monotonic() - t0, 3), "instance": inst.name}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        aside = self.upstream(context, "move_aside") or {}
        return (f"The app is frozen. Read the log tail above. The original data directory is kept at "
                f"{aside.get('moved_to')}: run dr_pitr_rollback to put it back, or fix and clear this task.")


#: what `barman restore` appends to postgresql.auto.conf; they outlive the promotion
RECOVERY_SETTINGS = ("restore_command", "recovery_end_command", "recovery_target", "recovery_target_time",
                     "recovery_target_xid", "recovery_target_lsn", "recovery_target_name", "recovery_target_inclusive",
                     "recovery_target_timeline", "recovery_target_action")


def clear_recovery_settings(db: Any, inst: Instance) -> list[str]:
    """`ALTER SYSTEM RESET` Barman's recovery settings once the server is promoted.

    Left in postgresql.auto.conf they point at a `barman_wal` directory that no longer
    exists and pin `recovery_target_timeline`, and pg_basebackup copies them to every
    standby built from the new primary, which then refuses to start ("recovery target
    timeline N does not exist").
    """
    present = db.psql(inst, "SELECT string_agg(name, ',') FROM pg_file_settings WHERE sourcefile LIKE "
                            "'%postgresql.auto.conf' AND name = ANY (ARRAY['" + "','".join(RECOVERY_SETTINGS) + "'])")
    names = sorted({n for n in present.split(",") if n and n in RECOVERY_SETTINGS})
    if names:  # one psql run: each ALTER SYSTEM is its own transaction (-c per statement)
        db.psql_each(inst, [*(f"ALTER SYSTEM RESET {name}" for name in names), "SELECT pg_reload_conf()"])
    return names


class VerifyTargetOperator(DrBaseOperator):
    """Step 10: prove recovery stopped at the target (server log + timeline history), on a new timeline."""

    action = "verify_target"

    def run(self, context: Any) -> dict[str, Any]:
        inst = self.target_instance
        db = self.db(inst.host)
        start = self.upstream(context, "start_recovery")
        stop = self.upstream(context, "stop_postgres")
        log_text = db.log_since(inst.log_file, int(start["log_offset"]))
        replay = (self.upstream(context, "stage_restore") or {}).get("replay") or {}
        if replay.get("log_file"):
            # the staging copy replayed to the target before the freeze: its log holds the stop
            log_text = db.log_since(replay["log_file"], 0) + "\n" + log_text
        wal_name = db.psql(inst, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        new_tli = int(wal_name[:8], 16)
        history = None
        hist_path = f"{inst.data_directory}/pg_wal/{new_tli:08X}.history"
        r = db.host.run(["cat", hist_path], check=False)
        if r.exit_code == 0:
            history = r.stdout
        old_tli = stop.get("old_timeline")
        if old_tli is None and history:
            # the damaged directory had no readable control file (e.g. a half-restored copy left by a
            # killed run): the timeline recovery forked from is the history file's last parent
            entries_ = parse_history_file(history)
            old_tli = entries_[-1].parent_timeline if entries_ else None
        proof = prove_target(self.req.target, log_text, history, old_tli, new_tli)
        if not proof.reached:
            raise VerificationError("recovery target NOT reached: " + "; ".join(proof.reasons)
                                    + "\nlog: " + "\n".join(proof.stop.get("lines", [])[-6:]))
        entries = parse_history_file(history or "")
        # first, while Barman's `#BARMAN#` comment is still in postgresql.auto.conf (ALTER SYSTEM rewrites
        # the file without comments); the reload below (or clear_recovery_settings') applies it
        archive_files = db.restore_archive_command(inst.data_directory)
        cleaned = clear_recovery_settings(db, inst)
        if not cleaned:  # always: a retry after a try that edited the files but died before its reload
            db.psql(inst, "SELECT pg_reload_conf()")
        return {**proof.to_dict(), "history_file": hist_path, "recovery_settings_cleared": cleaned,
                "archive_command_restored_in": archive_files,
                "switch_lsn": entries[-1].switch_lsn if entries else None}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        aside = self.upstream(context, "move_aside") or {}
        return (f"The app stays FROZEN: the recovered server is not at the target. The original data directory is "
                f"kept at {aside.get('moved_to')}. Investigate the WAL archive, then rerun dr_pitr or dr_pitr_rollback.")


class ValidateDataOperator(DrBaseOperator):
    """Step 11: run the inventory's validation queries; compare with `expected`."""

    action = "validate_data"

    def run(self, context: Any) -> dict[str, Any]:
        srv, inst, req = self.srv, self.target_instance, self.req
        db = self.db(inst.host)
        actual: dict[str, int] = {}
        for name, sql in srv.validation_queries.items():
            actual[name] = int(db.psql(inst, sql, database=srv.database))
        mismatches = {k: {"expected": v, "actual": actual.get(k)} for k, v in req.expected.items() if actual.get(k) != v}
        result = {"actual": actual, "expected": req.expected, "mismatches": mismatches}
        if mismatches:
            raise VerificationError("data validation failed: " + ", ".join(
                f"{k} expected {m['expected']}, got {m['actual']}" for k, m in mismatches.items()))
        return result

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("The app stays FROZEN. Inspect the recovered data; if it is wrong, run dr_pitr again with another "
                "target, or dr_pitr_rollback.")


# ------------------------------------------------------------------------ post-incident


def app_connectivity(conn_id: str | None, database_sql: str = "SELECT 1") -> dict[str, Any]:
    """Connect the way the application does (through PgBouncer) and run one query."""
    if not conn_id:
        return {"checked": False}
    import psycopg2
    from airflow.sdk import BaseHook

    c = BaseHook.get_connection(conn_id)
    t0 = time.monotonic()
    conn = psycopg2.connect(host=c.host, port=c.port or 5432, user=c.login, password=c.password, dbname=c.schema,
                            connect_timeout=10, application_name="barman-dr-check")
    try:
        with conn.cursor() as cur:
            cur.execute(database_sql)
            value = cur.fetchone()[0]
    finally:
        conn.close()
    return {"checked": True, "conn_id": conn_id, "value": value, "seconds": round(time.monotonic() - t0, 3)}


class UnfreezeAppOperator(DrBaseOperator):
    """Step 13: repoint PgBouncer when the server moved to a standby, then RESUME; prove the app connects."""

    action = "unfreeze_app"

    def run(self, context: Any) -> dict[str, Any]:
        inst, fr = self.target_instance, self.srv.app_freeze
        repointed = None
        if fr.method == "pgbouncer":
            admin = PgBouncerAdmin(fr)
            if not self.req.in_place:
                repointed = self.repoint(inst)
                admin.reload()
            admin.resume()
        elif fr.method == "command":
            import subprocess

            subprocess.run(list(fr.unfreeze_command or ()), check=True, timeout=fr.timeout_seconds)
        check = app_connectivity(fr.app_conn_id)
        return {"resumed_at": utcnow(), "repointed_config_backup": repointed, "app_check": check}

    def repoint(self, inst: Instance) -> str:
        fr = self.srv.app_freeze
        if not fr.config_file or not fr.config_host:
            raise FreezeError("restore_to a standby needs app_freeze.config_file and config_host in the inventory")
        addr = self.inventory.db_host(inst.host).address
        line = f"{fr.database} = host={addr} port={inst.port} dbname={self.srv.database}"
        stamp = utc_stamp()
        return self.db(fr.config_host).host.run(sh_argv(REPOINT_SCRIPT, fr.config_file, str(fr.database), line,
                                                        stamp)).stdout.strip()

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "The database is recovered but the app may still be frozen: RESUME it on the PgBouncer console by hand."


class RebuildStandbyOperator(DrBaseOperator):
    """Step 12 (mapped per standby): a fresh copy of the new primary on the new timeline.

    The old standby followed the old timeline past the target: it cannot follow the new
    primary. Its data directory is moved aside (kept), then `pg_basebackup -R` from the
    new primary runs as a detached job on the standby host, then it starts and must show
    up as `streaming` in the primary's pg_stat_replication.
    """

    action = "rebuild_standby"
    template_fields: Sequence[str] = ("request", "standby")

    def __init__(self, *, standby: str, stream_timeout: float = 120, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.standby = standby
        self.stream_timeout = stream_timeout

    def run(self, context: Any) -> dict[str, Any]:
        srv = self.srv
        primary = self.target_instance
        sb = srv.standby(self.standby)
        if srv.replication is None:
            raise PreflightError(f"server {srv.name} has no `replication` section in the inventory")
        db, pdb = self.db(sb.host), self.db(primary.host)
        tag = self.run_tag(context)
        job_id = f"rebuild-{sb.name}-{tag}"
        host_jobs = self.inventory.db_host(sb.host).job_dir
        status, stamp = db.host.reset_if_failed(host_jobs, job_id)
        moved = None
        if status.state == "absent":
            db.stop(sb)
            moved = db.move_aside(sb.data_directory, tag)
        elif stamp:
            db.move_aside(sb.data_directory, f"partial-{tag}-{stamp}")
        slot = sb.replication_slot
        if slot:
            pdb.psql(primary, "SELECT pg_create_physical_replication_slot(s) FROM (VALUES ("
                     + _sql_literal(slot) + ")) v(s) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots "
                     "WHERE slot_name = s)")
        paddr = self.inventory.db_host(primary.host).address
        conninfo = (f"host={paddr} port={primary.port} user={srv.replication.user} "
                    f"passfile={srv.replication.passfile} application_name={sb.name}")
        argv = [f"{self.inventory.db_host(sb.host).pg_bin}/pg_basebackup", "-d", conninfo, "-D", sb.data_directory,
                "-X", "stream", "-R", "-c", "fast", *(["-S", slot] if slot else [])]
        t0 = time.monotonic()
        self.track_job(db.host, host_jobs, job_id)
        db.host.run_job(host_jobs, job_id, argv, timeout=6 * 3600)
        copy_s = round(time.monotonic() - t0, 3)
        db.start(sb, wait=False)
        db.wait_ready(sb, timeout=300)
        deadline = time.monotonic() + self.stream_timeout
        state = None
        while time.monotonic() < deadline:
            state = pdb.psql(primary, "SELECT state || ' ' || coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), "
                             "replay_lsn), 0)::bigint FROM pg_stat_replication WHERE application_name = "
                             + _sql_literal(sb.name))
            if state.startswith("streaming"):
                break
            time.sleep(1)
        if not state or not state.startswith("streaming"):
            raise VerificationError(f"standby {sb.name} started but is not streaming from {primary.name} "
                                    f"(pg_stat_replication: {state!r}); see {sb.log_file}")
        return {"standby": sb.name, "moved_to": moved, "copy_s": copy_s, "replication": state,
                "in_recovery": db.in_recovery(sb)}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("The primary is recovered and serving. Only the standby rebuild failed: its old data directory is kept "
                "(moved aside). Clear this task to retry.")


class StandbysToRebuildOperator(DrBaseOperator):
    """The standbys of the recovered server (what `rebuild_standby` maps over); empty skips the rebuild."""

    action = "list_standbys"

    def run(self, context: Any) -> list[str]:
        inst = self.target_instance
        return [s.name for s in self.srv.standbys if s.name != inst.name]

    def audit_details(self, result: Any) -> dict[str, Any]:
        return {"standbys": result}


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class RebaseBarmanOperator(DrBaseOperator):
    """Step 14: Barman streams from the new timeline again, then a fresh full backup.

    A restarted primary stops `pg_receivewal`, and the restored primary has no `barman`
    slot (slots are not in a base backup): `barman cron` recreates both. A WAL switch
    proves archiving on the new timeline; the new backup is the first on it.
    """

    action = "rebase_barman"

    def __init__(self, *, take_backup: bool = True, stream_timeout: float = 120, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.take_backup = take_backup
        self.stream_timeout = stream_timeout

    def restart_streaming_at_fork(self, context: Any) -> dict[str, Any]:
        """Point Barman's receive-wal at the start of the new timeline.

        Barman's streaming directory still holds the old timeline's `.partial`, past the
        fork: pg_receivewal would ask for a position the new primary never had, and fail
        forever. `receive-wal --reset` moves it to the server's *current* segment, which
        would skip the new timeline's first segments (the writes since the app resumed).
        So: reset, then rename the status file to the segment where the new timeline
        starts (taken from the timeline history), when the new primary still has it.
        """
        srv, inst = self.srv, self.target_instance
        verify = self.upstream(context, "verify_target") or {}
        switch_lsn, new_tli = verify.get("switch_lsn"), verify.get("new_timeline")
        self.barman.host.run([*self.barman.argv("receive-wal", "--stop", srv.name, json_output=False)], check=False)
        self.barman.run("receive-wal", "--reset", srv.name, json_output=False)
        out: dict[str, Any] = {"reset": True, "start_segment": None, "gap": None}
        info = self.barman.show_server(srv.name)
        stream_dir = info.get("streaming_wals_directory")
        if not (switch_lsn and new_tli and stream_dir):
            out["gap"] = "unknown fork point: streaming restarted at the server's current segment"
            return out
        fork = WalSegment.from_lsn(int(new_tli), Lsn.parse(switch_lsn)).name
        has_fork = self.db(inst.host).psql(inst, f"SELECT count(*) FROM pg_ls_waldir() WHERE name = '{fork}'") == "1"
        listing = self.barman.host.run(["ls", "-1", stream_dir]).stdout.split()
        partials = [f for f in listing if f.endswith(".partial")]
        if has_fork and len(partials) == 1 and partials[0] != f"{fork}.partial":
            self.barman.host.run(["mv", "--", f"{stream_dir}/{partials[0]}", f"{stream_dir}/{fork}.partial"])
            out["start_segment"] = fork
        elif not has_fork:
            out["gap"] = (f"the new primary no longer has {fork}: WAL from the fork to {partials} is not archived; "
                          "the new full backup covers it")
        return out

    def _streaming(self, timeout: float) -> str | None:
        """`barman cron` until receive-wal runs and a WAL switch gets archived; the closed WAL, or None."""
        deadline = time.monotonic() + timeout
        while True:
            self.barman.cron()
            if self.barman.receive_wal_running(self.srv.name):
                try:
                    return self.barman.switch_wal(self.srv.name, archive_timeout=30) or "(nothing to switch)"
                except BarmanCommandError as exc:
                    self.log.warning("switch-wal after cron: %s", exc)
            if time.monotonic() > deadline:
                return None
            time.sleep(2)

    def stuck_past_fork(self, context: Any) -> bool:
        """Barman's streaming position is on the old timeline *past* the fork: not in the new server's history.

        pg_receivewal then fails at every start ("requested starting point ... is not in this
        server's history"), yet `switch-wal --archive` may still return 0 while cron restarts
        it, so waiting for streaming first can look fine and is not enough. (A position before
        the fork is in the new history: pg_receivewal follows the switch by itself.)
        """
        verify = self.upstream(context, "verify_target") or {}
        switch_lsn, new_tli = verify.get("switch_lsn"), verify.get("new_timeline")
        if not (switch_lsn and new_tli):
            return False
        stream_dir = self.barman.show_server(self.srv.name).get("streaming_wals_directory")
        if not stream_dir:
            return False
        fork = WalSegment.from_lsn(int(new_tli), Lsn.parse(switch_lsn)).name
        partials = [f[:24] for f in self.barman.host.run(["ls", "-1", stream_dir]).stdout.split()
                    if f.endswith(".partial") and is_wal_segment_name(f[:24])]
        return any(int(p[:8], 16) < int(new_tli) and int(p[8:], 16) > int(fork[8:], 16) for p in partials)

    def run(self, context: Any) -> dict[str, Any]:
        srv = self.srv
        # pg_receivewal follows a timeline switch when its position is before the fork; past the
        # fork (the old primary kept streaming after the target) it must be restarted at the fork
        fork = None
        if self.stuck_past_fork(context):
            fork = self.restart_streaming_at_fork(context)
        closed = self._streaming(timeout=30 if fork is None else self.stream_timeout)
        if closed is None and fork is None:
            fork = self.restart_streaming_at_fork(context)
            closed = self._streaming(timeout=self.stream_timeout)
        if closed is None:
            raise BarmanDrError(f"Barman WAL streaming for {srv.name} did not resume on the new timeline "
                                f"within {self.stream_timeout:.0f}s: see the barman log")
        backup = None
        if self.take_backup:
            job_id = f"backup-{srv.name}-{self.run_tag(context)}"
            self.track_job(self.barman.host, self.barman.job_dir, job_id)
            self.barman.backup_job(srv.name, job_id, wait_timeout=300)
            latest = max((b for b in self.barman.list_backups(srv.name) if b.is_done), key=lambda b: b.backup_id)
            backup = self.barman.show_backup(srv.name, latest.backup_id).to_dict()
        return {"streaming": True, "fork": fork, "closed_wal": closed,
                "new_backup_id": backup["backup_id"] if backup else None,
                "new_backup_timeline": backup["timeline"] if backup else None}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("The database is recovered and serving. Barman is not yet protecting the new timeline: run "
                "`barman cron`, `barman check`, `barman backup` on the barman host, or clear this task.")


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

    action = "report"

    PHASES = ("freeze_app", "stop_postgres", "move_aside", "barman_restore", "start_recovery", "verify_target",
              "validate_data", "unfreeze_app")

    def run(self, context: Any) -> dict[str, Any]:
        req, srv = self.req, self.srv
        x = {t: self.upstream(context, t) or {} for t in
             ("preflight", "wal_coverage", "plan", "stage_restore", *self.PHASES, "rebase_barman")}
        phases = {p: x[p].get("duration_s") for p in self.PHASES}
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
            "counts": x["validate_data"].get("actual"), "expected": req.expected,
            "app_check": x["unfreeze_app"].get("app_check"),
            "standbys": [s for s in standbys if s],
            "new_backup_id": x["rebase_barman"].get("new_backup_id"),
            "rto_s": rto, "rto_objective_s": srv.rto_objective_seconds,
            "rto_met": rto is not None and rto <= srv.rto_objective_seconds,
            "estimated_rto_s": (x["plan"].get("estimated_rto") or {}).get("total_s"),
            "phases_s": phases,
        }
        stage = x["stage_restore"]
        staged = bool(stage.get("staged"))
        report["staged_restore"] = staged
        # the downtime window is rto_s (freeze -> resume); staging ran before it, with the app up
        report["outside_downtime_s"] = {"stage_restore": stage.get("duration_s")} if staged else {}
        report["staging_leftover"] = staging_leftover(self, stage) if staged else []
        note = (f"PITR {srv.name} DONE: target {req.target.describe()} reached on timeline {report['new_timeline']}\n"
                f"RTO (downtime, freeze -> resume) {rto}s (objective {srv.rto_objective_seconds}s): "
                + ", ".join(f"{k} {v}s" for k, v in phases.items() if v is not None)
                + (f"\nstaged restore before the freeze (app running): {stage.get('duration_s')}s" if staged else "")
                + f"\ncounts {report['counts']}\nold data kept at {report['moved_aside']}\n"
                  f"new backup {report['new_backup_id']}"
                + (f"\nstaging directories left: {', '.join(report['staging_leftover'])}"
                   if report["staging_leftover"] else ""))
        set_run_note(context["dag"].dag_id, context["run_id"], note)
        return report


class PitrFailureSummaryOperator(DrBaseOperator):
    """Runs when any step failed: where things stand and what to do next, in the audit and the run note."""

    action = "failure_summary"

    def run(self, context: Any) -> dict[str, Any]:
        dag_run = context["dag_run"]
        failed = []
        try:
            for ti in dag_run.get_task_instances(state=["failed", "upstream_failed"]):
                failed.append(ti.task_id)
        except Exception:  # noqa: BLE001 - best effort across Airflow versions
            failed = []
        freeze = self.upstream(context, "freeze_app") or {}
        unfreeze = self.upstream(context, "unfreeze_app") or {}
        aside = self.upstream(context, "move_aside") or {}
        app_state = "frozen" if freeze.get("frozen") and not unfreeze else (
            "never frozen" if not freeze.get("frozen") else "resumed")
        staging = context["ti"].xcom_pull(task_ids="stage_restore", key="staging") or {}
        leftover = staging_leftover(self, staging) if staging else []
        next_action = ("run dr_pitr_rollback with pitr_run_id=" + context["run_id"]
                       if aside.get("moved_to") else "nothing live was changed: fix the cause and trigger again")
        if leftover:
            next_action += (f"; staging directories left on {staging.get('host')}: {', '.join(leftover)} (restore "
                            "copies, not live data: delete them once no longer needed)")
        summary = {"failed_tasks": failed, "app": app_state, "old_data_directory": aside.get("moved_to"),
                   "staging_leftover": leftover, "staging_host": staging.get("host"), "next_action": next_action}
        set_run_note(context["dag"].dag_id, context["run_id"],
                     f"PITR FAILED at {', '.join(failed) or '?'}; app {app_state}; old data: "
                     f"{aside.get('moved_to') or 'untouched'}; next: {summary['next_action']}")
        return summary

    def execute(self, context: Any) -> Any:
        summary = super().execute(context)
        # this task is a leaf: failing it makes the DAG run's state say what happened
        raise AirflowFailException(
            f"PITR failed at {', '.join(summary['failed_tasks']) or 'an earlier step'}; app: {summary['app']}; "
            f"original data: {summary['old_data_directory'] or 'untouched'}. NEXT: {summary['next_action']}")


class ReleaseLockOperator(DrBaseOperator):
    """Always last: release this run's server lock (a no-op when the run never took it)."""

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
