"""The UI in a real headless Chromium: the dr_pitr trigger form and the DR page (screenshots kept).

Runs after the PITR suites and the restore drill (alphabetical order), so the DR page has a
real PITR run and a real drill to show. Screenshots: test-artifacts/screenshots/.
"""

from __future__ import annotations

import re
import urllib.request
from html import unescape

import pytest

from barman_dr.surfaces.api_client import from_env
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
    data = api._call("GET", "/barman-dr/api/summary")
    assert data["pitr_runs"] and data["drills"], "expected a real PITR and a real drill before this test"
    assert data["pitr_runs"][0]["run_id"] in text  # the newest PITR run of the earlier suites
    assert "No drill yet" not in text
    assert "Audit trail" in text and "validate" in text
    assert (ARTIFACTS / "dr-page.png").stat().st_size > 10_000


def test_dr_page_filters_the_audit_trail_by_incident(browser, session):
    api, cookie = session
    incident = next(r["incident_id"] for r in api._call("GET", "/barman-dr/api/summary")["pitr_runs"]
                    if r.get("incident_id"))  # INC-SEED-1 in the full suite: any incident the earlier suites left
    text = browser.visit(f"{api.base_url}/barman-dr/?incident_id={incident}", cookie=cookie, wait_for="Audit trail")
    assert incident in text


def next_href(api, path: str, why: str) -> str:
    """The page's own "next" link (from its HTML: Chromium is driven by text, not by links)."""
    nxt = re.search(r"rel='next' href='([^']+)'", page_html(api, path))
    assert nxt, why
    return unescape(nxt.group(1))


def page_html(api, path: str) -> str:
    """The DR page's HTML as the API server renders it (bearer token), to read the links Chromium will follow."""
    req = urllib.request.Request(api.base_url.rstrip("/") + path, headers={"Authorization": f"Bearer {api.token()}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read().decode()


def audit_section(text: str) -> str:
    return text[text.index("Audit trail"):]


def test_dr_page_paginates_the_audit_trail_and_keeps_filters(browser, session):
    api, cookie = session
    first = browser.visit(f"{api.base_url}/barman-dr/?per_page=5", cookie=cookie, wait_for="Audit trail",
                          screenshot="dr-page-audit-page-1.png")
    m = re.search(r"page 1 of (\d+), rows 1-5 of (\d+)", first)
    assert m, audit_section(first)[:2000]
    assert int(m.group(1)) > 1, "expected more than 5 audit events after the earlier suites"
    # follow the page's own "next" link (read from the HTML: Chromium is driven by text, not by links)
    href = next_href(api, "/barman-dr/?per_page=5", "page 1 has no next link")
    assert "per_page=5" in href and "page=2" in href and "until=" in href
    second = browser.visit(f"{api.base_url}/barman-dr/{href}", cookie=cookie, wait_for="page 2 of",
                           screenshot="dr-page-audit-page-2.png")
    assert "rows 6-10 of" in second
    rows1 = [r for r in audit_section(first).splitlines() if r.count("\t") >= 6]
    rows2 = [r for r in audit_section(second).splitlines() if r.count("\t") >= 6]
    assert len(rows2) >= 5 and rows1 != rows2
    via_api = api._call("GET", f"/barman-dr/api/audit{href}")
    assert via_api["page"] == 2 and len(via_api["rows"]) == 5

    # a filter persists through next: every row of page 2 is still pg-primary's, and so is the next link
    filtered = "/barman-dr/?server=pg-primary&outcome=ok&per_page=5"
    href = next_href(api, filtered, "expected more than 5 ok events of pg-primary")
    assert "server=pg-primary" in href and "outcome=ok" in href and "per_page=5" in href
    second = browser.visit(f"{api.base_url}/barman-dr/{href}", cookie=cookie, wait_for="page 2 of",
                           screenshot="dr-page-audit-filtered-page-2.png")
    assert "rows 6-10 of" in second
    page2 = api._call("GET", f"/barman-dr/api/audit{href}")
    page1 = api._call("GET", "/barman-dr/api/audit?server=pg-primary&outcome=ok&per_page=5")
    assert {r["server"] for r in page2["rows"]} == {"pg-primary"} and {r["outcome"] for r in page2["rows"]} == {"ok"}
    assert not {r["event_id"] for r in page1["rows"]} & {r["event_id"] for r in page2["rows"]}
    assert page2["links"]["next"] is None or "server=pg-primary" in page2["links"]["next"]


def test_dr_page_refuses_a_hostile_filter(browser, session):
    api, cookie = session
    text = browser.visit(f"{api.base_url}/barman-dr/?server=x%27%20OR%201%3D1", cookie=cookie,
                         wait_for="Invalid audit trail filter", timeout=20)
    assert "server: must be a server name" in text and "PITR runs" not in text


def test_dr_page_requires_login(browser, session):
    api, _ = session
    text = browser.visit(f"{api.base_url}/barman-dr/", wait_for="Not authenticated", timeout=20)
    assert "Not authenticated" in text and "PITR runs" not in text
