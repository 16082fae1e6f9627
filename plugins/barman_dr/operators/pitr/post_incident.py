"""Post-incident: the app back, the standbys rebuilt on the new timeline, Barman protecting it again."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from barman_dr.exceptions import BarmanCommandError, BarmanDrError, PreflightError
from barman_dr.forensics.target_resolution import StopPoint
from barman_dr.hooks.remote import sh_argv
from barman_dr.inventory import Instance
from barman_dr.models import Lsn, WalSegment, is_wal_segment_name, utc_stamp
from barman_dr.operators.base import DrBaseOperator, utcnow
from barman_dr.operators.pitr.errors import VerificationError
from barman_dr.operators.pitr.resolve import TargetResolver, resolution_for
from barman_dr.safety.appfreeze import REPOINT_SCRIPT, FreezeError, PgBouncerAdmin


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


class DiscardedOperator(DrBaseOperator):
    """Step 13b (after the app is back): what the PITR actually discarded, from the stop point to the freeze.

    The plan listed what would be discarded up to the plan; in staged mode the app kept
    writing until the freeze, and those writes are gone too. This decodes the old
    timeline's WAL Barman holds (its streaming `.partial` included) from the stop record to
    the old primary's shutdown checkpoint: per table rows inserted, updated and deleted,
    and the xids, which `dr_salvage` uses to find the discarded rows in the moved-aside
    directory. It runs before `rebase_barman` re-points Barman's streaming at the new
    timeline. A report, not a gate: a failure is recorded and the run goes on.
    """

    action = "discarded"

    def __init__(self, *, attempts: int = 3, retry_delay_s: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s

    def run(self, context: Any) -> dict[str, Any]:
        srv = self.srv
        res = resolution_for(self, context)
        stop_x = self.upstream(context, "stop_postgres") or {}
        end = stop_x.get("old_end_lsn")
        errors: list[str] = []
        for attempt in range(1, self.attempts + 1):
            try:
                resolver = TargetResolver(self, srv)
                info = self.barman.show_server(srv.name)
                warnings: list[str] = []
                waldump = resolver.decoder.waldump(info, srv.name, warnings)
                view = resolver.decoder.view(srv.name, info, int(res["recovery_timeline"]))
                out = resolver.discards(view, waldump, StopPoint.from_dict(res["stop"]), True,
                                        until_lsn=Lsn.parse(end).value + 1 if end else None,
                                        instance=self.target_instance)
                out["old_end_lsn"] = end
                out["warnings"] = warnings + resolver.warnings + errors
                if not end:
                    out["warnings"].append("the old primary's end of WAL is unknown (not shut down cleanly?): counted "
                                           "up to the newest WAL Barman holds on the old timeline")
                return out
            except Exception as exc:  # a report: never fail the recovered run for it
                self.log.exception("could not list what the PITR discarded (attempt %d)", attempt)
                errors.append(f"attempt {attempt}: {type(exc).__name__}: {str(exc)[:300]}")
                if attempt < self.attempts:
                    time.sleep(self.retry_delay_s)
        return {"error": "; ".join(errors), "old_end_lsn": end,
                "fix": "clear this task alone (not its downstream) to decode again; dr_salvage needs its list"}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return "The database is recovered and serving; only the list of discarded transactions is missing."


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
        # -w: never prompt for a password (a detached job has no terminal: it would wait forever)
        argv = [f"{self.inventory.db_host(sb.host).pg_bin}/pg_basebackup", "-d", conninfo, "-D", sb.data_directory,
                "-X", "stream", "-R", "-c", "fast", "-w", *(["-S", slot] if slot else [])]
        t0 = time.monotonic()
        self.track_job(db.host, host_jobs, job_id)
        db.host.run_job(host_jobs, job_id, argv, timeout=6 * 3600)
        copy_s = round(time.monotonic() - t0, 3)
        conf = f"{sb.data_directory}/postgresql.auto.conf"
        start = start_settings(sb)
        if start:  # what pg_basebackup -R does not know: the fallback to the archive (and no delay yet)
            db.host.run(sh_argv(SET_CONF_SCRIPT, conf, *start))
        db.start(sb, wait=False)
        db.wait_ready(sb, timeout=300)
        if start:
            db.psql(sb, "SELECT pg_reload_conf()")  # a retry may find it running with an older file
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
        delay = delay_settings(sb)
        if delay:
            # only now: a delayed standby holding back a fresh commit of the WAL it copied starts its
            # walreceiver only after the delay (up to hours); streaming first, then the delay (sighup)
            db.host.run(sh_argv(SET_CONF_SCRIPT, conf, *delay))
            db.psql(sb, "SELECT pg_reload_conf()")
        settings = [*start, *delay]
        return {"standby": sb.name, "moved_to": moved, "copy_s": copy_s, "replication": state,
                "in_recovery": db.in_recovery(sb), "settings": settings, "delayed_s": sb.apply_delay_s}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        return ("The primary is recovered and serving. Only the standby rebuild failed: its old data directory is kept "
                "(moved aside). Clear this task to retry.")


#: on the db host: $1 = postgresql.auto.conf, then `key = 'value'` lines; each key's earlier lines are
#: dropped first, so a retry writes the same file (ALTER SYSTEM's own file format: one line per key).
#: Any failure (a full disk) exits non-zero and leaves the original file as it was.
SET_CONF_SCRIPT = r"""
f="$1"; shift
tmp="$f.barman-dr.$$"
trap 'rm -f -- "$tmp" "$tmp.next"' EXIT
cp -p -- "$f" "$tmp" || exit 1
for kv in "$@"; do
  key="${kv%% = *}"
  grep -v -e "^$key = " -- "$tmp" > "$tmp.next"
  [ $? -le 1 ] || exit 1
  mv -- "$tmp.next" "$tmp" || exit 1
  printf '%s\n' "$kv" >> "$tmp" || exit 1
