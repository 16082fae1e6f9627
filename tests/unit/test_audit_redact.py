"""audit.redact: no secret reaches the audit table; AuditContext from an Airflow context."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from barman_dr.safety.audit import OUTCOMES, AuditContext, AuditTrail, redact


@pytest.mark.parametrize(("text", "secret"), [
    ("host=127.0.20.11 port=5432 dbname=shop user=dr_admin password=s3cr3t-Value", "s3cr3t-Value"),
    ("host=h password = 's3cr3t value' user=x", "s3cr3t value"),
    ("PASSWORD=Hunter2xx", "Hunter2xx"),
    ("env PGPASSWORD=topsecret psql -h x", "topsecret"),
    ("postgresql+psycopg2://airflow:pa55word@127.0.20.1:5432/airflow", "pa55word"),
    ("https://user:tok3n-abc@example.com/path", "tok3n-abc"),
    ('{"login": "x", "password": "pw-in-json"}', "pw-in-json"),
])
def test_redact_strings(text, secret):
    out = redact(text)
    assert secret not in out
    assert "***" in out


def test_redact_keeps_harmless_text():
    text = "barman -f json show-backup pg-primary 20261125T133925"
    assert redact(text) == text
    assert redact("postgresql://host:5432/db") == "postgresql://host:5432/db"  # no credentials: untouched


def test_redact_conninfo_keeps_the_rest():
    out = redact("host=127.0.20.11 port=5432 dbname=shop user=dr_admin password=abc123")
    assert out == "host=127.0.20.11 port=5432 dbname=shop user=dr_admin password=***"


def test_redact_url_keeps_user_and_host():
    out = redact("postgresql://airflow:pa55word@127.0.20.1:5432/airflow")
    assert out == "postgresql://airflow:***@127.0.20.1:5432/airflow"


@pytest.mark.parametrize("key", ["password", "PASSWORD", "db_password", "passwd", "pass", "token", "access_token",
                                 "api_key", "api-key", "apikey", "secret", "client_secret", "private_key",
                                 "credentials"])
def test_redact_secret_keys(key):
    out = redact({key: "v4lue", "user": "dr_admin"})
    assert out[key] == "***"
    assert out["user"] == "dr_admin"


def test_redact_empty_secret_values_stay_empty():
    assert redact({"password": "", "token": None}) == {"password": "", "token": None}


def test_redact_nested_structures():
    value = {
        "argv": ["psql", "host=x password=hunter22", "-c", "select 1"],
        "conn": {"extra": {"token": "abc", "key_file": "/lab/ssh/keys/airflow_ed25519"}},
        "urls": ("https://u:p4ss@h/", "plain"),
        "n": 3,
        "ok": True,
    }
    out = redact(value)
    dumped = json.dumps(out)
    assert "hunter22" not in dumped and "abc" not in dumped and "p4ss" not in dumped
    assert out["argv"][0] == "psql" and out["argv"][2:] == ["-c", "select 1"]
    assert out["conn"]["extra"]["key_file"] == "/lab/ssh/keys/airflow_ed25519"  # a path, not a secret
    assert out["urls"] == ["https://u:***@h/", "plain"]
    assert out["n"] == 3 and out["ok"] is True
    # the input is not modified
    assert value["argv"][1] == "host=x password=hunter22"


def test_redact_extra_secrets():
    out = redact(["--remote-ssh-command", "ssh -i key user@h", "value-with-S3CRET1"], extra_secrets=["S3CRET1", "ab"])
    assert "S3CRET1" not in json.dumps(out)
    # too-short "secrets" would mask harmless text: ignored
    assert out[1] == "ssh -i key user@h"


def test_redact_non_strings_pass_through():
    assert redact(None) is None
    assert redact(42) == 42
    assert redact(1.5) == 1.5


def test_outcomes_match_the_schema():
    schema = (__import__("pathlib").Path(__file__).resolve().parents[2] / "include" / "sql" / "audit_schema.sql")
    text = schema.read_text()
    for o in OUTCOMES:
        assert f"'{o}'" in text


def test_record_rejects_unknown_outcome():
    # validated before any connection is attempted
    with pytest.raises(ValueError, match="outcome"):
        AuditTrail(postgres_conn_id="nonexistent").record("x", "success")


def test_audit_context_from_airflow():
    ti = SimpleNamespace(dag_id="dr_pitr", run_id="manual__1", task_id="restore", try_number=2)
    dag_run = SimpleNamespace(triggering_user_name="alice", run_id="manual__1", conf={"incident_id": "INC-9"})
    ctx = AuditContext.from_airflow({"ti": ti, "dag_run": dag_run})
    assert (ctx.dag_id, ctx.run_id, ctx.task_id, ctx.try_number) == ("dr_pitr", "manual__1", "restore", 2)
    assert ctx.triggered_by == "alice"
    assert ctx.incident_id == "INC-9"
    # an explicit incident id wins
    assert AuditContext.from_airflow({"ti": ti, "dag_run": dag_run}, incident_id="INC-1").incident_id == "INC-1"


def test_audit_context_without_context():
    ctx = AuditContext.from_airflow(None, incident_id="INC-2")
    assert ctx.dag_id is None and ctx.incident_id == "INC-2"
    ctx = AuditContext.from_airflow({"task_instance": SimpleNamespace(dag_id="d", run_id="r", task_id="t",
                                                                        try_number=1)})
    assert ctx.dag_id == "d" and ctx.triggered_by is None
