"""A failed DR run notifies through Airflow's notifier mechanism: a mail reaches the lab's SMTP sink.

The message names the server, what failed, and what to do next.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.pitr_support import run_dag

pytestmark = pytest.mark.integration


def mails() -> dict[str, bytes]:
    d = Path(os.environ["LAB_MAIL_DIR"])
    return {p.name: p.read_bytes() for p in d.glob("*.eml")} if d.exists() else {}


def test_a_failed_pitr_mails_the_on_call():
    before = set(mails())
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    state, run_id, _ = run_dag("dr_pitr", {"server": "pg-primary", "target_time": future, "incident_id": "INC-ALERT-1"})
    assert state == "failed"
    new = {k: v for k, v in mails().items() if k not in before}
    assert new, "no notification reached the SMTP sink"
    msgs = [message_from_bytes(v) for v in new.values()]
    def text(m) -> str:
        return m.get_payload(decode=True).decode("utf-8", "replace")

    about_run = [m for m in msgs if run_id in str(m["Subject"]).replace("\n", "") + text(m)]
    assert about_run, [m["Subject"] for m in msgs]
    body = "\n".join(text(m) for m in about_run)
    assert "pg-primary" in " ".join(str(m["Subject"]) for m in about_run)
    assert "validate_params" in " ".join(str(m["Subject"]) for m in about_run)
    assert "target_time" in body and "is in the future" in body  # what failed
    assert "next_action:" in body                                # what to do next
    assert all("oncall@lab.invalid" in m["To"] for m in about_run)
