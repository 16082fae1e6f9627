"""Execute, inside the downtime window: freeze the app, stop PostgreSQL, move the data aside, put the restore in place, start.

Every step is idempotent: a retried task finds the state its first attempt left (a
stopped server, a directory already moved aside, a restore job already running) and
converges instead of doing the step twice."""

from __future__ import annotations

import time
from typing import Any

from barman_dr.exceptions import BarmanDrError, PreflightError
from barman_dr.operators.base import DrBaseOperator, utcnow
from barman_dr.operators.pitr.resolve import resolution_for, restore_target_of, target_tli_of
from barman_dr.safety.appfreeze import PgBouncerAdmin


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

    gated_by_approval = True

    action = "freeze_app"

    def run(self, context: Any) -> dict[str, Any]:
        frozen_at = utcnow()
        out = freeze_app(self)
        return {**out, "frozen_at": frozen_at}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "The application was NOT frozen and nothing was stopped. Find the long transaction, then clear this task."


class StopPostgresOperator(DrBaseOperator):
    """Step 6: stop PostgreSQL where the recovered server will run (and fence the old primary)."""

    gated_by_approval = True

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
        if not self.req.from_delayed_standby:  # the promoted delayed standby is the recovered server: it stays up
            stopped[inst.name] = self.db(inst.host).stop(inst)
        # the old timeline's last record (a clean stop ends with its shutdown checkpoint): where the discards end
        old_end = None
        try:
            cd = prim_db.controldata(srv.primary.data_directory)
            if cd.state == "shut down" and cd.checkpoint_lsn is not None:
                old_end = str(cd.checkpoint_lsn)
        except BarmanDrError as exc:
            self.log.warning("pg_controldata of the stopped primary failed: %s", exc)
        return {"old_timeline": old_timeline, "stopped": stopped, "instance": inst.name, "old_end_lsn": old_end}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "The app is frozen. Check the server log of the instance, stop it by hand if needed, then clear this task."


class MoveAsideOperator(DrBaseOperator):
    """Step 7: rename the data directory to `<dir>.pre-<stamp>-<tag>`. Never deleted."""

    gated_by_approval = True

    action = "move_aside"

    def run(self, context: Any) -> dict[str, Any]:
        inst = self.target_instance
        if self.req.from_delayed_standby:
            return {"skipped": f"source delayed_standby: {inst.name} was promoted at the stop point; nothing is moved",
                    "data_directory": None, "moved_to": None, "host": inst.host}
        moved = self.db(inst.host).move_aside(inst.data_directory, self.run_tag(context))
        return {"data_directory": inst.data_directory, "moved_to": moved, "host": inst.host}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "The app is frozen and PostgreSQL is stopped; the data directory is where it was. Clear this task."


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

    gated_by_approval = True

    action = "barman_restore"

    def __init__(self, *, restore_timeout: float = 6 * 3600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.restore_timeout = restore_timeout

    def run(self, context: Any) -> dict[str, Any]:
        req, srv, inst = self.req, self.srv, self.target_instance
        if req.from_delayed_standby:
            return {"mode": "delayed_standby", "skipped": f"{inst.name} was promoted at the stop point: no restore",
                    "destination": inst.data_directory, "host": inst.host}
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
        res = resolution_for(self, context)
        argv = self.barman.restore_argv(
            srv.name, pre["backup_id"], inst.data_directory, restore_target_of(res),
            remote_ssh_command=self.inventory.db_host(inst.host).restore_ssh_command, jobs=req.jobs,
            target_tli=target_tli_of(res))
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

    gated_by_approval = True

    action = "start_recovery"

    def __init__(self, *, recovery_timeout: float = 3600, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.recovery_timeout = recovery_timeout

    def run(self, context: Any) -> dict[str, Any]:
        inst = self.target_instance
        db = self.db(inst.host)
        if self.req.from_delayed_standby:
            # promoted before the freeze (stage_restore): verify_target reads its log from before that restart
            stage = self.upstream(context, "stage_restore") or {}
            if "log_offset" not in stage:
                raise PreflightError("the delayed standby's restart (XCom of stage_restore) is missing: clear the run "
                                     "from stage_restore")
            t0 = time.monotonic()
            # promoted socket-only (stage_restore): now that the old primary is fenced, with its normal options
            if db.status(inst.data_directory) == "running":
                db.wait_ready(inst, timeout=min(600, self.recovery_timeout))
                if db.psql(inst, "SHOW listen_addresses") == "":
                    db.stop(inst, mode="fast")
            db.start(inst, wait=False)
            ready_s = db.wait_ready(inst, timeout=min(600, self.recovery_timeout))
            if db.in_recovery(inst):
                raise PreflightError(f"{inst.name} is in recovery again: it is not the promoted server stage_restore "
                                     "proved. Look at its log; run dr_pitr again")
            return {"log_offset": int(stage["log_offset"]), "mode": "delayed_standby", "ready_s": ready_s,
                    "recovery_s": stage.get("promoted_s"), "replay_bytes": 0,
                    "start_to_promoted_s": round(time.monotonic() - t0, 3), "instance": inst.name,
                    "restarted": "with TCP and archiving, the old primary fenced"}
        # the server log from the start that recovers: this try's own start, or (found running: an earlier try
        # started it and died while it recovered) the start that try recorded
        prior = self.remembered(context, "log_offset") if db.status(inst.data_directory) == "running" else None
        offset = int(prior) if prior is not None else int(self.remember(context, "log_offset",
                                                                       db.log_size(inst.log_file)))
        t0 = time.monotonic()
        db.start(inst, wait=False)
        ready_s = db.wait_ready(inst, timeout=min(600, self.recovery_timeout))
        recovery_s = db.wait_recovery_end(inst, timeout=self.recovery_timeout)
        stage = self.upstream(context, "stage_restore") or {}
        replayed = 0 if stage.get("staged") else int(resolution_for(self, context)["replay"]["bytes"])
        return {"log_offset": offset, "ready_s": ready_s, "recovery_s": recovery_s, "replay_bytes": replayed,
                "start_to_promoted_s": round(time.monotonic() - t0, 3), "instance": inst.name}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        aside = self.upstream(context, "move_aside") or {}
        return (f"The app is frozen. Read the log tail above. The original data directory is kept at "
                f"{aside.get('moved_to')}: run dr_pitr_rollback to put it back, or fix and clear this task.")


#: what `barman restore` appends to postgresql.auto.conf; they outlive the promotion
