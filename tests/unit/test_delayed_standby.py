"""Delayed standbys in the daily verification: window, lag, and what makes one unusable (issue 17)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from barman_dr.fleet_verification import HostSnapshot, Probe, ServerSpec, evaluate_server
from barman_dr.verification import CRITICAL, OK, WARNING, DelayedReplay, delayed_standby_finding, standby_findings

ROWS = [ln.split("|") for ln in (Path(__file__).resolve().parents[1] / "fixtures" / "postgres" /
                                 "delayed-replay.txt").read_text().splitlines() if ln and not ln.startswith("#")]
HEALTHY, PAUSED, UNDELAYED, FRESH, PRIMARY, QUIET = (DelayedReplay.from_row(r) for r in ROWS)


def test_recorded_rows_parse():
    assert DelayedReplay(True, False, 1968, 20.952, 20.0) == HEALTHY
    assert PAUSED.paused and PAUSED.replay_age_s == 29.233
    assert FRESH.replay_age_s is None and not PRIMARY.in_recovery


def test_within_its_window_is_ok_and_says_what_it_protects():
    f, facts = delayed_standby_finding("pg-delayed", 20, 5, HEALTHY)
    assert f.status == OK and "damage younger than 21s can be undone" in f.reason
    assert facts["protected_window_s"] == 20.952 and facts["delay_s"] == 20


def test_fallen_behind_its_window_is_reported_with_the_fix():
    f, facts = delayed_standby_finding("pg-delayed", 20, 5, PAUSED)
    assert f.status == WARNING and "fallen behind its window" in f.reason and "(replay paused)" in f.reason
    assert "pg_wal_replay_resume" in f.hint and facts["protected_window_s"] == 29.233


def test_a_standby_that_lost_its_delay_is_critical():
    f, _ = delayed_standby_finding("pg-delayed", 20, 5, UNDELAYED)
    assert f.status == CRITICAL and "recovery_min_apply_delay 0s" in f.reason and "inventory says 20s" in f.reason


def test_promoted_is_critical_and_nothing_replayed_yet_is_ok():
    assert delayed_standby_finding("pg-delayed", 20, 5, PRIMARY)[0].status == CRITICAL
    fresh = DelayedReplay(True, False, 0, None, 20.0)  # started lately: no replayed commit to date it by
    assert delayed_standby_finding("pg-delayed", 20, 5, fresh)[0].status == OK


def test_idle_primary_is_ok_whatever_the_age():
    idle = DelayedReplay(True, False, 0, 7200.0, 20.0)
    f, facts = delayed_standby_finding("pg-delayed", 20, 5, idle)
    assert f.status == OK and "idle primary" in f.reason and facts["protected_window_s"] == 7200.0


def test_a_window_below_the_delay_with_the_right_setting_is_ok_and_said():
    """Its configured delay is the inventory's: the last record applied was an abort, or the delay was raised."""
    early = DelayedReplay(True, False, 500, 3.0, 3600.0)
    f, _ = delayed_standby_finding("pg-delayed", 3600, 360, early)
    assert f.status == OK and "below its delay 60min" in f.reason


def test_a_quiet_database_is_not_fallen_behind():
    """Commits further apart than the tolerance: the next one waits its turn (RecoveryApplyDelay), on schedule."""
    assert QUIET.waiting_on_delay and delayed_standby_finding("pg-delayed", 180, 60, QUIET)[0].status == OK
    quiet = DelayedReplay(True, False, 500, 700.0, 180.0, wait_event="RecoveryApplyDelay")
    f, _ = delayed_standby_finding("pg-delayed", 180, 60, quiet)
    assert f.status == OK and "quiet database" in f.reason
    stuck = DelayedReplay(True, False, 500, 700.0, 180.0, wait_event="")  # not waiting on the delay: behind
    assert delayed_standby_finding("pg-delayed", 180, 60, stuck)[0].status == WARNING
    paused = DelayedReplay(True, True, 500, 700.0, 180.0, wait_event="RecoveryPause")
    assert delayed_standby_finding("pg-delayed", 180, 60, paused)[0].status == WARNING


