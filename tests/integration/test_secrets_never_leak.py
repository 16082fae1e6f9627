"""No secret of the lab (passwords, the JWT secret) appears in the audit trail, XCom or task logs.

Runs after the PITR suites (alphabetical order), so the audit table, XCom and the task logs
hold every kind of step: validation, barman restore argv, SSH commands, PgBouncer, reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.pitr_support import sql

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def secrets() -> dict[str, str]:
    data = json.loads(Path(os.environ["LAB_DIR"], "secrets", "lab.json").read_text())
    return {k: v for k, v in data.items() if isinstance(v, str) and len(v) >= 8}


def _leaks(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value in text]


def test_audit_trail_has_no_secrets(secrets):
    rows = sql("LAB_AUDIT_DSN", "SELECT coalesce(target, '') || coalesce(argv::text, '') || coalesce(details::text, '')"
                                " FROM audit.events")
    assert rows, "the audit trail is empty: run the PITR suites first"
    assert _leaks("\n".join(r[0] for r in rows), secrets) == []


def test_xcom_has_no_secrets(secrets):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        values = [json.dumps(x.value, default=str) for x in session.query(XComModel).filter(
            XComModel.dag_id.like("dr_%")).all()]
    assert values
    assert _leaks("\n".join(values), secrets) == []


def test_task_logs_have_no_secrets(secrets):
    logs = Path(os.environ["AIRFLOW_HOME"], "logs")
    files = [p for p in logs.rglob("*") if p.is_file()] if logs.exists() else []
    leaked = {str(p): _leaks(p.read_text(errors="replace"), secrets) for p in files}
    assert {k: v for k, v in leaked.items() if v} == {}
