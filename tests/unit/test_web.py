"""The DR page: escaped rendering, the audit trail paginated and filtered server-side, validated filters,
phases in the order they ran, the RTO trend's axes, four-eyes approvals, and a 10,000-event fleet (correctness
only: times are measured by bench/dr_page.py, never asserted here)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi.testclient import TestClient

from barman_dr.safety.audit import OUTCOMES
from barman_dr.surfaces import web
from barman_dr.surfaces.web import (
    AuditPage,
    AuditQuery,
    FilterError,
    Page,
    PageDeps,
    ServerInfo,
    SqlAuditSource,
    approval_row,
    find_target_runs,
    nice_ticks,
    ordered_phases,
    render,
    render_candidates,
    rto_svg,
    run_approval,
    step_times,
)
from bench import dr_page

EVIL = "<script>alert(1)</script>"


def data() -> dict:
    return {"generated_at": "2026-11-25T12:00:00+00:00",
            "servers": [{"server": "pg-primary", "recovery_window_days": 7, "rto_objective_s": 900,
                         "last_backup": {"backup_id": "20261125T020000", "age": "3 h"},
                         "verification": {"status": "OK"}, "last_pitr": None, "last_drill": None}],
            "pitr_runs": [{"at": "2026-11-25T12:00:00", "server": "pg-primary", "run_id": "r1", "incident_id": EVIL,
                           "target": EVIL, "outcome": "success", "rto_s": 12.5, "phases_s": {"freeze_app": 0.1}}],
            "drills": [{"at": "2026-11-01T04:00:00", "server": "pg-primary", "run_id": "d1", "rto_s": 40,
                        "rto_objective_s": 900, "rto_met": True, "outcome": "ok", "backup_id": "b"}]}


def test_values_are_escaped():
    audit = [{"event_time": "2026-11-25T12:00:00", "dag_id": "dr_pitr", "run_id": EVIL, "task_id": "t",
              "server": "pg-primary", "incident_id": EVIL, "action": "validate", "outcome": "refused",
              "duration_s": 0.1}]
    page = render(data(), audit, {"server": EVIL, "run_id": None, "incident_id": None})
    assert EVIL not in page
    assert "&lt;script&gt;" in page
    assert "12.5" in page and "20261125T020000" in page


def test_rto_trend_has_the_objective_line():
    svg = rto_svg(data()["drills"], 900)
    assert "<polyline" in svg and "objective 900" in svg
    assert "No drill yet" in rto_svg([], 900)


def find_event(summary: str = EVIL) -> dict:
    cand = {"rank": 1, "kind": "DELETE", "summary": summary, "rows_affected": 7465, "whole_relation": False,
            "xid": 759, "commit_time": "2026-11-25T19:04:36.775668+00:00", "commit_lsn": "0/9332F48",
            "target": {"target_xid": "759", "target_inclusive": False, "target_lsn": "0/9332F48"},
            "pitr_conf": {"server": "pg-primary", "target_xid": "759", "target_inclusive": False, "reason": EVIL}}
    return {"event_time": "2026-11-25T19:05:00+00:00", "action": "find_target", "outcome": "ok",
            "server": "pg-primary", "run_id": EVIL, "incident_id": "INC-1",
            "details": {"window": {"start": "2026-11-25T18:05:00+00:00", "end": "2026-11-25T19:05:00+00:00"},
                        "table": EVIL, "min_rows": 1, "matched": 1, "candidates": [cand], "warnings": [EVIL]}}


def test_candidate_targets_are_escaped():
    runs = find_target_runs([find_event(), {**find_event(), "outcome": "started", "details": {}}])
    assert len(runs) == 1
    html = render_candidates(runs)
    assert EVIL not in html and "&lt;script&gt;" in html
    assert "target_xid 759 / target_lsn 0/9332F48, inclusive false" in html and "7465" in html
    page = render({**data(), "find_target_runs": runs}, [], {"server": None, "run_id": None, "incident_id": None})
    assert "Candidate targets" in page and 'id="candidate-targets"' in page and EVIL not in page
    assert "No dr_find_target run yet" in render_candidates([])


# ------------------------------------------------------------------------ an in-memory audit trail

_KINDS = {"backup": ("backup_taken", "rebase_barman"), "verification": ("verify_report",),
          "pitr": ("report", "failure_summary"), "drill": ("drill_result",)}
_RECENT = {"pitr": lambda e: e["dag_id"] == "dr_pitr" and e["action"] in ("report", "failure_summary")
           and e["outcome"] == "ok",
           "drill": lambda e: e["action"] == "drill_result", "find_target": lambda e: e["action"] == "find_target",
           "approval": lambda e: e["action"] == "approval"}


class MemorySource:
    """What SqlAuditSource's queries return, computed in Python over a list (oldest first)."""

    def __init__(self, events: Sequence[dict[str, Any]]) -> None:
        self.events = [{**e, "event_id": i + 1} for i, e in enumerate(events)]
        self.by_server: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for e in self.events:
            self.by_server[e.get("server") or ""].append(e)
        self.opened = 0

    def __enter__(self) -> MemorySource:
        self.opened += 1
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def latest_per_server(self, servers: Sequence[str]) -> list[dict[str, Any]]:
        out = []
        for s in servers:
            for kind, actions in _KINDS.items():
                def ok(e: dict[str, Any], kind: str = kind, actions: tuple[str, ...] = actions) -> bool:
                    d = e.get("details") or {}
                    return (e["action"] in actions
                            and (kind != "backup" or bool(d.get("backup_id") or d.get("new_backup_id")))
                            and (kind != "pitr" or (e["dag_id"] == "dr_pitr" and e["outcome"] == "ok")))
                hits = [e for e in self.by_server.get(s, []) if ok(e)]
                if hits:
                    out.append({**max(hits, key=lambda e: (e["event_time"], e["event_id"])), "kind": kind})
        return out

    def recent(self, kind: str, limit: int) -> list[dict[str, Any]]:
        return [e for e in reversed(self.events) if _RECENT[kind](e)][:limit]

    def run_events(self, run_ids: Sequence[str]) -> list[dict[str, Any]]:
        want = set(run_ids)
        return [e for e in self.events if e["dag_id"] == "dr_pitr" and e["run_id"] in want
                and (e["outcome"] == "started" or e["action"] == "approval")]

    def audit_page(self, query: AuditQuery) -> AuditPage:
        f = query.filters()
        rows = [e for e in reversed(self.events) if all(e.get(k) == v for k, v in f.items())
                and (query.until is None or e["event_id"] <= query.until)]
        until = query.until if query.until is not None else (rows[0]["event_id"] if rows else None)
        page = Page.of(query.page, query.per_page, len(rows))
        return AuditPage(query, rows[page.offset:page.offset + page.per_page], page, until)


