"""A failed DR run notifies through Airflow's notifier mechanism: a mail reaches the lab's SMTP sink.

The message names the server, what failed, and what to do next.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path

import pytest

from tests.pitr_support import audit, run_dag

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
    # the failure summary (and the run note it writes) names the step and its error, not "FAILED at ?"
    summary = [e for e in audit(run_id) if e["action"] == "failure_summary" and e["outcome"] == "ok"]
    assert summary, audit(run_id)
    errors = json.loads(summary[0]["details"])["errors"]
    assert errors[0]["task"] == "validate_params" and "is in the future" in errors[0]["error"], errors


def hooks() -> dict[str, dict]:
    import json

    d = Path(os.environ["LAB_MAIL_DIR"]) / "webhooks"
    return {p.name: json.loads(p.read_text()) for p in d.glob("*.json")} if d.exists() else {}


def test_a_failed_pitr_posts_to_the_chat_webhook():
    """The `dr_webhook` connection (Slack-style incoming webhook) gets the same three facts."""
    before = set(hooks())
    future = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    state, run_id, _ = run_dag("dr_pitr", {"server": "pg-primary", "target_time": future,
                                           "incident_id": "INC-ALERT-2"})
    assert state == "failed"
    posts = [v for k, v in hooks().items() if k not in before and run_id in json_text(v)]
    assert posts, "no notification reached the webhook sink"
    first = [p for p in posts if "task validate_params failed" in p["body"]["text"]]
    assert first, [p["body"]["text"][:120] for p in posts]
    text = first[0]["body"]["text"]
    assert "`pg-primary`" in text                                    # which server
    assert "target_time" in text and "is in the future" in text      # what failed
    assert "*Next:*" in text                                         # what to do next
    assert first[0]["body"]["channel"] == "#dr-oncall"
    assert first[0]["path"].startswith("/services/")


def json_text(v: dict) -> str:
    import json

    return json.dumps(v)
