"""Target resolution (pure): PostgreSQL's stop rules on pg_waldump records, the backup choice, the discards, the proof."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from barman_dr.exceptions import PreflightError, ValidationError
from barman_dr.forensics.recovery_proof import prove_target
from barman_dr.forensics.target_resolution import (
    DiscardTally,
    Locator,
    StopPoint,
    XidLocator,
    choose_backup,
    on_path,
    restore_target_for,
    stop_from_record,
    timeline_of_lsn,
    xid_in_future,
    xid_ranges,
)
from barman_dr.forensics.waldump import TxnAggregator, parse_record, record_end
from barman_dr.models import BackupInfo, Lsn, RecoveryTarget
from barman_dr.rto_estimate import Calibration, estimate

T0 = datetime(2026, 12, 4, 10, 0, 0, tzinfo=UTC)


def rec(rmgr: str, lsn: str, prev: str, desc: str, tx: int = 0, tot: int = 34) -> str:
    """A line exactly as pg_waldump (PostgreSQL 15) prints it."""
    return (f"rmgr: {rmgr:<11} len (rec/tot): {tot:6}/{tot:8}, tx: {tx:10}, lsn: {lsn}, prev {prev}, "
            f"desc: {desc}")


def commit(lsn: str, prev: str, xid: int, at: datetime, word: str = "COMMIT") -> str:
    return rec("Transaction", lsn, prev, f"{word} {at.strftime('%Y-%m-%d %H:%M:%S.%f')} UTC", xid)


def rp(lsn: str, prev: str, name: str) -> str:
    return rec("XLOG", lsn, prev, f"RESTORE_POINT {name}", 0, 98)


# ------------------------------------------------------------------------------ record boundaries


@pytest.mark.parametrize(("lsn", "tot", "end"), [
    (0x0100_0028, 34, 0x0100_0028 + 40),                 # fits: MAXALIGN(34) = 40
    (0x0100_0028, 40, 0x0100_0028 + 40),
    (0x0100_1FF0, 16, 0x0100_2000),                       # ends exactly at the page boundary: ends there
    (0x0100_1FF0, 34, 0x0100_2000 + 24 + 24),             # 16 bytes on the first page, 18 (-> 24) after the header
    (0x01FF_FFF0, 34, 0x0200_0000 + 40 + 24),             # into a new segment: the long header
    (0x0100_0028, 8192 * 2, 0x0100_0028 + 8192 * 2 + 24 * 2),  # spans three pages
])
def test_record_end_matches_xlogreader(lsn, tot, end):
    assert record_end(lsn, tot) == end


def test_a_parsed_record_knows_its_neighbours():
    r = parse_record(commit("0/B333808", "0/B3337D0", 759, T0))
    assert r is not None and r.prev == Lsn.parse("0/B3337D0").value and r.tot_len == 34
    assert r.end_lsn == Lsn.parse("0/B333808").value + 40


def test_a_restore_point_name_is_kept_verbatim():
    name = 'before "deploy" 42 \u2014 \u00fc, blkref #0: rel 1/2/3 blk 4  '
    r = parse_record(rp("0/9000150", "0/9000118", name))
    assert r is not None and r.desc == f"RESTORE_POINT {name}"


# ------------------------------------------------------------------------------ stop points


def test_stop_point_ranges_catch_one_record_early_or_late():
    before = StopPoint(kind="commit", when="before", lsn="0/B333808", prev_lsn="0/B3337D0", timeline=1, xid=759)
    lo, hi = before.switch_range()
    assert (lo, hi) == (Lsn.parse("0/B3337D0").value, Lsn.parse("0/B333808").value)
    assert before.discard_from == Lsn.parse("0/B333808").value
    after = StopPoint(kind="restore_point", when="after", lsn="0/9000150", end_lsn="0/90001B8", timeline=1)
    assert after.switch_range() == (Lsn.parse("0/9000150").value, Lsn.parse("0/90001B8").value)
    assert after.discard_from == Lsn.parse("0/90001B8").value
    assert StopPoint.from_dict(after.to_dict()) == after


def test_time_rule_inclusive_and_exclusive_and_aborts_count():
    t = T0 + timedelta(seconds=10)
    lines = [commit("0/1000100", "0/10000C8", 700, t - timedelta(seconds=1)),
             commit("0/1000200", "0/10001C8", 701, t),                               # exactly at the target
             commit("0/1000300", "0/10002C8", 702, t + timedelta(seconds=1), "ABORT"),
             commit("0/1000400", "0/10003C8", 703, t + timedelta(seconds=2))]
    inc = Locator(time=t, inclusive=True)
    exc = Locator(time=t, inclusive=False)
    for line in lines:
        inc.feed_line(line)
        exc.feed_line(line)
    # inclusive: stop before the first record *after* t, an ABORT counts (PostgreSQL's recoveryStopsBefore)
    assert inc.time_stop is not None and inc.time_stop.tx == 702
    assert stop_from_record(inc.time_stop, "before", 1).kind == "abort"
    # exclusive: stop before the first record at or after t
    assert exc.time_stop is not None and exc.time_stop.tx == 701


def test_time_rule_ignores_records_before_the_scan_start_and_duplicates():
    t = T0
    loc = Locator(time=t, from_lsn=Lsn.parse("0/1000300").value)
    loc.feed_line(commit("0/1000200", "0/10001C8", 701, t + timedelta(seconds=5)))   # before the scan start
    loc.feed_line(commit("0/1000400", "0/10003C8", 703, t + timedelta(seconds=6)))
    loc.feed_line(commit("0/1000400", "0/10003C8", 703, t + timedelta(seconds=6)))   # overlapping run: seen once
    assert loc.time_stop is not None and loc.time_stop.tx == 703 and loc.commits == 2


def test_restore_points_every_occurrence_with_the_commit_before_it():
    loc = Locator(name="before_deploy")
    loc.feed_line(commit("0/1000100", "0/10000C8", 700, T0))
    loc.feed_line(rp("0/1000200", "0/1000100", "before_deploy"))
    loc.feed_line(rp("0/1000300", "0/1000200", "before_deploy2"))
    loc.feed_line(commit("0/1000400", "0/1000300", 701, T0 + timedelta(seconds=5)))
    loc.feed_line(rp("0/1000500", "0/1000400", "before_deploy"))
    loc.finish()
    assert [Lsn(h.lsn).value for h in loc.points] == [Lsn.parse("0/1000200").value, Lsn.parse("0/1000500").value]
    assert [h.after_commit for h in loc.points] == [T0, T0 + timedelta(seconds=5)]


def test_a_restore_point_name_may_span_lines():
    loc = Locator(name="line one\nline two")
    loc.feed_line(rp("0/1000200", "0/1000100", "line one"))
    loc.feed_line("line two")
    loc.feed_line(commit("0/1000400", "0/1000300", 701, T0))
    loc.finish()
    assert len(loc.points) == 1


def test_xid_locator_commit_abort_and_subtransaction():
    loc = XidLocator(759)
    loc.feed_line(commit("0/1000100", "0/10000C8", 758, T0))
    loc.feed_line(commit("0/1000200", "0/10001C8", 759, T0))
    assert loc.end is not None and loc.committed is True
    ab = XidLocator(760)
    ab.feed_line(commit("0/1000300", "0/10002C8", 760, T0, "ABORT"))
    assert ab.committed is False
    sub = XidLocator(762)
    sub.feed_line(rec("Transaction", "0/1000400", "0/10003C8",
                      f"COMMIT {T0.strftime('%Y-%m-%d %H:%M:%S.%f')} UTC; subxacts: 762 763", 761))
    assert sub.end is None and sub.parent_of_sub == 761


# ------------------------------------------------------------------------------ backups and timelines


def backup(bid: str, tli: int, begin: str, end: str, status: str = "DONE") -> BackupInfo:
    return BackupInfo(server="s", backup_id=bid, status=status, timeline=tli, begin_time=None, end_time=None,
                      begin_lsn=Lsn.parse(begin), end_lsn=Lsn.parse(end), begin_wal=None, end_wal=None,
                      size_bytes=1, wal_files=None, last_available_wal=None, copy_time_seconds=None, pgdata=None,
                      system_id=None, postgres_version=None)


#: timeline 2 forked from 1 at 0/5000000 (an earlier PITR)
SWITCHES = [(1, "0/5000000")]
OLD = backup("20261101T000000", 1, "0/2000028", "0/2000100")
NEWER_ON_1 = backup("20261102T000000", 1, "0/4000028", "0/4000100")
ABANDONED = backup("20261103T000000", 1, "0/6000028", "0/6000100")   # taken on timeline 1 after the fork
ON_2 = backup("20261104T000000", 2, "0/7000028", "0/7000100")
ALL = [OLD, NEWER_ON_1, ABANDONED, ON_2]


def test_timeline_path():
    assert timeline_of_lsn(Lsn.parse("0/4FFFFFF").value, SWITCHES, 2) == 1
    assert timeline_of_lsn(Lsn.parse("0/5000000").value, SWITCHES, 2) == 2
    assert [on_path(b, SWITCHES, 2) for b in ALL] == [True, True, False, True]


def stop_at(lsn: str) -> StopPoint:
    return StopPoint(kind="commit", when="before", lsn=lsn, prev_lsn="0/1", timeline=1)


@pytest.mark.parametrize(("stop", "want"), [
    ("0/3000000", OLD), ("0/4500000", NEWER_ON_1), ("0/6500000", NEWER_ON_1), ("0/8000000", ON_2),
])
def test_auto_picks_the_newest_backup_on_the_path_that_ended_before_the_stop(stop, want):
    assert choose_backup(ALL, stop_at(stop), switches=SWITCHES, timeline=2) == want


def test_immediate_is_the_newest_on_the_path():
    assert choose_backup(ALL, None, switches=SWITCHES, timeline=2) == ON_2


def test_no_backup_before_the_stop_is_refused():
    with pytest.raises(PreflightError, match="older than every usable backup"):
        choose_backup(ALL, stop_at("0/2000050"), switches=SWITCHES, timeline=2)


@pytest.mark.parametrize(("bid", "match"), [
    (ABANDONED.backup_id, "abandoned branch"), (ON_2.backup_id, "after the resolved stop point"),
    ("20991231T000000", "no DONE backup"),
])
def test_an_explicit_backup_must_fit_too(bid, match):
    with pytest.raises(ValidationError, match=match) as ei:
        choose_backup(ALL, stop_at("0/6500000"), switches=SWITCHES, timeline=2, explicit=bid)
    assert ei.value.field == "backup_id"


def test_a_name_restores_by_its_exact_lsn_other_targets_as_asked():
    stop = StopPoint(kind="restore_point", when="after", lsn="0/9000150", timeline=1)
    assert restore_target_for(RecoveryTarget("name", "x", True), stop) == RecoveryTarget("lsn", "0/9000150", True)
    t = RecoveryTarget("xid", "759", False)
    assert restore_target_for(t, stop) == t
    # an epoch-qualified xid (pg_current_xact_id()) is what PostgreSQL keeps of it: 32 bits
    assert restore_target_for(RecoveryTarget("xid", str(2**32 + 759), False), stop) == t
    tm = RecoveryTarget("time", "2026-12-04T10:00:00+00:00", True)
    assert restore_target_for(tm, stop) is tm


@pytest.mark.parametrize(("xid", "next_xid", "future"), [
    (759, 800, False), (800, 800, True), (900, 800, True),
    (100, 2**32 + 800, False),           # after a wraparound, a small 32-bit xid is old, not new
    (2**32 - 5, 2**32 + 800, False),     # the end of the previous epoch
    (2**32 + 900, 2**32 + 800, True),    # a full xid compares as is
    (2**32 + 700, 2**32 + 800, False),
])
def test_xid_in_the_future_is_wraparound_safe(xid, next_xid, future):
    assert xid_in_future(xid, next_xid) is future


def test_a_wal_switch_ends_at_the_next_segment():
    r = parse_record(rec("XLOG", "0/3000100", "0/30000C8", "SWITCH", 0, 24))
    stop = stop_from_record(r, "after", 1)
    assert stop.end_lsn == "0/4000000"


def test_barman_refuses_a_target_time_before_a_backups_end_time():
    late = backup("20261105T000000", 2, "0/7000028", "0/7000100")
    late = late.__class__(**{**late.__dict__, "end_time": T0 + timedelta(minutes=5)})
    early = backup("20261104T000000", 2, "0/6800028", "0/6800100")
    early = early.__class__(**{**early.__dict__, "end_time": T0 - timedelta(minutes=5)})
    # the stop record is after both backups' end LSN, but the target time is before `late` ended
    assert choose_backup([early, late], stop_at("0/8000000"), switches=SWITCHES, timeline=2, target_time=T0) == early


# ------------------------------------------------------------------------------ what a PITR discards


def test_discard_tally_counts_per_relation_from_the_stop_on():
    lines = [
        commit("0/1000100", "0/10000C8", 700, T0),                          # before the stop: kept
        "AGG 701 DELETE 0x00 1663/5/16385 7465 0/1000150 0/1100000",
        commit("0/1100100", "0/11000C8", 701, T0 + timedelta(seconds=1)),  # the stop record (before it)
        "AGG 702 INSERT - 1663/5/16385 150 0/1100200 0/1100900",
        "AGG 702 INSERT - 1663/5/16385 50 0/1100A00 0/1100F00",
        rec("Heap", "0/1101000", "0/1100F00", "HOT_UPDATE off 1 xmax 702 flags 0x20 ; new off 2 xmax 0, "
            "blkref #0: rel 1663/5/16390 blk 0", 702, 69),
        rec("Transaction", "0/1101100", "0/1101000",
            f"COMMIT {(T0 + timedelta(seconds=2)).strftime('%Y-%m-%d %H:%M:%S.%f')} UTC; subxacts: 703", 702),
        commit("0/1101200", "0/1101100", 704, T0 + timedelta(seconds=3)),   # an empty commit (a WAL nudge)
    ]
    tally = DiscardTally(from_lsn=Lsn.parse("0/1100100").value)
    agg = TxnAggregator(lambda _t: False, on_commit=tally.on_commit, on_record=tally.on_record)
    agg.feed_lines(lines)
    s = tally.summary({})
    assert s["transactions"] == 3 and s["transactions_with_changes"] == 2
    assert s["tables"]["relfilenode 1663/5/16385"] == {"inserted": 200, "updated": 0, "deleted": 7465}
    assert s["tables"]["relfilenode 1663/5/16390"] == {"inserted": 0, "updated": 1, "deleted": 0}
    assert s["total"] == {"inserted": 200, "updated": 1, "deleted": 7465}
    assert s["xid_ranges"] == [[701, 704]]  # 703: the subtransaction's rows carry its own xid
    assert s["largest"][0]["xid"] == 701


def test_running_xacts_at_the_decode_start_flag_partial_counts():
    tally = DiscardTally(from_lsn=0)
    agg = TxnAggregator(lambda _t: False, on_commit=tally.on_commit, on_record=tally.on_record)
    agg.feed_lines([
        rec("Standby", "0/1000050", "0/1000028", "RUNNING_XACTS nextXid 763 latestCompletedXid 760 oldestRunningXid "
            "761; 2 xacts: 761 762; 1 subxacts: 770", 0, 58),
        "AGG 761 INSERT - 1663/5/16385 10 0/1000100 0/1000200",
        commit("0/1000300", "0/1000200", 761, T0),
    ])
    assert tally.running_at_start == {761, 762}
    assert tally.summary({})["began_before_decode"] == [761]


def test_xid_ranges():
    assert xid_ranges([5, 3, 4, 9, 10, 12]) == [[3, 5], [9, 10], [12, 12]]
    assert xid_ranges([]) == []


# ------------------------------------------------------------------------------ the exact proof

LOG = ("LOG:  starting point-in-time recovery to 2026-12-04 10:00:10+00\n"
       "LOG:  recovery stopping before commit of transaction 759, time 2026-12-04 10:00:11.5+00\n"
       "LOG:  selected new timeline ID: 2\n")
HISTORY = "1\t0/B333808\tbefore 2026-12-04 10:00:10+00\n"
STOP = StopPoint(kind="commit", when="before", lsn="0/B333808", prev_lsn="0/B3337D0", timeline=1, xid=759,
                 time=datetime(2026, 12, 4, 10, 0, 11, 500000, tzinfo=UTC).isoformat()).to_dict()
TARGET = RecoveryTarget("time", "2026-12-04T10:00:10+00:00", True)


def test_the_exact_stop_point_is_proven():
    p = prove_target(TARGET, LOG, HISTORY, 1, 2, stop_point=STOP, recovery_timeline=1)
    assert p.reached, p.reasons


@pytest.mark.parametrize(("change", "why"), [
    ({"lsn": "0/B333840", "prev_lsn": "0/B333808"}, "forks at 0/B333808"),          # resolved one record later
    ({"xid": 760}, "transaction 760"),                                               # another transaction
    ({"time": datetime(2026, 12, 4, 10, 0, 11, 600000, tzinfo=UTC).isoformat()}, "not the same record"),
    ({"when": "after"}, "recovery stopping after"),
])
def test_a_stop_anywhere_else_fails_the_proof(change, why):
    point = StopPoint.from_dict({**STOP, **change}).to_dict()
    p = prove_target(TARGET, LOG, HISTORY, 1, 2, stop_point=point, recovery_timeline=1)
    assert not p.reached and any(why in r for r in p.reasons), p.reasons


def test_a_restore_point_by_lsn_is_proven_by_the_lsn_and_the_fork():
    point = StopPoint(kind="restore_point", when="after", lsn="0/9000150", end_lsn="0/90001B8", timeline=1,
                      name="x").to_dict()
    log = 'LOG:  recovery stopping after WAL location (LSN) "0/9000150"\nLOG:  selected new timeline ID: 3\n'
    hist = "1\t0/5000000\tno recovery target specified\n2\t0/90001B8\tafter LSN 0/9000150\n"
    ok = prove_target(RecoveryTarget("lsn", "0/9000150", True), log, hist, 2, 3, stop_point=point,
                      recovery_timeline=2)
    assert ok.reached, ok.reasons
    wrong_parent = prove_target(RecoveryTarget("lsn", "0/9000150", True), log,
                                "1\t0/90001B8\tafter LSN 0/9000150\n", 2, 3, stop_point=point, recovery_timeline=2)
    assert wrong_parent.reached  # the stop record's own timeline (1) is accepted as the parent
    early = prove_target(RecoveryTarget("lsn", "0/9000150", True), log.replace("after", "before"),
                         hist.replace("0/90001B8", "0/9000150"), 2, 3, stop_point=point, recovery_timeline=2)
    assert not early.reached


# ------------------------------------------------------------------------------ the RTO estimate


def test_the_estimate_follows_the_mode_and_the_servers_own_history():
    events = [
        {"action": "report", "outcome": "ok", "details": {"rto_s": 6.9, "staged_restore": True}},
        {"action": "report", "outcome": "ok", "details": {"rto_s": 7.1, "staged_restore": True}},
        {"action": "stage_restore", "outcome": "ok",
         "details": {"staged": True, "bytes": 100 * 2**20, "restore_s": 2.0, "replay_bytes": 64 * 2**20,
                     "replay": {"replay_s": 4.0}, "duration_s": 7.0}},
        {"action": "report", "outcome": "ok", "details": {"rto_s": 30.0, "staged_restore": False,
                                                          "phases_s": {"barman_restore": 20.0, "start_recovery": 4}}},
    ]
    cal = Calibration.from_events(events)
    staged = estimate(backup_bytes=200 * 2**20, replay_bytes=32 * 2**20, staged=True, calibration=cal, elapsed_s=5)
    assert staged["downtime_s"] == 7.0  # the median staged downtime, not restore + replay
    assert staged["restore_s"] == 4.0 and staged["replay_s"] == 2.0
    assert staged["time_to_recovered_s"] == pytest.approx(5 + 4 + 2 + 1 + 7, abs=0.2)
    unstaged = estimate(backup_bytes=200 * 2**20, replay_bytes=32 * 2**20, staged=False, calibration=cal)
    assert unstaged["downtime_s"] == pytest.approx(4 + 2 + 6, abs=0.2)
    assert "median" in staged["sources"]["restore_rate"]
    none = estimate(backup_bytes=0, replay_bytes=0, staged=True, calibration=Calibration())
    assert "assumed" in none["sources"]["downtime"]


def test_an_lsn_target_on_a_commit_record_is_proven_by_its_lsn():
    """PostgreSQL logs an LSN stop as '... WAL location (LSN)', even when the record is a COMMIT."""
    r = parse_record(commit("0/B333808", "0/B3337D0", 759, T0))
    point = stop_from_record(r, "before", 1, kind="record").to_dict()
    assert point["xid"] == 759  # kept for the plan, not for the proof
    log = 'LOG:  recovery stopping before WAL location (LSN) "0/B333808"\nLOG:  selected new timeline ID: 2\n'
    p = prove_target(RecoveryTarget("lsn", "0/B333800", False), log, "1\t0/B333808\tbefore LSN 0/B333808\n", 1, 2,
                     stop_point=point, recovery_timeline=1)
    assert p.reached, p.reasons