def client_for(source: Any, servers: Sequence[ServerInfo]) -> TestClient:
    app = web.create_app(PageDeps(source=lambda: source, servers=lambda: servers))
    app.dependency_overrides[web.get_user] = lambda: None
    return TestClient(app)


# ------------------------------------------------------------------------ pagination

def test_page_arithmetic():
    p = Page.of(1, 50, 0)
    assert (p.number, p.pages, p.first_row, p.last_row, p.has_prev, p.has_next) == (1, 1, 0, 0, False, False)
    p = Page.of(3, 50, 120)
    assert (p.number, p.pages, p.offset, p.first_row, p.last_row, p.has_prev, p.has_next) == (3, 3, 100, 101, 120,
                                                                                               True, False)
    assert Page.of(2, 50, 100).last_row == 100 and not Page.of(2, 50, 100).has_next
    assert Page.of(1, 50, 101).pages == 3 and Page.of(1, 50, 101).has_next
    assert Page.of(999, 50, 120).number == 3  # past the end: the last page, never an empty one
    assert Page.of(0, 5, 12).number == 1


def test_links_keep_filters_page_size_and_snapshot():
    q = AuditQuery(server="pg-primary", outcome="ok", incident_id="INC-1", page=2, per_page=5)
    links = AuditPage(q, [], Page.of(2, 5, 12), until=99).links()
    assert links["prev"] == "?server=pg-primary&outcome=ok&incident_id=INC-1&per_page=5&until=99"
    assert links["first"] == links["prev"]
    assert links["next"] == "?server=pg-primary&outcome=ok&incident_id=INC-1&per_page=5&until=99&page=3"
    assert links["last"] == links["next"]
    back = AuditQuery.parse({k: v[0] for k, v in parse_qs(urlsplit(links["next"]).query).items()})
    assert back == AuditQuery(server="pg-primary", outcome="ok", incident_id="INC-1", page=3, per_page=5, until=99)
    first = AuditPage(AuditQuery(), [], Page.of(1, 50, 10), until=7).links()
    assert first == {"first": None, "prev": None, "next": None, "last": None}
    assert AuditQuery().href() == "?"
    assert AuditQuery(run_id="manual__2026-11-25T12:00:00+00:00").href() == "?run_id=manual__2026-11-25T12%3A00%3A00%2B00%3A00"


