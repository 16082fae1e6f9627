"""/barman-dr/metrics: the families from recorded audit facts, the exposition format, the token check."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from barman_dr.surfaces.metrics import collect, render, token_ok

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def at(minutes_ago: float) -> datetime:
    return NOW - timedelta(minutes=minutes_ago)


LATEST = [
    {"server": "pg-primary", "action": "verify_report", "outcome": "warning", "event_time": at(30),
     "details": {"status": "WARNING", "facts": {"newest_backup_end": at(120).isoformat(),
                                                "oldest_backup_end": at(60 * 24 * 7).isoformat(),
                                                "newest_wal_time": at(31).isoformat()}}},
    {"server": "pg-primary", "action": "drill_result", "outcome": "ok", "event_time": at(600),
     "details": {"rto_s": 41.5}},
    {"server": "pg-primary", "action": "drill_result", "outcome": "failed", "event_time": at(60),
     "details": {"rto_s": 1200}},
    {"server": "pg-primary", "action": "report", "outcome": "ok", "event_time": at(10),
     "details": {"rto_s": 6.9, "time_to_recovered_s": 31.2}},
    {"server": "retired", "action": "report", "outcome": "ok", "event_time": at(10), "details": {"rto_s": 1}},
]


def families() -> dict[str, list]:
    fams = collect({"pg-primary": 900, "pg-primary2": 900}, LATEST, [{"server": "pg-primary2", "dag_id": "dr_pitr"}],
                   {"pg-primary": True}, NOW)
    return {f.name: f.samples for f in fams}


def value(fams: dict, name: str, server: str) -> float | None:
    return next((v for labels, v in fams[name] if labels["server"] == server), None)


def test_the_issue_metrics_from_the_audit_trail():
    f = families()
    assert value(f, "barman_dr_last_backup_age_seconds", "pg-primary") == 7200
    assert value(f, "barman_dr_recoverable_since_timestamp_seconds", "pg-primary") == at(60 * 24 * 7).timestamp()
    assert value(f, "barman_dr_wal_archive_lag_seconds", "pg-primary") == 31 * 60
    assert value(f, "barman_dr_verification_status", "pg-primary") == 1
    assert value(f, "barman_dr_last_successful_drill_timestamp_seconds", "pg-primary") == at(600).timestamp()
    assert value(f, "barman_dr_last_drill_rto_seconds", "pg-primary") == 1200  # the last drill, passed or not
    assert value(f, "barman_dr_last_pitr_rto_seconds", "pg-primary") == 6.9
    assert value(f, "barman_dr_last_pitr_time_to_recovered_seconds", "pg-primary") == 31.2
    assert value(f, "barman_dr_pitr_in_progress", "pg-primary2") == 1
    assert value(f, "barman_dr_pitr_in_progress", "pg-primary") == 0
    assert value(f, "barman_dr_app_frozen", "pg-primary") == 1


def test_a_server_never_verified_has_no_made_up_values():
    f = families()
    assert value(f, "barman_dr_last_backup_age_seconds", "pg-primary2") is None
    assert value(f, "barman_dr_rto_objective_seconds", "pg-primary2") == 900
    assert all(labels["server"] != "retired" for samples in f.values() for labels, _ in samples)


def test_exposition_format():
    text = render(collect({"pg-primary": 900}, LATEST, [], {}, NOW))
    assert "# HELP barman_dr_last_backup_age_seconds " in text
    assert "# TYPE barman_dr_last_backup_age_seconds gauge" in text
    assert 'barman_dr_last_backup_age_seconds{server="pg-primary"} 7200\n' in text
    assert 'barman_dr_last_pitr_rto_seconds{server="pg-primary"} 6.9\n' in text
    assert text.endswith("\n")


def test_token():
    assert token_ok("Bearer s3cret", "s3cret") and token_ok("bearer s3cret ", "s3cret")
    assert not token_ok("Bearer wrong", "s3cret") and not token_ok(None, "s3cret")
    assert not token_ok("Basic s3cret", "s3cret") and not token_ok("Bearer ", "")


def test_a_delayed_standbys_window_and_delay_from_the_verification_facts():
    latest = [{"server": "pg-primary", "action": "verify_report", "outcome": "ok", "event_time": at(5),
               "details": {"status": "OK", "facts": {"delayed_standbys": [
                   {"standby": "pg-delayed", "delay_s": 180, "protected_window_s": 181.5},
                   {"standby": "pg-delayed2", "delay_s": 3600, "protected_window_s": None}]}}}]
    text = render(collect({"pg-primary": 900}, latest, [], {}, NOW))
    assert 'barman_dr_delayed_standby_window_seconds{server="pg-primary",standby="pg-delayed"} 181.5\n' in text
    assert 'barman_dr_delayed_standby_delay_seconds{server="pg-primary",standby="pg-delayed2"} 3600\n' in text
    assert 'standby="pg-delayed2"} ' not in text.split("barman_dr_delayed_standby_delay_seconds")[0]  # unknown: none
