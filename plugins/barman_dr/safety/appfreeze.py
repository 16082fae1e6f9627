"""Freeze and unfreeze the application around a PITR.

"Stop application writes" in the seed's runbook. With PgBouncer in front of the database
this is `PAUSE <db>`: PgBouncer waits for in-flight transactions (pool_mode=transaction),
then holds new queries in its queue; `RESUME <db>` releases them. Clients see a stall,
not an error. PAUSE can wait forever on a transaction that never ends, so the wait is
bounded: on timeout we RESUME (cancel the pause) and fail the freeze. Nothing
destructive has happened at that point; a DBA decides whether to kill the blocker.

The admin console only speaks the simple query protocol, so this uses psycopg2 directly
(the Postgres provider's hook uses psycopg 3's extended protocol) with the credentials
of the Airflow connection.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any

from barman_dr.exceptions import BarmanDrError
from barman_dr.inventory import AppFreeze


class FreezeError(BarmanDrError):
    """The application could not be frozen (or unfrozen)."""


@dataclass(frozen=True)
class FreezeState:
    database: str
    paused: bool
    target_host: str | None
    target_port: int | None


def _dsn_from_connection(conn_id: str) -> dict[str, Any]:
    from airflow.sdk import BaseHook

    c = BaseHook.get_connection(conn_id)
    return {"host": c.host, "port": c.port or 6432, "user": c.login, "password": c.password,
            "dbname": c.schema or "pgbouncer", "connect_timeout": 10, "application_name": "barman-dr"}


class PgBouncerAdmin:
    """The PgBouncer admin console of one pool."""

    def __init__(self, freeze: AppFreeze) -> None:
        if not freeze.conn_id or not freeze.database:
            raise FreezeError("app_freeze.method pgbouncer needs conn_id and database in the inventory")
        self.freeze = freeze

    def _connect(self) -> Any:
        import psycopg2

        try:
            conn = psycopg2.connect(**_dsn_from_connection(self.freeze.conn_id))
        except psycopg2.Error as exc:
            raise FreezeError(f"cannot reach the PgBouncer admin console ({self.freeze.conn_id}): "
                              f"{str(exc).strip().splitlines()[0]}") from exc
        conn.autocommit = True
        return conn

    def command(self, sql: str) -> list[tuple[Any, ...]]:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def state(self) -> FreezeState:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW DATABASES")
                cols = [d[0] for d in cur.description]
                for row in cur.fetchall():
                    r = dict(zip(cols, row, strict=False))
                    if r.get("name") == self.freeze.database:
                        return FreezeState(self.freeze.database, bool(int(r.get("paused") or 0)), r.get("host"),
                                           int(r["port"]) if r.get("port") else None)
        finally:
            conn.close()
        raise FreezeError(f"PgBouncer has no database {self.freeze.database!r} (SHOW DATABASES)")

    def pause(self) -> float:
        """PAUSE the pool; returns seconds waited. Idempotent. Bounded by app_freeze.timeout_seconds."""
        if self.state().paused:
            return 0.0
        db = self.freeze.database
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                self.command(f"PAUSE {db}")
            except Exception as exc:  # noqa: BLE001 - reported to the caller below
                result["error"] = exc

        start = time.monotonic()
        worker = threading.Thread(target=run, name="pgbouncer-pause", daemon=True)
        worker.start()
        worker.join(self.freeze.timeout_seconds)
        waited = round(time.monotonic() - start, 3)
        if worker.is_alive():
            # cancel the pending PAUSE so the application keeps running: fail safe, not frozen
            with contextlib.suppress(Exception):  # the error below is what matters
                self.command(f"RESUME {db}")
            raise FreezeError(
                f"PAUSE {db} did not complete within {self.freeze.timeout_seconds}s: a transaction is still open "
                "(SHOW SERVERS / pg_stat_activity shows which). The pause was cancelled (RESUME); the application "
                "was NOT frozen and nothing was stopped. End or kill the long transaction, then retry the task."
            )
        if "error" in result:
            exc = result["error"]
            if "already" not in str(exc).lower():
                raise FreezeError(f"PAUSE {db} failed: {exc}") from exc
        if not self.state().paused:
            raise FreezeError(f"PgBouncer reports {db} not paused after PAUSE")
        return waited

    def resume(self) -> None:
        """RESUME the pool. Idempotent."""
        if not self.state().paused:
            return
        try:
            self.command(f"RESUME {self.freeze.database}")
        except Exception as exc:
            if "not paused" not in str(exc).lower():
                raise FreezeError(f"RESUME {self.freeze.database} failed: {exc}") from exc
        if self.state().paused:
            raise FreezeError(f"PgBouncer still reports {self.freeze.database} paused after RESUME")

    def reload(self) -> None:
        self.command("RELOAD")


# Replace the `<db> = ...` line of the [databases] section, keeping a backup copy.
REPOINT_SCRIPT = r"""
set -eu
ini="$1"; db="$2"; line="$3"; stamp="$4"
cp -p -- "$ini" "$ini.pre-$stamp"
awk -v db="$db" -v line="$line" '
  /^\[/ { sec = $0 }
  sec == "[databases]" && $1 == db && $2 == "=" { print line; done = 1; next }
  { print }
  END { if (!done) exit 3 }
' "$ini.pre-$stamp" > "$ini.tmp"
chmod --reference="$ini" "$ini.tmp"
mv -- "$ini.tmp" "$ini"
echo "$ini.pre-$stamp"
"""