def test_pager_is_rendered_with_escaped_links():
    q = AuditQuery(server="pg-primary", per_page=5, page=2)
    audit = AuditPage(q, [], Page.of(2, 5, 12), until=42)
    page = render(data(), audit)
    assert "page 2 of 3, rows 6-10 of 12" in page
    assert "rel='next' href='?server=pg-primary&amp;per_page=5&amp;until=42&amp;page=3'" in page
    assert "rel='prev' href='?server=pg-primary&amp;per_page=5&amp;until=42'" in page
    # the filter form keeps the filters and the page size, and starts a new snapshot (no until)
    assert "name='server' placeholder='server' value='pg-primary'" in page
    assert "name='per_page' value='5'" in page and "name='until'" not in page


# ------------------------------------------------------------------------ filter validation

HOSTILE = ["x' OR 1=1", "x' OR '1'='1", "a;DROP TABLE audit.events", "pg primary", EVIL, "pg\x00primary",
           "pg-primary\n", "\u2019quoted\u2019", "%27", "../etc"]


@pytest.mark.parametrize("field", ["server", "action", "incident_id", "run_id", "outcome"])
@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_filter_values_are_refused_naming_the_field(field, value):
    with pytest.raises(FilterError) as exc:
        AuditQuery.parse({field: value})
    assert exc.value.field == field and str(exc.value).startswith(f"{field}: ")


@pytest.mark.parametrize(("field", "limit"), [("server", 63), ("action", 63), ("incident_id", 64), ("run_id", 250)])
def test_overlong_values_are_refused(field, limit):
    ok = "a" * limit
    assert getattr(AuditQuery.parse({field: ok}), field) == ok
    with pytest.raises(FilterError, match=f"^{field}: .*got {limit + 1} characters"):
        AuditQuery.parse({field: "a" * (limit + 1)})
    with pytest.raises(FilterError, match=f"^{field}: "):
        AuditQuery.parse({field: "a" * 100_000})


def test_outcome_must_be_known_and_numbers_bounded():
    for o in OUTCOMES:
        assert AuditQuery.parse({"outcome": o}).outcome == o
    for bad in ("success", "OK", "ok ", "ok;"):
        with pytest.raises(FilterError, match=r"^outcome: must be one of started, ok"):
            AuditQuery.parse({"outcome": bad})
    assert AuditQuery.parse({}) == AuditQuery(page=1, per_page=50)
    assert AuditQuery.parse({"per_page": "200", "page": "7", "until": "123"}) == AuditQuery(page=7, per_page=200,
                                                                                              until=123)
    for field, bad in (("per_page", "201"), ("per_page", "0"), ("per_page", "-1"), ("per_page", "1e3"),
                       ("per_page", "5 "), ("page", "0"), ("page", "abc"), ("page", "٣"), ("until", "-5"),
                       ("until", "9" * 30)):
        with pytest.raises(FilterError) as exc:
            AuditQuery.parse({field: bad})
        assert exc.value.field == field, (field, bad)


def test_empty_values_mean_no_filter_and_duplicates_are_refused():
    assert AuditQuery.parse({"server": "", "outcome": "", "page": ""}) == AuditQuery()
    params = {"server": ["a", "b"]}
    with pytest.raises(FilterError, match=r"^server: given more than once"):
        AuditQuery.parse(lambda name: params.get(name, []))


