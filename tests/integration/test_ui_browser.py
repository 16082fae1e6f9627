"""The UI in a real headless Chromium: the dr_pitr trigger form and the DR page (screenshots kept).

Runs after the PITR suites and the restore drill (alphabetical order), so the DR page has a
real PITR run and a real drill to show. Screenshots: test-artifacts/screenshots/.
"""

from __future__ import annotations

import pytest

from barman_dr.api_client import from_env
from tests.browser import ARTIFACTS, Browser

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


@pytest.fixture(scope="module")
def session():
    api = from_env()
    return api, ("_token", api.token())


def test_trigger_form_renders_the_params(browser, session):
    api, cookie = session
    text = browser.visit(f"{api.base_url}/dags/dr_pitr", cookie=cookie, wait_for="Trigger", click="Trigger",
                         then_wait_for="Target time (recover to)", screenshot="trigger-form.png", timeout=60)
    for expected in ("Target time (recover to)", "Select date and time", "pg-primary", "Expected counts",
                     "Incident id", "Confirm", "PITR <server>", "A time without a timezone is rejected"):
        assert expected in text, expected
    assert (ARTIFACTS / "trigger-form.png").stat().st_size > 10_000


def test_dr_page_shows_pitr_runs_drills_and_audit(browser, session):
    api, cookie = session
    text = browser.visit(f"{api.base_url}/barman-dr/", cookie=cookie, wait_for="Restore drills",
                         screenshot="dr-page.png", timeout=60)
    assert "Servers" in text and "pg-primary" in text
    assert "INC-SEED-1" in text or "INC-REST-" in text  # PITR runs of the earlier suites
    data = api._call("GET", "/barman-dr/api/summary")
    assert data["pitr_runs"] and data["drills"], "expected a real PITR and a real drill before this test"
    assert "No drill yet" not in text
    assert "Audit trail" in text and "validate" in text
    assert (ARTIFACTS / "dr-page.png").stat().st_size > 10_000


def test_dr_page_filters_the_audit_trail_by_incident(browser, session):
    api, cookie = session
    text = browser.visit(f"{api.base_url}/barman-dr/?incident_id=INC-SEED-1", cookie=cookie, wait_for="Audit trail")
    assert "INC-SEED-1" in text


def test_dr_page_requires_login(browser, session):
    api, _ = session
    text = browser.visit(f"{api.base_url}/barman-dr/", wait_for="Not authenticated", timeout=20)
    assert "Not authenticated" in text and "PITR runs" not in text
