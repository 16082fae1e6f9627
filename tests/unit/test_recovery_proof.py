"""prove_target / parse_recovery_log / parse_history_file on PostgreSQL 15's own words."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from barman_dr.forensics.recovery_proof import (
    parse_history_file,
    parse_pg_time,
    parse_recovery_log,
    prove_target,
)
from barman_dr.models import RecoveryTarget

P = "2026-11-25 13:02:10.101 UTC [4242] "  # the lab's log_line_prefix = '%m [%p] %q%u@%d '


def log(*lines: str) -> str:
    return "\n".join(P + line for line in lines) + "\n"


START = (
    "LOG:  starting PostgreSQL 15.18 (Debian 15.18-1.pgdg120+1) on x86_64-pc-linux-gnu",
    "LOG:  database system was interrupted; last known up at 2026-11-25 12:50:01 UTC",
)

TIME_LOG = log(
    *START,
    'LOG:  starting point-in-time recovery to 2026-11-25 12:59:41+00',
    'LOG:  restored log file "000000010000000000000004" from archive',
    "LOG:  redo starts at 0/4000028",
    'LOG:  restored log file "000000010000000000000005" from archive',
    "LOG:  consistent recovery state reached at 0/4000100",
    "LOG:  recovery stopping before commit of transaction 745, time 2026-11-25 12:59:41.509163+00",
    "LOG:  redo done at 0/50000F8 system usage: CPU: user: 0.00 s, system: 0.00 s, elapsed: 0.01 s",
    'LOG:  last completed transaction was at log time 2026-11-25 12:59:30.118+00',
    "LOG:  selected new timeline ID: 2",
    "LOG:  archive recovery complete",
    "LOG:  database system is ready to accept connections",
)
TIME_HISTORY = "1\t0/5000148\tbefore 2026-11-25 12:59:41.509163+00\n"

XID_LOG = log(
    *START,
    "LOG:  starting point-in-time recovery to XID 745",
    "LOG:  recovery stopping after commit of transaction 745, time 2026-11-25 12:59:41.509163+00",
    "LOG:  selected new timeline ID: 2",
    "LOG:  archive recovery complete",
)
XID_HISTORY = "1\t0/5000148\tafter transaction 745\n"

XID_EXCL_LOG = XID_LOG.replace("after commit", "before commit")
XID_EXCL_HISTORY = "1\t0/5000148\tbefore transaction 745\n"

NAME_LOG = log(
    *START,
    'LOG:  starting point-in-time recovery to "before-migration"',
    'LOG:  recovery stopping at restore point "before-migration", time 2026-11-25 12:58:00.000001+00',
    "LOG:  selected new timeline ID: 3",
)
NAME_HISTORY = "1\t0/3000000\tno recovery target specified\n\n2\t0/5000148\tat restore point \"before-migration\"\n"

LSN_LOG = log(
    *START,
    'LOG:  starting point-in-time recovery to WAL location (LSN) "0/5000148"',
    'LOG:  recovery stopping before WAL location (LSN) "0/5000148"',
    "LOG:  selected new timeline ID: 2",
)
LSN_HISTORY = '1\t0/5000148\tbefore LSN 0/5000148\n'

IMMEDIATE_LOG = log(
    *START,
    "LOG:  starting point-in-time recovery to earliest consistent point",
    "LOG:  recovery stopping after reaching consistency",
    "LOG:  selected new timeline ID: 2",
)
IMMEDIATE_HISTORY = "1\t0/4000100\treached consistency\n"

NOT_REACHED_LOG = log(
    *START,
    "LOG:  starting point-in-time recovery to 2026-11-25 12:59:41+00",
    'LOG:  restored log file "000000010000000000000005" from archive',
    "LOG:  redo done at 0/5000110 system usage: CPU: user: 0.00 s, system: 0.00 s, elapsed: 0.03 s",
    "FATAL:  recovery ended before configured recovery target was reached",
    "LOG:  startup process (PID 4243) exited with exit code 1",
    "LOG:  terminating any other active server processes",
    "LOG:  database system is shut down",
)

TIME_TARGET = RecoveryTarget("time", "2026-11-25T12:59:41+00:00")


# ------------------------------------------------------------------- parsing


def test_parse_pg_time():
    assert parse_pg_time("2026-11-25 12:59:41.509163+00") == datetime(2026, 11, 25, 12, 59, 41, 509163, tzinfo=UTC)
    assert parse_pg_time("2026-11-25 12:59:41.509+00") == datetime(2026, 11, 25, 12, 59, 41, 509000, tzinfo=UTC)
    assert parse_pg_time("2026-11-25 14:29:41+01:30") == datetime(2026, 11, 25, 14, 29, 41,
                                                                  tzinfo=timezone(timedelta(hours=1, minutes=30)))
    assert parse_pg_time("2026-11-25 13:59:41+01") == datetime(2026, 11, 25, 12, 59, 41, tzinfo=UTC)
    assert parse_pg_time("2026-11-25 12:59:41").tzinfo == UTC


def test_parse_recovery_log_time_stop():
    stop = parse_recovery_log(TIME_LOG)
    assert stop.kind == "xact"
    assert stop.when == "before"
    assert stop.xid == 745
    assert datetime.fromisoformat(stop.time) == datetime(2026, 11, 25, 12, 59, 41, 509163, tzinfo=UTC)
    assert stop.new_timeline == 2
    assert stop.not_reached is False
    assert any("recovery stopping before commit of transaction 745" in line for line in stop.lines)
    assert any("starting point-in-time recovery" in line for line in stop.lines)
    assert any("archive recovery complete" in line for line in stop.lines)
    # noise (restored log file, redo starts) is not kept
    assert not any("restored log file" in line for line in stop.lines)


def test_parse_recovery_log_abort_and_after():
    stop = parse_recovery_log(log("LOG:  recovery stopping after abort of transaction 9001, time 2026-11-25 "
                                  "12:00:00+00"))
    assert (stop.kind, stop.when, stop.xid) == ("xact", "after", 9001)


def test_parse_recovery_log_restore_point_and_lsn_and_consistency():
    s = parse_recovery_log(NAME_LOG)
    assert (s.kind, s.restore_point, s.new_timeline) == ("restore_point", "before-migration", 3)
    assert s.time.startswith("2026-11-25T12:58:00.000001")
    s = parse_recovery_log(LSN_LOG.replace("0/5000148", "0/5000abc"))
    assert (s.kind, s.when, s.lsn) == ("lsn", "before", "0/5000ABC")
    s = parse_recovery_log(IMMEDIATE_LOG)
    assert s.kind == "consistency" and s.new_timeline == 2


def test_parse_recovery_log_fatal_not_reached():
    stop = parse_recovery_log(NOT_REACHED_LOG)
    assert stop.not_reached is True
    assert stop.kind is None and stop.new_timeline is None
    assert any("FATAL" in line for line in stop.lines)


def test_parse_recovery_log_empty():
    stop = parse_recovery_log("")
    assert stop.kind is None and stop.new_timeline is None and not stop.not_reached and stop.lines == []


def test_parse_recovery_log_last_stop_wins():
    # a log file may hold two starts (a failed attempt, then the retry): the last one counts
    text = log("LOG:  recovery stopping before commit of transaction 700, time 2026-11-25 12:00:00+00",
               "LOG:  selected new timeline ID: 2") + TIME_LOG.replace("timeline ID: 2", "timeline ID: 3")
    stop = parse_recovery_log(text)
    assert stop.xid == 745 and stop.new_timeline == 3


def test_parse_history_file():
    entries = parse_history_file(TIME_HISTORY)
    assert len(entries) == 1
    e = entries[0]
    assert (e.parent_timeline, e.switch_lsn, e.reason) == (1, "0/5000148", "before 2026-11-25 12:59:41.509163+00")


def test_parse_history_file_multi_and_comments():
    entries = parse_history_file("# comment\n" + NAME_HISTORY)
    assert [e.parent_timeline for e in entries] == [1, 2]
    assert entries[-1].reason == 'at restore point "before-migration"'
    assert entries[0].reason == "no recovery target specified"


def test_parse_history_file_spaces_instead_of_tabs():
    [e] = parse_history_file("1 0/5000148 before transaction 745\n")
    assert (e.parent_timeline, e.switch_lsn, e.reason) == (1, "0/5000148", "before transaction 745")


def test_parse_history_file_no_reason_and_empty():
    assert parse_history_file("") == []
    [e] = parse_history_file("1\t0/5000148\n")
    assert e.reason == ""


# -------------------------------------------------------------------- proving


def test_prove_time_target_reached():
    proof = prove_target(TIME_TARGET, TIME_LOG, TIME_HISTORY, old_timeline=1, new_timeline=2)
    assert proof.reached, proof.reasons
    assert proof.history_reason == "before 2026-11-25 12:59:41.509163+00"
    assert proof.old_timeline == 1 and proof.new_timeline == 2
    assert proof.stop["xid"] == 745
    assert "recovery stopped as requested" in proof.reasons[0]
    d = proof.to_dict()
    assert d["reached"] is True and d["stop"]["kind"] == "xact"


def test_prove_time_target_exclusive():
    # exclusive: the first transaction at or after the target time is not replayed
    t = RecoveryTarget("time", "2026-11-25T12:59:41.509163+00:00", inclusive=False)
    assert prove_target(t, TIME_LOG, TIME_HISTORY, 1, 2).reached
    t_incl = RecoveryTarget("time", "2026-11-25T12:59:41.509163+00:00", inclusive=True)
    assert not prove_target(t_incl, TIME_LOG, TIME_HISTORY, 1, 2).reached


def test_prove_time_target_stopped_too_early():
    # recovery stopped at a commit *before* the target time: it did not reach the target
    t = RecoveryTarget("time", "2026-11-25T13:30:00+00:00")
    proof = prove_target(t, TIME_LOG, TIME_HISTORY, 1, 2)
    assert not proof.reached
    assert any("does not follow the target" in r for r in proof.reasons)


def test_prove_fatal_not_reached():
    proof = prove_target(TIME_TARGET, NOT_REACHED_LOG, None, old_timeline=1, new_timeline=1)
    assert not proof.reached
    text = " | ".join(proof.reasons)
    assert "recovery ended before configured recovery target was reached" in text
    assert "timeline did not increase" in text
    assert "no timeline history file" in text
    assert "no 'recovery stopping before commit" in text


def test_prove_timeline_must_increase():
    proof = prove_target(TIME_TARGET, TIME_LOG, TIME_HISTORY, old_timeline=2, new_timeline=2)
    assert not proof.reached
    assert any("timeline did not increase" in r for r in proof.reasons)
    assert not prove_target(TIME_TARGET, TIME_LOG, TIME_HISTORY, None, 2).reached
    assert not prove_target(TIME_TARGET, TIME_LOG, TIME_HISTORY, 1, None).reached


def test_prove_log_and_controldata_disagree():
    proof = prove_target(TIME_TARGET, TIME_LOG, TIME_HISTORY, old_timeline=1, new_timeline=3)
    assert not proof.reached
    assert any("log selected timeline 2 but pg_controldata says 3" in r for r in proof.reasons)


def test_prove_history_reason_must_be_before():
    proof = prove_target(TIME_TARGET, TIME_LOG, "1\t0/5000148\tno recovery target specified\n", 1, 2)
    assert not proof.reached
    assert any("history file reason" in r for r in proof.reasons)


def test_prove_missing_history():
    proof = prove_target(TIME_TARGET, TIME_LOG, "", 1, 2)
    assert not proof.reached and proof.history_reason is None


def test_prove_xid_inclusive_and_exclusive():
    assert prove_target(RecoveryTarget("xid", "745"), XID_LOG, XID_HISTORY, 1, 2).reached
    excl = RecoveryTarget("xid", "745", inclusive=False)
    assert prove_target(excl, XID_EXCL_LOG, XID_EXCL_HISTORY, 1, 2).reached
    # inclusive target, but PostgreSQL stopped *before* the transaction: not what was asked
    proof = prove_target(RecoveryTarget("xid", "745"), XID_EXCL_LOG, XID_EXCL_HISTORY, 1, 2)
    assert not proof.reached
    assert any("expected 'recovery stopping after commit of transaction 745'" in r for r in proof.reasons)


def test_prove_xid_wrong_transaction():
    proof = prove_target(RecoveryTarget("xid", "746"), XID_LOG, XID_HISTORY, 1, 2)
    assert not proof.reached
    assert any("does not name transaction 746" in r for r in proof.reasons)


def test_prove_restore_point():
    assert prove_target(RecoveryTarget("name", "before-migration"), NAME_LOG, NAME_HISTORY, 2, 3).reached
    assert not prove_target(RecoveryTarget("name", "other"), NAME_LOG, NAME_HISTORY, 2, 3).reached


def test_prove_lsn():
    t = RecoveryTarget("lsn", "0/5000148", inclusive=False)
    assert prove_target(t, LSN_LOG, LSN_HISTORY, 1, 2).reached
    # LSNs compare by value, not by spelling
    assert prove_target(t, LSN_LOG.replace('"0/5000148"', '"0/05000148"'), LSN_HISTORY, 1, 2).reached
    assert not prove_target(RecoveryTarget("lsn", "0/6000000"), LSN_LOG, LSN_HISTORY, 1, 2).reached


def test_prove_immediate():
    t = RecoveryTarget("immediate", None)
    assert prove_target(t, IMMEDIATE_LOG, IMMEDIATE_HISTORY, 1, 2).reached
    assert not prove_target(t, TIME_LOG, TIME_HISTORY, 1, 2).reached


@pytest.mark.parametrize("target", [TIME_TARGET, RecoveryTarget("xid", "745"), RecoveryTarget("name", "x"),
                                    RecoveryTarget("lsn", "0/1"), RecoveryTarget("immediate", None)])
def test_prove_nothing_in_the_log(target):
    proof = prove_target(target, "", "", 1, 1)
    assert not proof.reached
    assert len(proof.reasons) >= 2
