"""The DR page: a read-only FastAPI app mounted in the Airflow API server at /barman-dr.

Everything it shows comes from the audit trail (the record of truth, on the ops cluster):
per server the last backup and its age, the verification status, the recovery window, the
latest PITR runs (target, outcome, four-eyes approval, RTO per phase in the order the phases
ran, link to the Airflow run), the candidate targets dr_find_target found (ranked, with the
xid/LSN target and a dr_pitr conf), the drill history with an RTO trend against the
objective, the latest approvals, and one page of the audit trail. Authentication is
Airflow's own (`get_user`: the UI's session cookie or a bearer token); the page never
writes anything. Rendered server-side with escaped values: no JavaScript, nothing from the
audit trail is ever interpreted as HTML.

Fleet scale (issue 16): the page must stay fast and short with 50 servers and a long audit
trail, so nothing reads "the last N events and hopes": every section asks the database for
exactly what it shows (the newest event of each kind per server, the last 20 PITR runs,
...), and the audit trail is paginated and filtered in SQL. Filters arrive as query
parameters and are validated here (allow-list patterns, bounded lengths) before any query
runs; values only ever reach SQL as bound parameters.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from barman_dr.safety.audit import OUTCOMES

try:  # the API server's dependency; absent in unit tests that only render
    from airflow.api_fastapi.core_api.security import get_user
except ImportError:  # pragma: no cover
    def get_user() -> None:  # type: ignore[misc]
        return None

PREFIX = "/barman-dr"

PER_PAGE_DEFAULT = 50
PER_PAGE_MAX = 200
#: beyond this, a page number is a typo or a probe; OFFSET would still scan that far
PAGE_MAX = 1_000_000
PITR_RUNS_SHOWN = 20
DRILLS_SHOWN = 50  # in the trend
DRILL_ROWS_SHOWN = 20  # in the table under it (newest first)
APPROVALS_SHOWN = 20
FIND_TARGET_EVENTS = 20

#: dr_pitr's steps inside the downtime, in the runbook's order: the fallback when the audit
#: trail has no start time for a phase (copied from PitrReportOperator.PHASES: importing the
#: operators would import the Airflow task SDK into the API server for a tuple)
PITR_PHASES = ("freeze_app", "stop_postgres", "move_aside", "barman_restore", "start_recovery", "verify_target",
               "validate_data", "unfreeze_app")

APPROVAL_DECISIONS = ("requested", "approved", "rejected", "timed_out", "refused", "pre_approved", "plan_only")

EVENT_COLUMNS = ("event_id", "event_time", "dag_id", "run_id", "task_id", "try_number", "triggered_by", "server",
                 "action", "target", "argv", "exit_code", "duration_s", "outcome", "incident_id", "details")
_SELECT = ", ".join(EVENT_COLUMNS)


# ------------------------------------------------------------------------ filters and pages

class FilterError(ValueError):
    """A query parameter the page refuses: `field` names it, so the 400 says which one."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


#: per filter: the column it compares, the pattern a value must match, and what the 400 says.
#: The patterns are the writers' own rules (inventory names, incident ids, Airflow's default
#: allowed_run_id_pattern), so every value that can be in the table can be asked for.
FILTERS: dict[str, tuple[re.Pattern[str] | None, int, str]] = {
    "server": (re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*"), 63,
               "a server name: letters, digits, '.', '_' and '-', at most 63 characters"),
    "action": (re.compile(r"[a-z][a-z0-9_]*"), 63,
               "an action name: lower-case letters, digits and '_', at most 63 characters"),
    "outcome": (None, 16, "one of " + ", ".join(OUTCOMES)),
    "incident_id": (re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*"), 64,
                    "an incident id: letters, digits, '.', '_' and '-', at most 64 characters"),
    "run_id": (re.compile(r"[A-Za-z0-9_.~:+-]+"), 250,
               "an Airflow run id: letters, digits and _ . ~ : + -, at most 250 characters"),
}
FILTER_FIELDS = tuple(FILTERS)


def _int_param(name: str, raw: str | None, default: int | None, lo: int, hi: int) -> int | None:
    if raw is None or raw == "":
        return default
    if len(raw) > len(str(hi)) or not raw.isascii() or not raw.isdigit():
        raise FilterError(name, f"must be a whole number from {lo} to {hi}")
    value = int(raw)
    if not lo <= value <= hi:
        raise FilterError(name, f"must be a whole number from {lo} to {hi}, not {value}")
    return value


