"""The delayed-standby source: the recovered server is the delayed standby, replayed forward to the stop point.

A delayed standby paused before the stop point (resolve_target paused it and
`delayed_source_verdict` proved it) holds the database as it was before the damage, minus
at most its delay's worth of WAL. Recovering from it is: stop it, write the resolved stop
point as its recovery target (`recovery_target_action = promote`, no apply delay), start it,
let it replay what it has not applied yet and promote, then prove the exact stop and count
the rows there, all while the app still runs on the damaged primary. No backup is copied:
the time does not grow with the database. The freeze, the fence of the old primary, the
PgBouncer repoint, the rebuilds and Barman following the new primary are the steps of
`restore_to: <standby>`, unchanged (the effective request's `restore_to` is this standby).

Retry-safe: the intent (state, verdict, log offset) is audited before anything changes (the
audit trail, not an XCom: Airflow clears a task's XComs when a new try starts), and the stop
point is written once the standby is down, before every start by this run. A retry
finds the standby following (nothing done yet), stopped by this run, replaying with this
run's target, or promoted (proven again from its log and timeline history). Without an intent,
only a paused, following standby is touched: one found stopped or promoted is refused.
Until the old primary is fenced it runs socket-only and archives nothing
(`promotion_start_options`).
"""

from __future__ import annotations

import shlex
import time
from typing import Any

from barman_dr.exceptions import PreflightError
from barman_dr.forensics.recovery_proof import parse_history_file
from barman_dr.hooks.remote import sh_argv
from barman_dr.inventory import Instance
from barman_dr.operators.base import DrBaseOperator
from barman_dr.operators.pitr.delayed import STATE_SQL, _state, delayed_source_verdict, source_intents
from barman_dr.operators.pitr.errors import VerificationError
from barman_dr.operators.pitr.post_incident import SET_CONF_SCRIPT, _sql_literal
from barman_dr.operators.pitr.resolve import prove_resolved, resolution_for, restore_target_of, target_tli_of

#: every recovery target GUC: the one of the stop point is set, the others emptied (PostgreSQL refuses two)
TARGET_KEYS = ("recovery_target", "recovery_target_time", "recovery_target_xid", "recovery_target_lsn",
               "recovery_target_name")
#: our restart is recognised by these (a delayed standby's own defaults: pause, its delay)
OURS_SQL = "SELECT current_setting('recovery_target_action') || '|' || current_setting('recovery_min_apply_delay')"


def recovery_target_settings(res: dict[str, Any]) -> list[str]:
    """postgresql.auto.conf lines that make the standby stop at the resolved stop point and promote.

    The same target Barman would be given (`restore_target_of`: a restore point is its exact
    LSN, an xid its 32 bits), on the resolution's timeline, with no apply delay (it would
    hold the replay back by the delay again).
    """
    rt = restore_target_of(res)
    if rt.kind not in ("time", "xid", "lsn"):
        raise PreflightError(f"the delayed-standby source cannot stop at a {rt.kind} target: use source=barman")
    key = f"recovery_target_{rt.kind}"
    return [*(f"{k} = ''" for k in TARGET_KEYS if k != key),
            f"{key} = {_sql_literal(str(rt.value))}",
            f"recovery_target_inclusive = '{'on' if rt.inclusive else 'off'}'",
            f"recovery_target_timeline = '{target_tli_of(res)}'",
            "recovery_target_action = 'promote'",
            "recovery_min_apply_delay = '0'"]


def source_intent(op: DrBaseOperator, context: Any) -> dict[str, Any] | None:
    """This run's first `delayed_source` intent for the standby it recovers onto: its log offset, its state."""
    mine = [e for e in source_intents(op, context) if e["target"] == op.target_instance.name]
    return (mine[0].get("details") or {}) if mine else None


#: on the db host: $1 = the file, $2 = its content (a timeline history file from Barman), written whole
WRITE_FILE_SCRIPT = r"""
[ -e "$1" ] && exit 0
printf '%s' "$2" > "$1.tmp.$$" && mv -- "$1.tmp.$$" "$1"
"""


