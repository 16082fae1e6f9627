"""Verify: recovery stopped exactly at the resolved stop point, and the data is what the operator expects."""

from __future__ import annotations

import re
import time
from typing import Any

from barman_dr.exceptions import BarmanDrError
from barman_dr.forensics.recovery_proof import parse_history_file
from barman_dr.inventory import Instance
from barman_dr.operators.base import DrBaseOperator
from barman_dr.operators.pitr.errors import VerificationError
from barman_dr.operators.pitr.resolve import prove_resolved, resolution_for

RECOVERY_SETTINGS = ("restore_command", "recovery_end_command", "recovery_target", "recovery_target_time",
                     "recovery_target_xid", "recovery_target_lsn", "recovery_target_name", "recovery_target_inclusive",
                     "recovery_target_timeline", "recovery_target_action")
#: what a promoted (delayed) standby still carries: ignored on a primary, but pg_basebackup would copy them
#: to every standby built from it (a wrong slot, a delay on a standby that is not delayed)
FORMER_STANDBY_SETTINGS = ("primary_conninfo", "primary_slot_name", "recovery_min_apply_delay")


def clear_recovery_settings(db: Any, inst: Instance) -> list[str]:
    """`ALTER SYSTEM RESET` Barman's recovery settings once the server is promoted.

    Left in postgresql.auto.conf they point at a `barman_wal` directory that no longer
    exists and pin `recovery_target_timeline`, and pg_basebackup copies them to every
    standby built from the new primary, which then refuses to start ("recovery target
    timeline N does not exist").
    """
    known = (*RECOVERY_SETTINGS, *FORMER_STANDBY_SETTINGS)
    present = db.psql(inst, "SELECT string_agg(name, ',') FROM pg_file_settings WHERE sourcefile LIKE "
                            "'%postgresql.auto.conf' AND name = ANY (ARRAY['" + "','".join(known) + "'])")
    names = sorted({n for n in present.split(",") if n and n in known})
    if names:  # one psql run: each ALTER SYSTEM is its own transaction (-c per statement)
        db.psql_each(inst, [*(f"ALTER SYSTEM RESET {name}" for name in names), "SELECT pg_reload_conf()"])
    return names


def reserve_wal_for_barman(show_server: dict[str, Any], db: Any, inst: Instance, *, attempts: int = 3,
                           pause_s: float = 1.0) -> dict[str, Any]:
    """Create Barman's replication slot on the promoted server now, reserving WAL, so the new timeline is kept.

    A base backup carries no slot. Until Barman streams from the recovered server (at
    `rebase_barman`, the end of the run), nothing holds its WAL: its checkpoints (each standby
    rebuild's `pg_basebackup` forces one) recycle the new timeline's first segments, which no
    one has archived yet. Without `wal_keep_size` they are gone, a PITR into the first minutes
    after the recovery is impossible, and the daily verification reports "WAL missing" until
    that stretch leaves the retention window (`make bench`, 2026-12-05: every Barman-sourced
    run on pg-bench lost one or two). A physical slot created with `immediately_reserve`
    holds WAL from the last checkpoint's redo, at or before the fork's segment.

    `barman cron` (`create_slot = auto`) may have created the slot first, *without* reserving
    WAL (`restart_lsn` NULL until pg_receivewal streams through it): an idle one is dropped and
    created again reserving; one in use is waited for. Idempotent; never raises: the result
    says whether WAL is held (`reserved`).
    """
    slot = show_server.get("slot_name")
    if not show_server.get("streaming_archiver") or not slot:
        return {"slot": None, "why": "Barman does not stream from this server with a slot"}
    if not re.fullmatch(r"[a-z0-9_]{1,63}", str(slot)):
        return {"slot": slot, "reserved": False, "why": "not a valid replication slot name"}
    # `text || boolean` would spell `true`/`false`: the flag is written out explicitly
    state = (f"SELECT coalesce(restart_lsn::text, '-') || CASE WHEN active THEN ' active' ELSE ' idle' END "
             f"FROM pg_replication_slots WHERE slot_name = '{slot}'")
    created, error = False, None
    for attempt in range(attempts + 1):  # the last look only reads: a create in the last attempt is checked
        if attempt:
            time.sleep(pause_s)
        try:
            row = db.psql(inst, state).split()
            if row and row[0] != "-":
                return {"slot": slot, "reserved": True, "created": created, "restart_lsn": row[0]}
            if attempt == attempts or (row and row[1] == "active"):
                continue  # Barman's receive-wal is attaching: its first flush sets restart_lsn
            if row:
                db.psql(inst, f"SELECT pg_drop_replication_slot('{slot}')")
            db.psql(inst, f"SELECT pg_create_physical_replication_slot('{slot}', true)")
            created = True
        except BarmanDrError as exc:  # Barman's cron raced us (exists, or active): look again
            error = str(exc)[:300]
    return {"slot": slot, "reserved": False, "created": created, "error": error or "held by a client that never "
            "reported a position"}


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
        proof = prove_resolved(resolution_for(self, context), log_text, history, old_tli, new_tli)
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
        # a transaction PREPAREd before the stop point and committed after it is still prepared here, holding
        # its locks (and its rows, which a later COMMIT PREPARED would bring back): the DBA must decide
        prepared = db.psql(inst, "SELECT coalesce(string_agg(gid || ' (xid ' || transaction || ')', ', '), '') "
                                 "FROM pg_prepared_xacts")
        try:
            # bounded: show-server also connects to Barman's conninfo, which may name a fenced, unreachable host
            barman_wal = reserve_wal_for_barman(self.barman.show_server(self.srv.name, timeout=60), db, inst)
        except BarmanDrError as exc:  # the recovery is proven; rebase_barman reports Barman's state
            barman_wal = {"reserved": False, "error": str(exc)[:300]}
        barman_wal["instance"] = inst.name
        if barman_wal.get("reserved") is False:
            self.log.warning("Barman's slot could not be reserved on %s: %s. Its WAL before rebase_barman may be "
                             "recycled unarchived", inst.name, barman_wal)
        return {**proof.to_dict(), "history_file": hist_path, "recovery_settings_cleared": cleaned,
                "barman_wal": barman_wal,
                "prepared_transactions": prepared or None,
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
