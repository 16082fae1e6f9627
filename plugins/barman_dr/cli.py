"""`barman-dr`: the incident CLI. Triggers and follows DR runs through the Airflow REST API.

    barman-dr plan   --server pg-primary --target-time 2026-11-25T11:45:00Z --incident INC-123
    barman-dr pitr   --server pg-primary --target-time 2026-11-25T11:45:00Z --incident INC-123 \\
                     --expect orders_total=10500 --confirm --wait
    barman-dr status --incident INC-123
    barman-dr drill  --wait
    barman-dr servers [--json]

The run id is derived from the incident id, so calling `pitr` twice for one incident
follows the existing run instead of starting a second PITR. While the API server does not
answer (a restart, an outage of the Airflow host), every call is retried with backoff for
`--api-wait` seconds (default 120); then the command stops with exit code 4 and says so, and
running it again with the same incident id reaches the same single run. Exit codes: 0
success, 1 the run failed (`servers`: a server is CRITICAL), 2 bad usage or the API refused the request, 3 timeout, 4 the API
server did not answer.
Credentials: BARMAN_DR_API_URL / BARMAN_DR_API_USER / BARMAN_DR_API_PASSWORD (the lab's
LAB_AIRFLOW_URL / LAB_AIRFLOW_USER / LAB_AIRFLOW_PASSWORD are used when those are unset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from barman_dr.api_client import AirflowApi, ApiError, ApiUnavailableError, incident_run_id

PITR_DAG = "dr_pitr"
DRILL_DAG = "dr_monthly_restore_drill"


#: --api-wait default: long enough for an api-server restart, short enough for a 3 AM terminal
API_WAIT_S = 120.0


def api_from_env(retry_for: float = API_WAIT_S) -> AirflowApi:
    url = os.environ.get("BARMAN_DR_API_URL") or os.environ.get("LAB_AIRFLOW_URL")
    user = os.environ.get("BARMAN_DR_API_USER") or os.environ.get("LAB_AIRFLOW_USER")
    password = os.environ.get("BARMAN_DR_API_PASSWORD") or os.environ.get("LAB_AIRFLOW_PASSWORD")
    if not (url and user and password):
        raise SystemExit("barman-dr: set BARMAN_DR_API_URL, BARMAN_DR_API_USER and BARMAN_DR_API_PASSWORD")
    return AirflowApi(url, user, password, retry_for=retry_for)


def parse_expect(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise SystemExit(f"barman-dr: --expect {item!r}: use NAME=INTEGER, e.g. orders_total=10500")
        out[name.strip()] = int(value)
    return out


def pitr_conf(args: argparse.Namespace, confirm: bool) -> dict[str, Any]:
    conf: dict[str, Any] = {"server": args.server, "incident_id": args.incident, "jobs": args.jobs,
                            "backup_id": args.backup_id, "restore_to": args.restore_to,
                            "expected": parse_expect(args.expect), "target_inclusive": not args.exclusive}
    for field in ("target_time", "target_xid", "target_lsn", "target_name"):
        value = getattr(args, field)
        if value:
            conf[field] = value
    if args.target_immediate:
        conf["target_immediate"] = True
    if args.target_name_lsn:
        conf["target_name_lsn"] = args.target_name_lsn
    if args.reason:
        conf["reason"] = args.reason
    if args.no_staged_restore:
        conf["staged_restore"] = False
    if confirm:
        conf["confirm"] = f"PITR {args.server}"
    return conf


def follow(api: AirflowApi, dag_id: str, run_id: str, timeout: float, out: Any = sys.stdout) -> dict[str, Any]:
    seen: dict[str, str] = {}

    def progress(_run: dict[str, Any]) -> None:
        for ti in api.task_instances(dag_id, run_id):
            key = ti["task_id"] + (f"[{ti['map_index']}]" if (ti.get("map_index") or -1) >= 0 else "")
            state = ti.get("state") or "queued"
            if seen.get(key) != state and state not in ("scheduled", "queued", "none"):
                seen[key] = state
                print(f"  {time.strftime('%H:%M:%S')}  {key:<22} {state}", file=out, flush=True)

    return api.wait(dag_id, run_id, timeout=timeout, poll=1.0, on_progress=progress)


def ensure_unpaused(api: AirflowApi, dag_id: str) -> None:
    dag = api._call("GET", f"/api/v2/dags/{dag_id}")
    if dag.get("is_paused"):
        raise SystemExit(f"barman-dr: {dag_id} is paused in Airflow: a run would wait forever. Unpause it first "
                         f"(UI toggle, or PATCH /api/v2/dags/{dag_id} {{\"is_paused\": false}}).")


def cmd_trigger(args: argparse.Namespace, confirm: bool) -> int:
    api = api_from_env(args.api_wait)
    ensure_unpaused(api, PITR_DAG)
    run_id = incident_run_id(PITR_DAG, args.incident)
    try:
        _, created = api.trigger(PITR_DAG, pitr_conf(args, confirm), run_id=run_id,
                                   note=None if confirm else "plan requested by barman-dr plan")
    except ApiError as exc:
        print(f"barman-dr: Airflow refused the request (HTTP {exc.status}): {exc.body[:800]}", file=sys.stderr)
        return 2
    print(f"{'triggered' if created else 'already exists (same incident)'}: {PITR_DAG} run {run_id} "
          f"[{'EXECUTE' if confirm else 'plan only'}]")
    if not args.wait:
        return 0
    try:
        final = follow(api, PITR_DAG, run_id, args.timeout)
    except TimeoutError as exc:
        print(f"barman-dr: {exc}", file=sys.stderr)
        return 3
    return report(api, run_id, final)


def report(api: AirflowApi, run_id: str, final: dict[str, Any]) -> int:
    note = api.get_run(PITR_DAG, run_id).get("note") or ""
    print(f"\n{PITR_DAG} run {run_id}: {final['state'].upper()}")
    if note:
        print(note)
    rep = api.xcom(PITR_DAG, run_id, "report")
    if rep:
        print(json.dumps({k: rep.get(k) for k in ("counts", "expected", "new_timeline", "moved_aside", "rto_s",
                                                  "phases_s", "new_backup_id")}, indent=2))
    return 0 if final["state"] == "success" else 1


def cmd_status(args: argparse.Namespace) -> int:
    api = api_from_env(args.api_wait)
    run_id = args.run_id or incident_run_id(PITR_DAG, args.incident)
    try:
        run = api.get_run(PITR_DAG, run_id)
    except ApiError as exc:
        print(f"barman-dr: no run {run_id} (HTTP {exc.status})", file=sys.stderr)
        return 2
    print(f"{PITR_DAG} run {run_id}: {run['state']}")
    for ti in api.task_instances(PITR_DAG, run_id):
        print(f"  {ti['task_id']:<22} {ti.get('state')}")
    if run.get("note"):
        print(run["note"])
    return 0 if run["state"] in ("success", "running", "queued") else 1


def cmd_servers(args: argparse.Namespace) -> int:
    """The fleet at a glance: each server's last verification, backup, drill and PITR (the DR page's summary)."""
    api = api_from_env(args.api_wait)
    try:
        data = api._call("GET", "/barman-dr/api/summary")
    except ApiError as exc:
        print(f"barman-dr: the DR page's summary is not available (HTTP {exc.status}): {exc.body[:300]}",
              file=sys.stderr)
        return 2
    servers = data.get("servers") or []
    if args.json:
        print(json.dumps(servers, indent=2, default=str))
    else:
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
    critical = [s.get("server") for s in servers if (s.get("verification") or {}).get("status") == "CRITICAL"]
    return 1 if critical else 0


def cmd_drill(args: argparse.Namespace) -> int:
    api = api_from_env(args.api_wait)
    ensure_unpaused(api, DRILL_DAG)
    run, _ = api.trigger(DRILL_DAG, {}, run_id=f"{DRILL_DAG}__cli__{time.strftime('%Y%m%dT%H%M%S')}")
    print(f"triggered: {DRILL_DAG} run {run['dag_run_id']}")
    if not args.wait:
        return 0
    final = follow(api, DRILL_DAG, run["dag_run_id"], args.timeout)
    print(f"{DRILL_DAG}: {final['state'].upper()}")
    return 0 if final["state"] == "success" else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="barman-dr", description="Trigger and follow barman-dr runs (Airflow REST API).")
    p.add_argument("--api-wait", dest="api_wait", type=float, default=API_WAIT_S, metavar="SECONDS",
                   help="keep retrying (with backoff) this long while the Airflow API server does not answer "
                        f"(default {API_WAIT_S:.0f}; 0: fail at once)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("pitr", "execute a PITR (with --confirm) and follow it"),
                           ("plan", "plan a PITR: preflight and WAL proof only, nothing is touched")):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("--server", required=True)
        s.add_argument("--incident", required=True, help="incident id, e.g. INC-123 (the run id derives from it)")
        t = s.add_mutually_exclusive_group(required=True)
        t.add_argument("--target-time", dest="target_time", help="ISO 8601 with timezone, e.g. 2026-11-25T11:45:00Z")
        t.add_argument("--target-xid", dest="target_xid")
        t.add_argument("--target-lsn", dest="target_lsn")
        t.add_argument("--target-name", dest="target_name")
        t.add_argument("--target-immediate", dest="target_immediate", action="store_true")
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
        s.add_argument("--wait", action="store_true", help="follow the run and print the report")
        s.add_argument("--timeout", type=float, default=3600)
        if name == "pitr":
            s.add_argument("--confirm", action="store_true",
                           help="execute (sends confirm = 'PITR <server>'); without it the run only plans")
    s = sub.add_parser("status", help="state, tasks and note of a PITR run")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--incident")
    g.add_argument("--run-id")
    s = sub.add_parser("servers", help="the fleet: last verification, backup, drill and PITR of each server "
                                       "(exit 1 when one is CRITICAL)")
    s.add_argument("--json", action="store_true", help="the servers as JSON (the DR page's summary)")
    s = sub.add_parser("drill", help="trigger the restore drill now")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--timeout", type=float, default=3600)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.api_wait <= 86400:  # also refuses inf and nan
        print(f"barman-dr: --api-wait {args.api_wait}: use a number of seconds from 0 to 86400, e.g. 120",
              file=sys.stderr)
        return 2
    try:
        if args.command == "pitr":
            return cmd_trigger(args, confirm=args.confirm)
        if args.command == "plan":
            return cmd_trigger(args, confirm=False)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "servers":
            return cmd_servers(args)
        return cmd_drill(args)
    except ApiUnavailableError as exc:
        print(f"barman-dr: {exc}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    raise SystemExit(main())
