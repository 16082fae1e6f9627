"""Stage (staged_restore, default on): the restore and the WAL replay to the target, before the freeze."""

from __future__ import annotations

import posixpath
import time
from typing import Any

from barman_dr.exceptions import BarmanDrError, PreflightError
from barman_dr.forensics.recovery_proof import parse_history_file
from barman_dr.hooks.dbhost import (
    SOCKET_PATH_MAX,
    staged_instance,
    staged_socket_path,
    staged_start_options,
    staging_paths,
)
from barman_dr.inventory import Instance
from barman_dr.operators.base import DrBaseOperator
from barman_dr.operators.pitr.delayed_source import recover_on_delayed_standby
from barman_dr.operators.pitr.errors import VerificationError
from barman_dr.operators.pitr.resolve import prove_resolved, resolution_for, restore_target_of, target_tli_of

SEGMENT_BYTES = 16 * 1024 * 1024
#: free space a staged restore needs beyond the backup and the WAL it copies
STAGING_MARGIN = 0.10
#: free space left to the live server on the shared filesystem (see `headroom_bytes`)
HEADROOM_FRACTION, HEADROOM_MIN, HEADROOM_MAX = 0.02, 64 * 1024 * 1024, 4 * 1024**3
#: consecutive long-poll windows without a free-space reading before the staging copy is stopped
WATCH_MISSES = 4


def _mib(n: int) -> str:
    return f"{n / 1024 / 1024:,.0f} MiB"


class StagingSpaceError(PreflightError):
    """The staging filesystem cannot hold the staged restore (before the copy, or it filled up during it)."""


def out_of_space(exc: BaseException) -> bool:
    """Did a copy or a replay fail because its filesystem is full (ENOSPC, in any of the tools' words)?"""
    text = " ".join(str(x) for x in (exc, getattr(exc, "stderr", ""), getattr(exc, "stdout", "")))
    return "No space left on device" in text or ("(28)" in text and "rsync" in text)


def headroom_bytes(fs_size_bytes: int) -> int:
    """Free space the live server keeps on its filesystem while a staged copy grows next to it.

    The staging directory shares the data directory's filesystem (the rename into place is
    instant only there), so the copy competes with the live server's WAL: a full filesystem
    makes PostgreSQL PANIC. 2% of the filesystem, at least 64 MiB and at most 4 GiB.
    """
    return int(min(max(fs_size_bytes * HEADROOM_FRACTION, HEADROOM_MIN), HEADROOM_MAX))


def check_staging_space(host: str, free: dict[str, Any], backup_bytes: int, wal_segments: int) -> dict[str, Any]:
    """Free space for a second copy next to the data directory: backup + WAL + 10%, plus the live headroom."""
    wal_bytes = wal_segments * SEGMENT_BYTES
    needed = int((backup_bytes + wal_bytes) * (1 + STAGING_MARGIN))
    headroom = headroom_bytes(int(free.get("size_bytes") or 0))
    out = {**free, "needed_bytes": needed, "backup_bytes": backup_bytes, "wal_bytes": wal_bytes,
           "headroom_bytes": headroom}
    if free["available_bytes"] < needed + headroom:
        raise StagingSpaceError(
            f"not enough free space for a staged restore on {host}:{free['mount_point']} (the filesystem of "
            f"{free['path']}): it needs {_mib(needed)} (backup {_mib(backup_bytes)} + WAL to replay "
            f"{_mib(wal_bytes)} + {STAGING_MARGIN:.0%} margin) and leaves {_mib(headroom)} for the live server; "
            f"{_mib(free['available_bytes'])} are available. "
            "Nothing was stopped. Fix: free space on that filesystem and clear this task, or trigger again with "
            "staged_restore=false (the restore then runs inside the downtime window, after the freeze; it needs "
            "about the same space, because the old data directory is kept next to the restored one)")
    return out