def test_where_binds_values_never_formats_them():
    q = AuditQuery(server="x' OR 1=1", run_id="r1", until=10)  # built directly: even unvalidated, never SQL text
    sql, params = q.where()
    assert sql == " WHERE server = %s AND run_id = %s AND event_id <= %s"
    assert params == ["x' OR 1=1", "r1", 10]
    assert AuditQuery().where() == ("", [])


def test_bad_filters_answer_400_naming_the_field_before_any_query():
    opened = []
    app = web.create_app(PageDeps(source=lambda: opened.append(1), servers=lambda: []))
    app.dependency_overrides[web.get_user] = lambda: None
    client = TestClient(app)
    r = client.get("/", params={"server": "x' OR 1=1"})
    assert r.status_code == 400 and "server: must be a server name" in r.text and "x' OR 1=1" not in r.text
    r = client.get("/", params={"outcome": "bogus"})
    assert r.status_code == 400 and "outcome: must be one of" in r.text
    r = client.get("/", params={"run_id": "r" * 251})
    assert r.status_code == 400 and "run_id:" in r.text
    r = client.get("/", params={"per_page": "100000"})
    assert r.status_code == 400 and "per_page:" in r.text
    r = client.get("/", params={"incident_id": EVIL})
    assert r.status_code == 400 and EVIL not in r.text
    r = client.get("/api/audit", params={"action": "x' OR 1=1"})
    assert r.status_code == 400 and r.json()["detail"]["field"] == "action"
    r = client.get("/?server=a&server=b")
    assert r.status_code == 400 and "server: given more than once" in r.text
    assert opened == []  # refused before the database was touched


class FakeCursor:
    def __init__(self, log: list[tuple[str, list[Any]]], answers: list[tuple[list[str], list[tuple]]]) -> None:
        self.log, self.answers, self.description, self._rows = log, answers, None, []

    def __enter__(self) -> FakeCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.log.append((sql, list(params)))
        if sql.startswith("SET TRANSACTION"):
            return
        cols, self._rows = self.answers.pop(0)
        self.description = [(c,) for c in cols]

    def fetchall(self) -> list[tuple]:
        return self._rows


class FakeConn:
    def __init__(self, answers: list[tuple[list[str], list[tuple]]]) -> None:
        self.log: list[tuple[str, list[Any]]] = []
        self.answers = answers
        self.closed = self.rolled_back = False

    def cursor(self) -> FakeCursor:
        return FakeCursor(self.log, self.answers)

    def rollback(self) -> None:
        self.rolled_back = True

    def close(self) -> None:
        self.closed = True


def test_sql_source_pages_with_limit_offset_and_bound_parameters():
    row = (7, "2026-11-25T12:00:00+00:00", "dr_pitr", "r1", "t", 1, None, "pg-primary", "validate", None, None, None,
           0.1, "ok", "INC-1", '{"k": 1}')
    conn = FakeConn([(["n", "newest"], [(12, 500)]), (list(web.EVENT_COLUMNS), [row])])
    q = AuditQuery.parse({"server": "pg-primary", "outcome": "ok", "per_page": "5", "page": "3"})
    with SqlAuditSource(lambda: conn) as src:
        audit = src.audit_page(q)
    assert conn.closed and conn.rolled_back  # read-only: nothing to commit
    (set_tx, _), (count_sql, count_params), (page_sql, page_params) = conn.log
    assert set_tx == "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"
    assert count_sql.endswith("FROM audit.events WHERE server = %s AND outcome = %s")
    assert count_params == ["pg-primary", "ok"]
    assert page_sql.endswith("WHERE server = %s AND outcome = %s AND event_id <= %s ORDER BY event_id DESC "
                             "LIMIT %s OFFSET %s")
    assert page_params == ["pg-primary", "ok", 500, 5, 10]
    assert "pg-primary" not in count_sql + page_sql
    assert audit.until == 500 and audit.page.number == 3 and audit.rows[0]["details"] == {"k": 1}
    assert audit.links()["prev"] == "?server=pg-primary&outcome=ok&per_page=5&until=500&page=2"