done
mv -- "$tmp" "$f" || exit 1
"""


def start_settings(sb: Instance) -> list[str]:
    """What a rebuilt standby starts with: its restore_command, and no delay yet (see delay_settings)."""
    return [*(["recovery_min_apply_delay = '0'"] if sb.apply_delay_s else []),
            *(["restore_command = " + _sql_literal(sb.restore_command)] if sb.restore_command else [])]


def delay_settings(sb: Instance) -> list[str]:
    """A delayed standby's delay, set once it streams (recovery_min_apply_delay is reloadable).

    PostgreSQL applies no delay before consistency, but right after it the copied WAL's fresh
    commits are held back, and the walreceiver starts only when the startup process needs WAL
    it does not have: with the delay from the start, a rebuilt standby would not stream for up
    to the whole delay.
    """
    return [f"recovery_min_apply_delay = '{int(sb.apply_delay_s)}s'"] if sb.apply_delay_s else []


def standbys_to_rebuild(srv: Any, recovered: Instance) -> list[str]:
    """Every standby but the recovered server; the spare delayed standbys only when a delayed standby was
    the one recovered onto (promoted, or restored over): they become the server's new delayed protection."""
    return [s.name for s in srv.standbys if s.name != recovered.name and (not s.spare or recovered.delayed)]


class StandbysToRebuildOperator(DrBaseOperator):
    """The standbys of the recovered server (what `rebuild_standby` maps over); empty skips the rebuild."""
    runs_on_site = False  # bookkeeping: the `default` queue

    action = "list_standbys"

    def run(self, context: Any) -> list[str]:
        return standbys_to_rebuild(self.srv, self.target_instance)

    def audit_details(self, result: Any) -> dict[str, Any]:
        return {"standbys": result}


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


