"""The seed's disaster, played against the lab through PgBouncer (the application's path).

CP1: 10,000 orders (6,965 completed) -> CP2: 10,500 orders (7,465 completed) -> GOOD STATE
(the recovery target, taken from the database clock) -> the junior developer's
`DELETE FROM critical_orders WHERE status='completed'` (3,035 left).

A background `AppWriter` plays the application: it commits a heartbeat row through
PgBouncer every 200 ms and records errors and the longest stall, so a PITR can show
that the app was frozen (stalled, no errors) and writes again afterwards.

Used by the integration tests, `make demo` and the benchmarks. CLI:
    python include/lab/seed_scenario.py play      # prints the scenario facts as JSON
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg2

CP1_TOTAL, CP1_COMPLETED = 10_000, 6_965
CP2_TOTAL, CP2_COMPLETED = 10_500, 7_465
AFTER_DELETE = CP2_TOTAL - CP2_COMPLETED  # 3,035
HEARTBEAT_DDL = "CREATE TABLE IF NOT EXISTS app_heartbeat (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())"


def app_dsn() -> str:
    return os.environ["LAB_APP_DSN"]


def connect(dsn: str | None = None):
    conn = psycopg2.connect(dsn or app_dsn(), connect_timeout=10, application_name="seed-app")
    conn.autocommit = True
    return conn


def counts(dsn: str | None = None) -> dict[str, int]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*), count(*) FILTER (WHERE status = 'completed') FROM critical_orders")
        total, completed = cur.fetchone()
    return {"orders_total": int(total), "orders_completed": int(completed)}


@dataclass
class Scenario:
    cp1: dict[str, int]
    cp2: dict[str, int]
    good_state: str
    after_delete: dict[str, int]
    deleted_rows: int
    delete_xid: int
    timings: dict[str, float] = field(default_factory=dict)


#: orders the app may write after the DELETE (issue 14's salvage scenario): ids from here, the first quarter completed
AFTER_DELETE_FIRST_ID = CP2_TOTAL + 1


def play(dsn: str | None = None, settle: float = 1.0,
         before_delete: Callable[[Any], None] | None = None, orders_after_delete: int = 0) -> Scenario:
    """Play the seed's timeline. Deterministic counts; the GOOD STATE comes from the database clock.

    `before_delete(cursor)` runs (autocommit, on the scenario's connection) right before the
    DELETE's transaction begins: tests commit a good transaction there, in the same second
    as the DELETE, to prove a recovery keeps it. `orders_after_delete`: the app goes on
    writing new orders after the DELETE (a quarter of them completed), as it would until
    the freeze: good writes a PITR discards and dr_salvage puts back.
    """
    t0 = time.monotonic()
    conn = connect(dsn)
    cur = conn.cursor()
    cur.execute(HEARTBEAT_DDL)
    cur.execute("TRUNCATE critical_orders")
    # CP1: 10,000 orders, 6,965 completed
    cur.execute(
        "INSERT INTO critical_orders (order_id, customer_id, amount, status) "
        "SELECT i, 1 + i %% 997, round((10 + (i * 7919) %% 990)::numeric, 2), "
        "CASE WHEN i <= %s THEN 'completed' WHEN i %% 3 = 0 THEN 'shipped' ELSE 'pending' END "
        "FROM generate_series(1, %s) i", (CP1_COMPLETED, CP1_TOTAL))
    cp1 = _counts(cur)
    # CP2: 500 more, all completed
    cur.execute(
        "INSERT INTO critical_orders (order_id, customer_id, amount, status) "
        "SELECT i, 1 + i %% 997, 99.90, 'completed' FROM generate_series(%s, %s) i", (CP1_TOTAL + 1, CP2_TOTAL))
    cp2 = _counts(cur)
    time.sleep(settle / 2)
    cur.execute("SELECT now()")
    good_state = cur.fetchone()[0].isoformat()
    time.sleep(settle)
    if before_delete is not None:
        before_delete(cur)
    # the incident
    cur.execute("BEGIN")
    cur.execute("DELETE FROM critical_orders WHERE status = 'completed'")
    deleted = cur.rowcount
    cur.execute("SELECT pg_current_xact_id()::text")
    xid = int(cur.fetchone()[0])
    cur.execute("COMMIT")
    if orders_after_delete:
        first = AFTER_DELETE_FIRST_ID
        last = first + orders_after_delete - 1
        cur.execute(
            "INSERT INTO critical_orders (order_id, customer_id, amount, status) "
            "SELECT i, 1 + i %% 997, 42.00, CASE WHEN i < %s THEN 'completed' ELSE 'pending' END "
            "FROM generate_series(%s, %s) i", (first + orders_after_delete // 4, first, last))
    after = _counts(cur)
    conn.close()
    return Scenario(cp1, cp2, good_state, after, deleted, xid, {"play_s": round(time.monotonic() - t0, 3)})


def _counts(cur) -> dict[str, int]:
    cur.execute("SELECT count(*), count(*) FILTER (WHERE status = 'completed') FROM critical_orders")
    total, completed = cur.fetchone()
    return {"orders_total": int(total), "orders_completed": int(completed)}


class AppWriter(threading.Thread):
    """The application: one heartbeat commit through PgBouncer every `interval` seconds."""

    def __init__(self, dsn: str | None = None, interval: float = 0.2) -> None:
        super().__init__(name="app-writer", daemon=True)
        self.dsn = dsn or app_dsn()
        self.interval = interval
        self.stop_event = threading.Event()
        self.ok = 0
        self.errors: list[str] = []
        self.longest_stall_s = 0.0
        self.last_ok_at: float | None = None

    def start(self) -> None:
        """Create the heartbeat table first (a fresh lab has none), then start writing."""
        with connect(self.dsn) as conn, conn.cursor() as cur:
            cur.execute(HEARTBEAT_DDL)
        super().start()

    def run(self) -> None:
        conn = None
        while not self.stop_event.is_set():
            t = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = connect(self.dsn)
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO app_heartbeat DEFAULT VALUES")
                self.ok += 1
                self.longest_stall_s = max(self.longest_stall_s, time.monotonic() - t)
                self.last_ok_at = time.time()
            except psycopg2.Error as exc:
                self.errors.append(f"{time.strftime('%H:%M:%S')} {str(exc).strip().splitlines()[0]}")
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.5)
            self.stop_event.wait(self.interval)
        if conn is not None:
            conn.close()

    def stop(self) -> dict[str, object]:
        self.stop_event.set()
        self.join(30)
        return {"commits": self.ok, "errors": len(self.errors), "first_errors": self.errors[:5],
                "longest_stall_s": round(self.longest_stall_s, 3)}


if __name__ == "__main__":
    if sys.argv[1:] == ["play"]:
        print(json.dumps(asdict(play()), indent=2))
    elif sys.argv[1:] == ["counts"]:
        print(json.dumps(counts()))
    else:
        raise SystemExit("usage: seed_scenario.py play|counts")