@dataclass(frozen=True)
class AuditQuery:
    """One page of the audit trail as asked for: validated filters, the page, and the snapshot it is pinned to.

    `until` pins the paging to the newest event_id of the first page: during an incident the
    trail grows every second, and without it "next" would show rows the previous page
    already had. A new filter (the form) starts a new snapshot.
    """

    server: str | None = None
    action: str | None = None
    outcome: str | None = None
    incident_id: str | None = None
    run_id: str | None = None
    page: int = 1
    per_page: int = PER_PAGE_DEFAULT
    until: int | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str | None] | Callable[[str], list[str]]) -> AuditQuery:
        """Validate query parameters (a mapping, or Starlette's `getlist`); raises FilterError naming the field.

        Empty values mean "no filter" (the form submits every field). A parameter given twice
        is refused rather than silently picking one.
        """
        def get(name: str) -> str | None:
            if callable(params):
                values = params(name)
                if len(values) > 1:
                    raise FilterError(name, "given more than once")
                return values[0] if values else None
            return params.get(name)

        values: dict[str, Any] = {}
        for name, (pattern, max_len, what) in FILTERS.items():
            raw = get(name)
            if raw is None or raw == "":
                continue
            if len(raw) > max_len:
                raise FilterError(name, f"must be {what} (got {len(raw)} characters)")
            ok = raw in OUTCOMES if pattern is None else pattern.fullmatch(raw) is not None
            if not ok:
                raise FilterError(name, f"must be {what}")
            values[name] = raw
        page = _int_param("page", get("page"), 1, 1, PAGE_MAX)
        per_page = _int_param("per_page", get("per_page"), PER_PAGE_DEFAULT, 1, PER_PAGE_MAX)
        until = _int_param("until", get("until"), None, 1, 2**63 - 1)
        return cls(**values, page=page or 1, per_page=per_page or PER_PAGE_DEFAULT, until=until)

    def filters(self) -> dict[str, str]:
        """The filters that are set, in the form's order."""
        return {k: getattr(self, k) for k in FILTER_FIELDS if getattr(self, k) is not None}

    def where(self, until: int | None = None) -> tuple[str, list[Any]]:
        """The WHERE clause (column names from FILTERS only) and its bound parameters."""
        clauses, params = [], []
        for col, val in self.filters().items():
            clauses.append(f"{col} = %s")
            params.append(val)
        pin = self.until if until is None else until
        if pin is not None:
            clauses.append("event_id <= %s")
            params.append(pin)
        return (" WHERE " + " AND ".join(clauses) if clauses else ""), params

    def href(self, page: int | None = None, until: int | None = None) -> str:
        """A link to another page of the same query: every filter, the page size and the snapshot kept."""
        params: list[tuple[str, str]] = list(self.filters().items())
        if self.per_page != PER_PAGE_DEFAULT:
            params.append(("per_page", str(self.per_page)))
        pin = self.until if until is None else until
        if pin is not None:
            params.append(("until", str(pin)))
        if page is not None and page != 1:
            params.append(("page", str(page)))
        return "?" + urlencode(params) if params else "?"


@dataclass(frozen=True)
class Page:
    """Pagination arithmetic: which rows of `total` page `number` holds (a page past the end is the last)."""

    number: int
    per_page: int
    total: int

    @classmethod
    def of(cls, requested: int, per_page: int, total: int) -> Page:
        pages = max(1, math.ceil(total / per_page))
        return cls(min(max(requested, 1), pages), per_page, total)

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))

    @property
    def offset(self) -> int:
        return (self.number - 1) * self.per_page

    @property
    def first_row(self) -> int:
        return self.offset + 1 if self.total else 0

    @property
    def last_row(self) -> int:
        return min(self.offset + self.per_page, self.total)

    @property
    def has_prev(self) -> bool:
        return self.number > 1

    @property
    def has_next(self) -> bool:
        return self.number < self.pages


@dataclass
class AuditPage:
    """One page of audit rows with the arithmetic and the snapshot (newest event_id) the links keep."""

    query: AuditQuery
    rows: list[dict[str, Any]]
    page: Page
    until: int | None

    def links(self) -> dict[str, str | None]:
        """first/prev/next/last hrefs (None where there is no such page), filters and snapshot kept."""
        p = self.page
        return {"first": self.query.href(1, self.until) if p.has_prev else None,
                "prev": self.query.href(p.number - 1, self.until) if p.has_prev else None,
                "next": self.query.href(p.number + 1, self.until) if p.has_next else None,
                "last": self.query.href(p.pages, self.until) if p.has_next else None}


# ------------------------------------------------------------------------ reading the audit trail