#: on the barman host: $1 = the destination in Barman's streaming directory, $2 = the segment on the db host,
#: the rest = the argv that logs in to the db host. Only a whole segment is renamed into place. The copy
#: is written next to that directory (the server's own directory, same filesystem), never inside it:
#: `barman cron` archives whatever it finds there, and took a half-written `<seg>.backfill.<pid>` for an
#: unknown file, moving it to `errors/` (CI, 2026-12-05: the verification's archiver_errors CRITICAL).
BACKFILL_SCRIPT = r"""
dest="$1"; src="$2"; shift 2
[ -e "$dest" ] && { echo "exists $dest"; exit 0; }
tmp="$(dirname -- "$(dirname -- "$dest")")/.backfill-$(basename -- "$dest").$$"
"$@" cat -- "$src" > "$tmp" || { rm -f -- "$tmp"; exit 1; }
if [ "$(stat -c %s -- "$tmp")" != 16777216 ]; then rm -f -- "$tmp"; echo "short copy of $src" >&2; exit 1; fi
mv -- "$tmp" "$dest"
echo "copied $dest"
"""


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

    def backfill_new_timeline(self, context: Any, closed: str | None) -> dict[str, Any]:
        """Every segment of the new timeline, from the fork to the one just closed, in Barman's archive.

        Streaming can leave a hole at the start of the new timeline: pg_receivewal interrupted
        in the fork segment (a cron restart, a server killed and started again during
        recovery, which a hot standby streams from), its `.partial` archived as such, and the
        restart taken at the server's *current* segment. A PITR to a point of the new timeline
        between the fork and the new backup would then be impossible (the daily verification
        reports it as WAL missing). The new primary still has those segments in `pg_wal`
        (`wal_keep_size`): each complete one missing from the catalogue is copied, by the
        barman host over its own SSH to the db host, into Barman's streaming directory, where
        `barman archive-wal` archives it like any streamed segment. Only whole 16 MiB files
        are handed over; the segment being written is never copied.
        """
        verify = self.upstream(context, "verify_target") or {}
        switch_lsn, new_tli = verify.get("switch_lsn"), verify.get("new_timeline")
        if not (switch_lsn and new_tli and closed and is_wal_segment_name(closed[:24])):
            return {"checked": False}
        srv, inst = self.srv, self.target_instance
        fork = WalSegment.from_lsn(int(new_tli), Lsn.parse(switch_lsn))
        last = WalSegment.parse(closed[:24])
        if last.timeline != int(new_tli) or last.segno < fork.segno:
            return {"checked": False}
        wanted = [WalSegment(int(new_tli), n).name for n in range(fork.segno, last.segno + 1)]
        archived = {e.name for e in self.barman.wal_catalog(srv.name)}
        missing = [w for w in wanted if w not in archived]
        if not missing:
            return {"checked": True, "missing": []}
        db = self.db(inst.host)
        current = db.psql(inst, "SELECT pg_walfile_name(pg_current_wal_lsn())")
        in_pg_wal = set(db.psql(inst, "SELECT name FROM pg_ls_waldir() WHERE size = 16777216").split())
        stream_dir = self.barman.show_server(srv.name).get("streaming_wals_directory")
        ssh = list(self.inventory.db_host(inst.host).restore_ssh_command)
        copied, lost = [], []
        for seg in missing:
            if seg >= current or seg not in in_pg_wal or not stream_dir:
                lost.append(seg)
                continue
            self.barman.host.run(sh_argv(BACKFILL_SCRIPT, f"{stream_dir}/{seg}", f"{inst.data_directory}/pg_wal/{seg}",
                                         *ssh), timeout=300)
            copied.append(seg)
        if copied:
            self.barman.run("archive-wal", srv.name, json_output=False, timeout=300)
            archived = {e.name for e in self.barman.wal_catalog(srv.name)}
            lost += [c for c in copied if c not in archived]
        out = {"checked": True, "missing": missing, "backfilled": [c for c in copied if c not in lost], "lost": lost}
        if lost:
            self.log.warning("new timeline segments Barman could not get: %s (the new full backup covers the WAL "
                             "after it; a PITR into that stretch is impossible)", lost)
        return out

    def follow_new_primary(self) -> dict[str, Any] | None:
        """After `restore_to: <standby>`, Barman's conninfo and streaming_conninfo name that standby.

        The old primary is fenced: streaming, `switch-wal` and the new backup must reach the
        server now serving the app. Host and port come from the inventory (the standby's db
        host address and port), everything else from Barman's own value (`BarmanHook.point_at`).
        `create_slot = auto` makes the next `barman cron` create Barman's slot there.
        """
        if self.req.in_place:
            return None
        inst = self.target_instance
        return self.barman.point_at(self.srv.name, self.inventory.db_host(inst.host).address, inst.port)

    def run(self, context: Any) -> dict[str, Any]:
        srv = self.srv
        follows = self.follow_new_primary()
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
        try:
            backfill = self.backfill_new_timeline(context, closed)
        except BarmanDrError as exc:  # reported; the new backup below still protects what follows
            self.log.warning("could not check the new timeline's first segments: %s", exc)
            backfill = {"checked": False, "error": str(exc)[:500]}
        backup = None
        if self.take_backup:
            job_id = f"backup-{srv.name}-{self.run_tag(context)}"
            self.track_job(self.barman.host, self.barman.job_dir, job_id)
            self.barman.backup_job(srv.name, job_id, wait_timeout=300)
            latest = max((b for b in self.barman.list_backups(srv.name) if b.is_done), key=lambda b: b.backup_id)
            backup = self.barman.show_backup(srv.name, latest.backup_id).to_dict()
        return {"streaming": True, "barman_follows": follows, "fork": fork, "closed_wal": closed, "backfill": backfill,
                "new_backup_id": backup["backup_id"] if backup else None,
                "new_backup_timeline": backup["timeline"] if backup else None}

    def next_action(self, context: Any, exc: BaseException) -> str | None:
        moved = "" if self.req.in_place else (
            f" Barman must stream from {self.req.restore_to} now: its conninfo and streaming_conninfo for "
            f"{self.srv.name} are re-pointed by this task (`barman config-update`); check them with "
            f"`barman show-server {self.srv.name}`.")
        return ("The database is recovered and serving. Barman is not yet protecting the new timeline: run "
                "`barman cron`, `barman check`, `barman backup` on the barman host, or clear this task." + moved)
