"""Pure report logic of dr_daily_verification and the weekly retention, on recorded Barman JSON and crafted faults."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from barman_dr.models import BackupSummary, CheckReport, WalSegment, parse_list_backups
from barman_dr.verification import (
    CRITICAL,
    OK,
    SKIPPED,
    WARNING,
    build_report,
    check_findings,
    disk_finding,
    freshness_finding,
    parse_df_percent,
    retention_plan,
    standby_findings,
    streaming_findings,
    summarise,
    thresholds_for,
    wal_continuity_findings,
    window_obsolete,
)

BARMAN = Path(__file__).resolve().parents[1] / "fixtures" / "barman"


def load(name: str):
    return json.loads((BARMAN / name).read_text())


@pytest.fixture(scope="module")
def backups() -> list[BackupSummary]:
    return parse_list_backups(load("list-backups.json"), "pg-primary")


@pytest.fixture(scope="module")
def catalog() -> list[str]:
    return [ln.split("\t")[0] for ln in (BARMAN / "xlog-db.txt").read_text().splitlines() if ln.strip()]


def test_check_ok_has_no_findings():
    assert check_findings(CheckReport.from_json(load("check-ok.json"), "pg-primary")) == []


def test_check_failed_is_critical_with_hints():
    findings = check_findings(CheckReport.from_json(load("check-failed.json"), "pg-primary"))
    by = {f.check: f for f in findings}
    assert set(by) == {"barman_check.receive_wal_running", "barman_check.replication_slot"}
    assert all(f.status == CRITICAL for f in findings)
    assert "barman cron" in by["barman_check.receive_wal_running"].hint
    assert "receive-wal" in by["barman_check.receive_wal_running"].hint
    # Barman's own hint is kept
    assert "slot 'barman' not active" in by["barman_check.replication_slot"].hint


def test_freshness(backups):
    newest = max(b.end_time for b in backups)
    assert freshness_finding(backups, newest + timedelta(hours=1), 170).status == OK
    stale = freshness_finding(backups, newest + timedelta(hours=171), 170)
    assert stale.status == CRITICAL and "171.0 h old" in stale.reason
    assert freshness_finding([], newest, 170).status == CRITICAL
    failed = [BackupSummary("20260101T000000", "FAILED", newest, None, None, "full", None)]
    assert freshness_finding(failed, newest, 170).status == CRITICAL


def test_wal_continuity_recorded_catalogue_ok(catalog):
    findings, facts = wal_continuity_findings(catalog, catalog[0], "00000001000000000000000B", 10)
    assert [f.status for f in findings] == [OK, OK]
    assert facts["archive_lag_files"] == 0
    assert facts["coverage"]["complete"]


def test_wal_gap_is_critical_and_named(catalog):
    holed = [n for n in catalog if n != "000000010000000000000008"]
    findings, _ = wal_continuity_findings(holed, holed[0], "00000001000000000000000B", 10)
    gap = findings[0]
    assert gap.status == CRITICAL
    assert "000000010000000000000008" in gap.reason


def test_wal_lag_over_threshold_is_warning(catalog):
    current = WalSegment(1, WalSegment.parse(catalog[-1]).segno + 12).name
    findings, facts = wal_continuity_findings(catalog, catalog[0], current, 10)
    assert facts["archive_lag_files"] == 11
    assert findings[1].status == WARNING
    # exactly at the threshold is fine
    current = WalSegment(1, WalSegment.parse(catalog[-1]).segno + 11).name
    assert wal_continuity_findings(catalog, catalog[0], current, 10)[0][1].status == OK


def test_wal_nothing_archived_since_backup(catalog):
    findings, _ = wal_continuity_findings(catalog, "000000010000000000000020", None, 10)
    assert findings[0].status == CRITICAL
    assert findings[1].status == WARNING  # current WAL unknown


def test_streaming():
    procs = load("list-processes.json")["pg-primary"]
    running = any(p["name"] == "receive-wal" for p in procs)
    assert [f.status for f in streaming_findings(running, "barman", True)] == [OK, OK]
    stopped = streaming_findings(False, "barman", False)
    assert [f.status for f in stopped] == [CRITICAL, CRITICAL]
    assert "barman cron" in stopped[0].hint
    assert streaming_findings(True, "barman", None)[1].status == CRITICAL  # slot missing


def test_standby_lag():
    clients = load("replication-status.json")["pg-primary"]["streaming_clients"]
    assert [f.status for f in standby_findings(["pg-standby"], clients, 16 * 2**20)] == [OK]
    lagging = [{**clients[0], "replay_lsn_diff_bytes": -(32 * 2**20)}]
    assert standby_findings(["pg-standby"], lagging, 16 * 2**20)[0].status == WARNING
    assert standby_findings(["pg-standby2"], clients, 16 * 2**20)[0].status == CRITICAL
    catching_up = [{**clients[0], "current_state": "catchup"}]
    assert standby_findings(["pg-standby"], catching_up, 16 * 2**20)[0].status == CRITICAL


def test_df_and_disk():
    text = ("Filesystem     1024-blocks      Used Available Capacity Mounted on\n"
            "/dev/sda1        100000000  90000000  10000000      90% /var\n")
    pct, mount = parse_df_percent(text)
    assert (pct, mount) == (90.0, "/var")
    assert disk_finding(pct, mount, "/var/lib/barman", 85).status == CRITICAL
    assert disk_finding(pct, mount, "/var/lib/barman", 95).status == OK
    with pytest.raises(ValueError):
        parse_df_percent("garbage")


def test_report_and_summary():
    from barman_dr.verification import Finding

    ok = build_report("a", [Finding("x", OK, "fine")])
    warn = build_report("b", [Finding("x", OK, "fine"), Finding("y", WARNING, "lag", "hint")])
    crit = build_report("c", [Finding("y", WARNING, "lag"), Finding("z", CRITICAL, "down")])
    assert (ok["status"], warn["status"], crit["status"]) == (OK, WARNING, CRITICAL)
    assert warn["reasons"] == ["WARNING: lag (hint: hint)"]
    assert json.loads(json.dumps(crit)) == crit  # XCom/audit safe
    s = summarise({"a": ok, "b": warn, "c": crit, "d": None})
    assert s["status"] == CRITICAL
    assert s["critical"] == ["c", "d"] and s["warning"] == ["b"]
    assert "task failed" in s["reasons"]["d"][0]
    assert summarise({"a": ok, "b": warn})["status"] == WARNING
    assert summarise({"a": ok})["status"] == OK


def test_thresholds_defaults_and_overrides(inventory):
    th = thresholds_for(inventory.server("pg-primary").verification)
    assert th["max_backup_age_hours"] == 170 and th["max_wal_lag_files"] == 10
    assert thresholds_for({})["max_disk_usage_percent"] == 85


def _b(bid: str, retention: str, status: str = "DONE") -> BackupSummary:
    return BackupSummary(bid, status, datetime(2026, 1, 1, tzinfo=UTC), 1, 1, "full", retention)


def test_retention_never_below_minimum_redundancy():
    bs = [_b("20260101T000000", "OBSOLETE"), _b("20260108T000000", "OBSOLETE"), _b("20260115T000000", "VALID")]
    plan = retention_plan(bs, 2)
    assert plan["obsolete"] == ["20260101T000000", "20260108T000000"]
    assert plan["delete"] == ["20260101T000000"]
    assert plan["kept_for_redundancy"] == ["20260108T000000"]
    assert plan["remaining_after"] == 2
    assert retention_plan(bs, 3)["delete"] == []
    assert retention_plan(bs, 1)["delete"] == ["20260101T000000", "20260108T000000"]


def test_retention_protects_new_backup_and_ignores_failed():
    bs = [_b("20260101T000000", "OBSOLETE"), _b("20260102T000000", "OBSOLETE", "FAILED"),
          _b("20260115T000000", "OBSOLETE")]
    plan = retention_plan(bs, 1, protect=["20260115T000000"])
    assert plan["delete"] == ["20260101T000000"]
    assert plan["done"] == 2


def test_retention_recorded_list_backups(backups):
    plan = retention_plan(backups, 2)
    assert plan["delete"] == [] and plan["done"] == 2


# ------------------------------------------------------------- added with the fleet's second server


def _seg(n: int, tli: int = 1) -> str:
    return WalSegment(tli, n).name


def test_catalogued_segment_missing_on_disk_is_a_named_gap():
    cat = [_seg(n) for n in range(2, 9)]
    disk = set(cat) - {_seg(5)}
    found, facts = wal_continuity_findings(cat, _seg(2), _seg(9), 10, files_on_disk=disk)
    by = {f.check: f for f in found}
    assert by["wal_continuity"].status == CRITICAL
    assert _seg(5) in by["wal_continuity"].reason and "file is gone" in by["wal_continuity"].reason
    assert facts["catalogued_files_missing"] == [_seg(5)]
    ok, facts = wal_continuity_findings(cat, _seg(2), _seg(9), 10, files_on_disk=set(cat))
    assert {f.check: f for f in ok}["wal_continuity"].status == OK and facts["catalogued_files_missing"] == []


def test_window_retention_keeps_newest_before_window_and_minimum_redundancy():
    now = datetime(2026, 1, 10, tzinfo=UTC)

    def b(bid: str, day: int) -> BackupSummary:
        return BackupSummary(bid, "DONE", datetime(2026, 1, day, tzinfo=UTC), 1, 1, "full", "VALID")

    bs = [b("20260101T000000", 1), b("20260102T000000", 2), b("20260103T000000", 3), b("20260109T000000", 9)]
    assert window_obsolete(bs, 7, now) == ["20260101T000000"]  # the 2nd is the newest before the window start
    plan = retention_plan(bs, 2, recovery_window_days=0, now=now)
    assert plan["obsolete"] == ["20260101T000000", "20260102T000000", "20260103T000000"]
    assert plan["delete"] == ["20260101T000000", "20260102T000000"] and plan["remaining_after"] == 2
    assert plan["kept_for_redundancy"] == ["20260103T000000"]


def test_summary_counts_a_skipped_drill_as_neither_ok_nor_critical():
    s = summarise({"a": {"server": "a", "status": "OK"},
                   "b": {"server": "b", "status": SKIPPED, "skipped": "no nonprod target"}})
    assert s["status"] == OK and s["skipped"] == ["b"] and s["reasons"]["b"] == ["SKIPPED: no nonprod target"]
    assert summarise({"a": {"server": "a", "status": "bogus"}})["status"] == CRITICAL


def test_the_drill_summary_releases_only_the_locks_its_own_run_still_holds(monkeypatch):
    """A teardown that never ran (task instance removed) must not leave its server locked for every later run."""
    from types import SimpleNamespace

    from barman_dr.operators import scheduled
    from barman_dr.safety.locks import LockHolder

    held = {"pg-primary": LockHolder("pg-primary", "dr_monthly_restore_drill", "run-1", "drill", "t"),
            "pg-other": LockHolder("pg-other", "dr_pitr", "pitr-9", "pitr", "t"),
            "pg-torn": LockHolder("pg-torn", "dr_monthly_restore_drill", "run-1", "drill", "t")}
    released = []

    class FakeLock:
        def __init__(self, **_):
            pass

        def holders(self, servers):
            return {s: h for s, h in held.items() if s in servers}

        def release(self, server, *, dag_id, run_id):
            released.append((server, dag_id, run_id))
            return True

    recorded = []
    monkeypatch.setattr(scheduled, "ServerLock", FakeLock)
    audit = SimpleNamespace(record=lambda action, outcome, **kw: recorded.append((action, outcome, kw["server"])),
                            events=lambda **kw: [{"server": "pg-torn", "action": "drill_teardown"}])  # it failed
    op = scheduled.FleetSummaryOperator(task_id="summary", servers=["pg-primary", "pg-other", "pg-primary2", "pg-torn"],
                                        report_task_ids=[], action="drill_summary", release_locks=True)
    ctx = {"dag": SimpleNamespace(dag_id="dr_monthly_restore_drill"), "run_id": "run-1"}
    assert op.release_own_locks(ctx, audit) == ["pg-primary"]
    assert released == [("pg-primary", "dr_monthly_restore_drill", "run-1")]  # never another run's lock
    assert recorded == [("lock_released_by_summary", "ok", "pg-primary")]
