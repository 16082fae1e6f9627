"""`barman-dr`: the incident CLI. Triggers and follows every DR DAG through the Airflow REST API.

    barman-dr find-target --server pg-primary --window-start 2026-11-25T11:00:00Z --incident INC-123 --wait
    barman-dr plan     --server pg-primary --target-xid 7312 --exclusive --incident INC-123 --wait
    barman-dr pitr     --server pg-primary --target-time 2026-11-25T11:45:00Z --incident INC-123 \\
                       --expect orders_total=10500 --confirm --wait
    barman-dr surgical --server pg-primary --target-xid 7312 --exclusive --table public.critical_orders \\
                       --incident INC-124 [--confirm | --plan-only] --wait
    barman-dr salvage  --server pg-primary --pitr-incident INC-123 --incident INC-123.salvage [--confirm | --plan-only]
    barman-dr rollback --server pg-primary --incident INC-123 --confirm      (puts back INC-123's moved-aside directory)
    barman-dr approve  --incident INC-123 [--dag dr_surgical_recovery] [--reject]  (as a second user: four eyes)
    barman-dr status   --incident INC-123 [--dag dr_salvage] | --run-id RUN_ID
    barman-dr drill    [--target immediate] --wait
    barman-dr servers

Every command takes `--json`: one JSON document on stdout (progress and messages go to
stderr), the human output otherwise.

`pitr`, `surgical` and `salvage` without `--confirm` plan, then wait for a second person to
approve (`barman-dr approve --dag <dag> --incident ...` as another user, or Required Actions in
the UI); `--confirm` sends the DAG's typed confirmation ("PITR <server>", "SURGICAL <server>",
"SALVAGE <server>") and executes without asking; `--plan-only` (`plan` for a PITR) only plans.
`rollback` has no approval step: it needs `--confirm` ("ROLLBACK <server>").

The run id is derived from the incident id (`<dag>__incident__<incident>`), so repeating a
command for one incident follows the existing run instead of starting a second one; when that
run was triggered with other parameters (e.g. `plan` first, then `pitr --confirm`), the
command refuses (exit 2) rather than pretend: use a new incident id such as INC-123.2.
While the API server does not answer (a restart, an outage of the Airflow host), every call is
retried with backoff for `--api-wait` seconds (default 120); then the command stops with exit
code 4 and says so, and running it again with the same incident id reaches the same single run.

What can be checked without the API is checked before any call (times need a timezone, xids
are digits, LSNs look like 0/7000028, incident ids are letters, digits, '.', '_', '-'); each
error names the option, the value and the fix. Airflow's own refusals (HTTP 400 ...) are
passed through with their body.

Exit codes:
    0  success (the run succeeded, or was triggered / is still running without --wait)
    1  the run failed (`servers`: a server is CRITICAL)
    2  bad usage, or the API refused the request (unknown run, paused DAG, HTTP 4xx)
    3  timeout (--wait --timeout passed while the run still runs)
    4  the API server did not answer within --api-wait seconds
    5  not executed: the plan was rejected by the approver (the run itself ended without a fault)

Credentials: BARMAN_DR_API_URL / BARMAN_DR_API_USER / BARMAN_DR_API_PASSWORD (the lab's
LAB_AIRFLOW_URL / LAB_AIRFLOW_USER / LAB_AIRFLOW_PASSWORD are used when those are unset).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any, NoReturn

from barman_dr.inventory import QUALIFIED_TABLE_RE
from barman_dr.params.find_target_request import TABLE_RE
from barman_dr.params.pitr_request import (
    BACKUP_ID_RE,
    INCIDENT_RE,
    LSN_RE,
    MAX_JOBS,
    NAME_RE,
    REASON_RE,
    RESTORE_POINT_MAX_BYTES,
    XID_RE,
    confirm_text,
)
from barman_dr.params.salvage_request import RUN_ID_RE, salvage_confirm_text
from barman_dr.params.surgical_request import MAX_TABLES, surgical_confirm_text
from barman_dr.surfaces.api_client import AirflowApi, ApiError, ApiUnavailableError, incident_run_id, pending_approvals

PITR_DAG = "dr_pitr"
DRILL_DAG = "dr_monthly_restore_drill"
SURGICAL_DAG = "dr_surgical_recovery"
SALVAGE_DAG = "dr_salvage"
FIND_TARGET_DAG = "dr_find_target"
ROLLBACK_DAG = "dr_pitr_rollback"
#: the DAGs whose plan waits for a second person (FourEyesApprovalOperator)
APPROVAL_DAGS = (PITR_DAG, SURGICAL_DAG, SALVAGE_DAG)
#: every DAG in dags/: `status --dag` takes any of them
ALL_DAGS = (PITR_DAG, SURGICAL_DAG, SALVAGE_DAG, FIND_TARGET_DAG, ROLLBACK_DAG, DRILL_DAG, "dr_daily_verification",
            "dr_weekly_full_backup", "dr_freeze_guard")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT, EXIT_UNAVAILABLE, EXIT_REJECTED = 0, 1, 2, 3, 4, 5


def outcome_code(api: AirflowApi, dag_id: str, run_id: str, final: dict[str, Any], doc: dict[str, Any]) -> int:
    """0 only when the run did what was asked: a rejected plan ends `success` in Airflow, but nothing executed."""
    if final["state"] != "success":
        return EXIT_FAILED
    if dag_id in APPROVAL_DAGS and doc.get("mode") != "plan_only":
        states = {t["task_id"]: t.get("state") for t in api.task_instances(dag_id, run_id)}
        if states.get("approve") == "skipped":
            doc["rejected"] = True
            return EXIT_REJECTED
    return EXIT_OK

#: --api-wait default: long enough for an api-server restart, short enough for a 3 AM terminal
API_WAIT_S = 120.0

#: conf keys whose difference from an existing run's is only reported: the run still does what was asked
COSMETIC_KEYS = frozenset({"expected", "reason", "jobs"})

MODE_LABEL = {"execute": "EXECUTE", "plan_only": "plan only", "awaits_approval": "waits for a second person to approve",
              "read_only": "read-only", "run": "run"}


def rollback_confirm_text(server: str) -> str:
    """dr_pitr_rollback's typed confirmation (plugins/barman_dr/operators/rollback.py)."""
    return f"ROLLBACK {server}"


