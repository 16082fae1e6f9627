"""The DR page at fleet scale (issue 16): summary + render, and a GET through FastAPI, on 10,000 events / 50 servers.

The objective: the page renders in under 1 s with 10,000 audit rows and 50 servers. This
seeds a THROWAWAY database (created here, dropped at the end, never the lab's dr_audit that
the tests use) with the audit schema (include/sql/audit_schema.sql, minus its grants to
dr_audit_writer: the bench connects as the admin role, and a role is cluster-wide) and a
synthetic fleet history (daily backups and verifications, drills, PITR runs with every step,
four-eyes approvals, filler task events), then times, several times each:

- `summary`: every section's queries (one read-only snapshot), `render`: the HTML;
- the audit trail page: first page, a server filter, an outcome filter, the last page;
- `http_get`: GET /barman-dr/ through FastAPI's TestClient (validation, queries, render).

Environment:
  BENCH_PG_DSN        a libpq DSN of a role that may CREATE DATABASE (e.g. the ops cluster's
                      superuser); default: LAB_AUDIT_DSN's host and port, user
                      $BENCH_PG_USER (default postgres), dbname postgres, password from
                      PGPASSWORD / ~/.pgpass (never the audit writer's)
  BENCH_PAGE_EVENTS   10000      BENCH_PAGE_SERVERS  50      BENCH_PAGE_REPS  5
Writes the "dr_page" section of bench/results/latest.json and prints a table. Not part of
`make test`; run it with `.venv/bin/python bench/dr_page.py` once the lab (or any
PostgreSQL >= 13) is up.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "plugins"), str(Path(__file__).resolve().parents[1])]

from bench.common import REPO, loadavg, log, save_section, stats  # noqa: E402

OBJECTIVE_S = 1.0
SCHEMA = REPO / "include" / "sql" / "audit_schema.sql"
#: only databases with this prefix are ever created or dropped here
DB_PREFIX = "barman_dr_bench_page_"
PITR_STEPS = ("validate", "resolve_target", "preflight", "wal_coverage", "plan", "approve", "stage_restore",
              "freeze_app", "stop_postgres", "move_aside", "barman_restore", "start_recovery", "verify_target",
              "validate_data", "unfreeze_app", "discarded", "rebase_barman", "report")
PHASES = ("freeze_app", "stop_postgres", "move_aside", "barman_restore", "start_recovery", "verify_target",
          "validate_data", "unfreeze_app")
INSERT_COLUMNS = ("event_time", "dag_id", "run_id", "task_id", "try_number", "triggered_by", "server", "action",
                  "target", "argv", "exit_code", "duration_s", "outcome", "incident_id", "details")


def server_name(i: int) -> str:
    return f"fleet-{i:03d}"


def schema_sql(text: str) -> str:
    """The audit schema without the statements naming dr_audit_writer (a cluster-wide role the bench must not need).

    Those GRANT/REVOKE statements are one line each in audit_schema.sql; everything else
    (tables, indexes, the append-only triggers) is applied as is, so the queries are timed
    against the production schema.
    """
    out = [line for line in text.splitlines()
           if not (re.match(r"\s*(GRANT|REVOKE)\b", line, re.I) and "dr_audit_writer" in line)]
    return "\n".join(out) + "\n"


def _event(t: datetime, server: str, action: str, outcome: str, *, dag_id: str, run_id: str, task_id: str | None = None,
           incident_id: str | None = None, target: str | None = None, duration_s: float | None = None,
           details: dict[str, Any] | None = None, triggered_by: str | None = None) -> dict[str, Any]:
    return {"event_time": t.isoformat(), "dag_id": dag_id, "run_id": run_id, "task_id": task_id or action,
            "try_number": 1, "triggered_by": triggered_by, "server": server, "action": action, "target": target,
            "argv": None, "exit_code": None, "duration_s": duration_s, "outcome": outcome,
            "incident_id": incident_id, "details": details or {}}


def _pitr_run(rng: random.Random, t: datetime, server: str, n: int) -> list[dict[str, Any]]:
    """One dr_pitr run: every step started/ok, the four-eyes approval, the report (phases_s as jsonb stores it)."""
    incident = f"INC-BENCH-{n}"
    run_id = f"dr_pitr__incident__{incident}"
    target = f"target_time={(t - timedelta(minutes=5)).isoformat()}"
    kw: dict[str, Any] = {"dag_id": "dr_pitr", "run_id": run_id, "incident_id": incident, "target": target}
    requester, approver = "alice", rng.choice(["bob", "carol"])
    plan_hash = f"{rng.getrandbits(64):016x}"
    out, phases = [], {}
    for step in PITR_STEPS:
        d = round(rng.uniform(0.05, 3.0), 3)
        if step == "approve":
            out.append(_event(t, server, "approval", "info", **kw, task_id="approve", details={
                "decision": "requested", "requester": requester, "requested_at": t.isoformat(),
                "approvers": [approver], "plan_hash": plan_hash}))
            t += timedelta(minutes=rng.randint(1, 20))
            out.append(_event(t, server, "approval", "ok", **kw, task_id="approve", details={
                "decision": "approved", "requester": requester, "approver": approver,
                "responded_at": t.isoformat(), "plan_hash": plan_hash, "chosen": ["Approve"]}))
            continue
        out.append(_event(t, server, step, "started", **kw))
        t += timedelta(seconds=d)
        if step in PHASES:
            phases[step] = d
        if step == "report":
            details = {"rto_s": round(sum(phases.values()), 3), "phases_s": dict(sorted(phases.items())),
                       "counts": {"orders_total": 10500}, "outside_downtime_s": {"stage_restore": 40.0},
                       "approval": {"decision": "approved", "requester": requester, "approver": approver,
                                    "responded_at": t.isoformat(), "plan_hash": plan_hash}}
            out.append(_event(t, server, "report", "ok", **kw, duration_s=d, details=details))
        else:
            out.append(_event(t, server, step, "ok", **kw, duration_s=d))
    return out


def synthetic_events(n_events: int = 10_000, n_servers: int = 50, *, days: int = 60, seed: int = 16,
                     now: datetime | None = None) -> list[dict[str, Any]]:
    """A fleet's audit history, oldest first, exactly `n_events` long (what the page meets after two months).

    Per server and day a backup and a verification (mostly OK), a drill every ~10 days, one
    PITR run with its approval for every fifth server; filler task events (check_backup)
    spread over the period make up the rest. Deterministic for a seed.
    """
    rng = random.Random(seed)
    now = now or datetime(2026, 12, 1, tzinfo=UTC)
    start = now - timedelta(days=days)
    structured: list[dict[str, Any]] = []
    for i in range(1, n_servers + 1):
        srv = server_name(i)
        for day in range(days):
            t = start + timedelta(days=day, hours=2, minutes=i % 60)
            run = f"scheduled__{t.date().isoformat()}T02:00:00+00:00"
            structured.append(_event(t, srv, "backup_taken", "ok", dag_id="dr_daily_backup", run_id=run,
                                     details={"backup_id": t.strftime("%Y%m%dT%H%M%S")}))
            status = "OK" if rng.random() > 0.05 else "WARNING"
            structured.append(_event(t + timedelta(hours=1), srv, "verify_report",
                                     "ok" if status == "OK" else "warning", dag_id="dr_daily_verification",
                                     run_id=run, details={"status": status, "reasons": []}))
            if day % 10 == i % 10:
                rto = round(rng.uniform(30, 140), 1)
                structured.append(_event(t + timedelta(hours=3), srv, "drill_result", "ok",
                                         dag_id="dr_monthly_restore_drill", run_id=run, details={
                                             "rto_s": rto, "rto_objective_s": 900, "rto_met": rto <= 900,
                                             "backup_id": t.strftime("%Y%m%dT%H%M%S")}))
        if i % 5 == 0:
            structured += _pitr_run(rng, start + timedelta(days=rng.randint(1, days - 1), hours=14), srv, i)
    structured.sort(key=lambda e: e["event_time"])
    if len(structured) >= n_events:
        return structured[-n_events:]
    filler, span = n_events - len(structured), (now - start).total_seconds()
    for k in range(filler):
        t = start + timedelta(seconds=span * (k + 0.5) / filler)
        srv = server_name(k % n_servers + 1)
        structured.append(_event(t, srv, "check_backup", "ok" if k % 7 else "started", dag_id="dr_daily_verification",
                                 run_id=f"scheduled__{t.date().isoformat()}T03:00:00+00:00", duration_s=0.4))
    structured.sort(key=lambda e: e["event_time"])
    return structured


def insert_rows(events: list[dict[str, Any]]) -> Iterator[tuple[Any, ...]]:
    """Rows for INSERT in INSERT_COLUMNS order (argv/details as JSON text)."""
    for e in events:
        yield tuple(json.dumps(e[c]) if c in ("argv", "details") and e[c] is not None else e[c]
                    for c in INSERT_COLUMNS)


def admin_dsn(env: Mapping[str, str] = os.environ) -> str:
    """BENCH_PG_DSN, else LAB_AUDIT_DSN's host/port as BENCH_PG_USER (no password copied from the writer's DSN)."""
    from psycopg2.extensions import make_dsn, parse_dsn

    if env.get("BENCH_PG_DSN"):
        return env["BENCH_PG_DSN"]
    if not env.get("LAB_AUDIT_DSN"):
        raise SystemExit("set BENCH_PG_DSN (a role that may CREATE DATABASE), or LAB_AUDIT_DSN for its host/port")
    lab = parse_dsn(env["LAB_AUDIT_DSN"])
    keep = {k: lab[k] for k in ("host", "port") if k in lab}
    return make_dsn(**keep, user=env.get("BENCH_PG_USER", "postgres"), dbname="postgres")


def bench_db_name(pid: int | None = None) -> str:
    return f"{DB_PREFIX}{pid if pid is not None else os.getpid()}"


class ThrowawayDb:
    """CREATE DATABASE on enter, DROP DATABASE (FORCE) on exit; refuses any name without DB_PREFIX."""

    def __init__(self, dsn: str, name: str) -> None:
        if not re.fullmatch(DB_PREFIX + r"[0-9]+", name):
            raise ValueError(f"refusing to create or drop {name!r}: only {DB_PREFIX}<n> databases are throwaway")
        self.dsn, self.name = dsn, name

    def _admin(self, sql: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.dsn)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def __enter__(self) -> Callable[[], Any]:
        import psycopg2
        from psycopg2.extensions import make_dsn

        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self._admin(f'CREATE DATABASE "{self.name}"')
        dsn = make_dsn(self.dsn, dbname=self.name)
        return lambda: psycopg2.connect(dsn)

    def __exit__(self, *exc: object) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def seed(connect: Callable[[], Any], events: list[dict[str, Any]]) -> float:
    """Apply the schema and insert the events (batched); returns the seconds it took (untimed in the results)."""
    from psycopg2.extras import execute_values

    t0 = time.monotonic()
    conn = connect()
    try:
        with conn.cursor() as cur:
            cur.execute(schema_sql(SCHEMA.read_text()))
            execute_values(cur, f"INSERT INTO audit.events ({', '.join(INSERT_COLUMNS)}) VALUES %s",
                           list(insert_rows(events)), page_size=1000,
                           template="(%s::timestamptz, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, "
                                    "%s::jsonb)")
        conn.commit()
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ANALYZE audit.events")
    finally:
        conn.close()
    return time.monotonic() - t0


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def measure(connect: Callable[[], Any], n_servers: int, reps: int) -> dict[str, Any]:
    """Each case `reps` times (plus one untimed warm-up): query, render and GET seconds."""
    from fastapi.testclient import TestClient

    from barman_dr.surfaces import web

    servers = [web.ServerInfo(server_name(i), 7, 900) for i in range(1, n_servers + 1)]
    cases = {"first_page": {}, "server_filter": {"server": server_name(7)}, "outcome_filter": {"outcome": "warning"},
             "per_page_200": {"per_page": "200"}, "last_page": {"page": str(web.PAGE_MAX)}}
    out: dict[str, Any] = {}
    for case, params in cases.items():
        query = web.AuditQuery.parse(params)
        q_s, r_s, sizes, rows = [], [], [], 0
        for rep in range(reps + 1):
            def fetch(query: web.AuditQuery = query) -> tuple[dict[str, Any], web.AuditPage]:
                with web.SqlAuditSource(connect) as src:
                    return web.summarize(src, servers), src.audit_page(query)

            tq, (data, audit) = timed(fetch)
            tr, page = timed(lambda data=data, audit=audit: web.render(data, audit))
            if rep:  # the first one warms the caches
                q_s.append(tq)
                r_s.append(tr)
                sizes.append(len(page))
            rows = len(audit.rows)
        totals = [a + b for a, b in zip(q_s, r_s, strict=True)]
        out[case] = {"params": params, "rows_on_page": rows, "summary_and_query_s": stats(q_s), "render_s": stats(r_s),
                     "total_s": stats(totals), "html_bytes": max(sizes) if sizes else None}
    app = web.create_app(web.PageDeps(source=lambda: web.SqlAuditSource(connect), servers=lambda: servers))
    app.dependency_overrides[web.get_user] = lambda: None
    client = TestClient(app)
    gets = []
    for rep in range(reps + 1):
        t, resp = timed(lambda: client.get("/", params={"per_page": "50"}))
        if resp.status_code != 200:
            raise RuntimeError(f"GET / -> {resp.status_code}: {resp.text[:500]}")
        if rep:
            gets.append(t)
    out["http_get"] = {"params": {"per_page": "50"}, "total_s": stats(gets)}
    return out


def main() -> int:
    n_events = int(os.environ.get("BENCH_PAGE_EVENTS", "10000"))
    n_servers = int(os.environ.get("BENCH_PAGE_SERVERS", "50"))
    reps = int(os.environ.get("BENCH_PAGE_REPS", "5"))
    dsn = admin_dsn()
    events = synthetic_events(n_events, n_servers)
    load_before = loadavg()
    with ThrowawayDb(dsn, bench_db_name()) as connect:
        seed_s = seed(connect, events)
        log(f"[dr_page] seeded {len(events)} events over {n_servers} servers in {seed_s:.1f} s")
        cases = measure(connect, n_servers, reps)
    worst = max(c["total_s"]["max"] or 0.0 for c in cases.values())
    summary = {"events": len(events), "servers": n_servers, "reps": reps, "objective_s": OBJECTIVE_S,
               "worst_total_s": round(worst, 3), "objective_met": worst < OBJECTIVE_S, "cases": cases,
               "loadavg_before": load_before, "loadavg_after": loadavg()}
    out = save_section("dr_page", summary)
    print()
    print(f"DR page, {len(events)} audit events, {n_servers} servers ({reps} reps, after a warm-up)")
    print(f"{'case':<16} {'rows':>5} {'query s (med)':>14} {'render s (med)':>15} {'total s (max)':>14} {'html KiB':>9}")
    for case, c in cases.items():
        if case == "http_get":
            print(f"{'GET /barman-dr/':<16} {'50':>5} {'':>14} {'':>15} {c['total_s']['max']:>14}")
            continue
        print(f"{case:<16} {c['rows_on_page']:>5} {c['summary_and_query_s']['median']:>14} "
              f"{c['render_s']['median']:>15} {c['total_s']['max']:>14} {(c['html_bytes'] or 0) // 1024:>9}")
    print(f"objective: every case under {OBJECTIVE_S} s -> {'met' if summary['objective_met'] else 'NOT MET'} "
          f"(worst {summary['worst_total_s']} s); load average before/after {load_before} / "
          f"{summary['loadavg_after']}  -> {out}")
    return 0 if summary["objective_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