def seed_timeline_history(op: DrBaseOperator, db: Any, inst: Instance, timeline: int) -> list[str]:
    """Barman's history files of timelines above the standby's, copied into its pg_wal before the promotion.

    PostgreSQL picks the new timeline id as the first one without a history file, looking in
    pg_wal and (with a restore_command) in the archive. The promotion start runs without the
    restore_command (`promotion_start_options`), so the timelines Barman already holds (an
    abandoned branch after dr_pitr_rollback, an earlier PITR's) are put where PostgreSQL looks:
    the new timeline never reuses an id Barman has, and rebase_barman never streams a second
    history of the same id into the archive.
    """
    wals = str(op.barman.show_server(op.srv.name).get("wals_directory") or "")
    if not wals:
        return []
    names = [n for n in op.barman.host.run(["ls", "-1", wals]).stdout.split()
             if n.endswith(".history") and len(n) == 16 and all(c in "0123456789ABCDEF" for c in n[:8])
             and int(n[:8], 16) >= timeline]
    for name in sorted(names):
        content = op.barman.host.run(["cat", "--", f"{wals}/{name}"]).stdout
        db.host.run(sh_argv(WRITE_FILE_SCRIPT, f"{inst.data_directory}/pg_wal/{name}", content))
    return sorted(names)


def promotion_start_options(db: Any, inst: Instance, *, from_archive: bool = False) -> str:
    """How the standby starts for its promotion: no TCP and nothing archived, until the old primary is fenced.

    Promoted before the freeze, it is writable while the app still writes to the old primary:
    over its Unix socket only (the proof and the counts), it takes no client's writes and
    archives nothing into the server's Barman. No restore_command: the old primary is up (the
    run has not fenced it yet) and streams what the standby lacks; the archive's timeline
    history is copied in first (`seed_timeline_history`). `start_recovery` restarts it with its normal
    options once `stop_postgres` has fenced the old primary.
    """
    return shlex.join(["-c", "listen_addresses=", "-c", f"port={inst.port}",
                       "-c", f"unix_socket_directories={inst.socket_directory}",
                       "-c", f"cluster_name={inst.name}", "-c", "archive_command=false", "-c", "archive_library=",
                       # the WAL it still has to apply is in its pg_wal or streams from the primary (up, on the
                       # standby's slot): PostgreSQL would otherwise ask the archive first for every segment, one
                       # barman-wal-restore over SSH each (about a second per 16 MiB). Only with the primary down
                       # does it fetch from Barman's archive.
                       *([] if from_archive else ["-c", "restore_command="])])


