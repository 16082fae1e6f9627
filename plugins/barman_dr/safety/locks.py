"""One DR run per server at a time, across DAGs and workers.

`max_active_runs=1` would serialise PITRs of *different* servers and says nothing about a
drill and a PITR of the same server. The lock is a row in `control.server_locks` on the
ops database (the same database as the audit trail, which survives any PITR): taking it
is one atomic INSERT ... ON CONFLICT DO NOTHING, so two runs triggered at the same
instant cannot both win. It is re-entrant for the run that holds it (a retried task
keeps its lock).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

from barman_dr.exceptions import AuditUnavailableError, BarmanDrError


class ServerLockedError(BarmanDrError):
    """Another DR run holds the server's lock."""


@dataclass(frozen=True)
class LockHolder:
    server: str
    dag_id: str
    run_id: str
    purpose: str
    acquired_at: str


class ServerLock:
    def __init__(self, *, postgres_conn_id: str = "dr_audit") -> None:
        self.postgres_conn_id = postgres_conn_id

    @cached_property
    def hook(self) -> Any:
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        return PostgresHook(postgres_conn_id=self.postgres_conn_id, log_sql=False)

    def _conn(self) -> Any:
        try:
            return self.hook.get_conn()
        except Exception as exc:
            raise AuditUnavailableError(f"the ops database (connection {self.postgres_conn_id!r}) is unavailable: "
                                        f"{type(exc).__name__}; refusing to start a DR run without its lock") from exc

    def holder(self, server: str) -> LockHolder | None:
        conn = self._conn()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT server, dag_id, run_id, purpose, acquired_at FROM control.server_locks"
                            " WHERE server = %s", (server,))
                row = cur.fetchone()
        finally:
            conn.close()
        return LockHolder(row[0], row[1], row[2], row[3], row[4].isoformat()) if row else None

    def holders(self, servers: list[str]) -> dict[str, LockHolder]:
        """The holder of each locked server among `servers`, in one query (a fleet check reads 50 at once)."""
        conn = self._conn()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT server, dag_id, run_id, purpose, acquired_at FROM control.server_locks"
                            " WHERE server = ANY(%s)", (list(servers),))
                rows = cur.fetchall()
        finally:
            conn.close()
        return {r[0]: LockHolder(r[0], r[1], r[2], r[3], r[4].isoformat()) for r in rows}

    def acquire(self, server: str, *, dag_id: str, run_id: str, purpose: str) -> LockHolder:
        conn = self._conn()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO control.server_locks (server, dag_id, run_id, purpose) VALUES (%s, %s, %s, %s)"
                    " ON CONFLICT (server) DO NOTHING", (server, dag_id, run_id, purpose))
                cur.execute("SELECT server, dag_id, run_id, purpose, acquired_at FROM control.server_locks"
                            " WHERE server = %s", (server,))
                row = cur.fetchone()
            conn.commit()
        finally:
            conn.close()
        holder = LockHolder(row[0], row[1], row[2], row[3], row[4].isoformat())
        if (holder.dag_id, holder.run_id) != (dag_id, run_id):
            raise ServerLockedError(
                f"server {server!r} is locked by {holder.dag_id} run {holder.run_id!r} ({holder.purpose}, since "
                f"{holder.acquired_at}): refused, nothing was touched. Wait for that run to finish. If it is no longer "
                f"running (crashed scheduler), release the lock with the dr_release_lock DAG (server={server})."
            )
        return holder

    def release(self, server: str, *, dag_id: str, run_id: str, force: bool = False) -> bool:
        conn = self._conn()
        try:
            with conn.cursor() as cur:
                if force:
                    cur.execute("DELETE FROM control.server_locks WHERE server = %s", (server,))
                else:
                    cur.execute("DELETE FROM control.server_locks WHERE server = %s AND dag_id = %s AND run_id = %s",
                                (server, dag_id, run_id))
                released = cur.rowcount > 0
            conn.commit()
        finally:
            conn.close()
        return released
