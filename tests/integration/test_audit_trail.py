"""AuditTrail and ServerLock against the lab's ops database (dr_audit), no mocks."""

from __future__ import annotations

import os
import shutil
import subprocess

import psycopg2
import pytest

from barman_dr.exceptions import AuditUnavailableError
from barman_dr.safety.audit import AuditContext, AuditTrail
from barman_dr.safety.locks import ServerLock, ServerLockedError

pytestmark = pytest.mark.integration

AUDIT_CONN_ID = "dr_audit"


@pytest.fixture
def ctx(unique) -> AuditContext:
    return AuditContext(dag_id="dr_integration_test", run_id=f"test__{unique}", task_id="audit_roundtrip",
                        try_number=1, triggered_by="pytest", incident_id=f"INC-{unique[-8:]}")


@pytest.fixture
def trail(ctx) -> AuditTrail:
    return AuditTrail(postgres_conn_id=AUDIT_CONN_ID, context=ctx)


@pytest.fixture
def writer_conn():
    conn = psycopg2.connect(os.environ["LAB_AUDIT_DSN"], connect_timeout=10)
    yield conn
    conn.close()


def test_ping(trail):
    trail.ping()


def test_record_and_read_back(trail, ctx):
    first = trail.record("integration_test", "started", server="pg-primary", target="xid 745 (inclusive)")
    second = trail.record(
        "integration_test", "ok", server="pg-primary", target="xid 745 (inclusive)",
        argv=["barman", "restore", "--remote-ssh-command", "ssh postgres@pg-standby", "pg-primary", "latest", "/d"],
        exit_code=0, duration_s=1.25, details={"backup_id": "20261125T133925", "n": 3, "nested": {"ok": True}},
    )
    assert second > first
    events = trail.events(run_id=ctx.run_id)
    assert [e["event_id"] for e in events] == [second, first]  # newest first
    e = events[0]
    assert e["dag_id"] == ctx.dag_id and e["task_id"] == ctx.task_id and e["try_number"] == 1
    assert e["triggered_by"] == "pytest" and e["incident_id"] == ctx.incident_id
    assert e["server"] == "pg-primary" and e["action"] == "integration_test" and e["outcome"] == "ok"
    assert e["target"] == "xid 745 (inclusive)"
    assert e["argv"][:2] == ["barman", "restore"] and e["argv"][-1] == "/d"
    assert e["exit_code"] == 0 and e["duration_s"] == pytest.approx(1.25)
    assert e["details"] == {"backup_id": "20261125T133925", "n": 3, "nested": {"ok": True}}
    assert e["event_time"] >= events[1]["event_time"]
    # filters combine
    assert [x["event_id"] for x in trail.events(incident_id=ctx.incident_id, action="integration_test",
                                                 dag_id=ctx.dag_id, limit=1)] == [second]


def test_secrets_are_redacted(trail, ctx):
    secret = "S3cr3t-Pa55-" + ctx.run_id[-8:]
    trail.record(
        "integration_secret", "failed", server="pg-primary",
        target=f"postgresql://dr_admin:{secret}@127.0.0.1/shop",
        argv=["psql", f"host=127.0.0.1 user=dr_admin password={secret}", "-c", "select 1"],
        details={"password": secret, "token": secret, "error": f"connection failed: password={secret}",
                 "dsn": f"postgresql://u:{secret}@h/db"},
    )
    [e] = trail.events(run_id=ctx.run_id, action="integration_secret")
    assert secret not in repr(e)
    assert e["details"]["password"] == "***" and e["details"]["token"] == "***"
    assert "password=***" in e["argv"][1]
    assert e["target"] == "postgresql://dr_admin:***@127.0.0.1/shop"


def test_unknown_outcome_is_rejected_before_writing(trail, ctx):
    with pytest.raises(ValueError):
        trail.record("integration_test", "done")
    assert trail.events(run_id=ctx.run_id) == []


@pytest.mark.parametrize("sql", [
    "UPDATE audit.events SET outcome = 'ok' WHERE event_id = %s",
    "DELETE FROM audit.events WHERE event_id = %s",
    "TRUNCATE audit.events",
])
def test_writer_cannot_change_history(trail, writer_conn, sql):
    event_id = trail.record("integration_append_only", "info", details={"probe": sql.split()[0]})
    with writer_conn.cursor() as cur, pytest.raises(psycopg2.Error) as ei:
        cur.execute(sql, (event_id,) if "%s" in sql else None)
    writer_conn.rollback()
    assert ei.value.pgcode == "42501"  # insufficient_privilege
    with writer_conn.cursor() as cur:
        cur.execute("SELECT outcome FROM audit.events WHERE event_id = %s", (event_id,))
        assert cur.fetchone() == ("info",)