def test_sql_source_summary_queries_are_bounded_and_parameterised():
    conn = FakeConn([(["kind", *web.EVENT_COLUMNS], []), (list(web.EVENT_COLUMNS), []), (list(web.EVENT_COLUMNS), []),
                     (list(web.EVENT_COLUMNS), []), (list(web.EVENT_COLUMNS), [])])
    with SqlAuditSource(lambda: conn) as src:
        out = web.summarize(src, [ServerInfo("pg-primary", 7, 900), ServerInfo("x' OR 1=1", 7, 900)])
    sqls = [s for s, _ in conn.log[1:]]
    assert "unnest(%s::text[])" in sqls[0] and conn.log[1][1] == [["pg-primary", "x' OR 1=1"]]
    assert all("x' OR" not in s for s in sqls)
    assert all(s.rstrip().endswith("LIMIT %s") for s in sqls[1:])  # no run events queried: no PITR run
    assert [p for _, p in conn.log[2:]] == [[20], [50], [20], [20]]
    assert out["pitr_runs"] == [] and len(out["servers"]) == 2


# ------------------------------------------------------------------------ phases in the order they ran

def test_phases_are_chronological_not_alphabetical():
    # what jsonb hands back: keys sorted by length then bytes, nothing like the order they ran
    phases = {"move_aside": 0.2, "freeze_app": 0.1, "barman_restore": 3.0, "stop_postgres": 1.0, "unfreeze_app": 0.3,
              "validate_data": 0.5, "verify_target": 0.4, "start_recovery": 2.0}
    times = {"freeze_app": "2026-11-25T12:00:00.1+00:00", "stop_postgres": "2026-11-25T12:00:00.3+00:00",
             "move_aside": "2026-11-25T12:00:01.4+00:00", "barman_restore": "2026-11-25T12:00:01.7+00:00",
             "start_recovery": "2026-11-25T12:00:04.8+00:00", "verify_target": "2026-11-25T12:00:06.9+00:00",
             "validate_data": "2026-11-25T12:00:07.4+00:00", "unfreeze_app": "2026-11-25T12:00:08.0+00:00"}
    assert [k for k, _ in ordered_phases(phases, times)] == list(web.PITR_PHASES)
    # a retried phase ran later than the others: its later start wins
    times2 = {**times, "move_aside": "2026-11-25T12:00:09+00:00"}
    assert [k for k, _ in ordered_phases(phases, times2)][-1] == "move_aside"
    # no start times at all: the runbook's order, not the alphabet
    assert [k for k, _ in ordered_phases(phases)] == list(web.PITR_PHASES)
    assert [k for k, _ in ordered_phases({"zz": 1, **phases, "aa": 2, "barman_restore": None})][-2:] == ["aa", "zz"]
    p = {**data()["pitr_runs"][0], "phases_s": phases, "phase_times": times}
    page = render({**data(), "pitr_runs": [p]}, [])
    positions = [page.index(f"{k} ") for k in web.PITR_PHASES]
    assert positions == sorted(positions)


def test_step_times_take_the_last_start():
    events = [{"run_id": "r", "task_id": "freeze_app", "outcome": "started", "event_time": "2026-01-01T00:00:01+00:00"},
              {"run_id": "r", "task_id": "freeze_app", "outcome": "ok", "event_time": "2026-01-01T00:00:09+00:00"},
              {"run_id": "r", "task_id": "freeze_app", "outcome": "started", "event_time": "2026-01-01T00:00:05+00:00"},
              {"run_id": "r", "task_id": None, "action": "plan", "outcome": "started",
               "event_time": "2026-01-01T00:00:00+00:00"}]
    assert step_times(events) == {"r": {"freeze_app": "2026-01-01T00:00:05+00:00",
                                        "plan": "2026-01-01T00:00:00+00:00"}}


# ------------------------------------------------------------------------ the RTO trend