class AuditSource(Protocol):
    """What the page reads: each method is one bounded query (tests pass an in-memory one)."""

    def latest_per_server(self, servers: Sequence[str]) -> list[dict[str, Any]]:
        """Per server the newest event of each kind ('backup', 'verification', 'pitr', 'drill'), with `kind`."""

    def recent(self, kind: str, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` events of a kind ('pitr', 'drill', 'find_target', 'approval'), newest first."""

    def run_events(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        """dr_pitr events of these runs that carry a step start or an approval."""

    def audit_page(self, query: AuditQuery) -> AuditPage:
        """One page of the audit trail, filtered and paginated by the database."""


#: kinds of `recent` (constant SQL; nothing from a request is ever formatted into these)
_RECENT_WHERE = {
    "pitr": "dag_id = 'dr_pitr' AND action IN ('report', 'failure_summary') AND outcome = 'ok'",
    "drill": "action = 'drill_result'",
    "find_target": "action = 'find_target'",
    "approval": "action = 'approval'",
}

#: per server, per kind, the newest matching event: one index probe each on
#: events_server_time_idx (server, event_time DESC), whatever the size of the table
_LATEST_SQL = f"""
SELECT k.kind, e.*
  FROM unnest(%s::text[]) AS s(server)
 CROSS JOIN (VALUES ('backup', ARRAY['backup_taken', 'rebase_barman']), ('verification', ARRAY['verify_report']),
                    ('pitr', ARRAY['report', 'failure_summary']), ('drill', ARRAY['drill_result'])) AS k(kind, actions)
 CROSS JOIN LATERAL (
       SELECT {_SELECT} FROM audit.events
        WHERE server = s.server AND action = ANY(k.actions)
          AND (k.kind <> 'backup' OR coalesce(details->>'backup_id', details->>'new_backup_id', '') <> '')
          AND (k.kind <> 'pitr' OR (dag_id = 'dr_pitr' AND outcome = 'ok'))
        ORDER BY event_time DESC, event_id DESC LIMIT 1) AS e
"""

_RUN_EVENTS_SQL = (f"SELECT {_SELECT} FROM audit.events WHERE dag_id = 'dr_pitr' AND run_id = ANY(%s::text[])"
                   " AND (outcome = 'started' OR action = 'approval') ORDER BY event_id")


def _normalise(row: dict[str, Any]) -> dict[str, Any]:
    """Driver rows as the page uses them: ISO times, JSON decoded (drivers differ on jsonb)."""
    if isinstance(row.get("event_time"), datetime):
        row["event_time"] = row["event_time"].isoformat()
    for k in ("argv", "details"):
        if isinstance(row.get(k), str):
            with contextlib.suppress(ValueError):  # not JSON after all: shown as the text it is
                row[k] = json.loads(row[k])
    return row


class SqlAuditSource:
    """The audit trail through one read-only, repeatable-read transaction: every section sees the same snapshot.

    `connect` returns a DB-API connection (psycopg2 or psycopg 3, `%s` parameters): the
    page uses the dr_audit connection, the benchmark a throwaway database.
    """

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._conn: Any = None

    def __enter__(self) -> SqlAuditSource:
        self._conn = self._connect()
        with self._conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.rollback()
            finally:
                conn.close()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if self._conn is None:
            raise RuntimeError("SqlAuditSource is used outside its `with` block")
        with self._conn.cursor() as cur:
            cur.execute(sql, list(params))
            cols = [d[0] for d in cur.description]
            return [_normalise(dict(zip(cols, r, strict=True))) for r in cur.fetchall()]

    def latest_per_server(self, servers: Sequence[str]) -> list[dict[str, Any]]:
        return self._rows(_LATEST_SQL, [list(servers)]) if servers else []

    def recent(self, kind: str, limit: int) -> list[dict[str, Any]]:
        where = _RECENT_WHERE[kind]  # KeyError for an unknown kind: a programming error, never request input
        return self._rows(f"SELECT {_SELECT} FROM audit.events WHERE {where} ORDER BY event_id DESC LIMIT %s",
                          [int(limit)])

    def run_events(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        return self._rows(_RUN_EVENTS_SQL, [list(run_ids)]) if run_ids else []

    def audit_page(self, query: AuditQuery) -> AuditPage:
        where, params = query.where()
        total, newest = self._rows(f"SELECT count(*) AS n, max(event_id) AS newest FROM audit.events{where}",
                                   params)[0].values()
        until = query.until if query.until is not None else newest
        page = Page.of(query.page, query.per_page, int(total or 0))
        rows: list[dict[str, Any]] = []
        if total:
            where, params = query.where(until)
            rows = self._rows(f"SELECT {_SELECT} FROM audit.events{where} ORDER BY event_id DESC LIMIT %s OFFSET %s",
                              [*params, page.per_page, page.offset])
        return AuditPage(query, rows, page, int(until) if until is not None else None)


def default_source() -> SqlAuditSource:
    """The dr_audit connection (Airflow's), the same one the operators write through."""
    from barman_dr.safety.audit import AuditTrail

    return SqlAuditSource(AuditTrail()._connect)


@dataclass(frozen=True)
class ServerInfo:
    """What the page needs of an inventory entry (the benchmark passes 50 synthetic ones)."""

    name: str
    recovery_window_days: int
    rto_objective_seconds: int


def inventory_servers() -> list[ServerInfo]:
    from barman_dr.inventory import load_inventory

    return [ServerInfo(name, s.recovery_window_days, s.rto_objective_seconds)
            for name, s in load_inventory().servers.items()]


# ------------------------------------------------------------------------ assembling the summary

def _age(iso: str | None, now: datetime) -> str:
    if not iso:
        return "-"
    seconds = (now - datetime.fromisoformat(iso)).total_seconds()
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _details(e: Mapping[str, Any]) -> dict[str, Any]:
    d = e.get("details")
    return d if isinstance(d, dict) else {}


def pitr_row(e: Mapping[str, Any]) -> dict[str, Any]:
    d = _details(e)
    return {"at": e["event_time"], "server": e.get("server"), "run_id": e.get("run_id"),
            "incident_id": e.get("incident_id"), "target": e.get("target"),
            "outcome": "success" if e["action"] == "report" else "failed", "rto_s": d.get("rto_s"),
            "phases_s": d.get("phases_s") or {}, "phase_times": {}, "counts": d.get("counts"),
            "outside_downtime_s": d.get("outside_downtime_s") or {},
            "failed_tasks": d.get("failed_tasks"), "next_action": d.get("next_action"),
            "approval": approval_from_report(d.get("approval"))}


def drill_row(e: Mapping[str, Any]) -> dict[str, Any]:
    d = _details(e)
    return {"at": e["event_time"], "server": e.get("server"), "run_id": e.get("run_id"), "rto_s": d.get("rto_s"),
            "rto_objective_s": d.get("rto_objective_s"), "rto_met": d.get("rto_met"),
            "outcome": e["outcome"], "backup_id": d.get("backup_id")}


def approval_row(e: Mapping[str, Any]) -> dict[str, Any]:
    """An `approval` audit event as the page shows it: who asked, who answered, what, when, which plan."""
    d = _details(e)
    decision = d.get("decision")
    return {"at": e.get("event_time"), "server": e.get("server"), "dag_id": e.get("dag_id"),
            "run_id": e.get("run_id"), "decision": decision if decision in APPROVAL_DECISIONS else (decision or "-"),
            "requester": d.get("requester"), "approver": d.get("approver"),
            "requested_at": d.get("requested_at"), "responded_at": d.get("responded_at"),
            "time": d.get("responded_at") or d.get("requested_at") or e.get("event_time"),
            "plan_hash": d.get("plan_hash"), "outcome": e.get("outcome")}


def approval_from_report(a: Any) -> dict[str, Any] | None:
    """The report's own `approval` (the only record of a pre-approved run: it writes no approval event)."""
    if not isinstance(a, dict) or not a:
        return None
    return {"decision": a.get("decision") or "-", "requester": a.get("requester"), "approver": a.get("approver"),
            "requested_at": a.get("requested_at"), "responded_at": a.get("responded_at"),
            "time": a.get("responded_at") or a.get("requested_at"), "plan_hash": a.get("plan_hash")}


def run_approval(events: Iterable[Mapping[str, Any]], fallback: dict[str, Any] | None) -> dict[str, Any] | None:
    """A run's approval: the newest approval event's decision, with the request's requester and time kept."""
    rows = [approval_row(e) for e in events]
    if not rows:
        return fallback
    rows.sort(key=lambda r: str(r["at"] or ""))
    last = dict(rows[-1])
    for r in rows:
        for k in ("requester", "requested_at", "plan_hash"):
            if not last.get(k) and r.get(k):
                last[k] = r[k]
    last["time"] = last.get("responded_at") or last.get("requested_at") or last.get("at")
    return last


def ordered_phases(phases: Mapping[str, Any], times: Mapping[str, str] | None = None) -> list[tuple[str, Any]]:
    """(phase, seconds) in the order the phases ran: by their start in the audit trail.

    jsonb does not keep key order (it sorts keys by length, then bytes), so the report's
    dict comes back out of order; the audit trail's `started` events say when each ran.
    A phase without one goes after the timed ones, in the runbook's order, never alphabetical.
    """
    times = times or {}

    def key(item: tuple[str, Any]) -> tuple[int, str, int, str]:
        name = item[0]
        canonical = PITR_PHASES.index(name) if name in PITR_PHASES else len(PITR_PHASES)
        t = times.get(name)
        return (0, t, canonical, name) if t else (1, "", canonical, name)

    return sorted(((k, v) for k, v in phases.items() if v is not None), key=key)


def step_times(events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """run_id -> step -> when it (last) started, from `started` events (a retry's start replaces the first)."""
    out: dict[str, dict[str, str]] = {}
    for e in events:
        if e.get("outcome") != "started" or not e.get("run_id"):
            continue
        step = e.get("task_id") or e.get("action")
        per_run = out.setdefault(e["run_id"], {})
        t = str(e.get("event_time") or "")
        if step and t > per_run.get(step, ""):
            per_run[step] = t
    return out


def summarize(source: AuditSource, servers: Sequence[ServerInfo], now: datetime | None = None) -> dict[str, Any]:
    """Everything the page shows except the audit trail page, from bounded queries of `source`."""
    now = now or datetime.now(UTC)
    by_name: dict[str, dict[str, Any]] = {
        s.name: {"server": s.name, "recovery_window_days": s.recovery_window_days,
                 "rto_objective_s": s.rto_objective_seconds, "last_backup": None, "verification": None,
                 "last_pitr": None, "last_drill": None} for s in servers}
    for e in source.latest_per_server([s.name for s in servers]):
        srv = by_name.get(e.get("server") or "")
        if srv is None:
            continue
        d = _details(e)
        kind = e.get("kind")
        if kind == "backup":
            backup_id = d.get("backup_id") or d.get("new_backup_id")
            if backup_id:
                srv["last_backup"] = {"backup_id": backup_id, "at": e["event_time"], "age": _age(e["event_time"], now)}
        elif kind == "verification":
            srv["verification"] = {"status": d.get("status") or str(e["outcome"]).upper(), "at": e["event_time"],
                                   "reasons": d.get("reasons") or d.get("findings") or [],
                                   "delayed": list((d.get("facts") or {}).get("delayed_standbys") or [])}
        elif kind == "pitr":
            srv["last_pitr"] = pitr_row(e)
        elif kind == "drill":
            srv["last_drill"] = drill_row(e)
    pitrs = [pitr_row(e) for e in source.recent("pitr", PITR_RUNS_SHOWN)]
    run_ids = list(dict.fromkeys(p["run_id"] for p in pitrs if p["run_id"]))
    events = source.run_events(run_ids)
    times = step_times(events)
    approvals_by_run: dict[str, list[Mapping[str, Any]]] = {}
    for e in events:
        if e.get("action") == "approval" and e.get("run_id"):
            approvals_by_run.setdefault(e["run_id"], []).append(e)
    for p in pitrs:
        p["phase_times"] = {k: v for k, v in times.get(p["run_id"], {}).items() if k in p["phases_s"]}
        p["phase_order"] = [k for k, _ in ordered_phases(p["phases_s"], p["phase_times"])]
        p["phases_s"] = {k: p["phases_s"][k] for k in p["phase_order"]}
        p["approval"] = run_approval(approvals_by_run.get(p["run_id"], []), p["approval"])
    drills = [drill_row(e) for e in source.recent("drill", DRILLS_SHOWN)]
    return {"generated_at": now.isoformat(), "servers": list(by_name.values()), "pitr_runs": pitrs,
            "drills": list(reversed(drills)),  # oldest first: the trend reads left to right
            "approvals": [approval_row(e) for e in source.recent("approval", APPROVALS_SHOWN)],
            "find_target_runs": find_target_runs(source.recent("find_target", FIND_TARGET_EVENTS))}


def summary(source: AuditSource | None = None, servers: Sequence[ServerInfo] | None = None) -> dict[str, Any]:
    """Everything the page shows, as JSON (also served at /barman-dr/api/summary)."""
    servers = inventory_servers() if servers is None else servers
    if source is not None:
        return summarize(source, servers)
    with default_source() as src:
        return summarize(src, servers)


def find_target_runs(events: list[dict[str, Any]], runs: int = 5, per_run: int = 10) -> list[dict[str, Any]]:
    """The latest dr_find_target results (audit events `find_target`/`ok`), newest first, bounded."""
    out = []
    for e in events:
        d = e.get("details") if isinstance(e.get("details"), dict) else {}
        if e.get("action") != "find_target" or e.get("outcome") != "ok" or "candidates" not in d:
            continue
        out.append({"at": e["event_time"], "server": e.get("server"), "run_id": e.get("run_id"),
                    "incident_id": e.get("incident_id"), "window": d.get("window") or {}, "table": d.get("table"),
                    "min_rows": d.get("min_rows"), "matched": d.get("matched"),
                    "candidates": (d.get("candidates") or [])[:per_run], "warnings": (d.get("warnings") or [])[:5]})
        if len(out) >= runs:
            break
    return out


# ------------------------------------------------------------------------ rendering

def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1d2733}h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;width:100%;font-size:.85rem}th,td{border-bottom:1px solid #dde3ea;padding:.35rem .5rem;
text-align:left;vertical-align:top}th{background:#f3f6f9}.OK,.success,.ok,.approved{color:#1a7f37;font-weight:600}
.WARNING,.warning,.requested{color:#9a6700;font-weight:600}
.CRITICAL,.failed,.critical,.refused,.rejected,.timed_out{color:#cf222e;font-weight:600}
code{font-size:.8rem}form input,form select{margin-right:.5rem}.muted{color:#6b7785}
nav.pager{margin:.5rem 0}nav.pager a,nav.pager span{margin-right:.75rem}
"""


def _fmt_num(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e6 else f"{v:.3g}"


def nice_ticks(top: float, target: int = 5) -> list[float]:
    """Round tick values from 0 to at least `top` (steps of 1, 2 or 5 x 10^k), for the trend's y axis."""
    if top <= 0 or not math.isfinite(top):
        return [0.0, 1.0]
    raw = top / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    n = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(n + 1)]


def rto_svg(drills: list[dict[str, Any]], objective: float | None) -> str:
    """The drill RTO trend (oldest left) as an inline SVG: axes in seconds, ticks, dates, the objective dashed."""
    points = [(d, float(d["rto_s"])) for d in drills if d.get("rto_s") is not None]
    if not points:
        return '<p class="muted">No drill yet.</p>'
    width, height = 640, 220
    left, right, top_pad, bottom = 56, 16, 16, 44
    plot_w, plot_h = width - left - right, height - top_pad - bottom
    values = [v for _, v in points]
    ticks = nice_ticks(max([*values, float(objective or 0)]) * 1.05)
    y_max = ticks[-1] or 1.0
    step = plot_w / max(len(points) - 1, 1)

    def x(i: int) -> float:
        return left + (i * step if len(points) > 1 else plot_w / 2)

    def y(v: float) -> float:
        return top_pad + plot_h - plot_h * v / y_max

    base = top_pad + plot_h
    parts = [f'<line class="axis" x1="{left}" y1="{top_pad}" x2="{left}" y2="{base}" stroke="#1d2733"/>',
             f'<line class="axis" x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#1d2733"/>']
    for t in ticks:
        parts.append(f'<line x1="{left - 4}" x2="{left + plot_w}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#dde3ea"/>'
                     f'<text class="tick" x="{left - 6}" y="{y(t) + 3:.1f}" text-anchor="end" font-size="10">'
                     f'{esc(_fmt_num(t))}</text>')
    parts.append(f'<text class="unit" transform="translate(14,{top_pad + plot_h / 2:.1f}) rotate(-90)" '
                 f'text-anchor="middle" font-size="11">RTO (seconds)</text>')
    every = max(1, math.ceil(len(points) / 8))  # at most ~8 date labels, always the newest
    for i, (d, _) in enumerate(points):
        if i % every == 0 or i == len(points) - 1:
            parts.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{base}" y2="{base + 4}" stroke="#1d2733"/>'
                         f'<text class="tick" x="{x(i):.1f}" y="{base + 16}" text-anchor="middle" font-size="10">'
                         f'{esc(str(d.get("at") or "")[5:10])}</text>')
    parts.append(f'<text class="unit" x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" '
                 f'font-size="11">drill finished (UTC date, oldest left)</text>')
    if objective:
        oy = y(float(objective))
        parts.append(f'<line class="objective" x1="{left}" x2="{left + plot_w}" y1="{oy:.1f}" y2="{oy:.1f}" '
                     f'stroke="#cf222e" stroke-dasharray="6 4"/><text x="{left + plot_w}" y="{oy - 4:.1f}" '
                     f'text-anchor="end" font-size="10" fill="#cf222e">objective {esc(_fmt_num(float(objective)))}s'
                     f'</text>')
    coords = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, (_, v) in enumerate(points))
    parts.append(f'<polyline fill="none" stroke="#0969da" stroke-width="2" points="{coords}"/>')
    parts.extend(f'<circle cx="{x(i):.1f}" cy="{y(v):.1f}" r="3" fill="#0969da"><title>{esc(d.get("server"))} '
                 f'{esc(str(d.get("at") or "")[:16])}: {esc(_fmt_num(v))} s</title></circle>'
                 for i, (d, v) in enumerate(points))
    return (f'<svg id="rto-trend" width="{width}" height="{height}" role="img" '
            f'aria-label="drill RTO trend in seconds">{"".join(parts)}</svg>')


def trend_objective(data: Mapping[str, Any]) -> float | None:
    """The line to draw: the drills' own objective when they agree, else the strictest server's."""
    own = {d.get("rto_objective_s") for d in data.get("drills") or [] if d.get("rto_objective_s") is not None}
    if len(own) == 1:
        return float(own.pop())
    objectives = [s["rto_objective_s"] for s in data.get("servers") or [] if s.get("rto_objective_s")]
    return float(min(objectives)) if objectives else None


def approval_cell(a: Mapping[str, Any] | None) -> str:
    """A PITR row's approval: decision, requester -> approver, time, plan hash."""
    if not a:
        return "<span class='muted'>-</span>"
    decision = str(a.get("decision") or "-")
    return (f"<span class='approval {esc(decision)}'>{esc(decision)}</span> "
            f"{esc(a.get('requester') or '?')} &rarr; {esc(a.get('approver') or '-')}"
            f"<br><span class='muted'>{esc(str(a.get('time') or '')[:19])}</span>"
            + (f" plan <code>{esc(a.get('plan_hash'))}</code>" if a.get("plan_hash") else ""))


def render_approvals(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return '<p class="muted">No approval yet.</p>'
    body = "".join(
        f"<tr><td>{esc(str(r['time'] or '')[:19])}</td><td>{esc(r['server'])}</td><td>{esc(r['dag_id'])}</td>"
        f"<td class='{esc(r['decision'])}'>{esc(r['decision'])}</td><td>{esc(r['requester'] or '-')}</td>"
        f"<td>{esc(r['approver'] or '-')}</td><td><code>{esc(r['plan_hash'] or '')}</code></td>"
        f"<td><a href='/dags/{esc(r['dag_id'])}/runs/{esc(r['run_id'])}'>{esc(r['run_id'])}</a></td></tr>"
        for r in rows)
    return ("<table id='approvals'><tr><th>Time (UTC)</th><th>Server</th><th>DAG</th><th>Decision</th>"
            f"<th>Requester</th><th>Approver</th><th>Plan hash</th><th>Airflow run</th></tr>{body}</table>")


def render_pager(audit: AuditPage) -> str:
    p, links = audit.page, audit.links()

    def a(label: str, href: str | None, rel: str) -> str:
        return f"<a rel='{rel}' href='{esc(href)}'>{label}</a>" if href else f"<span class='muted'>{label}</span>"

    return " ".join([
        "<nav class='pager'>", a("&laquo; first", links["first"], "first"), a("&lsaquo; prev", links["prev"], "prev"),
        f"<span class='position'>page {p.number} of {p.pages}, rows {p.first_row}-{p.last_row} of {p.total}</span>",
        a("next &rsaquo;", links["next"], "next"), a("last &raquo;", links["last"], "last"), "</nav>"])


def render_filter_form(query: AuditQuery) -> str:
    f = {k: esc(getattr(query, k) or "") for k in FILTER_FIELDS}
    options = "".join(f"<option value='{o}'{' selected' if query.outcome == o else ''}>{o}</option>" for o in OUTCOMES)
    size = (f"<input type='hidden' name='per_page' value='{query.per_page}'>"
            if query.per_page != PER_PAGE_DEFAULT else "")
    return (f"<form method='get' id='audit-filter'><input name='server' placeholder='server' value='{f['server']}'>"
            f"<input name='action' placeholder='action' value='{f['action']}'>"
            f"<select name='outcome'><option value=''>any outcome</option>{options}</select>"
            f"<input name='run_id' placeholder='run id' value='{f['run_id']}'>"
            f"<input name='incident_id' placeholder='incident id' value='{f['incident_id']}'>{size}"
            "<button type='submit'>Filter</button> <a href='?'>clear</a></form>")


def render(data: dict[str, Any], audit_rows: list[dict[str, Any]] | AuditPage,
           filters: Mapping[str, str | None] | AuditQuery | None = None) -> str:
    """The whole page. `audit_rows` is one page of the trail (an AuditPage carries its pager)."""
    if isinstance(audit_rows, AuditPage):
        audit: AuditPage | None = audit_rows
        query = audit_rows.query
        rows_shown = audit_rows.rows
    else:
        audit, rows_shown = None, audit_rows
        query = filters if isinstance(filters, AuditQuery) else AuditQuery(
            **{k: v for k, v in (filters or {}).items() if k in FILTER_FIELDS and v})
    rows = []
    for s in data["servers"]:
        lb, ver, lp, ld = s["last_backup"] or {}, s["verification"] or {}, s["last_pitr"] or {}, s["last_drill"] or {}
        rows.append(
            f"<tr><td><a href='{esc(AuditQuery(server=s['server']).href())}'>{esc(s['server'])}</a></td>"
            f"<td>{esc(lb.get('backup_id', '-'))} <span class='muted'>{esc(lb.get('age', ''))}</span></td>"
            f"<td class='{esc(ver.get('status', ''))}'>{esc(ver.get('status', '-'))}</td>"
            f"<td>{esc(s['recovery_window_days'])} days</td>"
            f"<td class='{esc(lp.get('outcome', ''))}'>{esc(lp.get('outcome', '-'))} {esc(lp.get('rto_s') or '')}</td>"
            f"<td>{esc(ld.get('rto_s', '-'))} / {esc(s['rto_objective_s'])} s</td></tr>")
    pitr_rows = []
    for p in data["pitr_runs"]:
        phases = ", ".join(f"{esc(k)} {esc(v)}" for k, v in ordered_phases(p["phases_s"] or {}, p.get("phase_times")))
        before = ", ".join(f"{esc(k)} {esc(v)}" for k, v in (p.get("outside_downtime_s") or {}).items() if v is not None)
        if before:
            phases += f"<br><span class='muted'>before the freeze (app running): {before}</span>"
        link = f"/dags/dr_pitr/runs/{esc(p['run_id'])}"
        pitr_rows.append(
            f"<tr><td>{esc(p['at'][:19])}</td><td>{esc(p['server'])}</td><td>{esc(p['incident_id'] or '')}</td>"
            f"<td>{esc(p['target'] or '')}</td><td class='{esc(p['outcome'])}'>{esc(p['outcome'])}</td>"
            f"<td>{approval_cell(p.get('approval'))}</td>"
            f"<td>{esc(p['rto_s'] if p['rto_s'] is not None else '-')}</td><td><code>{phases}</code></td>"
            f"<td><a href='{link}'>{esc(p['run_id'])}</a></td></tr>")
    drill_rows = [f"<tr><td>{esc(d['at'][:19])}</td><td>{esc(d['server'])}</td><td>{esc(d['backup_id'])}</td>"
                  f"<td>{esc(d['rto_s'])}</td><td>{esc(d['rto_objective_s'])}</td>"
                  f"<td class='{'ok' if d['rto_met'] else 'failed'}'>{esc(d['rto_met'])}</td></tr>"
                  for d in list(reversed(data["drills"]))[:DRILL_ROWS_SHOWN]]
    candidates_html = render_candidates(data.get("find_target_runs") or [])
    delayed_html = render_delayed(data["servers"])
    audit_html = [f"<tr><td>{esc(str(e['event_time'])[:19])}</td><td>{esc(e['dag_id'])}</td><td>{esc(e['run_id'])}</td>"
                  f"<td>{esc(e['task_id'])}</td><td>{esc(e['server'])}</td><td>{esc(e['incident_id'])}</td>"
                  f"<td>{esc(e['action'])}</td><td class='{esc(e['outcome'])}'>{esc(e['outcome'])}</td>"
                  f"<td>{esc(e['duration_s'])}</td></tr>" for e in rows_shown]
    pager = render_pager(audit) if audit is not None else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>barman-dr: disaster recovery</title>
<style>{CSS}</style></head><body>
<h1>Disaster recovery <span class="muted">barman-dr, generated {esc(data['generated_at'][:19])} UTC</span></h1>
<h2>Servers</h2><table id="servers"><tr><th>Server</th><th>Last backup (age)</th><th>Verification</th>
<th>Recovery window</th><th>Last PITR (RTO s)</th><th>Last drill RTO / objective</th></tr>{''.join(rows)}</table>
<h2>Delayed standbys</h2>{delayed_html}
<h2>PITR runs</h2><table id="pitr-runs"><tr><th>Finished</th><th>Server</th><th>Incident</th><th>Target</th>
<th>Outcome</th><th>Approval (requester &rarr; approver)</th><th>RTO s</th><th>Phases (s, in the order they ran)</th>
<th>Airflow run</th></tr>{''.join(pitr_rows)}</table>
<h2>Approvals</h2>{render_approvals(data.get('approvals') or [])}
<h2>Candidate targets</h2>{candidates_html}
<h2>Restore drills</h2>{rto_svg(data['drills'], trend_objective(data))}
<table id="drills"><tr><th>Finished</th><th>Server</th><th>Backup</th><th>RTO s</th><th>Objective s</th>
<th>Met</th></tr>{''.join(drill_rows)}</table>
<h2>Audit trail</h2>{render_filter_form(query)}{pager}
<table id="audit"><tr><th>Time</th><th>DAG</th><th>Run</th><th>Task</th><th>Server</th><th>Incident</th>
<th>Action</th><th>Outcome</th><th>s</th></tr>{''.join(audit_html)}</table>{pager}</body></html>"""


def human_s(seconds: Any) -> str:
    """90 -> '1min 30s', 7200 -> '2h 0min': a window a DBA reads at a glance."""
    if not isinstance(seconds, (int, float)):
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}min {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}min"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def render_delayed(servers: list[dict[str, Any]]) -> str:
    """Each delayed standby's protected window, from the newest daily verification: the fast recovery source."""
    rows = []
    for s in servers:
        ver = s.get("verification") or {}
        for w in ver.get("delayed") or []:
            window, delay, tol = w.get("protected_window_s"), w.get("delay_s"), w.get("tolerance_s") or 0
            behind = isinstance(window, (int, float)) and isinstance(delay, (int, float)) and window > delay + tol
            what = (f"damage younger than {human_s(window)} can be undone in seconds (source: delayed_standby)"
                    if isinstance(window, (int, float)) else "no replayed transaction to date it by yet")
            rows.append(f"<tr><td>{esc(s['server'])}</td><td>{esc(w.get('standby'))}</td><td>{esc(human_s(delay))}</td>"
                        f"<td class='{'WARNING' if behind else 'OK'}'>{esc(human_s(window))}</td><td>{esc(what)}</td>"
                        f"<td>{esc(str(ver.get('at') or '')[:19])}</td></tr>")
    if not rows:
        return "<p class='muted'>No delayed standby in the newest verification (inventory `delayed:` on a standby).</p>"
    return ("<table id='delayed-standbys'><tr><th>Server</th><th>Delayed standby</th><th>Delay</th>"
            "<th>Protected window</th><th>What it protects</th><th>Verified at</th></tr>" + "".join(rows) + "</table>")


def render_candidates(runs: list[dict[str, Any]]) -> str:
    """dr_find_target's ranked candidates, per run: what each transaction did and the exact target that undoes it."""
    if not runs:
        return '<p class="muted">No dr_find_target run yet.</p>'
    parts = []
    for r in runs:
        w = r["window"]
        parts.append(
            f"<p><b>{esc(r['server'])}</b> {esc((r['at'] or '')[:19])} UTC, commits {esc(str(w.get('start', ''))[:19])}"
            f" .. {esc(str(w.get('end', ''))[:19])}" + (f", table {esc(r['table'])}" if r["table"] else "")
            + f", {esc(r['matched'])} matched"
            + (f", incident {esc(r['incident_id'])}" if r["incident_id"] else "")
            + f" <a href='/dags/dr_find_target/runs/{esc(r['run_id'])}'>{esc(r['run_id'])}</a></p>")
        rows = []
        for c in r["candidates"]:
            t = c.get("target") or {}
            conf = json.dumps(c.get("pitr_conf") or {}, sort_keys=True)
            rows.append(
                f"<tr><td>{esc(c.get('rank'))}</td><td class='failed'>{esc(c.get('kind'))}</td>"
                f"<td>{esc(c.get('summary'))}</td><td>{esc('all' if c.get('whole_relation') else c.get('rows_affected'))}"
                f"</td><td>{esc(c.get('xid'))}</td><td>{esc(str(c.get('commit_time', ''))[:26])}</td>"
                f"<td>{esc(c.get('commit_lsn'))}</td><td>target_xid {esc(t.get('target_xid'))} / target_lsn "
                f"{esc(t.get('target_lsn'))}, inclusive false</td><td><code>{esc(conf)}</code></td></tr>")
        parts.append("<table class='candidates'><tr><th>#</th><th>Kind</th><th>What</th><th>Rows</th><th>xid</th>"
                     "<th>Committed (UTC)</th><th>Commit LSN</th><th>Recommended target</th><th>dr_pitr conf</th></tr>"
                     + "".join(rows) + "</table>")
        parts.extend(f"<p class='warning'>{esc(x)}</p>" for x in r["warnings"])
    return f'<div id="candidate-targets">{"".join(parts)}</div>'


def render_error(err: FilterError) -> str:
    return ("<!doctype html><html><head><meta charset='utf-8'><title>barman-dr: bad request</title>"
            f"<style>{CSS}</style></head><body><h1>Invalid audit trail filter</h1>"
            f"<p class='failed'>{esc(err.field)}: {esc(err.message)}</p><p><a href='?'>the page without filters</a>"
            "</p></body></html>")


@dataclass
class PageDeps:
    """Where the app reads from: the dr_audit connection and the inventory, or (bench, tests) anything else."""

    source: Callable[[], Any] = field(default=default_source)
    servers: Callable[[], Sequence[ServerInfo]] = field(default=inventory_servers)


def page_html(deps: PageDeps, query: AuditQuery) -> str:
    """summary + one audit page through one snapshot (one connection per request)."""
    servers = deps.servers()
    with deps.source() as src:
        data = summarize(src, servers)
        audit = src.audit_page(query)
    return render(data, audit)


def create_app(deps: PageDeps | None = None) -> FastAPI:
    app = FastAPI(title="barman-dr", description="Disaster recovery: backups, verification, PITR runs, drills, audit")
    deps = deps or PageDeps()

    @app.get("/", response_class=HTMLResponse)
    def page(request: Request, user: Any = Depends(get_user)) -> HTMLResponse:  # noqa: B008
        """Query parameters: server, action, outcome, incident_id, run_id, page, per_page (<= 200), until."""
        try:
            query = AuditQuery.parse(request.query_params.getlist)
        except FilterError as exc:
            return HTMLResponse(render_error(exc), status_code=400)
        return HTMLResponse(page_html(deps, query))

    @app.get("/api/summary")
    def api_summary(user: Any = Depends(get_user)) -> dict[str, Any]:  # noqa: B008
        servers = deps.servers()
        with deps.source() as src:
            return summarize(src, servers)

    @app.get("/api/audit")
    def api_audit(request: Request, user: Any = Depends(get_user)) -> JSONResponse:  # noqa: B008
        """The audit page as JSON: same parameters and validation as the HTML page."""
        try:
            query = AuditQuery.parse(request.query_params.getlist)
        except FilterError as exc:
            return JSONResponse({"detail": {"field": exc.field, "error": exc.message}}, status_code=400)
        with deps.source() as src:
            audit = src.audit_page(query)
        p = audit.page
        return JSONResponse({"rows": audit.rows, "page": p.number, "pages": p.pages, "per_page": p.per_page,
                             "total": p.total, "first_row": p.first_row, "last_row": p.last_row,
                             "until": audit.until, "links": audit.links()})

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(authorization: str | None = Header(None)) -> PlainTextResponse:
        """Prometheus scrapes this with the read-only bearer token of connection `dr_metrics` (not Airflow auth)."""
        from barman_dr.surfaces.metrics import gather, token_ok

        expected = metrics_token()
        if not expected:
            return PlainTextResponse("metrics disabled: create the Airflow connection dr_metrics (its password is the "
                                     "bearer token Prometheus sends)\n", status_code=503)
        if not token_ok(authorization, expected):
            return PlainTextResponse("unauthorized: send Authorization: Bearer <dr_metrics password>\n",
                                     status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return PlainTextResponse(gather(datetime.now(UTC)), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def metrics_token(conn_id: str = "dr_metrics") -> str | None:
    """The bearer token for /barman-dr/metrics: the password of an Airflow connection (None: not configured)."""
    try:
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id).password or None
    except Exception:  # noqa: BLE001 - an absent connection disables the endpoint
        return None
