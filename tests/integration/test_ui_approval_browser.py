"""Four-eyes approval in a real headless Chromium: Airflow's own Required Actions page.

`admin` triggers a PITR without `confirm` (through REST, as incident tooling does); the
plan waits. In the browser, admin sees the plan but cannot approve (Airflow refuses: the
requester is not an assigned approver); `approver` logs in, sees the same plan and clicks
Approve; the run proceeds and recovers. Screenshots: test-artifacts/screenshots/.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import pytest

from barman_dr.surfaces.api_client import AirflowApi, incident_run_id, pending_approvals
from tests.browser import ARTIFACTS, Browser
from tests.pitr_support import counts, pgbouncer_paused, primary_timeline, sql, wait_for_approval_request

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]
DAG = "dr_pitr"


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def test_the_approver_approves_in_the_browser_and_the_requester_cannot(browser, api):
    tli, before = primary_timeline(), counts()
    sql("LAB_PRIMARY_DSN", "SELECT pg_current_xact_id()")
    time.sleep(1.1)
    target = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    incident = f"INC-UI-4EYES-{int(time.time())}"
    run_id = incident_run_id(DAG, incident)
    api.trigger(DAG, {"server": "pg-primary", "target_time": target, "incident_id": incident,
                      "expected": {"orders_total": before["orders_total"]}}, run_id=run_id)
    wait_for_approval_request(api, DAG, run_id)
    page = f"{api.base_url}/dags/{DAG}/runs/{run_id}/tasks/approve/required_actions"

    # the requester sees the plan, and Airflow refuses the requester's approval
    text = browser.visit(page, cookie=("_token", api.token()), wait_for="PITR plan for pg-primary",
                         screenshot="approval-requester.png", timeout=90, click="Approve",
                         then_wait_for=None)
    assert "waits for a second person" in text and "requested by" in text and "steps:" in text
    time.sleep(3)
    assert pending_approvals(api, DAG, run_id), \
        "the requester's click must not answer the request"
    assert counts() == before and primary_timeline() == tli and not pgbouncer_paused()

    # the second person approves in the same page
    approver = AirflowApi(api.base_url, "approver", os.environ["LAB_APPROVER_PASSWORD"])
    text = browser.visit(page, cookie=("_token", approver.token()), wait_for="PITR plan for pg-primary",
                         click="Approve", then_wait_for=None, screenshot="approval-approver.png", timeout=90)
    assert "PITR plan for pg-primary" in text
    deadline = time.monotonic() + 60
    while not api.hitl_details(DAG, run_id)[0].get("response_received"):
        assert time.monotonic() < deadline, "the approver's click did not answer the request"
        time.sleep(1)
    final = api.wait(DAG, run_id, timeout=900)
    states = {t["task_id"]: t["state"] for t in api.task_instances(DAG, run_id)}
    assert final["state"] == "success", states
    assert primary_timeline() > tli and counts()["orders_total"] == before["orders_total"]
    answered = api.hitl_details(DAG, run_id)[0]
    assert answered["response_received"] and answered["responded_by_user"]["name"] == "approver"
    assert (ARTIFACTS / "approval-approver.png").stat().st_size > 10_000