def test_rto_trend_has_axes_units_ticks_and_a_labelled_dashed_objective():
    drills = [{"at": f"2026-11-{d:02d}T04:00:00+00:00", "server": "pg-primary", "rto_s": v}
              for d, v in ((1, 40), (8, 55.5), (15, 70))]
    svg = rto_svg(drills, 900)
    assert svg.count('class="axis"') == 2
    assert "RTO (seconds)" in svg and "drill finished (UTC date" in svg
    ticks = re.findall(r'<text class="tick"[^>]*>([^<]+)</text>', svg)
    assert ticks[:6] == ["0", "200", "400", "600", "800", "1000"] and ticks[6:] == ["11-01", "11-08", "11-15"]
    objective = re.search(r'<line class="objective"[^>]*>', svg).group(0)
    assert 'stroke-dasharray="6 4"' in objective
    assert ">objective 900s</text>" in svg
    assert svg.count("<circle") == 3 and "55.5 s</title>" in svg
    # the objective line sits at 900 on the same scale as the points: y(900) above y(70)
    y_obj = float(re.search(r'y1="([0-9.]+)"', objective).group(1))
    cys = [float(c) for c in re.findall(r'cy="([0-9.]+)"', svg)]
    assert all(y_obj < cy for cy in cys) and cys[0] > cys[1] > cys[2]
    assert 'class="objective"' not in rto_svg(drills, None)
    assert ">objective 12.5s</text>" in rto_svg(drills, 12.5)


def test_nice_ticks():
    assert nice_ticks(990) == [0, 200, 400, 600, 800, 1000]
    assert nice_ticks(47) == [0, 10, 20, 30, 40, 50]
    assert nice_ticks(0) == [0.0, 1.0]
    assert nice_ticks(0.7)[-1] >= 0.7


# ------------------------------------------------------------------------ four-eyes approvals

def approval_event(decision: str, at: str, **details: Any) -> dict[str, Any]:
    return {"event_time": at, "server": "pg-primary", "dag_id": "dr_pitr", "run_id": "r1", "action": "approval",
            "outcome": "ok", "details": {"decision": decision, **details}}


def test_run_approval_merges_request_and_answer():
    events = [approval_event("requested", "2026-11-25T11:50:00+00:00", requester="alice",
                             requested_at="2026-11-25T11:50:00+00:00", plan_hash="abcd1234"),
              approval_event("approved", "2026-11-25T11:55:00+00:00", requester="alice", approver="bob",
                             responded_at="2026-11-25T11:54:59+00:00", plan_hash="abcd1234")]
    a = run_approval(reversed(events), None)
    assert (a["decision"], a["requester"], a["approver"], a["plan_hash"]) == ("approved", "alice", "bob", "abcd1234")
    assert a["time"] == "2026-11-25T11:54:59+00:00" and a["requested_at"] == "2026-11-25T11:50:00+00:00"
    pending = run_approval(events[:1], None)
    assert pending["decision"] == "requested" and pending["approver"] is None
    assert pending["time"] == "2026-11-25T11:50:00+00:00"
    fallback = {"decision": "pre_approved", "requester": "alice"}
    assert run_approval([], fallback) is fallback
    assert approval_row(approval_event("weird", "t"))["decision"] == "weird"


def test_approvals_are_rendered_on_pitr_rows_and_in_their_own_table():
    approval = {"decision": "approved", "requester": "alice", "approver": EVIL, "time": "2026-11-25T11:54:59+00:00",
                "plan_hash": "abcd1234"}
    p = {**data()["pitr_runs"][0], "approval": approval}
    rows = [approval_row(approval_event(d, f"2026-11-25T11:5{i}:00+00:00", requester="alice",
                                        approver=None if d == "requested" else "bob", plan_hash=f"hash{i}"))
            for i, d in enumerate(("requested", "approved", "rejected", "timed_out", "refused", "plan_only"))]
    page = render({**data(), "pitr_runs": [p], "approvals": rows}, [])
    assert EVIL not in page
    cell = page[page.index("<table id=\"pitr-runs\""):page.index("<h2>Approvals")]
    assert "class='approval approved'>approved</span> alice &rarr; &lt;script&gt;" in cell
    assert "2026-11-25T11:54:59" in cell and "plan <code>abcd1234</code>" in cell
    table = page[page.index("<table id='approvals'>"):page.index("<h2>Candidate targets")]
    for h in ("Requester", "Approver", "Decision", "Plan hash", "Time (UTC)"):
        assert h in table
    for i, d in enumerate(("requested", "approved", "rejected", "timed_out", "refused", "plan_only")):
        assert f"<td class='{d}'>{d}</td>" in table and f"hash{i}" in table
    assert "<td>bob</td>" in table and "/dags/dr_pitr/runs/r1" in table
    assert "No approval yet" in render(data(), [])
    assert "pre_approved" in render({**data(), "pitr_runs": [{**p, "approval": {"decision": "pre_approved",
                                                                                 "requester": "alice"}}]}, [])