def recover_on_delayed_standby(op: DrBaseOperator, context: Any, *, timeout: float = 3600) -> dict[str, Any]:
    """stage_restore for the delayed-standby source: promote the standby at the stop point, prove it, count rows."""
    inst, req = op.target_instance, op.req
    res = resolution_for(op, context)
    db = op.db(inst.host)
    conf = f"{inst.data_directory}/postgresql.auto.conf"
    settings = recovery_target_settings(res)
    t0 = time.monotonic()
    intent = source_intent(op, context)
    status = db.status(inst.data_directory)
    if status == "running":  # a retry may find it still starting up (replaying): wait until it answers
        db.wait_ready(inst, timeout=min(600, timeout))
    in_recovery = db.in_recovery(inst) if status == "running" else None
    steps: list[str] = []
    following = status == "running" and in_recovery and db.psql(inst, OURS_SQL) != "promote|0"
    if following or intent is None:
        # nothing changed yet (or a restart lost this run's pause): it must still be where the plan saw it,
        # paused before the stop point on its timeline
        state = {"standby": inst.name, **_state(db.psql(inst, STATE_SQL))} if status == "running" else {
            "standby": inst.name, "error": f"not running ({status})"}
        verdict = delayed_source_verdict(res["stop"], state)
        if not verdict["usable"]:
            raise PreflightError(f"delayed standby {inst.name} can no longer serve this stop point: {verdict['why']}. "
                                 "Nothing was changed and the app was never frozen. Trigger again with source=auto "
                                 "(falls back to Barman) or source=barman")
        if intent is None:
            intent = {**state, "log_offset": db.log_size(inst.log_file), "verdict": verdict}
            op.audit(context).record("delayed_source", "started", server=op.srv.name, target=inst.name,
                                     details=intent)
    offset = int(intent.get("log_offset") or 0)
    if following:
        # stopped first; the stop point is written once it is down (a retry that finds it stopped writes it again):
        # a standby left running by a failed try keeps its own settings, delay included
        db.stop(inst, mode="fast")
        steps.append(f"stopped at replay {intent.get('replay_lsn')}")
        status = "stopped"
    if status != "running":  # stopped by this run (now or by an earlier try): the stop point (again), then start
        db.host.run(sh_argv(SET_CONF_SCRIPT, conf, *settings))
        seeded = seed_timeline_history(op, db, inst, int(intent.get("timeline") or res["recovery_timeline"]))
        if seeded:
            steps.append(f"Barman's later timelines copied to pg_wal: {', '.join(seeded)}")
        primary = op.srv.primary
        from_archive = not op.db(primary.host).is_ready(primary)
        db.start(inst, wait=False, options=promotion_start_options(db, inst, from_archive=from_archive))
        if from_archive:
            steps.append(f"{primary.name} is down: the missing WAL comes from Barman's archive (restore_command)")
        steps.append("recovery target written, started socket-only: " + ", ".join(settings[len(TARGET_KEYS) - 1:]))
    ready_s = db.wait_ready(inst, timeout=min(600, timeout))
    promoted_s = db.wait_recovery_end(inst, timeout=timeout)
    proof = prove_on(db, inst, res, offset)
    if not proof["reached"]:
        raise VerificationError(
            f"delayed standby {inst.name} did NOT stop at the target: {'; '.join(proof['reasons'])}. The app was "
            f"never frozen and runs on {op.srv.primary.name}. {inst.name} is promoted at a wrong point (socket "
            "only, nothing archived): it is no longer a delayed standby (rebuild it). Trigger again with "
            "source=barman")
    counts = validate_counts(op, db, inst)
    return {"staged": False, "source": "delayed_standby", "standby": inst.name, "host": inst.host,
            "log_offset": offset, "steps": steps, "ready_s": ready_s, "promoted_s": promoted_s,
            "recover_s": round(time.monotonic() - t0, 3), **proof, "counts": counts,
            "stop": res["stop"]["described"], "expected": req.expected}


def prove_on(db: Any, inst: Instance, res: dict[str, Any], offset: int) -> dict[str, Any]:
    """The exact stop on the promoted standby: its server log since the restart, its new timeline's history."""
    wal_name = db.psql(inst, "SELECT pg_walfile_name(pg_current_wal_lsn())")
    new_tli = int(wal_name[:8], 16)
    r = db.host.run(["cat", f"{inst.data_directory}/pg_wal/{new_tli:08X}.history"], check=False)
    history = r.stdout if r.exit_code == 0 else None
    entries = parse_history_file(history or "")
    old_tli = entries[-1].parent_timeline if entries else None
    proof = prove_resolved(res, db.log_since(inst.log_file, offset), history, old_tli, new_tli)
    return {"reached": proof.reached, "reasons": list(proof.reasons), "new_timeline": new_tli,
            "switch_lsn": entries[-1].switch_lsn if entries else None,
            "stop_lines": proof.stop.get("lines", [])[:3]}


def validate_counts(op: DrBaseOperator, db: Any, inst: Instance) -> dict[str, Any]:
    """The inventory's validation queries on the promoted standby, before the app is frozen."""
    srv, expected = op.srv, op.req.expected
    actual = {name: int(db.psql(inst, sql, database=srv.database)) for name, sql in srv.validation_queries.items()}
    wrong = {k: {"expected": v, "actual": actual.get(k)} for k, v in expected.items() if actual.get(k) != v}
    if wrong:
        raise VerificationError(
            "data validation failed on the promoted delayed standby " + inst.name + ": " + ", ".join(
                f"{k} expected {m['expected']}, got {m['actual']}" for k, m in wrong.items())
            + f". The app was never frozen and runs on {srv.primary.name}. Check the target and `expected`, then "
              "trigger again (source=barman: the delayed standby is promoted now)")
    return {"actual": actual, "expected": expected}
