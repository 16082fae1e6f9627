"""Which DR run owns a server right now: the rule every "ensure PostgreSQL runs" automation must follow.

A DR run stops PostgreSQL, moves its data directory aside and restores into its place.
Between those steps the server looks broken: no `data` directory, a stopped postmaster, a
paused PgBouncer. Automation that "repairs" it (the lab's `make lab-up`, a config
management run, a systemd restart policy, a monitoring auto-heal) would initialise an
empty cluster or start a half-restored one while the real data sits moved aside: the app
would serve nothing, and nothing would say so.

A server is owned by a DR run while

* the run holds its lock (`control.server_locks`: taken at validation, released at the
  run's end, kept when Airflow itself crashes mid-run), or
* a run froze its application and no later event resumed it (`freeze_app` ok, and no
  later `unfreeze_app` ok or `rollback` ok in the audit trail): a run that failed inside
  the downtime window releases its lock but leaves the app frozen and the data aside for
  the DBA, and the server stays theirs until the app is resumed (by the run, a rollback,
  or by hand: callers that can see PgBouncer treat a pool that is serving again as resumed).

Both facts live on the ops database, which no PITR rewinds. `OWNER_SQL` is the one query;
the library (`owner_of`), the CLI (`barman-dr owner <server>`, exit 3 when owned) and the
lab's own tooling (labctl, through psql) all run it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: $1 = the server. One row per reason the server is owned (none: free to manage).
OWNER_SQL = """
SELECT 'lock' AS reason, l.dag_id, l.run_id, l.purpose AS detail, l.acquired_at AS since
  FROM control.server_locks l WHERE l.server = %(server)s
UNION ALL
SELECT 'app_frozen', f.dag_id, f.run_id, 'the app was frozen by this run and not resumed since', f.event_time
  FROM (SELECT dag_id, run_id, event_time FROM audit.events
         WHERE server = %(server)s AND action = 'freeze_app' AND outcome = 'ok'
         ORDER BY event_time DESC LIMIT 1) f
 WHERE NOT EXISTS (SELECT 1 FROM audit.events u
                    WHERE u.server = %(server)s AND u.event_time > f.event_time AND u.outcome = 'ok'
                      AND u.action IN ('unfreeze_app', 'rollback'))
"""


@dataclass(frozen=True)
class Owner:
    """One reason a server is owned by a DR run."""

    server: str
    reason: str  # "lock" | "app_frozen"
    dag_id: str
    run_id: str
    detail: str
    since: str

    def describe(self) -> str:
        what = "holds its lock" if self.reason == "lock" else "froze its app and has not resumed it"
        return f"{self.dag_id} run {self.run_id!r} {what} (since {self.since}; {self.detail})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def owners_from_rows(server: str, rows: list[tuple[Any, ...]]) -> list[Owner]:
    out = []
    for reason, dag_id, run_id, detail, since in rows:
        stamp = since.isoformat() if hasattr(since, "isoformat") else str(since)
        out.append(Owner(server, str(reason), str(dag_id), str(run_id), str(detail), stamp))
    return out


def owner_of(server: str, *, postgres_conn_id: str = "dr_audit") -> list[Owner]:
    """The DR runs that own `server` now (empty: nobody; automation may manage it)."""
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    conn = PostgresHook(postgres_conn_id=postgres_conn_id, log_sql=False).get_conn()
    try:
        with conn.cursor() as cur:
            cur.execute(OWNER_SQL, {"server": server})
            rows = cur.fetchall()
    finally:
        conn.close()
    return owners_from_rows(server, rows)