def _superuser_psql(sql: str) -> subprocess.CompletedProcess:
    lab = os.environ["LAB_DIR"]
    return subprocess.run(["runuser", "-u", "postgres", "--", "/usr/lib/postgresql/15/bin/psql", "-X", "-q", "-At",
                           "-v", "ON_ERROR_STOP=1", "-h", f"{lab}/run/ops", "-p", "5432", "-d", "dr_audit", "-c", sql],
                          check=False, capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="needs root to act as postgres")
@pytest.mark.parametrize("sql", ["UPDATE audit.events SET outcome = 'ok' WHERE event_id = {id}",
                                 "DELETE FROM audit.events WHERE event_id = {id}",
                                 "TRUNCATE audit.events"])
def test_even_a_superuser_cannot_change_history(trail, sql):
    """Not only grants: the table's triggers reject UPDATE/DELETE/TRUNCATE for every role."""
    event_id = trail.record("integration_append_only", "info", details={"probe": "superuser"})
    proc = _superuser_psql(sql.format(id=event_id))
    assert proc.returncode != 0
    assert "append-only" in proc.stderr
    assert _superuser_psql(f"SELECT count(*) FROM audit.events WHERE event_id = {event_id}").stdout.strip() == "1"


def test_writer_cannot_alter_the_schema(writer_conn):
    with writer_conn.cursor() as cur, pytest.raises(psycopg2.Error):
        cur.execute("DROP TRIGGER events_no_update_delete ON audit.events")
    writer_conn.rollback()


def test_unavailable_audit_db_raises(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DR_AUDIT_DOWN",
                       '{"conn_type":"postgres","host":"127.0.0.1","port":9,"login":"x","password":"pw-not-shown",'
                       '"schema":"dr_audit","extra":{"connect_timeout":3}}')
    trail = AuditTrail(postgres_conn_id="dr_audit_down")
    with pytest.raises(AuditUnavailableError) as ei:
        trail.record("integration_test", "info")
    assert "pw-not-shown" not in str(ei.value)
    with pytest.raises(AuditUnavailableError):
        trail.ping()


# ----------------------------------------------------------------------- locks


@pytest.fixture
def lock_server(unique):
    name = f"test-lock-{unique}"
    yield name
    ServerLock(postgres_conn_id=AUDIT_CONN_ID).release(name, dag_id="", run_id="", force=True)


def test_server_lock(lock_server):
    lock = ServerLock(postgres_conn_id=AUDIT_CONN_ID)
    assert lock.holder(lock_server) is None
    held = lock.acquire(lock_server, dag_id="dr_pitr", run_id="run-a", purpose="pitr")
    assert (held.server, held.dag_id, held.run_id, held.purpose) == (lock_server, "dr_pitr", "run-a", "pitr")
    # re-entrant for the run that holds it (a retried task keeps its lock)
    again = lock.acquire(lock_server, dag_id="dr_pitr", run_id="run-a", purpose="pitr")
    assert again.acquired_at == held.acquired_at
    # another run of any DAG is refused, and told who holds it
    with pytest.raises(ServerLockedError) as ei:
        lock.acquire(lock_server, dag_id="dr_pitr", run_id="run-b", purpose="pitr")
    assert "run-a" in str(ei.value) and "dr_release_lock" in str(ei.value)
    with pytest.raises(ServerLockedError):
        lock.acquire(lock_server, dag_id="dr_drill", run_id="run-a", purpose="drill")
    assert lock.holder(lock_server).run_id == "run-a"
    # only the holder releases it
    assert lock.release(lock_server, dag_id="dr_pitr", run_id="run-b") is False
    assert lock.release(lock_server, dag_id="dr_pitr", run_id="run-a") is True
    assert lock.holder(lock_server) is None
    assert lock.release(lock_server, dag_id="dr_pitr", run_id="run-a") is False
    # then the other run may take it
    assert lock.acquire(lock_server, dag_id="dr_pitr", run_id="run-b", purpose="pitr").run_id == "run-b"


def test_server_lock_concurrent_acquire(lock_server):
    """Two runs at the same instant: exactly one wins."""
    from concurrent.futures import ThreadPoolExecutor

    def take(run_id: str) -> str:
        try:
            ServerLock(postgres_conn_id=AUDIT_CONN_ID).acquire(lock_server, dag_id="dr_pitr", run_id=run_id,
                                                               purpose="pitr")
            return "won"
        except ServerLockedError:
            return "refused"

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(take, [f"run-{i}" for i in range(6)]))
    assert results.count("won") == 1, results


def test_server_lock_force_release(lock_server):
    lock = ServerLock(postgres_conn_id=AUDIT_CONN_ID)
    lock.acquire(lock_server, dag_id="dr_pitr", run_id="crashed-run", purpose="pitr")
    assert lock.release(lock_server, dag_id="dr_release_lock", run_id="admin", force=True) is True
    assert lock.holder(lock_server) is None
