"""The DR page renders audit data escaped: nothing from the audit trail becomes HTML."""

from __future__ import annotations

from barman_dr.web import render, rto_svg

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