# ------------------------------------------------------------------------ a fleet: 10,000 events, 50 servers

@pytest.fixture(scope="module")
def fleet() -> list[dict[str, Any]]:
    return dr_page.synthetic_events(10_000, 50)


def fleet_servers(n: int = 50) -> list[ServerInfo]:
    return [ServerInfo(dr_page.server_name(i), 7, 900) for i in range(1, n + 1)]


def test_synthetic_fleet_is_exact_and_valid(fleet):
    assert len(fleet) == 10_000 and fleet == dr_page.synthetic_events(10_000, 50)
    assert [e["event_time"] for e in fleet] == sorted(e["event_time"] for e in fleet)
    assert {e["outcome"] for e in fleet} <= set(OUTCOMES)
    assert len({e["server"] for e in fleet}) == 50
    assert sum(e["action"] == "report" and e["outcome"] == "ok" for e in fleet) == 10
    rows = list(dr_page.insert_rows(fleet[:3]))
    assert all(len(r) == len(dr_page.INSERT_COLUMNS) for r in rows) and isinstance(rows[0][-1], str)
    assert len(dr_page.synthetic_events(500, 50)) == 500  # fewer than the structured events: the newest kept


def test_page_over_10000_events_and_50_servers_is_correct_and_bounded(fleet):
    source = MemorySource(fleet)
    client = client_for(source, fleet_servers())
    r = client.get("/", params={"server": "fleet-007", "per_page": "20", "page": "3"})
    assert r.status_code == 200
    page = r.text
    expected = [e for e in reversed(source.events) if e["server"] == "fleet-007"]
    pages = -(-len(expected) // 20)
    assert f"page 3 of {pages}, rows 41-60 of {len(expected)}" in page
    audit = page[page.index('<table id="audit">'):]
    assert audit.count("<tr>") == 21  # the header and exactly one page
    assert audit.count("<td>fleet-007</td>") == 20 and "<td>fleet-008</td>" not in audit
    until = expected[0]["event_id"]
    assert f"rel='next' href='?server=fleet-007&amp;per_page=20&amp;until={until}&amp;page=4'" in page
    # the summary: every server, its newest backup, bounded sections
    servers = page[page.index('<table id="servers">'):page.index("<h2>PITR runs")]
    assert servers.count("<tr>") == 51
    newest_backup = max((e for e in fleet if e["server"] == "fleet-050" and e["action"] == "backup_taken"),
                        key=lambda e: e["event_time"])
    assert newest_backup["details"]["backup_id"] in servers
    pitr = page[page.index('<table id="pitr-runs">'):page.index("<h2>Approvals")]
    assert pitr.count("<tr>") == 11 and pitr.count("class='approval approved'") == 10
    approvals = page[page.index("<table id='approvals'>"):page.index("<h2>Candidate targets")]
    assert approvals.count("<tr>") == 1 + 20
    assert page.count("<circle") == 50  # the drill trend: the 50 newest drills
    drills = page[page.index('<table id="drills">'):page.index("<h2>Audit trail")]
    assert drills.count("<tr>") == 1 + web.DRILL_ROWS_SHOWN  # the table under it: the newest only
    assert len(page) < 300_000  # bounded by the page size, not by the trail's length
    assert source.opened == 1  # one snapshot per request
    data_ = client.get("/api/summary").json()
    for p in data_["pitr_runs"]:
        assert p["phase_order"] == list(web.PITR_PHASES)
        assert list(p["phases_s"]) == list(web.PITR_PHASES)
        assert p["approval"]["decision"] == "approved" and p["approval"]["requester"] == "alice"
    assert [d["at"] for d in data_["drills"]] == sorted(d["at"] for d in data_["drills"])


def test_paging_is_pinned_to_its_snapshot(fleet):
    source = MemorySource(fleet[:-100])
    client = client_for(source, fleet_servers())
    first = client.get("/api/audit", params={"per_page": "5"}).json()
    source.__init__(fleet)  # 100 new events arrive between the two clicks
    nxt = client.get("/api/audit" + first["links"]["next"]).json()
    ids1, ids2 = [r["event_id"] for r in first["rows"]], [r["event_id"] for r in nxt["rows"]]
    assert ids2 == [ids1[-1] - k for k in range(1, 6)]  # exactly the next five, no repeats
    assert nxt["page"] == 2 and nxt["total"] == first["total"] and nxt["until"] == first["until"]
    fresh = client.get("/api/audit", params={"per_page": "5"}).json()
    assert fresh["total"] == first["total"] + 100


def test_filters_combine(fleet):
    source = MemorySource(fleet)
    client = client_for(source, fleet_servers())
    r = client.get("/api/audit", params={"action": "approval", "outcome": "ok", "per_page": "200"}).json()
    assert r["total"] == 10 and {x["details"]["decision"] for x in r["rows"]} == {"approved"}
    run_id = r["rows"][0]["run_id"]
    r = client.get("/api/audit", params={"run_id": run_id, "incident_id": run_id.split("__")[-1]}).json()
    assert r["total"] > 30 and {x["run_id"] for x in r["rows"]} == {run_id}
    assert client.get("/api/audit", params={"server": "no-such-server"}).json()["total"] == 0
    empty = client.get("/", params={"server": "no-such-server"}).text
    assert "page 1 of 1, rows 0-0 of 0" in empty


# ------------------------------------------------------------------------ bench/dr_page.py, the pure parts

def test_bench_schema_keeps_the_table_and_drops_only_the_writer_grants():
    text = (dr_page.SCHEMA).read_text()
    sql = dr_page.schema_sql(text)
    assert "CREATE TABLE IF NOT EXISTS audit.events" in sql and "events_server_time_idx" in sql
    assert "CREATE TRIGGER events_no_update_delete" in sql and "$$" in sql
    assert not [line for line in sql.splitlines() if "dr_audit_writer" in line and not line.startswith("--")]
    assert "GRANT SELECT, INSERT ON audit.events TO dr_audit_writer" in text
    assert "REVOKE ALL ON audit.events FROM PUBLIC" in sql  # not the writer's: kept


def test_bench_database_is_a_throwaway_one():
    assert dr_page.bench_db_name(42) == "barman_dr_bench_page_42"
    for name in ("dr_audit", "postgres", "barman_dr_bench_page_", "barman_dr_bench_page_1; DROP DATABASE x"):
        with pytest.raises(ValueError, match="refusing"):
            dr_page.ThrowawayDb("host=/tmp", name)
    dsn = dr_page.admin_dsn({"LAB_AUDIT_DSN": "host=10.1.0.1 port=5432 dbname=dr_audit user=dr_audit_writer "
                                              "password=s3cret"})
    assert "s3cret" not in dsn and "dr_audit_writer" not in dsn and "dbname=postgres" in dsn
    assert "host=10.1.0.1" in dsn and "user=postgres" in dsn
    assert dr_page.admin_dsn({"BENCH_PG_DSN": "host=/tmp user=me"}) == "host=/tmp user=me"
    with pytest.raises(SystemExit):
        dr_page.admin_dsn({})


def test_the_delayed_standby_window_is_on_the_page_and_escaped():
    """Issue 17: each delayed standby's protected window, from the newest verification (its facts)."""
    d = data()
    d["servers"][0]["verification"] = {"status": "OK", "at": "2026-12-05T01:00:00+00:00", "delayed": [
        {"standby": "pg-delayed", "delay_s": 180, "tolerance_s": 60, "protected_window_s": 201.5},
        {"standby": EVIL, "delay_s": 14400, "tolerance_s": 1440, "protected_window_s": 20000}]}
    page = render(d, [], None)
    assert "<h2>Delayed standbys</h2>" in page and "id='delayed-standbys'" in page
    assert "damage younger than 3min 21s can be undone in seconds" in page and "4h 0min" in page
    assert EVIL not in page and "<td class='WARNING'>5h 33min</td>" in page  # fallen behind delay + tolerance
    assert "No delayed standby in the newest verification" in render(data(), [], None)
