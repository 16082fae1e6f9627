"""The DR page renders audit data escaped: nothing from the audit trail becomes HTML."""

from __future__ import annotations

from barman_dr.web import find_target_runs, render, render_candidates, rto_svg

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