class StagingFillingError(BarmanDrError):
    """The staging copy was stopped: its filesystem fell below the live server's headroom."""


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

    gated_by_approval = True

    action = "stage_restore"

    def __init__(self, *, restore_timeout: float = 6 * 3600, staged_shared_buffers: str = "256MB",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.restore_timeout = restore_timeout
        self.staged_shared_buffers = staged_shared_buffers

    def run(self, context: Any) -> dict[str, Any]:
        req, srv, inst = self.req, self.srv, self.target_instance
        if req.from_delayed_standby:  # no copy: the delayed standby replays forward to the stop point and promotes
            return recover_on_delayed_standby(self, context, timeout=self.restore_timeout)
        if not req.staged_restore:
            return {"staged": False, "reason": "staged_restore=false: barman restore runs inside the downtime window"}
        pre = self.upstream(context, "preflight")
        wal = self.upstream(context, "wal_coverage") or {}
        res = resolution_for(self, context)
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
            srv.name, pre["backup_id"], staged, restore_target_of(res),
            remote_ssh_command=self.inventory.db_host(inst.host).restore_ssh_command, jobs=req.jobs,
            target_tli=target_tli_of(res), staging_wal_directory=wal_dir)
        self.track_job(self.barman.host, self.barman.job_dir, job_id)
        started = time.monotonic()
        size = int(backup.get("size_bytes") or 0)
        parent = posixpath.dirname(inst.data_directory.rstrip("/"))
        headroom = space["headroom_bytes"] if space else headroom_bytes(int(db.free_space(parent)["size_bytes"]))

        unmeasured = [0]

        def watch(status: Any) -> None:
            # every long-poll window: stop the copy before it eats the live server's headroom
            if status.finished:
                return
            try:
                avail = int(db.free_space(parent)["available_bytes"])
                unmeasured[0] = 0
            except BarmanDrError as exc:  # an SSH hiccup: the copy goes on, but not for long unwatched
                unmeasured[0] += 1
                self.log.warning("free space of %s:%s not measured (%s in a row): %s", inst.host, parent,
                                 unmeasured[0], exc)
                if unmeasured[0] < WATCH_MISSES:
                    return
                stopped = self.barman.host.kill_job(self.barman.job_dir, job_id)
                raise StagingFillingError(f"the free space of {inst.host}:{parent} could not be measured "
                                          f"{WATCH_MISSES} times in a row: the copy was stopped ({stopped}) rather "
                                          "than left to fill the live server's filesystem unwatched") from exc
            if avail < headroom:
                stopped = self.barman.host.kill_job(self.barman.job_dir, job_id)
                raise StagingFillingError(f"{_mib(avail)} left on {inst.host}:{parent}, under the live server's "
                                          f"headroom of {_mib(headroom)}: the copy was stopped ({stopped})")

        try:
            result = self.barman.restore_job(job_id, argv, timeout=self.restore_timeout, on_poll=watch)
            seconds = max(time.monotonic() - started, 0.001)
            replay = self.replay_staged(db, inst, staged, res)
        except BarmanDrError as exc:
            if not (isinstance(exc, StagingFillingError) or out_of_space(exc)):
                raise
            self.refuse_full_filesystem(context, db, inst, record, job_id, size, int(wal.get("wal_segments") or 0),
                                        exc)
        return {"staged": True, **record, "identity": db.dir_identity(staged), "job_id": job_id, "argv": argv,
                "replay_bytes": int(res["replay"]["bytes"]), "stop": res["stop"]["described"],
                "space": space, "cleaned": cleaned, "restore_s": round(seconds, 3), "bytes": size,
                "restore_bytes_per_s": int(size / seconds) if size else None, "stdout_tail": result.stdout[-2000:],
                "replay": replay}

    def refuse_full_filesystem(self, context: Any, db: Any, inst: Instance, record: dict[str, Any], job_id: str,
                               backup_bytes: int, wal_segments: int, exc: BaseException) -> None:
        """The staging filesystem filled up during the copy or the replay: remove our partial copy, name the shortfall.

        Free space was checked before the copy, so something else took it meanwhile (another
        writer on that filesystem, WAL growth) or the estimate was short. A retry would fill
        it again: fail at once, before the freeze, with the numbers, and leave nothing of
        ours behind (the failed job's record is kept for the audit).
        """
        staged, wal_dir = record["staging_directory"], record["wal_directory"]
        self.barman.host.reset_if_failed(self.barman.job_dir, job_id)
        try:
            db.stop(staged_instance(inst, staged), mode="immediate", timeout=60)
        except BarmanDrError as stop_exc:
            self.log.warning("stopping the staging PostgreSQL on %s: %s", staged, stop_exc)
        removed = db.remove_staging(inst.data_directory, staged, wal_dir)
        free = db.free_space(posixpath.dirname(inst.data_directory.rstrip("/")))
        needed = int((backup_bytes + wal_segments * SEGMENT_BYTES) * (1 + STAGING_MARGIN)) \
            + headroom_bytes(int(free["size_bytes"]))
        self.audit(context).record("staging_removed", "info", server=self.srv.name, target=self.audit_target(),
                                   details={**record, "removed": removed, "reason": "filesystem full", "space": free})
        why = str(exc) if isinstance(exc, StagingFillingError) else "No space left on device"
        raise StagingSpaceError(
            f"the staging filesystem {inst.host}:{free['mount_point']} filled up during the staged restore "
            f"({why}). It needs {_mib(needed)} (backup {_mib(backup_bytes)} + WAL "
            f"{_mib(wal_segments * SEGMENT_BYTES)} + {STAGING_MARGIN:.0%} + the live server's headroom); "
            f"{_mib(free['available_bytes'])} are "
            f"available now, after removing this run's partial copy ({', '.join(removed) or 'nothing left'}): "
            f"a shortfall of {_mib(max(needed - free['available_bytes'], 0))}. Nothing was stopped and the app was "
            "never frozen. Fix: free space on that filesystem (something else is writing there), then trigger "
            "again; or trigger with staged_restore=false") from exc

    def replay_staged(self, db: Any, inst: Instance, staged: str, res: dict[str, Any]) -> dict[str, Any]:
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
        proof = prove_resolved(res, db.log_since(sinst.log_file, 0), history, old_tli, new_tli)
        if not proof.reached:
            raise VerificationError(
                "the staging copy did NOT stop at the target: " + "; ".join(proof.reasons)
                + f". Nothing was stopped: the app runs on the original server. The staging copy {staged} "
                "is not used. Check the WAL archive (dr_daily_verification), then trigger a new run")
        return {"outcome": outcome, "log_file": sinst.log_file, "replay_s": round(time.monotonic() - t0, 3),
                "new_timeline": new_tli, "switch_lsn": entries[-1].switch_lsn if entries else None,
                "stop": proof.stop.get("lines", [])[:3]}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        if self.req.from_delayed_standby:
            return (f"The app was never frozen and runs on {self.srv.primary.name}. If {self.target_instance.name} "
                    "was stopped or promoted by this step (the audit trail's delayed_source event), clear this task "
                    "to go on (a retry picks up from the audited intent), or trigger again with source=barman (the "
                    "delayed standby then needs a rebuild).")
        if isinstance(exc, StagingSpaceError):
            return ("Nothing was stopped and the app was never frozen; no partial copy of this run is left. Free "
                    "space on the staging filesystem, then trigger again (or with staged_restore=false).")
        staging = context["ti"].xcom_pull(task_ids=self.task_id, key="staging") or {}
        where = f" A partial copy may be left in {staging.get('staging_directory')} (not live data)." if staging else ""
        return ("Nothing was stopped: the app runs on the original server." + where + " Clear this task to retry "
                "(it removes its own partial copy first), or trigger again with staged_restore=false.")