class UsageError(Exception):
    """Bad usage, found before any API call (or a precondition the API reported): exit 2."""


class CliParser(argparse.ArgumentParser):
    """argparse, but its errors become a UsageError (so `--json` gets a JSON document for them too)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        where = self.prog.removeprefix("barman-dr").strip()
        raise UsageError(f"{where}: {message}" if where else message)


def api_from_env(retry_for: float = API_WAIT_S) -> AirflowApi:
    url = os.environ.get("BARMAN_DR_API_URL") or os.environ.get("LAB_AIRFLOW_URL")
    user = os.environ.get("BARMAN_DR_API_USER") or os.environ.get("LAB_AIRFLOW_USER")
    password = os.environ.get("BARMAN_DR_API_PASSWORD") or os.environ.get("LAB_AIRFLOW_PASSWORD")
    if not (url and user and password):
        raise UsageError("set BARMAN_DR_API_URL, BARMAN_DR_API_USER and BARMAN_DR_API_PASSWORD (the Airflow API "
                         "server's URL and a user allowed to trigger the DR DAGs)")
    return AirflowApi(url, user, password, retry_for=retry_for)


# ---------------------------------------------------------------- local validation (no API call)


def check_incident(value: str, flag: str = "--incident") -> str:
    if not INCIDENT_RE.match(value):
        raise UsageError(f"{flag} {value!r}: use letters, digits, '.', '_' and '-' only, starting with a letter or "
                         "digit, at most 64 characters, e.g. INC-123")
    return value


def check_server(value: str) -> str:
    if not NAME_RE.match(value):
        raise UsageError(f"--server {value!r}: a server name from the inventory, e.g. pg-primary "
                         "(`barman-dr servers` lists them)")
    return value


def check_time(value: str, flag: str) -> str:
    """An ISO 8601 date-time with its timezone; returned with a 'T' separator (what the DAG's date-time param wants)."""
    text = value.strip()
    if len(text) > 10 and text[10] == " ":
        text = text[:10] + "T" + text[11:]
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageError(f"{flag} {value}: not an ISO 8601 date-time: use e.g. 2026-11-25T11:45:00Z "
                         "(timezone required)") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise UsageError(f"{flag} {value}: needs a timezone, e.g. {text}Z or {text}+00:00 "
                         "(barman-dr never guesses the timezone)")
    return text


def check_xid(value: str, flag: str) -> str:
    text = value.strip()
    if not XID_RE.match(text) or not 3 <= int(text) <= 2**64 - 1:
        raise UsageError(f"{flag} {value}: must be a transaction id: digits only, 3 or more, e.g. 7312 "
                         "(`barman-dr find-target` lists the candidates)")
    return str(int(text))


def check_lsn(value: str, flag: str) -> str:
    text = value.strip()
    if not LSN_RE.match(text):
        raise UsageError(f"{flag} {value}: must be an LSN like 0/7000028 (hex/hex)")
    return text


def check_restore_point(value: str) -> str:
    if not value or "\x00" in value or len(value.encode("utf-8", "replace")) > RESTORE_POINT_MAX_BYTES:
        raise UsageError(f"--target-name {value!r}: a restore point name as created with pg_create_restore_point(), "
                         f"1 to {RESTORE_POINT_MAX_BYTES} bytes")
    return value


def check_reason(value: str | None) -> str | None:
    if value is not None and not REASON_RE.match(value):
        raise UsageError(f"--reason {value!r}: plain text only: letters, digits, spaces and . , : _ - ( ) / # @ + = "
                         "(max 500 characters)")
    return value or None


def check_jobs(value: int) -> int:
    if not 1 <= value <= MAX_JOBS:
        raise UsageError(f"--jobs {value}: use an integer from 1 to {MAX_JOBS}")
    return value


def check_backup_id(value: str) -> str:
    if value != "auto" and not BACKUP_ID_RE.match(value):
        raise UsageError(f"--backup-id {value}: use 'auto' or a Barman backup id like 20261125T020000")
    return value


def check_tables(values: list[str]) -> list[str]:
    if len(values) > MAX_TABLES:
        raise UsageError(f"--table: {len(values)} tables; at most {MAX_TABLES} per run: split the run")
    for v in values:
        if not QUALIFIED_TABLE_RE.match(v):
            raise UsageError(f"--table {v!r}: use schema.table, e.g. public.critical_orders (letters, digits, _ and $; "
                             "taken literally, case-sensitive)")
    return list(dict.fromkeys(values))


def check_run_id(value: str, flag: str) -> str:
    if not RUN_ID_RE.match(value):
        raise UsageError(f"{flag} {value!r}: a run id as Airflow shows it (letters, digits and _ . : + -), "
                         "e.g. dr_pitr__incident__INC-123")
    return value


def check_timeout(args: argparse.Namespace) -> None:
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not 0 < timeout <= 7 * 86400:
        raise UsageError(f"--timeout {timeout}: use a number of seconds above 0, e.g. 3600")


def parse_expect(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or not name.strip():
            raise UsageError(f"--expect {item!r}: use NAME=INTEGER, e.g. orders_total=10500")
        out[name.strip()] = int(value)
    return out


def pitr_run_id_of(args: argparse.Namespace) -> str | None:
    """--pitr-run-id, or the run id of --pitr-incident's dr_pitr run, or None (the DAG's default)."""
    if getattr(args, "pitr_run_id", None):
        return check_run_id(args.pitr_run_id, "--pitr-run-id")
    if getattr(args, "pitr_incident", None):
        return incident_run_id(PITR_DAG, check_incident(args.pitr_incident, "--pitr-incident"))
    return None


def add_target(conf: dict[str, Any], args: argparse.Namespace) -> None:
    if getattr(args, "target_time", None):
        conf["target_time"] = check_time(args.target_time, "--target-time")
    elif getattr(args, "target_xid", None):
        conf["target_xid"] = check_xid(args.target_xid, "--target-xid")
    elif getattr(args, "target_lsn", None):
        conf["target_lsn"] = check_lsn(args.target_lsn, "--target-lsn")
    elif getattr(args, "target_name", None) is not None:
        conf["target_name"] = check_restore_point(args.target_name)
    elif getattr(args, "target_immediate", False):
        conf["target_immediate"] = True


# ---------------------------------------------------------------- confs, one per DAG


def trigger_mode(args: argparse.Namespace) -> str:
    if getattr(args, "confirm", False):
        return "execute"
    if args.command == "plan" or getattr(args, "plan_only", False):
        return "plan_only"
    return "awaits_approval"


def pitr_conf(args: argparse.Namespace, confirm: bool) -> dict[str, Any]:
    conf: dict[str, Any] = {"server": check_server(args.server), "incident_id": check_incident(args.incident),
                            "jobs": check_jobs(args.jobs), "backup_id": check_backup_id(args.backup_id),
                            "restore_to": args.restore_to, "expected": parse_expect(args.expect),
                            "target_inclusive": not args.exclusive}
    if args.restore_to != "in_place" and not NAME_RE.match(args.restore_to):
        raise UsageError(f"--restore-to {args.restore_to!r}: 'in_place' or the name of a standby of the server")
    add_target(conf, args)
    if args.target_name_lsn:
        if "target_name" not in conf:
            raise UsageError(f"--target-name-lsn {args.target_name_lsn}: only picks an occurrence of --target-name; "
                             "give --target-name too, or use --target-lsn")
        conf["target_name_lsn"] = check_lsn(args.target_name_lsn, "--target-name-lsn")
    if args.reason:
        conf["reason"] = check_reason(args.reason)
    if args.no_staged_restore:
        conf["staged_restore"] = False
    if getattr(args, "source", "barman") != "barman":
        conf["source"] = args.source
    if confirm:
        conf["confirm"] = confirm_text(args.server)
    elif args.command == "plan" or getattr(args, "plan_only", False):
        conf["plan_only"] = True  # a preview: nobody is asked
    return conf


def surgical_conf(args: argparse.Namespace) -> dict[str, Any]:
    conf: dict[str, Any] = {"server": check_server(args.server), "incident_id": check_incident(args.incident),
                            "target_inclusive": not args.exclusive, "backup_id": check_backup_id(args.backup_id)}
    add_target(conf, args)
    if args.table:
        conf["tables"] = check_tables(args.table)
    if args.restore_changed:
        conf["restore_changed"] = True
    if args.reason:
        conf["reason"] = check_reason(args.reason)
    if args.jobs != 1:
        conf["jobs"] = check_jobs(args.jobs)
    if args.confirm:
        conf["confirm"] = surgical_confirm_text(args.server)
    elif args.plan_only:
        conf["plan_only"] = True
    return conf


def salvage_conf(args: argparse.Namespace) -> dict[str, Any]:
    conf: dict[str, Any] = {"server": check_server(args.server), "incident_id": check_incident(args.incident)}
    pitr_run = pitr_run_id_of(args)
    if pitr_run:
        conf["pitr_run_id"] = pitr_run
    if args.table:
        conf["tables"] = check_tables(args.table)
    if args.exclude_xid:
        conf["exclude_xids"] = [int(check_xid(x, "--exclude-xid")) for x in args.exclude_xid]
    if args.reason:
        conf["reason"] = check_reason(args.reason)
    if args.confirm:
        conf["confirm"] = salvage_confirm_text(args.server)
    elif args.plan_only:
        conf["plan_only"] = True
    return conf


def rollback_conf(args: argparse.Namespace) -> dict[str, Any]:
    check_server(args.server)
    check_incident(args.incident)
    pitr_run = pitr_run_id_of(args) or incident_run_id(PITR_DAG, args.incident)
    if not args.confirm:
        raise UsageError(f"--confirm: required: dr_pitr_rollback has no approval step, it puts the data directory "
                         f"dr_pitr run {pitr_run} moved aside back at once (the app is frozen meanwhile). Add --confirm "
                         f"(sends '{rollback_confirm_text(args.server)}') when that is what you want")
    return {"server": args.server, "pitr_run_id": pitr_run, "confirm": rollback_confirm_text(args.server)}


def find_target_conf(args: argparse.Namespace) -> dict[str, Any]:
    conf: dict[str, Any] = {"server": check_server(args.server), "incident_id": check_incident(args.incident)}
    if args.window_start:
        conf["window_start"] = check_time(args.window_start, "--window-start")
    if args.window_end:
        conf["window_end"] = check_time(args.window_end, "--window-end")
    if args.table:
        if not TABLE_RE.match(args.table):
            raise UsageError(f"--table {args.table!r}: a table name like critical_orders or public.critical_orders "
                             "(letters, digits, '_' and '$', max 63 per part, no quotes)")
        conf["table"] = args.table
    if args.min_rows is not None:
        if args.min_rows < 0:
            raise UsageError(f"--min-rows {args.min_rows}: use 0 or more (rows deleted or updated)")
        conf["min_rows"] = args.min_rows
    return conf


def drill_conf(args: argparse.Namespace) -> dict[str, Any]:
    return {"target": args.target} if args.target else {}


# ---------------------------------------------------------------- output


def emit(args: argparse.Namespace, doc: Any, human: Callable[[], None] | None = None) -> None:
    """The command's result: one JSON document on stdout with --json, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(doc, indent=2, default=str), flush=True)
    elif human is not None:
        human()


def info(args: argparse.Namespace, text: str) -> None:
    """A human line: stdout normally, stderr with --json (stdout holds only the JSON document)."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)


def fail(args: argparse.Namespace | None, code: int, message: str, **extra: Any) -> int:
    print(f"barman-dr: {message}", file=sys.stderr, flush=True)
    if args is not None and getattr(args, "json", False):
        print(json.dumps({"error": message, "exit_code": code, **extra}, indent=2, default=str), flush=True)
    return code


def api_refusal(exc: ApiError) -> dict[str, Any]:
    try:
        body: Any = json.loads(exc.body)
    except ValueError:
        body = exc.body[:2000]
    return {"http_status": exc.status, "body": body}


def follow(api: AirflowApi, dag_id: str, run_id: str, timeout: float, out: Any = None) -> dict[str, Any]:
    seen: dict[str, str] = {}
    out = out or sys.stdout

    def progress(_run: dict[str, Any]) -> None:
        for ti in api.task_instances(dag_id, run_id):
            mi = ti.get("map_index")
            key = ti["task_id"] + (f"[{mi}]" if isinstance(mi, int) and mi >= 0 else "")
            state = ti.get("state") or "queued"
            if seen.get(key) != state and state not in ("scheduled", "queued", "none"):
                seen[key] = state
                print(f"  {time.strftime('%H:%M:%S')}  {key:<22} {state}", file=out, flush=True)

    return api.wait(dag_id, run_id, timeout=timeout, poll=1.0, on_progress=progress)


def ensure_unpaused(api: AirflowApi, dag_id: str) -> None:
    try:
        dag = api.get_dag(dag_id)
    except ApiError as exc:
        if exc.status == 404:
            raise UsageError(f"{dag_id} is not known to this Airflow (HTTP 404): check the deployment "
                             "(the dags/ folder, the dag-processor's import errors)") from None
        raise
    if dag.get("is_paused"):
        raise UsageError(f"{dag_id} is paused in Airflow: a run would wait forever. Unpause it first "
                         f"(UI toggle, or PATCH /api/v2/dags/{dag_id} {{\"is_paused\": false}}).")


#: keys that make a run execute or only plan: one the existing run has and the request lacks is a difference too
MODE_KEYS = ("confirm", "plan_only")


def conf_differences(wanted: dict[str, Any], existing: dict[str, Any]) -> list[str]:
    """The keys where an existing run's conf differs from the requested one.

    Only keys this CLI sends count (plus the mode keys the existing run has set): a conf that
    Airflow completed with the DAG's defaults does not differ.
    """
    keys = {k for k in wanted if wanted[k] != existing.get(k)}
    keys |= {k for k in MODE_KEYS if existing.get(k) and k not in wanted}
    return sorted(keys)


def existing_mode(dag_id: str, conf: dict[str, Any]) -> str:
    if dag_id == FIND_TARGET_DAG:
        return "read_only"
    if dag_id not in APPROVAL_DAGS:
        return "execute" if conf.get("confirm") else "run"
    return "execute" if conf.get("confirm") else "plan_only" if conf.get("plan_only") else "awaits_approval"


def approve_hint(dag_id: str, incident: str | None, run_id: str) -> str:
    dag = "" if dag_id == PITR_DAG else f"--dag {dag_id} "
    who = f"--incident {incident}" if incident else f"--run-id {run_id}"
    return f"barman-dr approve {dag}{who}"


# ---------------------------------------------------------------- trigger + follow (every DAG)


def run_dag(args: argparse.Namespace, dag_id: str, conf: dict[str, Any], *, incident: str | None,
            mode: str, run_id: str | None = None, note: str | None = None,
            report_fn: Callable[[AirflowApi, argparse.Namespace, str, dict[str, Any], dict[str, Any]], int] | None = None,
            ) -> int:
    """Trigger `dag_id` (or find the incident's existing run), print what happened, optionally follow it."""
    run_id = run_id or incident_run_id(dag_id, incident or "")
    api = api_from_env(args.api_wait)
    ensure_unpaused(api, dag_id)
    try:
        run, created = api.trigger(dag_id, conf, run_id=run_id, note=note)
    except ApiError as exc:
        return fail(args, EXIT_USAGE, f"Airflow refused the request (HTTP {exc.status}): {exc.body[:800]}",
                    dag_id=dag_id, run_id=run_id, conf=conf, **api_refusal(exc))
    doc: dict[str, Any] = {"dag_id": dag_id, "run_id": run_id, "created": created, "mode": mode,
                           "state": run.get("state"), "conf": conf}
    if not created:
        existing = run.get("conf") or {}
        differs = conf_differences(conf, existing)
        blocking = [k for k in differs if k not in COSMETIC_KEYS]
        if blocking:
            what = ", ".join(f"{k}: {existing.get(k)!r} there, {conf.get(k)!r} asked" for k in blocking)
            return fail(args, EXIT_USAGE,
                        f"--incident {incident}: run {run_id} of {dag_id} already exists with other parameters ({what}); "
                        f"it is left as it is ({MODE_LABEL[existing_mode(dag_id, existing)]}, "
                        f"{run.get('state')}). Follow it with `barman-dr status --dag {dag_id} --incident {incident}`, "
                        f"or use a new incident id (e.g. {incident}.2) for a new run",
                        dag_id=dag_id, run_id=run_id, created=False, state=run.get("state"), conf=existing,
                        differs=blocking)
        if differs:
            print(f"barman-dr: note: the existing run differs in {', '.join(differs)} (kept as it is)", file=sys.stderr)
        doc["mode"] = mode = existing_mode(dag_id, existing) if dag_id in APPROVAL_DAGS else mode
        doc["conf"] = existing or conf
    if mode == "awaits_approval":
        doc["approve_with"] = approve_hint(dag_id, incident, run_id)
    label = "" if dag_id == DRILL_DAG else f" [{MODE_LABEL[mode]}]"
    info(args, f"{'triggered' if created else 'already exists (same incident)'}: {dag_id} run {run_id}{label}")
    if mode == "awaits_approval":
        info(args, f"  an approver answers in Required Actions, or: {doc['approve_with']}")
    if not args.wait:
        emit(args, doc)
        return EXIT_OK
    try:
        final = follow(api, dag_id, run_id, args.timeout, out=sys.stderr if args.json else sys.stdout)
    except TimeoutError as exc:
        return fail(args, EXIT_TIMEOUT, f"{exc}", dag_id=dag_id, run_id=run_id, created=created)
    return (report_fn or report_generic)(api, args, run_id, final, doc)


def report(api: AirflowApi, args: argparse.Namespace, run_id: str, final: dict[str, Any], doc: dict[str, Any]) -> int:
    """dr_pitr's end: state, note (the plan, the outcome) and the report's key numbers."""
    note = api.get_run(PITR_DAG, run_id).get("note") or ""
    rep = api.xcom(PITR_DAG, run_id, "report")

    def human() -> None:
        print(f"\n{PITR_DAG} run {run_id}: {final['state'].upper()}")
        if note:
            print(note)
        if rep:
            print(json.dumps({k: rep.get(k) for k in ("counts", "expected", "new_timeline", "moved_aside", "rto_s",
                                                      "phases_s", "new_backup_id")}, indent=2))

    code = outcome_code(api, PITR_DAG, run_id, final, doc)
    emit(args, {**doc, "state": final["state"], "note": note, "result": rep}, human)
    return code


#: where each DAG leaves its result (XCom of these tasks)
RESULT_TASKS: dict[str, tuple[str, ...]] = {SURGICAL_DAG: ("plan", "apply"), SALVAGE_DAG: ("plan", "apply"),
                                            ROLLBACK_DAG: ("rollback",), DRILL_DAG: ("summary",),
                                            FIND_TARGET_DAG: ("find_candidates",)}


def report_generic(api: AirflowApi, args: argparse.Namespace, run_id: str, final: dict[str, Any],
                   doc: dict[str, Any]) -> int:
    dag_id = doc["dag_id"]
    note = api.get_run(dag_id, run_id).get("note") or ""
    result = {task: api.xcom(dag_id, run_id, task) for task in RESULT_TASKS.get(dag_id, ())}

    def human() -> None:
        if dag_id == DRILL_DAG:
            print(f"{DRILL_DAG}: {final['state'].upper()}")
        else:
            print(f"\n{dag_id} run {run_id}: {final['state'].upper()}")
        if note:
            print(note)

    code = outcome_code(api, dag_id, run_id, final, doc)
    emit(args, {**doc, "state": final["state"], "note": note, "result": result}, human)
    return code


def report_find_target(api: AirflowApi, args: argparse.Namespace, run_id: str, final: dict[str, Any],
                       doc: dict[str, Any]) -> int:
    """dr_find_target's end: the ranked candidates, each with the commands that undo it."""
    found = api.xcom(FIND_TARGET_DAG, run_id, "find_candidates") or {}
    candidates = found.get("candidates") or []
    server, incident = doc["conf"].get("server"), doc["conf"].get("incident_id")

    def next_steps(c: dict[str, Any]) -> list[str]:
        tables = " ".join(f"--table {r['relation']}" for r in c.get("relations") or []
                          if isinstance(r.get("relation"), str) and QUALIFIED_TABLE_RE.match(r["relation"]))
        return [f"barman-dr plan --server {server} --target-xid {c['xid']} --exclusive --incident {incident}",
                f"barman-dr surgical --server {server} --target-xid {c['xid']} --exclusive {tables} "
                f"--incident {incident}.surgical --plan-only".replace("  ", " ")]

    def human() -> None:
        print(f"\n{FIND_TARGET_DAG} run {run_id}: {final['state'].upper()}")
        if final["state"] != "success":
            note = api.get_run(FIND_TARGET_DAG, run_id).get("note") or ""
            if note:
                print(note)
            return
        window = found.get("window") or {}
        print(f"{found.get('matched', len(candidates))} candidate(s) on {server}, commits "
              f"{str(window.get('start', '?'))[:19]} .. {str(window.get('end', '?'))[:19]} UTC")
        if not candidates:
            print("no destructive transaction found: widen the window, lower --min-rows or drop --table")
        for c in candidates[:10]:
            print(f"{c.get('rank')}. {c.get('summary')}\n   xid {c['xid']} committed {c.get('commit_time')} "
                  f"(commit LSN {c.get('commit_lsn')})")
            for step in next_steps(c):
                print(f"   {step}")
        for w in found.get("warnings") or []:
            print(f"warning: {w}")

    emit(args, {**doc, "state": final["state"], "matched": found.get("matched"), "window": found.get("window"),
                "warnings": found.get("warnings") or [], "candidates": candidates,
                "next": next_steps(candidates[0]) if candidates else []}, human)
    return EXIT_OK if final["state"] == "success" else EXIT_FAILED


# ---------------------------------------------------------------- commands


def cmd_trigger(args: argparse.Namespace, confirm: bool) -> int:
    conf = pitr_conf(args, confirm)
    mode = trigger_mode(args)
    return run_dag(args, PITR_DAG, conf, incident=args.incident, mode=mode, report_fn=report,
                   note="plan requested by barman-dr plan" if mode == "plan_only" else None)


def cmd_surgical(args: argparse.Namespace) -> int:
    return run_dag(args, SURGICAL_DAG, surgical_conf(args), incident=args.incident, mode=trigger_mode(args))


def cmd_salvage(args: argparse.Namespace) -> int:
    return run_dag(args, SALVAGE_DAG, salvage_conf(args), incident=args.incident, mode=trigger_mode(args))


def cmd_rollback(args: argparse.Namespace) -> int:
    return run_dag(args, ROLLBACK_DAG, rollback_conf(args), incident=args.incident, mode="execute")


def cmd_find_target(args: argparse.Namespace) -> int:
    return run_dag(args, FIND_TARGET_DAG, find_target_conf(args), incident=args.incident, mode="read_only",
                   report_fn=report_find_target)


def cmd_drill(args: argparse.Namespace) -> int:
    incident = check_incident(args.incident) if args.incident else None
    run_id = incident_run_id(DRILL_DAG, incident) if incident else f"{DRILL_DAG}__cli__{time.strftime('%Y%m%dT%H%M%S')}"
    return run_dag(args, DRILL_DAG, drill_conf(args), incident=incident, mode="run", run_id=run_id)


def cmd_status(args: argparse.Namespace) -> int:
    dag_id = args.dag
    run_id = check_run_id(args.run_id, "--run-id") if args.run_id else incident_run_id(dag_id, check_incident(args.incident))
    api = api_from_env(args.api_wait)
    try:
        run = api.get_run(dag_id, run_id)
    except ApiError as exc:
        return fail(args, EXIT_USAGE, f"no run {run_id} of {dag_id} (HTTP {exc.status}): check --incident/--run-id "
                                      "and --dag", dag_id=dag_id, run_id=run_id, http_status=exc.status)
    tasks = [{"task_id": ti["task_id"], "map_index": ti.get("map_index", -1), "state": ti.get("state")}
             for ti in api.task_instances(dag_id, run_id)]
    waiting: list[dict[str, Any]] = []
    if dag_id in APPROVAL_DAGS and run.get("state") in ("queued", "running"):
        try:
            waiting = [{"task_id": (h.get("task_instance") or {}).get("task_id"), "subject": h.get("subject")}
                       for h in pending_approvals(api, dag_id, run_id)]
        except ApiError:
            waiting = []  # an older Airflow without the HITL API: the task states still tell
    doc = {"dag_id": dag_id, "run_id": run_id, "state": run.get("state"), "conf": run.get("conf") or {},
           "start_date": run.get("start_date"), "end_date": run.get("end_date"), "tasks": tasks,
           "awaiting_approval": waiting, "note": run.get("note")}

    def human() -> None:
        print(f"{dag_id} run {run_id}: {run['state']}")
        for t in tasks:
            mi = t["map_index"]
            key = t["task_id"] + (f"[{mi}]" if isinstance(mi, int) and mi >= 0 else "")
            print(f"  {key:<22} {t['state']}")
        for w in waiting:
            print(f"  waits for approval ({w['subject']}): {approve_hint(dag_id, args.incident, run_id)}")
        if run.get("note"):
            print(run["note"])

    emit(args, doc, human)
    return EXIT_OK if run["state"] in ("success", "running", "queued") else EXIT_FAILED


def cmd_servers(args: argparse.Namespace) -> int:
    """The fleet at a glance: each server's last verification, backup, drill and PITR (the DR page's summary)."""
    api = api_from_env(args.api_wait)
    try:
        data = api.dr_summary()
    except ApiError as exc:
        return fail(args, EXIT_USAGE, f"the DR page's summary is not available (HTTP {exc.status}): {exc.body[:300]}",
                    **api_refusal(exc))
    servers = data.get("servers") or []

    def human() -> None:
        print(f"{'server':<16} {'verification':<13} {'last backup':<26} {'last drill':<22} last PITR")
        for s in servers:
            ver = (s.get("verification") or {}).get("status") or "-"
            bk = s.get("last_backup") or {}
            backup = f"{bk.get('backup_id', '-')} ({bk.get('age', '-')})" if bk else "-"
            dr = s.get("last_drill") or {}
            drill = f"{dr.get('outcome', '-')} rto {dr.get('rto_s')}s" if dr else "-"
            pt = s.get("last_pitr") or {}
            pitr = f"{pt.get('outcome', '-')} rto {pt.get('rto_s')}s {pt.get('run_id', '')}" if pt else "-"
            print(f"{s.get('server', '?'):<16} {ver:<13} {backup:<26} {drill:<22} {pitr}")

    emit(args, servers, human)  # --json: the list of servers, as the DR page's summary has them
    critical = [s.get("server") for s in servers if (s.get("verification") or {}).get("status") == "CRITICAL"]
    return EXIT_FAILED if critical else EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    """Answer the run's pending approval as the CLI's user (the requester is refused by Airflow: 403)."""
    if args.incident:
        check_incident(args.incident)
    api = api_from_env(args.api_wait)
    run_id = args.run_id or incident_run_id(args.dag, args.incident)
    option = "Reject" if args.reject else "Approve"
    try:
        pending = pending_approvals(api, args.dag, run_id)
    except ApiError as exc:
        print(f"barman-dr: no run {run_id} of {args.dag} (HTTP {exc.status}): check --run-id/--incident and --dag",
              file=sys.stderr)
        return EXIT_USAGE
    if not pending:
        msg = f"run {run_id} of {args.dag} waits for no approval (already answered, not there yet, or pre-approved)"
        print(json.dumps({"run_id": run_id, "answered": False, "why": msg}) if args.json else f"barman-dr: {msg}",
              file=sys.stdout if args.json else sys.stderr)
        return EXIT_USAGE
    body = str(pending[0].get("body") or "")
    shown = re.search(r"plan hash `([0-9a-f]+)`", body)
    if not args.json:  # the approver answers what they read: the plan itself first
        print(body, file=sys.stderr)
    ti = pending[0].get("task_instance") or {}
    task_id, map_index = ti.get("task_id", "approve"), ti.get("map_index", -1)
    try:
        out = api.respond(args.dag, run_id, task_id, option, map_index)
    except ApiError as exc:
        why = (f"Airflow refused the answer (HTTP {exc.status}): {exc.body[:400]}"
               + (" -- the requester cannot approve their own run: a second person must (four eyes)"
                  if exc.status == 403 else ""))
        print(json.dumps({"run_id": run_id, "answered": False, "why": why}) if args.json else f"barman-dr: {why}",
              file=sys.stdout if args.json else sys.stderr)
        return EXIT_USAGE
    result = {"run_id": run_id, "task_id": task_id, "answered": True, "chosen": out.get("chosen_options"),
              "by": (out.get("responded_by_user") or {}).get("name") or api.username,
              "plan_hash": shown.group(1) if shown else None}
    print(json.dumps(result) if args.json else f"{option.lower().removesuffix('e')}ed: {args.dag} run {run_id} ({task_id}) as "
                                                 f"{result['by']}")
    return EXIT_OK


# ---------------------------------------------------------------- the parser


def _json_flag(s: argparse.ArgumentParser) -> None:
    s.add_argument("--json", action="store_true", help="machine-readable: one JSON document on stdout "
                                                        "(progress and messages on stderr)")


def _follow_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--wait", action="store_true", help="follow the run task by task and print its result")
    s.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                   help="with --wait: give up following after this long (exit 3; the run goes on)")


def _incident_flag(s: argparse.ArgumentParser, required: bool = True) -> None:
    s.add_argument("--incident", required=required,
                   help="incident id, e.g. INC-123 (the run id derives from it: repeating the command follows "
                        "the same run)")


def _approval_flags(s: argparse.ArgumentParser, confirm_example: str) -> None:
    g = s.add_mutually_exclusive_group()
    g.add_argument("--confirm", action="store_true",
                   help=f"pre-approved: execute without a second person (sends confirm = '{confirm_example}'); "
                        "without it the plan waits for an approver (barman-dr approve)")
    g.add_argument("--plan-only", dest="plan_only", action="store_true",
                   help="a preview: plan, ask nobody, touch nothing")


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="barman-dr", description="Trigger and follow barman-dr runs (Airflow REST API). Exit codes: "
                                                "0 success, 1 the run failed (servers: a server CRITICAL), 2 bad "
                                                "usage or the API refused the request, 3 timeout, 4 the API server "
                                                "did not answer.")
    p.add_argument("--api-wait", dest="api_wait", type=float, default=API_WAIT_S, metavar="SECONDS",
                   help="keep retrying (with backoff) this long while the Airflow API server does not answer "
                        f"(default {API_WAIT_S:.0f}; 0: fail at once)")
    sub = p.add_subparsers(dest="command", required=True)

    for name, helptext in (("pitr", "execute a PITR (with --confirm; else after a second person approves) and "
                                    "follow it"),
                           ("plan", "plan a PITR: preflight and WAL proof only, nothing is touched")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--server", required=True)
        _incident_flag(s)
        t = s.add_mutually_exclusive_group(required=True)
        t.add_argument("--target-time", dest="target_time", help="ISO 8601 with timezone, e.g. 2026-11-25T11:45:00Z")
        t.add_argument("--target-xid", dest="target_xid", help="a transaction id (digits), e.g. from find-target")
        t.add_argument("--target-lsn", dest="target_lsn", help="a WAL location like 0/7000028")
        t.add_argument("--target-name", dest="target_name", help="a restore point, as created")
        t.add_argument("--target-immediate", dest="target_immediate", action="store_true",
                       help="the end of the base backup")
        s.add_argument("--target-name-lsn", dest="target_name_lsn",
                       help="with --target-name created more than once: the LSN of the occurrence (as the plan lists it)")
        s.add_argument("--exclusive", action="store_true", help="stop just before the target (xid/LSN)")
        s.add_argument("--backup-id", default="auto")
        s.add_argument("--restore-to", default="in_place")
        s.add_argument("--expect", action="append", default=[], metavar="NAME=N")
        s.add_argument("--reason")
        s.add_argument("--jobs", type=int, default=1)
        s.add_argument("--no-staged-restore", dest="no_staged_restore", action="store_true",
                       help="restore inside the downtime window (default: restore into a staging directory "
                            "before the freeze, then rename it into place)")
        s.add_argument("--source", choices=["barman", "auto", "delayed_standby"], default="barman",
                       help="where the recovered data comes from: a Barman backup (default), the server's delayed "
                            "standby promoted at the stop point, or auto (the delayed standby when it can serve the "
                            "target, else Barman)")
        _follow_flags(s)
        _json_flag(s)
        if name == "pitr":
            _approval_flags(s, "PITR <server>")

    s = sub.add_parser("surgical", help="dr_surgical_recovery: put back only the rows an incident destroyed, from a "
                                        "copy restored on nonprod (live keeps serving)")
    s.add_argument("--server", required=True)
    _incident_flag(s)
    t = s.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-time", dest="target_time", help="the last good moment, ISO 8601 with timezone")
    t.add_argument("--target-xid", dest="target_xid", help="the bad transaction's xid (with --exclusive)")
    t.add_argument("--target-lsn", dest="target_lsn", help="a WAL location like 0/7000028")
    s.add_argument("--exclusive", action="store_true", help="stop just before the target (xid/LSN)")
    s.add_argument("--backup-id", default="auto")
    s.add_argument("--table", action="append", default=[], metavar="SCHEMA.TABLE",
                   help="a table to compare by primary key, parents before children (repeat; default: the found "
                        "transaction's tables, else the inventory's surgical_tables)")
    s.add_argument("--restore-changed", dest="restore_changed", action="store_true",
                   help="also overwrite live rows that differ with the restored version (default: report them)")
    s.add_argument("--reason")
    s.add_argument("--jobs", type=int, default=1)
    _approval_flags(s, "SURGICAL <server>")
    _follow_flags(s)
    _json_flag(s)

    s = sub.add_parser("salvage", help="dr_salvage: after a PITR, re-insert the discarded rows inserted after the "
                                       "target")
    s.add_argument("--server", required=True)
    _incident_flag(s)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--pitr-run-id", dest="pitr_run_id", help="the dr_pitr run (default: the server's last successful)")
    g.add_argument("--pitr-incident", dest="pitr_incident", help="the incident id of that dr_pitr run")
    s.add_argument("--table", action="append", default=[], metavar="SCHEMA.TABLE",
                   help="a table to salvage (repeat; default: every table with rows inserted after the target)")
    s.add_argument("--exclude-xid", dest="exclude_xid", action="append", default=[], metavar="XID",
                   help="a transaction whose rows must not be put back (repeat)")
    s.add_argument("--reason")
    _approval_flags(s, "SALVAGE <server>")
    _follow_flags(s)
    _json_flag(s)

    s = sub.add_parser("rollback", help="dr_pitr_rollback: put back the data directory a dr_pitr run moved aside")
    s.add_argument("--server", required=True)
    _incident_flag(s)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--pitr-run-id", dest="pitr_run_id", help="the dr_pitr run to undo (default: --incident's)")
    g.add_argument("--pitr-incident", dest="pitr_incident", help="the incident id of the dr_pitr run to undo")
    s.add_argument("--confirm", action="store_true", help="required: sends confirm = 'ROLLBACK <server>'")
    _follow_flags(s)
    _json_flag(s)

    s = sub.add_parser("find-target", help="dr_find_target: find the bad transaction in the WAL and the exact target "
                                           "that undoes it (read-only)")
    s.add_argument("--server", required=True)
    _incident_flag(s)
    s.add_argument("--window-start", dest="window_start",
                   help="commits from this moment, ISO 8601 with timezone (default: an hour before the end)")
    s.add_argument("--window-end", dest="window_end", help="commits up to this moment (default: now)")
    s.add_argument("--table", help="only transactions touching this table, e.g. public.critical_orders")
    s.add_argument("--min-rows", dest="min_rows", type=int, help="only DELETE/UPDATEs of at least this many rows")
    _follow_flags(s)
    _json_flag(s)

    s = sub.add_parser("status", help="state, tasks and note of a run of any DR DAG")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--incident")
    g.add_argument("--run-id", dest="run_id")
    s.add_argument("--dag", default=PITR_DAG, choices=ALL_DAGS, help=f"default {PITR_DAG}")
    _json_flag(s)

    s = sub.add_parser("servers", help="the fleet: last verification, backup, drill and PITR of each server "
                                       "(exit 1 when one is CRITICAL)")
    s.add_argument("--json", action="store_true", help="the servers as JSON (the DR page's summary)")

    s = sub.add_parser("approve", help="approve (or --reject) a run's plan as a second person")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--incident")
    g.add_argument("--run-id", dest="run_id")
    s.add_argument("--dag", default=PITR_DAG, choices=list(APPROVAL_DAGS))
    s.add_argument("--reject", action="store_true", help="reject: the run ends with nothing touched")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("drill", help="trigger the restore drill now")
    s.add_argument("--target", choices=["random", "immediate"],
                   help="the drill's target (default: the DAG's, a random instant after the backup)")
    _incident_flag(s, required=False)
    _follow_flags(s)
    _json_flag(s)
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "pitr": lambda a: cmd_trigger(a, confirm=a.confirm),
    "plan": lambda a: cmd_trigger(a, confirm=False),
    "surgical": cmd_surgical,
    "salvage": cmd_salvage,
    "rollback": cmd_rollback,
    "find-target": cmd_find_target,
    "status": cmd_status,
    "servers": cmd_servers,
    "approve": cmd_approve,
    "drill": cmd_drill,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        if not 0 <= args.api_wait <= 86400:  # also refuses inf and nan
            raise UsageError(f"--api-wait {args.api_wait}: use a number of seconds from 0 to 86400, e.g. 120")
        check_timeout(args)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        if args is None and "--json" in argv:
            args = argparse.Namespace(json=True)
        return fail(args, EXIT_USAGE, str(exc))
    except ApiUnavailableError as exc:
        return fail(args, EXIT_UNAVAILABLE, str(exc))
    except ApiError as exc:
        return fail(args, EXIT_USAGE, f"Airflow refused the request (HTTP {exc.status}): {exc.body[:800]}",
                    **api_refusal(exc))


if __name__ == "__main__":
    raise SystemExit(main())
