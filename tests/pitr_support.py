"""Shared helpers of the PITR integration and e2e tests: run a DAG in-process, query the lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg2


def sql(dsn_env: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = psycopg2.connect(os.environ[dsn_env], connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(query, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def one(dsn_env: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    return sql(dsn_env, query, params)[0][0]


def barman_json(*args: str) -> dict:
    """The lab's Barman, `-f json`."""
    out = subprocess.run([*os.environ["LAB_BARMAN"].split(), "-f", "json", *args], capture_output=True, text=True,
                         check=False, timeout=120).stdout
    return json.loads(out)


def failback() -> None:
    """`labctl failback`: pg-primary serving the recovered data again after a PITR onto a standby."""
    labctl = Path(__file__).resolve().parents[1] / "include" / "lab" / "labctl.py"
    r = subprocess.run([sys.executable, str(labctl), "failback"], capture_output=True, text=True, check=False,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def primary_timeline() -> int:
    return int(one("LAB_PRIMARY_DSN", "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"), 16)


def counts(dsn_env: str = "LAB_PRIMARY_DSN") -> dict[str, int]:
    total, completed = sql(dsn_env, "SELECT count(*), count(*) FILTER (WHERE status = 'completed') "
                                    "FROM critical_orders")[0]
    return {"orders_total": total, "orders_completed": completed}


def pgbouncer_paused(database: str = "shop") -> bool:
    """Ask PgBouncer's admin console (simple protocol) whether the pool is paused."""
    from airflow.sdk import BaseHook

    c = BaseHook.get_connection("pgbouncer_admin")
    conn = psycopg2.connect(host=c.host, port=c.port, user=c.login, password=c.password, dbname="pgbouncer")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW DATABASES")
            cols = [d[0] for d in cur.description]
            for row in cur.fetchall():
                r = dict(zip(cols, row, strict=False))
                if r["name"] == database:
                    return bool(int(r["paused"]))
    finally:
        conn.close()
    raise AssertionError(f"pgbouncer has no database {database}")


def audit(run_id: str) -> list[dict[str, Any]]:
    rows = sql("LAB_AUDIT_DSN", "SELECT action, outcome, task_id, details::text, incident_id FROM audit.events "
                                "WHERE run_id = %s ORDER BY event_id", (run_id,))
    return [{"action": a, "outcome": o, "task_id": t, "details": d, "incident_id": i} for a, o, t, d, i in rows]


def dagbag() -> Any:
    """A fresh DagBag per run: `dag.test` merges run_conf into the in-process DAG's params."""
    from airflow.dag_processing.dagbag import DagBag

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return DagBag(os.path.join(repo, "dags"))


def pause(dag_id: str) -> None:
    """Keep the lab's real scheduler away from an in-process `dag.test` run.

    An unpaused DAG's runs are also picked up by the running scheduler: both then update
    the same dag_run row (seen as a PostgreSQL deadlock in the metadata DB).
    """
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(DagModel).filter(DagModel.dag_id == dag_id).update({"is_paused": True})


def run_dag(dag_id: str, conf: dict[str, Any], before: dict[str, Any] | None = None,
            patch: dict[str, dict[str, Any]] | None = None) -> tuple[str, str, dict[str, str]]:
    """Run a DAG in-process with `dag.test` (retries honoured). Returns (state, run_id, task states).

    `before` maps task ids to callables run just before that task's every try (Airflow's
    `pre_execute` hook, called with the context): the fault suites inject real faults there,
    at an exact point of the run. `patch` sets attributes on a task's operator (e.g. an
    `upstream` that hands it a tampered XCom): how a test forces a mismatch the lab cannot
    produce on its own.
    """
    dag = dagbag().dags[dag_id]
    if "approve" in dag.task_dict and not conf.get("confirm") and "plan_only" not in conf:
        # an unconfirmed run waits for a second person, which an in-process run cannot be: a preview
        # (the approval flow itself runs through the scheduler: tests/e2e/test_approval.py)
        conf = {**conf, "plan_only": True}
    # Airflow 3.3.2's dag.test() cannot finish a successful run of a DAG with DeadlineAlerts (update_state looks the
    # in-process alerts up by id and gets dicts: "can't adapt type 'dict'"): in-process runs go without them
    # (the RTO deadline alert is tested through the scheduler, tests/e2e/test_approval.py)
    dag.deadline = None
    for task_id, hook in (before or {}).items():
        dag.get_task(task_id)._pre_execute_hook = hook
    for task_id, attrs in (patch or {}).items():
        for name, value in attrs.items():
            setattr(dag.get_task(task_id), name, value)
    pause(dag_id)
    dr = dag.test(run_conf=conf)
    states = {}
    for ti in dr.get_task_instances():
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        states[key] = str(getattr(ti.state, "value", ti.state))
    return str(getattr(dr.state, "value", dr.state)), dr.run_id, states


def xcom(dag_id: str, run_id: str, task_id: str) -> Any:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.query(XComModel).filter_by(dag_id=dag_id, run_id=run_id, task_id=task_id,
                                                 key="return_value").first()
        if row is None:
            return None
        value = row.value
    import json

    return json.loads(value) if isinstance(value, str) else value


def wait_for_approval_request(api: Any, dag_id: str, run_id: str, timeout: float = 600) -> dict[str, Any]:
    """The run's unanswered approval request, once its plan is made and the approve step waits."""
    import time

    from barman_dr.surfaces.api_client import pending_approvals

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        waiting = pending_approvals(api, dag_id, run_id)
        if waiting:
            return waiting[0]
        state = api.get_run(dag_id, run_id)["state"]
        assert state in ("queued", "running"), f"the run ended ({state}) before asking for approval"
        time.sleep(2)
    raise AssertionError(f"{run_id}: no approval request within {timeout}s")


def stop_wal_stream(server: str, timeout: float = 60) -> None:
    """Pause the lab's `barman cron` loop and stop `receive-wal` for `server`, and make sure it stays stopped.

    A `barman cron` already running when the pause file appears restarts receive-wal after a
    plain `--stop` (seen once in CI): wait for that cron to end, then stop, then confirm.
    """
    import re
    import subprocess
    import time
    from pathlib import Path

    Path(os.environ["LAB_DIR"], "run", "barman-cron.paused").touch()
    barman = os.environ["LAB_BARMAN"].split()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = rf"bin/barman -c {re.escape(os.environ['LAB_DIR'])}/[^ ]*barman\.conf cron"  # this lab's only
        crons = subprocess.run(["pgrep", "-f", mine], check=False, capture_output=True, text=True).stdout
        if not crons.strip():
            subprocess.run([*barman, "receive-wal", "--stop", server], check=False, capture_output=True)
            time.sleep(1)
            procs = subprocess.run([*barman, "list-processes", server], check=False, capture_output=True, text=True).stdout
            if "receive-wal" not in procs:
                return
        time.sleep(1)
    raise AssertionError(f"receive-wal of {server} would not stay stopped within {timeout}s")