def test_byte_lag_is_not_judged_for_a_delayed_standby():
    clients = [{"application_name": "pg-delayed", "current_state": "streaming", "replay_lsn_diff_bytes": -10**9},
               {"application_name": "pg-standby", "current_state": "streaming", "replay_lsn_diff_bytes": -10**9}]
    got = {f.check: f.status for f in standby_findings(["pg-standby", "pg-delayed"], clients, 16 * 2**20,
                                                       delayed=["pg-delayed"])}
    assert got == {"standby.pg-standby": WARNING, "standby.pg-delayed": OK}


@pytest.mark.parametrize(("probe", "status"), [(Probe(value={"pg-delayed": PAUSED}), WARNING),
                                               (Probe(value={"pg-delayed": "pg-standby: connection refused"}), CRITICAL),
                                               (Probe(value={}), CRITICAL),
                                               (Probe(error="ssh: timeout"), CRITICAL)])
def test_evaluate_server_reports_the_delayed_standby(probe, status):
    spec = ServerSpec("pg-primary", ("pg-delayed",), None, delayed=(("pg-delayed", 20, 5),))
    failed = Probe(error="not measured")
    snap = HostSnapshot(check=failed, backups=failed, servers=failed, replication=failed, delayed=probe)
    findings, facts = evaluate_server(spec, snap, datetime.now(UTC))
    mine = [f for f in findings if f.check == "delayed.pg-delayed"]
    assert len(mine) == 1 and mine[0].status == status
    assert "delayed_standbys" in facts


def test_rebuild_settings_come_from_the_inventory_and_a_retry_writes_the_same_file(tmp_path):
    import subprocess

    from barman_dr.inventory import Instance
    from barman_dr.operators.pitr.post_incident import SET_CONF_SCRIPT, delay_settings, start_settings

    sb = Instance(name="pg-delayed", host="h", data_directory="/d", port=5433, socket_directory="/s", log_file="/l",
                  postgres_conn_id="c", apply_delay_s=7200,
                  restore_command="barman-wal-restore -U barman 'bar host' pg-primary %f %p")
    # started without its delay (it must reach streaming first), then the delay once it streams
    assert start_settings(sb) == ["recovery_min_apply_delay = '0'",
                                  "restore_command = 'barman-wal-restore -U barman ''bar host'' pg-primary %f %p'"]
    assert delay_settings(sb) == ["recovery_min_apply_delay = '7200s'"]
    lines = [*delay_settings(sb), start_settings(sb)[1]]
    conf = tmp_path / "postgresql.auto.conf"
    conf.write_text("# Do not edit this file manually!\nprimary_conninfo = 'host=x'\nrecovery_min_apply_delay = '1s'\n")
    for _ in range(2):
        subprocess.run(["sh", "-c", SET_CONF_SCRIPT, "sh", str(conf), *lines], check=True)
    assert conf.read_text().splitlines() == ["# Do not edit this file manually!", "primary_conninfo = 'host=x'", *lines]
    plain = Instance(name="s", host="h", data_directory="/d", port=1, socket_directory="/s", log_file="/l",
                     postgres_conn_id="c")
    assert start_settings(plain) == [] and delay_settings(plain) == []


def test_the_plan_says_whether_a_paused_delayed_standby_could_serve_the_target():
    from barman_dr.operators.pitr.delayed import _state, delayed_source_verdict

    stop = {"lsn": "0/6F0011E0", "end_lsn": "0/6F001208", "when": "before", "timeline": 7}
    paused = {"standby": "pg-delayed", **_state("t|t|0/6E000100|2026-12-04 21:41:10+00|7")}
    assert paused["timeline"] == 7 and paused["paused"]
    v = delayed_source_verdict(stop, paused)
    assert v["usable"] and "before the stop point 0/6F0011E0" in v["why"]
    assert delayed_source_verdict(stop, {**paused, "replay_lsn": "0/6F0011E0"})["usable"]  # the record not applied
    late = delayed_source_verdict(stop, {**paused, "replay_lsn": "0/6F001208"})
    assert not late["usable"] and "older than its window" in late["why"]
    assert delayed_source_verdict({**stop, "when": "after"}, {**paused, "replay_lsn": "0/6F001208"})["usable"]
    assert "timeline 6" in delayed_source_verdict(stop, {**paused, "timeline": 6})["why"]
    assert not delayed_source_verdict(stop, {"standby": "pg-delayed", "error": "ssh: refused"})["usable"]


