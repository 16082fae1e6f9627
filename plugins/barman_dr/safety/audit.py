"""The audit trail: an append-only record of everything barman-dr does.

Events go to `audit.events` in the `dr_audit` database (schema: include/sql/audit_schema.sql),
which lives on the ops cluster, never on a server we might restore. The database enforces
append-only (triggers reject UPDATE, DELETE and TRUNCATE; the writer role has INSERT and
SELECT only). Operators call `AuditTrail.record`; the plugin's listener records task
failures even when an operator crashed before it could write.

Secrets never reach the table: argv and details pass through `redact` first.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from barman_dr.exceptions import AuditUnavailableError

OUTCOMES = ("started", "ok", "failed", "refused", "planned", "info", "warning", "critical")
_SECRET_KEY_RE = re.compile(r"(pass(word|wd)?|secret|token|api[_-]?key|private[_-]?key|credential)", re.I)
_SECRET_PATTERNS = (
    (re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.I), r"\1***"),
    (re.compile(r"(PGPASSWORD=)\S+"), r"\1***"),
    (re.compile(r"(://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),
    (re.compile(r"(\"password\"\s*:\s*)\"[^\"]*\""), r'\1"***"'),
)


def redact(value: Any, extra_secrets: Sequence[str] = ()) -> Any:
    """Return a copy of value with passwords, tokens and known secret strings masked."""
    if isinstance(value, str):
        out = value
        for pattern, repl in _SECRET_PATTERNS:
            out = pattern.sub(repl, out)
        for s in extra_secrets:
            if s and len(s) >= 6:
                out = out.replace(s, "***")
        return out
    if isinstance(value, Mapping):
        return {k: ("***" if _SECRET_KEY_RE.search(str(k)) and v not in (None, "") else redact(v, extra_secrets))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, extra_secrets) for v in value]
    return value


@dataclass
class AuditContext:
    """Who and what an event belongs to (filled from the Airflow task context)."""

    dag_id: str | None = None
    run_id: str | None = None
    task_id: str | None = None
    try_number: int | None = None
    triggered_by: str | None = None
    incident_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_airflow(cls, context: Mapping[str, Any] | None, incident_id: str | None = None) -> AuditContext:
        if not context:
            return cls(incident_id=incident_id)
        ti = context.get("ti") or context.get("task_instance")
        dag_run = context.get("dag_run")
        who = None
        if dag_run is not None:
            who = (getattr(dag_run, "triggering_user_name", None)
                   or str(getattr(dag_run, "triggered_by", "") or "")
                   or str(getattr(dag_run, "run_type", "") or "")) or None
        conf = (getattr(dag_run, "conf", None) or {}) if dag_run is not None else {}
        return cls(
            dag_id=getattr(ti, "dag_id", None),
            run_id=getattr(ti, "run_id", None) or (getattr(dag_run, "run_id", None)),
            task_id=getattr(ti, "task_id", None),
            try_number=getattr(ti, "try_number", None),
            triggered_by=who,
            incident_id=incident_id or (conf.get("incident_id") if isinstance(conf, Mapping) else None) or None,
        )


class AuditTrail:
    """Append events to the audit table through the Postgres provider's hook."""

    def __init__(self, *, postgres_conn_id: str = "dr_audit", context: AuditContext | None = None) -> None:
        self.postgres_conn_id = postgres_conn_id
        self.context = context or AuditContext()

    @cached_property
    def hook(self) -> Any:
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        # log_sql=False: the hook would otherwise log every statement with its parameters
        return PostgresHook(postgres_conn_id=self.postgres_conn_id, log_sql=False)

    def _connect(self) -> Any:
        try:
            return self.hook.get_conn()
        except Exception as exc:  # any driver or connection-lookup failure
            raise AuditUnavailableError(
                f"the audit database (connection {self.postgres_conn_id!r}) is unavailable: "
                f"{redact(str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}. "
                "No destructive DR step runs unaudited: bring the ops database back, then clear the task."
            ) from exc

    def ping(self) -> None:
        """Prove we can write: raises AuditUnavailableError otherwise."""
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT has_table_privilege('audit.events', 'INSERT')")
                row = cur.fetchone()
                if not row or not row[0]:
                    raise AuditUnavailableError("the audit role cannot INSERT into audit.events")
        finally:
            conn.close()

    def record(self, action: str, outcome: str, *, server: str | None = None, target: str | None = None,
               argv: Sequence[str] | None = None, exit_code: int | None = None, duration_s: float | None = None,
               details: Mapping[str, Any] | None = None, context: AuditContext | None = None) -> int:
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, not {outcome!r}")
        ctx = context or self.context
        row = (
            ctx.dag_id, ctx.run_id, ctx.task_id, ctx.try_number, ctx.triggered_by, server, action,
            redact(target) if target else None,
            json.dumps(redact(list(argv))) if argv is not None else None,
            exit_code, duration_s, outcome, ctx.incident_id,
            json.dumps(redact({**ctx.extra, **(details or {})}), default=str),
        )
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO audit.events (dag_id, run_id, task_id, try_number, triggered_by, server, action,"
                    " target, argv, exit_code, duration_s, outcome, incident_id, details)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s::jsonb) RETURNING event_id",
                    row,
                )
                event_id = int(cur.fetchone()[0])
            conn.commit()
            return event_id
        except AuditUnavailableError:
            raise
        except Exception as exc:
            raise AuditUnavailableError(f"writing the audit event {action!r} failed: {redact(str(exc))}") from exc
        finally:
            conn.close()

    def record_many(self, events: Sequence[Mapping[str, Any]]) -> list[int]:
        """Several events in one transaction (keys: action, outcome, and `record`'s keyword arguments).

        A fleet check writes one report per server: one connection for all of them instead of
        one each. All or nothing, like a single `record`.
        """
        ctx = self.context
        rows = []
        for e in events:
            if e["outcome"] not in OUTCOMES:
                raise ValueError(f"outcome must be one of {OUTCOMES}, not {e['outcome']!r}")
            argv = e.get("argv")
            rows.append((ctx.dag_id, ctx.run_id, ctx.task_id, ctx.try_number, ctx.triggered_by, e.get("server"),
                         e["action"], redact(e["target"]) if e.get("target") else None,
                         json.dumps(redact(list(argv))) if argv is not None else None, e.get("exit_code"),
                         e.get("duration_s"), e["outcome"], ctx.incident_id,
                         json.dumps(redact({**ctx.extra, **(e.get("details") or {})}), default=str)))
        if not rows:
            return []
        conn = self._connect()
        try:
            ids = []
            with conn.cursor() as cur:
                for row in rows:
                    cur.execute(
                        "INSERT INTO audit.events (dag_id, run_id, task_id, try_number, triggered_by, server, action,"
                        " target, argv, exit_code, duration_s, outcome, incident_id, details)"
                        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s, %s, %s, %s, %s::jsonb)"
                        " RETURNING event_id", row)
                    ids.append(int(cur.fetchone()[0]))
            conn.commit()
            return ids
        except AuditUnavailableError:
            raise
        except Exception as exc:
            raise AuditUnavailableError(f"writing {len(rows)} audit events failed: {redact(str(exc))}") from exc
        finally:
            conn.close()

    def events_per_server(self, servers: Sequence[str], actions: Mapping[str, int]) -> dict[str, list[dict[str, Any]]]:
        """{server: its newest events of each action (at most `actions[action]` each), newest first}: one query.

        What `events(server=..., action=..., limit=...)` returns per server and action, for a whole
        fleet at once.
        """
        out: dict[str, list[dict[str, Any]]] = {s: [] for s in servers}
        if not servers or not actions:
            return out
        names = list(actions)
        limits = [int(actions[a]) for a in names]
        sql = ("SELECT event_id, event_time, dag_id, run_id, task_id, try_number, triggered_by, server, action,"
               " target, argv, exit_code, duration_s, outcome, incident_id, details FROM ("
               " SELECT e.*, row_number() OVER (PARTITION BY e.server, e.action ORDER BY e.event_id DESC) AS n"
               " FROM audit.events e WHERE e.server = ANY(%s) AND e.action = ANY(%s)) x"
               " JOIN unnest(%s::text[], %s::int[]) AS l(action, lim) USING (action)"
               " WHERE x.n <= l.lim ORDER BY event_id DESC")
        for r in self._select_events(sql, (list(servers), names, names, limits)):
            out.setdefault(r["server"], []).append(r)
        return out

    def events(self, *, server: str | None = None, run_id: str | None = None, dag_id: str | None = None,
               incident_id: str | None = None, action: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        where, params = [], []
        for col, val in (("server", server), ("run_id", run_id), ("dag_id", dag_id), ("incident_id", incident_id),
                         ("action", action)):
            if val is not None:
                where.append(f"{col} = %s")
                params.append(val)
        sql = ("SELECT event_id, event_time, dag_id, run_id, task_id, try_number, triggered_by, server, action, target,"
               " argv, exit_code, duration_s, outcome, incident_id, details FROM audit.events"
               + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY event_id DESC LIMIT %s")
        params.append(int(limit))
        return self._select_events(sql, params)

    def _select_events(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        """Rows of audit.events as dicts: the time as ISO 8601, argv and details decoded from JSON."""
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                cols = [d[0] for d in cur.description]
                rows = [dict(zip(cols, r, strict=False)) for r in cur.fetchall()]
        finally:
            conn.close()
        for r in rows:
            r["event_time"] = r["event_time"].isoformat()
            for k in ("argv", "details"):
                if isinstance(r[k], str):
                    r[k] = json.loads(r[k])
        return rows