class _FakeAudit:
    def __init__(self, events):
        self.events_ = events
        self.recorded = []

    def events(self, *, run_id=None, dag_id=None, action=None, server=None, limit=500):
        return [e for e in self.events_ if action is None or e["action"] == action][:limit]

    def record(self, action, outcome, **kw):
        self.recorded.append((action, outcome, kw.get("target")))


def _resume_op(events):
    from types import SimpleNamespace

    from barman_dr.inventory import Instance
    from barman_dr.operators.pitr.delayed import ResumeDelayedReplayOperator

    op = ResumeDelayedReplayOperator(task_id="resume_delayed_replay")
    audit = _FakeAudit(events)
    op.audit = lambda context: audit
    sb = Instance(name="pg-delayed", host="h", data_directory="/d", port=5433, socket_directory="/s", log_file="/l",
                  postgres_conn_id="c", apply_delay_s=180)
    op.__dict__["srv"] = SimpleNamespace(name="pg-primary", standbys=(sb,))
    op.__dict__["req"] = SimpleNamespace(from_delayed_standby=False, restore_to="in_place", in_place=True)
    calls = []
    op.db = lambda host: SimpleNamespace(psql=lambda inst, sql: calls.append(sql) or "t|f|0/1|2026-12-04 00:00:00+00|7")
    ctx = {"run_id": "r", "dag": SimpleNamespace(dag_id="dr_pitr")}
    return op, audit, calls, ctx


PAUSE_INTENT = {"action": "delayed_replay_paused", "outcome": "started", "target": "pg-delayed", "run_id": "r",
                "dag_id": "dr_pitr", "event_id": 1, "details": {"already_paused": False}}


def test_a_run_that_failed_after_the_freeze_keeps_the_delayed_standby_paused():
    """It may be the last copy without the damage: not resumed, audited, named for the failure summary."""
    op, audit, calls, ctx = _resume_op([PAUSE_INTENT, {"action": "freeze_app", "outcome": "ok", "target": None}])
    out = op.run(ctx)
    assert out == {"resumed": [], "kept_paused": ["pg-delayed"], "recovered_onto": None} and calls == []
    assert audit.recorded == [("delayed_replay_kept_paused", "ok", "pg-delayed")]


def test_a_run_that_ended_well_or_before_the_freeze_resumes_only_its_own_pause():
    op, _audit, calls, ctx = _resume_op([PAUSE_INTENT, {"action": "freeze_app", "outcome": "ok", "target": None},
                                         {"action": "report", "outcome": "ok", "target": None}])
    assert [s["standby"] for s in op.run(ctx)["resumed"]] == ["pg-delayed"] and "pg_wal_replay_resume" in calls[0]
    op, _audit, calls, ctx = _resume_op([PAUSE_INTENT])  # plan only / rejected / failed before the freeze
    assert op.run(ctx)["resumed"]
    op, _audit, calls, ctx = _resume_op([PAUSE_INTENT, {"action": "freeze_app", "outcome": "ok", "target": None}])
    # promoted: the server now
    op.__dict__["req"] = SimpleNamespace(from_delayed_standby=True, restore_to="pg-delayed", in_place=False)
    assert op.run(ctx) == {"resumed": [], "recovered_onto": "pg-delayed"} and calls == []
    dba = {**PAUSE_INTENT, "details": {"already_paused": True}}
    op, _audit, calls, ctx = _resume_op([dba])  # a DBA's pause: never undone
    assert op.run(ctx) == {"resumed": [], "recovered_onto": None} and calls == []
